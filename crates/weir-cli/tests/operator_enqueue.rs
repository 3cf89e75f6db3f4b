//! Jobs from changes and from SQL right after `weir init`, with real `weir run` processes:
//! an operator whose statement calls `weir.enqueue(...)` enqueues exactly once per event
//! across SIGKILLs (the enqueue commits with the operator's checkpoint), `weir init` alone
//! installs `weir.enqueue`, and `weir jobs workers` shows the declared workers of a live
//! process with their last error.

mod support;

use std::time::Duration;

use support::{output, sigkill, spawn, weir};
use weir_testkit::eventually;

const CONFIG: &str = r#"
[source]
tables = ["posts"]

[consumers]
lanes = 4

[[operators]]
name = "mail_on_publish"
entities = ["posts"]
sql = """
select weir.enqueue('default', 'post_published', jsonb_build_object('post_id', p.id))
  from posts p where p.id = $1 and p.published
"""
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_enqueues_exactly_once_per_event_across_sigkills() {
    let db = weir_testkit::shared().database("op_enqueue").unwrap();
    db.psql(
        "create table posts (id int primary key, title text not null, published bool not null)",
    )
    .unwrap();
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), CONFIG).unwrap();
    let cmd = |args: &[&str]| {
        let mut c = weir(&db, args);
        c.arg("--config").arg(config.path());
        c
    };
    let (ok, out) = output(cmd(&["init"]));
    assert!(ok, "{out}");
    let pool = sqlx::PgPool::connect(&db.url()).await.unwrap();

    // 600 posts, each inserted once: a third of them published. Written while `weir run` is
    // killed again and again.
    const POSTS: i32 = 600;
    let writer = {
        let pool = pool.clone();
        tokio::spawn(async move {
            for i in 0..POSTS {
                sqlx::query("insert into posts values ($1, 'p', $2)")
                    .bind(i)
                    .bind(i % 3 == 0)
                    .execute(&pool)
                    .await
                    .unwrap();
                if i % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            }
        })
    };
    for round in 0..5u64 {
        let p = spawn(cmd(&["run"]));
        let wait = 400 + (u64::from(std::process::id()) * 17 + round * 233) % 600;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        sigkill(&p);
    }
    writer.await.unwrap();
    let _run = spawn(cmd(&["run"]));
    let published = i64::from((POSTS + 2) / 3);
    let jobs = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "select count(*), count(distinct args->>'post_id') from weir.jobs
              where kind = 'post_published'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    eventually("a job per published post", Duration::from_secs(90), || async {
        jobs().await.1 == published
    })
    .await;
    // Give a late duplicate (there must be none) the time to show.
    let lsn: String = sqlx::query_scalar("select pg_current_wal_insert_lsn()::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    let processed = weir::process::wait_for(&pool, lsn.parse().unwrap(), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(processed, "the operator did not catch up");
    let (all, distinct) = jobs().await;
    assert_eq!(distinct, published, "one job per published post");
    assert_eq!(all, published, "no post enqueued twice across the kills");
    let unpublished: i64 = sqlx::query_scalar(
        "select count(*) from weir.jobs where ((args->>'post_id')::int) % 3 <> 0",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(unpublished, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_init_alone_installs_the_job_queue_and_doctor_checks_it() {
    let (db, pool) = support::setup("init_jobs").await;
    // No `weir run` has started: the function is there all the same.
    let id: i64 =
        sqlx::query_scalar("select weir.enqueue('default', 'welcome', '{\"user_id\": 42}')")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(id > 0);
    let (ok, out) = output(weir(&db, &["doctor"]));
    assert!(ok, "{out}");
    assert!(out.contains("jobs"), "doctor names the job queue among what is installed: {out}");
    // A schema from before the job queue existed: doctor fails it and says how to fix it.
    db.psql("delete from weir.migrations where component = 'jobs'").unwrap();
    let (ok, out) = output(weir(&db, &["doctor"]));
    assert!(!ok, "{out}");
    assert!(out.contains("jobs not installed") && out.contains("weir init"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_jobs_workers_shows_each_declared_worker_with_its_last_error() {
    let (db, pool) = support::setup("jobs_workers").await;
    db.psql("create table sent (user_id bigint not null)").unwrap();
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        r#"
[source]
tables = ["t"]

[[workers]]
kind = "welcome"
type = "sql"
sql = "insert into sent (user_id) values (($1->>'user_id')::bigint)"

[[workers]]
kind = "broken"
type = "sql"
concurrency = 2
sql = "insert into sent (user_id) values (($1->>'user_id')::bigint / 0)"
"#,
    )
    .unwrap();
    let cmd = |args: &[&str]| {
        let mut c = weir(&db, args);
        c.arg("--config").arg(config.path());
        c
    };
    sqlx::query("select weir.enqueue('default', 'welcome', '{\"user_id\": 7}')")
        .execute(&pool)
        .await
        .unwrap();
    let broken: i64 =
        sqlx::query_scalar("select weir.enqueue('default', 'broken', '{\"user_id\": 1}')")
            .fetch_one(&pool)
            .await
            .unwrap();
    let _run = spawn(cmd(&["run"]));
    let workers = || {
        let (ok, out) = output(cmd(&["jobs", "workers", "--json"]));
        assert!(ok, "{out}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    eventually("the broken job's first failure", Duration::from_secs(30), || async {
        workers()
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["kind"] == "broken" && w["last_error"].is_string())
    })
    .await;
    let all = workers();
    let by_kind = |k: &str| all.as_array().unwrap().iter().find(|w| w["kind"] == k).unwrap();
    let b = by_kind("broken");
    assert_eq!(b["type"], "sql");
    assert_eq!(b["concurrency"], 2, "its own slots");
    assert_eq!(b["processes"], 1);
    assert_eq!(b["last_error_job"], broken);
    let error = b["last_error"].as_str().unwrap();
    assert!(error.contains("division by zero") && error.contains("22012"), "{error}");
    let w = by_kind("welcome");
    assert_eq!((w["type"].as_str(), w["concurrency"].as_i64()), (Some("sql"), Some(10)));
    assert!(w["last_error"].is_null());
    let sent: i64 = sqlx::query_scalar("select count(*) from sent").fetch_one(&pool).await.unwrap();
    assert_eq!(sent, 1, "the welcome statement ran once; the broken one rolled back");
    let (ok, table) = output(cmd(&["jobs", "workers"]));
    assert!(ok && table.contains("KIND") && table.contains("division by zero"), "{table}");
}
