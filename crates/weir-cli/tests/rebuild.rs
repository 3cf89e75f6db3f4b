//! `weir operators rebuild` against real `weir run` processes: the README's
//! `post_with_comments_counts` rebuilt while rows are written, with a reader that must never see
//! a part of the table and process status that must not claim a write made during the rebuild;
//! a rebuild SIGKILLed half-way and run again; refusals that change nothing.

mod support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use support::{Proc, output, sigkill, spawn};
use weir_testkit::{TestDatabase, eventually};

const SCHEMA: &str = "
    create table posts (id int primary key, title text not null, updated_at timestamptz not null default now());
    create table comments (id int primary key, post_id int references posts (id), body text);
    alter table comments replica identity full;
    create table post_with_comments_counts (id int primary key, title text not null, comments_count int not null);";

const CONFIG: &str = r#"
[source]
tables = ["posts", "comments"]

[consumers]
lanes = 4

[[operators]]
name = "post_with_comments_counts"
entities = ["posts", "comments"]
key = { comments = "post_id" }
delete_with = ["posts"]
sql = """
insert into post_with_comments_counts (id, title, comments_count)
select p.id, p.title, (select count(*) from comments c where c.post_id = p.id)
from posts p where p.id = $1
on conflict (id) do update set title = excluded.title, comments_count = excluded.comments_count
"""
"#;

const OP: &str = "post_with_comments_counts";

struct Setup {
    db: TestDatabase<'static>,
    pool: PgPool,
    config: tempfile::NamedTempFile,
}

impl Setup {
    /// The tables, `existing` posts (two comments each) written before `weir init` (so never
    /// logged: only a rebuild brings them into the derived table), then `weir init`.
    async fn new(prefix: &str, config: &str, existing: i32) -> Self {
        let db = weir_testkit::shared().database(prefix).unwrap();
        db.psql(SCHEMA).unwrap();
        db.psql(&format!(
            "insert into posts (id, title) select g, 'old ' || g from generate_series(1, {existing}) g;
             insert into comments select g, (g - 1) % {existing} + 1, 'c'
             from generate_series(1, 2 * {existing}) g where {existing} > 0;"
        ))
        .unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), config).unwrap();
        let s = Self { pool: PgPool::connect(&db.url()).await.unwrap(), db, config: file };
        let (ok, out) = output(s.cmd(&["init"]));
        assert!(ok, "{out}");
        s
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = support::weir(&self.db, args);
        c.arg("--config").arg(self.config.path());
        c
    }

    /// `weir run`, once its operator's consumer is registered.
    async fn run(&self) -> Proc {
        let p = spawn(self.cmd(&["run"]));
        eventually("the operator is registered", Duration::from_secs(60), || async {
            self.state().await.is_some()
        })
        .await;
        p
    }

    async fn state(&self) -> Option<(String, Option<String>)> {
        sqlx::query_as("select state, stopped_reason from weir.consumers where name = $1")
            .bind(OP)
            .fetch_optional(&self.pool)
            .await
            .unwrap_or(None)
    }

    async fn scalar_i64(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Rows of the derived table that differ from a recomputation from scratch.
    async fn wrong_rows(&self) -> i64 {
        self.scalar_i64(
            "select count(*) from post_with_comments_counts d
             full join (select p.id, p.title, count(c.id)::int as n from posts p
                        left join comments c on c.post_id = p.id group by p.id) r on r.id = d.id
             where d.comments_count is distinct from r.n or d.title is distinct from r.title",
        )
        .await
    }

    async fn wait_processed(&self, timeout: Duration) {
        let lsn: String = sqlx::query_scalar("select pg_current_wal_insert_lsn()::text")
            .fetch_one(&self.pool)
            .await
            .unwrap();
        let ok = weir::process::wait_for(&self.pool, lsn.parse().unwrap(), timeout).await.unwrap();
        assert!(ok, "not processed within {timeout:?}");
    }

    async fn shadow_exists(&self) -> bool {
        sqlx::query_scalar::<_, bool>(
            "select to_regclass('weir_rebuild.post_with_comments_counts') is not null",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }
}

/// New posts with comments, and title updates of old ones, until `stop`.
async fn writer(pool: PgPool, stop: Arc<AtomicBool>, from: i32) -> i32 {
    let mut id = from;
    while !stop.load(Ordering::Relaxed) {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("insert into posts (id, title) values ($1, 'new')")
            .bind(id)
            .execute(&mut *tx)
            .await
            .unwrap();
        // One comment on the new post, one on an old one.
        sqlx::query("insert into comments values ($1, $2, 'n'), ($1 + 1, $3, 'n')")
            .bind(id * 2)
            .bind(id)
            .bind(id % 1000 + 1)
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query("update posts set title = title || '!' where id = $1")
            .bind(id % 1000 + 1)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        id += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    id
}

/// Reads the derived table's row count until `stop`; panics when a count is lower than the one
/// before (a half-built table, or the old one cleared). Returns how many reads it made.
async fn reader(pool: PgPool, stop: Arc<AtomicBool>) -> u64 {
    let (mut last, mut reads) = (0i64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let n: i64 = sqlx::query_scalar("select count(*) from post_with_comments_counts")
            .fetch_one(&pool)
            .await
            .expect("the derived table is always there to read");
        assert!(n >= last, "a reader saw {n} rows after {last}: a half-built table");
        last = n;
        reads += 1;
    }
    reads
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_under_live_writes_swaps_in_a_whole_table() {
    let s = Setup::new("rb_live", CONFIG, 4000).await;
    let _run = s.run().await;
    // Live rows first: the derived table holds those, not the 4000 posts from before init.
    let stop_w = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writer(s.pool.clone(), stop_w.clone(), 100_000));
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.wait_processed(Duration::from_secs(60)).await;
    // Old posts that a live write touched are in it; most are not.
    assert!(s.wrong_rows().await > 2000, "the existing posts are missing before the rebuild");
    let stop_r = Arc::new(AtomicBool::new(false));
    let r = tokio::spawn(reader(s.pool.clone(), stop_r.clone()));

    let child = s
        .cmd(&["operators", "rebuild", OP])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("the rebuild stops the operator", Duration::from_secs(60), || async {
        s.state().await.is_some_and(|(state, _)| state == "stopped")
    })
    .await;
    let (_, reason) = s.state().await.unwrap();
    assert!(reason.as_deref().is_some_and(|r| r.contains("rebuilding")), "{reason:?}");
    // A write made during the rebuild is not processed while it runs.
    let ts: i64 = sqlx::query_scalar(
        "insert into posts (id, title) values (-1, 'during') \
         returning (extract(epoch from updated_at) * 1000000)::bigint",
    )
    .fetch_one(&s.pool)
    .await
    .unwrap();
    let during = weir::process::processed(&s.pool, "posts", ts, "updated_at").await.unwrap();
    let still_running = s.state().await.is_some_and(|(state, _)| state == "stopped");
    assert!(still_running, "the rebuild ended before the check; make the table bigger");
    assert!(!during, "a write made during the rebuild must not read as processed");

    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("keys/s") && text.contains("swapped it in"), "{text}");
    assert_eq!(s.state().await.unwrap(), ("running".to_string(), None), "started again");
    // The writes stop here: on a loaded machine the lanes catch up with the backlog of the
    // rebuild only once no more arrive.
    stop_w.store(true, Ordering::Relaxed);
    w.await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while !weir::process::processed(&s.pool, "posts", ts, "updated_at").await.unwrap() {
        if std::time::Instant::now() > deadline {
            let (_, status) = output(s.cmd(&["status"]));
            panic!("the write made during the rebuild is not processed after 180 s:\n{status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    s.wait_processed(Duration::from_secs(60)).await;
    stop_r.store(true, Ordering::Relaxed);
    assert!(r.await.unwrap() > 0, "the reader read");
    assert_eq!(s.wrong_rows().await, 0, "the derived table equals a recomputation from scratch");
    assert!(!s.shadow_exists().await);
    assert_eq!(s.scalar_i64("select count(*) from weir.rebuilds").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_rebuild_leaves_the_operator_stopped_and_runs_again_to_the_end() {
    let s = Setup::new("rb_kill", CONFIG, 30_000).await;
    let _run = s.run().await;
    let kill_half_way = || async {
        let child = spawn(s.cmd(&["operators", "rebuild", OP]));
        eventually("the rebuild is half-way", Duration::from_secs(120), || async {
            let (done, total): (i64, Option<i64>) =
                sqlx::query_as("select keys_done, keys_total from weir.rebuilds")
                    .fetch_optional(&s.pool)
                    .await
                    .unwrap()
                    .unwrap_or((0, None));
            done > 0 && total.is_some_and(|t| done < t)
        })
        .await;
        sigkill(&child);
        drop(child);
        let (state, reason) = s.state().await.unwrap();
        assert_eq!(state, "stopped");
        assert!(reason.unwrap().contains("rebuilding"));
        assert!(s.shadow_exists().await, "the shadow stays for the next run");
    };
    // Given up: the shadow goes, the operator runs on its old table.
    kill_half_way().await;
    let (ok, out) = output(s.cmd(&["operators", "rebuild", OP, "--abort"]));
    assert!(ok, "{out}");
    assert_eq!(s.state().await.unwrap(), ("running".to_string(), None));
    assert!(!s.shadow_exists().await);
    assert_eq!(s.scalar_i64("select count(*) from post_with_comments_counts").await, 0);
    // Run again: the shadow starts over and the rebuild finishes.
    kill_half_way().await;
    // Written while nothing rebuilds: the operator is still stopped, so not yet processed.
    sqlx::query("insert into comments values (-5, 7, 'late')").execute(&s.pool).await.unwrap();

    let (ok, out) = output(s.cmd(&["operators", "rebuild", OP]));
    assert!(ok, "{out}");
    assert!(out.contains("did not finish; starting its shadow over"), "{out}");
    s.wait_processed(Duration::from_secs(60)).await;
    assert_eq!(s.wrong_rows().await, 0, "the derived table equals a recomputation from scratch");
    assert_eq!(s.scalar_i64("select count(*) from post_with_comments_counts").await, 30_000);
    assert_eq!(s.state().await.unwrap(), ("running".to_string(), None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_rebuilds_change_nothing() {
    let s = Setup::new("rb_refuse", CONFIG, 50).await;
    let _run = s.run().await;
    sqlx::query("insert into posts (id, title) values (-1, 'live')")
        .execute(&s.pool)
        .await
        .unwrap();
    s.wait_processed(Duration::from_secs(60)).await;
    let unchanged = || async {
        assert_eq!(s.state().await.unwrap(), ("running".to_string(), None));
        assert_eq!(s.scalar_i64("select count(*) from post_with_comments_counts").await, 1);
        assert!(!s.shadow_exists().await);
        assert_eq!(s.scalar_i64("select count(*) from weir.rebuilds").await, 0);
    };

    let (ok, out) = output(s.cmd(&["operators", "rebuild", "nobody"]));
    assert!(!ok, "{out}");
    assert!(
        out.contains("cannot rebuild `nobody`: there is no operator of that name; weir.toml declares post_with_comments_counts"),
        "{out}"
    );
    unchanged().await;

    // A view over the target would be broken by the swap.
    s.db.psql("create view counted as select id from post_with_comments_counts").unwrap();
    let (ok, out) = output(s.cmd(&["operators", "rebuild", OP]));
    assert!(!ok && out.contains("view counted reads it"), "{out}");
    unchanged().await;
    s.db.psql("drop view counted").unwrap();

    // A statement that names its target with the schema would write the live table.
    let qualified = CONFIG.replace(
        "insert into post_with_comments_counts",
        "insert into public.post_with_comments_counts",
    );
    std::fs::write(s.config.path(), qualified).unwrap();
    let (ok, out) = output(s.cmd(&["operators", "rebuild", OP]));
    assert!(!ok && out.contains("by the bare name `post_with_comments_counts`"), "{out}");
    unchanged().await;
    std::fs::write(s.config.path(), CONFIG).unwrap();

    // Nothing to abort.
    let (ok, out) = output(s.cmd(&["operators", "rebuild", OP, "--abort"]));
    assert!(!ok && out.contains("there is no rebuild of it to abort"), "{out}");
    unchanged().await;
}
