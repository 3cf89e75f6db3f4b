//! `type = "sql"`: one statement with the job's args as `$1` (jsonb), run in the transaction
//! that completes the job — the effect and the completion commit together or not at all
//! (EctoJob's guarantee, with no code).
//!
//! ```text
//! begin
//!   set local statement_timeout = <the attempt's timeout>   (when it has one)
//!   <the statement>($1 = args)
//!     error            ─► rollback; failed with SQLSTATE and message, retried with backoff
//!     a row answering  ─► rollback; discarded / snoozed (a `discard` or `snooze` column, non-null)
//!   complete the job, fenced on its attempt
//! commit                                                    ─► completed, the effect with it
//! ```
//!
//! Invariants:
//! - Exactly one effect per completed job: the statement's writes commit only with the
//!   completion, and the completion is fenced on the attempt, so a run that was rescued (its
//!   process stopped heartbeating) or cancelled rolls back whole.
//! - A statement that hangs is cancelled in the server: the attempt's timeout is also the
//!   transaction's `statement_timeout`, so dropping the attempt leaves nothing running.
//!
//! The statement may answer with its rows: when it returns a column `discard` (text) or
//! `snooze` (interval, or text as `"30s"`), the first row where one is not null rolls the
//! statement back and discards the job (the text is the reason) or snoozes it for that long.
//! ```sql
//! -- sends the mail of an existing user; a job for a user that is gone is discarded
//! with sent as (
//!     insert into mails (user_id) select id from users where id = ($1->>'user')::int
//!     returning 1)
//! select 'no such user' as discard where not exists (select from sent)
//! ```
//!
//! The statement is prepared at start-up, so one that does not parse, names a missing table or
//! returns a `discard`/`snooze` column of the wrong type stops `weir run` with the database's
//! reason. A statement that fails on a job (a constraint, a cast) fails the attempt with the
//! database's message and SQLSTATE and is retried with backoff.

use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use futures::future::BoxFuture;
use serde_json::Value;
use sqlx::postgres::types::PgInterval;
use sqlx::postgres::{PgDatabaseError, PgRow, PgTypeInfo};
use sqlx::{Column, Executor, PgPool, Row, Statement, TypeInfo};
use weir_core::WorkerConfig;

use super::{Common, Declared, DeclaredType, refused};
use crate::worker::{ErasedWorker, JobContext, JobError};
use crate::{Error, Result};

pub(super) struct SqlWorker {
    sql: String,
    /// Whether the statement takes the args (`$1`); one that does not runs without them.
    takes_args: bool,
    /// The answer columns the statement returns; with none, its rows are not read.
    answers: Answers,
    common: Common,
}

/// The `discard` and `snooze` columns of the statement's rows, checked at start-up.
#[derive(Debug, Default)]
struct Answers {
    discard: bool,
    snooze: Option<SnoozeType>,
}

#[derive(Debug, Clone, Copy)]
enum SnoozeType {
    Interval,
    Text,
}

pub(super) async fn build(
    entry: &WorkerConfig,
    common: Common,
    pool: &PgPool,
) -> Result<Arc<dyn ErasedWorker>> {
    let sql = entry.sql.clone().unwrap_or_default();
    let mut conn = pool.acquire().await?;
    let statement = (&mut *conn)
        .prepare_with(
            sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(sql.clone())),
            &[PgTypeInfo::with_name("jsonb")],
        )
        .await
        .map_err(|e| match e.as_database_error() {
            Some(db) => refused(
                entry,
                format!(
                    "the statement does not prepare: {} (the job's args are $1, of type jsonb)",
                    db.message()
                ),
            ),
            None => Error::Database(e),
        })?;
    let params = match statement.parameters() {
        Some(sqlx::Either::Left(types)) => types.len(),
        Some(sqlx::Either::Right(n)) => n,
        None => 0,
    };
    if params > 1 {
        return Err(refused(
            entry,
            format!("the statement uses ${params}; only $1 (the job's args, jsonb) is given"),
        ));
    }
    let mut answers = Answers::default();
    for column in statement.columns() {
        let ty = column.type_info().name().to_ascii_lowercase();
        let text = matches!(ty.as_str(), "text" | "varchar" | "name" | "bpchar");
        match column.name() {
            "discard" if text => answers.discard = true,
            "snooze" if ty == "interval" => answers.snooze = Some(SnoozeType::Interval),
            "snooze" if text => answers.snooze = Some(SnoozeType::Text),
            name @ ("discard" | "snooze") => {
                return Err(refused(
                    entry,
                    format!(
                        "the statement returns `{name}` of type {ty}; `discard` must be text \
                         (the reason) and `snooze` an interval or text such as '30s'"
                    ),
                ));
            }
            _ => {}
        }
    }
    Ok(Arc::new(Declared(SqlWorker { sql, takes_args: params == 1, answers, common })))
}

impl SqlWorker {
    /// The answer of one row, if it gives one.
    fn answer(&self, row: &PgRow) -> std::result::Result<Option<JobError>, JobError> {
        if self.answers.discard
            && let Some(reason) = row.try_get::<Option<String>, _>("discard")?
        {
            let reason =
                if reason.is_empty() { "the statement discarded the job".into() } else { reason };
            return Ok(Some(JobError::discard(reason)));
        }
        let after = match self.answers.snooze {
            None => None,
            Some(SnoozeType::Interval) => match row.try_get::<Option<PgInterval>, _>("snooze")? {
                None => None,
                Some(i) if i.months != 0 => {
                    return Err(JobError::retry(
                        "the statement answered a `snooze` in months; give days or less",
                    ));
                }
                Some(i) => {
                    let micros = i64::from(i.days) * 86_400_000_000 + i.microseconds;
                    Some(Duration::from_micros(micros.max(0) as u64))
                }
            },
            Some(SnoozeType::Text) => match row.try_get::<Option<String>, _>("snooze")? {
                None => None,
                Some(text) => Some(weir_core::parse_duration(&text).map_err(|e| {
                    JobError::retry(format!("the statement answered `snooze` {text:?}: {e}"))
                })?),
            },
        };
        Ok(after.map(JobError::snooze))
    }
}

/// A failed statement's error: the database's message, detail and SQLSTATE.
fn failed(e: sqlx::Error) -> JobError {
    let Some(db) = e.as_database_error() else { return JobError::retry(e) };
    let detail = db
        .try_downcast_ref::<PgDatabaseError>()
        .and_then(|pg| pg.detail())
        .map(|d| format!(": {d}"))
        .unwrap_or_default();
    JobError::retry(format!(
        "the statement failed: {}{detail} (SQLSTATE {})",
        db.message(),
        db.code().as_deref().unwrap_or("?")
    ))
}

impl DeclaredType for SqlWorker {
    fn attempt(
        &self,
        ctx: JobContext,
        args: Value,
    ) -> BoxFuture<'_, std::result::Result<(), JobError>> {
        Box::pin(async move {
            let mut tx = ctx.begin().await?;
            // The attempt's timeout — the job's own, else the worker's — as the transaction's
            // statement_timeout (milliseconds; local, so it ends with the transaction). None
            // leaves the server's setting alone.
            let worker_ms =
                self.common.timeout.map(|t| t.as_millis().clamp(1, i32::MAX as u128) as i32);
            sqlx::query(
                "select set_config('statement_timeout', coalesce(timeout_ms, $2)::text, true)
                   from weir.jobs where id = $1 and coalesce(timeout_ms, $2) is not null",
            )
            .bind(ctx.id().0)
            .bind(worker_ms)
            .fetch_optional(&mut *tx)
            .await
            .map_err(failed)?;
            // The operator's own statement, from weir.toml; the job's args are bound, never
            // spliced in.
            let query = sqlx::query(sqlx::AssertSqlSafe(self.sql.clone()));
            let query = if self.takes_args { query.bind(sqlx::types::Json(&args)) } else { query };
            let answer = if self.answers.discard || self.answers.snooze.is_some() {
                // Every row is read (the statement runs to its end); the first answer counts.
                let mut rows = query.fetch(&mut *tx);
                let mut answer = None;
                while let Some(row) = rows.try_next().await.map_err(failed)? {
                    if answer.is_none() {
                        answer = self.answer(&row)?;
                    }
                }
                answer
            } else {
                query.execute(&mut *tx).await.map_err(failed)?;
                None
            };
            if let Some(answer) = answer {
                tx.rollback().await?;
                return Err(answer);
            }
            ctx.complete(tx).await?;
            Ok(())
        })
    }

    fn common(&self) -> &Common {
        &self.common
    }
}
