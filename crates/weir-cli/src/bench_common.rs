//! Helpers shared by the `weir bench …` subcommands (`bench_ingest`, `bench_operators`,
//! `bench_fanout`): the PostgreSQL server a benchmark runs against and its databases, readers of
//! `/proc` (CPU ticks, RSS), a thread with a runtime of its own, and the percentiles and number
//! formats of the printed figures.
//!
//! Where it sits: inside the `weir` command, below the benchmark modules and used by nothing
//! else. Only what is the same logic in more than one benchmark lives here; what merely looks
//! alike (each benchmark's CPU sampler, process labels, verdict words) stays with its benchmark.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool};
use weir_testkit::{Cluster, Options};

// ---------------------------------------------------------------------------------------------
// The server and its databases

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

// ---------------------------------------------------------------------------------------------
// A thread of its own

/// Runs `make()` to completion on a new thread with a current-thread runtime.
pub(crate) fn on_own_thread<F, Fut, T>(
    name: &str,
    make: F,
) -> tokio::sync::oneshot::Receiver<anyhow::Result<T>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name(name.to_string()).spawn(move || {
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(make()));
        let _ = tx.send(result);
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot spawn a benchmark thread");
    }
    rx
}

// ---------------------------------------------------------------------------------------------
// /proc

/// What `/proc/<pid>/stat` says of a process.
#[derive(Debug)]
pub(crate) struct ProcStat {
    pub(crate) comm: String,
    pub(crate) ppid: u32,
    /// utime + stime, in clock ticks.
    pub(crate) ticks: u64,
    /// cutime + cstime (waited-for children), in clock ticks.
    pub(crate) child_ticks: u64,
}

/// `/proc/<pid>/stat` of `pid`, if it (still) exists.
pub(crate) fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses the text of a `/proc/<pid>/stat` (the command name may hold spaces and parentheses).
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    let f: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // f[0] is field 3 (state): field k is f[k - 3].
    let num = |k: usize| -> Option<u64> { f.get(k - 3)?.parse().ok() };
    Some(ProcStat {
        comm,
        ppid: num(4)? as u32,
        ticks: num(14)? + num(15)?,
        child_ticks: num(16)? + num(17)?,
    })
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 when it cannot say), asked once.
pub(crate) fn clock_ticks() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The pids of the children of `pid` (of the postmaster: the server's processes).
pub(crate) fn children_of(pid: u32) -> Vec<u32> {
    if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        return text.split_whitespace().filter_map(|s| s.parse().ok()).collect();
    }
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| proc_stat(*p).is_some_and(|s| s.ppid == pid))
        .collect()
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
pub(crate) fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Figures

/// Nearest-rank percentile of sorted values (the default, zero, of none).
pub(crate) fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `x` rounded to a whole number, with `,` between groups of three digits.
pub(crate) fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// A ratio with enough digits to tell small ones apart.
pub(crate) fn ratio(x: f64) -> String {
    if x < 0.1 { format!("{x:.3}x") } else { format!("{x:.2}x") }
}

/// Whether a target was met, as the summary tables of `bench ingest` and `bench fanout` say it.
pub(crate) fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
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

    #[test]
    fn percentiles_and_separators() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[1, 2, 3, 4], 0.5), 2);
        assert_eq!(percentile::<f64>(&[], 0.5), 0.0);
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }

    #[test]
    fn parses_proc_stat() {
        let s = "123 (post gres) S 7 1 1 0 -1 0 0 0 0 0 50 25 3 4 20 0 1 0 100 0 0";
        let st = parse_stat(s).unwrap();
        assert_eq!(st.comm, "post gres");
        assert_eq!(st.ppid, 7);
        assert_eq!(st.ticks, 75);
        assert_eq!(st.child_ticks, 7);
    }
}
