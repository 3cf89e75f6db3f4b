//! Appends reach the log through ingestion, against a real PostgreSQL with the facade running:
//! each appended event is one `Kind::Append` event of `weir.stream_events` carrying its stream,
//! version, id, type, data, metadata, tags and time, in one commit order with the row changes of
//! a watched table (also inside one transaction), and `read_log` finds them by type and tags.

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use weir::{Config, Event, EventFilter, Kind, LogReader};
use weir_core::Secret;
use weir_streams::{Expected, LogQuery, NewEvent, TagsMatch, append};
use weir_testkit::eventually;

async fn log(pool: &PgPool) -> Vec<Event> {
    LogReader::new(pool.clone())
        .await
        .unwrap()
        .read(0, 10_000, &EventFilter::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appended_events_reach_the_log_in_commit_order_with_row_changes() {
    let db = weir_testkit::shared().database("streams").unwrap();
    let pool = PgPool::connect(&db.url()).await.unwrap();
    sqlx::raw_sql("create table orders (id int primary key, note text)")
        .execute(&pool)
        .await
        .unwrap();
    let mut config = Config::default();
    config.database.url = Some(Secret::new(db.url()));
    config.source.slot = db.name().to_string();
    config.source.tables = vec!["orders".into()];
    weir::setup::init(&pool, &config).await.unwrap();
    let running = weir::Weir::builder(config).pool(pool.clone()).start().await.unwrap();

    // 1: a row; 2: an append of two events; 3: a row, an event and a row in one transaction.
    sqlx::query("insert into orders values (1, 'first')").execute(&pool).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let placed = NewEvent::new("placed", json!({"total": 12.5, "items": [1, 2]}))
        .metadata(json!({"user": "ann"}))
        .tag("orders")
        .tag("eu");
    let paid = NewEvent::new("paid", json!({"by": "card"})).tag("orders");
    let first = append(&mut conn, "order-1", Expected::NoStream, &[placed, paid]).await.unwrap();
    drop(conn);
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("insert into orders values (2, 'second')").execute(&mut *tx).await.unwrap();
    let shipped = NewEvent::new("shipped", json!({"carrier": "post"}));
    let second = append(&mut tx, "order-1", Expected::Exact(2), &[shipped]).await.unwrap();
    sqlx::query("update orders set note = 'changed' where id = 1").execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();

    eventually("six events in the log", Duration::from_secs(30), || async {
        log(&pool).await.len() >= 6
    })
    .await;
    let events = log(&pool).await;
    let seen: Vec<(Kind, &str)> = events.iter().map(|e| (e.kind, e.entity.as_str())).collect();
    assert_eq!(
        seen,
        vec![
            (Kind::Insert, "orders"),
            (Kind::Append, Event::STREAM_EVENTS),
            (Kind::Append, Event::STREAM_EVENTS),
            (Kind::Insert, "orders"),
            (Kind::Append, Event::STREAM_EVENTS),
            (Kind::Update, "orders"),
        ],
        "one commit order, and WAL order inside the transaction"
    );
    let placed = &events[1];
    assert_eq!(placed.key, json!({"stream": "order-1", "version": 1}));
    let record = placed.new_record.as_ref().unwrap();
    assert_eq!(record["stream"], json!("order-1"));
    assert_eq!(record["version"], json!(1));
    assert_eq!(record["id"], json!(first.ids[0].to_string()));
    assert_eq!(record["type"], json!("placed"));
    assert_eq!(record["data"], json!({"total": 12.5, "items": [1, 2]}));
    assert_eq!(record["metadata"], json!({"user": "ann"}));
    assert_eq!(record["tags"], json!(["orders", "eu"]));
    assert!(record["recorded_at"].is_string());
    assert_eq!(events[4].new_record.as_ref().unwrap()["version"], json!(3));
    assert_eq!(events[4].new_record.as_ref().unwrap()["id"], json!(second.ids[0].to_string()));
    // The transaction's events share its commit.
    assert_eq!(events[3].lsn, events[4].lsn);
    assert_eq!(events[4].lsn, events[5].lsn);

    // Reading every stream from the log: by type, by tags any/all, after a position.
    let read = |q: LogQuery| {
        let pool = pool.clone();
        async move { weir_streams::read_log(&pool, &q).await.unwrap() }
    };
    let all = read(LogQuery::default()).await;
    assert_eq!(all.iter().map(|e| e.version).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(all[0].position, Some(placed.position));
    assert_eq!(all[0].metadata, json!({"user": "ann"}));
    let by_type = read(LogQuery { event_type: Some("paid".into()), ..LogQuery::default() }).await;
    assert_eq!(by_type.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>(), vec!["paid"]);
    let any =
        read(LogQuery { tags: vec!["eu".into(), "orders".into()], ..LogQuery::default() }).await;
    assert_eq!(any.len(), 2);
    let all_tags = read(LogQuery {
        tags: vec!["eu".into(), "orders".into()],
        tags_match: TagsMatch::All,
        ..LogQuery::default()
    })
    .await;
    assert_eq!(all_tags.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>(), vec!["placed"]);
    let after = read(LogQuery { after: placed.position, limit: 1, ..LogQuery::default() }).await;
    assert_eq!(after.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>(), vec!["paid"]);

    running.cancel_token().cancel();
    running.wait().await.unwrap();
}
