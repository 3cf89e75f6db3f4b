//! The `weir` schema and its migration ledger.
//!
//! Every crate that owns tables keeps numbered SQL files (`migrations/0001_*.sql`) embedded with
//! `include_str!` and applies them with [`migrate`] under its own component name. The ledger is
//! `weir.migrations (component, version)`; an advisory lock serialises concurrent starts.

use sqlx::{Connection, PgPool};

/// One numbered migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its number, from 1, in order.
    pub version: i32,
    /// A short name.
    pub name: &'static str,
    /// The SQL, possibly several statements.
    pub sql: &'static str,
}

/// Applies the migrations of `component` that are not applied yet, each in order, all in one
/// transaction.
pub async fn migrate(
    pool: &PgPool,
    component: &str,
    migrations: &[Migration],
) -> crate::Result<()> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    // Serialise concurrent `weir init`/`weir run` so two processes never race on DDL.
    sqlx::query("select pg_advisory_xact_lock(hashtext('weir.migrations'))")
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(
        "create schema if not exists weir;
         create table if not exists weir.migrations (
             component  text not null,
             version    int  not null,
             name       text not null,
             applied_at timestamptz not null default now(),
             primary key (component, version)
         );",
    )
    .execute(&mut *tx)
    .await?;
    let applied: Vec<i32> =
        sqlx::query_scalar("select version from weir.migrations where component = $1")
            .bind(component)
            .fetch_all(&mut *tx)
            .await?;
    for m in migrations {
        if applied.contains(&m.version) {
            continue;
        }
        sqlx::raw_sql(sqlx::AssertSqlSafe(m.sql)).execute(&mut *tx).await?;
        sqlx::query("insert into weir.migrations (component, version, name) values ($1, $2, $3)")
            .bind(component)
            .bind(m.version)
            .bind(m.name)
            .execute(&mut *tx)
            .await?;
        tracing::info!(component, version = m.version, name = m.name, "applied migration");
    }
    tx.commit().await?;
    Ok(())
}
