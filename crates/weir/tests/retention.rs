//! A consumer halted for a long time, scaled down: `[log] retention` of one second stands for a
//! day, partitions of 100 positions for a million. While the operator is halted on a poison
//! event the slot keeps moving (the server's WAL is not pinned), retention drops only what
//! every consumer has handled and says who holds the rest, and once the operator is skipped
//! past the poison it catches up from the log and retention releases what it held.

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use weir::Config;
use weir_core::{OperatorConfig, Secret};
use weir_testkit::eventually;

/// Generous: the machine is small and other tests run beside.
const WAIT: Duration = Duration::from_secs(60);

async fn exec(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).execute(pool).await.unwrap();
}

async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string())).fetch_one(pool).await.unwrap()
}

/// 100 rows with ids `from..from + 100`, one transaction.
async fn insert_hundred(pool: &PgPool, from: i64) {
    exec(
        pool,
        &format!("insert into items select g, 1 from generate_series({from}, {}) g", from + 99),
    )
    .await;
}

#[tokio::test]
async fn a_halted_operator_holds_the_log_not_the_wal_and_retention_says_so() {
    let db = weir_testkit::shared().database("retention_hold").unwrap();
    let pool = PgPool::connect(&db.url()).await.unwrap();
    exec(
        &pool,
        "create table items (id bigint primary key, n int not null);
         create table item_shares (id bigint primary key, share int not null);",
    )
    .await;
    let mut config = Config::default();
    config.database.url = Some(Secret::new(db.url()));
    config.source.slot = db.name().to_string();
    config.source.tables = vec!["items".into()];
    config.log.partition_size = 100;
    config.log.retention = Duration::from_secs(1);
    config.consumers.lanes = 1;
    config.consumers.retry = weir_core::RetryConfig {
        min_restart_time: Duration::from_millis(10),
        backoff_multiplicator: 1.0,
        max_restart_time: Duration::from_millis(10),
        max_retries: 1,
    };
    // `100 / n`: a row with n = 0 is a poison event (division by zero).
    let operator = json!({
        "name": "item_shares",
        "entities": ["items"],
        "sql": "insert into item_shares select id, 100 / n from items where id = $1
                on conflict (id) do update set share = excluded.share",
    });
    config.operators = vec![serde_json::from_value::<OperatorConfig>(operator).unwrap()];
    weir::setup::init(&pool, &config).await.unwrap();
    let running = weir::Weir::builder(config.clone()).pool(pool.clone()).start().await.unwrap();

    // 300 handled events, then the poison, then 300 more the operator cannot reach.
    for from in [1, 101, 201] {
        insert_hundred(&pool, from).await;
    }
    eventually("the first 300 rows derived", WAIT, || async {
        scalar(&pool, "select count(*) from item_shares").await == 300
    })
    .await;
    exec(&pool, "insert into items values (0, 0)").await;
    eventually("item_shares halted", WAIT, || async {
        scalar(&pool, "select count(*) from weir.consumers where state = 'halted'").await == 1
    })
    .await;
    let poison = scalar(&pool, "select max(position) from weir.events").await;
    assert_eq!(poison, 301, "100-row transactions, one event per row");
    for from in [301, 401, 501] {
        insert_hundred(&pool, from).await;
    }

    // The slot moves past every write although the operator is halted.
    let written: String = sqlx::query_scalar("select pg_current_wal_insert_lsn()::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    let slot = db.name().to_string();
    eventually("the slot confirmed past the last write", WAIT, || async {
        sqlx::query_scalar::<_, bool>(
            "select confirmed_flush_lsn >= $2::pg_lsn from pg_replication_slots
             where slot_name = $1",
        )
        .bind(&slot)
        .bind(&written)
        .fetch_one(&pool)
        .await
        .unwrap()
    })
    .await;
    assert_eq!(scalar(&pool, "select count(*) from weir.events").await, 601);

    // Everything is older than the retention now. Partitions [1, 100), [100, 200) and
    // [200, 300) are handled and go; [300, 400) holds the poison: it and the later ones stay,
    // and the pass says who holds them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let report = weir::retention::pass(&pool, &config).await.unwrap();
    assert_eq!(report.dropped.len(), 3, "{report:?}");
    assert_eq!(report.held, Some((300, 600)), "{report:?}");
    assert_eq!(report.oldest_position, Some(300));
    let need = weir_consumer::oldest_need(&pool).await.unwrap().expect("a consumer needs events");
    assert_eq!(need.consumer, "item_shares");
    assert_eq!(need.state, weir_consumer::ConsumerState::Halted);
    assert_eq!(need.position, poison);

    // Skipped past the poison, the operator reads on from the log it kept: every row but the
    // poison is derived.
    assert_eq!(weir_consumer::skip(&pool, "item_shares").await.unwrap(), poison);
    eventually("the other 300 rows derived", WAIT, || async {
        scalar(&pool, "select count(*) from item_shares").await == 600
    })
    .await;
    assert_eq!(scalar(&pool, "select count(*) from item_shares where id = 0").await, 0);
    // Now nothing old is needed: retention drops all but the head's partition.
    eventually("the operator's checkpoint at the head", WAIT, || async {
        scalar(&pool, "select min(position) from weir.checkpoints").await == 601
    })
    .await;
    let report = weir::retention::pass(&pool, &config).await.unwrap();
    assert_eq!(report.held, None, "{report:?}");
    assert_eq!(report.dropped.len(), 3, "{report:?}");
    assert_eq!(report.oldest_position, Some(600));
    running.stop().await.unwrap();
}
