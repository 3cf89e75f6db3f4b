//! Exact values end to end, against a real PostgreSQL and a real HTTP server: numbers with more
//! digits than an `f64` holds, in `json`, `jsonb` and `numeric` columns, go through capture into
//! the log and come out with every digit from the Rust read API, `GET /v1/log` and an SSE
//! channel; a stream append with such numbers in `data` reads back exact from the Rust API,
//! `GET /v1/streams/{stream}`, `GET /v1/stream-events` and the log.

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use weir::{Config, Event, EventFilter, LogReader};
use weir_core::Secret;
use weir_server::Server;
use weir_testkit::eventually;

const TOKEN: &str = "test-token-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(30);

/// More digits than any `f64` (rounded: `123456789012345680000000000000`).
const BIG: &str = "123456789012345678901234567890";
/// A fraction an `f64` cannot hold (rounded: `0.1`).
const SMALL: &str = "0.1000000000000000000000000001";
/// What an `f64` would have made of them.
const ROUNDED: [&str; 2] = ["123456789012345680000000000000", "1.2345678901234568e29"];

struct Env {
    pool: PgPool,
    base: String,
    running: Option<weir::Running>,
    cancel: CancellationToken,
    _db: weir_testkit::TestDatabase<'static>,
}

impl Env {
    async fn start() -> Env {
        let db = weir_testkit::shared().database("exact").unwrap();
        let pool = PgPool::connect(&db.url()).await.unwrap();
        sqlx::raw_sql(
            "create table measures (id int primary key, j json, jb jsonb, n numeric, m numeric)",
        )
        .execute(&pool)
        .await
        .unwrap();
        let mut config = Config::default();
        config.database.url = Some(Secret::new(db.url()));
        config.source.slot = db.name().to_string();
        config.http.token = Some(Secret::new(TOKEN));
        config.http.max_wait = Duration::from_secs(20);
        weir::setup::init(&pool, &config).await.unwrap();
        let running = weir::Weir::builder(config.clone()).pool(pool.clone()).start().await.unwrap();
        let cancel = running.cancel_token();
        let server =
            Server::start(pool.clone(), config, running.wake(), cancel.clone()).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let c = cancel.clone();
        tokio::spawn(async move { server.serve(listener, c).await.unwrap() });
        Env { pool, base, running: Some(running), cancel, _db: db }
    }

    async fn get(&self, path: &str) -> String {
        let resp = reqwest::get(format!("{}{path}", self.base)).await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        resp.text().await.unwrap()
    }

    async fn events(&self, n: usize) -> Vec<Event> {
        let reader = LogReader::new(self.pool.clone()).await.unwrap();
        let read = || async { reader.read(0, 100, &EventFilter::default()).await.unwrap() };
        eventually(&format!("{n} events logged"), WAIT, || async { read().await.len() >= n }).await;
        read().await
    }

    async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(r) = self.running.take() {
            r.wait().await.unwrap();
        }
    }
}

/// The digits of a JSON number, as written.
fn digits(v: &Value) -> String {
    assert!(v.is_number(), "{v} is a number");
    v.to_string()
}

/// `text` holds both numbers with every digit, and nothing rounded.
fn assert_exact_text(what: &str, text: &str) {
    assert!(text.contains(BIG), "{what}: {text}");
    assert!(text.contains(SMALL), "{what}: {text}");
    for rounded in ROUNDED {
        assert!(!text.contains(rounded), "{what} rounded: {text}");
    }
}

/// The row's record: json and jsonb hold numbers, numeric columns their exact text.
fn assert_exact_record(what: &str, r: &Value) {
    for column in ["j", "jb"] {
        assert_eq!(digits(&r[column]["big"]), BIG, "{what}: {column}: {r}");
        assert_eq!(digits(&r[column]["small"]), SMALL, "{what}: {column}: {r}");
        assert_eq!(digits(&r[column]["list"][0]), BIG, "{what}: {column}: {r}");
    }
    assert_eq!(r["n"], Value::from(BIG), "{what}: {r}");
    assert_eq!(r["m"], Value::from(SMALL), "{what}: {r}");
}

/// One SSE `change` message's data.
async fn next_change(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
) -> String {
    let mut buf = String::new();
    loop {
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            if block.lines().any(|l| l == "event: change") {
                let data = block.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
                return data.to_string();
            }
        }
        let chunk = tokio::time::timeout(WAIT, stream.next()).await.expect("an SSE message");
        buf.push_str(std::str::from_utf8(&chunk.unwrap().unwrap()).unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_numbers_stay_exact_from_capture_to_every_reader() {
    let env = Env::start().await;
    let sse = reqwest::get(format!("{}/v1/channels/sse?channel=measures", env.base)).await.unwrap();
    assert_eq!(sse.status(), 200);
    let mut sse = Box::pin(sse.bytes_stream());
    let doc = format!(r#"{{"big": {BIG}, "small": {SMALL}, "list": [{BIG}]}}"#);
    sqlx::query("insert into measures values (1, $1::json, $1::jsonb, $2::numeric, $3::numeric)")
        .bind(&doc)
        .bind(BIG)
        .bind(SMALL)
        .execute(&env.pool)
        .await
        .unwrap();

    // The Rust read API.
    let e = env.events(1).await;
    assert_exact_record("LogReader", e[0].new_record.as_ref().unwrap());
    // What weir.events holds, read by PostgreSQL itself.
    let stored: String =
        sqlx::query_scalar("select new_record::text from weir.events where position = $1")
            .bind(e[0].position)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_exact_text("weir.events", &stored);

    // GET /v1/log.
    let text = env.get("/v1/log?entity=measures").await;
    assert_exact_text("GET /v1/log", &text);
    let page: Value = serde_json::from_str(&text).unwrap();
    assert_exact_record("GET /v1/log", &page["events"][0]["new_record"]);

    // The SSE channel.
    let data = next_change(&mut sse).await;
    assert_exact_text("SSE", &data);
    let message: Value = serde_json::from_str(&data).unwrap();
    assert_exact_record("SSE", &message["event"]["new_record"]);

    // A stream append with the numbers in `data`, over HTTP.
    let body = format!(
        r#"{{"expected_version": "no_stream", "events": [{{"type": "measured", "data": {doc}, "metadata": {{"scale": {SMALL}}}}}]}}"#
    );
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/streams/m-1", env.base))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    let text = env.get("/v1/streams/m-1").await;
    assert_exact_text("GET /v1/streams/m-1", &text);
    let read: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(digits(&read["events"][0]["data"]["big"]), BIG);
    assert_eq!(digits(&read["events"][0]["data"]["small"]), SMALL);
    assert_eq!(digits(&read["events"][0]["metadata"]["scale"]), SMALL);
    let rust =
        weir_streams::read_stream(&env.pool, "m-1", None, Default::default(), 10).await.unwrap();
    assert_eq!(digits(&rust[0].data["big"]), BIG);
    assert_eq!(digits(&rust[0].data["list"][0]), BIG);
    assert_eq!(digits(&rust[0].data["small"]), SMALL);
    // Through the WAL into the log, and read from there.
    let e = env.events(2).await;
    let appended = e[1].new_record.as_ref().unwrap();
    assert_eq!(digits(&appended["data"]["big"]), BIG, "{appended}");
    assert_eq!(digits(&appended["data"]["small"]), SMALL, "{appended}");
    eventually("the append in /v1/stream-events", WAIT, || async {
        env.get("/v1/stream-events?type=measured").await.contains(BIG)
    })
    .await;
    assert_exact_text("GET /v1/stream-events", &env.get("/v1/stream-events?type=measured").await);
    env.stop().await;
}
