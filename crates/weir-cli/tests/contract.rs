//! The HTTP API against its own contract: schemathesis (Python's property-based API tester)
//! reads `/v1/openapi.json` from a real `weir run` on a private PostgreSQL and sends every
//! operation generated requests, valid and invalid, checking each answer: no 5xx, a documented
//! status, a documented content type, a body matching the documented schema, and the rest of
//! its `--checks all`. The database holds real objects first (rows and their events, operators
//! with a halted and a parked event, a stream with a snapshot, jobs, a subscription, a
//! backfill), so the lists and the known names answer with data, not only empty lists.
//!
//! ```text
//! posts, comments ─WAL─► weir run ─► /v1/… ◄── schemathesis run <url>/v1/openapi.json
//!   (rows, an operator halted, one parked)          --checks all -n N (report on failure)
//! ```
//!
//! schemathesis comes from PyPI: `pip install schemathesis==4.32.5 hypothesis==6.160.0` under
//! CPython 3.12.2 or later (`.ci/run` makes that venv in `~/.cache/weir-schemathesis`, which this
//! test finds; hypothesis 6.170.17 crashes inside schemathesis's generation for POST /v1/jobs,
//! and CPython 3.11.7's `ast.parse` inside hypothesis now and then), or set `WEIR_SCHEMATHESIS`
//! to its executable. docs/contract.md says what runs and what it found.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Proc, weir};

/// The bearer token of the `weir run` under test.
const TOKEN: &str = "contract-test-token-0123456789";

/// The schemathesis release this test is written against (its options and report).
const SCHEMATHESIS: &str = "4.32.5";

/// Test cases per operation and phase: enough to reach every documented answer of the
/// operations here, small enough that the whole run stays under about two minutes on two cores.
const MAX_EXAMPLES: &str = "30";

/// Tables, with rows before capture starts.
const SCHEMA: &str = "
    create table posts (id serial primary key, title text not null, body text not null default '');
    create table comments (id serial primary key, post_id int not null, body text not null);
    create table post_titles (id int primary key, title text not null);
    create table comment_log (id int primary key, body text not null);
    insert into posts (title) select 'old ' || g from generate_series(1, 20) g;";

/// `post_titles` halts on a post titled `poison`, `comment_log` parks a comment `bad`.
/// `max_wait` is short so that generated long-polls end quickly.
const CONFIG: &str = r#"[source]
tables = ["posts", "comments"]

[http]
max_wait = "2s"

[jobs]
poll_interval = "100ms"

[consumers.retry]
min_restart_time = "50ms"
max_retries = 1

[[operators]]
name = "post_titles"
entities = ["posts"]
sql = """
insert into post_titles (id, title)
select p.id, p.title from posts p
 where p.id = $1 and 1 / (case when p.title = 'poison' then 0 else 1 end) = 1
on conflict (id) do update set title = excluded.title
"""

[[operators]]
name = "comment_log"
entities = ["comments"]
on_exhausted = "park"
sql = """
insert into comment_log (id, body)
select c.id, c.body from comments c
 where c.id = $1 and 1 / (case when c.body = 'bad' then 0 else 1 end) = 1
on conflict (id) do update set body = excluded.body
"""

[[periodic]]
name = "nightly_report"
cron = "0 3 * * *"
timezone = "Europe/Paris"
kind = "report"
"#;

/// schemathesis.toml: every check runs on every operation (its default; `--checks` on the
/// command line would override the exclusions below), except `positive_data_acceptance` where
/// a schema-valid request is refused for a reason JSON Schema cannot say. That check expects a
/// 2xx for any request the schema admits; each exclusion names why these operations may
/// answer a documented 400 to one. Every other check still runs on them.
const SCHEMATHESIS_TOML: &str = r#"
# Event streams end only when the client goes: read at most two events, give up on a quiet one
# (a channel nobody writes to sends keep-alives only) after 2 s, and send fewer requests.
[[operations]]
include-path-regex = "/sse$|/live$"
max-stream-events = 2
request-timeout = 2
generation.max-examples = 5

# WebSocket handshakes: schemathesis sends plain HTTP requests, which these routes refuse with
# their documented 400 ("needs a WebSocket upgrade request").
[[operations]]
include-path-regex = "/ws$"
checks.positive_data_acceptance.enabled = false

# Channel names have a grammar (`<entity>`, `<entity>/<id>`, `<parent>/<value>/<entity>`,
# comma-separated) that the parameter's schema does not encode.
[[operations]]
include-path = "/v1/channels/sse"
checks.positive_data_acceptance.enabled = false

# Which write to check comes from one of two query parameters or two headers (none given is a
# 400), each with its own grammar (`posts/1422057007123000`, `0/16B3748`).
[[operations]]
include-path = ["/v1/process/check", "/v1/process/wait"]
checks.positive_data_acceptance.enabled = false

# Refusals that depend on the data: a table must be watched and have a primary key; a snapshot's
# version and a truncation's `before` must be within the stream's versions; a selector must
# fit the subscription's type and a sink's URL and environment variables must resolve; an ack's
# token must be one an attached client was given.
[[operations]]
include-path = [
    "/v1/backfills",
    "/v1/streams/{stream}/snapshot",
    "/v1/streams/{stream}/truncate",
    "/v1/subscriptions",
    "/v1/subscriptions/{name}",
    "/v1/subscriptions/{name}/ack",
]
include-method = ["POST", "PUT", "PATCH"]
checks.positive_data_acceptance.enabled = false
"#;

#[tokio::test]
async fn the_api_answers_as_its_openapi_document_says() {
    let schemathesis = schemathesis();
    let db = weir_testkit::shared().database("contract").unwrap();
    db.psql(SCHEMA).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("weir.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let mut init = weir(&db, &["init"]);
    init.arg("--config").arg(&config);
    let (ok, out) = support::output(init);
    assert!(ok, "weir init failed: {out}");

    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let log_path = dir.path().join("weir.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut run = weir(&db, &["run"]);
    run.arg("--config")
        .arg(&config)
        .env("WEIR_HTTP_BIND", &addr)
        .env("WEIR_HTTP_TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let _run = Proc(run.spawn().unwrap());
    let logs = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let api = Api { base: format!("http://{addr}"), http: reqwest::Client::new() };
    weir_testkit::eventually("weir run answers", Duration::from_secs(30), || async {
        api.http.get(api.url("/v1/ready")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;

    let pool = sqlx::PgPool::connect(&db.url()).await.unwrap();
    fill(&api, &pool).await;

    // Kept after the run (JUnit, per operation), for CI to publish.
    let report = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("schemathesis-report");
    let started = Instant::now();
    std::fs::write(dir.path().join("schemathesis.toml"), SCHEMATHESIS_TOML).unwrap();
    let out = Command::new(&schemathesis)
        .arg("--config-file")
        .arg(dir.path().join("schemathesis.toml"))
        .arg("run")
        .arg(api.url("/v1/openapi.json"))
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--seed", "7"])
        .args(["--workers", "2"])
        .args(["--request-timeout", "10"])
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .args(["--no-color", "--output-truncate", "false"])
        .arg("--report-dir")
        .arg(&report)
        .args(["--report", "junit"])
        .args(["--generation-database", "none"])
        .current_dir(dir.path())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", schemathesis.display()));
    let took = started.elapsed();
    let printed =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("schemathesis took {took:?}:\n{printed}");
    // The report goes in the failure itself, before weir's log (only what it warned of and the
    // last lines): CI shows a failing test's message, and the log of thousands of refused
    // requests would push the report out of what it shows.
    assert!(
        out.status.success(),
        "schemathesis found answers that break the contract:\n{}\n\nweir's log, warnings and the \
         last 40 lines:\n{}",
        tail(&printed, 200),
        weir_log_excerpt(&logs())
    );
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What weir warned of or failed with, then its last 40 lines.
fn weir_log_excerpt(log: &str) -> String {
    let warned: Vec<&str> =
        log.lines().filter(|l| l.contains(" WARN") || l.contains(" ERROR")).take(50).collect();
    format!("{}\n…\n{}", warned.join("\n"), tail(log, 40))
}

/// The schemathesis executable: `WEIR_SCHEMATHESIS`, else the venv `.ci/run` makes
/// (`~/.cache/weir-schemathesis`), else `schemathesis` on `PATH`, at [`SCHEMATHESIS`].
/// Missing is a failure that says how to install it, never a skip.
fn schemathesis() -> PathBuf {
    let venv = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cache/weir-schemathesis/bin/schemathesis"))
        .filter(|p| p.exists());
    let program = std::env::var_os("WEIR_SCHEMATHESIS")
        .map(PathBuf::from)
        .or(venv)
        .unwrap_or_else(|| "schemathesis".into());
    let how = format!(
        "install it with `pip install schemathesis=={SCHEMATHESIS} hypothesis==6.160.0` under \
         CPython 3.12.2 or later (3.11.7's ast.parse breaks hypothesis now and then; .ci/run \
         makes such a venv in ~/.cache/weir-schemathesis), or set WEIR_SCHEMATHESIS to its \
         executable"
    );
    let version = match Command::new(&program).arg("--version").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        Ok(out) => panic!(
            "`{} --version` failed ({}): {}; {how}",
            program.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!("schemathesis is not installed (`{}`: {e}); {how}", program.display()),
    };
    if !version.contains(SCHEMATHESIS) {
        eprintln!(
            "warning: this test is written for schemathesis {SCHEMATHESIS}, found {}",
            version.trim()
        );
    }
    program
}

/// The running API.
struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends `body` to `path` with the token; the answer's JSON, after checking its status.
    async fn send(&self, method: reqwest::Method, path: &str, body: Value, status: u16) -> Value {
        let r = self
            .http
            .request(method.clone(), self.url(path))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let got = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(got, status, "{method} {path}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    async fn get(&self, path: &str) -> Value {
        let text = self.http.get(self.url(path)).send().await.unwrap().text().await.unwrap();
        serde_json::from_str(&text).unwrap()
    }
}

/// Real objects for every part of the API: events from rows, a halted operator and a parked
/// event, a stream with a snapshot, jobs (one failed), a subscription, a backfill.
async fn fill(api: &Api, pool: &sqlx::PgPool) {
    use reqwest::Method;
    let sql = |s: &'static str| async move { sqlx::raw_sql(s).execute(pool).await.unwrap() };
    sql("insert into posts (title) values ('new'), ('poison');
         insert into comments (post_id, body) values (1, 'fine'), (2, 'bad');
         update posts set body = 'edited' where id = 1;
         delete from posts where id = 2;")
    .await;

    api.send(
        Method::POST,
        "/v1/streams/order-1",
        json!({"expected_version": "no_stream", "events": [
            {"type": "order.placed", "data": {"total": 42}, "tags": ["vip"]},
            {"type": "order.paid", "data": {"total": 42}}]}),
        201,
    )
    .await;
    api.send(
        Method::POST,
        "/v1/streams/order-2",
        json!({"events": [{"type": "order.placed", "data": {}}]}),
        201,
    )
    .await;
    api.send(
        Method::PUT,
        "/v1/streams/order-1/snapshot",
        json!({"version": 1, "data": {"total": 42}}),
        200,
    )
    .await;

    let later = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    api.send(
        Method::POST,
        "/v1/jobs",
        json!({"kind": "report", "args": {"day": "2026-12-01"}, "scheduled_at": later,
               "unique_key": "report-2026-12-01"}),
        201,
    )
    .await;
    let cancelled =
        api.send(Method::POST, "/v1/jobs", json!({"kind": "email", "queue": "mail"}), 201).await;
    api.send(Method::POST, &format!("/v1/jobs/{}/cancel", cancelled["id"]), json!({}), 200).await;

    api.send(
        Method::POST,
        "/v1/subscriptions",
        json!({"name": "orders", "type": "stream", "selector": "order-*", "pool_size": 2,
               "options": {"on_exhausted": "park"}}),
        201,
    )
    .await;
    api.send(Method::POST, "/v1/backfills", json!({"tables": ["posts"], "chunk_size": 5}), 201)
        .await;

    // The operators have met their bad rows: one halted, one event parked.
    weir_testkit::eventually(
        "post_titles halts, comment_log parks",
        Duration::from_secs(30),
        || async {
            let consumers = api.get("/v1/consumers").await;
            let state = |name: &str| {
                consumers
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|c| c["name"] == name)
                    .map(|c| c["state"].as_str().unwrap_or_default().to_string())
            };
            let parked = api.get("/v1/parked").await;
            state("post_titles").as_deref() == Some("halted")
                && parked.as_array().is_some_and(|p| !p.is_empty())
        },
    )
    .await;
}
