//! The engine's error: one enum at the crate boundary, each variant saying what is wrong and
//! how to fix it.

/// What can stop weir.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] weir_core::ConfigError),
    /// The server could not be reached or refused the login.
    #[error("cannot connect to {target} ({hint})")]
    Connect {
        /// host:port/database, without credentials.
        target: String,
        /// What to check, for this kind of failure.
        hint: &'static str,
        /// What the driver said.
        #[source]
        cause: ConnectCause,
    },
    /// A query failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The log failed.
    #[error(transparent)]
    Log(#[from] weir_log::Error),
    /// The consumer engine failed, or an operator is configured wrongly.
    #[error(transparent)]
    Consumer(#[from] weir_consumer::Error),
    /// The job queue failed (its migration, a `[jobs]` setting, the runner's start or stop).
    #[error(transparent)]
    Jobs(#[from] weir_jobs::Error),
    /// A `[[periodic]]` entry cannot be scheduled: its cron expression or time zone does not
    /// parse, or its job is out of range.
    #[error("{entry} cannot be scheduled")]
    Periodic {
        /// The entry, as `[[periodic]] "name" (line N)`.
        entry: String,
        /// What is wrong with it.
        #[source]
        source: weir_jobs::Error,
    },
    /// The event store or a subscription failed, or a `[[subscriptions]]` entry is wrong.
    #[error(transparent)]
    Streams(#[from] weir_streams::Error),
    /// Reading the replication slot failed: the connection, or a pgoutput stream we could
    /// not decode.
    #[error(transparent)]
    Source(#[from] weir_source::Error),
    /// The server or the database is not set up for weir; the message says how to fix it.
    #[error("{0}")]
    Setup(String),
    /// A backfill cannot be asked for or cannot go on; the message says why and what to do.
    #[error("{0}")]
    Backfill(String),
    /// The table already has a pending or running backfill; the message names it.
    #[error("{0}")]
    BackfillActive(String),
    /// Operators or subscriptions route watched tables by columns the tables' replica identity
    /// leaves out of deleted and moved rows: they would halt at the first delete. Each names
    /// the table, the column and the fix.
    #[error("cannot start: {}", needs_message(.0))]
    ReplicaIdentity(Vec<crate::replica_identity::Need>),
    /// A part of weir panicked (a bug: please report it with the message).
    #[error("{part} panicked: {message}")]
    Panicked {
        /// Which part.
        part: &'static str,
        /// The panic, as the runtime reported it.
        message: String,
    },
}

impl Error {
    /// Whether the ingest loop should reconnect (true) or stop with this error (false); database
    /// errors by [`weir_log::sqlstate::is_transient`].
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Source(e) => e.is_transient(),
            Error::Database(e) | Error::Connect { cause: ConnectCause(e), .. } => {
                weir_log::sqlstate::is_transient(e)
            }
            Error::Log(weir_log::Error::Database(e)) => weir_log::sqlstate::is_transient(e),
            Error::Log(weir_log::Error::Moved { .. }) => true,
            Error::Consumer(e) => e.is_transient(),
            Error::Jobs(e) => e.is_transient(),
            Error::Streams(weir_streams::Error::Database(e)) => weir_log::sqlstate::is_transient(e),
            Error::Streams(weir_streams::Error::Consumer(e)) => e.is_transient(),
            _ => false,
        }
    }

    /// Whether this is a connection that TLS refused (a certificate, or the URL's TLS
    /// settings): a fix in the URL, not a server to start.
    pub fn is_tls_refusal(&self) -> bool {
        match self {
            Error::Connect { cause: ConnectCause(sqlx::Error::Tls(_)), .. } => true,
            Error::Connect { cause: ConnectCause(sqlx::Error::Io(e)), .. } => {
                weir_log::sqlstate::is_refused_certificate(e)
            }
            _ => false,
        }
    }

    /// [`Error::Connect`] to `target`, with what to check for `error`'s kind of failure.
    pub(crate) fn connect(target: String, error: sqlx::Error) -> Self {
        let hint = match &error {
            sqlx::Error::Tls(_) => {
                "TLS failed: check `sslmode`, `sslrootcert`, `sslcert` and `sslkey` in the URL"
            }
            sqlx::Error::Io(e) if weir_log::sqlstate::is_refused_certificate(e) => {
                "the server's certificate was refused: is `sslrootcert` in the URL the CA \
                 that signed it, and is the URL's host the one it names? \
                 `sslmode=require` encrypts without checking the certificate"
            }
            e if is_login_refusal(e) => {
                "the server refused the login: check the role, password and database name in \
                 `database.url`, DATABASE_URL or the PG* variables"
            }
            _ => {
                "is the server running, and are `database.url`, DATABASE_URL or the PG* \
                 variables right?"
            }
        };
        Error::Connect { target, hint, cause: ConnectCause(error) }
    }
}

/// Whether the server answered and refused this role, password or database (SQLSTATE class
/// 28, or 3D000): a fix in the URL, not a server to wait for.
pub(crate) fn is_login_refusal(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code.starts_with("28") || code == "3D000")
}

/// The driver's error of a failed connection, said once: a server's refusal as its message
/// and SQLSTATE (sqlx adds "at line N", a line of PostgreSQL's own source, which reads like a
/// line of the user's configuration), otherwise the error and its sources, each part once
/// (sqlx's own text repeats its source's). Its `source()` is none: it says all of them.
#[derive(Debug)]
pub struct ConnectCause(pub(crate) sqlx::Error);

impl std::fmt::Display for ConnectCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(db) = self.0.as_database_error() {
            return match db.code() {
                Some(code) => write!(f, "{} (SQLSTATE {code})", db.message()),
                None => f.write_str(db.message()),
            };
        }
        let mut parts: Vec<String> = Vec::new();
        for e in std::iter::successors(Some(&self.0 as &dyn std::error::Error), |e| e.source()) {
            let text = e.to_string();
            if !parts.iter().any(|p| p.contains(&text)) {
                parts.push(text);
            }
        }
        f.write_str(&parts.join(": "))
    }
}

impl std::error::Error for ConnectCause {}

fn needs_message(needs: &[crate::replica_identity::Need]) -> String {
    needs.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// `Result` with the engine [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
