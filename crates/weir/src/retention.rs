//! Retention of the log: every 10 minutes one `weir run` (an advisory lock elects it) drops the
//! partitions of `weir.events` older than `[log] retention`, except what a consumer has not
//! handled yet. A halted or stopped consumer so holds the log, never the server's WAL: the slot
//! moves on as soon as events are appended, whatever the consumers do.
//!
//! ```text
//! run (every 600 s, one process) ─► pass: weir_consumer::oldest_need ─► the lowest position
//!   any consumer still needs ─► weir_log::enforce_retention(age, that position) ─► dropped
//!   partitions (info), or the old ones a consumer holds (warn: who, where, how to release)
//! ```

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use weir_consumer::ConsumerKind;
use weir_core::Config;
use weir_log::RetentionReport;

use crate::Result;

/// One retention pass: what the log may drop by age, less what some consumer still needs.
pub async fn pass(pool: &PgPool, config: &Config) -> Result<RetentionReport> {
    let need = weir_consumer::oldest_need(pool).await?;
    let retention = config.log.retention;
    let r = weir_log::enforce_retention(pool, retention, need.as_ref().map(|n| n.position)).await?;
    if !r.dropped.is_empty() {
        tracing::info!(dropped = ?r.dropped, oldest = ?r.oldest_position, "retention");
    }
    if let (Some((from, to)), Some(need)) = (r.held, &need) {
        let name = &need.consumer;
        let release = match need.kind {
            ConsumerKind::Operator => format!(
                "`weir resume {name}` or `weir skip {name}` if it is halted, `weir operators \
                 forget {name}` if nothing runs it any more"
            ),
            ConsumerKind::Subscription => format!(
                "`weir subscriptions start {name}` if it is stopped, `weir subscriptions delete \
                 {name}` if it is not needed"
            ),
        };
        tracing::warn!(
            consumer = %name, state = %need.state, position = need.position,
            "retention keeps log positions {from}..{to} past `[log] retention` ({}): {} {name} \
             ({}) has not handled them yet; {release}",
            weir_core::format_duration(retention), need.kind, need.state
        );
    }
    Ok(r)
}

/// Runs [`pass`] now and every 10 minutes, in one process at a time, until `cancel`.
pub(crate) async fn run(pool: PgPool, config: Config, cancel: CancellationToken) {
    loop {
        // One process enforces retention at a time; the lock lives on one pooled connection.
        if let Ok(mut conn) = pool.acquire().await {
            let lock: std::result::Result<bool, _> =
                sqlx::query_scalar("select pg_try_advisory_lock(hashtext('weir.retention'))")
                    .fetch_one(&mut *conn)
                    .await;
            if let Ok(true) = lock {
                if let Err(e) = pass(&pool, &config).await {
                    tracing::warn!(error = %e, "retention pass failed");
                }
                let _ = sqlx::query("select pg_advisory_unlock(hashtext('weir.retention'))")
                    .execute(&mut *conn)
                    .await;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(600)) => {}
        }
    }
}
