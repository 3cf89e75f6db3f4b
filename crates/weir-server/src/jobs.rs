//! The job queue over HTTP: enqueue, list, show, cancel, retry, heartbeat and per-queue
//! figures. Thin handlers over `weir_jobs::{enqueue, admin}`; the rules (states, unique keys,
//! limits) are the queue's own and its errors keep their meaning here (400, 404, 409).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use weir_jobs::{Job, JobId, JobInfo, JobState, ListFilter, QueueStats, Unique, WorkerInfo};

use crate::AppState;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody};

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(enqueue, list))
        .routes(routes!(stats))
        .routes(routes!(workers))
        .routes(routes!(periodic))
        .routes(routes!(show))
        .routes(routes!(cancel))
        .routes(routes!(retry))
        .routes(routes!(heartbeat))
}

impl From<weir_jobs::Error> for ApiError {
    fn from(e: weir_jobs::Error) -> Self {
        use weir_jobs::Error as E;
        match e {
            E::InvalidJob(m) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_job", m),
            E::NotFound(id) => ApiError::not_found("unknown_job", format!("no job with id {id}")),
            e @ (E::WrongState { .. } | E::Conflict(_)) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            E::Database(e) => e.into(),
            other => ApiError::unexpected(other),
        }
    }
}

/// A job to enqueue.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewJob {
    /// The kind; the worker registered for it runs it.
    kind: String,
    /// Its arguments (any JSON). Defaults to `{}`.
    #[serde(default)]
    args: Option<serde_json::Value>,
    /// The queue. Defaults to `default`.
    #[serde(default)]
    queue: Option<String>,
    /// 0 (first) to 3. Defaults to 0.
    #[serde(default)]
    priority: Option<u8>,
    /// When it may run. Defaults to now.
    #[serde(default)]
    scheduled_at: Option<DateTime<Utc>>,
    /// Attempts allowed. Defaults to 25.
    #[serde(default)]
    max_attempts: Option<u32>,
    /// At most one unfinished job holds this key.
    #[serde(default)]
    unique_key: Option<String>,
    /// Longest run of one attempt (`30s`, `5m`).
    #[serde(default)]
    timeout: Option<String>,
}

impl NewJob {
    /// The job to enqueue, with the checks that need no database (`weir_jobs::enqueue` makes
    /// the queue's own, [`Job::validate`]).
    pub(crate) fn job(self) -> Result<Job, ApiError> {
        let mut job = Job::raw(self.kind, self.args.unwrap_or_else(|| serde_json::json!({})));
        if let Some(q) = self.queue {
            job = job.queue(q);
        }
        if let Some(p) = self.priority {
            job = job.priority(p);
        }
        if let Some(at) = self.scheduled_at {
            // PostgreSQL's timestamptz ends before chrono's range does.
            if !(-4713..=294_276).contains(&chrono::Datelike::year(&at)) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_job",
                    format!("scheduled_at {at} is outside the range PostgreSQL can store"),
                ));
            }
            job = job.scheduled_at(at);
        }
        if let Some(n) = self.max_attempts {
            job = job.max_attempts(n);
        }
        if let Some(k) = self.unique_key {
            job = job.unique(Unique::while_active(k));
        }
        if let Some(t) = self.timeout {
            let d = weir_core::parse_duration(&t).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_job", format!("timeout `{t}`: {e}"))
            })?;
            job = job.timeout(d);
        }
        Ok(job)
    }
}

/// An enqueued job.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct Enqueued {
    /// Its id (the existing job's when `duplicate`).
    id: JobId,
    /// Not inserted: another unfinished job holds the unique key.
    duplicate: bool,
}

/// Enqueues a job.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs",
    request_body = NewJob,
    security(("bearer" = [])),
    responses((status = 201, description = "Enqueued", body = Enqueued),
              (status = 200, description = "A duplicate of an unfinished job with the same unique key", body = Enqueued),
              (status = 400, description = "Malformed body or invalid job", body = ErrorBody),
              (status = 401, description = "Token missing or wrong", body = ErrorBody),
              (status = 403, description = "No token configured", body = ErrorBody),
              (status = 413, description = "Body too large", body = ErrorBody)))]
async fn enqueue(
    State(state): State<AppState>,
    ApiJson(new): ApiJson<NewJob>,
) -> Result<(StatusCode, Json<Enqueued>), ApiError> {
    let job = new.job()?;
    let mut conn = state.pool().acquire().await?;
    let done = weir_jobs::enqueue(&mut conn, &job).await?;
    let status = if done.duplicate { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(Enqueued { id: done.id, duplicate: done.duplicate })))
}

/// Which jobs to list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only this state.
    state: Option<JobState>,
    /// Only this queue.
    queue: Option<String>,
    /// Only this kind.
    kind: Option<String>,
    /// At most this many, newest first (1 to 1000, default 50).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// Lists jobs, newest first, live and finished.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs",
    params(ListQuery),
    responses((status = 200, description = "Jobs", body = Vec<JobInfo>),
              (status = 400, description = "A bad parameter", body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<JobInfo>>, ApiError> {
    let limit = crate::error::page_limit(q.limit, 50)?;
    let filter = ListFilter { state: q.state, queue: q.queue, kind: q.kind, limit };
    let mut conn = state.pool().acquire().await?;
    Ok(Json(weir_jobs::admin::list(&mut conn, &filter).await?))
}

/// Figures per queue.
#[utoipa::path(get, path = "/v1/jobs/stats", tag = "jobs",
    responses((status = 200, description = "Per-queue figures", body = Vec<QueueStats>)))]
async fn stats(State(state): State<AppState>) -> Result<Json<Vec<QueueStats>>, ApiError> {
    let mut conn = state.pool().acquire().await?;
    Ok(Json(weir_jobs::admin::stats(&mut conn).await?))
}

/// The workers of every live process: kind, type (`rust`, `sql`, `http`, `command`), queue,
/// slots, processes, running jobs and the last error of one of its jobs.
#[utoipa::path(get, path = "/v1/jobs/workers", tag = "jobs",
    responses((status = 200, description = "Workers by kind", body = Vec<WorkerInfo>)))]
async fn workers(State(state): State<AppState>) -> Result<Json<Vec<WorkerInfo>>, ApiError> {
    let mut conn = state.pool().acquire().await?;
    Ok(Json(weir_jobs::admin::workers(&mut conn).await?))
}

/// A periodic job: its schedule, the last time it was enqueued for and the next.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct PeriodicInfo {
    /// Its name (`[[periodic]] name`, or its kind).
    name: String,
    /// The kind it enqueues; none for a periodic job this process does not declare.
    kind: Option<String>,
    /// Its queue; none when not declared here.
    queue: Option<String>,
    /// The cron expression; none when not declared here.
    cron: Option<String>,
    /// The IANA time zone the expression is read in.
    timezone: Option<String>,
    /// The last time (slot) a job was enqueued for; none before the first.
    last_at: Option<DateTime<Utc>>,
    /// The next time it is due; none when not declared here or never matching.
    next_at: Option<DateTime<Utc>>,
}

/// The periodic jobs: those in this process's `[[periodic]]` with their next time, and any
/// other the database has enqueued for (declared by another process or in Rust).
#[utoipa::path(get, path = "/v1/jobs/periodic", tag = "jobs",
    responses((status = 200, description = "Periodic jobs by name", body = Vec<PeriodicInfo>)))]
async fn periodic(State(state): State<AppState>) -> Result<Json<Vec<PeriodicInfo>>, ApiError> {
    let mut conn = state.pool().acquire().await?;
    let mut marks: std::collections::BTreeMap<String, DateTime<Utc>> =
        weir_jobs::admin::periodic_marks(&mut conn).await?.into_iter().collect();
    let now = Utc::now();
    let mut out: Vec<PeriodicInfo> = state
        .config()
        .periodic
        .iter()
        .map(|p| {
            let timezone = p.timezone.clone().unwrap_or_else(|| "UTC".into());
            // Parsed and refused at start-up already; a failure here only hides `next_at`.
            let next_at =
                weir_jobs::Cron::parse_in(&p.cron, &timezone).ok().and_then(|c| c.next_after(now));
            let name = p.name().to_string();
            PeriodicInfo {
                last_at: marks.remove(&name),
                name,
                kind: Some(p.kind.clone()),
                queue: Some(p.queue.clone()),
                cron: Some(p.cron.clone()),
                timezone: Some(timezone),
                next_at,
            }
        })
        .collect();
    out.extend(marks.into_iter().map(|(name, last_at)| PeriodicInfo {
        name,
        kind: None,
        queue: None,
        cron: None,
        timezone: None,
        last_at: Some(last_at),
        next_at: None,
    }));
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(out))
}

/// One job.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = i64, Path, description = "Job id")),
    responses((status = 200, description = "The job", body = JobInfo),
              (status = 400, description = "The id is not a number", body = ErrorBody),
              (status = 404, description = "No such job", body = ErrorBody)))]
async fn show(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<JobInfo>, ApiError> {
    let mut conn = state.pool().acquire().await?;
    Ok(Json(weir_jobs::admin::show(&mut conn, JobId(id)).await?))
}

/// A job's state after an action.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct JobStateAnswer {
    /// The job.
    id: JobId,
    /// Its state before the action.
    previous_state: JobState,
    /// Its state now.
    state: JobState,
}

/// Cancels a job that has not finished (a running one is told to stop).
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = i64, Path, description = "Job id")),
    security(("bearer" = [])),
    responses((status = 200, description = "Cancelled", body = JobStateAnswer),
              (status = 400, description = "The id is not a number", body = ErrorBody),
              (status = 401, description = "Token missing or wrong", body = ErrorBody),
              (status = 404, description = "No such job", body = ErrorBody),
              (status = 409, description = "Already finished", body = ErrorBody)))]
async fn cancel(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<JobStateAnswer>, ApiError> {
    let mut conn = state.pool().acquire().await?;
    let previous_state = weir_jobs::admin::cancel(&mut conn, JobId(id)).await?;
    Ok(Json(JobStateAnswer { id: JobId(id), previous_state, state: JobState::Cancelled }))
}

/// Makes a failed, cancelled or scheduled job available now.
#[utoipa::path(post, path = "/v1/jobs/{id}/retry", tag = "jobs",
    params(("id" = i64, Path, description = "Job id")),
    security(("bearer" = [])),
    responses((status = 200, description = "Available again", body = JobStateAnswer),
              (status = 400, description = "The id is not a number", body = ErrorBody),
              (status = 401, description = "Token missing or wrong", body = ErrorBody),
              (status = 404, description = "No such job", body = ErrorBody),
              (status = 409, description = "The job cannot be retried in its state", body = ErrorBody)))]
async fn retry(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<JobStateAnswer>, ApiError> {
    let mut conn = state.pool().acquire().await?;
    let previous_state = weir_jobs::admin::retry(&mut conn, JobId(id)).await?;
    Ok(Json(JobStateAnswer { id: JobId(id), previous_state, state: JobState::Available }))
}

/// Which attempt asks.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct HeartbeatQuery {
    /// The attempt the caller works on (the job document's `attempt`, the end of its
    /// `webhook-id`): `409` when the job runs another one. Defaults to whichever runs.
    attempt: Option<i32>,
}

/// A running job's attempt, alive.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct Alive {
    /// The job.
    id: JobId,
    /// Always `running`.
    state: JobState,
    /// The attempt that runs.
    attempt: i32,
    /// The weir process running it (its heartbeat is the job's).
    attempted_by: Option<String>,
    /// When the attempt started.
    attempted_at: Option<DateTime<Utc>>,
}

/// For the receiver of an `http` worker's job: is my attempt still the job's? A running job's
/// liveness is its process's heartbeat, so this records nothing and extends nothing; it tells
/// a long-working receiver whether to go on (`200`) or stop (`409`: the job finished, was
/// cancelled, timed out, was rescued or runs another attempt — an answer now would not count).
#[utoipa::path(post, path = "/v1/jobs/{id}/heartbeat", tag = "jobs",
    params(("id" = i64, Path, description = "Job id"), HeartbeatQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "The attempt runs and its process heartbeats", body = Alive),
              (status = 400, description = "A bad id or attempt", body = ErrorBody),
              (status = 401, description = "Token missing or wrong", body = ErrorBody),
              (status = 404, description = "No such job", body = ErrorBody),
              (status = 409, description = "Not running, another attempt, or its process stopped heartbeating", body = ErrorBody)))]
async fn heartbeat(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<HeartbeatQuery>,
) -> Result<Json<Alive>, ApiError> {
    let mut conn = state.pool().acquire().await?;
    let job = weir_jobs::admin::show(&mut conn, JobId(id)).await?;
    let stop = |problem: String| ApiError::new(StatusCode::CONFLICT, "not_running", problem);
    if job.state != JobState::Running {
        return Err(stop(format!("job {id} is {}, not running: stop working on it", job.state)));
    }
    if let Some(given) = q.attempt
        && given != job.attempt
    {
        return Err(stop(format!(
            "job {id} runs attempt {}, not {given}: attempt {given} ended (timed out, rescued \
             or retried); stop working on it",
            job.attempt
        )));
    }
    // A running job carries a note only when its process stopped heartbeating.
    if let Some(note) = job.note {
        return Err(stop(format!("job {id}: {note}")));
    }
    Ok(Json(Alive {
        id: JobId(id),
        state: job.state,
        attempt: job.attempt,
        attempted_by: job.attempted_by,
        attempted_at: job.attempted_at,
    }))
}
