//! The PostgreSQL server a benchmark runs against: the one `--url` names, or a private cluster
//! started for the run (weir-testkit, `fsync=on`), and the databases each benchmark creates
//! and drops there.
//!
//! ```text
//! --url postgres://host/db ──┐
//!                            ├─→ PgServer: an admin pool on that database, the postmaster's pid
//! no --url → private cluster ┘     create_db(name) → the URL of a fresh database on the server
//!                                  drop_db(name)   → its walsenders ended, slots and database dropped
//! ```
//!
//! The postmaster's pid is known only when the server runs on this machine; the CPU breakdowns
//! ([`crate::cpu`]) need it.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool};
use weir_testkit::{Cluster, Options};

use crate::procfs::proc_stat;

/// How every benchmark is told which server to use.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ServerArgs {
    /// A server to use instead of a private cluster (superuser, wal_level=logical); the
    /// benchmark creates and drops its own databases there (the database part of the URL is
    /// only where it connects first).
    #[arg(long, env = "WEIR_BENCH_URL")]
    pub(crate) url: Option<String>,
}

/// The server and, for a private cluster, the cluster itself (kept alive while it is held):
/// `url` when given, otherwise a private cluster started with `settings`, reached over TCP or,
/// with `unix_socket`, over the socket in its data directory. Returns the URL of its
/// maintenance database.
pub(crate) async fn server_or_cluster(
    url: Option<String>,
    unix_socket: bool,
    settings: Vec<(String, String)>,
) -> anyhow::Result<(Option<Cluster>, String)> {
    Ok(match url {
        Some(u) => (None, u),
        None => {
            let c = tokio::task::spawn_blocking(move || {
                Cluster::start_temp(Options { settings, ..Options::default() })
            })
            .await??;
            let u = if unix_socket {
                // The testkit puts the socket in the data directory.
                format!(
                    "postgres://postgres@{}:{}/postgres",
                    percent_encode(&c.data_dir().display().to_string()),
                    c.port()
                )
            } else {
                c.url("postgres")
            };
            (Some(c), u)
        }
    })
}

/// The postmaster's pid when the server behind `admin` runs on this machine (for the CPU
/// breakdown): the parent of our backend, when both are `postgres` processes we can see.
pub(crate) async fn local_postmaster(admin: &PgPool) -> anyhow::Result<Option<u32>> {
    let backend: i32 = sqlx::query_scalar("select pg_backend_pid()").fetch_one(admin).await?;
    Ok(proc_stat(backend as u32)
        .filter(|s| s.comm == "postgres")
        .map(|s| s.ppid)
        .filter(|pm| proc_stat(*pm).is_some_and(|s| s.comm == "postgres")))
}

/// The server a benchmark runs against, with a small pool on its maintenance database from
/// which the benchmark creates and drops databases of its own.
pub(crate) struct PgServer {
    /// The private cluster, when no URL was given (stops when dropped).
    pub(crate) cluster: Option<Cluster>,
    /// URL of the maintenance database (databases are created from here).
    pub(crate) admin_url: String,
    pub(crate) admin: PgPool,
    /// The postmaster's pid when the server runs on this machine (for the CPU breakdown).
    pub(crate) postmaster: Option<u32>,
}

impl PgServer {
    /// Prints a benchmark's header: its name, the server's version, and where it runs (a
    /// private cluster or `--url`, `fsync`, the CPUs), `where_more` ending that line. Returns
    /// the CPU count.
    pub(crate) async fn print_header(
        &self,
        benchmark: &str,
        where_more: &str,
    ) -> anyhow::Result<usize> {
        let version: String = sqlx::query_scalar("select version()").fetch_one(&self.admin).await?;
        let fsync: String =
            sqlx::query_scalar("select current_setting('fsync')").fetch_one(&self.admin).await?;
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!("weir-bench {benchmark}");
        println!("  server   {}", version.split(',').next().unwrap_or(&version));
        println!(
            "  where    {} (fsync={fsync}), {cpus} CPUs on this machine{where_more}",
            if self.cluster.is_some() { "private cluster started for this run" } else { "--url" }
        );
        Ok(cpus)
    }

    /// Connects to `url`, or starts a private cluster with `settings` (see
    /// [`server_or_cluster`]). The admin pool's connections carry `application_name` when given.
    pub(crate) async fn start(
        url: Option<String>,
        unix_socket: bool,
        settings: Vec<(String, String)>,
        application_name: Option<&str>,
    ) -> anyhow::Result<Self> {
        let (cluster, admin_url) = server_or_cluster(url, unix_socket, settings).await?;
        let admin = async {
            let mut options = PgConnectOptions::from_str(&admin_url)?;
            if let Some(name) = application_name {
                options = options.application_name(name);
            }
            anyhow::Ok(PgPoolOptions::new().max_connections(2).connect_with(options).await?)
        }
        .await
        .context("connecting to the server")?;
        let postmaster = local_postmaster(&admin).await?;
        Ok(Self { cluster, admin_url, admin, postmaster })
    }

    /// Creates a fresh database and returns its URL.
    pub(crate) async fn create_db(&self, name: &str) -> anyhow::Result<String> {
        self.drop_db(name).await?;
        sqlx::query(AssertSqlSafe(format!("create database \"{name}\"")))
            .execute(&self.admin)
            .await?;
        Ok(url_with_db(&self.admin_url, name))
    }

    /// Drops the database and its replication slots, terminating whatever streams from them
    /// (again each round, should a client reconnect).
    pub(crate) async fn drop_db(&self, name: &str) -> anyhow::Result<()> {
        for _ in 0..50 {
            sqlx::query(
                "select pg_terminate_backend(active_pid) from pg_replication_slots
                 where database = $1 and active_pid is not null",
            )
            .bind(name)
            .execute(&self.admin)
            .await?;
            sqlx::query(
                "select pg_drop_replication_slot(slot_name) from pg_replication_slots
                 where database = $1 and not active",
            )
            .bind(name)
            .execute(&self.admin)
            .await?;
            let remaining: i64 =
                sqlx::query_scalar("select count(*) from pg_replication_slots where database = $1")
                    .bind(name)
                    .fetch_one(&self.admin)
                    .await?;
            if remaining == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sqlx::query(AssertSqlSafe(format!("drop database if exists \"{name}\" with (force)")))
            .execute(&self.admin)
            .await?;
        Ok(())
    }
}

/// Percent-encodes everything but unreserved characters (a socket directory as URL host).
pub(crate) fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `url` with its database replaced by `db`.
pub(crate) fn url_with_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(url_with_db("postgres://u@h:5/postgres", "x"), "postgres://u@h:5/x");
        assert_eq!(
            url_with_db("postgres://u@h:5/db?sslmode=disable", "x"),
            "postgres://u@h:5/x?sslmode=disable"
        );
        assert_eq!(url_with_db("postgres://u@h:5/db?x=1", "n"), "postgres://u@h:5/n?x=1");
        assert_eq!(url_with_db("postgres://u@h:5", "x"), "postgres://u@h:5/x");
    }
}
