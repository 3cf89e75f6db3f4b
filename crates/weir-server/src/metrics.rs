//! `GET /metrics` in Prometheus text format.
//!
//! Every part of weir records through the `metrics` facade; this module installs the Prometheus
//! recorder (once per process), describes the metrics, times HTTP requests and samples the
//! source's gauges. What is exported:
//!
//! | metric | kind | from |
//! |---|---|---|
//! | `weir_ingest_events_total` | counter | ingestion, per appended event |
//! | `weir_backfill_rows_total` | counter | ingestion, per `read` event a backfill appended |
//! | `weir_source_slot_lag_bytes` | gauge | `pg_current_wal_lsn() - confirmed_flush_lsn`, every 5 s |
//! | `weir_source_seconds_behind` | gauge | commit-to-log delay of the last append, every 5 s |
//! | `weir_source_events_per_second` | gauge | events logged over the last 10 s, every 5 s |
//! | `weir_source_position` | gauge | the log's head |
//! | `weir_consumer_events_handled_total{consumer}` | counter | events handled |
//! | `weir_consumer_failures_total{consumer}` | counter | failed attempts |
//! | `weir_consumer_retries_total{consumer}` | counter | retries scheduled |
//! | `weir_consumer_handler_seconds{consumer}` | histogram | handling time per event |
//! | `weir_consumer_position{consumer,lane}` | gauge | a lane's checkpoint |
//! | `weir_consumer_lag_events{consumer}` | gauge | events between the slowest lane and the head, every 5 s |
//! | `weir_consumer_lag_seconds{consumer}` | gauge | age of the oldest unhandled event, every 5 s |
//! | `weir_consumer_lane_lag_events{consumer,lane}`, `weir_consumer_lane_lag_seconds{consumer,lane}` | gauge | the same per lane (a subscription's emitter), every 5 s |
//! | `weir_jobs_queued{queue}` | gauge | available jobs of a queue this process works, every heartbeat |
//! | `weir_jobs_running{queue}` | gauge | jobs running in this process |
//! | `weir_jobs_completed_total{queue}` | counter | jobs completed |
//! | `weir_jobs_failed_total{queue}` | counter | failed attempts (retried or not) |
//! | `weir_jobs_discarded_total{queue}` | counter | jobs discarded |
//! | `weir_jobs_wait_seconds{queue}` | histogram | from the time a job could run to its start |
//! | `weir_http_requests_total{method,route,status}` | counter | every request |
//! | `weir_http_request_duration_seconds{method,route}` | histogram | time to the response head |
//! | `weir_channel_clients{transport}` | gauge | connected SSE / WebSocket clients |
//! | `weir_channel_messages_total` | counter | messages queued to channel clients |
//! | `weir_channel_dropped_total{reason}` | counter | clients dropped (slow, closed) |
//!
//! An application that installed its own `metrics` recorder keeps it: `/metrics` then answers
//! 503 and says so.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use weir_core::Config;

use crate::error::ApiError;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

const BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A job's wait for a slot: milliseconds when workers keep up, minutes behind a backlog.
const JOB_WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0,
];

/// Installs the Prometheus recorder unless a recorder is already installed; idempotent.
/// Returns the handle `/metrics` renders from.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            // A full name wins over a suffix (the exporter tries Full, then Prefix, then Suffix).
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(weir_jobs::metrics::WAIT_SECONDS.into()),
                        JOB_WAIT_BUCKETS,
                    )
                })
                .expect("the buckets are not empty");
            match builder.install_recorder() {
                Ok(handle) => {
                    let upkeep = handle.clone();
                    // Histograms are drained into their buckets by upkeep; without it they grow.
                    std::thread::Builder::new()
                        .name("weir-metrics-upkeep".into())
                        .spawn(move || {
                            loop {
                                std::thread::sleep(Duration::from_secs(5));
                                upkeep.run_upkeep();
                            }
                        })
                        .ok();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "another metrics recorder is installed; /metrics is off");
                    None
                }
            }
        })
        .clone()
}

/// Installs the recorder and describes weir's own metrics.
pub(crate) fn describe() {
    install();
    metrics::describe_counter!("weir_ingest_events_total", "Events appended to the log");
    metrics::describe_counter!(
        "weir_backfill_rows_total",
        "Rows a backfill appended to the log as read events"
    );
    metrics::describe_gauge!(
        "weir_source_slot_lag_bytes",
        "WAL between the server's position and what the slot confirmed"
    );
    metrics::describe_gauge!(
        "weir_source_seconds_behind",
        "Delay between commit and log of the last append"
    );
    metrics::describe_gauge!(
        "weir_source_events_per_second",
        "Events logged per second over the last 10 s"
    );
    metrics::describe_gauge!("weir_source_position", "Last log position");
    metrics::describe_gauge!(
        "weir_consumer_lag_events",
        "Events between a consumer's slowest lane and the head"
    );
    metrics::describe_gauge!(
        "weir_consumer_lag_seconds",
        "Age of a consumer's oldest unhandled event"
    );
    metrics::describe_gauge!(
        "weir_consumer_lane_lag_events",
        "Events between a lane (a subscription's emitter) and the head"
    );
    metrics::describe_gauge!(
        "weir_consumer_lane_lag_seconds",
        "Age of a lane's (a subscription's emitter's) oldest unhandled event"
    );
    {
        use weir_jobs::metrics as jobs;
        metrics::describe_gauge!(jobs::QUEUED, "Available jobs of a queue in weir.jobs");
        metrics::describe_gauge!(jobs::RUNNING, "Jobs of a queue running in this process");
        metrics::describe_counter!(jobs::COMPLETED, "Jobs completed");
        metrics::describe_counter!(jobs::FAILED, "Failed job attempts, retried or not");
        metrics::describe_counter!(jobs::DISCARDED, "Jobs discarded");
        metrics::describe_histogram!(
            jobs::WAIT_SECONDS,
            metrics::Unit::Seconds,
            "Time from when a job could run to its start"
        );
    }
    metrics::describe_counter!("weir_http_requests_total", "HTTP requests answered");
    metrics::describe_histogram!(
        "weir_http_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time from request to response head"
    );
    metrics::describe_gauge!("weir_channel_clients", "Connected realtime channel clients");
    metrics::describe_counter!("weir_channel_messages_total", "Messages queued to channel clients");
    metrics::describe_counter!("weir_channel_dropped_total", "Channel clients dropped");
    metrics::describe_counter!(
        "weir_sink_delivered_total",
        "Events a sink delivered (a 2xx, a PubAck), by subscription and sink"
    );
    metrics::describe_counter!(
        "weir_sink_failed_total",
        "Failed sink deliveries (requests, groups of publishes), retried or not"
    );
    metrics::describe_histogram!(
        "weir_sink_request_seconds",
        metrics::Unit::Seconds,
        "A webhook request, or a group's publishes until every PubAck"
    );
    metrics::describe_histogram!(
        "weir_sink_commit_to_ack_seconds",
        metrics::Unit::Seconds,
        "From an event's commit to the receiver's acknowledgement"
    );
}

/// `GET /metrics`.
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
              (status = 503, description = "Another metrics recorder is installed", body = crate::ErrorBody)))]
pub(crate) async fn render() -> Response {
    match install() {
        Some(handle) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], handle.render())
                .into_response()
        }
        None => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics_unavailable",
            "the application installed its own metrics recorder; weir's metrics are recorded there",
        )
        .into_response(),
    }
}

/// Middleware: counts and times every request by its route template.
pub(crate) async fn track(req: Request, next: Next) -> Response {
    let start = Instant::now();
    // Only the standard methods become label values: arbitrary ones would grow series forever.
    let method = match *req.method() {
        Method::GET
        | Method::HEAD
        | Method::POST
        | Method::PUT
        | Method::PATCH
        | Method::DELETE
        | Method::OPTIONS => req.method().as_str(),
        _ => "other",
    }
    .to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("weir_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("weir_http_request_duration_seconds", "method" => method, "route" => route)
        .record(start.elapsed().as_secs_f64());
    response
}

/// Samples the source's gauges every 5 seconds until `cancel`.
pub(crate) fn spawn_source_gauges(pool: PgPool, config: Config, cancel: CancellationToken) {
    tokio::spawn(async move {
        loop {
            match weir::status::source_status(&pool, &config).await {
                Ok(s) => {
                    if let Some(lag) = s.slot_lag_bytes {
                        metrics::gauge!("weir_source_slot_lag_bytes").set(lag as f64);
                    }
                    metrics::gauge!("weir_source_seconds_behind").set(s.seconds_behind);
                    metrics::gauge!("weir_source_events_per_second").set(s.events_per_second);
                    metrics::gauge!("weir_source_position").set(s.position as f64);
                }
                Err(e) => tracing::debug!(error = %e, "source gauges not sampled"),
            }
            if let Ok(consumers) = weir_consumer::status::consumers(&pool).await {
                for c in consumers {
                    for l in &c.lanes {
                        let lane = l.lane.to_string();
                        metrics::gauge!("weir_consumer_lane_lag_events", "consumer" => c.name.clone(), "lane" => lane.clone())
                            .set(l.lag_events as f64);
                        metrics::gauge!("weir_consumer_lane_lag_seconds", "consumer" => c.name.clone(), "lane" => lane)
                            .set(l.lag_seconds);
                    }
                    let events = c.lanes.iter().map(|l| l.lag_events).max().unwrap_or(0);
                    let seconds = c.lanes.iter().map(|l| l.lag_seconds).fold(0.0, f64::max);
                    metrics::gauge!("weir_consumer_lag_events", "consumer" => c.name.clone())
                        .set(events as f64);
                    metrics::gauge!("weir_consumer_lag_seconds", "consumer" => c.name).set(seconds);
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    });
}
