//! What the tests of the real `weir` binary share: spawning it on a test database, reading what
//! it printed, killing it. Each test binary uses a part of it.
#![allow(dead_code)]

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use weir_testkit::TestDatabase;

pub(crate) const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// A running `weir` process, killed when dropped.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `weir <args>` on `db` (its own slot, HTTP on a free port, no fault injection).
pub(crate) fn weir(db: &TestDatabase<'_>, args: &[&str]) -> Command {
    let mut cmd = Command::new(WEIR);
    cmd.args(args)
        .env("DATABASE_URL", db.url())
        .env("WEIR_SOURCE_SLOT", db.name())
        .env("WEIR_HTTP_BIND", "127.0.0.1:0")
        .env_remove("WEIR_FAULT")
        .current_dir(std::env::temp_dir());
    cmd
}

/// Starts `cmd` with its output dropped.
pub(crate) fn spawn(mut cmd: Command) -> Proc {
    Proc(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
}

/// Runs `cmd` to its end: whether it succeeded, and stdout followed by stderr.
pub(crate) fn output(mut cmd: Command) -> (bool, String) {
    let Output { status, stdout, stderr } = cmd.output().unwrap();
    (
        status.success(),
        format!("{}{}", String::from_utf8_lossy(&stdout), String::from_utf8_lossy(&stderr)),
    )
}

pub(crate) fn sigkill(p: &Proc) {
    Command::new("kill").args(["-9", &p.0.id().to_string()]).status().unwrap();
}

/// SIGTERM, then waits (at most 20 s) for it to exit.
pub(crate) fn sigterm(p: &mut Proc) {
    Command::new("kill").args(["-TERM", &p.0.id().to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while p.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "weir did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A test database with table `t (id int primary key, v text)` and `weir init` done.
pub(crate) async fn setup(prefix: &str) -> (TestDatabase<'static>, PgPool) {
    let db = weir_testkit::shared().database(prefix).unwrap();
    db.psql("create table t (id int primary key, v text)").unwrap();
    let (ok, out) = output(weir(&db, &["init"]));
    assert!(ok, "weir init failed: {out}");
    let pool = PgPool::connect(&db.url()).await.unwrap();
    (db, pool)
}
