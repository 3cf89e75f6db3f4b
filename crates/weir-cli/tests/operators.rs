//! Operators in real `weir run` processes: the README's `post_with_comments_counts` kept by a
//! declarative SQL operator while the process is SIGKILLed at random moments and while two
//! processes share the lanes; process status; halt on a null key and resume; bad operator
//! configuration refused at start-up.

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use sqlx::PgPool;
use weir_testkit::{TestDatabase, eventually};

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

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

[consumers.retry]
min_restart_time = "20ms"
max_restart_time = "50ms"
max_retries = 2

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

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Setup {
    db: TestDatabase<'static>,
    pool: PgPool,
    config: tempfile::NamedTempFile,
}

impl Setup {
    async fn new(prefix: &str, config: &str) -> Self {
        let db = weir_testkit::shared().database(prefix).unwrap();
        db.psql(SCHEMA).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), config).unwrap();
        let s = Self { pool: PgPool::connect(&db.url()).await.unwrap(), db, config: file };
        let (ok, out) = s.output(&["init"]);
        assert!(ok, "{out}");
        s
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(WEIR);
        c.args(args)
            .arg("--config")
            .arg(self.config.path())
            .env("DATABASE_URL", self.db.url())
            .env("WEIR_SOURCE_SLOT", self.db.name())
            .env("WEIR_HTTP_BIND", "127.0.0.1:0")
            .current_dir(std::env::temp_dir());
        c
    }

    fn spawn(&self) -> Proc {
        Proc(self.cmd(&["run"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
    }

    fn output(&self, args: &[&str]) -> (bool, String) {
        let Output { status, stdout, stderr } = self.cmd(args).output().unwrap();
        (
            status.success(),
            format!("{}{}", String::from_utf8_lossy(&stdout), String::from_utf8_lossy(&stderr)),
        )
    }

    /// Rows of the derived table that differ from a recomputation from scratch.
    async fn wrong_rows(&self) -> i64 {
        sqlx::query_scalar(
            "select count(*) from post_with_comments_counts d
             full join (select p.id, p.title, count(c.id)::int as n from posts p
                        left join comments c on c.post_id = p.id group by p.id) r on r.id = d.id
             where d.comments_count is distinct from r.n or d.title is distinct from r.title",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    async fn wait_processed(&self, timeout: Duration) {
        let lsn: String = sqlx::query_scalar("select pg_current_wal_insert_lsn()::text")
            .fetch_one(&self.pool)
            .await
            .unwrap();
        let ok = weir::process::wait_for(&self.pool, lsn.parse().unwrap(), timeout).await.unwrap();
        assert!(ok, "not processed within {timeout:?}");
    }
}

fn sigkill(p: &Proc) {
    Command::new("kill").args(["-9", &p.0.id().to_string()]).status().unwrap();
}

/// Random posts and comments (inserts, updates, moves between posts, deletes).
async fn churn(pool: PgPool, rounds: i32) {
    for i in 0..rounds {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("insert into posts (id, title) values ($1, $2)")
            .bind(i)
            .bind(format!("p{i}"))
            .execute(&mut *tx)
            .await
            .unwrap();
        for j in 0..3 {
            let target = (i * 7 + j) % (i + 1);
            sqlx::query("insert into comments values ($1, $2, 'c')")
                .bind(i * 10 + j)
                .bind(target)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        if i % 3 == 0 {
            sqlx::query("update posts set title = title || '!' where id = $1")
                .bind(i / 2)
                .execute(&pool)
                .await
                .unwrap();
        }
        if i % 4 == 0 && i > 0 {
            sqlx::query("delete from comments where id = $1")
                .bind((i - 1) * 10)
                .execute(&pool)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn derived_table_survives_sigkill_at_random_moments() {
    let s = Setup::new("op_sigkill", CONFIG).await;
    let writer = tokio::spawn(churn(s.pool.clone(), 80));
    for round in 0..4u64 {
        let p = s.spawn();
        let wait = 300 + (std::process::id() as u64 * 13 + round * 211) % 500;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        sigkill(&p);
    }
    writer.await.unwrap();
    let _run = s.spawn();
    // The killed processes' lane leases expire before the new one can take every lane.
    s.wait_processed(Duration::from_secs(60)).await;
    assert_eq!(s.wrong_rows().await, 0, "the derived table equals a recomputation from scratch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_lanes_and_one_is_killed() {
    let s = Setup::new("op_share", CONFIG).await;
    let a = s.spawn();
    let b = s.spawn();
    // Generous: on a loaded 2-core machine two debug processes need a while to rebalance.
    eventually("the two processes share the lanes", Duration::from_secs(60), || async {
        let owners: i64 = sqlx::query_scalar("select count(distinct owner) from weir.checkpoints")
            .fetch_one(&s.pool)
            .await
            .unwrap_or(0);
        owners == 2
    })
    .await;
    let writer = tokio::spawn(churn(s.pool.clone(), 40));
    tokio::time::sleep(Duration::from_millis(400)).await;
    sigkill(&a);
    writer.await.unwrap();
    s.wait_processed(Duration::from_secs(60)).await;
    assert_eq!(s.wrong_rows().await, 0);
    // Process status by entity timestamp, as an API would ask it.
    let ts: i64 = sqlx::query_scalar(
        "select (extract(epoch from max(updated_at)) * 1000000)::bigint from posts",
    )
    .fetch_one(&s.pool)
    .await
    .unwrap();
    assert!(weir::process::processed(&s.pool, "posts", ts, "updated_at").await.unwrap());
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_key_halts_the_operator_and_resume_continues_there() {
    let s = Setup::new("op_null", CONFIG).await;
    let _run = s.spawn();
    sqlx::raw_sql("insert into posts values (1, 'a'); insert into comments values (1, 1, 'x');")
        .execute(&s.pool)
        .await
        .unwrap();
    // A comment without a post: the key mapping yields no value.
    sqlx::query("insert into comments values (2, null, 'orphan')").execute(&s.pool).await.unwrap();
    sqlx::query("insert into comments values (3, 1, 'y')").execute(&s.pool).await.unwrap();
    eventually("the operator halts", Duration::from_secs(20), || async {
        let (ok, out) = s.output(&["status"]);
        assert!(ok, "{out}");
        let halted = out.contains("halted at position");
        if halted {
            assert!(out.contains("no value for `comments.post_id`"), "{out}");
        }
        halted
    })
    .await;
    // The lane that met the poison event stops right before it.
    let (poison, lane_at): (i64, i64) = sqlx::query_as(
        "select k.halted_position, c.position from weir.consumers k
         join weir.checkpoints c on c.consumer = k.name and c.lane = k.halted_lane",
    )
    .fetch_one(&s.pool)
    .await
    .unwrap();
    assert!(lane_at < poison, "the halted lane must not move past the poison event");
    // The event itself can never succeed (its post_id is null for good): skip it.
    let (ok, out) = s.output(&["skip", "post_with_comments_counts"]);
    assert!(ok && out.contains(&format!("skipped position {poison}")), "{out}");
    sqlx::query("insert into comments values (4, 1, 'z')").execute(&s.pool).await.unwrap();
    s.wait_processed(Duration::from_secs(20)).await;
    let n: i32 =
        sqlx::query_scalar("select comments_count from post_with_comments_counts where id = 1")
            .fetch_one(&s.pool)
            .await
            .unwrap();
    assert_eq!(n, 3, "comments 1, 3 and 4 counted after the skip");
    let (ok, out) = s.output(&["status"]);
    assert!(ok && out.contains("post_with_comments_counts — running"), "{out}");
    let (ok, out) = s.output(&["resume", "nobody"]);
    assert!(!ok && out.contains("no consumer named `nobody`"), "{out}");
}

#[tokio::test]
async fn bad_operator_configuration_is_refused_at_start_up_and_by_init() {
    let cases = [
        (
            CONFIG
                .replace(
                    "entities = [\"posts\", \"comments\"]",
                    "entities = [\"posts\", \"commentz\"]",
                )
                .replace("key = { comments = \"post_id\" }", ""),
            "listens to `commentz`, but there is no such table",
        ),
        (
            CONFIG.replace("key = { comments = \"post_id\" }", "key = { comments = \"post\" }"),
            "has no column `post`",
        ),
        (
            CONFIG.replace("from posts p where p.id = $1", "from postz p where p.id = $1"),
            "does not prepare",
        ),
    ];
    for (i, (config, want)) in cases.iter().enumerate() {
        let s = Setup::new(&format!("op_bad{i}"), CONFIG).await;
        std::fs::write(s.config.path(), config).unwrap();
        let (ok, out) = s.output(&["run"]);
        assert!(!ok, "case {i} must fail: {out}");
        assert!(out.contains(want), "case {i}: want `{want}` in: {out}");
        // `weir init` makes the same checks, so the mistake shows before the first run.
        let (ok, out) = s.output(&["init"]);
        assert!(!ok, "case {i}: init must fail: {out}");
        assert!(out.contains(want), "case {i}: want `{want}` from init in: {out}");
        assert!(out.contains("`weir run` would refuse 1 of the 1"), "case {i}: {out}");
    }
}
