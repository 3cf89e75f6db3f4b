//! The `/v1` API against a real PostgreSQL with ingestion and a consumer running: 425 then 200
//! for a write a consumer handles (over real HTTP, through the check, the long-poll and the
//! tower layer), consumers' resume and skip, the log, jobs, metrics, every bad input, and the
//! OpenAPI document checked against what the router really answers.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use weir::{Config, Event, Operator, OperatorError, Selector};
use weir_core::Secret;
use weir_server::{Server, TooEarlyLayer};
use weir_testkit::eventually;

const TOKEN: &str = "test-token-0123456789abcdef";

/// Handles `posts` into `post_seen` once `open`; fails events whose title is `poison`.
struct Gate {
    open: AtomicBool,
}

impl Operator for Gate {
    fn selector(&self) -> Selector {
        Selector { entities: vec!["posts".into()], kinds: vec![] }
    }

    async fn handle(&self, tx: &mut PgConnection, e: &Event) -> Result<(), OperatorError> {
        while !self.open.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let record = e.new_record.as_ref().or(e.old_record.as_ref());
        if record.and_then(|r| r["title"].as_str()) == Some("poison") {
            return Err(OperatorError::retry("poison title"));
        }
        sqlx::query("insert into post_seen (position) values ($1)")
            .bind(e.position)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

struct Harness {
    _db: weir_testkit::TestDatabase<'static>,
    pool: PgPool,
    gate: Arc<Gate>,
    running: Option<weir::Running>,
    router: Router,
    base: String,
    cancel: CancellationToken,
    watch: weir::process::ProcessWatch,
}

impl Harness {
    async fn start(prefix: &str, token: Option<&str>, open: bool) -> Harness {
        let db = weir_testkit::shared().database(prefix).unwrap();
        let pool = PgPool::connect(&db.url()).await.unwrap();
        sqlx::raw_sql(
            "create table posts (id int primary key, title text, updated_at timestamptz not null default now());
             create table post_seen (position bigint primary key);",
        )
        .execute(&pool)
        .await
        .unwrap();
        let mut config = Config::default();
        config.database.url = Some(Secret::new(db.url()));
        config.source.slot = db.name().to_string();
        config.source.tables = vec!["posts".into()];
        config.consumers.retry.max_retries = 0;
        config.consumers.lanes = 2;
        config.http.token = token.map(Secret::new);
        config.http.max_body_bytes = 4096;
        config.http.max_wait = Duration::from_secs(20);
        weir::setup::init(&pool, &config).await.unwrap();
        let gate = Arc::new(Gate { open: AtomicBool::new(open) });
        let running = weir::Weir::builder(config.clone())
            .pool(pool.clone())
            .consumer(weir::ConsumerSpec::new("gate", gate.clone(), &config.consumers))
            .start()
            .await
            .unwrap();
        let cancel = running.cancel_token();
        let server =
            Server::start(pool.clone(), config, running.wake(), cancel.clone()).await.unwrap();
        let router = server.router();
        let watch = server.process_watch().clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let serve_cancel = cancel.clone();
        tokio::spawn(async move { server.serve(listener, serve_cancel).await.unwrap() });
        Harness { _db: db, pool, gate, running: Some(running), router, base, cancel, watch }
    }

    /// A request through the router, without a socket.
    async fn call(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = match body {
            Some(b) => {
                req.header("content-type", "application/json").body(Body::from(b.to_string()))
            }
            None => req.body(Body::empty()),
        }
        .unwrap();
        let response = self.router.clone().oneshot(req).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value)
    }

    /// A POST with the token and a chunked body (no length declared).
    async fn post_chunked(
        &self,
        uri: &str,
        content_type: Option<&str>,
        chunks: &[&str],
    ) -> StatusCode {
        let chunks: Vec<Result<axum::body::Bytes, std::io::Error>> =
            chunks.iter().map(|c| Ok(axum::body::Bytes::copy_from_slice(c.as_bytes()))).collect();
        let mut req = Request::post(uri).header("authorization", format!("Bearer {TOKEN}"));
        if let Some(t) = content_type {
            req = req.header("content-type", t);
        }
        let req = req.body(Body::from_stream(futures::stream::iter(chunks))).unwrap();
        self.router.clone().oneshot(req).await.unwrap().status()
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call(Method::GET, uri, None, None).await
    }

    /// Inserts a post; returns its `updated_at` in µs and the WAL insert position after commit.
    async fn insert(&self, id: i32, title: &str) -> (i64, String) {
        let ts: f64 = sqlx::query_scalar(
            "insert into posts (id, title) values ($1, $2)
             returning (extract(epoch from updated_at) * 1000000)::float8",
        )
        .bind(id)
        .bind(title)
        .fetch_one(&self.pool)
        .await
        .unwrap();
        let lsn: String = sqlx::query_scalar("select pg_current_wal_insert_lsn()::text")
            .fetch_one(&self.pool)
            .await
            .unwrap();
        (ts as i64, lsn)
    }

    async fn logged(&self, n: i64) {
        eventually(&format!("{n} events logged"), Duration::from_secs(20), || async {
            let head: Option<i64> = sqlx::query_scalar("select max(position) from weir.events")
                .fetch_one(&self.pool)
                .await
                .unwrap();
            head.unwrap_or(0) >= n
        })
        .await;
    }

    async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(r) = self.running.take() {
            r.wait().await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_too_early_until_processed_then_ok() {
    let h = Harness::start("api_425", Some(TOKEN), false).await;
    let (ts, lsn) = h.insert(1, "hello").await;
    h.logged(1).await;
    let client = reqwest::Client::new();
    let check = |header: &'static str, value: String| {
        client.get(format!("{}/v1/process/check", h.base)).header(header, value).send()
    };

    // The gate holds the consumer: the write is logged but not processed.
    let r = check("X-Weir-Entity-Timestamp", format!("posts/{ts}")).await.unwrap();
    assert_eq!(r.status().as_u16(), 425);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "too_early", "{body}");
    let r = check("X-Weir-Lsn", lsn.clone()).await.unwrap();
    assert_eq!(r.status().as_u16(), 425);

    // A long-poll that times out answers 425 too.
    let r = client
        .get(format!("{}/v1/process/wait?timeout=200ms", h.base))
        .header("X-Weir-Entity-Timestamp", format!("posts/{ts}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 425);

    // The user's own service behind the layer.
    let app = Router::new()
        .route("/stats", axum::routing::get(|| async { "fresh" }))
        .route_layer(TooEarlyLayer::new(h.pool.clone(), "updated_at"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_url = format!("http://{}/stats", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let r = client
        .get(&app_url)
        .header("X-Weir-Entity-Timestamp", format!("posts/{ts}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 425);
    let r = client.get(&app_url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "no header: the layer lets it through");
    let r = client.get(&app_url).header("X-Weir-Entity-Timestamp", "posts").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);

    // Open the gate; a long-poll sees the write processed.
    let waiter = {
        let (client, base) = (client.clone(), h.base.clone());
        tokio::spawn(async move {
            client
                .get(format!("{base}/v1/process/wait?timeout=20s"))
                .header("X-Weir-Entity-Timestamp", format!("posts/{ts}"))
                .send()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    h.gate.open.store(true, Ordering::SeqCst);
    let r = waiter.await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"processed": true}));
    let seen: i64 =
        sqlx::query_scalar("select count(*) from post_seen").fetch_one(&h.pool).await.unwrap();
    assert_eq!(seen, 1, "200 only once the consumer's effect is committed");

    let r = check("X-Weir-Entity-Timestamp", format!("posts/{ts}")).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = client
        .get(format!("{}/v1/process/wait?lsn={lsn}&timeout=20s", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = client
        .get(&app_url)
        .header("X-Weir-Entity-Timestamp", format!("posts/{ts}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.text().await.unwrap(), "fresh");

    let (status, body) = h.get("/v1/process/posts").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["last_processed"], json!(ts), "{body}");
    h.stop().await;
}

/// A thousand long-polls share the server's one watcher: while they wait, the database sees
/// about one query per tick (per-waiter polling would make thousands); they all get 200 once
/// the consumer has handled the write, one that times out still gets 425, and the watcher
/// ends with the last waiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_long_polls_share_one_watcher() {
    const WAITERS: usize = 1000;
    let h = Harness::start("api_watch", None, false).await;
    sqlx::raw_sql("create table unwatched (n int)").execute(&h.pool).await.unwrap();
    // Three writes, so the entity waiters ask three distinct questions (as writers would).
    let mut ts = Vec::new();
    for id in 1..=3 {
        ts.push(h.insert(id, "hello").await.0);
    }
    // The token lands beyond WAL no event carries (a write to a table weir does not watch):
    // it resolves through what the slot has acknowledged, not through an event.
    sqlx::query("insert into unwatched values (1)").execute(&h.pool).await.unwrap();
    let lsn: String = sqlx::query_scalar("select pg_current_wal_insert_lsn()::text")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    h.logged(3).await;

    let wait = |uri: String, header: Option<(&'static str, String)>| {
        let router = h.router.clone();
        tokio::spawn(async move {
            let mut req = Request::get(uri);
            if let Some((name, value)) = header {
                req = req.header(name, value);
            }
            router.oneshot(req.body(Body::empty()).unwrap()).await.unwrap().status()
        })
    };
    let mut waiters = Vec::new();
    for i in 0..WAITERS {
        let uri = "/v1/process/wait?timeout=20s".to_string();
        waiters.push(if i % 2 == 0 {
            wait(uri, Some(("X-Weir-Lsn", lsn.clone())))
        } else {
            wait(uri, Some(("X-Weir-Entity-Timestamp", format!("posts/{}", ts[i % 3]))))
        });
    }
    eventually("every long-poll waiting", Duration::from_secs(20), || async {
        h.watch.waiting() == WAITERS
    })
    .await;
    assert!(h.watch.is_watching());

    // Held by the gate for a while: the watcher ticks every few milliseconds for all of them.
    let before = h.watch.queries();
    let held = std::time::Instant::now();
    let late =
        wait("/v1/process/wait?timeout=300ms".into(), Some(("X-Weir-Lsn", "FFFFFFFF/0".into())));
    assert_eq!(late.await.unwrap(), StatusCode::TOO_EARLY, "a long-poll that times out");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let queries = h.watch.queries() - before;
    let ms = held.elapsed().as_millis() as u64;
    assert!(
        queries <= ms / 2 + 10,
        "{queries} queries in {ms} ms for {WAITERS} waiters: more than one per tick"
    );
    assert_eq!(h.watch.waiting(), WAITERS, "none answered while the write is unhandled");

    h.gate.open.store(true, Ordering::SeqCst);
    for w in waiters {
        assert_eq!(w.await.unwrap(), StatusCode::OK);
    }
    let seen: i64 =
        sqlx::query_scalar("select count(*) from post_seen").fetch_one(&h.pool).await.unwrap();
    assert_eq!(seen, 3, "200 only once the consumer's effects are committed");
    assert_eq!(h.watch.waiting(), 0);
    eventually("the watcher gone with the last waiter", Duration::from_secs(5), || async {
        !h.watch.is_watching()
    })
    .await;
    // Asked again, it starts again (a processed token answers at once).
    let again = wait("/v1/process/wait?timeout=5s".into(), Some(("X-Weir-Lsn", lsn.clone())));
    assert_eq!(again.await.unwrap(), StatusCode::OK);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_halt_resume_and_skip_over_http() {
    let h = Harness::start("api_consumers", Some(TOKEN), true).await;
    h.insert(1, "poison").await;
    h.insert(2, "fine").await;
    h.logged(2).await;
    let last = std::sync::Mutex::new(Value::Null);
    eventually("the consumer halts", Duration::from_secs(20), || async {
        let (status, body) = h.get("/v1/consumers/gate").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let halted = body["state"] == "halted";
        *last.lock().unwrap() = body;
        halted
    })
    .await;
    let halted = last.into_inner().unwrap();
    let halted_at = halted["halted"]["position"].as_i64().unwrap();
    let (status, list) = h.get("/v1/consumers").await;
    assert_eq!(status, StatusCode::OK);
    assert!(list.as_array().unwrap().iter().any(|c| c["name"] == "gate"));

    // Resume: still poison, halts again. Skip: goes past it.
    let (status, body) = h.call(Method::POST, "/v1/consumers/gate/resume", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["resumed"], true);
    let last = std::sync::Mutex::new(Value::Null);
    eventually("the consumer halts again and skip succeeds", Duration::from_secs(20), || async {
        let (status, body) =
            h.call(Method::POST, "/v1/consumers/gate/skip", Some(TOKEN), None).await;
        if status != StatusCode::OK {
            assert_eq!(status, StatusCode::CONFLICT, "{body}");
            assert_eq!(body["error"], "conflict");
        }
        *last.lock().unwrap() = body;
        status == StatusCode::OK
    })
    .await;
    let skipped = last.into_inner().unwrap();
    assert_eq!(skipped["skipped"], json!(halted_at));
    eventually("the event after the skipped one is handled", Duration::from_secs(20), || async {
        let seen: i64 =
            sqlx::query_scalar("select count(*) from post_seen").fetch_one(&h.pool).await.unwrap();
        seen == 1
    })
    .await;
    // Resume when not halted: nothing to do, and it says so.
    let (status, body) = h.call(Method::POST, "/v1/consumers/gate/resume", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["resumed"], false, "{body}");
    // Skip when not halted: 409, nothing changed.
    let (status, body) = h.call(Method::POST, "/v1/consumers/gate/skip", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, parked) = h.get("/v1/consumers/gate/parked").await;
    assert_eq!((status, parked), (StatusCode::OK, json!([])));
    let (status, body) =
        h.call(Method::POST, "/v1/consumers/gate/parked/retry", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["count"], 0);
    let (status, body) = h
        .call(
            Method::POST,
            "/v1/consumers/gate/parked/discard",
            Some(TOKEN),
            Some(r#"{"position": 5}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_jobs_health_and_metrics() {
    let h = Harness::start("api_log", Some(TOKEN), true).await;
    for id in 1..=5 {
        h.insert(id, "x").await;
    }
    sqlx::query("update posts set title = 'y' where id = 1").execute(&h.pool).await.unwrap();
    h.logged(6).await;

    let (status, page) = h.get("/v1/log?after=0&limit=3&entity=posts").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let positions: Vec<i64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect();
    assert_eq!(positions, vec![1, 2, 3]);
    assert_eq!(page["next_after"], 3);
    let (_, page) = h.get("/v1/log?after=3&limit=100&kind=update").await;
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["kind"], "update");
    assert_eq!(events[0]["key"], json!({"id": 1}));
    assert_eq!(page["next_after"], page["head"], "a short page covers the log up to its head");
    let (_, page) = h.get("/v1/log?entity=comments").await;
    assert_eq!(page["events"], json!([]));

    let (status, body) = h.get("/v1/health").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
    let (status, body) = h.get("/v1/ready").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = h.get("/v1/source").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["position"].as_i64().unwrap() >= 6, "{body}");

    // Jobs.
    let (status, job) = h
        .call(
            Method::POST,
            "/v1/jobs",
            Some(TOKEN),
            Some(r#"{"kind": "email", "args": {"to": "a@b"}, "unique_key": "k1"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let id = job["id"].as_i64().unwrap();
    let (status, dup) = h
        .call(
            Method::POST,
            "/v1/jobs",
            Some(TOKEN),
            Some(r#"{"kind": "email", "unique_key": "k1"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(dup, json!({"id": id, "duplicate": true}));
    let (status, shown) = h.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown["args"], json!({"to": "a@b"}));
    let (status, listed) = h.get("/v1/jobs?state=available&kind=email").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let (status, stats) = h.get("/v1/jobs/stats").await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    let (status, body) =
        h.call(Method::POST, &format!("/v1/jobs/{id}/cancel"), Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "cancelled");
    let (status, body) =
        h.call(Method::POST, &format!("/v1/jobs/{id}/cancel"), Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) =
        h.call(Method::POST, &format!("/v1/jobs/{id}/retry"), Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "available");
    let (status, body) =
        h.call(Method::POST, "/v1/jobs", Some(TOKEN), Some(r#"{"kind": ""}"#)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_job");

    // Metrics, over real HTTP.
    let text = reqwest::get(format!("{}/metrics", h.base)).await.unwrap().text().await.unwrap();
    for name in [
        "weir_ingest_events_total",
        "weir_consumer_events_handled_total",
        "weir_consumer_handler_seconds_bucket",
        "weir_http_requests_total",
        "weir_http_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }
    h.stop().await;
}

/// Every bad input: the right status, a JSON `{error, message}`, nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_json_error_and_changes_nothing() {
    let h = Harness::start("api_bad", Some(TOKEN), true).await;
    let jobs_before: i64 =
        sqlx::query_scalar("select count(*) from weir.jobs").fetch_one(&h.pool).await.unwrap();
    // (method, uri, token, body, status, error code)
    type Case =
        (Method, &'static str, Option<&'static str>, Option<&'static str>, u16, &'static str);
    let cases: Vec<Case> = vec![
        (Method::POST, "/v1/jobs", Some(TOKEN), Some("{not json"), 400, "malformed_json"),
        (Method::POST, "/v1/jobs", Some(TOKEN), Some(r#"{"kind": 5}"#), 400, "malformed_json"),
        (
            Method::POST,
            "/v1/jobs",
            Some(TOKEN),
            Some(r#"{"kind": "a", "extra": 1}"#),
            400,
            "malformed_json",
        ),
        (
            Method::POST,
            "/v1/consumers/gate/parked/retry",
            Some(TOKEN),
            Some("[1,"),
            400,
            "malformed_json",
        ),
        (Method::POST, "/v1/consumers/nobody/resume", Some(TOKEN), None, 404, "unknown_consumer"),
        (Method::POST, "/v1/consumers/nobody/skip", Some(TOKEN), None, 404, "unknown_consumer"),
        (Method::GET, "/v1/consumers/nobody", None, None, 404, "unknown_consumer"),
        (Method::POST, "/v1/consumers/gate/resume", None, None, 401, "unauthorized"),
        (
            Method::POST,
            "/v1/consumers/gate/resume",
            Some("wrong-token-0123456789"),
            None,
            401,
            "unauthorized",
        ),
        (Method::POST, "/v1/jobs", None, Some(r#"{"kind": "a"}"#), 401, "unauthorized"),
        (Method::GET, "/v1/process/check", None, None, 400, "bad_request"),
        (Method::GET, "/v1/process/check?entity_timestamp=posts", None, None, 400, "bad_request"),
        (Method::GET, "/v1/process/check?lsn=zz", None, None, 400, "bad_request"),
        (Method::GET, "/v1/process/wait?lsn=0/1&timeout=1h", None, None, 400, "bad_request"),
        (Method::GET, "/v1/process/wait?lsn=0/1&timeout=soon", None, None, 400, "bad_request"),
        (Method::GET, "/v1/log?limit=0", None, None, 400, "bad_request"),
        (Method::GET, "/v1/log?kind=upsert", None, None, 400, "bad_request"),
        (Method::GET, "/v1/log?after=x", None, None, 400, "bad_request"),
        (Method::GET, "/v1/jobs/abc", None, None, 400, "bad_request"),
        (Method::GET, "/v1/jobs/999999", None, None, 404, "unknown_job"),
        (Method::GET, "/v1/nothing-here", None, None, 404, "not_found"),
        (Method::DELETE, "/v1/consumers", Some(TOKEN), None, 405, "method_not_allowed"),
    ];
    for (method, uri, token, body, status, code) in cases {
        let (got, value) = h.call(method.clone(), uri, token, body).await;
        assert_eq!(got.as_u16(), status, "{method} {uri}: {value}");
        assert_eq!(value["error"], code, "{method} {uri}: {value}");
        assert!(value["message"].as_str().is_some_and(|m| !m.is_empty()), "{value}");
        let text = value.to_string().to_lowercase();
        assert!(!text.contains("select ") && !text.contains("panicked"), "{text}");
    }
    // A bad header through the check.
    let req = Request::get("/v1/process/check")
        .header("x-weir-entity-timestamp", "posts/yesterday")
        .body(Body::empty())
        .unwrap();
    let r = h.router.clone().oneshot(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // Oversized bodies: declared, and streamed without a length.
    let big = format!(r#"{{"kind": "a", "args": "{}"}}"#, "x".repeat(10_000));
    let (status, value) = h.call(Method::POST, "/v1/jobs", Some(TOKEN), Some(&big)).await;
    assert_eq!((status.as_u16(), value["error"].as_str()), (413, Some("payload_too_large")));
    let kilobyte = "x".repeat(1000);
    let status = h.post_chunked("/v1/jobs", Some("application/json"), &[&kilobyte[..]; 20]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // A chunked body is a body: without a JSON content type it is refused (never read as "no
    // body", which for a discard would mean "all").
    let discard = "/v1/consumers/gate/parked/discard";
    let status = h.post_chunked(discard, None, &[r#"{"position": 1}"#]).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let status = h.post_chunked(discard, Some("application/json"), &[r#"{"position": "#]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = h
        .call(
            Method::POST,
            "/v1/jobs",
            Some(TOKEN),
            Some(r#"{"kind": "a", "scheduled_at": "-200000-01-01T00:00:00Z"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // An invented method is counted as `other`, not as a label of its own.
    let req = Request::builder().method("X0").uri("/nope").body(Body::empty()).unwrap();
    let r = h.router.clone().oneshot(req).await.unwrap();
    assert!(r.status().is_client_error());
    let (_, text) = h.get("/metrics").await;
    let text = text.as_str().unwrap();
    assert!(!text.contains("method=\"X0\"") && text.contains("method=\"other\""), "{text}");

    let jobs_after: i64 =
        sqlx::query_scalar("select count(*) from weir.jobs").fetch_one(&h.pool).await.unwrap();
    assert_eq!(jobs_before, jobs_after, "a refused request changed nothing");
    h.stop().await;
}

/// Without a configured token, writes are refused (403) and reads stay open; with
/// `protect_reads`, reads need the token too, but health and readiness never do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guard_writes_and_optionally_reads() {
    let h = Harness::start("api_token", None, true).await;
    let (status, body) = h.call(Method::POST, "/v1/consumers/gate/resume", None, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["message"].as_str().unwrap().contains("WEIR_HTTP_TOKEN"), "{body}");
    let (status, _) = h.get("/v1/consumers").await;
    assert_eq!(status, StatusCode::OK);
    h.stop().await;

    let db = weir_testkit::shared().database("api_reads").unwrap();
    let pool = PgPool::connect(&db.url()).await.unwrap();
    let mut config = Config::default();
    config.database.url = Some(Secret::new(db.url()));
    const ODD: &str = "abc+def/ghi=0123456789";
    config.http.token = Some(Secret::new(ODD));
    config.http.protect_reads = true;
    weir_log::migrate(&pool).await.unwrap();
    let cancel = CancellationToken::new();
    let (wake, _) = weir_log::listen_for_appends(pool.clone(), cancel.clone());
    let server = Server::start(pool, config, wake, cancel.clone()).await.unwrap();
    let router = server.router();
    let status = |uri: &'static str, token: Option<&'static str>| {
        let router = router.clone();
        async move {
            let mut req = Request::get(uri);
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            router.oneshot(req.body(Body::empty()).unwrap()).await.unwrap().status()
        }
    };
    assert_eq!(status("/v1/consumers", None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status("/v1/consumers", Some(TOKEN)).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status("/v1/consumers", Some(ODD)).await, StatusCode::OK);
    let sse = "/v1/channels/sse?channel=posts&access_token=abc%2Bdef%2Fghi%3D0123456789";
    assert_eq!(status(sse, None).await, StatusCode::OK, "a percent-encoded token works");
    assert_eq!(
        status("/v1/channels/sse?channel=posts&access_token=abc+def/ghi=0123456789", None).await,
        StatusCode::UNAUTHORIZED,
        "`+` in a query means a space"
    );
    assert_eq!(status("/metrics", None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status("/v1/health", None).await, StatusCode::OK);
    assert_eq!(status("/v1/ready", None).await, StatusCode::OK);
    assert_eq!(status("/v1/openapi.json", None).await, StatusCode::OK);
    // The console's page and `/v1/access` are open (the page asks for the token); what the
    // page reads is not.
    assert_eq!(status("/v1/access", None).await, StatusCode::OK);
    assert_eq!(status("/", None).await, StatusCode::OK);
    assert_eq!(status("/console/app.js", None).await, StatusCode::OK);
    assert_eq!(status("/v1/overview", None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status("/v1/overview/live", None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status("/v1/overview", Some(ODD)).await, StatusCode::OK);
    cancel.cancel();
}

/// The OpenAPI document lists exactly what the router serves: a request for each documented
/// path and method gets one of the statuses documented for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_routes() {
    let h = Harness::start("api_openapi", Some(TOKEN), true).await;
    h.insert(1, "x").await;
    h.logged(1).await;
    let (status, doc) = h.get("/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 20, "only {} paths documented", paths.len());
    let mut checked = BTreeSet::new();
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let documented: BTreeSet<u16> =
                op["responses"].as_object().unwrap().keys().map(|k| k.parse().unwrap()).collect();
            let uri =
                path.replace("{name}", "gate").replace("{entity}", "posts").replace("{id}", "1");
            let (uri, body) = match (method.as_str(), path.as_str()) {
                ("post", "/v1/jobs") => (uri, Some(r#"{"kind": "openapi"}"#)),
                (_, "/v1/process/check" | "/v1/process/wait") => {
                    (format!("{uri}?entity_timestamp=posts/1&timeout=1s"), None)
                }
                (_, p) if p.starts_with("/v1/channels/") => (format!("{uri}?channel=posts"), None),
                _ => (uri, None),
            };
            let method: Method = method.to_uppercase().parse().unwrap();
            let token = (method != Method::GET).then_some(TOKEN);
            let req = {
                let mut r = Request::builder().method(method.clone()).uri(&uri);
                if let Some(t) = token {
                    r = r.header("authorization", format!("Bearer {t}"));
                }
                match body {
                    Some(b) => r.header("content-type", "application/json").body(Body::from(b)),
                    None => r.body(Body::empty()),
                }
                .unwrap()
            };
            let status = h.router.clone().oneshot(req).await.unwrap().status().as_u16();
            assert!(
                documented.contains(&status),
                "{method} {uri} answered {status}; documented: {documented:?}"
            );
            checked.insert(format!("{method} {path}"));
        }
    }
    // Every documented schema reference resolves.
    let text = doc.to_string();
    for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = &r[..r.find('"').unwrap()];
        assert!(doc["components"]["schemas"].get(name).is_some(), "dangling $ref {name}");
    }
    assert!(checked.contains("POST /v1/consumers/{name}/resume"), "{checked:?}");
    h.stop().await;
}

/// The console's files at `/` and `/console/…` (with a Content-Security-Policy), every module
/// the page imports among them; `/v1/access`, `/v1/overview` (a halted consumer in it), its
/// live stream, a consumer's failures and the periodic jobs; `[http] console = false` turns the
/// page off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_and_its_endpoints_answer() {
    let h = Harness::start("api_console", Some(TOKEN), true).await;
    let response = h.router.clone().oneshot(Request::get("/").body(Body::empty()).unwrap()).await;
    let response = response.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let csp = response.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"), "{csp}");
    let (_, index) = h.get("/").await;
    let index = index.as_str().unwrap().to_string();
    assert!(index.contains("<title>weir console</title>"), "{index}");
    // Every file the page names, and every module those import, is served.
    let mut files: Vec<String> =
        index.split("/console/").skip(1).map(|s| s[..s.find('"').unwrap()].to_string()).collect();
    let mut seen = BTreeSet::new();
    while let Some(file) = files.pop() {
        if !seen.insert(file.clone()) {
            continue;
        }
        let (status, body) = h.get(&format!("/console/{file}")).await;
        assert_eq!(status, StatusCode::OK, "/console/{file}");
        let text = body.as_str().map(str::to_string).unwrap_or_default();
        for import in text.split(" from \"./").skip(1) {
            files.push(import[..import.find('"').unwrap()].to_string());
        }
    }
    assert!(seen.len() >= 10, "{seen:?}");
    let (status, body) = h.get("/console/nothing.js").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let (status, access) = h.get("/v1/access").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        access,
        json!({"token_configured": true, "protect_reads": false, "max_wait_seconds": 20})
    );

    h.insert(1, "poison").await;
    h.logged(1).await;
    let last = std::sync::Mutex::new(Value::Null);
    eventually("the overview shows the halt", Duration::from_secs(20), || async {
        let (status, o) = h.get("/v1/overview").await;
        assert_eq!(status, StatusCode::OK, "{o}");
        let halted = o["consumers"][0]["state"] == "halted";
        *last.lock().unwrap() = o;
        halted
    })
    .await;
    let o = last.into_inner().unwrap();
    assert_eq!(o["log"]["head"], 1, "{o}");
    assert_eq!(o["log"]["oldest"], 1, "{o}");
    assert_eq!(o["log"]["entities"], json!(["posts"]), "{o}");
    assert_eq!(o["log"]["retention_seconds"], 7 * 86_400, "{o}");
    assert_eq!(o["source"]["position"], 1, "{o}");
    assert_eq!(o["consumers"][0]["halted"]["position"], 1, "{o}");
    assert!(o["jobs"].is_array() && o["subscriptions"].is_array(), "{o}");

    let (status, failures) = h.get("/v1/consumers/gate/failures?limit=5").await;
    assert_eq!(status, StatusCode::OK, "{failures}");
    let failures = failures.as_array().unwrap();
    assert_eq!(failures[0]["outcome"], "halt", "{failures:?}");
    assert_eq!(failures[0]["position"], 1);
    assert!(failures[0]["error"].as_str().unwrap().contains("poison title"), "{failures:?}");
    let (status, body) = h.get("/v1/consumers/nobody/failures").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = h.get("/v1/consumers/gate/failures?limit=0").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, periodic) = h.get("/v1/jobs/periodic").await;
    assert_eq!((status, periodic), (StatusCode::OK, json!([])));

    // The live overview: a first comment, then the same JSON as GET /v1/overview.
    let response = reqwest::get(format!("{}/v1/overview/live", h.base)).await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.bytes_stream();
    let mut text = String::new();
    while !text.contains("event: overview\ndata: ") || !text.ends_with("\n\n") {
        let chunk =
            tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut body));
        text.push_str(std::str::from_utf8(&chunk.await.unwrap().unwrap().unwrap()).unwrap());
    }
    assert!(text.starts_with(": ok\n\n"), "{text}");
    let data = text.split("data: ").nth(1).unwrap().trim();
    let live: Value = serde_json::from_str(data).unwrap();
    assert_eq!(live["consumers"][0]["state"], "halted", "{live}");
    h.stop().await;

    // Off: no page, the API as before.
    let db = weir_testkit::shared().database("api_console_off").unwrap();
    let pool = PgPool::connect(&db.url()).await.unwrap();
    let mut config = Config::default();
    config.database.url = Some(Secret::new(db.url()));
    config.http.console = false;
    weir_log::migrate(&pool).await.unwrap();
    let cancel = CancellationToken::new();
    let (wake, _) = weir_log::listen_for_appends(pool.clone(), cancel.clone());
    let server = Server::start(pool, config, wake, cancel.clone()).await.unwrap();
    let status = |uri: &'static str| {
        let router = server.router();
        async move {
            router.oneshot(Request::get(uri).body(Body::empty()).unwrap()).await.unwrap().status()
        }
    };
    assert_eq!(status("/").await, StatusCode::NOT_FOUND);
    assert_eq!(status("/console/app.js").await, StatusCode::NOT_FOUND);
    assert_eq!(status("/v1/health").await, StatusCode::OK);
    cancel.cancel();
}
