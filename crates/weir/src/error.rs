//! The engine's error: one enum at the crate boundary, each variant saying what is wrong and
//! how to fix it.

use weir_source::{assemble::AssembleError, stream::StreamError};

/// What can stop weir.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] weir_core::ConfigError),
    /// The server could not be reached or refused the login.
    #[error(
        "cannot connect to {target}: {source}; is the server running and is `database.url` (or DATABASE_URL / PG* variables) right?"
    )]
    Connect {
        /// host:port/database, without credentials.
        target: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// A query failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The log failed.
    #[error(transparent)]
    Log(#[from] weir_log::Error),
    /// The job queue failed (its migration, a `[jobs]` setting, the runner's start or stop).
    #[error(transparent)]
    Jobs(#[from] weir_jobs::Error),
    /// The replication stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The pgoutput stream could not be assembled into transactions.
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    /// The server or the database is not set up for weir; the message says how to fix it.
    #[error("{0}")]
    Setup(String),
}

impl Error {
    /// Whether the ingest loop should reconnect (true) or stop with this error (false).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Stream(e) => e.is_transient(),
            Error::Database(e) | Error::Connect { source: e, .. } => is_transient_sql(e),
            Error::Log(weir_log::Error::Database(e)) => is_transient_sql(e),
            _ => false,
        }
    }
}

/// Connection-level failures and server shutdowns are worth a retry; everything else (bad SQL,
/// missing objects, permissions) is not. Classified by SQLSTATE class.
pub(crate) fn is_transient_sql(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // 08 connection exception, 57P admin shutdown / crash, 53 resources, 40 rollbacks.
            code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("53")
                || code.starts_with("40")
        }
        _ => false,
    }
}

/// `Result` with the engine [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
