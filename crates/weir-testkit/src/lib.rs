//! A private PostgreSQL cluster started from the installed server binaries.
//!
//! Where it sits: outside the data flow. Every test that needs logical replication, the
//! benchmarks, `weir dev` and `weir demo` get their database from here, so weir never needs a
//! pre-configured server to be tried out.
//!
//! ```text
//! find binaries ─► initdb (once per data dir) ─► pg_ctl start (wal_level=logical, free port)
//!                                                   │
//!            watchdog process ◄─ watches our pid ───┘ stops the cluster when we die, even by
//!                                                     SIGKILL, so no postmaster is orphaned
//! ```
//!
//! - Binaries: `WEIR_PG_BIN`, then `pg_config --bindir`, then the newest
//!   `/usr/lib/postgresql/*/bin` holding `initdb` and `pg_ctl`.
//! - PostgreSQL refuses to run as root. When we are root the server runs as the `postgres` user
//!   through `setpriv --reuid=postgres --regid=postgres --init-groups` (`runuser` would leave a
//!   process that swallows the stop signal).
//! - A temporary cluster removes its data directory when stopped; a cluster in a given directory
//!   (`weir dev`) keeps it and is initialised only once.
//!
//! One cluster per test binary ([`shared`]), one database per test ([`Cluster::database`]);
//! [`TestDatabase`] drops its replication slots and the database when dropped.
//!
//! With the `receiver` feature, `receiver` is a recording HTTP receiver for the webhook sink's
//! tests (scripted answers: statuses, hangs, closed connections).
//!
//! [`NatsServer`]: a private `nats-server -js` for the NATS sink's tests (module `nats`).
//!
//! [`proxy::Proxy`]: a TCP proxy between weir and a cluster that delivers in bursts or cuts
//! connections.

mod nats;
pub mod proxy;
#[cfg(feature = "receiver")]
pub mod receiver;

pub use nats::{NatsServer, find_nats_server};

use std::fmt;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// What went wrong starting or driving the private cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No PostgreSQL server binaries were found.
    #[error(
        "no PostgreSQL server binaries found (looked at $WEIR_PG_BIN, `pg_config --bindir` and \
         /usr/lib/postgresql/*/bin); install the server package (e.g. `apt-get install \
         postgresql`) or set WEIR_PG_BIN to the directory holding initdb and pg_ctl"
    )]
    NoBinaries,
    /// No `nats-server` binary was found.
    #[error(
        "no nats-server binary found (looked at $WEIR_NATS_SERVER, /usr/sbin/nats-server and \
         $PATH); the NATS sink's tests start their own server: install it (e.g. `apt-get \
         install nats-server`, as .ci/run does) or set WEIR_NATS_SERVER to its path"
    )]
    NoNatsServer,
    /// A command we ran failed.
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed (stderr and the tail of the server log).
        output: String,
    },
    /// Spawning a process or touching a file failed.
    #[error("{what}")]
    Io {
        /// What we were doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// `Result` with the testkit [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Server settings applied at every start.
#[derive(Debug, Clone)]
pub struct Options {
    /// `fsync`; tests turn it off for speed, `weir dev` and benchmarks keep it on.
    /// Defaults to `true`.
    pub fsync: bool,
    /// Extra `-c name=value` settings.
    pub settings: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self { fsync: true, settings: Vec::new() }
    }
}

/// A running private PostgreSQL cluster. Stops (fast) when dropped.
pub struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    options: Options,
    /// Holds the temporary directory alive; `None` for a cluster in a given directory.
    _temp: Option<tempfile::TempDir>,
    watchdog: Option<std::process::Child>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster").field("data", &self.data).field("port", &self.port).finish()
    }
}

/// How to stop the server: `Fast` rolls back sessions and checkpoints; `Immediate` is a crash
/// (recovery runs at the next start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// `pg_ctl stop -m fast`.
    Fast,
    /// `pg_ctl stop -m immediate`.
    Immediate,
}

impl Cluster {
    /// Starts a throw-away cluster in a temporary directory, with `options`.
    pub fn start_temp(options: Options) -> Result<Self> {
        let temp = tempfile::Builder::new()
            .prefix("weir-pg-")
            .tempdir()
            .map_err(io("creating a temporary directory"))?;
        let data = temp.path().join("data");
        Self::start(data, Some(temp), options)
    }

    /// Starts (initialising once) a cluster whose data lives in `dir`; the data is kept when it
    /// stops. The port is remembered in `dir/port` so URLs stay the same across restarts.
    pub fn start_in(dir: &Path, options: Options) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let dir = dir.canonicalize().map_err(io(format!("resolving {}", dir.display())))?;
        Self::start(dir.join("data"), None, options)
    }

    fn start(data: PathBuf, temp: Option<tempfile::TempDir>, options: Options) -> Result<Self> {
        let bin = find_binaries()?;
        let parent = data.parent().expect("data dir has a parent").to_path_buf();
        let port_file = parent.join("port");
        let port = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .filter(|p| port_is_free(*p))
            .map_or_else(free_port, Ok)?;
        std::fs::write(&port_file, port.to_string()).map_err(io("writing the port file"))?;
        if as_root() {
            // The postgres user must own the directory that holds the data directory.
            run(Command::new("chown").arg("postgres:postgres").arg(&parent))?;
        }
        let mut cluster = Self { bin, data, port, options, _temp: temp, watchdog: None };
        if !cluster.data.join("PG_VERSION").exists() {
            cluster.initdb()?;
        }
        cluster.pg_ctl_start()?;
        cluster.watchdog = Some(cluster.spawn_watchdog()?);
        Ok(cluster)
    }

    fn initdb(&self) -> Result<()> {
        let mut cmd = self.server_command("initdb");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8"])
            .arg("--no-sync");
        run(&mut cmd)
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let mut settings = vec![
            ("listen_addresses".to_string(), "127.0.0.1".to_string()),
            ("port".to_string(), self.port.to_string()),
            ("unix_socket_directories".to_string(), self.data.display().to_string()),
            ("wal_level".to_string(), "logical".to_string()),
            ("max_replication_slots".to_string(), "32".to_string()),
            ("max_wal_senders".to_string(), "32".to_string()),
            ("max_connections".to_string(), "500".to_string()),
            ("fsync".to_string(), if self.options.fsync { "on" } else { "off" }.to_string()),
        ];
        if !self.options.fsync {
            settings.push(("synchronous_commit".into(), "off".into()));
            settings.push(("full_page_writes".into(), "off".into()));
        }
        settings.extend(self.options.settings.iter().cloned());
        let opts: Vec<String> = settings.iter().map(|(k, v)| format!("-c {k}={v}")).collect();
        let log = self.log_path();
        let mut cmd = self.server_command("pg_ctl");
        cmd.arg("-D").arg(&self.data).arg("-l").arg(&log).args([
            "-w",
            "-t",
            "60",
            "-o",
            &opts.join(" "),
            "start",
        ]);
        run(&mut cmd).map_err(|e| self.with_log_tail(e))
    }

    fn log_path(&self) -> PathBuf {
        self.data.parent().expect("data dir has a parent").join("postgres.log")
    }

    fn with_log_tail(&self, err: Error) -> Error {
        match err {
            Error::Command { command, status, output } => {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                Error::Command { command, status, output: format!("{output}\n{}", tail.join("\n")) }
            }
            other => other,
        }
    }

    /// A process that waits for this process to end (however it ends) and then stops the
    /// server, removing a temporary data directory.
    fn spawn_watchdog(&self) -> Result<std::process::Child> {
        let me = std::process::id();
        let pg_ctl = self.prefix_command("pg_ctl");
        let cleanup = match &self._temp {
            Some(t) => format!("rm -rf '{}'", t.path().display()),
            None => String::new(),
        };
        let script = format!(
            "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; \
             {pg_ctl} -D '{data}' -m immediate stop >/dev/null 2>&1; {cleanup}",
            data = self.data.display(),
        );
        use std::os::unix::process::CommandExt;
        Command::new("sh")
            .arg("-c")
            .arg(script)
            // Its own process group: Ctrl-C or a kill of our group must not take it along.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("spawning the cluster watchdog"))
    }

    /// The shell form of running a server binary (with `setpriv` when we are root).
    fn prefix_command(&self, program: &str) -> String {
        let path = self.bin.join(program);
        if as_root() {
            format!("setpriv --reuid=postgres --regid=postgres --init-groups '{}'", path.display())
        } else {
            format!("'{}'", path.display())
        }
    }

    fn server_command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if as_root() {
            let mut cmd = Command::new("setpriv");
            cmd.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]).arg(path);
            // The postgres user cannot read root's working directory.
            cmd.current_dir("/");
            cmd
        } else {
            Command::new(path)
        }
    }

    /// Stops the server.
    pub fn stop(&self, mode: StopMode) -> Result<()> {
        let mode = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        let mut cmd = self.server_command("pg_ctl");
        cmd.arg("-D").arg(&self.data).args(["-w", "-t", "60", "-m", mode, "stop"]);
        run(&mut cmd)
    }

    /// Starts the server again after [`stop`](Self::stop), on the same port.
    pub fn restart(&self) -> Result<()> {
        self.pg_ctl_start()
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// A `postgres://` URL for `database` as the `postgres` superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs SQL through `psql` as the superuser on `database` and returns its unaligned output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", database, "-c", sql])
            .output()
            .map_err(io("running psql"))?;
        if !out.status.success() {
            return Err(Error::Command {
                command: format!("psql -c {sql}"),
                status: out.status.to_string(),
                output: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Creates a fresh database with a unique name that starts with `prefix`; dropped (with its
    /// replication slots) when the guard is dropped.
    pub fn database(&self, prefix: &str) -> Result<TestDatabase<'_>> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}_{}_{n}", std::process::id())
            .to_lowercase()
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_");
        self.psql("postgres", &format!("create database \"{name}\""))?;
        Ok(TestDatabase { cluster: self, name })
    }

    /// The directory holding the server binaries in use.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop(StopMode::Fast);
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// A database created for one test; drops its replication slots and itself when dropped.
#[derive(Debug)]
pub struct TestDatabase<'a> {
    cluster: &'a Cluster,
    name: String,
}

impl TestDatabase<'_> {
    /// The database name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its URL.
    pub fn url(&self) -> String {
        self.cluster.url(&self.name)
    }

    /// Runs SQL through `psql` on this database.
    pub fn psql(&self, sql: &str) -> Result<String> {
        self.cluster.psql(&self.name, sql)
    }
}

impl Drop for TestDatabase<'_> {
    fn drop(&mut self) {
        // Slots pin WAL for the whole cluster: never leave one behind. Active ones belong to a
        // connection that is going away; terminate it first.
        let sql = format!(
            "select pg_terminate_backend(active_pid) from pg_replication_slots \
               where database = '{db}' and active_pid is not null;\
             select pg_sleep(0.1);\
             select pg_drop_replication_slot(slot_name) from pg_replication_slots \
               where database = '{db}' and not active;",
            db = self.name
        );
        let _ = self.cluster.psql("postgres", &sql);
        // `drop database` cannot share the implicit transaction of a multi-statement string.
        let _ = self
            .cluster
            .psql("postgres", &format!("drop database if exists \"{}\" with (force)", self.name));
    }
}

/// The cluster shared by every test of this test binary (temporary, `fsync=off`).
/// Stopped by its watchdog when the test binary exits.
pub fn shared() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        Cluster::start_temp(Options { fsync: false, settings: Vec::new() })
            .unwrap_or_else(|e| panic!("starting the private PostgreSQL cluster: {e}"))
    })
}

fn as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    })
}

/// Finds the directory holding `initdb` and `pg_ctl`.
pub fn find_binaries() -> Result<PathBuf> {
    let has = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("WEIR_PG_BIN").map(PathBuf::from) {
        return if has(&dir) { Ok(dir) } else { Err(Error::NoBinaries) };
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has(&dir) {
            return Ok(dir);
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has(&bin).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, dir)| dir).ok_or(Error::NoBinaries)
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    let port = listener.local_addr().map_err(io("finding a free port"))?.port();
    Ok(port)
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let out = cmd.stdin(Stdio::null()).output().map_err(io(format!("running {shown}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Command {
        command: shown,
        status: out.status.to_string(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` once `timeout` has passed.
///
/// The one way tests wait for something to happen (no sleeps): a deadline, and a message that
/// says what never happened.
///
/// ```no_run
/// # async fn t() {
/// use std::time::Duration;
/// let mut n = 0;
/// weir_testkit::eventually("the counter reaches 3", Duration::from_secs(5), || {
///     n += 1;
///     std::future::ready(n >= 3)
/// })
/// .await;
/// # }
/// ```
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_a_logical_cluster_and_creates_databases() {
        let cluster = shared();
        let db = cluster.database("testkit").unwrap();
        assert_eq!(db.psql("show wal_level").unwrap(), "logical");
        db.psql("create table t(id int primary key)").unwrap();
        let name = db.name().to_string();
        drop(db);
        let left = cluster
            .psql("postgres", &format!("select count(*) from pg_database where datname = '{name}'"))
            .unwrap();
        assert_eq!(left, "0");
    }

    #[test]
    fn a_given_directory_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Cluster::start_in(dir.path(), Options::default()).unwrap();
            c.psql("postgres", "create table kept(v int); insert into kept values (7)").unwrap();
        }
        let c = Cluster::start_in(dir.path(), Options::default()).unwrap();
        assert_eq!(c.psql("postgres", "select v from kept").unwrap(), "7");
    }
}
