//! Connecting to the database from the configuration: `database.url`, or libpq's `PG*`
//! variables when no URL is configured.

use std::str::FromStr;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_core::Config;

use crate::{Error, Result};

/// Connection options for weir's pool and the appender.
pub fn connect_options(config: &Config) -> Result<PgConnectOptions> {
    match &config.database.url {
        Some(url) => PgConnectOptions::from_str(url.expose()).map_err(|e| {
            Error::Setup(format!(
                "database.url is not a valid PostgreSQL URL ({e}); expected \
                 postgres://user:password@host:5432/database"
            ))
        }),
        None => Ok(PgConnectOptions::new()),
    }
}

/// A `host:port/database` description without credentials, for messages.
pub fn describe(options: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("(default database)")
    )
}

/// Opens weir's connection pool and checks that the server answers.
pub async fn connect(config: &Config) -> Result<PgPool> {
    let options = connect_options(config)?;
    let target = describe(&options);
    match PgPoolOptions::new()
        .max_connections(config.database.pool_size)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options.clone())
        .await
    {
        Ok(pool) => Ok(pool),
        // The pool retries a refused or unreachable server until its timeout and then says
        // only that it timed out: one plain connection says why.
        Err(sqlx::Error::PoolTimedOut) => {
            let why = match tokio::time::timeout(
                Duration::from_secs(5),
                <sqlx::PgConnection as sqlx::Connection>::connect_with(&options),
            )
            .await
            {
                Ok(Err(e)) => e,
                _ => sqlx::Error::PoolTimedOut,
            };
            Err(Error::connect(target, why))
        }
        Err(e) => Err(Error::connect(target, e)),
    }
}

/// The libpq connection string for the replication connection.
pub fn replication_conninfo(config: &Config) -> String {
    weir_source::stream::replication_conninfo(
        config.database.url.as_ref().map(|u| u.expose()),
        &config.source.decoding_work_mem,
    )
}
