//! Subscriptions delivered to Rust handlers through the facade, against a real PostgreSQL with
//! ingestion: what a subscription promises, each test able to fail for real.
//!
//! ```text
//! insert into weir.stream_events ─► WAL ─► ingestion ─► weir.events (kind append)
//!     ─► subscription emitters (lanes) ─► Record: insert into seen … in the checkpoint's tx
//!                                        Memory: push into a Vec outside any transaction
//! ```
//!
//! The transactional handler records each delivery in `seen` with the unique key
//! `(sub, position)`; a second delivery of a committed event finds the row (`on conflict do
//! nothing` affects nothing) and is counted in `dups`. `seen.seq` is taken at delivery, so
//! ordering by it is the order of the deliveries, not of the log.
//!
//! Until `weir.append` lands, events are appended with a plain insert into
//! `weir.stream_events` (the same rows it writes).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use weir::{Config, Event, Kind, Weir};
use weir_consumer::{ConsumerSpec, Operator, OperatorError, Selector};
use weir_core::{OnExhausted, Ordering, RetryConfig, Secret};
use weir_streams::subscriptions::{self, SubscriptionUpdate};
use weir_streams::{SubscriptionDef, SubscriptionKind, SubscriptionOptions};
use weir_testkit::{TestDatabase, eventually};

/// A database with weir initialised over `posts` and `comments`, and the `seen` table.
struct Fixture {
    _db: TestDatabase<'static>,
    url: String,
    pool: PgPool,
    config: Config,
}

async fn fixture(prefix: &str) -> Fixture {
    let db = weir_testkit::shared().database(prefix).unwrap();
    let url = db.url();
    let pool = connect(&url).await;
    sqlx::raw_sql(
        "create table posts (id int primary key, title text);
         create table comments (id int primary key, body text);
         create table seen (
             sub      text   not null,
             position bigint not null,
             entity   text   not null,
             kind     text   not null,
             stream   text,
             version  bigint,
             who      text   not null,
             seq      bigserial,
             primary key (sub, position))",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut config = Config::default();
    config.database.url = Some(Secret::new(url.as_str()));
    config.source.slot = url.rsplit('/').next().unwrap().to_string();
    config.source.tables = vec!["posts".into(), "comments".into()];
    weir::setup::init(&pool, &config).await.unwrap();
    Fixture { _db: db, url, pool, config }
}

async fn connect(url: &str) -> PgPool {
    PgPoolOptions::new().max_connections(16).connect(url).await.unwrap()
}

/// Fast retries: a failing event is tried again after 5 ms, up to 10 times.
fn fast_retry() -> RetryConfig {
    RetryConfig {
        min_restart_time: Duration::from_millis(5),
        backoff_multiplicator: 1.0,
        max_restart_time: Duration::from_millis(5),
        max_retries: 10,
    }
}

fn rust_sub(
    name: &str,
    kind: SubscriptionKind,
    selector: Value,
    pool_size: u32,
) -> SubscriptionDef {
    SubscriptionDef::new(name, kind, selector)
        .pool_size(pool_size)
        .options(SubscriptionOptions { retry: Some(fast_retry()), ..Default::default() })
}

/// How a handler fails on purpose.
#[derive(Clone)]
enum Fault {
    None,
    /// About one event in ten fails its first one or two attempts: half of them with
    /// `OperatorError::retry`, half with a failing statement (which aborts the transaction).
    Random(Arc<Mutex<HashMap<i64, u32>>>),
    /// Every event of `stream` fails while `broken` is set.
    Broken {
        stream: &'static str,
        broken: Arc<AtomicBool>,
    },
}

impl Fault {
    fn random() -> Self {
        Fault::Random(Arc::default())
    }

    /// The failure for this attempt, if any.
    async fn check(&self, tx: &mut sqlx::PgConnection, event: &Event) -> Result<(), OperatorError> {
        match self {
            Fault::None => Ok(()),
            Fault::Random(attempts) => {
                let h = (event.position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                if !h.is_multiple_of(10) {
                    return Ok(());
                }
                let attempt = {
                    let mut a = attempts.lock().unwrap();
                    let n = a.entry(event.position).or_insert(0);
                    *n += 1;
                    *n
                };
                let failures = 1 + (h / 10 % 2) as u32;
                if attempt > failures {
                    return Ok(());
                }
                if (h / 20).is_multiple_of(2) {
                    Err(OperatorError::retry(format!("injected failure {attempt}")))
                } else {
                    sqlx::query("select 1 / 0").execute(tx).await?;
                    unreachable!("division by zero fails");
                }
            }
            Fault::Broken { stream, broken } => {
                if broken.load(AtomicOrdering::SeqCst)
                    && appended(event).0.as_deref() == Some(*stream)
                {
                    Err(OperatorError::retry(format!("{stream} is broken")))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// The stream and version of an appended event.
fn appended(event: &Event) -> (Option<String>, Option<i64>) {
    match (&event.kind, &event.new_record) {
        (Kind::Append, Some(row)) => {
            (row["stream"].as_str().map(str::to_string), row["version"].as_i64())
        }
        _ => (None, None),
    }
}

/// Records each delivery in `seen`, in the delivery's transaction.
#[derive(Clone)]
struct Record {
    sub: &'static str,
    who: &'static str,
    dups: Arc<AtomicU64>,
    fault: Fault,
}

impl Record {
    fn new(sub: &'static str) -> Self {
        Self { sub, who: "a", dups: Arc::default(), fault: Fault::None }
    }

    fn who(self, who: &'static str) -> Self {
        Self { who, ..self }
    }

    fn fault(self, fault: Fault) -> Self {
        Self { fault, ..self }
    }

    async fn record(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &Event,
    ) -> Result<(), OperatorError> {
        self.fault.check(tx, event).await?;
        let (stream, version) = appended(event);
        let inserted = sqlx::query(
            "insert into seen (sub, position, entity, kind, stream, version, who)
             values ($1, $2, $3, $4, $5, $6, $7)
             on conflict do nothing",
        )
        .bind(self.sub)
        .bind(event.position)
        .bind(&event.entity)
        .bind(event.kind.as_str())
        .bind(stream)
        .bind(version)
        .bind(self.who)
        .execute(tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            self.dups.fetch_add(1, AtomicOrdering::SeqCst);
        }
        Ok(())
    }
}

impl weir_streams::Handler for Record {
    async fn handle(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &Event,
    ) -> Result<(), OperatorError> {
        self.record(tx, event).await
    }
}

/// Records each delivery in memory, outside the transaction (at least once).
#[derive(Clone)]
struct Memory {
    seen: Arc<Mutex<Vec<(String, i64)>>>,
    fault: Fault,
}

impl weir_streams::Handler for Memory {
    async fn handle(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &Event,
    ) -> Result<(), OperatorError> {
        self.fault.check(tx, event).await?;
        if let (Some(s), Some(v)) = appended(event) {
            self.seen.lock().unwrap().push((s, v));
        }
        Ok(())
    }
}

/// Appends version `version` to each stream, in one transaction.
async fn append_round(pool: &PgPool, streams: &[String], version: i64) {
    sqlx::query(
        "insert into weir.stream_events (stream, version, id, type, data)
         select s, $2, gen_random_uuid(), 'order.placed', jsonb_build_object('v', $2)
         from unnest($1::text[]) s",
    )
    .bind(streams)
    .bind(version)
    .execute(pool)
    .await
    .unwrap();
}

/// Appends one event to a stream at its next version.
async fn append(pool: &PgPool, stream: &str, ty: &str, data: Value, tags: &[&str]) {
    sqlx::query(
        "insert into weir.stream_events (stream, version, id, type, data, tags)
         select $1, coalesce(max(version), 0) + 1, gen_random_uuid(), $2, $3, $4
         from weir.stream_events where stream = $1",
    )
    .bind(stream)
    .bind(ty)
    .bind(data)
    .bind(tags)
    .execute(pool)
    .await
    .unwrap();
}

/// Appends rounds over `streams` in transactions of `batch` streams, pausing `pause` between
/// transactions, until stopped; each stream's versions stay gap-free.
struct Appender {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Appender {
    fn start(pool: PgPool, streams: Vec<String>, batch: usize, pause: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut appended = 0u64;
            let mut version: i64 = sqlx::query_scalar(
                "select coalesce(max(version), 0) from weir.stream_events where stream = any($1)",
            )
            .bind(&streams)
            .fetch_one(&pool)
            .await
            .unwrap();
            'rounds: loop {
                version += 1;
                for chunk in streams.chunks(batch) {
                    if flag.load(AtomicOrdering::SeqCst) {
                        break 'rounds;
                    }
                    append_round(&pool, chunk, version).await;
                    appended += chunk.len() as u64;
                    tokio::time::sleep(pause).await;
                }
            }
            appended
        });
        Self { stop, task }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, AtomicOrdering::SeqCst);
        self.task.await.unwrap()
    }
}

fn streams(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// The log position of the last appended event (what every subscription must reach).
async fn last_appended(pool: &PgPool) -> i64 {
    eventually("the last append reaches the log", Duration::from_secs(30), || async {
        let logged: i64 = sqlx::query_scalar(
            "select count(*) from weir.events where entity = 'weir.stream_events'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        let stored: i64 = sqlx::query_scalar("select count(*) from weir.stream_events")
            .fetch_one(pool)
            .await
            .unwrap();
        logged == stored
    })
    .await;
    sqlx::query_scalar("select coalesce(max(position), 0) from weir.events")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits until subscription `sub` has moved past every logged event (then nothing more can
/// arrive for what was appended so far).
async fn caught_up(pool: &PgPool, sub: &str, timeout: Duration) {
    let head = last_appended(pool).await;
    eventually(&format!("`{sub}` reaches position {head}"), timeout, || async {
        let s = subscriptions::get(pool, sub).await.unwrap();
        s.pending_pool_size.is_none() && s.checkpoint >= head
    })
    .await;
}

/// Per stream, the versions `sub` delivered, in delivery order.
async fn delivered(pool: &PgPool, sub: &str) -> BTreeMap<String, Vec<i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "select stream, version from seen where sub = $1 and stream is not null order by seq",
    )
    .bind(sub)
    .fetch_all(pool)
    .await
    .unwrap();
    let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (s, v) in rows {
        out.entry(s).or_default().push(v);
    }
    out
}

/// Per stream, the last version stored (of the streams `filter` selects: a `like` pattern).
async fn stored(pool: &PgPool, filter: &str) -> BTreeMap<String, i64> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "select stream, max(version) from weir.stream_events where stream like $1 group by stream",
    )
    .bind(filter)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().collect()
}

/// Every stream of `expected` delivered exactly 1..=last, in that order, and nothing else; no
/// second delivery of a committed event.
fn assert_exactly_once_in_order(
    sub: &str,
    got: &BTreeMap<String, Vec<i64>>,
    expected: &BTreeMap<String, i64>,
    dups: &AtomicU64,
) {
    assert_eq!(dups.load(AtomicOrdering::SeqCst), 0, "`{sub}`: a committed event came again");
    let mut bad = Vec::new();
    for (stream, last) in expected {
        let want: Vec<i64> = (1..=*last).collect();
        let have = got.get(stream).cloned().unwrap_or_default();
        if have != want {
            bad.push(format!("{stream}: {have:?} instead of 1..={last}"));
        }
    }
    for stream in got.keys() {
        if !expected.contains_key(stream) {
            bad.push(format!("{stream}: not selected, but delivered"));
        }
    }
    assert!(
        bad.is_empty(),
        "`{sub}`: {} streams wrong, first: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_subscription_delivers_each_stream_in_order() {
    let f = fixture("sub_rust").await;
    let record = Record::new("orders");
    let def =
        SubscriptionDef::new("orders", SubscriptionKind::Stream, json!("order-*")).pool_size(4);
    let weir = Weir::builder(f.config.clone())
        .pool(f.pool.clone())
        .subscription(def, record.clone())
        .start()
        .await
        .unwrap();
    let orders = streams("order-", 20);
    for round in 1..=5i64 {
        append_round(&f.pool, &orders, round).await;
        append_round(&f.pool, &["other".to_string()], round).await;
    }
    caught_up(&f.pool, "orders", Duration::from_secs(30)).await;
    let got = delivered(&f.pool, "orders").await;
    assert_exactly_once_in_order("orders", &got, &stored(&f.pool, "order-%").await, &record.dups);
    let sub = subscriptions::get(&f.pool, "orders").await.unwrap();
    assert_eq!(sub.pool_size, 4);
    assert_eq!(sub.emitters.len(), 4);
    weir.stop().await.unwrap();
}

/// 2,000 streams × 5 versions through 8 emitters, with about one event in ten failing once or
/// twice: the transactional handler has each exactly once in order; a handler that records
/// outside the transaction sees each at least once, never a version before the one before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_random_failures_8_emitters_deliver_2000_streams_in_order_exactly_once_in_the_transaction_and_at_least_once_outside()
 {
    let f = fixture("sub_many").await;
    let record = Record::new("tx").fault(Fault::random());
    let memory = Memory { seen: Arc::default(), fault: Fault::random() };
    let all = streams("s-", 2000);
    // Half the events before the subscriptions exist, half while they run.
    for version in 1..=2 {
        for chunk in all.chunks(500) {
            append_round(&f.pool, chunk, version).await;
        }
    }
    let weir = Weir::builder(f.config.clone())
        .pool(f.pool.clone())
        .subscription(rust_sub("tx", SubscriptionKind::Stream, json!("s-*"), 8), record.clone())
        .subscription(rust_sub("mem", SubscriptionKind::Stream, json!("s-*"), 8), memory.clone())
        .start()
        .await
        .unwrap();
    for version in 3..=5 {
        for chunk in all.chunks(500) {
            append_round(&f.pool, chunk, version).await;
        }
    }
    caught_up(&f.pool, "tx", Duration::from_secs(50)).await;
    caught_up(&f.pool, "mem", Duration::from_secs(20)).await;
    weir.stop().await.unwrap();

    let expected = stored(&f.pool, "s-%").await;
    assert_eq!(expected.values().sum::<i64>(), 10_000);
    let failures: i64 = sqlx::query_scalar("select count(*) from weir.consumer_failures")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    assert!(failures > 200, "the handlers failed for real ({failures} failures recorded)");
    assert_exactly_once_in_order("tx", &delivered(&f.pool, "tx").await, &expected, &record.dups);
    let sub = subscriptions::get(&f.pool, "tx").await.unwrap();
    assert_eq!(sub.emitters.len(), 8);
    assert_eq!(sub.parked, 0);

    // At least once: per stream, every version seen, and none before its predecessor.
    let mut per_stream: HashMap<String, i64> = HashMap::new();
    let mut repeats = 0;
    for (s, v) in memory.seen.lock().unwrap().iter() {
        let max = per_stream.entry(s.clone()).or_insert(0);
        assert!(*v <= *max + 1, "`mem`: {s} version {v} delivered before version {}", *max + 1);
        if *v <= *max {
            repeats += 1;
        }
        *max = (*max).max(*v);
    }
    assert_eq!(per_stream.len(), 2000, "`mem`: every stream");
    assert!(per_stream.values().all(|v| *v == 5), "`mem`: every version of every stream");
    // Repeats happen when a failure rolls a group back: its earlier events come again.
    eprintln!("`mem` saw {repeats} repeated deliveries");
}

/// A subscription created over a backlog catches up while appends go on, and carries on live:
/// nothing missed and nothing repeated where catching up turns into following.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catching_up_turns_into_live_delivery_without_a_gap_or_a_duplicate() {
    let f = fixture("sub_catchup").await;
    let all = streams("c-", 300);
    for version in 1..=10 {
        append_round(&f.pool, &all, version).await;
    }
    // Appends go on before, while and after the subscription catches up.
    let appender = Appender::start(f.pool.clone(), all.clone(), 30, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let record = Record::new("catchup");
    let weir = Weir::builder(f.config.clone())
        .pool(f.pool.clone())
        .subscription(
            rust_sub("catchup", SubscriptionKind::Stream, json!("c-*"), 4),
            record.clone(),
        )
        .start()
        .await
        .unwrap();
    // Caught up once, with appends still going.
    let started = Instant::now();
    eventually("the backlog delivered", Duration::from_secs(40), || async {
        let n: i64 = sqlx::query_scalar("select count(*) from seen where sub = 'catchup'")
            .fetch_one(&f.pool)
            .await
            .unwrap();
        n >= 3000
    })
    .await;
    eprintln!("backlog of 3,000+ delivered in {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await; // live for a while
    let appended = appender.stop().await;
    assert!(appended > 300, "appends went on meanwhile ({appended})");
    caught_up(&f.pool, "catchup", Duration::from_secs(30)).await;
    weir.stop().await.unwrap();
    let expected = stored(&f.pool, "c-%").await;
    assert_exactly_once_in_order(
        "catchup",
        &delivered(&f.pool, "catchup").await,
        &expected,
        &record.dups,
    );
}

/// pool_size 2 → 8 → 2 while appends go on: the emitters really change count, and every
/// stream stays exactly once and in order across both re-splits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resizing_the_pool_while_appending_loses_nothing_repeats_nothing_and_keeps_order() {
    let f = fixture("sub_resplit").await;
    let all = streams("r-", 200);
    let record = Record::new("resize");
    let weir = Weir::builder(f.config.clone())
        .pool(f.pool.clone())
        .subscription(rust_sub("resize", SubscriptionKind::Stream, json!("r-*"), 2), record.clone())
        .start()
        .await
        .unwrap();
    let appender = Appender::start(f.pool.clone(), all.clone(), 20, Duration::from_millis(5));
    for pool_size in [8u32, 2, 8, 2] {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let update = SubscriptionUpdate { pool_size: Some(pool_size), ..Default::default() };
        subscriptions::update(&f.pool, "resize", update).await.unwrap();
        eventually(&format!("{pool_size} emitters"), Duration::from_secs(20), || async {
            let s = subscriptions::get(&f.pool, "resize").await.unwrap();
            s.pending_pool_size.is_none()
                && s.pool_size == pool_size as i32
                && s.emitters.len() == pool_size as usize
                && s.emitters.iter().all(|e| e.owner.is_some())
        })
        .await;
    }
    let appended = appender.stop().await;
    assert!(appended > 1000, "appends went on during the re-splits ({appended})");
    caught_up(&f.pool, "resize", Duration::from_secs(30)).await;
    weir.stop().await.unwrap();
    let expected = stored(&f.pool, "r-%").await;
    assert_exactly_once_in_order(
        "resize",
        &delivered(&f.pool, "resize").await,
        &expected,
        &record.dups,
    );
}

/// One stream fails for good and is parked (`on_exhausted = park`): the other streams keep
/// flowing, the parked stream's later events wait behind it, and once the handler is fixed
/// `retry_parked` delivers them in order, followed by what comes next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_stream_waits_while_the_others_flow_and_is_delivered_in_order_after_retry() {
    let f = fixture("sub_park").await;
    let broken = Arc::new(AtomicBool::new(true));
    let record =
        Record::new("park").fault(Fault::Broken { stream: "p-bad", broken: broken.clone() });
    let mut def = rust_sub("park", SubscriptionKind::Stream, json!("p-*"), 4);
    def.options.on_exhausted = Some(OnExhausted::Park);
    def.options.retry = Some(RetryConfig { max_retries: 2, ..fast_retry() });
    let weir = Weir::builder(f.config.clone())
        .pool(f.pool.clone())
        .subscription(def, record.clone())
        .start()
        .await
        .unwrap();
    let good = streams("p-", 10);
    let mut with_bad = good.clone();
    with_bad.push("p-bad".into());
    for version in 1..=3 {
        append_round(&f.pool, &with_bad, version).await;
    }
    caught_up(&f.pool, "park", Duration::from_secs(30)).await;
    let parked = weir_consumer::status::parked(&f.pool, Some("park")).await.unwrap();
    assert_eq!(parked.len(), 3, "p-bad's first event parked and its two later ones behind it");
    assert!(parked.iter().all(|p| p.partition_key == "p-bad"));
    // The others keep flowing while p-bad is parked.
    for version in 4..=5 {
        append_round(&f.pool, &with_bad, version).await;
    }
    caught_up(&f.pool, "park", Duration::from_secs(30)).await;
    let got = delivered(&f.pool, "park").await;
    assert!(!got.contains_key("p-bad"), "nothing of p-bad delivered: {:?}", got.get("p-bad"));
    assert_exactly_once_in_order("park", &got, &stored(&f.pool, "p-_").await, &record.dups);
    assert_eq!(weir_consumer::status::parked(&f.pool, Some("park")).await.unwrap().len(), 5);

    broken.store(false, AtomicOrdering::SeqCst);
    let asked = weir_consumer::status::retry_parked(&f.pool, "park", None).await.unwrap();
    assert_eq!(asked, 5);
    append_round(&f.pool, &with_bad, 6).await;
    eventually("p-bad delivered", Duration::from_secs(30), || async {
        delivered(&f.pool, "park").await.get("p-bad").is_some_and(|v| v.len() >= 6)
    })
    .await;
    caught_up(&f.pool, "park", Duration::from_secs(30)).await;
    weir.stop().await.unwrap();
    assert_exactly_once_in_order(
        "park",
        &delivered(&f.pool, "park").await,
        &stored(&f.pool, "p-%").await,
        &record.dups,
    );
    assert!(weir_consumer::status::parked(&f.pool, Some("park")).await.unwrap().is_empty());
}

/// Each selector type, end to end: what it should receive and nothing else (the cases
/// reckon_db got wrong: a prefix that also matched `orders`, types matched as prefixes, tags
/// treated as all-of, row changes leaking into stream subscriptions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_selector_type_delivers_what_it_selects_and_nothing_else() {
    let f = fixture("sub_select").await;
    let subs: Vec<(&'static str, SubscriptionKind, Value, Vec<&str>)> = vec![
        ("exact", SubscriptionKind::Stream, json!("order-1"), vec!["order-1/1", "order-1/2"]),
        (
            "prefix",
            SubscriptionKind::Stream,
            json!("order-*"),
            vec!["order-1/1", "order-10/1", "order-/1", "order-1/2", "order-2/1"],
        ),
        (
            "etype",
            SubscriptionKind::EventType,
            json!("order.placed"),
            vec!["order-1/1", "orders/1"],
        ),
        (
            "pattern",
            SubscriptionKind::EventPattern,
            json!("order.*"),
            vec!["order-1/1", "order-10/1", "orders/1", "order-1/2", "order-2/1"],
        ),
        (
            "payload",
            SubscriptionKind::EventPayload,
            json!({"customer": {"id": 7}}),
            vec!["order-1/1", "orders/1", "customer-1/1", "order-1/2"],
        ),
        (
            "tags_any",
            SubscriptionKind::Tags,
            json!({"any": ["vip", "eu"]}),
            vec!["order-1/1", "order-10/1", "orders/1", "customer-1/1"],
        ),
        (
            "tags_all",
            SubscriptionKind::Tags,
            json!({"all": ["vip", "eu"]}),
            vec!["order-1/1", "customer-1/1"],
        ),
        (
            "entity_kinds",
            SubscriptionKind::Entity,
            json!({"entities": ["posts"], "kinds": ["insert", "delete"]}),
            vec!["posts:insert", "posts:delete"],
        ),
        (
            "entity",
            SubscriptionKind::Entity,
            json!("posts"),
            vec!["posts:insert", "posts:update", "posts:delete"],
        ),
    ];
    let mut builder = Weir::builder(f.config.clone()).pool(f.pool.clone());
    let mut records = Vec::new();
    for (name, kind, selector, _) in &subs {
        let record = Record::new(name);
        records.push(record.clone());
        // One emitter each: then delivery order is log order across streams too.
        builder = builder.subscription(rust_sub(name, *kind, selector.clone(), 1), record);
    }
    let weir = builder.start().await.unwrap();
    let p = &f.pool;
    append(
        p,
        "order-1",
        "order.placed",
        json!({"customer": {"id": 7, "name": "a"}}),
        &["vip", "eu"],
    )
    .await;
    append(p, "order-10", "order.paid", json!({"customer": {"id": 8}}), &["vip"]).await;
    append(p, "orders", "order.placed", json!({"customer": {"id": 7}}), &["eu"]).await;
    append(p, "order-", "orders.placed", json!({}), &[]).await;
    sqlx::query("insert into posts values (1, 'a')").execute(p).await.unwrap();
    append(
        p,
        "customer-1",
        "customer.created",
        json!({"customer": {"id": 7}, "items": [1, 2]}),
        &["x", "eu", "vip"],
    )
    .await;
    sqlx::query("update posts set title = 'b' where id = 1").execute(p).await.unwrap();
    sqlx::query("insert into comments values (1, 'c')").execute(p).await.unwrap();
    append(p, "order-1", "order.shipped", json!({"customer": {"id": 7}}), &[]).await;
    // A string "7" is not the number 7; tags are case-sensitive; a longer type is another type.
    append(p, "order-2", "order.placed.v2", json!({"customer": {"id": "7"}}), &["VIP"]).await;
    sqlx::query("delete from posts where id = 1").execute(p).await.unwrap();
    eventually("the row changes logged", Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from weir.events where entity <> 'weir.stream_events'",
        )
        .fetch_one(p)
        .await
        .unwrap()
            == 4
    })
    .await;
    for (name, ..) in &subs {
        caught_up(p, name, Duration::from_secs(30)).await;
    }
    weir.stop().await.unwrap();
    let mut wrong = Vec::new();
    for ((name, _, selector, want), record) in subs.iter().zip(&records) {
        let got: Vec<String> = sqlx::query_scalar(
            "select coalesce(stream || '/' || version, entity || ':' || kind) from seen
             where sub = $1 order by seq",
        )
        .bind(name)
        .fetch_all(p)
        .await
        .unwrap();
        let positions: Vec<i64> =
            sqlx::query_scalar("select position from seen where sub = $1 order by seq")
                .bind(name)
                .fetch_all(p)
                .await
                .unwrap();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "`{name}` in log order: {positions:?}");
        assert_eq!(record.dups.load(AtomicOrdering::SeqCst), 0);
        if got != *want {
            wrong.push(format!("`{name}` ({selector}): got {got:?}, want {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Selects row changes of `posts` and appended events in one global lane.
struct Both(Record);

impl Operator for Both {
    fn selector(&self) -> Selector {
        Selector { entities: vec!["posts".into(), Event::STREAM_EVENTS.into()], kinds: vec![] }
    }
    async fn handle(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &Event,
    ) -> Result<(), OperatorError> {
        self.0.record(tx, event).await
    }
}

/// Row changes and appends committed in one transaction each, several of them: an operator
/// over both sees them in commit order (statement order inside a transaction), and an entity
/// and a stream subscription each see theirs in that same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_changes_and_appends_interleave_in_commit_order() {
    let f = fixture("sub_interleave").await;
    let both = Record::new("both");
    let mut spec = ConsumerSpec::new("both", Arc::new(Both(both.clone())), &f.config.consumers);
    spec.ordering = Ordering::Global;
    let rows = Record::new("rows");
    let acct = Record::new("acct");
    let weir = Weir::builder(f.config.clone())
        .pool(f.pool.clone())
        .consumer(spec)
        // One emitter: log order across rows of different keys (more emitters keep it per key).
        .subscription(rust_sub("rows", SubscriptionKind::Entity, json!("posts"), 1), rows.clone())
        .subscription(rust_sub("acct", SubscriptionKind::Stream, json!("acct-*"), 4), acct.clone())
        // Row changes and appended events in one subscription.
        .subscription(
            rust_sub("mixed", SubscriptionKind::Entity, json!(["posts", "weir.stream_events"]), 1),
            Record::new("mixed"),
        )
        .start()
        .await
        .unwrap();
    let mut want = Vec::new();
    for i in 1..=8i64 {
        let mut tx = f.pool.begin().await.unwrap();
        let post = sqlx::query("insert into posts values ($1, 'p')").bind(i as i32);
        let event = sqlx::query(
            "insert into weir.stream_events (stream, version, id, type, data)
             values ('acct-1', $1, gen_random_uuid(), 'credited', '{}')",
        )
        .bind(i);
        // Odd transactions insert the row first, even ones append first.
        if i % 2 == 1 {
            post.execute(&mut *tx).await.unwrap();
            event.execute(&mut *tx).await.unwrap();
            want.extend([format!("posts:{i}"), format!("acct-1/{i}")]);
        } else {
            event.execute(&mut *tx).await.unwrap();
            post.execute(&mut *tx).await.unwrap();
            want.extend([format!("acct-1/{i}"), format!("posts:{i}")]);
        }
        tx.commit().await.unwrap();
    }
    caught_up(&f.pool, "rows", Duration::from_secs(30)).await;
    caught_up(&f.pool, "acct", Duration::from_secs(30)).await;
    caught_up(&f.pool, "mixed", Duration::from_secs(30)).await;
    eventually("the operator saw all 16", Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, i64>("select count(*) from seen where sub = 'both'")
            .fetch_one(&f.pool)
            .await
            .unwrap()
            >= 16
    })
    .await;
    weir.stop().await.unwrap();
    let seq = |sub: &'static str| {
        let pool = f.pool.clone();
        async move {
            sqlx::query_as::<_, (i64, String)>(
                "select s.position, coalesce(s.stream || '/' || s.version,
                                             s.entity || ':' || (e.new_record->>'id'))
                 from seen s join weir.events e on e.position = s.position
                 where s.sub = $1 order by s.seq",
            )
            .bind(sub)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let got = seq("both").await;
    let labels: Vec<String> = got.iter().map(|r| r.1.clone()).collect();
    assert_eq!(labels, want, "the operator sees commit order");
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "in log order: {got:?}");
    assert_eq!(
        seq("mixed").await,
        got,
        "one subscription over both: the same positions, in log order"
    );
    for (sub, prefix) in [("rows", "posts:"), ("acct", "acct-1/")] {
        let mine = seq(sub).await;
        let from_both: Vec<(i64, String)> =
            got.iter().filter(|r| r.1.starts_with(prefix)).cloned().collect();
        assert_eq!(mine, from_both, "`{sub}` sees its events at the same positions, in order");
    }
    assert_eq!(both.dups.load(AtomicOrdering::SeqCst) + rows.dups.load(AtomicOrdering::SeqCst), 0);
}

/// A second facade (without ingestion) on its own runtime, so that it can die abruptly: its
/// tasks dropped with the runtime, nothing released.
struct Other {
    runtime: tokio::runtime::Runtime,
}

impl Other {
    async fn start(url: &str, config: Config, def: SubscriptionDef, handler: Record) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (ready, started) = tokio::sync::oneshot::channel();
        let url = url.to_string();
        runtime.spawn(async move {
            let pool = connect(&url).await;
            let running = Weir::builder(config)
                .pool(pool)
                .without_ingestion()
                .subscription(def, handler)
                .start()
                .await
                .unwrap();
            let _ = ready.send(());
            std::future::pending::<()>().await;
            drop(running);
        });
        started.await.unwrap();
        Self { runtime }
    }

    /// Dies: every task dropped, connections closed, no lease released.
    fn kill(self) {
        self.runtime.shutdown_background();
    }
}

/// Two facades share one subscription's emitters; one dies abruptly mid-stream. Its emitters
/// move to the survivor once their leases expire, and every event is still delivered exactly
/// once, in order per stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_one_of_two_processes_dies_its_emitters_move_to_the_other_and_delivery_stays_exactly_once()
 {
    let f = fixture("sub_share").await;
    let def = rust_sub("shared", SubscriptionKind::Stream, json!("k-*"), 8);
    let a = Record::new("shared").who("a");
    let b = Record::new("shared").who("b");
    let weir = Weir::builder(f.config.clone())
        .pool(f.pool.clone())
        .subscription(def.clone(), a.clone())
        .start()
        .await
        .unwrap();
    let other = Other::start(&f.url, f.config.clone(), def, b.clone()).await;
    eventually("both processes hold emitters", Duration::from_secs(20), || async {
        let s = subscriptions::get(&f.pool, "shared").await.unwrap();
        let owners: std::collections::HashSet<_> =
            s.emitters.iter().filter_map(|e| e.owner.clone()).collect();
        owners.len() == 2 && s.emitters.iter().all(|e| e.owner.is_some())
    })
    .await;
    let all = streams("k-", 100);
    let appender = Appender::start(f.pool.clone(), all.clone(), 10, Duration::from_millis(3));
    eventually("both deliver", Duration::from_secs(20), || async {
        let n: i64 =
            sqlx::query_scalar("select count(distinct who) from seen where sub = 'shared'")
                .fetch_one(&f.pool)
                .await
                .unwrap();
        n == 2
    })
    .await;
    other.kill();
    let killed = Instant::now();
    eventually("the survivor holds every emitter", Duration::from_secs(40), || async {
        let s = subscriptions::get(&f.pool, "shared").await.unwrap();
        let owners: std::collections::HashSet<_> =
            s.emitters.iter().filter_map(|e| e.owner.clone()).collect();
        owners.len() == 1 && s.emitters.iter().all(|e| e.owner.is_some())
    })
    .await;
    assert!(killed.elapsed() > Duration::from_secs(4), "the emitters waited for the leases");
    tokio::time::sleep(Duration::from_secs(1)).await; // the survivor delivers B's streams
    let appended = appender.stop().await;
    caught_up(&f.pool, "shared", Duration::from_secs(30)).await;
    weir.stop().await.unwrap();
    assert!(appended > 500, "appends went on through the death ({appended})");
    let expected = stored(&f.pool, "k-%").await;
    assert_eq!(b.dups.load(AtomicOrdering::SeqCst), 0);
    assert_exactly_once_in_order("shared", &delivered(&f.pool, "shared").await, &expected, &a.dups);
}

/// A re-split asked for in a transaction that commits late (here on purpose; under load, a
/// slow commit): emitters keep delivering meanwhile, and the drain position must still cover
/// whatever they delivered — nothing repeated or lost when the new emitters start there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resplit_that_commits_late_still_repeats_and_loses_nothing() {
    let f = fixture("sub_late").await;
    let all = streams("q-", 100);
    let record = Record::new("late");
    let weir = Weir::builder(f.config.clone())
        .pool(f.pool.clone())
        .subscription(rust_sub("late", SubscriptionKind::Stream, json!("q-*"), 2), record.clone())
        .start()
        .await
        .unwrap();
    let appender = Appender::start(f.pool.clone(), all.clone(), 10, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut tx = f.pool.begin().await.unwrap();
    let drain_to = weir_consumer::begin_resplit(&mut tx, "late", 4).await.unwrap();
    // Appends and deliveries go on while the re-split is not committed yet.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tx.commit().await.unwrap();
    eventually("4 emitters", Duration::from_secs(20), || async {
        let s = subscriptions::get(&f.pool, "late").await.unwrap();
        s.pending_pool_size.is_none() && s.emitters.len() == 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let appended = appender.stop().await;
    assert!(appended > 100, "appends went on ({appended})");
    caught_up(&f.pool, "late", Duration::from_secs(30)).await;
    weir.stop().await.unwrap();
    let beyond: i64 = sqlx::query_scalar("select count(*) from seen where position > $1")
        .bind(drain_to)
        .fetch_one(&f.pool)
        .await
        .unwrap();
    assert!(beyond > 0, "events after the drain position were delivered too");
    assert_exactly_once_in_order(
        "late",
        &delivered(&f.pool, "late").await,
        &stored(&f.pool, "q-%").await,
        &record.dups,
    );
}

/// `stop` while appends go on: the emitters finish what they deliver and wait (nothing more
/// arrives, their state says stopped); `start` carries on from the checkpoints, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_subscription_delivers_nothing_until_started_then_resumes_exactly_once() {
    let f = fixture("sub_stop").await;
    let all = streams("t-", 50);
    let record = Record::new("stops");
    let weir = Weir::builder(f.config.clone())
        .pool(f.pool.clone())
        .subscription(rust_sub("stops", SubscriptionKind::Stream, json!("t-*"), 4), record.clone())
        .start()
        .await
        .unwrap();
    let appender = Appender::start(f.pool.clone(), all.clone(), 10, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(500)).await;
    subscriptions::stop(&f.pool, "stops").await.unwrap();
    eventually("every emitter stopped", Duration::from_secs(20), || async {
        let s = subscriptions::get(&f.pool, "stops").await.unwrap();
        s.emitters.iter().all(|e| e.state == weir_consumer::LaneState::Stopped)
    })
    .await;
    let count = || async {
        sqlx::query_scalar::<_, i64>("select count(*) from seen where sub = 'stops'")
            .fetch_one(&f.pool)
            .await
            .unwrap()
    };
    let at_stop = count().await;
    // Appends go on; once they are logged (and a moment more), nothing was delivered.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stored_now: i64 = sqlx::query_scalar("select count(*) from weir.stream_events")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    eventually("what was stored is logged", Duration::from_secs(20), || async {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from weir.events where entity = 'weir.stream_events'",
        )
        .fetch_one(&f.pool)
        .await
        .unwrap()
            >= stored_now
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count().await, at_stop, "nothing delivered while stopped");
    let s = subscriptions::get(&f.pool, "stops").await.unwrap();
    assert_eq!(s.state, weir_consumer::ConsumerState::Stopped);
    subscriptions::start(&f.pool, "stops").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let appended = appender.stop().await;
    assert!(appended > 200, "appends went on ({appended})");
    caught_up(&f.pool, "stops", Duration::from_secs(30)).await;
    weir.stop().await.unwrap();
    assert!(count().await > at_stop);
    assert_exactly_once_in_order(
        "stops",
        &delivered(&f.pool, "stops").await,
        &stored(&f.pool, "t-%").await,
        &record.dups,
    );
}

/// A parked stream across a re-split: its parked events follow it to its new emitter, keep
/// holding its later events back, and are delivered in order after the fix and a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_events_follow_their_stream_through_a_resplit_and_are_delivered_in_order_after_retry()
 {
    let f = fixture("sub_park_split").await;
    let broken = Arc::new(AtomicBool::new(true));
    let record =
        Record::new("psplit").fault(Fault::Broken { stream: "u-bad", broken: broken.clone() });
    let mut def = rust_sub("psplit", SubscriptionKind::Stream, json!("u-*"), 4);
    def.options.on_exhausted = Some(OnExhausted::Park);
    def.options.retry = Some(RetryConfig { max_retries: 1, ..fast_retry() });
    let weir = Weir::builder(f.config.clone())
        .pool(f.pool.clone())
        .subscription(def, record.clone())
        .start()
        .await
        .unwrap();
    let mut all = streams("u-", 20);
    all.push("u-bad".into());
    for version in 1..=3 {
        append_round(&f.pool, &all, version).await;
    }
    caught_up(&f.pool, "psplit", Duration::from_secs(30)).await;
    assert_eq!(weir_consumer::status::parked(&f.pool, Some("psplit")).await.unwrap().len(), 3);
    let update = SubscriptionUpdate { pool_size: Some(3), ..Default::default() };
    subscriptions::update(&f.pool, "psplit", update).await.unwrap();
    eventually("3 emitters", Duration::from_secs(20), || async {
        let s = subscriptions::get(&f.pool, "psplit").await.unwrap();
        s.pending_pool_size.is_none() && s.emitters.len() == 3
    })
    .await;
    for version in 4..=5 {
        append_round(&f.pool, &all, version).await;
    }
    caught_up(&f.pool, "psplit", Duration::from_secs(30)).await;
    let parked = weir_consumer::status::parked(&f.pool, Some("psplit")).await.unwrap();
    assert_eq!(parked.len(), 5, "u-bad's later events wait behind it on its new emitter");
    assert!(!delivered(&f.pool, "psplit").await.contains_key("u-bad"));
    broken.store(false, AtomicOrdering::SeqCst);
    weir_consumer::status::retry_parked(&f.pool, "psplit", None).await.unwrap();
    append_round(&f.pool, &all, 6).await;
    eventually("u-bad delivered", Duration::from_secs(30), || async {
        delivered(&f.pool, "psplit").await.get("u-bad").is_some_and(|v| v.len() >= 6)
    })
    .await;
    caught_up(&f.pool, "psplit", Duration::from_secs(30)).await;
    weir.stop().await.unwrap();
    assert_exactly_once_in_order(
        "psplit",
        &delivered(&f.pool, "psplit").await,
        &stored(&f.pool, "u-%").await,
        &record.dups,
    );
}
