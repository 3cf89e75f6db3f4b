//! Replica identity decided up front, with real `weir` processes: the README's operator on
//! tables created with the default replica identity. `weir init` sets `comments` to full (its
//! key mapping `post_id` is not the primary key), and the derived table then survives moved
//! comments and deletes; with `manage_replica_identity = false`, `weir run` refuses to start
//! and `weir doctor` fails the table, each naming the fix. A table without a primary key gets
//! an identity before `weir init` publishes it (or init refuses), so the application's updates
//! and deletes on it keep working; `weir run` warns of one that joined a watched schema later.

mod support;

use std::time::Duration;

use sqlx::PgPool;
use support::{output, spawn};
use weir_testkit::TestDatabase;

const SCHEMA: &str = "
    create table posts (id int primary key, title text not null);
    create table comments (id int primary key, post_id int references posts (id), body text);
    create table post_with_comments_counts (id int primary key, title text not null, comments_count int not null);";

const CONFIG: &str = r#"
[source]
tables = ["posts", "comments"]

[[operators]]
name = "post_with_comments_counts"
entities = ["posts", "comments"]
key = { comments = "post_id" }      # a comment counts toward its post
delete_with = ["posts"]             # a deleted post deletes its row
sql = """
insert into post_with_comments_counts (id, title, comments_count)
select p.id, p.title, (select count(*) from comments c where c.post_id = p.id)
from posts p where p.id = $1
on conflict (id) do update
  set title = excluded.title, comments_count = excluded.comments_count
"""
"#;

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
        Self { pool: PgPool::connect(&db.url()).await.unwrap(), db, config: file }
    }

    fn cmd(&self, args: &[&str]) -> std::process::Command {
        let mut c = support::weir(&self.db, args);
        c.arg("--config").arg(self.config.path());
        c
    }

    async fn identity(&self, table: &str) -> String {
        sqlx::query_scalar("select relreplident::text from pg_class where relname = $1")
            .bind(table)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).execute(&self.pool).await.unwrap();
    }

    async fn wait_processed(&self) {
        let lsn: String = sqlx::query_scalar("select pg_current_wal_insert_lsn()::text")
            .fetch_one(&self.pool)
            .await
            .unwrap();
        let ok = weir::process::wait_for(&self.pool, lsn.parse().unwrap(), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(ok, "not processed within 60 s");
    }

    /// Rows of the derived table that differ from a recomputation from scratch.
    async fn wrong_rows(&self) -> Vec<(Option<i32>, Option<i32>, Option<i64>)> {
        sqlx::query_as(
            "select coalesce(d.id, r.id), d.comments_count, r.n
             from post_with_comments_counts d
             full join (select p.id, p.title, count(c.*) as n from posts p
                        left join comments c on c.post_id = p.id group by p.id, p.title) r
               on r.id = d.id
             where d.comments_count is distinct from r.n or d.title is distinct from r.title",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    async fn drop_slot(&self) {
        let _ = sqlx::query("select pg_drop_replication_slot($1)")
            .bind(self.db.name())
            .execute(&self.pool)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_sets_replica_identity_full_and_moved_and_deleted_comments_recompute() {
    let s = Setup::new("ri_managed", CONFIG).await;
    assert_eq!(s.identity("comments").await, "d");
    let (ok, out) = output(s.cmd(&["init"]));
    assert!(ok, "{out}");
    assert!(out.contains("table public.comments: replica identity set to full"), "{out}");
    assert!(!out.contains("public.posts: replica identity"), "posts routes by its key: {out}");
    assert_eq!(s.identity("comments").await, "f");
    assert_eq!(s.identity("posts").await, "d", "only the table that needs it changes");
    let (ok, out) = output(s.cmd(&["doctor"]));
    assert!(ok, "{out}");
    assert!(out.contains("[ok  ] table public.comments: replica identity FULL"), "{out}");

    let mut run = spawn(s.cmd(&["run"]));
    s.exec(
        "insert into posts values (1, 'one'), (2, 'two'), (3, 'three');
         insert into comments values (10, 1, 'a'), (11, 1, 'b'), (12, 2, 'c'), (13, 3, 'd');",
    )
    .await;
    s.wait_processed().await;
    assert!(s.wrong_rows().await.is_empty(), "{:?}", s.wrong_rows().await);
    // A comment moves from post 1 to post 2: both posts are recomputed.
    s.exec("update comments set post_id = 2 where id = 10").await;
    s.wait_processed().await;
    let counts: Vec<(i32, i32)> =
        sqlx::query_as("select id, comments_count from post_with_comments_counts order by id")
            .fetch_all(&s.pool)
            .await
            .unwrap();
    assert_eq!(counts, [(1, 1), (2, 2), (3, 1)]);
    // Deletes of comments (routed by the whole old row) and of a post (delete_with).
    s.exec("delete from comments where id = 11").await;
    s.exec("update posts set title = 'two!' where id = 2").await;
    s.exec("delete from comments where id = 13; delete from posts where id = 3;").await;
    s.wait_processed().await;
    assert!(s.wrong_rows().await.is_empty(), "{:?}", s.wrong_rows().await);
    let (ok, out) = output(s.cmd(&["status"]));
    assert!(ok && out.contains("post_with_comments_counts — running"), "{out}");
    support::sigterm(&mut run);
    s.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmanaged_identity_refuses_run_at_start_and_doctor_fails_the_table() {
    let config = CONFIG.replace(
        "tables = [\"posts\", \"comments\"]",
        "tables = [\"posts\", \"comments\"]\nmanage_replica_identity = false",
    );
    let s = Setup::new("ri_unmanaged", &config).await;
    let (ok, out) = output(s.cmd(&["init"]));
    assert!(ok, "{out}");
    assert!(out.contains("table public.comments: needs replica identity full"), "{out}");
    assert_eq!(s.identity("comments").await, "d", "init changes nothing");

    let (ok, out) = output(s.cmd(&["run"]));
    assert!(!ok, "weir run must refuse to start: {out}");
    for want in [
        "operator `post_with_comments_counts` routes `public.comments` by `post_id`",
        "alter table public.comments replica identity full;",
    ] {
        assert!(out.contains(want), "want `{want}` in: {out}");
    }
    let (ok, out) = output(s.cmd(&["doctor"]));
    assert!(!ok, "{out}");
    assert!(out.contains("[FAIL] table public.comments"), "{out}");
    assert!(out.contains("operator `post_with_comments_counts` routes it by `post_id`"), "{out}");
    assert!(out.contains("fix: `alter table public.comments replica identity full;`"), "{out}");
    assert!(out.contains("[ok  ] table public.posts"), "{out}");

    // The fix, done by hand: now it starts.
    s.exec("alter table public.comments replica identity full").await;
    let (ok, out) = output(s.cmd(&["doctor"]));
    assert!(!out.contains("[FAIL] table public.comments"), "{ok} {out}");
    let mut run = spawn(s.cmd(&["run"]));
    s.exec("insert into posts values (1, 'one'); insert into comments values (10, 1, 'a');").await;
    s.exec("delete from comments where id = 10").await;
    s.wait_processed().await;
    assert!(s.wrong_rows().await.is_empty(), "{:?}", s.wrong_rows().await);
    support::sigterm(&mut run);
    s.drop_slot().await;
}

/// A table without a primary key, once in a publication that publishes updates and deletes,
/// makes PostgreSQL refuse every UPDATE and DELETE on it: the application's writes break.
/// `weir init` gives it `replica identity full` before publishing it, or, when it may not
/// (`manage_replica_identity = false`, or an explicit `nothing`), refuses and changes nothing.
#[tokio::test]
async fn a_table_without_a_primary_key_gets_an_identity_before_it_is_published() {
    let s =
        Setup::new("ri_keyless", "[source]\ntables = [\"posts\", \"audit\", \"measures\"]\n").await;
    s.exec(
        "create table audit (at timestamptz default now(), what text);
         insert into audit (what) values ('before weir');
         create table measures (at date not null, v int) partition by range (at);
         create table measures_2026 partition of measures
           for values from ('2026-01-01') to ('2027-01-01');
         insert into measures values ('2026-12-04', 1);
         create table \"Frozen\" (id int primary key);
         alter table \"Frozen\" replica identity nothing;",
    )
    .await;
    let published = |s: &Setup| {
        let pool = s.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "select tablename::text from pg_publication_tables
                  where schemaname = 'public' order by 1",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };

    let (ok, out) = output(s.cmd(&["init"]));
    assert!(ok, "{out}");
    assert!(
        out.contains("table public.audit: replica identity set to full (it has no primary key"),
        "{out}"
    );
    assert_eq!(s.identity("audit").await, "f");
    // A partitioned table's rows are published from its partitions: they get the identity.
    assert!(out.contains("table public.measures_2026: replica identity set to full"), "{out}");
    assert_eq!(s.identity("measures_2026").await, "f");
    assert_eq!(s.identity("posts").await, "d", "a table with a primary key is left alone");
    // The application's writes still work.
    s.exec("update audit set what = 'after'; delete from audit; update measures set v = 2;").await;

    // An explicit `nothing`: refused, naming the table and the fix, and nothing changes.
    std::fs::write(
        s.config.path(),
        "[source]\ntables = [\"posts\", \"audit\", \"measures\", \"Frozen\"]\n",
    )
    .unwrap();
    let (ok, out) = output(s.cmd(&["init"]));
    assert!(!ok, "{out}");
    for want in [
        "would refuse every UPDATE and DELETE",
        "`public.Frozen` (replica identity nothing)",
        "alter table public.\"Frozen\" replica identity full;",
        "nothing was changed",
    ] {
        assert!(out.contains(want), "want `{want}` in: {out}");
    }
    assert_eq!(published(&s).await, ["audit", "measures_2026", "posts"]);
    assert_eq!(s.identity("Frozen").await, "n");

    // Unmanaged, watching a schema: a keyless table there is refused the same way.
    s.exec(
        "create table notes (body text); alter table \"Frozen\" replica identity default;
         create unlogged table scratch (x int);",
    )
    .await;
    std::fs::write(
        s.config.path(),
        "[source]\nschemas = [\"public\"]\nmanage_replica_identity = false\n",
    )
    .unwrap();
    let (ok, out) = output(s.cmd(&["init"]));
    assert!(!ok, "{out}");
    for want in [
        "`public.notes` (replica identity default, without a primary key): add a primary key",
        "manage_replica_identity = true",
    ] {
        assert!(out.contains(want), "want `{want}` in: {out}");
    }
    assert!(!out.contains("public.audit"), "audit has an identity now: {out}");
    assert!(!out.contains("scratch"), "an unlogged table is never published: {out}");
    assert_eq!(published(&s).await, ["audit", "measures_2026", "posts"]);
    s.exec("update notes set body = 'still writable'").await;

    // Managed, the same schema: init settles `notes`. A keyless table created afterwards joins
    // the publication by itself; `weir run` says so at start, naming it and the fix.
    std::fs::write(s.config.path(), "[source]\nschemas = [\"public\"]\n").unwrap();
    let (ok, out) = output(s.cmd(&["init"]));
    assert!(ok && out.contains("table public.notes: replica identity set to full"), "{out}");
    s.exec("create table late (x int)").await;
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = s.cmd(&["run"]);
    cmd.stderr(log.reopen().unwrap());
    let mut run = support::Proc(cmd.spawn().unwrap());
    let warned = "table=\"public.late\"";
    weir_testkit::eventually("weir run warns of `late`", Duration::from_secs(30), || async {
        std::fs::read_to_string(log.path()).unwrap().contains(warned)
    })
    .await;
    let said = std::fs::read_to_string(log.path()).unwrap();
    let line = said.lines().find(|l| l.contains(warned)).unwrap();
    assert!(line.contains("alter table public.late replica identity full;"), "{line}");
    support::sigterm(&mut run);
    s.drop_slot().await;
}
