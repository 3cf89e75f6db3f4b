//! Subscriptions over HTTP against a real PostgreSQL and a real server (ingestion and the
//! consumer engine in the same process, as under `weir run`): create, list, show, update,
//! stop, start, delete and every bad input of the definition, each answered `{error, message}`
//! with nothing stored; clients attached over SSE (reqwest and a small SSE parser) and
//! WebSocket (tokio-tungstenite) that acknowledge, disconnect and reconnect and get exactly what
//! they had not acknowledged; two clients and one emitter (409 busy, `?emitters=`); stop →
//! `paused`, start → delivery again; a re-split from 2 to 4 emitters with nothing lost or
//! repeated.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use futures::{SinkExt, Stream, StreamExt};
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;
use weir_consumer::{Operator, OperatorError, Selector};
use weir_core::{Config, Event, Secret};
use weir_server::Server;
use weir_testkit::eventually;

/// Generous: the machine is small and other tests run beside.
const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "subs-token-0123456789abcdef";

/// An operator, so that its name is taken.
struct Audit;

impl Operator for Audit {
    fn selector(&self) -> Selector {
        Selector { entities: vec!["posts".into()], kinds: vec![] }
    }
    async fn handle(&self, _tx: &mut PgConnection, _e: &Event) -> Result<(), OperatorError> {
        Ok(())
    }
}

struct Env {
    pool: PgPool,
    base: String,
    ws_base: String,
    http: reqwest::Client,
    cancel: CancellationToken,
    running: Option<weir::Running>,
    versions: std::sync::Mutex<HashMap<String, i64>>,
    _db: weir_testkit::TestDatabase<'static>,
}

impl Env {
    async fn new(prefix: &str, client_buffer: usize) -> Env {
        let db = weir_testkit::shared().database(prefix).unwrap();
        let url = db.url();
        let pool = PgPoolOptions::new().max_connections(8).connect(&url).await.unwrap();
        sqlx::raw_sql("create table posts (id int primary key, title text)")
            .execute(&pool)
            .await
            .unwrap();
        let mut config = Config::default();
        config.database.url = Some(Secret::new(url.clone()));
        config.source.slot = db.name().to_string();
        config.http.token = Some(Secret::new(TOKEN));
        config.http.client_buffer = client_buffer;
        weir::setup::init(&pool, &config).await.unwrap();
        let running = weir::Weir::builder(config.clone())
            .pool(pool.clone())
            .operator("audit", Audit)
            .start()
            .await
            .unwrap();
        let cancel = CancellationToken::new();
        let server =
            Server::start(pool.clone(), config, running.wake(), cancel.clone()).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let c = cancel.clone();
        tokio::spawn(async move { server.serve(listener, c).await });
        Env {
            pool,
            base: format!("http://{addr}"),
            ws_base: format!("ws://{addr}"),
            http: reqwest::Client::new(),
            cancel,
            running: Some(running),
            versions: Default::default(),
            _db: db,
        }
    }

    /// A request with the token; the status and the JSON answer (`null` when empty).
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, value)
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn create(&self, body: Value) -> Value {
        let (status, v) = self.post("/v1/subscriptions", body).await;
        assert_eq!(status, 201, "{v}");
        v
    }

    /// Appends one event to `stream` (the next version); its log position once logged.
    async fn append(&self, stream: &str) -> i64 {
        let version = {
            let mut v = self.versions.lock().unwrap();
            let n = v.entry(stream.to_string()).or_insert(0);
            *n += 1;
            *n
        };
        sqlx::query(
            "insert into weir.stream_events (stream, version, id, type, data)
             values ($1, $2, gen_random_uuid(), 'order.placed', jsonb_build_object('n', $2))",
        )
        .bind(stream)
        .bind(version)
        .execute(&self.pool)
        .await
        .unwrap();
        let position = std::sync::Mutex::new(0);
        eventually(&format!("{stream} v{version} logged"), WAIT, || async {
            let p: Option<i64> = sqlx::query_scalar(
                "select position from weir.events
                 where entity = 'weir.stream_events' and key->>'stream' = $1
                   and (key->>'version')::bigint = $2",
            )
            .bind(stream)
            .bind(version)
            .fetch_optional(&self.pool)
            .await
            .unwrap();
            *position.lock().unwrap() = p.unwrap_or(0);
            p.is_some()
        })
        .await;
        position.into_inner().unwrap()
    }

    async fn count_subscriptions(&self) -> i64 {
        sqlx::query_scalar("select count(*) from weir.subscriptions")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(r) = self.running.take() {
            r.stop().await.unwrap();
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// One SSE message.
#[derive(Debug, Clone)]
struct SseMsg {
    id: Option<String>,
    event: String,
    data: Value,
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// A minimal SSE client over reqwest's byte stream.
struct Sse {
    stream: ByteStream,
    buf: String,
    token: String,
    emitters: Vec<i64>,
}

impl Sse {
    /// Attaches, retrying while the emitters are still held (a client that just left gives
    /// them back from its own task, once the server notices it left: at its next write); the
    /// `attached` event is read. Without `?emitters=`, retries until it holds all of them.
    async fn attach(env: &Env, name: &str, query: &str) -> Sse {
        let url = format!("{}/v1/subscriptions/{name}/sse?{query}", env.base);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let resp = env.http.get(&url).send().await.unwrap();
            if resp.status() == 409 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            if query.is_empty() && tokio::time::Instant::now() < deadline {
                let (_, shown) = env.get(&format!("/v1/subscriptions/{name}")).await;
                let busy = shown["emitters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["owner"].as_str().is_some_and(|o| o.starts_with("client:")));
                if busy && resp.status() == 200 {
                    // Some emitters still held by the client that left: try again.
                    let mut partial = Sse {
                        stream: Box::pin(resp.bytes_stream()),
                        buf: String::new(),
                        token: String::new(),
                        emitters: Vec::new(),
                    };
                    let first = partial.next().await.expect("an attached event");
                    let held = first.data["emitters"].as_array().unwrap().len();
                    if held < shown["pool_size"].as_u64().unwrap() as usize {
                        drop(partial);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    partial.token = first.data["token"].as_str().unwrap().to_string();
                    partial.emitters = first.data["emitters"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|e| e.as_i64().unwrap())
                        .collect();
                    return partial;
                }
            }
            assert_eq!(resp.status(), 200, "{url}");
            assert_eq!(resp.headers()["content-type"], "text/event-stream");
            let mut sse = Sse {
                stream: Box::pin(resp.bytes_stream()),
                buf: String::new(),
                token: String::new(),
                emitters: Vec::new(),
            };
            let first = sse.next().await.expect("an attached event");
            assert_eq!(first.event, "attached", "{first:?}");
            sse.token = first.data["token"].as_str().unwrap().to_string();
            sse.emitters = first.data["emitters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_i64().unwrap())
                .collect();
            return sse;
        }
    }

    /// The next message (comments skipped); `None` when the stream ended. Fails after `WAIT`
    /// without one (keep-alive comments do not count).
    async fn next(&mut self) -> Option<SseMsg> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, String::from("message"), None);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = v.to_string();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(v).unwrap());
                    }
                }
                if let Some(data) = data {
                    return Some(SseMsg { id, event, data });
                }
                continue;
            }
            let chunk = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .expect("no SSE message within the timeout");
            match chunk {
                Some(Ok(bytes)) => self.buf.push_str(std::str::from_utf8(&bytes).unwrap()),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The positions of the next `n` `event` messages (anything else is a failure).
    async fn events(&mut self, n: usize) -> Vec<i64> {
        let mut out = Vec::new();
        while out.len() < n {
            let m = self.next().await.expect("the stream ended");
            assert_eq!(m.event, "event", "{m:?}");
            let p = m.data["event"]["position"].as_i64().unwrap();
            assert_eq!(m.id.as_deref(), Some(p.to_string().as_str()));
            assert!(m.data["emitter"].as_i64().is_some(), "{m:?}");
            out.push(p);
        }
        out
    }

    async fn ack(&self, env: &Env, name: &str, position: i64) {
        let (status, v) = env
            .post(
                &format!("/v1/subscriptions/{name}/ack"),
                json!({"token": self.token, "position": position}),
            )
            .await;
        assert_eq!(status, 200, "{v}");
    }
}

fn stream_sub(name: &str, pool_size: i64) -> Value {
    json!({"name": name, "type": "stream", "selector": "order-*", "pool_size": pool_size})
}

#[tokio::test]
async fn crud_and_every_bad_input_is_refused_with_nothing_stored() {
    let env = Env::new("subs_crud", 4096).await;
    // Create, list, show.
    let created = env
        .create(json!({"name": "orders", "type": "event_pattern", "selector": "order.*",
                       "pool_size": 2, "start_from": "now",
                       "options": {"on_exhausted": "park", "partition_by": "customer.id"}}))
        .await;
    assert_eq!(created["subscription_name"], "orders");
    assert_eq!(created["type"], "event_pattern");
    assert_eq!(created["pool_size"], 2);
    assert_eq!(created["sink"], "client");
    assert_eq!(created["state"], "running");
    assert_eq!(created["options"]["partition_by"], "customer.id");
    assert_eq!(created["emitters"].as_array().unwrap().len(), 2);
    let (status, list) = env.get("/v1/subscriptions").await;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (status, shown) = env.get("/v1/subscriptions/orders").await;
    assert_eq!(status, 200);
    assert_eq!(shown["id"], created["id"]);

    // Every bad input: status, code, a message that says what, and nothing stored.
    let long = "x".repeat(201);
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (
            json!({"name": "orders", "type": "stream", "selector": "a"}),
            409,
            "duplicate",
            "subscription named `orders`",
        ),
        (
            json!({"name": "audit", "type": "stream", "selector": "a"}),
            409,
            "duplicate",
            "operator named `audit`",
        ),
        (
            json!({"name": "g", "type": "event_pattern", "selector": "order.[ab]"}),
            400,
            "invalid_subscription",
            "`[` is not supported",
        ),
        (
            json!({"name": "s", "type": "stream", "selector": "a*b"}),
            400,
            "invalid_subscription",
            "only a trailing `*`",
        ),
        (
            json!({"name": "p", "type": "event_payload", "selector": [1, 2]}),
            400,
            "invalid_subscription",
            "JSON object",
        ),
        (
            json!({"name": "p", "type": "event_payload", "selector": "x"}),
            400,
            "invalid_subscription",
            "JSON object",
        ),
        (
            json!({"name": "t", "type": "tags", "selector": {"any": []}}),
            400,
            "invalid_subscription",
            "tags",
        ),
        (
            json!({"name": "z", "type": "stream", "selector": "a", "pool_size": 0}),
            400,
            "invalid_subscription",
            "pool_size 0 is out of range; use 1 to 1024",
        ),
        (
            json!({"name": "z", "type": "stream", "selector": "a", "pool_size": 1025}),
            400,
            "invalid_subscription",
            "pool_size 1025 is out of range",
        ),
        (
            json!({"name": "z", "type": "stream", "selector": "a", "pool_size": -1}),
            400,
            "invalid_subscription",
            "pool_size -1 is out of range",
        ),
        (
            json!({"name": "z", "type": "stream", "selector": "a", "start_from": "yesterday"}),
            400,
            "invalid_subscription",
            "start_from `yesterday`",
        ),
        (
            json!({"name": "z", "type": "stream", "selector": "a", "start_from": -3}),
            400,
            "invalid_subscription",
            "start_from -3",
        ),
        (
            json!({"name": "z", "type": "streams", "selector": "a"}),
            400,
            "invalid_subscription",
            "`streams` is not a subscription type",
        ),
        (
            json!({"name": "a b", "type": "stream", "selector": "a"}),
            400,
            "invalid_subscription",
            "subscription name `a b`",
        ),
        (
            json!({"name": long, "type": "stream", "selector": "a"}),
            400,
            "invalid_subscription",
            "1 to 200",
        ),
        (
            json!({"name": "e", "type": "entity", "selector": {"entities": []}}),
            400,
            "invalid_subscription",
            "entit",
        ),
        (
            json!({"name": "z", "type": "stream", "selector": "a", "options": {"partition_by": "a..b"}}),
            400,
            "invalid_subscription",
            "partition_by `a..b`",
        ),
        (
            json!({"name": "z", "type": "stream", "selector": "a", "colour": "red"}),
            400,
            "malformed_json",
            "colour",
        ),
        (json!({"name": "z", "type": "stream"}), 400, "malformed_json", "selector"),
    ];
    for (body, status, code, message) in cases {
        let (got, v) = env.post("/v1/subscriptions", body.clone()).await;
        assert_eq!(got, status, "{body}: {v}");
        assert_eq!(v["error"], code, "{body}: {v}");
        let m = v["message"].as_str().unwrap();
        assert!(m.contains(message), "{body}: `{m}` should say `{message}`");
        assert_eq!(env.count_subscriptions().await, 1, "{body} stored something");
    }
    let consumers: i64 = sqlx::query_scalar("select count(*) from weir.consumers")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(consumers, 2, "the operator and `orders` only");

    // Unknown subscription, everywhere.
    for (method, path) in [
        (reqwest::Method::GET, "/v1/subscriptions/nope"),
        (reqwest::Method::PATCH, "/v1/subscriptions/nope"),
        (reqwest::Method::DELETE, "/v1/subscriptions/nope"),
        (reqwest::Method::POST, "/v1/subscriptions/nope/stop"),
        (reqwest::Method::POST, "/v1/subscriptions/nope/start"),
        (reqwest::Method::GET, "/v1/subscriptions/nope/parked"),
        (reqwest::Method::POST, "/v1/subscriptions/nope/parked/retry"),
        (reqwest::Method::POST, "/v1/subscriptions/nope/parked/discard"),
        (reqwest::Method::POST, "/v1/subscriptions/nope/resume"),
        (reqwest::Method::POST, "/v1/subscriptions/nope/skip"),
        (reqwest::Method::GET, "/v1/subscriptions/nope/sse"),
        (reqwest::Method::POST, "/v1/subscriptions/nope/ack"),
        // An operator is not a subscription.
        (reqwest::Method::GET, "/v1/subscriptions/audit"),
        (reqwest::Method::POST, "/v1/subscriptions/audit/stop"),
    ] {
        let body = match method {
            reqwest::Method::PATCH => Some(json!({"pool_size": 2})),
            reqwest::Method::POST if path.ends_with("/ack") => {
                Some(json!({"token": "client:x", "position": 1}))
            }
            _ => None,
        };
        let (status, v) = env.call(method.clone(), path, body).await;
        assert_eq!(status, 404, "{method} {path}: {v}");
        assert_eq!(v["error"], "unknown_subscription", "{method} {path}: {v}");
        assert!(v["message"].as_str().unwrap().contains("no subscription named"), "{v}");
    }

    // Update: a bad change is refused and changes nothing; a good one is answered.
    let patch =
        |body: Value| env.call(reqwest::Method::PATCH, "/v1/subscriptions/orders", Some(body));
    let (status, v) = patch(json!({"pool_size": 0})).await;
    assert_eq!((status, v["error"].as_str()), (400, Some("invalid_subscription")), "{v}");
    let (status, v) = patch(json!({"selector": "order.{a,b}"})).await;
    assert_eq!((status, v["error"].as_str()), (400, Some("invalid_subscription")), "{v}");
    let (status, v) = patch(json!({"type": "stream"})).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("needs a selector"), "{v}");
    let (_, shown) = env.get("/v1/subscriptions/orders").await;
    assert_eq!(shown["selector"], "order.*");
    let (status, v) = patch(json!({"selector": "invoice.*"})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["selector"], "invoice.*");

    // Stop, start, parked, resume and skip.
    let (status, v) = env.post("/v1/subscriptions/orders/stop", json!({})).await;
    assert_eq!((status, v["state"].as_str()), (200, Some("stopped")), "{v}");
    let (status, v) = env.post("/v1/subscriptions/orders/start", json!({})).await;
    assert_eq!((status, v["state"].as_str()), (200, Some("running")), "{v}");
    let (status, v) = env.get("/v1/subscriptions/orders/parked").await;
    assert_eq!((status, v), (200, json!([])));
    let (status, v) = env.post("/v1/subscriptions/orders/parked/retry", json!({})).await;
    assert_eq!((status, v["count"].as_u64()), (200, Some(0)), "{v}");
    let (status, v) =
        env.post("/v1/subscriptions/orders/parked/discard", json!({"position": 3})).await;
    assert_eq!((status, v["count"].as_u64()), (200, Some(0)), "{v}");
    let (status, v) = env.post("/v1/subscriptions/orders/resume", json!({})).await;
    assert_eq!((status, v["resumed"].as_bool()), (200, Some(false)), "{v}");
    let (status, v) = env.post("/v1/subscriptions/orders/skip", json!({})).await;
    assert_eq!((status, v["error"].as_str()), (409, Some("conflict")), "{v}");

    // Writes need the token.
    let resp =
        env.http.post(format!("{}/v1/subscriptions/orders/stop", env.base)).send().await.unwrap();
    assert_eq!(resp.status(), 401);

    // A Rust-handler subscription cannot be attached to.
    env.create(json!({"name": "inproc", "type": "stream", "selector": "x", "sink": "rust"})).await;
    let resp =
        env.http.get(format!("{}/v1/subscriptions/inproc/sse", env.base)).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let resp = env
        .http
        .get(format!("{}/v1/subscriptions/orders/sse?emitters=0,x", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = env
        .http
        .get(format!("{}/v1/subscriptions/orders/sse?emitters=2", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "orders has emitters 0 and 1");

    // Delete: 204, then gone with its consumer.
    let (status, _) = env.call(reqwest::Method::DELETE, "/v1/subscriptions/orders", None).await;
    assert_eq!(status, 204);
    let (status, _) = env.get("/v1/subscriptions/orders").await;
    assert_eq!(status, 404);
    let left: i64 = sqlx::query_scalar("select count(*) from weir.consumers where name = 'orders'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);

    // Every route is in the OpenAPI document.
    let (_, doc) = env.get("/v1/openapi.json").await;
    for path in [
        "/v1/subscriptions",
        "/v1/subscriptions/{name}",
        "/v1/subscriptions/{name}/stop",
        "/v1/subscriptions/{name}/start",
        "/v1/subscriptions/{name}/parked",
        "/v1/subscriptions/{name}/parked/retry",
        "/v1/subscriptions/{name}/parked/discard",
        "/v1/subscriptions/{name}/resume",
        "/v1/subscriptions/{name}/skip",
        "/v1/subscriptions/{name}/sse",
        "/v1/subscriptions/{name}/ws",
        "/v1/subscriptions/{name}/ack",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} is not documented");
    }
    assert!(doc["paths"]["/v1/subscriptions"]["post"]["responses"]["409"].is_object());
    env.stop().await;
}

#[tokio::test]
async fn sse_client_that_reconnects_gets_exactly_what_it_did_not_acknowledge() {
    let env = Env::new("subs_sse", 4096).await;
    env.create(stream_sub("orders", 2)).await;
    let mut appended = Vec::new();
    for i in 0..6 {
        appended.push(env.append(&format!("order-{}", i % 3)).await);
    }
    env.append("invoice-1").await; // not selected
    let mut sse = Sse::attach(&env, "orders", "").await;
    assert_eq!(sse.emitters, [0, 1]);
    let got = sse.events(6).await;
    assert_eq!(got, appended, "every selected event once, in log order");
    sse.ack(&env, "orders", got[2]).await;
    drop(sse);

    // Reconnect: exactly the unacknowledged ones, then the next append — no repeat.
    let mut sse = Sse::attach(&env, "orders", "").await;
    assert_eq!(sse.events(3).await, appended[3..]);
    let next = env.append("order-7").await;
    assert_eq!(sse.events(1).await, [next]);
    sse.ack(&env, "orders", next).await;
    drop(sse);
    let mut sse = Sse::attach(&env, "orders", "").await;
    let later = env.append("order-8").await;
    assert_eq!(sse.events(1).await, [later], "everything before was acknowledged");

    // An ack with a token that holds nothing is refused.
    let (status, v) = env
        .post("/v1/subscriptions/orders/ack", json!({"token": "client:gone", "position": later}))
        .await;
    assert_eq!((status, v["error"].as_str()), (404, Some("unknown_attachment")), "{v}");

    // The subscription's answer shows the emitters' owner while attached.
    let (_, shown) = env.get("/v1/subscriptions/orders").await;
    let owners: Vec<&str> = shown["emitters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["owner"].as_str().unwrap_or(""))
        .collect();
    assert!(owners.iter().all(|o| *o == sse.token), "{shown}");
    drop(sse);
    env.stop().await;
}

#[tokio::test]
async fn a_slow_client_is_not_flooded() {
    // client_buffer 16: at most 16 unacknowledged deliveries.
    let env = Env::new("subs_slow", 16).await;
    env.create(stream_sub("orders", 1)).await;
    let mut positions = Vec::new();
    for i in 0..40 {
        positions.push(env.append(&format!("order-{}", i % 4)).await);
    }
    let mut sse = Sse::attach(&env, "orders", "").await;
    assert_eq!(sse.events(16).await, positions[..16]);
    // Nothing more until an ack: the next message within a second and a half is none.
    let more = tokio::time::timeout(Duration::from_millis(1500), sse.next()).await;
    assert!(more.is_err(), "delivered beyond the limit: {more:?}");
    sse.ack(&env, "orders", positions[15]).await;
    assert_eq!(sse.events(16).await, positions[16..32]);
    sse.ack(&env, "orders", positions[31]).await;
    assert_eq!(sse.events(8).await, positions[32..]);
    env.stop().await;
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket attachment, or the HTTP status it was refused with.
async fn ws_attach(env: &Env, name: &str, query: &str) -> Result<(Ws, Vec<i64>), u16> {
    let url = format!("{}/v1/subscriptions/{name}/ws?{query}", env.ws_base);
    match tokio_tungstenite::connect_async(url).await {
        Ok((mut ws, _)) => {
            let first = ws_next(&mut ws).await.expect("an attached frame");
            assert_eq!(first["type"], "attached", "{first}");
            let emitters =
                first["emitters"].as_array().unwrap().iter().map(|e| e.as_i64().unwrap()).collect();
            Ok((ws, emitters))
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

async fn ws_next(ws: &mut Ws) -> Option<Value> {
    // One deadline for the message, whatever pings come before it.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.expect("no frame in time")?;
        match msg.unwrap() {
            WsMessage::Text(t) => return Some(serde_json::from_str(t.as_str()).unwrap()),
            WsMessage::Close(_) => return None,
            _ => continue,
        }
    }
}

async fn ws_events(ws: &mut Ws, n: usize) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    while out.len() < n {
        let f = ws_next(ws).await.expect("the socket closed");
        assert_eq!(f["type"], "event", "{f}");
        assert_eq!(f["id"], f["event"]["position"]);
        out.push((f["id"].as_i64().unwrap(), f["emitter"].as_i64().unwrap()));
    }
    out
}

#[tokio::test]
async fn websocket_acks_and_two_clients_never_hold_one_emitter() {
    let env = Env::new("subs_ws", 4096).await;
    env.create(stream_sub("orders", 2)).await;
    let mut appended = Vec::new();
    for i in 0..8 {
        appended.push(env.append(&format!("order-{i}")).await);
    }
    let (mut ws, emitters) = ws_attach(&env, "orders", "").await.unwrap();
    assert_eq!(emitters, [0, 1]);
    // Every emitter is held: a second client is refused, over either transport.
    assert_eq!(ws_attach(&env, "orders", "").await.err(), Some(409));
    let resp =
        env.http.get(format!("{}/v1/subscriptions/orders/sse", env.base)).send().await.unwrap();
    assert_eq!(resp.status(), 409);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"], "busy");
    assert!(v["message"].as_str().unwrap().contains("held by another client"), "{v}");

    let got = ws_events(&mut ws, 8).await;
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), appended);
    ws.send(WsMessage::Text(json!({"type": "ack", "position": got[4].0}).to_string().into()))
        .await
        .unwrap();
    // A bad frame is answered, the connection stays.
    ws.send(WsMessage::Text("{\"type\":\"hello\"}".into())).await.unwrap();
    let err = ws_next(&mut ws).await.unwrap();
    assert_eq!(err["type"], "error", "{err}");
    ws.close(None).await.unwrap();
    drop(ws);

    // One emitter each: client A takes 0, client B 1; together they get the unacknowledged.
    let (mut a, ea) = loop {
        match ws_attach(&env, "orders", "emitters=0").await {
            Ok(x) => break x,
            Err(409) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(s) => panic!("{s}"),
        }
    };
    assert_eq!(ea, [0]);
    assert_eq!(ws_attach(&env, "orders", "emitters=0").await.err(), Some(409));
    let mut b = Sse::attach(&env, "orders", "emitters=1").await;
    assert_eq!(b.emitters, [1]);
    let rest: Vec<(i64, i64)> = got[5..].to_vec();
    let for_a: Vec<i64> = rest.iter().filter(|g| g.1 == 0).map(|g| g.0).collect();
    let for_b: Vec<i64> = rest.iter().filter(|g| g.1 == 1).map(|g| g.0).collect();
    let from_a = ws_events(&mut a, for_a.len()).await;
    assert!(from_a.iter().all(|g| g.1 == 0));
    assert_eq!(from_a.iter().map(|g| g.0).collect::<Vec<_>>(), for_a);
    assert_eq!(b.events(for_b.len()).await, for_b);
    env.stop().await;
}

/// Every `$ref` under `v`.
fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get("$ref") {
                out.push(r.clone());
            }
            o.values().for_each(|v| refs(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn webhook_and_nats_sinks_over_http() {
    let env = Env::new("subs_sinks", 4096).await;
    // A NATS sink needs no secret: created, answered with its settings as a table (defaults
    // filled in) and deliveries at zero.
    let created = env
        .create(json!({"name": "rows", "type": "stream", "selector": "order-*",
                       "sink": {"type": "nats", "url": "nats://127.0.0.1:1",
                                "subject": "orders.{stream}.{type}", "stream": "ORDERS",
                                "max_in_flight": 8}}))
        .await;
    let (status, shown) = env.get("/v1/subscriptions/rows").await;
    assert_eq!(status, 200);
    for v in [&created, &shown] {
        assert_eq!(
            v["sink"],
            json!({"type": "nats", "url": "nats://127.0.0.1:1", "subject": "orders.{stream}.{type}",
                   "stream": "ORDERS", "create_stream": false, "stream_subjects": [],
                   "retention": "limits", "duplicate_window": "120s", "max_in_flight": 8,
                   "ack_timeout": "10s"}),
            "{v}"
        );
        assert_eq!(
            v["deliveries"],
            json!({"delivered": 0, "last_position": null, "last_delivered_at": null,
                   "retries": 0, "failed": 0, "last_error": null, "last_error_at": null}),
            "{v}"
        );
        assert!(v.get("sink_error").is_none() && v.get("stopped_reason").is_none(), "{v}");
    }
    let (_, list) = env.get("/v1/subscriptions").await;
    assert_eq!(list[0]["sink"]["type"], "nats");

    // Refused with the field named, nothing stored: a webhook whose secret's variable this
    // process lacks (tests cannot set one: the workspace forbids unsafe code), and invalid
    // settings.
    let sub = |sink: Value| json!({"name": "bad", "type": "stream", "selector": "x", "sink": sink});
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"type": "webhook", "url": "https://example.com/h",
                   "secret_env": "SUBS_TEST_UNSET_SECRET"}),
            "invalid_subscription",
            "the environment variable SUBS_TEST_UNSET_SECRET (the webhook's secret_env) is not \
             set in this process",
        ),
        (
            json!({"type": "nats", "token_env": "SUBS_TEST_UNSET_TOKEN"}),
            "invalid_subscription",
            "SUBS_TEST_UNSET_TOKEN (the NATS sink's token_env) is not set",
        ),
        (
            json!({"type": "webhook", "url": "ftp://example.com/h", "secret_env": "S"}),
            "invalid_subscription",
            "subscription `bad`: webhook url `ftp://example.com/h`: the scheme is `ftp`",
        ),
        (
            json!({"type": "nats", "subject": "weir.{nope}"}),
            "invalid_subscription",
            "nats subject `weir.{nope}`: `{nope}` is not a token",
        ),
        (json!({"type": "nats", "max_in_flight": 0}), "invalid_subscription", "max_in_flight 0"),
        (
            json!({"type": "webhook", "url": "https://example.com/h", "secret_env": "S",
                   "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}),
            "malformed_json",
            "unknown field `secret`",
        ),
        (
            json!({"type": "webhook", "url": "https://example.com/h"}),
            "malformed_json",
            "secret_env",
        ),
        (json!("kafka"), "malformed_json", "`kafka` is not a sink"),
        (json!({"type": "kafka"}), "malformed_json", "`kafka` is not a sink type"),
    ];
    for (sink, code, message) in &cases {
        let (status, v) = env.post("/v1/subscriptions", sub(sink.clone())).await;
        assert_eq!((status, v["error"].as_str()), (400, Some(*code)), "{sink}: {v}");
        let m = v["message"].as_str().unwrap();
        assert!(m.contains(message), "{sink}: `{m}` should say `{message}`");
        assert!(!m.contains("MfKQ9r8"), "{sink}: a secret in the answer: {m}");
        assert_eq!(env.count_subscriptions().await, 1, "{sink} stored something");
    }

    // PATCH: a new sink replaces the old one, checked as at creation.
    let patch =
        |body: Value| env.call(reqwest::Method::PATCH, "/v1/subscriptions/rows", Some(body));
    for (sink, code, message) in &cases {
        let (status, v) = patch(json!({"sink": sink})).await;
        assert_eq!((status, v["error"].as_str()), (400, Some(*code)), "{sink}: {v}");
        let m = v["message"].as_str().unwrap();
        // The definition's own check prefixes the name; every message names the field.
        assert!(m.contains(message.trim_start_matches("subscription `bad`: ")), "{sink}: `{m}`");
    }
    let (_, shown) = env.get("/v1/subscriptions/rows").await;
    assert_eq!(shown["sink"]["subject"], "orders.{stream}.{type}", "nothing changed");
    let (status, v) = patch(json!({"sink": {"type": "nats", "subject": "rows.{kind}"}})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["sink"]["subject"].as_str(), v["sink"]["stream"].as_str()),
        (Some("rows.{kind}"), Some("WEIR"))
    );
    assert_eq!(v["deliveries"]["delivered"], 0);
    let (status, v) = patch(json!({"sink": "client"})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["sink"], "client");
    assert!(v.get("deliveries").is_none(), "no deliveries for a client sink: {v}");
    let (status, v) = env
        .call(reqwest::Method::PATCH, "/v1/subscriptions/nope", Some(json!({"sink": "client"})))
        .await;
    assert_eq!((status, v["error"].as_str()), (404, Some("unknown_subscription")), "{v}");

    // The OpenAPI document describes the sink, the deliveries and the sink's states, and every
    // reference in it resolves.
    let (_, doc) = env.get("/v1/openapi.json").await;
    let schemas = &doc["components"]["schemas"];
    let props = &schemas["Subscription"]["properties"];
    for field in ["sink", "deliveries", "sink_error", "stopped_reason"] {
        assert!(props[field].is_object(), "Subscription.{field} is not documented: {props}");
    }
    let sink = &schemas["Sink"];
    let kinds = sink["oneOf"].as_array().expect("Sink is one of several forms");
    assert_eq!(kinds.len(), 3, "{sink}");
    assert_eq!(kinds[0]["enum"], json!(["client", "rust"]));
    for (form, kind, fields) in [
        (&kinds[1], "webhook", &["url", "secret_env", "timeout", "batch_size", "linger"][..]),
        (&kinds[2], "nats", &["url", "subject", "stream", "max_in_flight", "token_env"][..]),
    ] {
        assert_eq!(form["properties"]["type"]["enum"], json!([kind]), "{form}");
        for f in fields {
            assert!(form["properties"][f]["description"].is_string(), "{kind}.{f}: {form}");
        }
        assert!(form["required"].as_array().unwrap().contains(&json!("type")), "{form}");
    }
    for field in ["delivered", "last_position", "retries", "failed", "last_error"] {
        assert!(schemas["Deliveries"]["properties"][field].is_object(), "Deliveries.{field}");
    }
    for body in ["NewSubscription", "SubscriptionUpdate"] {
        assert!(schemas[body]["properties"]["sink"].to_string().contains("Sink"), "{body}.sink");
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in &all {
        let name = r.strip_prefix("#/components/schemas/").expect("schema references");
        assert!(schemas[name].is_object(), "{r} does not resolve");
    }
    env.stop().await;
}

#[tokio::test]
async fn a_stopped_subscription_pauses_its_clients_and_start_resumes_them() {
    let env = Env::new("subs_pause", 4096).await;
    env.create(stream_sub("orders", 1)).await;
    let mut sse = Sse::attach(&env, "orders", "").await;
    let first = env.append("order-1").await;
    assert_eq!(sse.events(1).await, [first]);
    let (status, _) = env.post("/v1/subscriptions/orders/stop", json!({})).await;
    assert_eq!(status, 200);
    let m = sse.next().await.unwrap();
    assert_eq!(m.event, "paused", "{m:?}");
    assert_eq!(m.data["state"], "stopped");
    let second = env.append("order-1").await;
    // Nothing while stopped.
    let more = tokio::time::timeout(Duration::from_millis(1500), sse.next()).await;
    assert!(more.is_err(), "delivered while stopped: {more:?}");
    let (status, _) = env.post("/v1/subscriptions/orders/start", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(sse.events(1).await, [second]);
    env.stop().await;
}

#[tokio::test]
async fn a_resplit_from_2_to_4_emitters_loses_and_repeats_nothing() {
    let env = Env::new("subs_resplit", 4096).await;
    env.create(stream_sub("orders", 2)).await;
    let mut before = Vec::new();
    for i in 0..10 {
        before.push(env.append(&format!("order-{}", i % 5)).await);
    }
    let mut sse = Sse::attach(&env, "orders", "").await;
    assert_eq!(sse.events(10).await, before);
    // Unacknowledged deliveries hold the re-split: the answer shows it pending.
    let (status, v) = env
        .call(reqwest::Method::PATCH, "/v1/subscriptions/orders", Some(json!({"pool_size": 4})))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["pool_size"], 2);
    assert_eq!(v["pending_pool_size"], 4);
    // Appended during the drain: delivered once, after the re-split.
    let mut after = vec![env.append("order-1").await, env.append("order-9").await];
    // Drained but not acknowledged: nothing past the drain position comes, and a client that
    // leaves now gets the unacknowledged ones again (the re-split waits for them).
    let more = tokio::time::timeout(Duration::from_millis(1500), sse.next()).await;
    assert!(more.is_err(), "delivered during the drain: {more:?}");
    drop(sse);
    let mut sse = Sse::attach(&env, "orders", "").await;
    assert_eq!(sse.emitters, [0, 1], "still 2 emitters: the re-split waits for the acks");
    assert_eq!(sse.events(10).await, before);
    sse.ack(&env, "orders", before[9]).await;
    // The next message is the reattach: nothing past the drain position is delivered.
    let m = sse.next().await.expect("a reattach before the end");
    assert_eq!(m.event, "reattach", "{m:?}");
    assert!(sse.next().await.is_none(), "the stream ends after reattach");
    let (_, v) = env.get("/v1/subscriptions/orders").await;
    assert_eq!(v["pool_size"], 4, "{v}");
    assert!(v.get("pending_pool_size").is_none(), "{v}");

    let mut sse = Sse::attach(&env, "orders", "").await;
    assert_eq!(sse.emitters, [0, 1, 2, 3]);
    for i in 0..6 {
        after.push(env.append(&format!("order-{i}")).await);
    }
    assert_eq!(sse.events(after.len()).await, after, "nothing lost, nothing repeated");
    env.stop().await;
}
