//! Jobs from changes and from SQL right after `weir init`, with real `weir run` processes:
//! an operator whose statement calls `weir.enqueue(...)` enqueues exactly once per event
//! across SIGKILLs (the enqueue commits with the operator's checkpoint), and `weir init`
//! alone installs `weir.enqueue`.

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
