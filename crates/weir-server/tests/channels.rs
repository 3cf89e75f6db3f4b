//! Realtime channels against a real PostgreSQL and a real HTTP server: SSE through reqwest
//! (with a small SSE parser) and WebSocket through tokio-tungstenite. Entity, row and scoped
//! channels, several channels on one connection, resuming with `Last-Event-ID` / `after` while
//! writes go on, `processed` after an operator handled the change, a slow client dropped while
//! others are served, bad requests, the per-connection channel cap, live-only `subscribe`
//! during a replay (not replayed, never leaked in the hub), keys containing `/`, and shutdown
//! closing the streams.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, Stream, StreamExt};
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;
use weir_consumer::{Operator, OperatorError, Selector};
use weir_core::{ChannelConfig, Config, Event, Secret};
use weir_server::Server;
use weir_testkit::eventually;

/// Generous: the machine is small and other tests run beside.
const WAIT: Duration = Duration::from_secs(20);

/// Records every `posts` event it handles; fails (and so parks) a post titled `poison`.
struct Recorder {
    handled: Arc<Mutex<Vec<i64>>>,
}

impl Operator for Recorder {
    fn selector(&self) -> Selector {
        Selector { entities: vec!["posts".into()], kinds: vec![] }
    }
    async fn handle(&self, _tx: &mut PgConnection, e: &Event) -> Result<(), OperatorError> {
        let title = e.new_record.as_ref().and_then(|r| r.get("title"));
        if title.is_some_and(|t| t == "poison") {
            return Err(OperatorError::retry("poisoned on purpose"));
        }
        self.handled.lock().unwrap().push(e.position);
        Ok(())
    }
}

struct Env {
    pool: PgPool,
    base: String,
    ws_base: String,
    cancel: CancellationToken,
    running: Option<weir::Running>,
    server: Arc<Server>,
    serving: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    handled: Arc<Mutex<Vec<i64>>>,
    _db: weir_testkit::TestDatabase<'static>,
}

impl Env {
    async fn new(client_buffer: usize) -> Env {
        let db = weir_testkit::shared().database("channels").unwrap();
        let url = db.url();
        let pool = PgPoolOptions::new().max_connections(8).connect(&url).await.unwrap();
        sqlx::raw_sql(
            "create table posts (id int primary key, title text, body text);
             create table comments (id int primary key, post_id int, body text);
             alter table comments replica identity full;
             create table tags (a int, b int, label text, primary key (a, b));
             create table labels (id text primary key, body text);",
        )
        .execute(&pool)
        .await
        .unwrap();
        let mut config = Config::default();
        config.database.url = Some(Secret::new(url.clone()));
        config.source.slot = db.name().to_string();
        config.consumers.lanes = 2;
        config.consumers.on_exhausted = weir_core::OnExhausted::Park;
        config.consumers.retry = weir_core::RetryConfig {
            min_restart_time: Duration::from_millis(10),
            backoff_multiplicator: 1.0,
            max_restart_time: Duration::from_millis(10),
            max_retries: 1,
        };
        config.http.client_buffer = client_buffer;
        config.http.max_wait = Duration::from_secs(1);
        config.channels.insert(
            "comments".into(),
            ChannelConfig { scopes: [("post_id".to_string(), "posts".to_string())].into() },
        );
        weir::setup::init(&pool, &config).await.unwrap();
        let handled = Arc::new(Mutex::new(Vec::new()));
        let running = weir::Weir::builder(config.clone())
            .pool(pool.clone())
            .operator("recorder", Recorder { handled: handled.clone() })
            .start()
            .await
            .unwrap();
        let cancel = CancellationToken::new();
        let server = Arc::new(
            Server::start(pool.clone(), config, running.wake(), cancel.clone()).await.unwrap(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (s, c) = (server.clone(), cancel.clone());
        let serving = Some(tokio::spawn(async move { s.serve(listener, c).await }));
        Env {
            pool,
            base: format!("http://{addr}"),
            ws_base: format!("ws://{addr}"),
            cancel,
            running: Some(running),
            server,
            serving,
            handled,
            _db: db,
        }
    }

    async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).execute(&self.pool).await.unwrap();
    }

    /// Positions of the logged events of `entity`, waiting until there are at least `n`.
    async fn positions(&self, entity: &str, n: usize) -> Vec<i64> {
        let got = Mutex::new(Vec::new());
        eventually(&format!("{n} {entity} events logged"), WAIT, || async {
            let positions: Vec<i64> = sqlx::query_scalar(
                "select position from weir.events where entity = $1 order by position",
            )
            .bind(entity)
            .fetch_all(&self.pool)
            .await
            .unwrap();
            let enough = positions.len() >= n;
            *got.lock().unwrap() = positions;
            enough
        })
        .await;
        got.into_inner().unwrap()
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
}

impl Sse {
    async fn connect(env: &Env, query: &str, last_event_id: Option<&str>) -> Sse {
        let mut req = reqwest::Client::new().get(format!("{}/v1/channels/sse?{query}", env.base));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200, "{query}");
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Sse { stream: Box::pin(resp.bytes_stream()), buf: String::new() }
    }

    /// The next message (comments skipped); `None` when the stream ended.
    async fn next(&mut self) -> Option<SseMsg> {
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
            let chunk = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("no SSE message within the timeout");
            match chunk {
                Some(Ok(bytes)) => self.buf.push_str(std::str::from_utf8(&bytes).unwrap()),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next `change` or `processed` message (anything else is a failure).
    async fn message(&mut self) -> SseMsg {
        let m = self.next().await.expect("the stream ended");
        assert!(m.event == "change" || m.event == "processed", "unexpected {m:?}");
        m
    }
}

fn kind(m: &SseMsg) -> &str {
    m.data["event"]["kind"].as_str().unwrap()
}

fn channel(m: &SseMsg) -> &str {
    m.data["channel"].as_str().unwrap()
}

fn position(m: &SseMsg) -> i64 {
    m.data["position"].as_i64().unwrap()
}

#[tokio::test]
async fn entity_channel_gets_every_change_in_log_order() {
    let env = Env::new(4096).await;
    let mut sse = Sse::connect(&env, "channel=posts", None).await;
    env.exec("insert into posts values (1, 'a', 'x'), (2, 'b', 'y')").await;
    env.exec("insert into comments values (1, 1, 'not a post')").await;
    env.exec("update posts set title = 'a2' where id = 1").await;
    env.exec("delete from posts where id = 2").await;
    let expected = env.positions("posts", 4).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let m = sse.message().await;
        assert_eq!(m.event, "change");
        assert_eq!(channel(&m), "posts");
        assert_eq!(m.id.as_deref(), Some(position(&m).to_string().as_str()));
        assert_eq!(m.data["event"]["entity"], "posts");
        assert_eq!(m.data["event"]["position"], m.data["position"]);
        got.push((position(&m), kind(&m).to_string()));
    }
    let positions: Vec<i64> = got.iter().map(|g| g.0).collect();
    assert_eq!(positions, expected);
    let kinds: Vec<&str> = got.iter().map(|g| g.1.as_str()).collect();
    assert_eq!(kinds, ["insert", "insert", "update", "delete"]);
    env.stop().await;
}

#[tokio::test]
async fn row_channel_gets_only_that_row() {
    let env = Env::new(4096).await;
    let mut one = Sse::connect(&env, "channel=posts/1", None).await;
    let mut tag = Sse::connect(&env, "channel=tags/1,2", None).await;
    env.exec("insert into posts values (1, 'a', 'x'), (2, 'b', 'y')").await;
    env.exec("update posts set title = 'b2' where id = 2").await;
    env.exec("update posts set title = 'a2' where id = 1").await;
    env.exec("insert into tags values (2, 1, 'other'), (1, 2, 'mine')").await;
    env.exec("delete from posts where id = 2").await;
    env.exec("delete from posts where id = 1").await;
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let m = one.message().await;
        assert_eq!(channel(&m), "posts/1");
        assert_eq!(m.data["event"]["key"]["id"], 1);
        kinds.push(kind(&m).to_string());
    }
    assert_eq!(kinds, ["insert", "update", "delete"]);
    let m = tag.message().await;
    assert_eq!(channel(&m), "tags/1,2");
    assert_eq!(m.data["event"]["new_record"]["label"], "mine");
    env.stop().await;
}

#[tokio::test]
async fn scoped_channel_follows_a_comment_moved_between_posts() {
    let env = Env::new(4096).await;
    let mut first = Sse::connect(&env, "channel=posts/1/comments", None).await;
    let mut second = Sse::connect(&env, "channel=posts/2/comments", None).await;
    env.exec("insert into comments values (10, 1, 'on 1')").await;
    env.exec("insert into comments values (11, 2, 'on 2')").await;
    env.exec("update comments set post_id = 2 where id = 10").await; // leaves 1, joins 2
    env.exec("update comments set body = 'still on 2' where id = 10").await;
    env.exec("delete from comments where id = 11").await;
    env.exec("insert into comments values (12, 1, 'last on 1')").await;
    let seen = |m: &SseMsg| {
        (
            m.data["event"]["key"]["id"].as_i64().unwrap(),
            kind(m).to_string(),
            channel(m).to_string(),
        )
    };
    let mut on_first = Vec::new();
    for _ in 0..3 {
        on_first.push(seen(&first.message().await));
    }
    let c1 = "posts/1/comments".to_string();
    assert_eq!(
        on_first,
        [
            (10, "insert".into(), c1.clone()),
            (10, "update".into(), c1.clone()),
            (12, "insert".into(), c1)
        ]
    );
    let mut on_second = Vec::new();
    for _ in 0..4 {
        on_second.push(seen(&second.message().await));
    }
    let c2 = "posts/2/comments".to_string();
    assert_eq!(
        on_second,
        [
            (11, "insert".into(), c2.clone()),
            (10, "update".into(), c2.clone()),
            (10, "update".into(), c2.clone()),
            (11, "delete".into(), c2)
        ]
    );
    env.stop().await;
}

#[tokio::test]
async fn several_channels_on_one_connection() {
    let env = Env::new(4096).await;
    let mut sse =
        Sse::connect(&env, "channel=posts,posts/1/comments&channel=comments/20", None).await;
    env.exec("insert into posts values (1, 'a', 'x')").await;
    env.exec("insert into comments values (20, 1, 'both')").await;
    env.exec("insert into comments values (21, 1, 'scoped only')").await;
    env.exec("insert into comments values (22, 2, 'none')").await;
    env.exec("insert into posts values (2, 'b', 'y')").await;
    let positions = env.positions("posts", 2).await;
    let comments = env.positions("comments", 3).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        let m = sse.message().await;
        got.push((position(&m), channel(&m).to_string()));
    }
    assert_eq!(
        got,
        [
            (positions[0], "posts".to_string()),
            (comments[0], "comments/20".to_string()),
            (comments[0], "posts/1/comments".to_string()),
            (comments[1], "posts/1/comments".to_string()),
            (positions[1], "posts".to_string()),
        ]
    );
    env.stop().await;
}

/// Inserts posts `from..=to`, one transaction each.
fn writer(pool: PgPool, from: i32, to: i32) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for id in from..=to {
            sqlx::query("insert into posts values ($1, 'p', 'b')")
                .bind(id)
                .execute(&pool)
                .await
                .unwrap();
        }
    })
}

#[tokio::test]
async fn sse_resume_with_last_event_id_gets_every_event_exactly_once() {
    let env = Env::new(4096).await;
    let total = 150;
    let mut sse = Sse::connect(&env, "channel=posts", None).await;
    let writes = writer(env.pool.clone(), 1, total);
    let mut got = Vec::new();
    let mut last_id = String::new();
    while got.len() < 30 {
        let m = sse.message().await;
        last_id = m.id.clone().unwrap();
        got.push(position(&m));
    }
    drop(sse);
    // Writes go on while the client is away.
    env.positions("posts", got.len() + 30).await;
    let mut sse = Sse::connect(&env, "channel=posts", Some(&last_id)).await;
    while got.len() < total as usize {
        let m = sse.message().await;
        got.push(position(&m));
    }
    writes.await.unwrap();
    let expected = env.positions("posts", total as usize).await;
    assert_eq!(got, expected, "every event exactly once, in order");
    env.stop().await;
}

async fn ws_connect(
    env: &Env,
    query: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let (ws, _) =
        tokio_tungstenite::connect_async(format!("{}/v1/channels/ws?{query}", env.ws_base))
            .await
            .unwrap();
    ws
}

/// The next text frame as JSON; `Err(frame)` for a close frame.
async fn ws_next<S>(ws: &mut S) -> Result<Value, Option<(u16, String)>>
where
    S: Stream<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let m = tokio::time::timeout(WAIT, ws.next()).await.expect("no frame within the timeout");
        match m {
            Some(Ok(WsMessage::Text(t))) => return Ok(serde_json::from_str(t.as_str()).unwrap()),
            Some(Ok(WsMessage::Close(f))) => {
                return Err(f.map(|f| (u16::from(f.code), f.reason.to_string())));
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(None),
        }
    }
}

#[tokio::test]
async fn ws_resume_with_after_gets_every_event_exactly_once() {
    let env = Env::new(4096).await;
    let total = 150;
    let mut ws = ws_connect(&env, "channel=posts").await;
    let writes = writer(env.pool.clone(), 1, total);
    let mut got = Vec::new();
    let mut last_id = String::new();
    while got.len() < 40 {
        let m = ws_next(&mut ws).await.unwrap();
        assert_eq!(m["type"], "change");
        assert_eq!(m["channel"], "posts");
        assert_eq!(m["event"]["position"], m["position"]);
        last_id = m["id"].as_str().unwrap().to_string();
        got.push(m["position"].as_i64().unwrap());
    }
    ws.close(None).await.unwrap();
    drop(ws);
    env.positions("posts", got.len() + 30).await;
    let mut ws = ws_connect(&env, &format!("channel=posts&after={last_id}")).await;
    while got.len() < total as usize {
        let m = ws_next(&mut ws).await.unwrap();
        got.push(m["position"].as_i64().unwrap());
    }
    writes.await.unwrap();
    let expected = env.positions("posts", total as usize).await;
    assert_eq!(got, expected, "every event exactly once, in order");

    // A live-only addition over the same socket.
    ws.send(WsMessage::Text(r#"{"type":"subscribe","channels":["comments"]}"#.into()))
        .await
        .unwrap();
    // Frames are handled in order: once the error for the next one is back, the subscription
    // is registered.
    ws.send(WsMessage::Text(r#"{"type":"nonsense"}"#.into())).await.unwrap();
    let err = ws_next(&mut ws).await.unwrap();
    assert_eq!(err["type"], "error");
    env.exec("insert into comments values (1, 1, 'c')").await;
    let m = ws_next(&mut ws).await.unwrap();
    assert_eq!(m["channel"], "comments");
    env.stop().await;
}

#[tokio::test]
async fn a_cursor_older_than_the_log_replays_from_the_oldest_with_a_gap_notice() {
    let env = Env::new(4096).await;
    env.exec("insert into posts values (1, 'a', 'x')").await;
    env.exec("insert into posts values (2, 'b', 'y')").await;
    env.exec("insert into posts values (3, 'c', 'z')").await;
    let positions = env.positions("posts", 3).await;
    // As retention would: the first event is gone.
    env.exec(&format!("delete from weir.events where position <= {}", positions[0])).await;
    let mut sse = Sse::connect(&env, "channel=posts&after=0", None).await;
    let gap = sse.next().await.unwrap();
    assert_eq!(gap.event, "gap");
    assert_eq!(gap.data["oldest"], positions[1]);
    let got = [position(&sse.message().await), position(&sse.message().await)];
    assert_eq!(got, positions[1..]);
    // And live after the replay.
    env.exec("insert into posts values (4, 'd', 'w')").await;
    let last = env.positions("posts", 3).await;
    assert_eq!(position(&sse.message().await), *last.last().unwrap());
    env.stop().await;
}

#[tokio::test]
async fn processed_arrives_after_the_operator_handled_the_change() {
    let env = Env::new(4096).await;
    let mut sse = Sse::connect(&env, "channel=posts&channel=processed", None).await;
    env.exec("insert into posts values (1, 'a', 'x')").await;
    let p1 = env.positions("posts", 1).await[0];
    let (mut change_seen, mut processed_seen) = (false, false);
    let mut last_id = String::new();
    while !(change_seen && processed_seen) {
        let m = sse.message().await;
        assert_eq!(position(&m), p1);
        let id = m.id.clone().unwrap();
        let (c, q) = id.split_once(':').expect("ids carry both cursors");
        if m.event == "change" {
            assert_eq!(c, p1.to_string());
            change_seen = true;
        } else {
            assert_eq!(q, p1.to_string());
            assert_eq!(m.data["channel"], "processed");
            assert_eq!(m.data["entity"], "posts");
            assert_eq!(m.data["key"]["id"], 1);
            assert_eq!(m.data["kind"], "insert");
            assert!(m.data["lsn"].as_str().unwrap().contains('/'));
            assert!(
                env.handled.lock().unwrap().contains(&p1),
                "processed before the operator handled {p1}"
            );
            processed_seen = true;
        }
        last_id = id;
    }
    drop(sse);

    // While away: a post (the recorder listens) and a comment (nobody listens).
    env.exec("insert into posts values (2, 'b', 'y')").await;
    env.exec("insert into comments values (1, 2, 'c')").await;
    let p2 = env.positions("posts", 2).await[1];
    let c1 = env.positions("comments", 1).await[0];
    let mut sse = Sse::connect(&env, "channel=posts,processed", Some(&last_id)).await;
    let mut changes = Vec::new();
    let mut processed = Vec::new();
    while changes.is_empty() || processed.len() < 2 {
        let m = sse.message().await;
        if m.event == "change" {
            changes.push(position(&m));
        } else {
            processed.push(position(&m));
            if position(&m) == p2 {
                assert!(env.handled.lock().unwrap().contains(&p2));
            }
        }
    }
    assert_eq!(changes, [p2], "nothing twice after resuming");
    assert_eq!(processed, [p2, c1]);
    env.stop().await;
}

#[tokio::test]
async fn a_parked_event_gets_no_processed_notification() {
    let env = Env::new(4096).await;
    let mut ws = ws_connect(&env, "channel=processed").await;
    env.exec("insert into posts values (1, 'fine', '')").await;
    env.exec("insert into posts values (2, 'poison', '')").await;
    env.exec("insert into posts values (3, 'fine', '')").await;
    let p = env.positions("posts", 3).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let m = ws_next(&mut ws).await.unwrap();
        assert_eq!(m["type"], "processed");
        let id = m["id"].as_str().unwrap();
        assert!(id.ends_with(&format!(":{}", m["position"])), "{id}");
        got.push(m["position"].as_i64().unwrap());
    }
    assert_eq!(got, [p[0], p[2]], "the parked event is not announced");
    let parked: i64 = sqlx::query_scalar("select count(*) from weir.parked where position = $1")
        .bind(p[1])
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(parked, 1);

    // Discarded later (as `weir parked discard` does; a successful retry also deletes the row):
    // a replay still agrees with what was sent live.
    let n = weir_consumer::status::discard_parked(&env.pool, "recorder", Some(p[1])).await.unwrap();
    assert_eq!(n, 1);
    let mut again = ws_connect(&env, &format!("channel=processed&after=0:{}", p[0] - 1)).await;
    let mut replayed = Vec::new();
    while replayed.len() < 2 {
        let m = ws_next(&mut again).await.unwrap();
        assert_eq!(m["type"], "processed");
        replayed.push(m["position"].as_i64().unwrap());
    }
    assert_eq!(replayed, got, "the replay announces what the live tail announced");
    env.stop().await;
}

/// A `subscribe` received while the session replays is live only: the added channel's history
/// is not replayed, its messages start once the session is live, and a connection that ends
/// before then leaves nothing registered in the hub.
#[tokio::test]
async fn ws_subscribe_during_replay_is_live_only_and_leaks_nothing() {
    let env = Env::new(4096).await;
    let backlog = 5000;
    env.exec(&format!("insert into posts select g, 'p', 'b' from generate_series(1, {backlog}) g"))
        .await;
    env.exec("insert into comments values (1, 1, 'history')").await;
    env.positions("comments", 1).await;
    let hub = env.server.state().hub().clone();
    let subscribe = r#"{"type":"subscribe","channels":["comments"]}"#;

    // Subscribes mid-replay, then goes away at once.
    let mut ws = ws_connect(&env, "channel=posts&after=0").await;
    ws.send(WsMessage::Text(subscribe.into())).await.unwrap();
    // Frames are handled in order: once this one's error is back, the subscribe was handled.
    ws.send(WsMessage::Text(r#"{"type":"nonsense"}"#.into())).await.unwrap();
    let mut replayed = 0;
    loop {
        let m = ws_next(&mut ws).await.unwrap();
        if m["type"] == "error" {
            break;
        }
        replayed += 1;
    }
    assert!(replayed < backlog, "the subscribe arrived after the replay ({replayed} replayed)");
    drop(ws);
    eventually(
        "a connection that subscribed during its replay is unregistered after it ended",
        WAIT,
        || std::future::ready(hub.clients() == 0),
    )
    .await;

    // Subscribes mid-replay and stays: the replay carries posts only.
    let mut ws = ws_connect(&env, "channel=posts&after=0").await;
    ws.send(WsMessage::Text(subscribe.into())).await.unwrap();
    let mut posts = 0;
    while posts < backlog {
        let m = ws_next(&mut ws).await.unwrap();
        assert_eq!(m["channel"], "posts", "the added channel's history was replayed: {m}");
        posts += 1;
    }
    // Comments written from now on arrive (once the session is live, which follows the replay
    // at once; a comment written just before that moment is not for it).
    let mut next_comment = 100;
    let live = loop {
        env.exec(&format!("insert into comments values ({next_comment}, 1, 'live')")).await;
        next_comment += 1;
        match tokio::time::timeout(Duration::from_millis(500), ws_next(&mut ws)).await {
            Ok(m) => break m.unwrap(),
            Err(_) => assert!(next_comment < 120, "no live comment reached the subscriber"),
        }
    };
    assert_eq!(live["channel"], "comments");
    assert!(live["event"]["key"]["id"].as_i64().unwrap() >= 100, "{live}");
    drop(ws);
    eventually("the client is unregistered", WAIT, || std::future::ready(hub.clients() == 0)).await;
    env.stop().await;
}

#[tokio::test]
async fn channels_per_connection_are_capped() {
    let env = Env::new(4096).await;
    let names = |n: usize| (0..n).map(|i| format!("t{i}")).collect::<Vec<_>>().join(",");
    let http = reqwest::Client::new();
    let resp = http
        .get(format!("{}/v1/channels/sse?channel={}", env.base, names(257)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "bad_request");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("at most 256"), "{message}");
    // The limit itself is fine.
    drop(Sse::connect(&env, &format!("channel={}", names(256)), None).await);

    // WebSocket: 255 channels, then subscribes that would pass 256 are refused whole.
    let mut ws = ws_connect(&env, &format!("channel=comments,{}", names(254))).await;
    let subscribe = |channels: &str| {
        WsMessage::Text(format!(r#"{{"type":"subscribe","channels":{channels}}}"#).into())
    };
    ws.send(subscribe(r#"["posts","extra1"]"#)).await.unwrap();
    let err = ws_next(&mut ws).await.unwrap();
    assert_eq!(err["type"], "error");
    assert!(err["message"].as_str().unwrap().contains("at most 256"), "{err}");
    ws.send(subscribe(r#"["extra2"]"#)).await.unwrap(); // the 256th: accepted, no reply
    ws.send(subscribe(r#"["posts"]"#)).await.unwrap();
    let err = ws_next(&mut ws).await.unwrap();
    assert_eq!(err["type"], "error", "a 257th channel must be refused");
    // `posts` was never added: the comment written after the post is the first message.
    env.exec("insert into posts values (1, 'a', 'x')").await;
    env.exec("insert into comments values (1, 1, 'c')").await;
    let m = ws_next(&mut ws).await.unwrap();
    assert_eq!(m["channel"], "comments", "{m}");
    env.stop().await;
}

/// `labels/5/comments` is the scope channel of `comments` under `labels`: a `labels` row whose
/// key is `5/comments` must not be delivered there, live or replayed.
#[tokio::test]
async fn a_key_with_a_slash_reaches_no_channel_of_another_shape() {
    let env = Env::new(4096).await;
    let query = "channel=labels&channel=labels/5/comments";
    let mut sse = Sse::connect(&env, query, None).await;
    env.exec("insert into labels values ('5/comments', 'slash')").await;
    env.exec("insert into labels values ('plain', 'x')").await;
    let p = env.positions("labels", 2).await;
    let expected = vec![(p[0], "labels".to_string()), (p[1], "labels".to_string())];
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = sse.message().await;
        got.push((position(&m), channel(&m).to_string()));
    }
    assert_eq!(got, expected, "live");
    let mut again = Sse::connect(&env, &format!("{query}&after={}", p[0] - 1), None).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = again.message().await;
        got.push((position(&m), channel(&m).to_string()));
    }
    assert_eq!(got, expected, "replayed");
    env.stop().await;
}

#[tokio::test]
async fn slow_client_is_dropped_and_others_keep_being_served() {
    let mut env = Env::new(16).await;
    let http = reqwest::Client::new();
    // Connected, never read while the writes go on.
    let slow =
        http.get(format!("{}/v1/channels/sse?channel=posts", env.base)).send().await.unwrap();
    // Never read at all: it must not hold up the shutdown.
    let stuck =
        http.get(format!("{}/v1/channels/sse?channel=posts", env.base)).send().await.unwrap();
    // The same over WebSocket.
    let mut slow_ws = ws_connect(&env, "channel=posts").await;
    let mut fast = Sse::connect(&env, "channel=posts", None).await;
    let fast_reader = tokio::spawn(async move {
        let mut n = 0usize;
        let mut last = 0;
        // Until told to stop by a row with title 'stop'.
        loop {
            let m = fast.message().await;
            assert!(position(&m) > last);
            last = position(&m);
            n += 1;
            if m.data["event"]["new_record"]["title"] == "stop" {
                return n;
            }
        }
    });
    let dropped = || async {
        let text =
            http.get(format!("{}/metrics", env.base)).send().await.unwrap().text().await.unwrap();
        text.lines().any(|l| {
            l.starts_with("weir_channel_dropped_total{reason=\"slow_client\"}")
                && l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() >= 3.0
        })
    };
    // Big rows fill the socket buffers, then the 16-message queue.
    let mut next_id = 1;
    let mut rounds = 0;
    while !dropped().await {
        rounds += 1;
        assert!(rounds <= 40, "the slow client was never dropped");
        env.exec(&format!(
            "insert into posts select g, 'big', repeat('x', 65536) from generate_series({next_id}, {}) g",
            next_id + 49
        ))
        .await;
        next_id += 50;
        env.positions("posts", (next_id - 1) as usize).await;
        // Let the hub dispatch what was logged before looking again.
        let head = env.positions("posts", (next_id - 1) as usize).await.last().copied().unwrap();
        eventually("the hub dispatched what was logged", WAIT, || {
            std::future::ready(env.server.state().hub().position() >= head)
        })
        .await;
    }
    env.exec(&format!("insert into posts values ({next_id}, 'stop', '')")).await;
    let fast_count =
        tokio::time::timeout(Duration::from_secs(60), fast_reader).await.unwrap().unwrap();
    assert_eq!(fast_count, next_id as usize, "the fast client got every change");

    // The slow client's stream: what it had buffered, then the close, then the end.
    let mut slow = Sse { stream: Box::pin(slow.bytes_stream()), buf: String::new() };
    let mut changes = 0;
    let close = loop {
        let m = slow.next().await.expect("the stream ended without a close message");
        if m.event == "close" {
            break m;
        }
        assert_eq!(m.event, "change");
        changes += 1;
    };
    assert!(changes < next_id, "the slow client cannot have got everything");
    assert_eq!(close.data["reason"], "slow_client");
    assert!(close.data["message"].as_str().unwrap().contains("Last-Event-ID"));
    assert!(slow.next().await.is_none(), "the stream ends after the close message");

    let mut changes = 0;
    let (code, reason) = loop {
        match ws_next(&mut slow_ws).await {
            Ok(m) => {
                assert_eq!(m["type"], "change");
                changes += 1;
            }
            Err(close) => break close.expect("a close frame"),
        }
    };
    assert!(changes < next_id);
    assert_eq!(code, 1008);
    assert!(reason.starts_with("slow_client:"), "{reason}");

    // New clients are still served.
    let mut again = Sse::connect(&env, "channel=posts/1", None).await;
    env.exec("update posts set title = 'after' where id = 1").await;
    let m = again.message().await;
    assert_eq!(m.data["event"]["new_record"]["title"], "after");

    env.cancel.cancel();
    let serving = env.serving.take().unwrap();
    tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .expect("the server did not stop while a client was not reading")
        .unwrap()
        .unwrap();
    drop(stuck);
    env.stop().await;
}

#[tokio::test]
async fn bad_requests_get_400_json() {
    let env = Env::new(4096).await;
    let http = reqwest::Client::new();
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("sse", "", None),
        ("sse", "after=3", None),
        ("sse", "channel=", None),
        ("sse", "channel=/", None),
        ("sse", "channel=a//b", None),
        ("sse", "channel=a/b/c/d", None),
        ("sse", "channel=posts,", None),
        ("sse", "channel=posts&after=abc", None),
        ("sse", "channel=posts&after=1:x", None),
        ("sse", "channel=posts", Some("nope")),
        ("ws", "", None),
        ("ws", "channel=a//b", None),
        ("ws", "channel=posts&after=-1", None),
        ("ws", "channel=posts", None), // not an upgrade request
    ];
    for (transport, query, last_id) in cases {
        let mut req = http.get(format!("{}/v1/channels/{transport}?{query}", env.base));
        if let Some(id) = last_id {
            req = req.header("Last-Event-ID", *id);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 400, "{transport}?{query}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "bad_request", "{transport}?{query}: {body}");
        assert!(!body["message"].as_str().unwrap().is_empty());
    }
    // Both routes are in the OpenAPI document.
    let doc: Value = http
        .get(format!("{}/v1/openapi.json", env.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["paths"]["/v1/channels/sse"]["get"].is_object());
    assert!(doc["paths"]["/v1/channels/ws"]["get"].is_object());
    // A real WebSocket handshake with a bad channel is refused the same way.
    let err =
        tokio_tungstenite::connect_async(format!("{}/v1/channels/ws?channel=a//b", env.ws_base))
            .await
            .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 400),
        other => panic!("expected an HTTP 400, got {other}"),
    }
    // Channel names are case-sensitive: `Posts` is not `posts`.
    let mut upper = Sse::connect(&env, "channel=Posts&channel=posts/1", None).await;
    env.exec("insert into posts values (1, 'a', 'x')").await;
    let m = upper.message().await;
    assert_eq!(channel(&m), "posts/1");
    env.stop().await;
}

#[tokio::test]
async fn shutdown_closes_every_stream() {
    let env = Env::new(4096).await;
    let mut sse = Sse::connect(&env, "channel=posts", None).await;
    let mut ws = ws_connect(&env, "channel=posts").await;
    env.exec("insert into posts values (1, 'a', 'x')").await;
    assert_eq!(sse.message().await.event, "change");
    assert_eq!(ws_next(&mut ws).await.unwrap()["type"], "change");
    env.cancel.cancel();
    let close = sse.next().await.unwrap();
    assert_eq!(close.event, "close");
    assert_eq!(close.data["reason"], "shutdown");
    assert!(sse.next().await.is_none());
    let (code, reason) = ws_next(&mut ws).await.unwrap_err().unwrap();
    assert_eq!(code, 1001);
    assert!(reason.starts_with("shutdown"));
    env.stop().await;
}

/// Resident memory of this process, in bytes.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap() * 4096
}

/// Opens `n` idle connections with raw sockets (so the client side costs next to nothing) and
/// returns the growth of resident memory per connection.
async fn idle_cost(env: &Env, n: usize, request: impl Fn(usize) -> String, until: &str) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = env.base.trim_start_matches("http://").to_string();
    let before = rss();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(request(i).as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 512];
        while !String::from_utf8_lossy(&seen).contains(until) {
            let k = s.read(&mut buf).await.unwrap();
            assert!(k > 0, "closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..k]);
        }
        conns.push(s);
    }
    eventually(&format!("{n} clients registered"), WAIT, || {
        std::future::ready(env.server.state().hub().clients() >= n)
    })
    .await;
    let per = rss().saturating_sub(before) / n;
    drop(conns);
    per
}

/// Not a check but a measurement: `cargo test -p weir-server --test channels -- --ignored
/// --nocapture idle_client_memory` prints the memory an idle SSE and WebSocket client costs the
/// server (the target is at most 64 KiB each, connection included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand"]
async fn idle_client_memory() {
    let env = Env::new(4096).await;
    let n = 2000;
    // Warm up the allocator and the runtime.
    let sse = |i: usize| {
        format!("GET /v1/channels/sse?channel=posts/{i} HTTP/1.1\r\nHost: localhost\r\n\r\n")
    };
    idle_cost(&env, 100, sse, ": ok").await;
    let gone = || std::future::ready(env.server.state().hub().clients() == 0);
    eventually("the warm-up clients are gone", WAIT, gone).await;
    let per_sse = idle_cost(&env, n, sse, ": ok").await;
    eventually("the SSE clients are gone", WAIT, gone).await;
    let ws = |i: usize| {
        format!(
            "GET /v1/channels/ws?channel=posts/{i} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    let per_ws = idle_cost(&env, n, ws, "\r\n\r\n").await;
    println!("idle client: SSE {per_sse} bytes, WebSocket {per_ws} bytes (resident, {n} clients)");
    assert!(per_sse <= 64 * 1024 && per_ws <= 64 * 1024);
    env.stop().await;
}
