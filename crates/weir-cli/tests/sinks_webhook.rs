//! Webhook sinks end to end: the real `weir run` against a real PostgreSQL, delivering to a
//! real HTTP receiver in this test process (weir-testkit's `receiver`).
//!
//! ```text
//! insert into t / weir.stream_events ─► WAL ─► weir run: ingestion ─► weir.events
//!   ─► subscription emitters (lanes) ─► POST http://127.0.0.1:<port>/hooks ─► Receiver
//!                                                                 (records, answers as told)
//! ```
//!
//! Why the binary and not `Weir` in this process: a sink reads its secret from the
//! environment variable its `secret_env` names, and this workspace forbids `unsafe` (which
//! `std::env::set_var` is in edition 2024). A child process gets the variable with
//! `Command::env` — exactly how an operator runs `weir run` — and can be SIGKILLed for real.
//!
//! A delivery counts when the receiver answered 2xx. Each test can fail for real: the
//! receiver sees what weir sent, not what weir says it sent.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::PgPool;
use weir_core::RetryConfig;
use weir_sinks::{Secrets, WebhookSink};
use weir_streams::subscriptions;
use weir_streams::{Sink, Subscription, SubscriptionDef, SubscriptionKind, SubscriptionOptions};
use weir_testkit::receiver::{Answer, Exchange, Receiver};
use weir_testkit::{TestDatabase, eventually};

mod support;
use support::*;

/// `weir run` with the sink's secret in `HOOK_SECRET`.
fn run_with_secret(db: &TestDatabase<'_>, secret: &str) -> Proc {
    let mut cmd = weir(db, &["run"]);
    cmd.env("HOOK_SECRET", secret);
    Proc(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
}

async fn setup(prefix: &str) -> (TestDatabase<'static>, PgPool) {
    let db = weir_testkit::shared().database(prefix).unwrap();
    db.psql("create table t (id int primary key, v text)").unwrap();
    let (ok, out) = output(weir(&db, &["init"]));
    assert!(ok, "weir init failed: {out}");
    let pool = PgPool::connect(&db.url()).await.unwrap();
    weir_streams::migrate(&pool).await.unwrap();
    (db, pool)
}

/// Retries 20 ms apart, practically forever: what a test of retries wants to see is the
/// receiver's answers, not the policy running out.
fn patient() -> SubscriptionOptions {
    SubscriptionOptions {
        retry: Some(RetryConfig {
            min_restart_time: Duration::from_millis(20),
            backoff_multiplicator: 1.0,
            max_restart_time: Duration::from_millis(20),
            max_retries: 100_000,
        }),
        ..Default::default()
    }
}

/// A webhook subscription of `t`'s row changes (and, with `appends`, appended events).
async fn subscribe(
    pool: &PgPool,
    name: &str,
    url: &str,
    pool_size: u32,
    appends: bool,
    adjust: impl FnOnce(&mut WebhookSink),
) {
    let mut sink = WebhookSink::new(url, "HOOK_SECRET");
    adjust(&mut sink);
    let selector = if appends { json!(["t", "weir.stream_events"]) } else { json!("t") };
    let def = SubscriptionDef::new(name, SubscriptionKind::Entity, selector)
        .pool_size(pool_size)
        .options(patient())
        .sink(Sink::Webhook(sink));
    subscriptions::create(pool, &def).await.unwrap();
}

async fn insert(pool: &PgPool, from: i32, to: i32) {
    for i in from..=to {
        sqlx::query("insert into t values ($1, 'x')").bind(i).execute(pool).await.unwrap();
    }
}

/// Waits (up to 30 s) until subscription `name`'s status satisfies `done`, and returns it.
async fn wait_subscription(
    pool: &PgPool,
    name: &str,
    what: &str,
    done: impl Fn(&Subscription) -> bool,
) -> Subscription {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sub = subscriptions::get(pool, name).await.unwrap();
        if done(&sub) {
            return sub;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}; status: {sub:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The log position in a delivered body (single-event bodies: the envelope).
fn position(x: &Exchange) -> i64 {
    let body: Value = serde_json::from_slice(&x.request.body).unwrap();
    body["position"].as_i64().unwrap()
}

/// Positions answered 2xx, in arrival order (with repeats).
fn delivered(exchanges: &[Exchange]) -> Vec<i64> {
    exchanges.iter().filter(|x| x.answer.is_success()).map(position).collect()
}

/// (a) Every event delivered at least once and, deduplicated by `webhook-id`, exactly once and
/// in order per key (stream or row) — while the receiver fails at random (500s, hangs past the
/// timeout, closed connections) and `weir run` is SIGKILLed and restarted, with four emitters
/// delivering keys in parallel. The count in `weir.sink_deliveries` is exact: a redelivery
/// after a crash was never checkpointed the first time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_once_per_id_in_order_per_key_through_failures_and_sigkills() {
    let (db, pool) = setup("hook_chaos").await;
    let secret = Secrets::generate();
    // A fixed-seed, per-request roll: ~20% 500, ~5% hang past the timeout, ~5% close.
    let roll = Arc::new(AtomicU64::new(0x5eed));
    let rx = Receiver::start({
        let roll = roll.clone();
        move |_| {
            let mut x = roll.load(Ordering::Relaxed);
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            roll.store(x, Ordering::Relaxed);
            match x % 100 {
                0..20 => Answer::status(500).body("injected"),
                20..25 => Answer::Hang(Duration::from_secs(3)),
                25..30 => Answer::Close,
                _ => Answer::ok(),
            }
        }
    })
    .await;
    subscribe(&pool, "chaos", &rx.url("/hooks"), 4, true, |s| {
        s.timeout = Duration::from_millis(300);
    })
    .await;

    // Rows 1..=40, updated a few times each; 6 streams, 10 events each; interleaved, while
    // weir is killed and restarted. Returns how many events it wrote.
    let writer = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut written = 0;
            for round in 1..=10i64 {
                for id in (round as i32 - 1) * 4 + 1..=(round as i32) * 4 {
                    sqlx::query("insert into t values ($1, 'new')")
                        .bind(id)
                        .execute(&pool)
                        .await
                        .unwrap();
                }
                let updated = sqlx::query("update t set v = v || '+' where id % 3 = $1")
                    .bind(round % 3)
                    .execute(&pool)
                    .await
                    .unwrap();
                written += 4 + updated.rows_affected() as i64 + 6;
                sqlx::query(
                    "insert into weir.stream_events (stream, version, id, type, data)
                     select 's-' || s, $1, gen_random_uuid(), 'thing.happened',
                            jsonb_build_object('v', $1)
                     from generate_series(1, 6) s",
                )
                .bind(round)
                .execute(&pool)
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            written
        })
    };

    let mut seen = 0;
    for round in 0..3u64 {
        let p = run_with_secret(&db, &secret);
        // Kill it while it delivers: after some new deliveries, at a moment that differs by
        // round.
        let got = rx
            .wait_for("deliveries before the kill", Duration::from_secs(60), |x| {
                delivered(x).len() >= seen + 5
            })
            .await;
        seen = delivered(&got).len();
        tokio::time::sleep(Duration::from_millis(50 + round * 170)).await;
        sigkill(&p);
        drop(p);
    }
    let written = writer.await.unwrap();
    let _run = run_with_secret(&db, &secret);
    eventually("the writer's events logged", Duration::from_secs(60), || async {
        let logged: i64 = sqlx::query_scalar(
            "select count(*) from weir.events where entity in ('t', 'weir.stream_events')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        logged == written
    })
    .await;

    let expected: Vec<(i64, String)> = sqlx::query_as(
        "select position, case when entity = 'weir.stream_events'
                               then new_record->>'stream' else 't:' || (key->>'id') end
         from weir.events where entity in ('t', 'weir.stream_events') order by position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let want: BTreeSet<i64> = expected.iter().map(|(p, _)| *p).collect();
    let got = rx
        .wait_for("every event delivered", Duration::from_secs(120), |x| {
            delivered(x).into_iter().collect::<BTreeSet<_>>().is_superset(&want)
        })
        .await;

    // Exactly once after dedup by webhook-id, each id the envelope's own, each signed.
    let key_of: HashMap<i64, &str> = expected.iter().map(|(p, k)| (*p, k.as_str())).collect();
    let secrets = Secrets::parse(&secret).unwrap();
    let mut first: Vec<i64> = Vec::new();
    let mut ids = BTreeSet::new();
    for x in got.iter().filter(|x| x.answer.is_success()) {
        let r = &x.request;
        let id = r.header("webhook-id").unwrap();
        let p = position(x);
        assert_eq!(id, format!("chaos:{p}"));
        let ts = r.header("webhook-timestamp").unwrap().parse().unwrap();
        let sig = r.header("webhook-signature").unwrap();
        assert_eq!(secrets.verify(id, ts, &r.body, sig, ts), Ok(1), "{id}");
        if ids.insert(id.to_string()) {
            first.push(p);
        }
    }
    assert_eq!(ids.len(), want.len(), "no id beyond the subscription's events");
    // In order per key: deduplicated, each key's positions arrive increasing.
    let mut per_key: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for p in &first {
        per_key.entry(key_of[p]).or_default().push(*p);
    }
    for (key, positions) in &per_key {
        assert!(positions.is_sorted(), "{key} out of order: {positions:?}");
    }
    assert_eq!(per_key.len(), 40 + 6);
    // Keys went in parallel: some event arrived before an earlier event of another key.
    assert!(!first.is_sorted(), "four emitters interleave keys");

    let failures = |f: fn(&Answer) -> bool| got.iter().filter(|x| f(&x.answer)).count();
    let (errors, hangs, closes) = (
        failures(|a| matches!(a, Answer::Respond { status: 500, .. })),
        failures(|a| matches!(a, Answer::Hang(_))),
        failures(|a| matches!(a, Answer::Close)),
    );
    assert!(errors > 0 && hangs > 0 && closes > 0, "{errors} 500s, {hangs} hangs, {closes} closes");
    let repeats = delivered(&got).len() - want.len();
    eprintln!(
        "{} events, {} requests: {errors} 500s, {hangs} hangs, {closes} closes, {repeats} \
         acknowledged repeats",
        want.len(),
        got.len()
    );

    // Counted once each, in the checkpoint's transaction.
    let sub = wait_subscription(&pool, "chaos", "every delivery counted", |s| {
        s.deliveries.as_ref().is_some_and(|d| d.delivered >= want.len() as i64)
    })
    .await;
    let d = sub.deliveries.unwrap();
    assert_eq!(d.delivered, want.len() as i64, "{d:?}");
    assert!(d.retries > 0, "{d:?}");
    assert!(d.last_error.is_some_and(|e| e.contains(&rx.url("/hooks"))));
}

/// (b) The signature of a captured request verifies with an independent implementation:
/// Python's hmac, hashlib and base64 over the exact bytes received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_request_verifies_with_pythons_hmac() {
    let (db, pool) = setup("hook_python").await;
    let secret = Secrets::generate();
    let rx = Receiver::always(Answer::ok()).await;
    subscribe(&pool, "py", &rx.url("/hooks"), 1, false, |_| {}).await;
    let _run = run_with_secret(&db, &secret);
    insert(&pool, 1, 2).await;
    let got = rx.wait_for("two deliveries", Duration::from_secs(30), |x| x.len() >= 2).await;

    const VERIFY: &str = r#"
import base64, hashlib, hmac, sys
secret, msg_id, ts, header, path = sys.argv[1:]
key = base64.b64decode(secret[len("whsec_"):])
body = open(path, "rb").read()
mac = hmac.new(key, msg_id.encode() + b"." + ts.encode() + b"." + body, hashlib.sha256)
expected = "v1," + base64.b64encode(mac.digest()).decode()
ok = any(hmac.compare_digest(expected, s) for s in header.split(" "))
print("valid" if ok else "invalid")
sys.exit(0 if ok else 1)
"#;
    let dir = tempfile::tempdir().unwrap();
    for x in &got {
        let r = &x.request;
        let body = dir.path().join("body");
        let python = |body_bytes: &[u8]| {
            std::fs::write(&body, body_bytes).unwrap();
            let out = Command::new("python3")
                .args(["-c", VERIFY, &secret])
                .args([
                    r.header("webhook-id").unwrap(),
                    r.header("webhook-timestamp").unwrap(),
                    r.header("webhook-signature").unwrap(),
                ])
                .arg(&body)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        assert_eq!(python(&r.body), "valid", "{:?}", r.header("webhook-id"));
        let mut tampered = r.body.to_vec();
        tampered.push(b' ');
        assert_eq!(python(&tampered), "invalid", "a changed body does not verify");
    }
}

/// (c) `410 Gone` stops the subscription with the reason in its status; nothing after the
/// event is delivered; `start` goes on from that event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_stops_the_subscription_and_start_continues_from_the_event() {
    let (db, pool) = setup("hook_gone").await;
    let secret = Secrets::generate();
    let gone = Arc::new(Mutex::new(true));
    let rx = Receiver::start({
        let gone = gone.clone();
        move |r| {
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            if body["position"].as_i64() == Some(4) && *gone.lock().unwrap() {
                Answer::status(410).body("this endpoint was removed")
            } else {
                Answer::ok()
            }
        }
    })
    .await;
    let url = rx.url("/hooks");
    subscribe(&pool, "gone", &url, 1, false, |_| {}).await;
    let _run = run_with_secret(&db, &secret);
    insert(&pool, 1, 6).await;

    let sub = wait_subscription(&pool, "gone", "the subscription stopped", |s| {
        serde_json::to_value(s.state).unwrap() == "stopped"
    })
    .await;
    let reason = sub.stopped_reason.expect("a stopped_reason");
    assert!(reason.contains(&format!("webhook {url} answered 410 Gone")), "{reason}");
    assert!(reason.contains("start the subscription again"), "{reason}");
    // Give a stray delivery time to show up: none may.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let at_stop = rx.exchanges();
    // (A group that fails is retried one event at a time, so 1..3 may come twice before the
    // 410 comes again; ids make that harmless.)
    assert!(at_stop.iter().all(|x| position(x) <= 4), "nothing after the 410: {at_stop:?}");
    let last = at_stop.last().unwrap();
    assert_eq!(position(last), 4);
    assert_eq!(last.answer, Answer::status(410).body("this endpoint was removed"));
    let ok: BTreeSet<i64> = delivered(&at_stop).into_iter().collect();
    assert_eq!(ok, BTreeSet::from([1, 2, 3]));

    *gone.lock().unwrap() = false;
    let sub = subscriptions::start(&pool, "gone").await.unwrap();
    assert!(sub.stopped_reason.is_none(), "{:?}", sub.stopped_reason);
    let n = at_stop.len();
    let got =
        rx.wait_for("4, 5, 6 after the start", Duration::from_secs(30), |x| x.len() >= n + 3).await;
    let after: Vec<i64> = got[n..].iter().map(position).collect();
    assert_eq!(after, [4, 5, 6], "from the stopped-on event, in order, once each");
    assert!(got[n..].iter().all(|x| x.answer.is_success()));
}

/// (d) `Retry-After: 2` makes the next attempt wait two seconds (measured at the receiver),
/// though the subscription's own backoff is 20 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_delays_the_next_attempt() {
    let (db, pool) = setup("hook_retry_after").await;
    let secret = Secrets::generate();
    let answered = Arc::new(AtomicU64::new(0));
    let rx = Receiver::start({
        let answered = answered.clone();
        move |_| {
            if answered.fetch_add(1, Ordering::SeqCst) == 0 {
                Answer::status(503).header("retry-after", "2")
            } else {
                Answer::ok()
            }
        }
    })
    .await;
    subscribe(&pool, "later", &rx.url("/hooks"), 1, false, |_| {}).await;
    let _run = run_with_secret(&db, &secret);
    insert(&pool, 1, 1).await;
    let got = rx.wait_for("the retry", Duration::from_secs(30), |x| x.len() >= 2).await;
    let gap = got[1].request.at - got[0].request.at;
    assert!(gap >= Duration::from_secs(2), "retried after {gap:?}");
    assert!(gap < Duration::from_secs(6), "retried after {gap:?}");
    assert_eq!((position(&got[0]), position(&got[1])), (1, 1));
    assert!(got[1].answer.is_success());
}

/// (e) A `[[subscriptions]]` webhook sink this process cannot deliver stops `weir run` at
/// start-up: a non-zero exit and one line naming the subscription and the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_weir_run_cannot_deliver_is_refused_at_start_with_one_line() {
    let (db, _pool) = setup("hook_bad").await;
    let dir = tempfile::tempdir().unwrap();
    let short = format!("whsec_{}", "QUJD".repeat(4)); // 12 bytes
    let good = Secrets::generate();
    for (url, secret, says) in [
        ("http://127.0.0.1:9/h", None, &["HOOK_SECRET", "is not set", "weir webhooks secret"][..]),
        ("http://127.0.0.1:9/h", Some(short.as_str()), &["HOOK_SECRET", "12 bytes", "24 to 64"]),
        ("ftp://127.0.0.1/h", Some(good.as_str()), &["ftp", "http://"]),
    ] {
        let cfg = dir.path().join("weir.toml");
        std::fs::write(
            &cfg,
            format!(
                "[[subscriptions]]\nname = \"hooks\"\ntype = \"entity\"\nselector = \"t\"\n\
                 [subscriptions.sink]\ntype = \"webhook\"\nurl = \"{url}\"\n\
                 secret_env = \"HOOK_SECRET\"\n"
            ),
        )
        .unwrap();
        let mut cmd = weir(&db, &["run", "--config", cfg.to_str().unwrap()]);
        cmd.env_remove("HOOK_SECRET");
        if let Some(s) = secret {
            cmd.env("HOOK_SECRET", s);
        }
        let started = Instant::now();
        let (ok, out) = output(cmd);
        assert!(!ok, "{url}: weir run must refuse it: {out}");
        assert!(started.elapsed() < Duration::from_secs(30));
        let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("weir: error:")).collect();
        assert_eq!(errors.len(), 1, "one line: {out}");
        let line = errors[0];
        assert!(line.contains("subscription `hooks`"), "{line}");
        for s in says {
            assert!(line.contains(s), "{line} should say {s}");
        }
        if let Some(s) = secret {
            assert!(!out.contains(s), "the secret is never printed: {out}");
        }
        eprintln!("{line}");
    }
}
