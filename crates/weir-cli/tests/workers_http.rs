//! `type = "http"` workers end to end: the real `weir run` with `[[workers]]` in its weir.toml,
//! POSTing jobs to a real HTTP receiver in this test process.
//!
//! ```text
//! select weir.enqueue(...) ─► weir.jobs ─► weir run: claim ─► POST http://127.0.0.1:<port>/<kind>
//!   ─► Receiver (records the request, answers as the test says) ─► the job's state and errors
//!      in weir.jobs / weir.job_history
//! ```
//!
//! Each test checks what the receiver saw (the body, the headers, the signature — recomputed
//! here with hmac/sha2, not with weir's code) and what became of the job in the database, not
//! what weir says it did.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{KeyInit, Mac};
use serde_json::{Value, json};
use sqlx::PgPool;
use weir_testkit::TestDatabase;
use weir_testkit::receiver::{Answer, Exchange, Receiver};

mod support;
use support::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// `[jobs]` fast enough for a test: the default queue, short polls.
const JOBS: &str = r#"
[jobs]
poll_interval = "100ms"
[jobs.queues]
default = 8
"#;

/// A weir.toml of `jobs` and one http `[[workers]]` entry per (kind, url, extra lines).
fn weir_toml(dir: &Path, jobs: &str, workers: &[(&str, String, &str)]) -> PathBuf {
    let mut text = jobs.to_string();
    for (kind, url, extra) in workers {
        text.push_str(&format!(
            "\n[[workers]]\nkind = \"{kind}\"\ntype = \"http\"\nurl = \"{url}\"\n\
             backoff = {{ first = \"100ms\", max = \"100ms\", multiplier = 1.0 }}\n{extra}\n"
        ));
    }
    let path = dir.join("weir.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `weir run --config <toml>`, its stderr in `<dir>/weir.log`.
fn run(db: &TestDatabase<'_>, toml: &Path, env: &[(&str, &str)]) -> Proc {
    let log = std::fs::File::create(toml.with_file_name("weir.log")).unwrap();
    let mut cmd = weir(db, &["run", "--config", toml.to_str().unwrap()]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc(cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap())
}

/// The end of weir's log, for failure messages.
fn log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("weir.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

async fn enqueue(pool: &PgPool, kind: &str, args: Value) -> i64 {
    sqlx::query_scalar("select weir.enqueue('default', $1, $2, max_attempts => 50)")
        .bind(kind)
        .bind(args)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A job as the database has it.
#[derive(Debug)]
struct Job {
    state: String,
    attempt: i32,
    /// The `error` of each failed attempt, in order.
    errors: Vec<String>,
}

async fn job(pool: &PgPool, id: i64) -> Job {
    let (state, attempt, errors): (String, i32, Value) =
        sqlx::query_as("select state::text, attempt, errors from weir.all_jobs where id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap();
    let errors = errors
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["error"].as_str().unwrap_or_default().to_string())
        .collect();
    Job { state, attempt, errors }
}

/// Polls job `id` until `done` holds (at most [`DEADLINE`]).
async fn wait_job(
    pool: &PgPool,
    dir: &Path,
    id: i64,
    what: &str,
    done: impl Fn(&Job) -> bool,
) -> Job {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let j = job(pool, id).await;
        if done(&j) {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for job {id}: {what}; it is {j:?}; weir's log:\n{}",
            log_tail(dir)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The requests that reached `path`.
fn at<'a>(exchanges: &'a [Exchange], path: &str) -> Vec<&'a Exchange> {
    exchanges.iter().filter(|x| x.request.path == path).collect()
}

/// Checks a Standard Webhooks signature by hand: HMAC-SHA256 with the secret's bytes over
/// `<webhook-id>.<webhook-timestamp>.<body>`, base64, after `v1,`.
fn assert_signed(x: &Exchange, secret: &str) {
    let r = &x.request;
    let id = r.header("webhook-id").expect("webhook-id");
    let ts = r.header("webhook-timestamp").expect("webhook-timestamp");
    let key = STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&r.body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    assert_eq!(r.header("webhook-signature"), Some(expected.as_str()), "signature of {id}");
    let age = chrono::Utc::now().timestamp() - ts.parse::<i64>().unwrap();
    assert!((0..60).contains(&age), "webhook-timestamp {ts} is {age}s old");
}

/// Answers in order per path: the n-th request to a path gets its n-th answer (the last one
/// again after that).
fn scripted(
    answers: Vec<(&'static str, Vec<Answer>)>,
) -> impl FnMut(&weir_testkit::receiver::Request) -> Answer {
    let answers: HashMap<&str, Vec<Answer>> = answers.into_iter().collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    move |req| {
        let n = seen.entry(req.path.clone()).or_default();
        let list = answers.get(req.path.as_str()).expect("a scripted path");
        let answer = list[(*n).min(list.len() - 1)].clone();
        *n += 1;
        answer
    }
}

/// 2xx completes (signed, with the entry's headers, the job document as body); 500 then 200
/// retries then completes; 409 retries; 400 and `{"discard": …}` discard at once with the
/// reason; `{"snooze": "1s"}` and `Retry-After: 1` (on a 503) run the job again a second later
/// without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_complete_retry_discard_and_snooze() {
    let (db, pool) = setup("workers_http_answers").await;
    let dir = tempfile::tempdir().unwrap();
    let secret = weir_sinks::Secrets::generate();
    let rx = Receiver::start(scripted(vec![
        ("/ok", vec![Answer::ok().body("thanks")]),
        ("/flaky", vec![Answer::status(500).body("boom\n  at line 3"), Answer::ok()]),
        ("/busy", vec![Answer::status(409).body("locked"), Answer::status(204)]),
        ("/refuse", vec![Answer::status(400).body("no such user")]),
        ("/discard", vec![Answer::ok().body(r#"{"discard": "user gone"}"#)]),
        ("/snooze", vec![Answer::ok().body(r#"{"snooze": "1s"}"#), Answer::ok()]),
        ("/later", vec![Answer::status(503).header("retry-after", "1"), Answer::ok()]),
    ]))
    .await;
    let signed = format!("secret = \"{secret}\"\nheaders = {{ authorization = \"Bearer app\" }}");
    let kinds = ["ok", "flaky", "busy", "refuse", "discard", "snooze", "later"];
    let workers: Vec<(&str, String, &str)> = kinds
        .iter()
        .map(|k| (*k, rx.url(&format!("/{k}")), if *k == "ok" { signed.as_str() } else { "" }))
        .collect();
    let toml = weir_toml(dir.path(), JOBS, &workers);
    let _weir = run(&db, &toml, &[]);
    let mut ids = HashMap::new();
    for k in kinds {
        ids.insert(k, enqueue(&pool, k, json!({"user": 42, "kind": k})).await);
    }
    let wait = |k: &'static str, state: &'static str| {
        let (pool, dir, id) = (pool.clone(), dir.path().to_path_buf(), ids[k]);
        async move { wait_job(&pool, &dir, id, state, |j| j.state == state).await }
    };

    let ok = wait("ok", "completed").await;
    assert_eq!((ok.attempt, ok.errors.len()), (1, 0), "{ok:?}");
    let x = rx.exchanges();
    let [sent] = at(&x, "/ok")[..] else { panic!("one request to /ok: {x:?}") };
    assert_signed(sent, &secret);
    let r = &sent.request;
    assert_eq!(r.method, "POST");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("authorization"), Some("Bearer app"));
    assert_eq!(r.header("webhook-id"), Some(format!("{}-1", ids["ok"]).as_str()));
    let doc: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(doc["id"], json!(ids["ok"]));
    assert_eq!(doc["kind"], "ok");
    assert_eq!(doc["queue"], "default");
    assert_eq!(doc["args"], json!({"user": 42, "kind": "ok"}));
    assert_eq!((doc["attempt"].as_i64(), doc["max_attempts"].as_i64()), (Some(1), Some(50)));
    assert!(doc["enqueued_at"].as_str().is_some_and(|s| s.contains('T')), "{doc}");
    let flaky = wait("flaky", "completed").await;
    let url = rx.url("/flaky");
    assert_eq!(flaky.attempt, 2, "{flaky:?}");
    assert_eq!(flaky.errors, [format!("HTTP 500 from {url}: boom at line 3")]);
    let x = rx.exchanges();
    let tries = at(&x, "/flaky");
    assert_eq!(tries.len(), 2);
    assert_eq!(tries[0].request.header("webhook-signature"), None, "unsigned without a secret");
    let id = ids["flaky"];
    let hook_ids: Vec<_> = tries.iter().map(|t| t.request.header("webhook-id").unwrap()).collect();
    assert_eq!(hook_ids, [format!("{id}-1"), format!("{id}-2")], "a new id per attempt");

    let busy = wait("busy", "completed").await;
    assert_eq!(busy.errors, [format!("HTTP 409 from {}: locked", rx.url("/busy"))]);

    let refuse = wait("refuse", "discarded").await;
    assert_eq!(refuse.attempt, 1);
    assert_eq!(refuse.errors, [format!("HTTP 400 from {}: no such user", rx.url("/refuse"))]);
    let discard = wait("discard", "discarded").await;
    assert_eq!(discard.attempt, 1);
    assert_eq!(discard.errors, [format!("{} discarded the job: user gone", rx.url("/discard"))]);

    for k in ["snooze", "later"] {
        let j = wait(k, "completed").await;
        assert!(j.errors.is_empty(), "a snooze is no error: {j:?}");
        let x = rx.exchanges();
        let tries = at(&x, &format!("/{k}"));
        assert_eq!(tries.len(), 2, "{k}: {tries:?}");
        let gap = tries[1].request.at - tries[0].request.at;
        println!("{k}: snoozed 1s, ran again after {gap:?}");
        assert!(gap >= Duration::from_millis(950), "{k} ran again after {gap:?}");
    }
    assert_eq!(at(&rx.exchanges(), "/refuse").len(), 1, "a discarded job is not retried");
}

/// A receiver that hangs past the timeout, closes the connection, answers something that is
/// not HTTP, or is not there: the attempt fails with that reason and the job is kept for its
/// next attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_keeps_the_job_with_the_reason() {
    let (db, pool) = setup("workers_http_failures").await;
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(scripted(vec![
        ("/hang", vec![Answer::Hang(Duration::from_secs(30))]),
        ("/close", vec![Answer::Close]),
    ]))
    .await;
    let garbage = garbage_server().await;
    let nobody = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let toml = weir_toml(
        dir.path(),
        JOBS,
        &[
            ("hang", rx.url("/hang"), "timeout = \"1s\""),
            ("close", rx.url("/close"), ""),
            ("garbage", format!("http://{garbage}/jobs"), ""),
            ("nobody", format!("http://{nobody}/jobs"), ""),
        ],
    );
    let _weir = run(&db, &toml, &[]);
    let expect = [
        ("hang", "timed out after 1s".to_string()),
        (
            "close",
            format!(
                "POST {}: the receiver closed the connection without answering",
                rx.url("/close")
            ),
        ),
        ("garbage", format!("POST http://{garbage}/jobs: the receiver's answer is not HTTP/1.1")),
        ("nobody", format!("POST http://{nobody}/jobs: the connection was refused")),
    ];
    let mut ids = Vec::new();
    for (kind, _) in &expect {
        ids.push(enqueue(&pool, kind, json!({})).await);
    }
    for ((kind, reason), id) in expect.iter().zip(ids) {
        let j =
            wait_job(&pool, dir.path(), id, "two failed attempts", |j| j.errors.len() >= 2).await;
        println!("{kind}: {:?}", j.errors[0]);
        assert!(j.errors.iter().all(|e| e.starts_with(reason.as_str())), "{kind}: {j:?}");
        assert!(
            ["running", "retryable", "available"].contains(&j.state.as_str()),
            "{kind}: the job is kept: {j:?}"
        );
    }
    let hangs = at(&rx.exchanges(), "/hang").len();
    assert!(hangs >= 2, "the hanging receiver got {hangs} requests");
}

/// A TCP server that answers every request with a line that is not HTTP, then closes.
async fn garbage_server() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut read = Vec::new();
                while !read.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => read.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.6 hello\r\n\r\n").await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// A job whose request is held (until the test releases it) for longer than `rescue_after` is
/// not rescued: its process
/// heartbeats for it (a job of a process that is gone, inserted alongside, is rescued
/// meanwhile — so the rescuer did run). While it is held, `POST /v1/jobs/{id}/heartbeat`
/// answers 200 for its attempt and 409 for another; after it completed, 409; an unknown job,
/// 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_outlives_rescue_after_and_the_heartbeat_route_answers() {
    const TOKEN: &str = "workers-http-test-token-0123456789";
    let (db, pool) = setup("workers_http_held").await;
    let dir = tempfile::tempdir().unwrap();
    let (held_at, mut arrivals, release) = held_server().await;
    let jobs = JOBS.replace(
        "poll_interval = \"100ms\"",
        "poll_interval = \"100ms\"\nheartbeat_interval = \"200ms\"\nrescue_after = \"1s\"",
    );
    let toml = weir_toml(
        dir.path(),
        &jobs,
        &[("held", format!("http://{held_at}/held"), "timeout = \"60s\"")],
    );
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let bind = format!("127.0.0.1:{port}");
    let _weir = run(&db, &toml, &[("WEIR_HTTP_BIND", &bind), ("WEIR_HTTP_TOKEN", TOKEN)]);
    let id = enqueue(&pool, "held", json!({"long": true})).await;
    let held_since = tokio::time::timeout(DEADLINE, arrivals.recv())
        .await
        .expect("the held request within the deadline")
        .unwrap();
    // While the request is held: a running job of a process that is gone, for the rescuer.
    let ghost: i64 = sqlx::query_scalar(
        "insert into weir.jobs (state, queue, kind, attempt, attempted_at, attempted_by)
         values ('running', 'default', 'nobody', 1, now(), 'gone-process') returning id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let ghost =
        wait_job(&pool, dir.path(), ghost, "the ghost rescued", |j| !j.errors.is_empty()).await;
    assert!(ghost.errors[0].contains("stopped heartbeating"), "{ghost:?}");
    let http = reqwest::Client::new();
    let beat = |path: String| {
        let http = http.clone();
        let url = format!("http://{bind}{path}");
        async move {
            let deadline = Instant::now() + DEADLINE;
            loop {
                match http
                    .post(&url)
                    .header("authorization", format!("Bearer {TOKEN}"))
                    .send()
                    .await
                {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
                        return (status, body);
                    }
                    Err(e) => {
                        assert!(Instant::now() < deadline, "weir's HTTP API did not answer: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    };
    let (status, alive) = beat(format!("/v1/jobs/{id}/heartbeat?attempt=1")).await;
    assert_eq!(status, 200, "{alive}");
    assert_eq!((alive["state"].as_str(), alive["attempt"].as_i64()), (Some("running"), Some(1)));
    assert!(alive["attempted_by"].as_str().is_some(), "{alive}");
    let (status, other) = beat(format!("/v1/jobs/{id}/heartbeat?attempt=2")).await;
    assert_eq!(status, 409, "{other}");
    assert!(other["message"].as_str().unwrap().contains("runs attempt 1, not 2"), "{other}");
    // Held for three times rescue_after, then still running in its first attempt.
    tokio::time::sleep_until((held_since + Duration::from_secs(3)).into()).await;
    let still = job(&pool, id).await;
    let held = held_since.elapsed();
    assert_eq!((still.state.as_str(), still.attempt), ("running", 1), "held {held:?}: {still:?}");
    println!("held for {held:?} (rescue_after 1s): still running, attempt 1");

    release.send(true).unwrap();
    let done = wait_job(&pool, dir.path(), id, "completed", |j| j.state == "completed").await;
    assert_eq!((done.attempt, done.errors.len()), (1, 0), "never rescued: {done:?}");
    assert!(arrivals.try_recv().is_err(), "one request, never repeated");
    let (status, finished) = beat(format!("/v1/jobs/{id}/heartbeat")).await;
    assert_eq!(status, 409, "{finished}");
    assert!(
        finished["message"].as_str().unwrap().contains("is completed, not running"),
        "{finished}"
    );
    let (status, unknown) = beat("/v1/jobs/987654321/heartbeat".into()).await;
    assert_eq!(status, 404, "{unknown}");
}

/// A receiver that holds each request until `release` is set, then answers 200; each
/// request's arrival time is sent on the channel.
async fn held_server() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Instant>,
    tokio::sync::watch::Sender<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived, arrivals) = tokio::sync::mpsc::unbounded_channel();
    let (release, released) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            let (arrived, mut released) = (arrived.clone(), released.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut read = Vec::new();
                while !read.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => read.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = arrived.send(Instant::now());
                let _ = released.wait_for(|r| *r).await;
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                let _ = stream.write_all(answer).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, arrivals, release)
}

/// `weir run` refuses a bad entry at start-up, naming it and its line: a URL that is not http,
/// a secret that is not `whsec_` + base64 of 24 to 64 bytes, a header weir sets itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_entries_are_refused_at_start_up() {
    let (db, _pool) = setup("workers_http_refused").await;
    let dir = tempfile::tempdir().unwrap();
    let short = format!("whsec_{}", STANDARD.encode([7u8; 16]));
    let cases = [
        ("url = \"ftp://example.com/jobs\"", "needs an http:// or https:// `url`"),
        ("secret = \"hunter2\"", "secret 1 does not start with `whsec_`"),
        (&format!("secret = \"{short}\"")[..], "secret 1 is 16 bytes"),
        ("headers = { webhook-id = \"mine\" }", "header `webhook-id` is set by weir"),
    ];
    for (line, expected) in cases {
        // The entry starts on line 7: JOBS is 5 lines, then a blank one.
        let url = if line.starts_with("url") { "" } else { "url = \"http://127.0.0.1:9/jobs\"\n" };
        let text = format!("{JOBS}\n[[workers]]\nkind = \"mail\"\ntype = \"http\"\n{url}{line}\n");
        let toml = dir.path().join("weir.toml");
        std::fs::write(&toml, &text).unwrap();
        let mut cmd = weir(&db, &["run", "--config", toml.to_str().unwrap()]);
        let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let (ok, text) = wait_exit(child, DEADLINE);
        assert!(!ok, "weir run started with `{line}`: {text}");
        assert!(text.contains(expected), "`{line}`: {text}");
        assert!(text.contains("\"mail\" (line 7)"), "`{line}` names the entry and line: {text}");
        assert!(!text.contains("hunter2"), "the secret is never printed: {text}");
    }
}

/// Waits for `child` to exit (killing it after `timeout`): whether it succeeded, and its output.
fn wait_exit(mut child: std::process::Child, timeout: Duration) -> (bool, String) {
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}
