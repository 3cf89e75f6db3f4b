//! The HTTP server against hostile and careless clients, over real sockets to a real
//! `Server::serve` on a real PostgreSQL: a slowloris crowd (request heads trickled a byte at a
//! time) neither starves other clients nor holds its connections past `http.header_timeout`;
//! an idle connection is closed at that timeout too; a body over `http.max_body_bytes` is
//! refused with `413` before it is sent (a declared length) or as soon as the limit is passed
//! (chunked), and the connection is closed after the answer.
//!
//! The hostile clients speak raw HTTP/1.1 over `TcpStream`s, so what is on the wire is exactly
//! what the test says; the ordinary ones are reqwest.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use weir::Config;
use weir_core::Secret;
use weir_server::Server;

const TOKEN: &str = "test-token-0123456789abcdef";

/// How long any single answer may take in these tests: generous, the point is that it comes.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

struct Env {
    addr: SocketAddr,
    cancel: CancellationToken,
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
    _pool: PgPool,
    _db: weir_testkit::TestDatabase<'static>,
}

impl Env {
    /// A server with `http.header_timeout` and `http.max_body_bytes` as given and a token.
    async fn start(prefix: &str, header_timeout: Duration, max_body_bytes: usize) -> Env {
        let db = weir_testkit::shared().database(prefix).unwrap();
        let pool = PgPool::connect(&db.url()).await.unwrap();
        sqlx::raw_sql("create table posts (id int primary key, updated_at timestamptz)")
            .execute(&pool)
            .await
            .unwrap();
        let mut config = Config::default();
        config.database.url = Some(Secret::new(db.url()));
        config.source.slot = db.name().to_string();
        config.source.tables = vec!["posts".into()];
        config.http.token = Some(Secret::new(TOKEN));
        config.http.header_timeout = header_timeout;
        config.http.max_body_bytes = max_body_bytes;
        config.http.max_wait = Duration::from_secs(2);
        config.validate().unwrap();
        weir::setup::init(&pool, &config).await.unwrap();
        let cancel = CancellationToken::new();
        let (wake, _) = weir_log::listen_for_appends(pool.clone(), cancel.clone());
        let server = Server::start(pool.clone(), config, wake, cancel.clone()).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let c = cancel.clone();
        let serving = tokio::spawn(async move { server.serve(listener, c).await });
        Env { addr, cancel, serving, _pool: pool, _db: db }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.serving)
            .await
            .expect("serve returns once cancelled")
            .unwrap()
            .unwrap();
    }
}

/// One response read off a raw connection: the status, the head's text, the body (by
/// `Content-Length`, which every answer of these tests has).
struct Response {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn read_response(stream: &mut TcpStream) -> Response {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(ANSWER_WITHIN, stream.read(&mut chunk))
            .await
            .expect("no response head in time")
            .expect("reading the response");
        assert!(n > 0, "closed before a whole head: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no content-length in {head}"));
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(ANSWER_WITHIN, stream.read(&mut chunk))
            .await
            .expect("no whole body in time")
            .expect("reading the body");
        assert!(n > 0, "closed inside the body");
        body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(body.len(), length, "bytes beyond the answer's body");
    Response { status, head, body }
}

/// Waits for the server to close `stream`; panics if it sends anything instead. A close is a
/// read of 0 bytes (FIN) or a reset (the server closed with bytes of ours unread).
async fn closed_by_server(stream: &mut TcpStream, within: Duration) {
    let mut chunk = [0u8; 1024];
    match tokio::time::timeout(within, stream.read(&mut chunk)).await {
        Err(_) => panic!("the server did not close the connection within {within:?}"),
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => panic!("expected a close, got {:?}", String::from_utf8_lossy(&chunk[..n])),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(Err(e)) => panic!("expected a close, got the error {e}"),
    }
}

/// A slowloris client: connects, then sends a request head that never ends, one byte every
/// `every`, until the server closes the connection (or `give_up` after connecting); passes
/// `ready` once it has sent its first byte. Returns when it connected and how long the server
/// let it trickle, and the bytes it had sent.
async fn trickle(
    addr: SocketAddr,
    every: Duration,
    give_up: Duration,
    ready: Arc<tokio::sync::Barrier>,
) -> (Instant, Duration, usize) {
    const HEAD: &[u8] = b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ";
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let connected = Instant::now();
    stream.write_all(&HEAD[..1]).await.unwrap();
    let mut sent = 1usize;
    ready.wait().await;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut chunk = [0u8; 1024];
    let give_up = tokio::time::sleep(give_up.saturating_sub(connected.elapsed()));
    let mut give_up = std::pin::pin!(give_up);
    loop {
        tokio::select! {
            _ = &mut give_up => break,
            read = stream.read(&mut chunk) => {
                match read {
                    Ok(0) => break,
                    Ok(n) => panic!(
                        "a trickled head got an answer: {:?}",
                        String::from_utf8_lossy(&chunk[..n])
                    ),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                    Err(e) => panic!("a trickling connection failed: {e}"),
                }
            }
            _ = tick.tick() => {
                let byte = HEAD.get(sent).copied().unwrap_or(b'a');
                if stream.write_all(&[byte]).await.is_err() {
                    // Closed under us: the read above says how on the next turn.
                    continue;
                }
                sent += 1;
            }
        }
    }
    (connected, connected.elapsed(), sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_crowd_starves_nobody_and_is_cut_at_the_header_timeout() {
    const CROWD: usize = 200;
    const ORDINARY: usize = 200;
    let timeout = Duration::from_secs(3);
    let slack = Duration::from_secs(2);
    let env = Env::start("http_slowloris", timeout, 4096).await;

    let ready = Arc::new(tokio::sync::Barrier::new(CROWD + 1));
    let every = Duration::from_millis(500);
    let give_up = timeout + slack + Duration::from_secs(3);
    let crowd: Vec<_> = (0..CROWD)
        .map(|_| tokio::spawn(trickle(env.addr, every, give_up, ready.clone())))
        .collect();
    // Every one of them connected and trickling before the ordinary clients come.
    ready.wait().await;

    // Ordinary clients, ten at a time, each request on a connection of its own (no pool):
    // what a slowloris attack starves first is the accepting of new connections.
    const AT_ONCE: usize = 10;
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let started = Instant::now();
    let mut ordinary = Vec::new();
    for w in 0..AT_ONCE {
        let (client, env_url) = (client.clone(), env.url(""));
        ordinary.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in (w..ORDINARY).step_by(AT_ONCE) {
                let path = if i % 2 == 0 { "/v1/health" } else { "/v1/process/check?lsn=0/0" };
                let url = format!("{env_url}{path}");
                let t = Instant::now();
                let r = client.get(&url).send().await.unwrap();
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap();
                answers.push((url, status, body, t.elapsed(), Instant::now()));
            }
            answers
        }));
    }
    let mut slowest = Duration::ZERO;
    let mut last_done = started;
    let mut answered = 0;
    for (url, status, body, took, done) in
        futures::future::join_all(ordinary).await.into_iter().flat_map(Result::unwrap)
    {
        answered += 1;
        assert_eq!(status, 200, "{url}: {body}");
        assert!(took < Duration::from_secs(2), "{url} took {took:?} beside the crowd");
        slowest = slowest.max(took);
        last_done = last_done.max(done);
    }

    // Every trickler was held for the header timeout, no less (so the ordinary requests above
    // really ran beside open trickling connections), and closed soon after it, no answer sent.
    let mut first_closed = None::<Instant>;
    for t in crowd {
        let (connected, held, sent) = t.await.unwrap();
        assert!(
            held + Duration::from_millis(50) >= timeout && held <= timeout + slack,
            "a trickling connection was held {held:?} (header timeout {timeout:?})"
        );
        assert!(sent >= 2, "it trickled {sent} bytes");
        let closed = connected + held;
        first_closed = Some(first_closed.map_or(closed, |f| f.min(closed)));
    }
    assert_eq!(answered, ORDINARY);
    let first_closed = first_closed.unwrap();
    assert!(
        last_done < first_closed,
        "the ordinary requests ended {:?} after the first trickler was cut: they did not all run \
         beside the crowd",
        last_done - first_closed
    );
    println!(
        "{ORDINARY} ordinary requests beside {CROWD} trickling connections: slowest {slowest:?}, \
         all done {:?} after they started",
        last_done - started
    );

    // And the server goes on serving once they are gone.
    let r = client.get(env.url("/v1/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_at_the_header_timeout() {
    let timeout = Duration::from_secs(1);
    let env = Env::start("http_idle", timeout, 4096).await;
    let slack = Duration::from_secs(2);

    // A connection that never sends a byte.
    let mut silent = TcpStream::connect(env.addr).await.unwrap();
    let t = Instant::now();
    closed_by_server(&mut silent, timeout + slack).await;
    assert!(t.elapsed() + Duration::from_millis(50) >= timeout, "closed after {:?}", t.elapsed());

    // A kept-alive connection after its answer: the wait for the next head is timed too.
    let mut kept = TcpStream::connect(env.addr).await.unwrap();
    kept.write_all(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let r = read_response(&mut kept).await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(!r.head.to_ascii_lowercase().contains("connection: close"), "{}", r.head);
    let t = Instant::now();
    // Still usable within the timeout.
    kept.write_all(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut kept).await.status, 200);
    closed_by_server(&mut kept, timeout + slack).await;
    assert!(t.elapsed() + Duration::from_millis(50) >= timeout, "closed after {:?}", t.elapsed());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_oversized_body_gets_413_before_it_is_sent() {
    let env = Env::start("http_413_declared", Duration::from_secs(10), 4096).await;
    let head = |extra: &str| {
        format!(
            "POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000000000\r\n{extra}\r\n"
        )
    };

    // A gigabyte declared, a few bytes sent: the answer comes without waiting for the rest.
    let mut stream = TcpStream::connect(env.addr).await.unwrap();
    let t = Instant::now();
    stream.write_all(format!("{}{{\"kind\"", head("")).as_bytes()).await.unwrap();
    let r = read_response(&mut stream).await;
    let took = t.elapsed();
    assert_eq!(r.status, 413, "{}", r.head);
    let body = r.json();
    assert_eq!(body["error"], "payload_too_large", "{body}");
    assert!(body["message"].as_str().unwrap().contains("http.max_body_bytes"), "{body}");
    assert!(took < Duration::from_secs(2), "413 took {took:?}");
    // The rest of the body will not be read: the server closes the connection.
    closed_by_server(&mut stream, ANSWER_WITHIN).await;

    // `Expect: 100-continue`: the client is told 413 instead of being asked for the body.
    let mut stream = TcpStream::connect(env.addr).await.unwrap();
    stream.write_all(head("Expect: 100-continue\r\n").as_bytes()).await.unwrap();
    let r = read_response(&mut stream).await;
    assert_eq!(r.status, 413, "no 100 Continue first: {}", r.head);
    assert_eq!(r.json()["error"], "payload_too_large");
    closed_by_server(&mut stream, ANSWER_WITHIN).await;

    // Without the token too: the size is checked before anything else.
    let mut stream = TcpStream::connect(env.addr).await.unwrap();
    stream
        .write_all(
            b"POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
              Content-Length: 1000000000\r\n\r\n",
        )
        .await
        .unwrap();
    let r = read_response(&mut stream).await;
    assert_eq!(r.status, 413, "{}", r.head);

    // The server is none the worse.
    let r = reqwest::get(env.url("/v1/health")).await.unwrap();
    assert_eq!(r.status(), 200);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_the_limit_gets_413_once_past_it() {
    let limit = 4096;
    let env = Env::start("http_413_chunked", Duration::from_secs(10), limit).await;
    let mut stream = TcpStream::connect(env.addr).await.unwrap();
    stream
        .write_all(
            format!(
                "POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // Chunks of 1,000 bytes up to a little over the limit, and never the last chunk: the
    // answer must come from the limit, not from the end of the body.
    let chunk = format!("{:x}\r\n{}\r\n", 1000, "x".repeat(1000));
    for _ in 0..limit / 1000 + 1 {
        stream.write_all(chunk.as_bytes()).await.unwrap();
    }
    let r = read_response(&mut stream).await;
    assert_eq!(r.status, 413, "{}", r.head);
    let body = r.json();
    assert_eq!(body["error"], "payload_too_large", "{body}");
    // The body was not read to its end: the connection is closed after the answer.
    closed_by_server(&mut stream, ANSWER_WITHIN).await;

    // A chunked body within the limit is read and answered on the same connection.
    let mut stream = TcpStream::connect(env.addr).await.unwrap();
    let job = r#"{"kind": "noop"}"#;
    stream
        .write_all(
            format!(
                "POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
                 {:x}\r\n{job}\r\n0\r\n\r\n",
                job.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let r = read_response(&mut stream).await;
    assert!(r.status < 300, "{} {}", r.head, String::from_utf8_lossy(&r.body));
    stream.write_all(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut stream).await.status, 200, "kept alive after a small body");
    env.stop().await;
}
