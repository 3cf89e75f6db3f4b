//! Subscriptions delivered to Rust handlers through the facade, against a real PostgreSQL with
//! ingestion: appended events reach the handler in order per stream, exactly once.

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use weir::{Config, Event, Weir};
use weir_consumer::OperatorError;
use weir_core::Secret;
use weir_streams::{SubscriptionDef, SubscriptionKind};
use weir_testkit::eventually;

/// Records each delivery in `seen`, in the delivery's transaction.
struct Record;

impl weir_streams::Handler for Record {
    async fn handle(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &Event,
    ) -> Result<(), OperatorError> {
        let row = event.new_record.as_ref().ok_or_else(|| OperatorError::skip("no row"))?;
        sqlx::query("insert into seen (position, stream, version) values ($1, $2, $3)")
            .bind(event.position)
            .bind(row["stream"].as_str())
            .bind(row["version"].as_i64())
            .execute(tx)
            .await?;
        Ok(())
    }
}

async fn setup(url: &str) -> (PgPool, Config) {
    let pool = PgPool::connect(url).await.unwrap();
    sqlx::raw_sql(
        "create table posts (id int primary key, title text);
         create table seen (position bigint primary key, stream text, version bigint)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut config = Config::default();
    config.database.url = Some(Secret::new(url));
    config.source.slot = url.rsplit('/').next().unwrap().to_string();
    config.source.tables = vec!["posts".into()];
    weir::setup::init(&pool, &config).await.unwrap();
    (pool, config)
}

#[tokio::test]
async fn a_rust_subscription_delivers_each_stream_in_order() {
    let db = weir_testkit::shared().database("sub_rust").unwrap();
    let (pool, config) = setup(&db.url()).await;
    let def =
        SubscriptionDef::new("orders", SubscriptionKind::Stream, json!("order-*")).pool_size(4);
    let weir =
        Weir::builder(config).pool(pool.clone()).subscription(def, Record).start().await.unwrap();
    for round in 1..=5i64 {
        for s in 0..20 {
            sqlx::query(
                "insert into weir.stream_events (stream, version, id, type, data)
                 values ($1, $2, gen_random_uuid(), 'order.placed', '{}')",
            )
            .bind(format!("order-{s}"))
            .bind(round)
            .execute(&pool)
            .await
            .unwrap();
        }
        sqlx::query(
            "insert into weir.stream_events (stream, version, id, type, data)
             values ('other', $1, gen_random_uuid(), 'x', '{}')",
        )
        .bind(round)
        .execute(&pool)
        .await
        .unwrap();
    }
    eventually("100 deliveries", Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, i64>("select count(*) from seen").fetch_one(&pool).await.unwrap()
            >= 100
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows: Vec<(i64, String, i64)> =
        sqlx::query_as("select position, stream, version from seen order by position")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 100, "each selected event exactly once, `other` not at all");
    for s in 0..20 {
        let versions: Vec<i64> =
            rows.iter().filter(|r| r.1 == format!("order-{s}")).map(|r| r.2).collect();
        assert_eq!(versions, vec![1, 2, 3, 4, 5], "stream order-{s} in order");
    }
    let sub = weir_streams::subscriptions::get(&pool, "orders").await.unwrap();
    assert_eq!(sub.pool_size, 4);
    assert_eq!(sub.emitters.len(), 4);
    weir.stop().await.unwrap();
}
