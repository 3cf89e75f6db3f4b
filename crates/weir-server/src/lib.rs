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

use axum::Router;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
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
}

impl AppState {
    /// The database.
    pub fn pool(&self) -> &PgPool {
        &self.0.pool
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
    ) -> Result<Server, ApiError> {
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
        Ok(Server {
            state: AppState(Arc::new(Inner { pool, config, hub, wake, cancel, overview, process })),
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
    /// After `cancel`, requests in flight get `http.max_wait` plus a second to finish (a
    /// long-poll's longest wait); a connection still open then (a stream to a client that
    /// stopped reading cannot write its close) is left behind and `serve` returns.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        cancel: CancellationToken,
    ) -> std::io::Result<()> {
        let app = self.router().into_make_service_with_connect_info::<SocketAddr>();
        let grace = self.state.config().http.max_wait + std::time::Duration::from_secs(1);
        let serving =
            axum::serve(listener, app).with_graceful_shutdown(cancel.clone().cancelled_owned());
        tokio::select! {
            r = serving => r,
            _ = async { cancel.cancelled().await; tokio::time::sleep(grace).await } => Ok(()),
        }
    }
}

/// The OpenAPI document the server serves at `/v1/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    openapi::document()
}
