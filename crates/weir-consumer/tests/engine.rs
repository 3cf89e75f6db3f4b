//! The consumer engine against a real PostgreSQL, fed by appending events straight to the log:
//! per-key order and exactly-once effects under random failures (a property test), halt and
//! resume, skip, park (with retry and discard), a handler stopping its consumer, `prepare` before
//! the transaction, the retry delays, process status, and lanes
//! shared by two engines that survive one of them dying.

use std::sync::atomic::{AtomicU32, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use weir_consumer::{
    ConsumerSpec, ConsumerState, Engine, Operator, OperatorError, Selector, TracingReporter,
};
use weir_core::{
    Change, ConsumersConfig, Event, Kind, Lsn, OnExhausted, Ordering, ProcessId, RetryConfig,
    Source, Transaction,
};
use weir_log::{Appender, Wake};

struct Log {
    pool: PgPool,
    appender: Appender,
    lsn: u64,
    rel: Arc<Source>,
}

impl Log {
    async fn new(db: &weir_testkit::TestDatabase<'_>) -> Self {
        let pool = PgPool::connect(&db.url()).await.unwrap();
        weir_log::migrate(&pool).await.unwrap();
        weir_consumer::migrate(&pool).await.unwrap();
        sqlx::raw_sql(
            "create table handled (seq bigserial primary key, consumer text, k int, position bigint, unique (consumer, position));",
        )
        .execute(&pool)
        .await
        .unwrap();
        let appender = Appender::open(&db.url().parse().unwrap(), "weir", 1_000_000).await.unwrap();
        let mut columns = serde_json::Map::new();
        columns.insert("k".into(), json!("int4"));
        columns.insert("updated_at".into(), json!("timestamptz"));
        let rel = Arc::new(Source {
            db: String::new(),
            schema: "public".into(),
            table: "items".into(),
            columns,
        });
        Self { pool, appender, lsn: 0, rel }
    }

    /// Appends one transaction of changes to keys `ks` (updated_at = `ts_us`).
    async fn append(&mut self, ks: &[i32], ts_us: i64) {
        self.lsn += 100;
        let ts = chrono::DateTime::from_timestamp_micros(ts_us).unwrap();
        let changes = ks
            .iter()
            .map(|k| Change {
                kind: Kind::Insert,
                entity: "items".into(),
                relation: Some(self.rel.clone()),
                key: json!({"k": k}),
                new_record: Some(json!({"k": k, "updated_at": ts.to_rfc3339()})),
                old_record: None,
                changes: None,
                unchanged_toast: vec![],
            })
            .collect();
        self.appender
            .append(&[Transaction {
                xid: 1,
                commit_lsn: Lsn(self.lsn),
                commit_ts: ts,
                changes,
                staged: false,
            }])
            .await
            .unwrap();
    }

    fn wake(&self, cancel: &CancellationToken) -> Wake {
        weir_log::listen_for_appends(self.pool.clone(), cancel.clone()).0
    }
}

/// Decides whether attempt `n` at an event fails, and with what message (`"panic"` panics).
type FailFn = dyn Fn(&Event, u32) -> Option<String> + Send + Sync;

/// Turns a failure's message into the handler's answer (a plain retry unless told).
type AnswerFn = dyn Fn(String) -> OperatorError + Send + Sync;

/// Records (key, position) in the handler's transaction; fails per `fail`.
struct Recorder {
    name: &'static str,
    fail: Box<FailFn>,
    answer: Box<AnswerFn>,
    attempts: Mutex<std::collections::HashMap<i64, u32>>,
    calls: AtomicU32,
}

impl Recorder {
    fn new(
        name: &'static str,
        fail: impl Fn(&Event, u32) -> Option<String> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Self::answering(name, OperatorError::retry, fail)
    }

    /// A recorder whose failures answer with `answer` (skip, park, retry after…).
    fn answering(
        name: &'static str,
        answer: impl Fn(String) -> OperatorError + Send + Sync + 'static,
        fail: impl Fn(&Event, u32) -> Option<String> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            name,
            fail: Box::new(fail),
            answer: Box::new(answer),
            attempts: Mutex::default(),
            calls: AtomicU32::new(0),
        })
    }

    /// How many times the handler ran for `position` (a failed group runs it once more: the
    /// engine then handles the group's events one by one to isolate the failure).
    fn attempts_at(&self, position: i64) -> u32 {
        self.attempts.lock().unwrap().get(&position).copied().unwrap_or(0)
    }
}

impl Operator for Recorder {
    fn selector(&self) -> Selector {
        Selector { entities: vec!["items".into()], kinds: vec![] }
    }
    async fn handle(&self, tx: &mut PgConnection, e: &Event) -> Result<(), OperatorError> {
        self.calls.fetch_add(1, AtomicOrdering::Relaxed);
        let attempt = {
            let mut a = self.attempts.lock().unwrap();
            let n = a.entry(e.position).or_insert(0);
            *n += 1;
            *n
        };
        let k = e.key["k"].as_i64().unwrap() as i32;
        // The write happens first: a failure after it must roll it back.
        sqlx::query("insert into handled (consumer, k, position) values ($1, $2, $3)")
            .bind(self.name)
            .bind(k)
            .bind(e.position)
            .execute(&mut *tx)
            .await?;
        if let Some(msg) = (self.fail)(e, attempt) {
            if msg == "panic" {
                panic!("the handler panicked on purpose");
            }
            return Err((self.answer)(msg));
        }
        Ok(())
    }
}

fn spec(
    name: &str,
    op: Arc<impl Operator>,
    lanes: u32,
    on_exhausted: OnExhausted,
    retries: u32,
) -> ConsumerSpec {
    let mut s = ConsumerSpec::new(name, op, &ConsumersConfig::default());
    s.ordering = if lanes == 1 { Ordering::Global } else { Ordering::PerKey };
    s.lanes = lanes;
    s.on_exhausted = on_exhausted;
    s.retry = RetryConfig {
        min_restart_time: Duration::from_millis(20),
        backoff_multiplicator: 2.0,
        max_restart_time: Duration::from_millis(80),
        max_retries: retries,
    };
    s.poll_interval = Duration::from_millis(200);
    s
}

/// Waits until `sql` (a count) returns `want`.
async fn wait(pool: &PgPool, what: &str, sql: &str, want: i64, timeout: Duration) {
    weir_testkit::eventually(&format!("{what} = {want}"), timeout, || async {
        let got: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string())).fetch_one(pool).await.unwrap();
        got == want
    })
    .await;
}

/// Starts an engine as a process of its own (two engines in one test are two processes).
async fn start(log: &Log, specs: Vec<ConsumerSpec>, cancel: &CancellationToken) -> Engine {
    Engine::start(
        log.pool.clone(),
        specs,
        log.wake(cancel),
        Arc::new(TracingReporter),
        &ProcessId::generate(),
        cancel.clone(),
    )
    .await
    .unwrap()
}

/// Every position handled exactly once (committed), and per key in increasing position order.
async fn assert_exactly_once_in_order(pool: &PgPool, consumer: &str, events: i64) {
    let rows: Vec<(i32, i64)> =
        sqlx::query_as("select k, position from handled where consumer = $1 order by seq")
            .bind(consumer)
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(rows.len() as i64, events, "each event's effect exactly once");
    let mut last: std::collections::HashMap<i32, i64> = Default::default();
    for (k, p) in rows {
        if let Some(prev) = last.insert(k, p) {
            assert!(p > prev, "key {k}: position {p} handled after {prev}");
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 6, ..Default::default() })]
    #[test]
    fn per_key_order_and_exactly_once_under_random_failures(
        keys in proptest::collection::vec(0..12i32, 40..120),
        fail_every in 2u64..7,
        lanes in 1u32..9,
    ) {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(async {
            let db = weir_testkit::shared().database("prop").unwrap();
            let mut log = Log::new(&db).await;
            let cancel = CancellationToken::new();
            // Fail some first attempts (the write is rolled back), some panics, never forever.
            let op = Recorder::new("prop", move |e, attempt| {
                let p = e.position as u64;
                (attempt == 1 && p.is_multiple_of(fail_every)).then(|| if p.is_multiple_of(fail_every * 2) { "panic".into() } else { "boom".into() })
            });
            let engine = start(&log, vec![spec("prop", op, lanes, OnExhausted::Halt, 3)], &cancel).await;
            // Events arrive while the engine runs, in small transactions.
            for chunk in keys.chunks(7) {
                log.append(chunk, 0).await;
            }
            let n = keys.len() as i64;
            wait(&log.pool, "handled", "select count(*) from handled", n, Duration::from_secs(60)).await;
            engine.stop().await.unwrap();
            assert_exactly_once_in_order(&log.pool, "prop", n).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_stops_at_the_poison_event_and_resume_continues_there() {
    let db = weir_testkit::shared().database("halt").unwrap();
    let mut log = Log::new(&db).await;
    let cancel = CancellationToken::new();
    let poison = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let p2 = poison.clone();
    let op = Recorder::new("halter", move |e, _| {
        (e.position == 3 && p2.load(AtomicOrdering::SeqCst)).then(|| "poison".into())
    });
    let engine =
        start(&log, vec![spec("halter", op.clone(), 1, OnExhausted::Halt, 2)], &cancel).await;
    log.append(&[1, 2, 3, 4, 5], 0).await;
    wait(
        &log.pool,
        "halted",
        "select count(*) from weir.consumers where state = 'halted'",
        1,
        Duration::from_secs(20),
    )
    .await;
    let (pos, attempt, error): (i64, i32, String) =
        sqlx::query_as("select halted_position, halted_attempt, halted_error from weir.consumers where name = 'halter'")
            .fetch_one(&log.pool)
            .await
            .unwrap();
    assert_eq!((pos, attempt), (3, 3), "1 try + 2 retries, at the poison event");
    assert!(error.contains("poison"));
    let status = weir_consumer::status::consumers(&log.pool).await.unwrap();
    assert_eq!(status[0].state, ConsumerState::Halted);
    assert_eq!(status[0].lanes[0].position, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let handled: i64 =
        sqlx::query_scalar("select count(*) from handled").fetch_one(&log.pool).await.unwrap();
    assert_eq!(handled, 2, "nothing after the poison event is handled while halted");
    poison.store(false, AtomicOrdering::SeqCst);
    assert!(weir_consumer::resume(&log.pool, "halter").await.unwrap());
    wait(&log.pool, "handled", "select count(*) from handled", 5, Duration::from_secs(20)).await;
    let order: Vec<i64> = sqlx::query_scalar("select position from handled order by seq")
        .fetch_all(&log.pool)
        .await
        .unwrap();
    assert_eq!(order, vec![1, 2, 3, 4, 5]);
    assert!(weir_consumer::resume(&log.pool, "nobody").await.is_err());
    engine.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_records_and_moves_on_and_retry_delays_follow_the_policy() {
    let db = weir_testkit::shared().database("skip").unwrap();
    let mut log = Log::new(&db).await;
    let cancel = CancellationToken::new();
    let op = Recorder::new("skipper", |e, _| (e.position == 2).then(|| "always".into()));
    let engine = start(&log, vec![spec("skipper", op, 1, OnExhausted::Skip, 3)], &cancel).await;
    log.append(&[1, 2, 3], 0).await;
    wait(&log.pool, "handled", "select count(*) from handled", 2, Duration::from_secs(20)).await;
    wait(
        &log.pool,
        "checkpoint",
        "select max(position) from weir.checkpoints where consumer = 'skipper'",
        3,
        Duration::from_secs(20),
    )
    .await;
    let outcomes: Vec<(String, f64)> = sqlx::query_as(
        "select outcome, extract(epoch from at - lag(at) over (order by id))::float8 * 1000
         from weir.consumer_failures where position = 2 order by id",
    )
    .fetch_all(&log.pool)
    .await
    .map(|rows: Vec<(String, Option<f64>)>| {
        rows.into_iter().map(|(o, d)| (o, d.unwrap_or(0.0))).collect()
    })
    .unwrap();
    let kinds: Vec<&str> = outcomes.iter().map(|(o, _)| o.as_str()).collect();
    assert_eq!(kinds, vec!["retry", "retry", "retry", "skip"]);
    // Waits: 20 ms, 40 ms, 80 ms (cap 80) between attempts.
    for (i, want) in [(1, 20.0), (2, 40.0), (3, 80.0)] {
        let got = outcomes[i].1;
        assert!(got >= want * 0.9, "wait before attempt {}: {got:.1} ms, want ≥ {want} ms", i + 1);
    }
    engine.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn park_sets_aside_a_key_and_keeps_other_keys_flowing() {
    let db = weir_testkit::shared().database("park").unwrap();
    let mut log = Log::new(&db).await;
    let cancel = CancellationToken::new();
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let b2 = broken.clone();
    let op = Recorder::new("parker", move |e, _| {
        (e.key["k"] == 7 && b2.load(AtomicOrdering::SeqCst)).then(|| "bad key".into())
    });
    let engine = start(&log, vec![spec("parker", op, 4, OnExhausted::Park, 1)], &cancel).await;
    log.append(&[1, 7, 2], 0).await; // positions 1, 2 (k=7), 3
    log.append(&[7, 3], 0).await; // position 4 (k=7, parked behind 2), 5
    wait(&log.pool, "handled", "select count(*) from handled", 3, Duration::from_secs(20)).await;
    wait(&log.pool, "parked", "select count(*) from weir.parked", 2, Duration::from_secs(20)).await;
    let parked = weir_consumer::status::parked(&log.pool, Some("parker")).await.unwrap();
    assert_eq!(parked.iter().map(|p| p.position).collect::<Vec<_>>(), vec![2, 4]);
    broken.store(false, AtomicOrdering::SeqCst);
    assert_eq!(weir_consumer::status::retry_parked(&log.pool, "parker", None).await.unwrap(), 2);
    wait(&log.pool, "handled", "select count(*) from handled", 5, Duration::from_secs(20)).await;
    wait(&log.pool, "parked", "select count(*) from weir.parked", 0, Duration::from_secs(20)).await;
    let sevens: Vec<i64> =
        sqlx::query_scalar("select position from handled where k = 7 order by seq")
            .fetch_all(&log.pool)
            .await
            .unwrap();
    assert_eq!(sevens, vec![2, 4], "parked events of a key are retried in order");
    // Discard.
    broken.store(true, AtomicOrdering::SeqCst);
    log.append(&[7], 0).await;
    wait(&log.pool, "parked", "select count(*) from weir.parked", 1, Duration::from_secs(20)).await;
    assert_eq!(weir_consumer::status::discard_parked(&log.pool, "parker", None).await.unwrap(), 1);
    engine.stop().await.unwrap();
}

/// The outcomes recorded for `position`, oldest first, with the wait before each (ms).
async fn outcomes_at(pool: &PgPool, position: i64) -> Vec<(String, f64)> {
    let rows: Vec<(String, Option<f64>)> = sqlx::query_as(
        "select outcome, extract(epoch from at - lag(at) over (order by id))::float8 * 1000
         from weir.consumer_failures where position = $1 order by id",
    )
    .bind(position)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|(o, d)| (o, d.unwrap_or(0.0))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_waits_the_given_time_and_still_counts_against_max_retries() {
    let db = weir_testkit::shared().database("retry_after").unwrap();
    let mut log = Log::new(&db).await;
    let cancel = CancellationToken::new();
    let op = Recorder::answering(
        "waiter",
        |m| OperatorError::retry_after(Duration::from_millis(300), m),
        |e, _| (e.position == 2).then(|| "not yet".into()),
    );
    // The backoff would wait 20 ms, 40 ms; the handler asks for 300 ms each time.
    let engine =
        start(&log, vec![spec("waiter", op.clone(), 1, OnExhausted::Skip, 2)], &cancel).await;
    log.append(&[1, 2, 3], 0).await;
    wait(&log.pool, "handled", "select count(*) from handled", 2, Duration::from_secs(20)).await;
    wait(
        &log.pool,
        "checkpoint",
        "select max(position) from weir.checkpoints where consumer = 'waiter'",
        3,
        Duration::from_secs(20),
    )
    .await;
    let outcomes = outcomes_at(&log.pool, 2).await;
    let kinds: Vec<&str> = outcomes.iter().map(|(o, _)| o.as_str()).collect();
    assert_eq!(kinds, vec!["retry", "retry", "skip"], "1 try + 2 retries, then on_exhausted");
    for (i, (_, got)) in outcomes.iter().enumerate().skip(1) {
        assert!(*got >= 270.0, "wait before attempt {}: {got:.1} ms, want ≥ 300 ms", i + 1);
    }
    engine.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_from_the_handler_moves_on_at_once_without_retries() {
    let db = weir_testkit::shared().database("skip_now").unwrap();
    let mut log = Log::new(&db).await;
    let cancel = CancellationToken::new();
    let op = Recorder::answering("skipnow", OperatorError::skip, |e, _| {
        (e.position == 2).then(|| "unusable".into())
    });
    // The consumer's own policy would retry 5 times and then halt.
    let engine =
        start(&log, vec![spec("skipnow", op.clone(), 1, OnExhausted::Halt, 5)], &cancel).await;
    log.append(&[1, 2, 3], 0).await;
    wait(&log.pool, "handled", "select count(*) from handled", 2, Duration::from_secs(20)).await;
    wait(
        &log.pool,
        "checkpoint",
        "select max(position) from weir.checkpoints where consumer = 'skipnow'",
        3,
        Duration::from_secs(20),
    )
    .await;
    let kinds: Vec<String> = outcomes_at(&log.pool, 2).await.into_iter().map(|(o, _)| o).collect();
    assert_eq!(kinds, vec!["skip"], "skipped at once: no retries");
    let status = weir_consumer::status::consumers(&log.pool).await.unwrap();
    assert_eq!(status[0].state, ConsumerState::Running, "not halted");
    engine.stop().await.unwrap();
}

/// A handler parks key 7 while `broken`; the consumer's own policy is `on_exhausted`.
async fn park_from_the_handler(on_exhausted: OnExhausted, db: &str) {
    let db = weir_testkit::shared().database(db).unwrap();
    let mut log = Log::new(&db).await;
    let cancel = CancellationToken::new();
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let b2 = broken.clone();
    let op = Recorder::answering("parknow", OperatorError::park, move |e, _| {
        (e.key["k"] == 7 && b2.load(AtomicOrdering::SeqCst)).then(|| "bad key".into())
    });
    let engine = start(&log, vec![spec("parknow", op.clone(), 4, on_exhausted, 3)], &cancel).await;
    log.append(&[1, 7, 2], 0).await; // positions 1, 2 (k=7), 3
    log.append(&[7, 3], 0).await; // position 4 (k=7, must wait behind 2), 5
    wait(&log.pool, "handled", "select count(*) from handled", 3, Duration::from_secs(20)).await;
    wait(&log.pool, "parked", "select count(*) from weir.parked", 2, Duration::from_secs(20)).await;
    let parked = weir_consumer::status::parked(&log.pool, Some("parknow")).await.unwrap();
    assert_eq!(parked.iter().map(|p| p.position).collect::<Vec<_>>(), vec![2, 4]);
    assert_eq!(op.attempts_at(4), 0, "a later event of a parked key waits without running");
    let kinds: Vec<String> = outcomes_at(&log.pool, 2).await.into_iter().map(|(o, _)| o).collect();
    assert_eq!(kinds, vec!["park"], "parked at once: no retries");
    let status = weir_consumer::status::consumers(&log.pool).await.unwrap();
    assert_eq!(status[0].state, ConsumerState::Running, "not halted");
    broken.store(false, AtomicOrdering::SeqCst);
    assert_eq!(weir_consumer::status::retry_parked(&log.pool, "parknow", None).await.unwrap(), 2);
    wait(&log.pool, "handled", "select count(*) from handled", 5, Duration::from_secs(20)).await;
    wait(&log.pool, "parked", "select count(*) from weir.parked", 0, Duration::from_secs(20)).await;
    let sevens: Vec<i64> =
        sqlx::query_scalar("select position from handled where k = 7 order by seq")
            .fetch_all(&log.pool)
            .await
            .unwrap();
    assert_eq!(sevens, vec![2, 4], "parked events of a key are retried in order");
    // Once nothing is parked, the key flows again.
    log.append(&[7], 0).await;
    wait(&log.pool, "handled", "select count(*) from handled", 6, Duration::from_secs(20)).await;
    engine.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn park_from_the_handler_holds_the_key_back_under_a_halt_policy() {
    park_from_the_handler(OnExhausted::Halt, "park_now_halt").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn park_from_the_handler_holds_the_key_back_under_a_skip_policy() {
    park_from_the_handler(OnExhausted::Skip, "park_now_skip").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_status_is_false_before_and_true_after_every_operator_handled() {
    let db = weir_testkit::shared().database("pstatus").unwrap();
    let mut log = Log::new(&db).await;
    let cancel = CancellationToken::new();
    let gate = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let g2 = gate.clone();
    let fast = Recorder::new("fast", |_, _| None);
    let slow = Recorder::new("slow", move |_, _| {
        g2.load(AtomicOrdering::SeqCst).then(|| "not yet".into())
    });
    let mut slow_spec = spec("slow", slow, 2, OnExhausted::Halt, 1000);
    slow_spec.retry.max_restart_time = Duration::from_millis(20);
    let engine =
        start(&log, vec![spec("fast", fast, 2, OnExhausted::Halt, 3), slow_spec], &cancel).await;
    let t0 = 1_700_000_000_000_000i64;
    assert!(
        !weir_consumer::process::processed(&log.pool, "items", t0, "updated_at").await.unwrap()
    );
    log.append(&[1, 2], t0).await;
    wait(
        &log.pool,
        "fast",
        "select count(*) from handled where consumer = 'fast'",
        2,
        Duration::from_secs(20),
    )
    .await;
    assert!(
        !weir_consumer::process::processed(&log.pool, "items", t0, "updated_at").await.unwrap(),
        "one operator has not handled it yet"
    );
    gate.store(false, AtomicOrdering::SeqCst);
    wait(
        &log.pool,
        "slow",
        "select count(*) from handled where consumer = 'slow'",
        2,
        Duration::from_secs(20),
    )
    .await;
    weir_testkit::eventually("processed", Duration::from_secs(10), || async {
        weir_consumer::process::processed(&log.pool, "items", t0, "updated_at").await.unwrap()
    })
    .await;
    assert_eq!(
        weir_consumer::process::last_processed(&log.pool, "items", "updated_at").await.unwrap(),
        Some(t0)
    );
    assert!(
        !weir_consumer::process::processed(&log.pool, "items", t0 + 1, "updated_at").await.unwrap()
    );
    // The exact form: every logged change up to the source's LSN is processed.
    assert!(
        weir_consumer::process::wait_for(&log.pool, Lsn(log.lsn), Duration::from_secs(10))
            .await
            .unwrap()
    );
    assert!(
        !weir_consumer::process::wait_for(
            &log.pool,
            Lsn(log.lsn + 1_000_000),
            Duration::from_millis(50)
        )
        .await
        .unwrap()
    );
    engine.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_share_lanes_and_survive_one_dying() {
    let db = weir_testkit::shared().database("share").unwrap();
    let mut log = Log::new(&db).await;
    let op_a = Recorder::new("shared", |_, _| None);
    let op_b = Recorder::new("shared", |_, _| None);
    let (ca, cb) = (CancellationToken::new(), CancellationToken::new());
    let a = start(&log, vec![spec("shared", op_a.clone(), 8, OnExhausted::Halt, 3)], &ca).await;
    let b = start(&log, vec![spec("shared", op_b.clone(), 8, OnExhausted::Halt, 3)], &cb).await;
    // Both get a share: 4 lanes each once both heartbeat.
    wait(
        &log.pool,
        "owners",
        "select count(distinct owner) from weir.checkpoints where owner is not null",
        2,
        Duration::from_secs(20),
    )
    .await;
    let keys: Vec<i32> = (0..40).collect();
    log.append(&keys, 0).await;
    wait(&log.pool, "handled", "select count(*) from handled", 40, Duration::from_secs(20)).await;
    assert!(
        op_a.calls.load(AtomicOrdering::Relaxed) > 0
            && op_b.calls.load(AtomicOrdering::Relaxed) > 0,
        "both handle"
    );
    // A dies without releasing anything, like a killed process.
    a.abort();
    let died = Instant::now();
    // Its lanes are taken over after the lease expires.
    log.append(&keys, 0).await;
    wait(&log.pool, "handled", "select count(*) from handled", 80, Duration::from_secs(30)).await;
    assert!(died.elapsed() > Duration::from_secs(4), "A's lanes waited for their leases to expire");
    let owners: i64 = sqlx::query_scalar("select count(distinct owner) from weir.checkpoints")
        .fetch_one(&log.pool)
        .await
        .unwrap();
    assert_eq!(owners, 1, "B holds every lane now");
    b.stop().await.unwrap();
    assert_exactly_once_in_order(&log.pool, "shared", 80).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_may_register_a_new_consumer_at_the_same_moment() {
    let db = weir_testkit::shared().database("register").unwrap();
    let log = Log::new(&db).await;
    for round in 0..5 {
        let name: &'static str = Box::leak(format!("racer{round}").into_boxed_str());
        let (ca, cb) = (CancellationToken::new(), CancellationToken::new());
        let (pa, pb) = (ProcessId::generate(), ProcessId::generate());
        let (a, b) = tokio::join!(
            Engine::start(
                log.pool.clone(),
                vec![spec(name, Recorder::new(name, |_, _| None), 4, OnExhausted::Halt, 1)],
                log.wake(&ca),
                Arc::new(TracingReporter),
                &pa,
                ca.clone()
            ),
            Engine::start(
                log.pool.clone(),
                vec![spec(name, Recorder::new(name, |_, _| None), 4, OnExhausted::Halt, 1)],
                log.wake(&cb),
                Arc::new(TracingReporter),
                &pb,
                cb.clone()
            ),
        );
        a.expect("first registration").stop().await.unwrap();
        b.expect("concurrent registration").stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_from_the_handler_stops_the_consumer_with_its_reason_and_start_tries_again() {
    let db = weir_testkit::shared().database("stop_now").unwrap();
    let mut log = Log::new(&db).await;
    let cancel = CancellationToken::new();
    // Position 2 answers "gone" once (a webhook receiver's 410), then succeeds.
    let op = Recorder::answering("stopnow", OperatorError::stop, |e, attempt| {
        (e.position == 2 && attempt <= 2).then(|| "the receiver is gone".into())
    });
    let engine =
        start(&log, vec![spec("stopnow", op.clone(), 1, OnExhausted::Halt, 5)], &cancel).await;
    log.append(&[1, 2, 3], 0).await;
    weir_testkit::eventually("stopped with the reason", Duration::from_secs(20), || async {
        let s = weir_consumer::status::consumer(&log.pool, "stopnow").await.unwrap().unwrap();
        s.state == ConsumerState::Stopped
            && s.stopped_reason.as_deref() == Some("the receiver is gone")
    })
    .await;
    // Nothing after the event: it stays unhandled, and so does everything behind it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let handled: Vec<i64> = sqlx::query_scalar("select position from handled order by position")
        .fetch_all(&log.pool)
        .await
        .unwrap();
    assert_eq!(handled, vec![1], "only the event before the stop is handled");
    let kinds: Vec<String> = outcomes_at(&log.pool, 2).await.into_iter().map(|(o, _)| o).collect();
    assert_eq!(kinds, vec!["stop"], "stopped at once: no retries");
    weir_consumer::start(&log.pool, "stopnow").await.unwrap();
    wait(&log.pool, "handled", "select count(*) from handled", 3, Duration::from_secs(20)).await;
    let s = weir_consumer::status::consumer(&log.pool, "stopnow").await.unwrap().unwrap();
    assert_eq!((s.state, s.stopped_reason), (ConsumerState::Running, None), "start clears it");
    assert_exactly_once_in_order(&log.pool, "stopnow", 3).await;
    engine.stop().await.unwrap();
}

/// Records in `prepare` how many transactions of this database were open at that moment, and
/// writes each event in `handle_group`.
struct Prepared {
    pool: PgPool,
    open_during_prepare: Mutex<Vec<i64>>,
    prepared: Mutex<Vec<i64>>,
}

impl Operator for Prepared {
    fn selector(&self) -> Selector {
        Selector { entities: vec!["items".into()], kinds: vec![] }
    }
    async fn prepare(&self, events: &[&Event]) -> Result<(), OperatorError> {
        let open: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity
             where datname = current_database() and state like 'idle in transaction%'",
        )
        .fetch_one(&self.pool)
        .await?;
        self.open_during_prepare.lock().unwrap().push(open);
        self.prepared.lock().unwrap().extend(events.iter().map(|e| e.position));
        Ok(())
    }
    async fn handle(&self, tx: &mut PgConnection, e: &Event) -> Result<(), OperatorError> {
        sqlx::query("insert into handled (consumer, k, position) values ('prepared', $1, $2)")
            .bind(e.key["k"].as_i64().unwrap() as i32)
            .bind(e.position)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_runs_for_every_event_before_its_transaction_begins() {
    let db = weir_testkit::shared().database("prepare").unwrap();
    let mut log = Log::new(&db).await;
    let cancel = CancellationToken::new();
    let op = Arc::new(Prepared {
        pool: log.pool.clone(),
        open_during_prepare: Mutex::default(),
        prepared: Mutex::default(),
    });
    let mut s = spec("prepared", op.clone(), 1, OnExhausted::Halt, 5);
    s.group = 4;
    let engine = start(&log, vec![s], &cancel).await;
    log.append(&(1..=10).collect::<Vec<_>>(), 0).await;
    wait(&log.pool, "handled", "select count(*) from handled", 10, Duration::from_secs(20)).await;
    engine.stop().await.unwrap();
    assert_eq!(*op.prepared.lock().unwrap(), (1..=10).collect::<Vec<i64>>(), "each once, in order");
    let open = op.open_during_prepare.lock().unwrap().clone();
    assert_eq!(open.len(), 3, "groups of at most 4: 4 + 4 + 2");
    assert!(open.iter().all(|n| *n == 0), "no transaction open while preparing: {open:?}");
    assert_exactly_once_in_order(&log.pool, "prepared", 10).await;
}
