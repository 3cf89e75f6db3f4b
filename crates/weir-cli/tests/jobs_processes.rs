//! The job queue across real `weir run` processes, configured in weir.toml only: `[[periodic]]`
//! enqueues exactly one job per slot whichever process leads, and `[jobs.limits]` holds a
//! queue's global concurrency and rate with two processes claiming.

use std::path::PathBuf;
use std::time::Duration;

use sqlx::PgPool;
use weir_testkit::{TestDatabase, eventually};

mod support;
use support::*;

/// Writes `config` as weir.toml in a fresh directory; `weir run --config <it>` on `db`.
struct Run {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Run {
    fn new(config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weir.toml");
        std::fs::write(&path, config).unwrap();
        Self { _dir: dir, path }
    }

    fn cmd(&self, db: &TestDatabase<'_>) -> std::process::Command {
        weir(db, &["run", "--config", self.path.to_str().unwrap()])
    }

    /// Two `weir run` processes, once both have registered their job runners.
    async fn two(&self, db: &TestDatabase<'_>, pool: &PgPool) -> (Proc, Proc) {
        let a = spawn(self.cmd(db));
        let b = spawn(self.cmd(db));
        eventually("both processes registered", Duration::from_secs(30), || async {
            scalar(pool, "select count(*) from weir.job_processes").await == 2
        })
        .await;
        (a, b)
    }
}

async fn scalar(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

fn both_alive(a: &mut Proc, b: &mut Proc) {
    assert!(a.0.try_wait().unwrap().is_none(), "weir run A exited");
    assert!(b.0.try_wait().unwrap().is_none(), "weir run B exited");
}

#[tokio::test]
async fn periodic_from_weir_toml_enqueues_one_job_per_slot_across_two_processes() {
    let (db, pool) = setup("jobs_periodic_toml").await;
    let run = Run::new(
        r#"
[jobs.queues]
default = 4

[[workers]]
kind = "tick"
type = "sql"
sql = "select 1"

[[periodic]]
name = "tick"
cron = "*/1 * * * * *"
timezone = "Europe/Paris"
kind = "tick"
"#,
    );
    let (mut a, mut b) = run.two(&db, &pool).await;
    let first = scalar(&pool, "select count(*) from weir.all_jobs").await;
    // About five seconds of slots with both processes running.
    eventually("five more periodic jobs", Duration::from_secs(20), || async {
        scalar(&pool, "select count(*) from weir.all_jobs").await >= first + 5
    })
    .await;
    both_alive(&mut a, &mut b);
    sigterm(&mut a);
    sigterm(&mut b);

    let slots: Vec<(chrono::DateTime<chrono::Utc>, i64)> = sqlx::query_as(
        "select substring(unique_key from '^periodic:tick:(.*)$')::timestamptz, count(*)
           from weir.all_jobs where kind = 'tick' group by 1 order by 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(slots.len() >= 5, "{slots:?}");
    for (slot, n) in &slots {
        assert_eq!(*n, 1, "slot {slot} enqueued {n} times: {slots:?}");
    }
    for pair in slots.windows(2) {
        assert_eq!(
            pair[1].0 - pair[0].0,
            chrono::TimeDelta::seconds(1),
            "a gap between slots {} and {}",
            pair[0].0,
            pair[1].0
        );
    }
    let without_key =
        scalar(&pool, "select count(*) from weir.all_jobs where unique_key is null").await;
    assert_eq!(without_key, 0);
    println!("{} slots, one job each, no gap", slots.len());
}

#[tokio::test]
async fn a_periodic_entry_that_does_not_parse_stops_weir_run_naming_it() {
    let (db, _pool) = setup("jobs_periodic_bad").await;
    for (periodic, expect) in [
        ("cron = \"0 25 * * *\"\ntimezone = \"Europe/Paris\"", "`25` in the hour field (0-23)"),
        ("cron = \"0 3 * * *\"\ntimezone = \"Europe/Pariss\"", "unknown time zone `Europe/Pariss`"),
    ] {
        let run = Run::new(&format!(
            "[jobs.queues]\ndefault = 1\n\n[[periodic]]\nname = \"nightly\"\nkind = \"report\"\n\
             {periodic}\n"
        ));
        let (ok, out) = output(run.cmd(&db));
        assert!(!ok, "{out}");
        assert!(out.contains(r#"[[periodic]] "nightly" (line 4) cannot be scheduled"#), "{out}");
        assert!(out.contains(expect), "{out}");
        assert_eq!(out.trim().lines().count(), 1, "one line: {out}");
    }
}

/// A `sql` worker that records when each run started and ended, after 0.3 s of work.
const RECORDED_RUN: &str = "
create table runs (n int primary key, started timestamptz not null, ended timestamptz not null);
create function record_run(n int) returns void language plpgsql as $$
declare t0 timestamptz := clock_timestamp();
begin
    perform pg_sleep(0.3);
    insert into runs values (n, t0, clock_timestamp());
end $$;";

#[tokio::test]
async fn a_global_concurrency_limit_holds_across_two_processes() {
    let (db, pool) = setup("jobs_global_limit").await;
    db.psql(RECORDED_RUN).unwrap();
    let run = Run::new(
        r#"
[jobs]
poll_interval = "100ms"

[jobs.queues]
slow = 10

[jobs.limits.slow]
global_concurrency = 3

[[workers]]
kind = "slow"
queue = "slow"
type = "sql"
sql = "select record_run(($1->>'n')::int)"
"#,
    );
    let (mut a, mut b) = run.two(&db, &pool).await;
    db.psql("select weir.enqueue('slow', 'slow', jsonb_build_object('n', g)) from generate_series(1, 30) g")
        .unwrap();
    eventually("30 runs", Duration::from_secs(60), || async {
        scalar(&pool, "select count(*) from runs").await == 30
    })
    .await;
    both_alive(&mut a, &mut b);
    sigterm(&mut a);
    sigterm(&mut b);
    // Runs in progress at each start: the most at once.
    let most = scalar(
        &pool,
        "select max((select count(*) from runs o where o.started <= r.started and o.ended > r.started))
           from runs r",
    )
    .await;
    let processes =
        scalar(&pool, "select count(distinct attempted_by) from weir.job_history").await;
    let span: f64 = sqlx::query_scalar(
        "select extract(epoch from max(ended) - min(started))::float8 from runs",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    println!("most at once {most}, {processes} processes, 30 runs of 0.3 s in {span:.2} s");
    assert!(most <= 3, "{most} jobs ran at once with global_concurrency = 3");
    assert_eq!(most, 3, "the limit was never reached");
    assert_eq!(processes, 2, "both processes ran jobs");
}

/// Two processes of 3 slots each, jobs of 0.3 s, at most 5 starts a second: both must claim to
/// reach the rate, and together they must not pass it.
#[tokio::test]
async fn a_rate_limit_holds_across_two_processes() {
    let (db, pool) = setup("jobs_rate_limit").await;
    let run = Run::new(
        r#"
[jobs]
poll_interval = "100ms"

[jobs.queues]
fast = 3

[jobs.limits.fast]
rate = "5/1s"

[[workers]]
kind = "fast"
queue = "fast"
type = "sql"
sql = "select pg_sleep(0.3)"
"#,
    );
    let (mut a, mut b) = run.two(&db, &pool).await;
    db.psql("select weir.enqueue('fast', 'fast') from generate_series(1, 20)").unwrap();
    eventually("20 completed jobs", Duration::from_secs(60), || async {
        scalar(&pool, "select count(*) from weir.job_history where state = 'completed'").await == 20
    })
    .await;
    both_alive(&mut a, &mut b);
    sigterm(&mut a);
    sigterm(&mut b);
    // Starts in the one-second window (t - 1 s, t] ending at each start: the most in any.
    let most = scalar(
        &pool,
        "select max((select count(*) from weir.job_history o
                      where o.attempted_at > h.attempted_at - interval '1 s'
                        and o.attempted_at <= h.attempted_at))
           from weir.job_history h",
    )
    .await;
    let span: f64 = sqlx::query_scalar(
        "select extract(epoch from max(attempted_at) - min(attempted_at))::float8
           from weir.job_history",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let processes =
        scalar(&pool, "select count(distinct attempted_by) from weir.job_history").await;
    println!(
        "20 jobs at 5/1s: starts spread over {span:.2} s, at most {most} in a second, {processes} processes"
    );
    assert!(most <= 5, "{most} starts in one second with rate = 5/1s");
    // 20 jobs, 5 a second: the last starts at least 3 s after the first, and not much later.
    assert!(span >= 3.0, "20 jobs started within {span:.2} s");
    assert!(span < 6.0, "20 jobs took {span:.2} s to start");
    // 3 slots each, jobs of 0.3 s: one process alone cannot start 5 in a second.
    assert_eq!(processes, 2, "both processes started jobs");
}
