//! A webhook receiver for tests (feature `receiver`): a real HTTP/1.1 server on a random local
//! port that records every request and answers as the test's script says — a status with
//! headers and a body, a hang, or a connection closed without an answer.
//!
//! ```text
//! request ─► read the whole body ─► script(&request) ─► Answer ─► recorded (request, answer)
//!                                                           └─► sent: status / hang / close
//! ```
//!
//! Every connection task is owned by the server task, which the [`Receiver`] aborts when
//! dropped; a hang ends after its duration even when nobody waits for it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderMap;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::task::JoinSet;

/// A request as it arrived.
#[derive(Debug, Clone)]
pub struct Request {
    /// When its head arrived.
    pub at: Instant,
    /// The sender's address: the same for requests on one kept-alive connection.
    pub peer: SocketAddr,
    /// The method (`POST`).
    pub method: String,
    /// The path and query.
    pub path: String,
    /// Its headers.
    pub headers: HeaderMap,
    /// The exact body bytes.
    pub body: Bytes,
}

impl Request {
    /// A header's value as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// How the receiver answers one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A status, with headers and a body.
    Respond {
        /// The status code.
        status: u16,
        /// Headers to send.
        headers: Vec<(String, String)>,
        /// The body.
        body: String,
    },
    /// Hold the request this long, then answer 200 (the client has given up by then).
    Hang(Duration),
    /// Close the connection without answering.
    Close,
}

impl Answer {
    /// `200 OK`.
    pub fn ok() -> Self {
        Self::status(200)
    }

    /// A status without headers or body.
    pub fn status(status: u16) -> Self {
        Self::Respond { status, headers: Vec::new(), body: String::new() }
    }

    /// With a header added (only for [`Answer::Respond`]).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        if let Self::Respond { headers, .. } = &mut self {
            headers.push((name.into(), value.into()));
        }
        self
    }

    /// With a body (only for [`Answer::Respond`]).
    pub fn body(mut self, text: &str) -> Self {
        if let Self::Respond { body, .. } = &mut self {
            *body = text.into();
        }
        self
    }

    /// Whether it is a 2xx: the sender may count the request as delivered.
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Respond { status, .. } if (200..300).contains(status))
    }
}

/// A request and the answer it got.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The request.
    pub request: Request,
    /// The answer the script chose.
    pub answer: Answer,
}

type Script = Box<dyn FnMut(&Request) -> Answer + Send>;

struct State {
    exchanges: Mutex<Vec<Exchange>>,
    script: Mutex<Script>,
}

/// A running receiver; stops when dropped.
pub struct Receiver {
    addr: SocketAddr,
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl Receiver {
    /// Listens on a random port of 127.0.0.1 and answers each request with `script`'s answer.
    /// Must be called inside a Tokio runtime.
    pub async fn start(script: impl FnMut(&Request) -> Answer + Send + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a local port");
        let addr = listener.local_addr().expect("a bound address");
        let state = Arc::new(State {
            exchanges: Mutex::new(Vec::new()),
            script: Mutex::new(Box::new(script)),
        });
        let shared = state.clone();
        let server = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, peer)) = accepted else { continue };
                        let state = shared.clone();
                        connections.spawn(async move {
                            let service = service_fn(move |req| answer(state.clone(), peer, req));
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Self { addr, state, server }
    }

    /// Answers every request with `answer`.
    pub async fn always(answer: Answer) -> Self {
        Self::start(move |_| answer.clone()).await
    }

    /// The URL of `path` (`/hooks`) on this receiver.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers from now on with `script`.
    pub fn script(&self, script: impl FnMut(&Request) -> Answer + Send + 'static) {
        *self.state.script.lock().expect("script") = Box::new(script);
    }

    /// Every request so far, in arrival order, with its answer.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.state.exchanges.lock().expect("exchanges").clone()
    }

    /// Waits until `done` holds for the exchanges so far and returns them; panics after
    /// `timeout`, naming `what` and how many requests came.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[Exchange]) -> bool,
    ) -> Vec<Exchange> {
        let deadline = Instant::now() + timeout;
        loop {
            let exchanges = self.exchanges();
            if done(&exchanges) {
                return exchanges;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for: {what} ({} requests came)",
                exchanges.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The receiver closed the connection on purpose.
#[derive(Debug)]
struct Closed;

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("closed by the test receiver")
    }
}

impl std::error::Error for Closed {}

async fn answer(
    state: Arc<State>,
    peer: SocketAddr,
    req: hyper::Request<Incoming>,
) -> Result<Response<String>, Closed> {
    use http_body_util::BodyExt;
    let at = Instant::now();
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).map_err(|_| Closed)?;
    let request = Request {
        at,
        peer,
        method: parts.method.to_string(),
        path: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        headers: parts.headers,
        body,
    };
    let answer = (state.script.lock().expect("script"))(&request);
    state.exchanges.lock().expect("exchanges").push(Exchange { request, answer: answer.clone() });
    match answer {
        Answer::Respond { status, headers, body } => {
            let mut response = Response::new(body);
            *response.status_mut() = StatusCode::from_u16(status).expect("a status code");
            for (name, value) in headers {
                response.headers_mut().insert(
                    hyper::header::HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
                    value.parse().expect("a header value"),
                );
            }
            Ok(response)
        }
        Answer::Hang(d) => {
            tokio::time::sleep(d).await;
            Ok(Response::new(String::new()))
        }
        Answer::Close => Err(Closed),
    }
}
