//! A subscriber process SIGKILLed mid-stream, several times, then restarted: every appended
//! event is still delivered exactly once, in order per stream.
//!
//! ```text
//! this test: ingestion (Weir in-process) + an appender (rounds over 100 streams)
//! child:     weir-bench subscriber (Weir without ingestion, one subscription, 4 emitters,
//!            deliveries recorded in the checkpoint's transaction)
//!            start ─► deliveries grow ─► SIGKILL ─► start again (its emitters wait for the
//!            dead process's leases) ─► … ─► appends stop ─► caught up ─► check
//! ```

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use weir::{Config, Weir};
use weir_core::Secret;
use weir_testkit::eventually;

/// The subscriber process; killed when dropped (a failing test leaves nothing running).
struct Subscriber(Child);

impl Subscriber {
    fn start(url: &str) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_weir-bench"))
            .args(["subscriber", "--url", url, "--name", "crashy", "--pool-size", "4"])
            .args(["--selector", "x-*"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the weir-bench binary starts");
        Self(child)
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap it.
    fn kill(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string())).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_killed_mid_stream_again_and_again_delivers_every_event_exactly_once_in_order()
{
    let db = weir_testkit::shared().database("subscriber").unwrap();
    let url = db.url();
    let pool = PgPoolOptions::new().max_connections(8).connect(&url).await.unwrap();
    sqlx::raw_sql(
        "create table deliveries (position bigint primary key, stream text not null,
                                  version bigint not null, seq bigserial);
         create table duplicates (position bigint not null);
         create table unrelated (id int primary key)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut config = Config::default();
    config.database.url = Some(Secret::new(url.as_str()));
    config.source.slot = db.name().to_string();
    config.source.tables = vec!["unrelated".into()];
    weir::setup::init(&pool, &config).await.unwrap();
    let ingestion = Weir::builder(config).pool(pool.clone()).start().await.unwrap();

    // Appends go on through every kill: rounds of one version over 100 streams, 10 a time.
    let stop = Arc::new(AtomicBool::new(false));
    let appender = tokio::spawn({
        let (pool, stop) = (pool.clone(), stop.clone());
        async move {
            let streams: Vec<String> = (0..100).map(|i| format!("x-{i}")).collect();
            let mut version = 0i64;
            while !stop.load(Ordering::SeqCst) {
                version += 1;
                for chunk in streams.chunks(10) {
                    sqlx::query(
                        "insert into weir.stream_events (stream, version, id, type, data)
                         select s, $2, gen_random_uuid(), 't', '{}' from unnest($1::text[]) s",
                    )
                    .bind(chunk)
                    .bind(version)
                    .execute(&pool)
                    .await
                    .unwrap();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    });

    for kill in 1..=3 {
        let before = count(&pool, "select count(*) from deliveries").await;
        let child = Subscriber::start(&url);
        eventually(&format!("deliveries before kill {kill}"), Duration::from_secs(25), || async {
            count(&pool, "select count(*) from deliveries").await > before + 300
        })
        .await;
        child.kill();
    }
    stop.store(true, Ordering::SeqCst);
    appender.await.unwrap();

    let child = Subscriber::start(&url);
    let stored = count(&pool, "select count(*) from weir.stream_events").await;
    eventually("every event delivered", Duration::from_secs(40), || async {
        count(&pool, "select count(*) from deliveries").await >= stored
    })
    .await;
    // Caught up: every emitter past the last event (so nothing more is on its way).
    let head = count(&pool, "select max(position) from weir.events").await;
    eventually("caught up", Duration::from_secs(20), || async {
        count(&pool, "select min(position) from weir.checkpoints where consumer = 'crashy'").await
            >= head
    })
    .await;
    child.kill();
    ingestion.stop().await.unwrap();

    assert_eq!(count(&pool, "select count(*) from duplicates").await, 0, "no event twice");
    assert_eq!(count(&pool, "select count(*) from deliveries").await, stored, "every event");
    // In order per stream: in delivery order, each stream's versions are 1, 2, 3, …
    let out_of_order = count(
        &pool,
        "select count(*) from (
             select version, row_number() over (partition by stream order by seq) as n
             from deliveries) d
         where version <> n",
    )
    .await;
    assert_eq!(out_of_order, 0, "each stream in order");
    let parked = count(&pool, "select count(*) from weir.parked").await;
    assert_eq!(parked, 0);
}
