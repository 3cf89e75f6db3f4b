//! What the tests of `[[workers]]` declared in weir.toml share: a test database, a weir.toml in
//! a temp directory (fast polls, heartbeats and rescue), `weir run` on it with its log kept in
//! that directory, and reading jobs back.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::PgPool;
use weir_testkit::TestDatabase;

use crate::support::{Proc, weir};

/// Every test's weir.toml starts with this: only `t` captured, jobs polled and swept every
/// 100 ms, processes rescued a second after their last heartbeat.
pub(crate) const BASE: &str = r#"[source]
tables = ["t"]

[jobs]
poll_interval = "100ms"
sweep_interval = "100ms"
heartbeat_interval = "100ms"
rescue_after = "1s"
"#;

/// A job as the tests look at it.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub(crate) state: String,
    pub(crate) attempt: i32,
    pub(crate) max_attempts: i32,
    /// `[{attempt, at, error}, …]` as text.
    pub(crate) errors: String,
}

pub(crate) struct Workers {
    pub(crate) db: TestDatabase<'static>,
    pub(crate) pool: PgPool,
    pub(crate) dir: tempfile::TempDir,
    config: PathBuf,
    runs: usize,
}

impl Workers {
    /// A database with `t` and `weir init` done, and weir.toml = [`BASE`] + `workers`.
    pub(crate) async fn new(prefix: &str, workers: &str) -> Self {
        let (db, pool) = crate::support::setup(prefix).await;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("weir.toml");
        std::fs::write(&config, format!("{BASE}{workers}")).unwrap();
        Self { db, pool, dir, config, runs: 0 }
    }

    /// The text of weir.toml.
    pub(crate) fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).unwrap()
    }

    /// A path in the temp directory.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self, config: &Path) -> Command {
        let mut cmd = weir(&self.db, &["run"]);
        cmd.arg("--config").arg(config).env("RUST_LOG", "info");
        cmd
    }

    /// Starts `weir run`; its output goes to `weir-<n>.log` in the temp directory.
    pub(crate) fn run(&mut self) -> Proc {
        self.runs += 1;
        let log = std::fs::File::create(self.path(&format!("weir-{}.log", self.runs))).unwrap();
        let mut cmd = self.command(&self.config);
        Proc(cmd.stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap())
    }

    /// The logs of every `weir run` so far, for failure messages.
    pub(crate) fn logs(&self) -> String {
        (1..=self.runs)
            .map(|n| {
                std::fs::read_to_string(self.path(&format!("weir-{n}.log"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    /// `weir run` on weir.toml = [`BASE`] + `workers`, which must exit non-zero within 60 s:
    /// what it printed.
    pub(crate) fn refused(&self, workers: &str) -> String {
        let config = self.path("refused.toml");
        std::fs::write(&config, format!("{BASE}{workers}")).unwrap();
        let out = self.path("refused.log");
        let log = std::fs::File::create(&out).unwrap();
        let mut child = Proc(
            self.command(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "weir run did not stop: {}",
                std::fs::read_to_string(&out).unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let printed = std::fs::read_to_string(&out).unwrap();
        assert!(!status.success(), "weir run should have refused to start: {printed}");
        printed
    }

    /// Enqueues a job of `kind` on `default` with `args`, `max_attempts` attempts.
    pub(crate) async fn enqueue(&self, kind: &str, args: Value, max_attempts: i32) -> i64 {
        sqlx::query_scalar(
            "select weir.enqueue('default', $1, $2, max_attempts => $3, notify => true)",
        )
        .bind(kind)
        .bind(sqlx::types::Json(args))
        .bind(max_attempts)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    pub(crate) async fn job(&self, id: i64) -> Job {
        let (state, attempt, max_attempts, errors): (String, i32, i32, String) = sqlx::query_as(
            "select state::text, attempt, max_attempts, errors::text from weir.all_jobs \
             where id = $1",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await
        .unwrap();
        Job { state, attempt, max_attempts, errors }
    }

    /// Waits (at most `within`) until `cond` holds of job `id`; the job then.
    pub(crate) async fn wait_for(
        &self,
        id: i64,
        what: &str,
        within: Duration,
        cond: impl Fn(&Job) -> bool,
    ) -> Job {
        let deadline = Instant::now() + within;
        loop {
            let job = self.job(id).await;
            if cond(&job) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id}: timed out after {within:?} waiting for {what}; it is {job:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until job `id` is in `state`.
    pub(crate) async fn wait_state(&self, id: i64, state: &str) -> Job {
        self.wait_for(id, state, Duration::from_secs(30), |j| j.state == state).await
    }

    pub(crate) async fn scalar(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.unwrap()
    }
}

/// The line of the `[[workers]]` header of `kind` in `toml` (1-based).
pub(crate) fn line_of(toml: &str, kind: &str) -> usize {
    let lines: Vec<&str> = toml.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == format!("kind = {kind:?}"))
        .unwrap_or_else(|| panic!("no kind {kind:?} in {toml}"));
    let header = lines[..at].iter().rposition(|l| l.trim() == "[[workers]]").unwrap();
    header + 1
}
