//! Enqueue: transactions, SQL, uniqueness, bad input.

use std::time::Duration;

use serde_json::json;
use weir_jobs::{Error, Job, JobRunner, ListFilter, Unique};

use crate::common::*;

#[tokio::test]
async fn rolled_back_enqueue_leaves_no_job() {
    let env = setup("jobs_rollback").await;
    let mut tx = env.pool.begin().await.unwrap();
    let id = weir_jobs::enqueue(&mut tx, &task(Task::Ok)).await.unwrap().id;
    sqlx::query("select weir.enqueue('default', 'task', '{\"do\": \"ok\"}')")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(state(&env.pool, id).await, "missing");
    assert_eq!(count(&env.pool, "select count(*) from weir.all_jobs").await, 0);

    // And committed, both forms exist.
    let mut tx = env.pool.begin().await.unwrap();
    weir_jobs::enqueue(&mut tx, &task(Task::Ok)).await.unwrap();
    sqlx::query("select weir.enqueue('default', 'task', '{\"do\": \"ok\"}', priority => 3)")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        count(&env.pool, "select count(*) from weir.jobs where state = 'available'").await,
        2
    );
}

#[tokio::test]
async fn a_job_enqueued_from_sql_with_the_apps_write_runs() {
    let env = setup("jobs_sql").await;
    let probe = std::sync::Arc::new(Probe::default());
    let running = JobRunner::new(env.pool.clone(), fast_config(2))
        .register(Scripted(probe.clone()))
        .start()
        .await
        .unwrap();
    sqlx::query("create table users (id int primary key)").execute(&env.pool).await.unwrap();
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("insert into users values (1)").execute(&mut *tx).await.unwrap();
    let id: i64 = sqlx::query_scalar("select weir.enqueue('default', 'task', '{\"do\": \"tx\"}')")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    eventually("the SQL-enqueued job completes", Duration::from_secs(10), || async {
        state(&env.pool, weir_jobs::JobId(id)).await == "completed"
    })
    .await;
    assert_eq!(count(&env.pool, "select count(*) from effects").await, 1);
    running.stop(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn unique_jobs_while_active_and_for_a_period() {
    let env = setup("jobs_unique").await;
    let mut conn = env.pool.acquire().await.unwrap();
    let a = task(Task::Ok).unique(Unique::while_active("user-1"));
    let first = weir_jobs::enqueue(&mut conn, &a).await.unwrap();
    let second = weir_jobs::enqueue(&mut conn, &a).await.unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(first.id, second.id);
    // Once finished, the key is free again.
    weir_jobs::admin::cancel(&mut conn, first.id).await.unwrap();
    let third = weir_jobs::enqueue(&mut conn, &a).await.unwrap();
    assert!(!third.duplicate);
    assert_ne!(third.id, first.id);

    let p = task(Task::Ok).unique(Unique::for_period("digest", Duration::from_secs(3600)));
    let first = weir_jobs::enqueue(&mut conn, &p).await.unwrap();
    weir_jobs::admin::cancel(&mut conn, first.id).await.unwrap();
    // Even finished, the key stays taken for the period.
    let again = weir_jobs::enqueue(&mut conn, &p).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.id, first.id);
    // After the period it is free.
    sqlx::query("update weir.job_uniques set expires_at = now() - interval '1 second'")
        .execute(&mut *conn)
        .await
        .unwrap();
    let later = weir_jobs::enqueue(&mut conn, &p).await.unwrap();
    assert!(!later.duplicate);

    // From SQL too.
    let ids: Vec<i64> = sqlx::query_scalar(
        "select weir.enqueue('default', 'task', unique_key => 'sql-key') from generate_series(1, 3)",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert!(ids.iter().all(|&i| i == ids[0]), "{ids:?}");
}

#[tokio::test]
async fn bad_input_is_a_clear_error_and_loses_nothing() {
    let env = setup("jobs_bad_input").await;
    let mut conn = env.pool.acquire().await.unwrap();
    let err = weir_jobs::enqueue(&mut conn, &task(Task::Ok).priority(10)).await.unwrap_err();
    assert!(matches!(err, Error::InvalidJob(_)), "{err}");
    assert!(err.to_string().contains("priority must be between 0"), "{err}");
    let err =
        weir_jobs::enqueue(&mut conn, &task(Task::Ok).timeout(Duration::from_secs(100 * 3600)))
            .await
            .unwrap_err();
    assert!(err.to_string().contains("timeout must be between"), "{err}");
    // The SQL function checks the same for other languages, with SQLSTATE 22023.
    for (sql, expect) in [
        ("select weir.enqueue('default', 'task', priority => -1)", "priority must be between 0"),
        ("select weir.enqueue('default', 'task', max_attempts => 0)", "max_attempts must be"),
        (
            "select weir.enqueue('default', 'task', timeout => interval '-5 seconds')",
            "timeout must be",
        ),
        ("select weir.enqueue('', 'task')", "queue must be"),
    ] {
        let err = sqlx::query(sql).execute(&mut *conn).await.unwrap_err();
        let db = err.as_database_error().expect("a database error");
        assert_eq!(db.code().as_deref(), Some("22023"), "{sql}");
        assert!(db.message().contains(expect), "{sql}: {}", db.message());
    }
    assert_eq!(count(&env.pool, "select count(*) from weir.all_jobs").await, 0);

    // A bad cron expression is refused with its column.
    let err = weir_jobs::PeriodicJob::new("nightly", "0 25 * * *", task(Task::Ok)).unwrap_err();
    assert!(err.to_string().contains("column 3"), "{err}");
    assert!(err.to_string().contains("`25` in the hour field (0-23)"), "{err}");
}

#[tokio::test]
async fn unknown_kinds_wait_with_a_reason_and_bad_args_fail_the_attempt() {
    let env = setup("jobs_unknown").await;
    let probe = std::sync::Arc::new(Probe::default());
    let mut conn = env.pool.acquire().await.unwrap();
    let nobody =
        weir_jobs::enqueue(&mut conn, &Job::raw("nobody_knows", json!({}))).await.unwrap().id;
    let other_queue =
        weir_jobs::enqueue(&mut conn, &task(Task::Ok).queue("elsewhere")).await.unwrap().id;
    let bad_args =
        weir_jobs::enqueue(&mut conn, &Job::raw("task", json!({"do": "fly"})).max_attempts(2))
            .await
            .unwrap()
            .id;
    let running = JobRunner::new(env.pool.clone(), fast_config(2))
        .register(Scripted(probe.clone()))
        .start()
        .await
        .unwrap();
    eventually("the bad-args job fails its attempt", Duration::from_secs(10), || async {
        state(&env.pool, bad_args).await == "retryable"
    })
    .await;
    let info = weir_jobs::admin::show(&mut conn, bad_args).await.unwrap();
    let error = info.errors[0]["error"].as_str().unwrap().to_string();
    assert!(error.contains("args do not deserialize for kind `task`"), "{error}");
    assert!(error.contains("unknown variant `fly`"), "{error}");
    assert!(info.note.unwrap().contains("last error"));

    let list = weir_jobs::admin::list(&mut conn, &ListFilter::default()).await.unwrap();
    let note = |id| list.iter().find(|j| j.id == id).unwrap().note.clone().unwrap_or_default();
    assert_eq!(
        note(nobody),
        "waiting: no worker registered for kind 'nobody_knows' on queue 'default'"
    );
    assert_eq!(note(other_queue), "waiting: no live process works queue 'elsewhere'");
    assert_eq!(state(&env.pool, nobody).await, "available");
    running.stop(Duration::from_secs(5)).await.unwrap();
}

/// Args of an internally tagged enum (serde buffers it) with a float and raw JSON.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "do", rename_all = "snake_case")]
enum Measure {
    Scale { by: f64, raw: serde_json::Value },
}

impl weir_jobs::JobArgs for Measure {
    const KIND: &'static str = "measure";
}

struct Measurer(std::sync::Arc<std::sync::Mutex<Vec<(f64, String)>>>);

impl weir_jobs::Worker for Measurer {
    type Args = Measure;
    async fn work(
        &self,
        _ctx: weir_jobs::JobContext,
        Measure::Scale { by, raw }: Measure,
    ) -> Result<(), weir_jobs::JobError> {
        self.0.lock().unwrap().push((by, raw.to_string()));
        Ok(())
    }
}

/// Numbers as `jsonb` keeps them (`1.50`, more digits than an `f64`) reach args that serde
/// buffers (`#[serde(tag = …)]`): the float as its value, the raw JSON with every digit. (An
/// integer of 65 to 128 bits there is refused: serde's buffer has no `u128`; see
/// `weir_core::json`.)
#[tokio::test]
async fn buffered_args_get_numbers_as_jsonb_keeps_them() {
    let env = setup("jobs_numbers").await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let running = JobRunner::new(env.pool.clone(), fast_config(1))
        .register(Measurer(seen.clone()))
        .start()
        .await
        .unwrap();
    let id: i64 = sqlx::query_scalar(
        r#"select weir.enqueue('default', 'measure',
             '{"do": "scale", "by": 1.50, "raw": [1234567890123456789012345678901234567890, 0.1000000000000000000000000001]}')"#,
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    eventually("the job completes", Duration::from_secs(10), || async {
        state(&env.pool, weir_jobs::JobId(id)).await == "completed"
    })
    .await;
    assert_eq!(
        *seen.lock().unwrap(),
        [(
            1.5,
            "[1234567890123456789012345678901234567890,0.1000000000000000000000000001]".to_string()
        )]
    );
    running.stop(Duration::from_secs(5)).await.unwrap();
}
