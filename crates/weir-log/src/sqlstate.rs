//! The one classification of database failures into "try again later" and "stop": by the
//! driver's error kind and the server's SQLSTATE class, never by message text.
//!
//! Every loop that waits and tries again classifies its failure here, so they agree on what a
//! passing problem is: ingestion reconnects on a transient failure and stops on any other (a
//! dropped slot, refused permissions); the consumer supervisor and lanes and the job producer,
//! completer and maintenance keep trying either way (a retry corrupts nothing they hold) and say
//! in their log line which kind it was (`transient = …`).
//!
//! Compared with the two classifications this replaced, class `57` counts whole (it was `57P`
//! for ingestion: a cancelled statement, `57014`, now reconnects instead of stopping) and class
//! `40` whole (it was `40001` and `40P01` for the job queue).
//!
//! | transient | SQLSTATE / driver error |
//! |---|---|
//! | yes | I/O, TLS and protocol errors, pool time-outs; class `08` connection exception, `53` insufficient resources, `57` operator intervention (admin shutdown, crash recovery, cancel), `40` transaction rollback (serialization failure, deadlock) |
//! | no | everything else: bad SQL (`42`), missing objects, permissions (`42501`), constraint violations (`23`), data exceptions (`22`) — retrying the same statement fails the same way |
//!
//! Within "stop", one more distinction for the consumer lanes: a failure of the statement
//! itself ([`is_statement_error`], class `42`: a column or table that no longer exists, an
//! operator or function that does not take the argument's type since `alter column … type`, a
//! revoked permission) fails the same way for every event, so a lane halts its consumer at the
//! first such failure instead of burning its retries on it — and a park or a skip would only
//! set every later event aside for the same reason.
//!
//! SQLSTATE classes: <https://www.postgresql.org/docs/current/errcodes-appendix.html>

/// Whether retrying the same work later may succeed.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(io) if is_refused_certificate(io) => false,
        sqlx::Error::Io(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| is_transient_code(&c)),
        _ => false,
    }
}

/// Whether `e` is TLS refusing the server's certificate (sqlx reports rustls's verdict as an
/// I/O error): a wrong `sslrootcert` or host, which no retry mends.
pub fn is_refused_certificate(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::InvalidData && e.to_string().contains("certificate")
}

/// [`is_transient`] for a bare SQLSTATE code.
pub fn is_transient_code(code: &str) -> bool {
    ["08", "53", "57", "40"].iter().any(|class| code.starts_with(class))
}

/// Whether `e` says the statement cannot run at all, whatever its arguments: SQLSTATE class
/// `42`, syntax error or access rule violation (`42703` undefined_column, `42P01`
/// undefined_table, `42883` undefined_function, `42804` datatype_mismatch, `42501`
/// insufficient_privilege, `42601` syntax_error…).
pub fn is_statement_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db.code().is_some_and(|c| is_statement_error_code(&c)),
        _ => false,
    }
}

/// [`is_statement_error`] for a bare SQLSTATE code.
pub fn is_statement_error_code(code: &str) -> bool {
    code.starts_with("42")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        for code in ["08006", "53300", "57P01", "57014", "40001", "40P01"] {
            assert!(is_transient_code(code), "{code}");
        }
        for code in ["42P01", "42501", "23505", "22023", "XX000"] {
            assert!(!is_transient_code(code), "{code}");
        }
        for code in ["42703", "42P01", "42883", "42804", "42501", "42601"] {
            assert!(is_statement_error_code(code), "{code}");
        }
        for code in ["22P02", "23505", "40001", "08006", "XX000"] {
            assert!(!is_statement_error_code(code), "{code}");
        }
        assert!(!is_statement_error(&sqlx::Error::PoolTimedOut));
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
    }
}
