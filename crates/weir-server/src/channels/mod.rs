//! Realtime channels over SSE and WebSocket (being built; see `docs/http.md`).

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;
use weir_core::Config;

use crate::{ApiError, AppState};

/// One log tail fanning events out to channel clients.
#[derive(Debug, Clone)]
pub struct Hub {}

impl Hub {
    /// Starts the tail at the log's head.
    pub async fn start(
        _pool: PgPool,
        _config: &Config,
        _wake: weir_log::Wake,
        _cancel: CancellationToken,
    ) -> Result<Hub, ApiError> {
        Ok(Hub {})
    }
}

/// The channel routes.
pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
}
