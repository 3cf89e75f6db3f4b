//! Backfills over HTTP: ask for one, list them with their progress, cancel one. Thin handlers
//! over `weir::backfill` (which checks a request) and `weir_log::backfill` (the records); the
//! ingesting process runs them.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use weir::backfill::Progress;
use weir_log::backfill::Backfill;

use crate::AppState;
use crate::error::{ApiError, ApiJson, ApiPath, ErrorBody};

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(request, list)).routes(routes!(cancel))
}

/// A backfill with how fast it goes.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BackfillView {
    #[serde(flatten)]
    backfill: Backfill,
    /// Rate, time left and share done, from the stored progress.
    progress: Progress,
}

impl From<Backfill> for BackfillView {
    fn from(backfill: Backfill) -> Self {
        let progress = Progress::of(&backfill);
        Self { backfill, progress }
    }
}

/// Tables to backfill.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewBackfill {
    /// Watched tables (`posts`, `sales.orders`), each with a primary key.
    tables: Vec<String>,
    /// Rows per chunk. Defaults to 5000.
    #[serde(default)]
    chunk_size: Option<i32>,
}

fn refused(e: weir::Error) -> ApiError {
    match e {
        weir::Error::BackfillActive(m) => ApiError::new(StatusCode::CONFLICT, "backfill_active", m),
        weir::Error::Backfill(m) => ApiError::new(StatusCode::BAD_REQUEST, "backfill_refused", m),
        other => other.into(),
    }
}

/// Asks for backfills of existing rows: each table is loaded into the log as `read` events by
/// the ingesting `weir run` process, without locking it. Every table is checked first; none is
/// started unless all pass.
#[utoipa::path(post, path = "/v1/backfills", tag = "backfills", request_body = NewBackfill,
    responses((status = 201, description = "Backfills asked for (pending)", body = Vec<BackfillView>),
              (status = 400, description = "A table cannot be backfilled (the message says why)", body = ErrorBody),
              (status = 409, description = "A table already has an active backfill", body = ErrorBody)))]
async fn request(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<NewBackfill>,
) -> Result<(StatusCode, Json<Vec<BackfillView>>), ApiError> {
    let created = weir::backfill::request(
        state.pool(),
        state.config(),
        &body.tables,
        "http",
        body.chunk_size,
    )
    .await
    .map_err(refused)?;
    Ok((StatusCode::CREATED, Json(created.into_iter().map(Into::into).collect())))
}

/// Backfills: every active one and the last 50 that ended, newest first, with rows done,
/// rows/s and time left.
#[utoipa::path(get, path = "/v1/backfills", tag = "backfills",
    responses((status = 200, description = "Backfills", body = Vec<BackfillView>)))]
async fn list(State(state): State<AppState>) -> Result<Json<Vec<BackfillView>>, ApiError> {
    let all = weir_log::backfill::list(state.pool(), 50).await?;
    Ok(Json(all.into_iter().map(Into::into).collect()))
}

/// Cancels a table's active backfill. The chunks already in the log stay there.
#[utoipa::path(delete, path = "/v1/backfills/{table}", tag = "backfills",
    params(("table" = String, Path, description = "The table (`posts`, `sales.orders`)")),
    responses((status = 200, description = "The cancelled backfill", body = BackfillView),
              (status = 404, description = "The table has no active backfill", body = ErrorBody)))]
async fn cancel(
    State(state): State<AppState>,
    ApiPath(table): ApiPath<String>,
) -> Result<Json<BackfillView>, ApiError> {
    match weir::backfill::cancel(state.pool(), &table).await? {
        Some(b) => Ok(Json(b.into())),
        None => Err(ApiError::not_found(
            "no_active_backfill",
            format!("`{table}` has no pending or running backfill; GET /v1/backfills lists them"),
        )),
    }
}
