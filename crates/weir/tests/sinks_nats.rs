//! The NATS JetStream sink through the facade, against a real PostgreSQL with ingestion and a
//! private `nats-server -js` per test (on a free port, its store in a temporary directory):
//! what the sink promises, read back from JetStream with async-nats, not with weir's code.
//!
//! ```text
//! insert/update posts, sales.orders; insert into weir.stream_events
//!   ─► WAL ─► ingestion ─► weir.events ─► subscription (entity: the two tables and appended
//!      events; 4 emitters) ─► NATS sink ─► JetStream stream ─► read back by sequence
//! ```
//!
//! Each test waits for the subscription's checkpoint to pass the last logged event, then reads
//! the whole stream and checks it against `weir.events`: every selected event at least once,
//! no `Nats-Msg-Id` twice (the duplicate window), per key in log order, on the subject the
//! template gives. Outages are real: the server killed and started again on its port and store,
//! or not started yet.
//!
//! The tests need `nats-server` (CI installs it): it fails saying so when it is missing.

use std::collections::{HashMap, HashSet};
use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use weir::{Config, Weir};
use weir_core::{RetryConfig, Secret};
use weir_sinks::NatsSink;
use weir_streams::subscriptions;
use weir_streams::{Sink, SubscriptionDef, SubscriptionKind, SubscriptionOptions};
use weir_testkit::{NatsServer, TestDatabase, eventually};

/// What every subscription here selects: row changes of two tables (one outside `public`) and
/// appended events.
const SELECTED: [&str; 3] = ["posts", "sales.orders", "weir.stream_events"];

/// A database with weir initialised over `posts` and `sales.orders`.
struct Fixture {
    _db: TestDatabase<'static>,
    pool: PgPool,
    config: Config,
}

async fn fixture(prefix: &str) -> Fixture {
    let db = weir_testkit::shared().database(prefix).unwrap();
    let url = db.url();
    let pool = PgPoolOptions::new().max_connections(16).connect(&url).await.unwrap();
    sqlx::raw_sql(
        "create table posts (id int primary key, title text);
         create schema sales;
         create table sales.orders (id int primary key, total int);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut config = Config::default();
    config.database.url = Some(Secret::new(url.as_str()));
    config.source.slot = db.name().to_string();
    config.source.tables = vec!["posts".into(), "sales.orders".into()];
    weir::setup::init(&pool, &config).await.unwrap();
    Fixture { _db: db, pool, config }
}

fn nats_server() -> NatsServer {
    NatsServer::start().unwrap_or_else(|e| panic!("starting a private nats-server: {e}"))
}

/// Retries every 50 ms to 500 ms, more of them than any outage here lasts (never halts).
fn patient() -> RetryConfig {
    RetryConfig {
        min_restart_time: Duration::from_millis(50),
        backoff_multiplicator: 2.0,
        max_restart_time: Duration::from_millis(500),
        max_retries: 100_000,
    }
}

/// A sink to `stream` on `url`, PubAcks awaited 2 s.
fn sink(url: &str, stream: &str) -> NatsSink {
    NatsSink {
        url: url.into(),
        stream: stream.into(),
        ack_timeout: Duration::from_secs(2),
        ..NatsSink::new()
    }
}

async fn create_subscription(pool: &PgPool, name: &str, sink: NatsSink, pool_size: u32) {
    let mut def = SubscriptionDef::new(name, SubscriptionKind::Entity, json!(SELECTED))
        .pool_size(pool_size)
        .options(SubscriptionOptions { retry: Some(patient()), ..Default::default() });
    def.sink = Sink::Nats(sink);
    subscriptions::create(pool, &def).await.unwrap();
}

async fn start(f: &Fixture) -> weir::Running {
    Weir::builder(f.config.clone()).pool(f.pool.clone()).start().await.unwrap()
}

async fn jetstream(url: &str) -> jetstream::Context {
    let client = tokio::time::timeout(Duration::from_secs(10), async_nats::connect(url))
        .await
        .expect("connecting to the test's nats-server within 10 s")
        .unwrap();
    jetstream::new(client)
}

/// Creates stream `name` storing `subjects`, duplicate window 2 minutes.
async fn create_stream(url: &str, name: &str, subjects: &[&str]) {
    jetstream(url)
        .await
        .create_stream(stream::Config {
            name: name.into(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// One round over keys 1..=keys: round 1 inserts the rows, later rounds update them (one
/// statement per table, so a group holds many keys), and each stream `order-<k>` gets its
/// version `round`. Returns the events it makes.
async fn write_round(pool: &PgPool, keys: i32, round: i32) -> i64 {
    for sql in [
        "insert into posts select k, 'round ' || $2 from generate_series(1, $1) k
         on conflict (id) do update set title = excluded.title",
        "insert into sales.orders select k, $2 from generate_series(1, $1) k
         on conflict (id) do update set total = excluded.total",
        "insert into weir.stream_events (stream, version, id, type, data)
         select 'order-' || k, $2, gen_random_uuid(), 'order.placed', jsonb_build_object('round', $2)
         from generate_series(1, $1) k",
    ] {
        sqlx::query(sql).bind(keys).bind(round).execute(pool).await.unwrap();
    }
    3 * i64::from(keys)
}

/// Writes rounds over `keys` keys, pausing `pause` between them, until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<i64>,
}

impl Writer {
    fn start(pool: PgPool, keys: i32, first_round: i32, pause: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut events = 0;
            let mut round = first_round;
            while !flag.load(AtomicOrdering::SeqCst) {
                events += write_round(&pool, keys, round).await;
                round += 1;
                tokio::time::sleep(pause).await;
            }
            events
        });
        Self { stop, task }
    }

    async fn stop(self) -> i64 {
        self.stop.store(true, AtomicOrdering::SeqCst);
        self.task.await.unwrap()
    }
}

/// Events of the selected entities in the log.
async fn logged(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from weir.events where entity = any($1)")
        .bind(SELECTED)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits until the log has all `events` written and `sub` has moved past them all.
async fn caught_up(pool: &PgPool, sub: &str, events: i64, timeout: Duration) {
    eventually(&format!("{events} events in the log"), Duration::from_secs(30), || async {
        logged(pool).await >= events
    })
    .await;
    let head: i64 =
        sqlx::query_scalar("select max(position) from weir.events").fetch_one(pool).await.unwrap();
    eventually(&format!("`{sub}` delivers up to position {head}"), timeout, || async {
        subscriptions::get(pool, sub).await.unwrap().checkpoint >= head
    })
    .await;
}

/// `sub` has not moved past the first selected event.
async fn assert_nothing_delivered(pool: &PgPool, sub: &str) {
    let first: i64 =
        sqlx::query_scalar("select min(position) from weir.events where entity = any($1)")
            .bind(SELECTED)
            .fetch_one(pool)
            .await
            .unwrap();
    let s = subscriptions::get(pool, sub).await.unwrap();
    assert!(
        s.checkpoint < first,
        "`{sub}` delivered nothing, yet its checkpoint is {}",
        s.checkpoint
    );
}

/// The emitters' last errors.
async fn last_errors(pool: &PgPool, sub: &str) -> Vec<String> {
    let s = subscriptions::get(pool, sub).await.unwrap();
    s.emitters.into_iter().filter_map(|e| e.last_error).collect()
}

/// Waits until an emitter of `sub` failed with an error containing each of `words`; returns it.
async fn wait_for_error(pool: &PgPool, sub: &str, words: &[&str]) -> String {
    let found = std::sync::Mutex::new(None);
    eventually(
        &format!("an emitter of `{sub}` failing with {words:?}"),
        Duration::from_secs(30),
        || async {
            let errors = last_errors(pool, sub).await;
            let hit = errors.into_iter().find(|e| words.iter().all(|w| e.contains(w)));
            let done = hit.is_some();
            *found.lock().unwrap() = hit;
            done
        },
    )
    .await;
    found.into_inner().unwrap().unwrap()
}

/// A message as JetStream stores it.
#[derive(Debug)]
struct Stored {
    sequence: u64,
    subject: String,
    msg_id: String,
    position: i64,
    body: Value,
}

/// Every message of `name`, in stream order (each read within 5 s).
async fn read_stream(url: &str, name: &str) -> Vec<Stored> {
    let js = jetstream(url).await;
    let mut s = js.get_stream(name).await.unwrap();
    let state = s.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let m = tokio::time::timeout(Duration::from_secs(5), s.get_raw_message(seq))
            .await
            .unwrap_or_else(|_| panic!("reading message {seq} of {name} within 5 s"))
            .unwrap();
        let header = |h: &str| m.headers.get(h).map(|v| v.as_str().to_string()).unwrap_or_default();
        out.push(Stored {
            sequence: m.sequence,
            subject: m.subject.to_string(),
            msg_id: header("Nats-Msg-Id"),
            position: header("weir-position").parse().unwrap_or(-1),
            body: serde_json::from_slice(&m.payload).unwrap(),
        });
    }
    out
}

async fn stored_count(url: &str, name: &str) -> u64 {
    match jetstream(url).await.get_stream(name).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Publishes the first `n` selected events of the log as `sub`'s sink would (same
/// `Nats-Msg-Id`, subject and envelope fields), marked `"earlier": true`; returns their
/// positions.
async fn publish_as_an_earlier_attempt(url: &str, pool: &PgPool, sub: &str, n: i64) -> Vec<i64> {
    let rows: Vec<(i64, String, String, Value, Option<Value>)> = sqlx::query_as(
        "select position, entity, kind, key, new_record from weir.events
         where entity = any($1) order by position limit $2",
    )
    .bind(SELECTED)
    .bind(n)
    .fetch_all(pool)
    .await
    .unwrap();
    let js = jetstream(url).await;
    for (position, entity, kind, key, new_record) in &rows {
        let stream = new_record.as_ref().and_then(|r| r["stream"].as_str());
        let id = format!("{sub}:{position}");
        let body = json!({
            "id": id, "subscription": sub, "position": position, "earlier": true,
            "event": {"entity": entity, "kind": kind, "key": key, "new_record": new_record},
        });
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        headers.insert("weir-position", position.to_string().as_str());
        let ack = js
            .publish_with_headers(
                default_subject(entity, kind, stream),
                headers,
                serde_json::to_vec(&body).unwrap().into(),
            )
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), ack.into_future())
            .await
            .expect("a PubAck within 5 s")
            .unwrap();
    }
    rows.into_iter().map(|r| r.0).collect()
}

/// The subject of the default template `weir.{entity}.{kind}`, worked out here by hand.
fn default_subject(entity: &str, kind: &str, _stream: Option<&str>) -> String {
    match (entity, kind) {
        ("posts", k) => format!("weir.posts.{k}"),
        ("sales.orders", k) => format!("weir.sales_orders.{k}"),
        ("weir.stream_events", "append") => "weir.order_placed.append".into(),
        other => panic!("unexpected event {other:?}"),
    }
}

/// The key events are ordered by: the stream of an appended event, else table and row key.
fn key_of(event: &Value) -> String {
    match event["kind"].as_str() {
        Some("append") => event["new_record"]["stream"].as_str().unwrap().to_string(),
        _ => format!("{}:{}", event["entity"].as_str().unwrap(), event["key"]),
    }
}

/// The stream holds `sub`'s delivery of every selected event of the log: each at least once,
/// no id twice, per key in log order, on the subject `subject` gives, with the headers and
/// the envelope.
async fn assert_delivered(
    pool: &PgPool,
    sub: &str,
    stored: &[Stored],
    subject: fn(&str, &str, Option<&str>) -> String,
) {
    let expected: Vec<(i64, String, String, Option<Value>)> = sqlx::query_as(
        "select position, entity, kind, new_record from weir.events
         where entity = any($1) order by position",
    )
    .bind(SELECTED)
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(!expected.is_empty(), "the test wrote events");

    let mut ids: HashMap<&str, u32> = HashMap::new();
    for s in stored {
        *ids.entry(s.msg_id.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "`{sub}`: ids stored more than once: {:?}",
        &twice[..twice.len().min(5)]
    );

    let have: HashSet<i64> = stored.iter().map(|s| s.position).collect();
    let want: HashSet<i64> = expected.iter().map(|e| e.0).collect();
    let mut missing: Vec<_> = want.difference(&have).collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "`{sub}`: {} of {} events missing from the stream, first {:?}",
        missing.len(),
        want.len(),
        &missing[..missing.len().min(10)]
    );
    let extra: Vec<_> = have.difference(&want).collect();
    assert!(extra.is_empty(), "`{sub}`: stored but not selected: {extra:?}");

    let by_position: HashMap<i64, &(i64, String, String, Option<Value>)> =
        expected.iter().map(|e| (e.0, e)).collect();
    let mut last: HashMap<String, (i64, u64)> = HashMap::new();
    for s in stored {
        let (position, entity, kind, new_record) = by_position[&s.position];
        let position = *position;
        assert_eq!(s.msg_id, format!("{sub}:{position}"), "Nats-Msg-Id of {s:?}");
        let stream = new_record.as_ref().and_then(|r| r["stream"].as_str());
        assert_eq!(s.subject, subject(entity, kind, stream), "subject of position {position}");
        assert_eq!(s.body["id"], json!(s.msg_id));
        assert_eq!(s.body["subscription"], json!(sub));
        assert_eq!(s.body["position"], json!(position));
        assert_eq!(s.body["event"]["entity"], json!(entity));
        let key = key_of(&s.body["event"]);
        if let Some((before, seq)) = last.get(&key) {
            assert!(
                *before < position,
                "`{sub}`: {key}: position {position} stored (sequence {}) after position \
                 {before} (sequence {seq})",
                s.sequence
            );
        }
        last.insert(key, (position, s.sequence));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_and_appended_events_are_stored_once_each_in_order_per_key_on_their_subjects() {
    let nats = nats_server();
    let f = fixture("nats_once").await;
    create_stream(&nats.url(), "WEIR", &["weir.>"]).await;
    let weir = start(&f).await;
    // Some events before the subscription exists, some while it runs.
    let mut events = 0;
    for round in 1..=2 {
        events += write_round(&f.pool, 40, round).await;
    }
    // As if an earlier attempt had stored round 1 and crashed before its checkpoint: the same
    // ids are in the stream already, so weir's redelivery of them must be dropped.
    eventually("rounds 1 and 2 in the log", Duration::from_secs(30), || async {
        logged(&f.pool).await >= events
    })
    .await;
    let earlier = publish_as_an_earlier_attempt(&nats.url(), &f.pool, "orders", 120).await;
    create_subscription(&f.pool, "orders", sink(&nats.url(), "WEIR"), 4).await;
    for round in 3..=6 {
        events += write_round(&f.pool, 40, round).await;
    }
    caught_up(&f.pool, "orders", events, Duration::from_secs(60)).await;
    let stored = read_stream(&nats.url(), "WEIR").await;
    assert_eq!(stored.len() as i64, events, "one message per event");
    assert_delivered(&f.pool, "orders", &stored, default_subject).await;
    let replayed: Vec<i64> =
        stored.iter().filter(|s| s.body["earlier"] == json!(true)).map(|s| s.position).collect();
    assert_eq!(replayed, earlier, "the earlier attempt's copies stay; weir's repeats were dropped");

    let sub = subscriptions::get(&f.pool, "orders").await.unwrap();
    assert_eq!(sub.emitters.len(), 4);
    let deliveries = sub.deliveries.expect("a NATS subscription counts its deliveries");
    assert!(deliveries.delivered >= events, "{deliveries:?}");
    // The headers beyond the id.
    let js = jetstream(&nats.url()).await;
    let first = stored.iter().find(|s| s.body.get("earlier").is_none()).unwrap();
    let m = js.get_stream("WEIR").await.unwrap().get_raw_message(first.sequence).await.unwrap();
    assert_eq!(m.headers.get("weir-subscription").unwrap().as_str(), "orders");
    let event = &first.body["event"];
    let ty = match event["kind"].as_str().unwrap() {
        "append" => event["new_record"]["type"].as_str().unwrap().to_string(),
        kind => format!("{}.{kind}", event["entity"].as_str().unwrap()),
    };
    assert_eq!(m.headers.get("weir-type").unwrap().as_str(), ty);
    assert_eq!(first.body["type"], json!(ty));
    weir.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_killed_mid_stream_and_started_again_loses_nothing_and_keeps_order_per_key() {
    let mut nats = nats_server();
    let f = fixture("nats_restart").await;
    create_stream(&nats.url(), "WEIR", &["weir.>"]).await;
    create_subscription(&f.pool, "restart", sink(&nats.url(), "WEIR"), 4).await;
    let weir = start(&f).await;
    let writer = Writer::start(f.pool.clone(), 10, 1, Duration::from_millis(50));
    eventually("the first events reach the stream", Duration::from_secs(30), || async {
        stored_count(&nats.url(), "WEIR").await >= 100
    })
    .await;

    nats.kill();
    let at_kill = logged(&f.pool).await;
    wait_for_error(&f.pool, "restart", &["unreachable"]).await;
    eventually("rows written while NATS is down", Duration::from_secs(30), || async {
        logged(&f.pool).await >= at_kill + 150
    })
    .await;
    nats.start_again().unwrap();

    eventually("events after the restart reach the stream", Duration::from_secs(30), || async {
        stored_count(&nats.url(), "WEIR").await as i64 >= at_kill + 200
    })
    .await;
    let events = writer.stop().await;
    caught_up(&f.pool, "restart", events, Duration::from_secs(60)).await;
    eprintln!("{events} events, {at_kill} of them logged when NATS was killed");
    let stored = read_stream(&nats.url(), "WEIR").await;
    assert_delivered(&f.pool, "restart", &stored, default_subject).await;
    assert_eq!(stored.len() as i64, events, "one message per event");
    weir.stop().await.unwrap();
}

/// `audit.{subscription}.{stream}.{type}`, by hand: the table (sanitised) and the kind for a
/// row change, the stream and the type (sanitised) for an appended event.
fn audit_subject(entity: &str, kind: &str, stream: Option<&str>) -> String {
    match (entity, stream) {
        ("weir.stream_events", Some(s)) => format!("audit.audit.{s}.order_placed"),
        ("posts", None) => format!("audit.audit.posts.{kind}"),
        ("sales.orders", None) => format!("audit.audit.sales_orders.{kind}"),
        other => panic!("unexpected event {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_stream_creates_it_with_the_templates_subjects_and_the_duplicate_window() {
    let nats = nats_server();
    let f = fixture("nats_create").await;
    let sink = NatsSink {
        subject: "audit.{subscription}.{stream}.{type}".into(),
        create_stream: true,
        duplicate_window: Duration::from_secs(90),
        retention: "limits".into(),
        ..sink(&nats.url(), "AUDIT")
    };
    create_subscription(&f.pool, "audit", sink, 2).await;
    let weir = start(&f).await;
    let mut events = 0;
    for round in 1..=3 {
        events += write_round(&f.pool, 10, round).await;
    }
    caught_up(&f.pool, "audit", events, Duration::from_secs(60)).await;

    let js = jetstream(&nats.url()).await;
    let mut created = js.get_stream("AUDIT").await.unwrap();
    let config = created.info().await.unwrap().config.clone();
    assert_eq!(config.subjects, vec!["audit.*.*.*".to_string()]);
    assert_eq!(config.duplicate_window, Duration::from_secs(90));
    assert_eq!(config.retention, stream::RetentionPolicy::Limits);
    let stored = read_stream(&nats.url(), "AUDIT").await;
    assert_delivered(&f.pool, "audit", &stored, audit_subject).await;
    weir.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_stream_the_error_says_how_to_create_it_and_once_it_exists_nothing_is_lost() {
    let nats = nats_server();
    let f = fixture("nats_missing").await;
    create_subscription(&f.pool, "later", sink(&nats.url(), "LATER"), 4).await;
    let weir = start(&f).await;
    let mut events = 0;
    for round in 1..=3 {
        events += write_round(&f.pool, 10, round).await;
    }
    let error = wait_for_error(
        &f.pool,
        "later",
        &[
            "LATER does not exist",
            "nats stream add LATER --subjects 'weir.*.*'",
            "create_stream = true",
        ],
    )
    .await;
    eprintln!("the emitter's error: {error}");
    assert_nothing_delivered(&f.pool, "later").await;

    create_stream(&nats.url(), "LATER", &["weir.>"]).await;
    events += write_round(&f.pool, 10, 4).await;
    caught_up(&f.pool, "later", events, Duration::from_secs(60)).await;
    let stored = read_stream(&nats.url(), "LATER").await;
    assert_delivered(&f.pool, "later", &stored, default_subject).await;
    assert!(last_errors(&f.pool, "later").await.is_empty(), "the errors cleared once delivered");
    weir.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_subjects_miss_ours_is_named_with_both_until_it_covers_them() {
    let nats = nats_server();
    let f = fixture("nats_narrow").await;
    create_stream(&nats.url(), "NARROW", &["other.>"]).await;
    create_subscription(&f.pool, "narrow", sink(&nats.url(), "NARROW"), 2).await;
    let weir = start(&f).await;
    let mut events = write_round(&f.pool, 10, 1).await;
    let error = wait_for_error(
        &f.pool,
        "narrow",
        &[
            "NARROW does not store subject weir.",
            "[other.>]",
            "[weir.*.*]",
            "nats stream edit NARROW",
        ],
    )
    .await;
    eprintln!("the emitter's error: {error}");
    assert_eq!(stored_count(&nats.url(), "NARROW").await, 0);

    // Covering them, the stream gets everything.
    let js = jetstream(&nats.url()).await;
    let mut config = js.get_stream("NARROW").await.unwrap().cached_info().config.clone();
    config.subjects.push("weir.>".into());
    js.update_stream(&config).await.unwrap();
    events += write_round(&f.pool, 10, 2).await;
    caught_up(&f.pool, "narrow", events, Duration::from_secs(60)).await;
    let stored = read_stream(&nats.url(), "NARROW").await;
    assert_delivered(&f.pool, "narrow", &stored, default_subject).await;
    weir.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nats_down_at_start_up_weir_starts_says_unreachable_and_delivers_once_it_is_up() {
    let mut nats = NatsServer::reserve().unwrap_or_else(|e| panic!("nats-server: {e}"));
    let f = fixture("nats_down").await;
    let sink = NatsSink { create_stream: true, ..sink(&nats.url(), "WEIR") };
    create_subscription(&f.pool, "down", sink, 4).await;
    let weir = start(&f).await;
    let mut events = 0;
    for round in 1..=3 {
        events += write_round(&f.pool, 10, round).await;
    }
    let url = nats.url();
    let error = wait_for_error(&f.pool, "down", &["unreachable", &url]).await;
    eprintln!("the emitter's error: {error}");
    assert_nothing_delivered(&f.pool, "down").await;

    nats.start_again().unwrap();
    events += write_round(&f.pool, 10, 4).await;
    caught_up(&f.pool, "down", events, Duration::from_secs(60)).await;
    let stored = read_stream(&nats.url(), "WEIR").await;
    assert_delivered(&f.pool, "down", &stored, default_subject).await;
    weir.stop().await.unwrap();
}
