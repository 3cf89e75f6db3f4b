//! `type = "sql"`: one statement with the job's args as `$1` (jsonb), run in the transaction
//! that completes the job — the effect and the completion commit together or not at all
//! (EctoJob's guarantee, with no code).
//!
//! The statement is prepared at start-up, so one that does not parse or names a missing table
//! stops `weir run` with the database's reason. A statement that fails on a job (a constraint,
//! a cast) fails the attempt with the database's message and is retried with backoff.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::Value;
use sqlx::postgres::PgTypeInfo;
use sqlx::{Executor, PgPool, Statement};
use weir_core::WorkerConfig;

use super::{Common, refused};
use crate::worker::{ErasedWorker, JobContext, JobError};
use crate::{Error, Result};

pub(super) struct SqlWorker {
    sql: String,
    /// Whether the statement takes the args (`$1`); one that does not runs without them.
    takes_args: bool,
    common: Common,
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
    Ok(Arc::new(SqlWorker { sql, takes_args: params == 1, common }))
}

impl ErasedWorker for SqlWorker {
    fn run(&self, ctx: JobContext, args: Value) -> BoxFuture<'_, Result<(), JobError>> {
        Box::pin(async move {
            let mut tx = ctx.begin().await?;
            // The operator's own statement, from weir.toml; the job's args are bound, never
            // spliced in.
            let query = sqlx::query(sqlx::AssertSqlSafe(self.sql.clone()));
            let query = if self.takes_args { query.bind(sqlx::types::Json(&args)) } else { query };
            query.execute(&mut *tx).await.map_err(|e| match e.as_database_error() {
                Some(db) => JobError::retry(format!(
                    "the statement failed: {} (SQLSTATE {})",
                    db.message(),
                    db.code().as_deref().unwrap_or("?")
                )),
                None => JobError::retry(e),
            })?;
            ctx.complete(tx).await?;
            Ok(())
        })
    }

    fn timeout(&self) -> Option<std::time::Duration> {
        self.common.timeout
    }

    fn backoff(&self, attempt: u32) -> std::time::Duration {
        self.common.backoff(attempt)
    }

    fn max_attempts(&self) -> Option<u32> {
        self.common.max_attempts
    }
}
