//! `type = "sql"` workers in real `weir run` processes: the statement's effect commits with the
//! job's completion; a statement that fails is retried with its SQLSTATE recorded; a row
//! answering `discard` or `snooze` rolls the effect back; a hanging statement is cancelled in
//! the server at the attempt's timeout; a statement that does not prepare is refused at
//! start-up with the database's reason and the entry's line; and across `kill -9` of
//! `weir run` mid-way through 2,000 jobs, every job has exactly one effect.

mod support;
#[path = "support/workers.rs"]
mod workers;

use std::time::{Duration, Instant};

use serde_json::json;
use workers::{BASE, Workers, line_of};

const SCHEMA: &str = "
    create table gates (n int primary key);
    create table effects (n int not null references gates (n));
    create table log (n int not null, at timestamptz not null default clock_timestamp());";

fn entry(kind: &str, sql: &str, extra: &str) -> String {
    format!(
        "\n[[workers]]\nkind = {kind:?}\ntype = \"sql\"\nsql = \"\"\"\n{sql}\n\"\"\"\n\
         backoff = {{ first = \"100ms\", max = \"100ms\" }}\n{extra}\n"
    )
}

async fn workers(prefix: &str, config: &str) -> Workers {
    let w = Workers::new(prefix, config).await;
    w.db.psql(SCHEMA).unwrap();
    w
}

async fn log_rows(w: &Workers, n: i32) -> i64 {
    sqlx::query_scalar("select count(*) from log where n = $1")
        .bind(n)
        .fetch_one(&w.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn complete_fail_retry_discard_snooze() {
    let config = [
        entry("log", "insert into log (n) values (($1->>'n')::int)", ""),
        // Fails (a foreign key) until its gate exists.
        entry("gated", "insert into effects (n) values (($1->>'n')::int)", ""),
        // Writes, then discards big numbers: the write must roll back.
        entry(
            "small_only",
            "insert into log (n) values (($1->>'n')::int)
             returning case when ($1->>'n')::int > 100 then 'too big: ' || ($1->>'n') end as discard",
            "",
        ),
        // Writes, then snoozes (an interval) while gate 0 is missing: each write rolls back.
        entry(
            "wait_for_gate",
            "with e as (insert into log (n) values (($1->>'n')::int) returning 1)
             select interval '200 milliseconds' as snooze from e
              where not exists (select from gates where n = 0)",
            "",
        ),
        // The same with the duration as text.
        entry(
            "wait_text",
            "select '300ms'::text as snooze where not exists (select from gates where n = -1)",
            "",
        ),
    ]
    .concat();
    let mut w = workers("workers_sql", &config).await;
    let _run = w.run();

    let id = w.enqueue("log", json!({"n": 7}), 3).await;
    let job = w.wait_state(id, "completed").await;
    assert_eq!((job.attempt, job.errors.as_str()), (1, "[]"));
    assert_eq!(log_rows(&w, 7).await, 1);

    let id = w.enqueue("gated", json!({"n": 42}), 100).await;
    let job = w.wait_for(id, "a failed attempt", Duration::from_secs(30), |j| j.attempt >= 2).await;
    assert!(job.errors.contains("violates foreign key constraint"), "{job:?}");
    assert!(job.errors.contains("(SQLSTATE 23503)"), "{job:?}");
    assert!(job.errors.contains("Key (n)=(42) is not present"), "the detail: {job:?}");
    sqlx::query("insert into gates values (42)").execute(&w.pool).await.unwrap();
    let job = w.wait_state(id, "completed").await;
    assert!(job.attempt >= 2, "{job:?}");
    assert_eq!(w.scalar("select count(*) from effects where n = 42").await, 1);

    let small = w.enqueue("small_only", json!({"n": 5}), 5).await;
    let big = w.enqueue("small_only", json!({"n": 500}), 5).await;
    w.wait_state(small, "completed").await;
    let job = w.wait_state(big, "discarded").await;
    assert_eq!(job.attempt, 1, "discarded at once: {job:?}");
    assert!(job.errors.contains("too big: 500"), "{job:?}");
    assert_eq!((log_rows(&w, 5).await, log_rows(&w, 500).await), (1, 0));

    let id = w.enqueue("wait_for_gate", json!({"n": 9}), 1).await;
    let job = w.wait_for(id, "two snoozes", Duration::from_secs(30), |j| j.max_attempts >= 3).await;
    assert_eq!(job.errors, "[]", "a snooze records no error");
    assert_eq!(log_rows(&w, 9).await, 0, "a snoozed statement's writes roll back");
    sqlx::query("insert into gates values (0)").execute(&w.pool).await.unwrap();
    w.wait_state(id, "completed").await;
    assert_eq!(log_rows(&w, 9).await, 1);

    let id = w.enqueue("wait_text", json!({}), 1).await;
    let started = Instant::now();
    w.wait_for(id, "a snooze", Duration::from_secs(30), |j| j.max_attempts >= 2).await;
    sqlx::query("insert into gates values (-1)").execute(&w.pool).await.unwrap();
    w.wait_state(id, "completed").await;
    assert!(started.elapsed() >= Duration::from_millis(300), "ran again before the snooze ended");
}

#[tokio::test]
async fn a_hanging_statement_is_cancelled_in_the_server() {
    let config = entry("hang", "select pg_sleep(30), $1::text", "timeout = \"300ms\"");
    let mut w = workers("workers_sql_timeout", &config).await;
    let _run = w.run();
    let id = w.enqueue("hang", json!({}), 1).await;
    let job = w.wait_state(id, "discarded").await;
    assert!(
        job.errors.contains("timed out after 300ms") || job.errors.contains("statement timeout"),
        "{job:?}"
    );
    // Not left sleeping in the server for its 30 s.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let sleeping: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity
              where datname = current_database() and pid <> pg_backend_pid()
                and state = 'active' and query like '%pg_sleep(30)%'",
        )
        .fetch_one(&w.pool)
        .await
        .unwrap();
        if sleeping == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the statement still runs in the server");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_statement_that_does_not_prepare_is_refused_at_start_up() {
    let w = workers("workers_sql_refused", "").await;
    let missing = entry("archive", "insert into archived (args) values ($1)", "");
    let printed = w.refused(&missing);
    let line = line_of(&format!("{BASE}{missing}"), "archive");
    assert!(printed.contains(&format!("[[workers]] \"archive\" (line {line})")), "{printed}");
    assert!(printed.contains("relation \"archived\" does not exist"), "{printed}");

    let bad_answer = entry("answer", "select 1 as discard", "");
    let printed = w.refused(&bad_answer);
    let line = line_of(&format!("{BASE}{bad_answer}"), "answer");
    assert!(printed.contains(&format!("[[workers]] \"answer\" (line {line})")), "{printed}");
    assert!(printed.contains("returns `discard` of type int4"), "{printed}");
}

/// The crash test: 2,000 jobs each insert one row (no unique constraint: a second effect of a
/// job would show); `weir run` is SIGKILLed three times while they run, then left to finish.
#[tokio::test]
async fn exactly_one_effect_per_job_across_kill_9() {
    const JOBS: i64 = 2000;
    let config = entry(
        "effect",
        "insert into log (n) select ($1->>'n')::int from (select pg_sleep(0.005)) s",
        "",
    );
    let mut w = workers("workers_sql_kill", &config).await;
    sqlx::query(
        "select weir.enqueue('default', 'effect', jsonb_build_object('n', g), max_attempts => 25)
           from generate_series(1, $1) g",
    )
    .bind(JOBS as i32)
    .execute(&w.pool)
    .await
    .unwrap();
    let started = Instant::now();
    let mut interrupted = std::collections::HashSet::new();
    for at in [300, 900, 1500] {
        let run = w.run();
        let deadline = Instant::now() + Duration::from_secs(60);
        while w.scalar("select count(*) from log").await < at {
            assert!(Instant::now() < deadline, "no progress to {at} rows\n{}", w.logs());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        support::sigkill(&run);
        drop(run);
        let running: Vec<i64> =
            sqlx::query_scalar("select id from weir.jobs where state = 'running'")
                .fetch_all(&w.pool)
                .await
                .unwrap();
        let done = w.scalar("select count(*) from log").await;
        assert!(done < JOBS, "killed after the end ({done} rows): the test proves nothing");
        interrupted.extend(running);
    }
    assert!(!interrupted.is_empty(), "no job was running at any kill: the test proves nothing");
    let _run = w.run();
    let deadline = Instant::now() + Duration::from_secs(120);
    while w.scalar("select count(*) from weir.job_history where state = 'completed'").await < JOBS {
        assert!(Instant::now() < deadline, "not all jobs completed\n{}", w.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "{JOBS} jobs, 3 kills ({} jobs running at the kills) done in {:?}",
        interrupted.len(),
        started.elapsed()
    );
    assert_eq!(w.scalar("select count(*) from weir.jobs").await, 0);
    assert_eq!(w.scalar("select count(*) from log").await, JOBS);
    assert_eq!(w.scalar("select count(distinct n) from log").await, JOBS);
    let rescued =
        w.scalar("select count(*) from weir.job_history where errors::text like '%rescued%'").await;
    eprintln!("{rescued} jobs were rescued");
}
