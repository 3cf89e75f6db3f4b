//! weir's network face: the JSON API under `/v1`, realtime channels over SSE and WebSocket,
//! Prometheus metrics, the OpenAPI document, and the `425 Too Early` layer for users' services.
//!
//! Where it sits in the data flow:
//!
//! ```text
//! tables ─WAL─► ingest ─► weir.events ─► consumers (operators) ─► checkpoints
//!                             │                                     │
//!                             ▼                                     ▼
//!                  channels::Hub (one log tail)          process status (425 / 200)
//!                   ├─ SSE  /v1/channels/sse              ├─ GET /v1/process/check
//!                   └─ WS   /v1/channels/ws               └─ TooEarlyLayer in front of
//!                                                            the user's own routes
//! /v1/streams ─► weir.append ─► weir.stream_events ─WAL─► ingest ─► weir.events (positions)
//!                  subscriptions (weir-streams): CRUD under /v1/subscriptions; clients
//!                   attach to one by name over SSE / WS and acknowledge what they handled
//! ```
//!
//! Everything answers from the database, so any number of weir processes serve the same
//! answers. Errors are JSON `{error, message}` ([`error`]); state-changing endpoints need the
//! bearer token ([`auth`]).
//!
//! Embedding: [`Server::start`] then [`Server::router`] gives an axum [`Router`] to merge into
//! an application's own; `weir run` uses [`Server::serve`].

mod api;
mod auth;
mod backfills;
pub mod channels;
mod console;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod jobs;
pub mod metrics;
mod openapi;
mod streams;
mod subscriptions;
pub mod too_early;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use weir_core::Config;

pub use error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody};
pub use too_early::{TooEarlyLayer, Watermark};

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct AppState(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    config: Config,
    hub: channels::Hub,
    /// Log wake-ups, for attached subscription clients.
    wake: weir_log::Wake,
    /// Stops every stream (channels and attached subscription clients).
    cancel: CancellationToken,
    /// The live overview: read once a second for every console watching, none when none is.
    overview: console::LiveOverview,
    /// Process status for every long-poll (and any `TooEarlyLayer` made from it): one watcher.
    process: weir_consumer::process::ProcessWatch,
    /// Reads of the log (`/v1/log`, the console), made once: it asks the database's name.
    log: weir_log::LogReader,
}

impl AppState {
    /// The database.
    pub fn pool(&self) -> &PgPool {
        &self.0.pool
    }

    /// The log's reader.
    pub(crate) fn log(&self) -> &weir_log::LogReader {
        &self.0.log
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.0.config
    }

    /// The realtime hub.
    pub fn hub(&self) -> &channels::Hub {
        &self.0.hub
    }

    /// The process-status watcher the long-polls share.
    pub fn process_watch(&self) -> &weir_consumer::process::ProcessWatch {
        &self.0.process
    }
}

/// The HTTP server of one weir process.
#[derive(Debug)]
pub struct Server {
    state: AppState,
}

impl Server {
    /// Starts the realtime hub (one log tail, stopped by `cancel`) and prepares the routes.
    ///
    /// `wake` is [`weir::Running::wake`] (or [`weir_log::listen_for_appends`]).
    pub async fn start(
        pool: PgPool,
        config: Config,
        wake: weir_log::Wake,
        cancel: CancellationToken,
    ) -> Result<Server, weir::Error> {
        metrics::describe();
        // The routes read the consumer and job tables: make sure they exist (idempotent).
        weir_consumer::migrate(&pool).await?;
        weir_jobs::migrate(&pool).await?;
        weir_streams::migrate(&pool).await?;
        let hub = channels::Hub::start(pool.clone(), &config, wake.clone(), cancel.clone()).await?;
        metrics::spawn_source_gauges(pool.clone(), config.clone(), cancel.clone());
        let overview = console::LiveOverview::default();
        let process = weir_consumer::process::ProcessWatch::new(
            pool.clone(),
            &config.consumers.timestamp_column,
        )
        .wake_on(wake.clone());
        let log = weir_log::LogReader::new(pool.clone()).await?;
        Ok(Server {
            state: AppState(Arc::new(Inner {
                pool,
                config,
                hub,
                wake,
                cancel,
                overview,
                process,
                log,
            })),
        })
    }

    /// The process-status watcher of this server (woken at every append), for
    /// [`TooEarlyLayer::with_watch`] in front of an application's own routes: its waiters then
    /// share the long-polls' one query per tick.
    pub fn process_watch(&self) -> &weir_consumer::process::ProcessWatch {
        self.state.process_watch()
    }

    /// The shared state.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Every route: `/v1/...`, `/metrics`, `/v1/openapi.json`, with auth, limits and metrics.
    pub fn router(&self) -> Router {
        openapi::router(self.state.clone())
    }

    /// Serves [`Server::router`] on `listener` until `cancel`; open streams are closed then.
    ///
    /// ```text
    /// accept ─► one task per connection (owned here) ─► HTTP/1.1, upgrades (WebSocket)
    ///   │         request head within http.header_timeout, or the connection is closed
    ///   │         each request gets ConnectInfo<SocketAddr> ─► the router
    ///   └ an accept error (EMFILE: out of file descriptors) is logged, then accept again 1 s
    ///     later; the connections already open go on
    /// cancel ─► stop accepting; every connection finishes its request in flight and closes
    ///          ─► after http.max_wait + 1 s, those still open are closed and `serve` returns
    /// ```
    ///
    /// The head timeout is what a slowloris client (a request head sent a byte at a time)
    /// meets: it holds a connection and a task for `http.header_timeout` at most, never a
    /// worker. It also closes a kept-alive connection idle that long (the server waits for the
    /// next head from the end of the previous response).
    ///
    /// After `cancel`, requests in flight get `http.max_wait` plus a second to finish (a
    /// long-poll's longest wait); a connection still open then (a stream to a client that
    /// stopped reading cannot write its close) is dropped and `serve` returns.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        cancel: CancellationToken,
    ) -> std::io::Result<()> {
        let app = self.router();
        let http = &self.state.config().http;
        let grace = http.max_wait + Duration::from_secs(1);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(http.header_timeout);
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(done) = connections.join_next(), if !connections.is_empty() => {
                    connection_ended(done);
                    continue;
                }
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, remote)) => {
                    connections.spawn(serve_connection(
                        builder.clone(),
                        stream,
                        remote,
                        app.clone(),
                        cancel.clone(),
                    ));
                }
                // The client gave up before we accepted: nothing to do.
                Err(e) if connection_refused(&e) => {}
                Err(e) => {
                    tracing::error!(
                        error = %e,
                        open_connections = connections.len(),
                        "cannot accept a connection (out of file descriptors?); accepting again \
                         in {ACCEPT_PAUSE:?}"
                    );
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_PAUSE) => {}
                    }
                }
            }
        }
        drop(listener);
        let drained = tokio::time::timeout(grace, async {
            while let Some(done) = connections.join_next().await {
                connection_ended(done);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                open_connections = connections.len(),
                "connections still open {grace:?} after the shutdown began are closed"
            );
            connections.shutdown().await;
        }
        Ok(())
    }
}

/// Pause after an accept error that is not the client's (EMFILE, ENFILE, ENOBUFS).
const ACCEPT_PAUSE: Duration = Duration::from_secs(1);

/// An accept error about one client only, which the next accept does not meet.
fn connection_refused(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}

/// One HTTP/1.1 connection with upgrades (WebSocket), each request with its peer's address as
/// [`ConnectInfo`] (what `into_make_service_with_connect_info` gives a router). At `cancel` it
/// finishes the request in flight, if any, and closes.
async fn serve_connection(
    builder: hyper::server::conn::http1::Builder,
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    app: Router,
    cancel: CancellationToken,
) {
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(remote));
        app.clone().oneshot(req)
    });
    let connection =
        builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).with_upgrades();
    let mut connection = std::pin::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        _ = cancel.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    match ended {
        Ok(()) => {}
        // A head not sent within http.header_timeout: expected of hostile or idle clients, so
        // not worth more than a debug line each.
        Err(e) if e.is_timeout() => {
            tracing::debug!(%remote, "connection closed: no request head within http.header_timeout")
        }
        Err(e) => tracing::debug!(%remote, error = %e, "connection ended with an error"),
    }
}

/// A connection task's end: a panic in it (a handler's) is logged; the others stay open.
fn connection_ended(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!(error = %e, "a connection's task panicked; it is closed");
    }
}

/// The OpenAPI document the server serves at `/v1/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    openapi::document()
}
