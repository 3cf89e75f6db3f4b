//! The real `weir` binary delivering a NATS sink, SIGKILLed mid-stream: after a restart every
//! event is in the JetStream stream exactly once (the redelivered groups carry the same
//! `Nats-Msg-Id`, which JetStream drops) and each row's changes in log order.
//!
//! ```text
//! writer: inserts and updates of table t ─► weir run (ingestion + the subscription's 4
//!   emitters ─► nats-server -js, stream WEIR) ─ SIGKILL while publishing, three times ─►
//!   weir run again ─► caught up ─► the stream read back by sequence, checked against weir.events
//! ```
//!
//! Needs `nats-server` (CI installs it): it fails saying so when it is missing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use serde_json::{Value, json};
use sqlx::PgPool;
use weir_core::RetryConfig;
use weir_sinks::NatsSink;
use weir_streams::{Sink, SubscriptionDef, SubscriptionKind, SubscriptionOptions, subscriptions};
use weir_testkit::{NatsServer, eventually};

mod support;
use support::*;

async fn jetstream(url: &str) -> jetstream::Context {
    let client = tokio::time::timeout(Duration::from_secs(10), async_nats::connect(url))
        .await
        .expect("connecting to the test's nats-server within 10 s")
        .unwrap();
    jetstream::new(client)
}

async fn stored_count(js: &jetstream::Context) -> u64 {
    let mut s = js.get_stream("WEIR").await.unwrap();
    s.info().await.unwrap().state.messages
}

/// `(sequence, Nats-Msg-Id, subject, body)` of every message of stream WEIR, in stream order.
async fn read_stream(js: &jetstream::Context) -> Vec<(u64, String, String, Value)> {
    let mut s = js.get_stream("WEIR").await.unwrap();
    let state = s.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        let m = tokio::time::timeout(Duration::from_secs(5), s.get_raw_message(seq))
            .await
            .unwrap_or_else(|_| panic!("reading message {seq} within 5 s"))
            .unwrap();
        let id = m.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_string()).unwrap_or_default();
        out.push((
            m.sequence,
            id,
            m.subject.to_string(),
            serde_json::from_slice(&m.payload).unwrap(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_weir_run_mid_stream_leaves_every_event_in_the_stream_exactly_once_in_order() {
    let nats =
        NatsServer::start().unwrap_or_else(|e| panic!("starting a private nats-server: {e}"));
    let db = weir_testkit::shared().database("nats_sigkill").unwrap();
    db.psql("create table t (id int primary key, v text)").unwrap();
    let out = weir(&db, &["init"]).output().unwrap();
    assert!(out.status.success(), "weir init failed: {}", String::from_utf8_lossy(&out.stderr));
    let pool = PgPool::connect(&db.url()).await.unwrap();
    weir_streams::migrate(&pool).await.unwrap();

    let js = jetstream(&nats.url()).await;
    js.create_stream(stream::Config {
        name: "WEIR".into(),
        subjects: vec!["weir.>".into()],
        duplicate_window: Duration::from_secs(300),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut def = SubscriptionDef::new("crash", SubscriptionKind::Entity, json!("t"))
        .pool_size(4)
        .options(SubscriptionOptions {
            retry: Some(RetryConfig {
                min_restart_time: Duration::from_millis(50),
                backoff_multiplicator: 2.0,
                max_restart_time: Duration::from_millis(500),
                max_retries: 100_000,
            }),
            ..Default::default()
        });
    def.sink = Sink::Nats(NatsSink {
        url: nats.url(),
        ack_timeout: Duration::from_secs(2),
        ..NatsSink::new()
    });
    subscriptions::create(&pool, &def).await.unwrap();

    // Rows 1..=20 inserted, then updated again and again (their order matters), with a new row
    // each time.
    sqlx::query("insert into t select k, '0' from generate_series(1, 20) k")
        .execute(&pool)
        .await
        .unwrap();
    let writer = {
        let pool = pool.clone();
        tokio::spawn(async move {
            for i in 1..=120 {
                let mut tx = pool.begin().await.unwrap();
                sqlx::query("update t set v = $1::text where id <= 20")
                    .bind(i)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                sqlx::query("insert into t values ($1, 'new')")
                    .bind(1000 + i)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };

    // Killed while it publishes: each time once the stream has grown since it started.
    for round in 0..3 {
        let before = stored_count(&js).await;
        let p = spawn(weir(&db, &["run"]));
        eventually(
            &format!("round {round}: the stream grows by 100 from {before}"),
            Duration::from_secs(60),
            || async { stored_count(&js).await >= before + 100 },
        )
        .await;
        sigkill(&p);
        drop(p);
    }
    writer.await.unwrap();

    let mut run = spawn(weir(&db, &["run"]));
    let events: i64 = 20 + 120 * 21;
    eventually(&format!("{events} events in the log"), Duration::from_secs(60), || async {
        sqlx::query_scalar::<_, i64>("select count(*) from weir.events where entity = 't'")
            .fetch_one(&pool)
            .await
            .unwrap()
            >= events
    })
    .await;
    let head: i64 =
        sqlx::query_scalar("select max(position) from weir.events").fetch_one(&pool).await.unwrap();
    eventually(&format!("`crash` delivers up to {head}"), Duration::from_secs(60), || async {
        subscriptions::get(&pool, "crash").await.unwrap().checkpoint >= head
    })
    .await;
    sigterm(&mut run);

    let expected: Vec<(i64, String, Value)> = sqlx::query_as(
        "select position, kind, key from weir.events where entity = 't' order by position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(expected.len() as i64, events);
    let stored = read_stream(&js).await;
    let mut ids: HashMap<&str, u32> = HashMap::new();
    for (_, id, _, _) in &stored {
        *ids.entry(id.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored more than once: {:?}", &twice[..twice.len().min(5)]);
    let have: HashSet<String> = ids.keys().map(|s| s.to_string()).collect();
    let missing: Vec<i64> =
        expected.iter().map(|e| e.0).filter(|p| !have.contains(&format!("crash:{p}"))).collect();
    assert!(
        missing.is_empty(),
        "{} of {} events missing from the stream, first {:?}",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(stored.len(), expected.len(), "nothing but the subscription's events");

    let kinds: HashMap<i64, &str> = expected.iter().map(|e| (e.0, e.1.as_str())).collect();
    let mut last: HashMap<String, i64> = HashMap::new();
    for (seq, id, subject, body) in &stored {
        let position = body["position"].as_i64().unwrap();
        assert_eq!(id, &format!("crash:{position}"));
        assert_eq!(subject, &format!("weir.t.{}", kinds[&position]));
        let key = body["event"]["key"].to_string();
        if let Some(before) = last.insert(key.clone(), position) {
            assert!(
                before < position,
                "row {key}: position {position} (sequence {seq}) after {before}"
            );
        }
    }
}
