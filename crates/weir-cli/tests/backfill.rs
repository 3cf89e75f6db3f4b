//! Backfill with real `weir run` processes: an operator added to a database that already holds
//! rows computes them (`backfill = true`) while the tables are written; `weir backfill`
//! survives SIGKILL of `weir run` mid-way and resumes from its last chunk; its progress in the
//! CLI, `weir status` and `GET /v1/backfills`; requests that cannot work are refused.

mod support;

use std::process::Command;
use std::time::Duration;

use sqlx::PgPool;
use support::{Proc, output, sigkill, spawn};
use weir_testkit::{TestDatabase, eventually};

struct Setup {
    db: TestDatabase<'static>,
    pool: PgPool,
    config: tempfile::NamedTempFile,
    http: String,
}

impl Setup {
    async fn new(prefix: &str, schema: &str, config: &str) -> Self {
        let db = weir_testkit::shared().database(prefix).unwrap();
        db.psql(schema).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let s = Self {
            pool: PgPool::connect(&db.url()).await.unwrap(),
            db,
            config: file,
            http: format!("127.0.0.1:{port}"),
        };
        let (ok, out) = output(s.cmd(&["init"]));
        assert!(ok, "{out}");
        s
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = support::weir(&self.db, args);
        c.arg("--config").arg(self.config.path()).env("WEIR_HTTP_BIND", &self.http);
        c
    }

    fn run(&self) -> Proc {
        spawn(self.cmd(&["run"]))
    }

    async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn backfill_state(&self, table: &str) -> (String, i64) {
        sqlx::query_as(
            "select state, rows_done from weir.backfills where entity = $1 order by id desc limit 1",
        )
        .bind(table)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }
}

const POSTS: &str = "
    create table posts (id int primary key, title text not null);
    create table comments (id int primary key, post_id int not null, body text);
    alter table comments replica identity full;
    create table post_with_comments_counts (id int primary key, title text not null, comments_count int not null);
    insert into posts select i, 'post ' || i from generate_series(1, 5000) i;
    insert into comments select i, 1 + i % 5000, 'c' from generate_series(1, 20000) i;";

const OPERATOR: &str = r#"
[source]
tables = ["posts", "comments"]

[[operators]]
name = "post_with_comments_counts"
entities = ["posts", "comments"]
key = { comments = "post_id" }
delete_with = ["posts"]
backfill = true
sql = """
insert into post_with_comments_counts (id, title, comments_count)
select p.id, p.title, (select count(*) from comments c where c.post_id = p.id)
from posts p where p.id = $1
on conflict (id) do update set title = excluded.title, comments_count = excluded.comments_count
"""
"#;

#[tokio::test]
async fn a_new_operator_computes_the_rows_that_were_there_before_it_under_live_writes() {
    let s = Setup::new("backfill_operator", POSTS, OPERATOR).await;
    let _run = s.run();
    // Live writes from the start: new comments, deleted ones, retitled and deleted posts.
    let pool = s.pool.clone();
    let writer = tokio::spawn(async move {
        for round in 0..300 {
            let sql = format!(
                "insert into comments values ({id}, 1 + {round} * 61 % 5000, 'live');
                 delete from comments where id = {old};
                 update posts set title = 'retitled {round}' where id = 1 + {round} * 37 % 5000;
                 {delete_post}",
                id = 200_000 + round,
                old = 1 + round * 101,
                delete_post = if round % 50 == 0 {
                    format!(
                        "delete from comments where post_id = {p}; delete from posts where id = {p};",
                        p = 5 + round
                    )
                } else {
                    String::new()
                },
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&pool).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    eventually("both backfills done", Duration::from_secs(300), || async {
        s.scalar("select count(*) from weir.backfills where state = 'done'").await == 2
    })
    .await;
    writer.await.unwrap();
    let lsn: String = sqlx::query_scalar("select pg_current_wal_insert_lsn()::text")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    let ok = weir::process::wait_for(&s.pool, lsn.parse().unwrap(), Duration::from_secs(300))
        .await
        .unwrap();
    assert!(ok, "the operator caught up: {}", output(s.cmd(&["status"])).1);
    let wrong = s
        .scalar(
            "select count(*) from post_with_comments_counts d
             full join (select p.id, p.title, count(c.id)::int as n from posts p
                        left join comments c on c.post_id = p.id group by p.id) r on r.id = d.id
             where d.comments_count is distinct from r.n or d.title is distinct from r.title",
        )
        .await;
    assert_eq!(wrong, 0, "the derived table equals a recomputation from scratch");
    assert!(s.scalar("select count(*) from post_with_comments_counts").await > 4_900);
    let by: Vec<String> = sqlx::query_scalar("select requested_by from weir.backfills")
        .fetch_all(&s.pool)
        .await
        .unwrap();
    assert!(by.iter().all(|b| b == "operator post_with_comments_counts"), "{by:?}");
}

const TABLE: &str = "
    create table t (id bigint primary key, v text);
    insert into t select i, repeat('v', 40) from generate_series(1, 300000) i;";

const PLAIN: &str = "[source]\ntables = [\"t\", \"u\"]\n";

#[tokio::test]
async fn weir_backfill_resumes_after_weir_run_is_killed_mid_way() {
    let s = Setup::new(
        "backfill_kill",
        &format!("{TABLE} create table u (id int primary key); insert into u values (1), (2);"),
        PLAIN,
    )
    .await;
    let run = s.run();
    let (ok, out) = output(s.cmd(&["backfill", "t", "--chunk-size", "2000", "--detach"]));
    assert!(ok, "{out}");
    assert!(out.contains("of `t` asked for (chunks of 2000 rows)"), "{out}");
    eventually("a part of the table stored", Duration::from_secs(120), || async {
        s.backfill_state("t").await.1 >= 40_000
    })
    .await;
    sigkill(&run);
    drop(run);
    let (state, done) = s.backfill_state("t").await;
    assert_eq!(state, "running");
    assert!(done < 300_000, "killed mid-way ({done} rows done)");
    // While nobody ingests, `weir status` and `--list` show where it stands.
    let (ok, out) = output(s.cmd(&["status"]));
    assert!(ok && out.contains("of t: running"), "{out}");
    // A second backfill of the same table is refused while this one is active.
    let (ok, out) = output(s.cmd(&["backfill", "t"]));
    assert!(!ok && out.contains("already running"), "{out}");
    let _run = s.run();
    // Following it to the end from the CLI (not a terminal: a line every few seconds).
    let (ok, out) = output(s.cmd(&["backfill", "u"]));
    assert!(ok, "{out}");
    assert!(out.contains("of u: done") && out.contains("100%"), "{out}");
    eventually("the backfill of t done", Duration::from_secs(300), || async {
        s.backfill_state("t").await.0 == "done"
    })
    .await;
    let reads =
        s.scalar("select count(*) from weir.events where entity = 't' and kind = 'read'").await;
    let distinct = s
        .scalar("select count(distinct key) from weir.events where entity = 't' and kind = 'read'")
        .await;
    assert_eq!((reads, distinct), (300_000, 300_000), "every row exactly once across the kill");
    // Over HTTP, with rows/s.
    let text = reqwest::get(format!("http://{}/v1/backfills", s.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    let t = body.as_array().unwrap().iter().find(|b| b["entity"] == "t").unwrap();
    assert_eq!(t["state"], "done");
    assert_eq!(t["rows_done"], 300_000);
    assert!(t["progress"]["rows_per_second"].as_f64().unwrap() > 0.0, "{t}");
}

#[tokio::test]
async fn backfills_that_cannot_work_are_refused_with_the_fix() {
    let s = Setup::new(
        "backfill_refused_cli",
        "create table t (id int primary key); create table nokey (v text);",
        "[source]\ntables = [\"t\", \"nokey\"]\n",
    )
    .await;
    let (ok, out) = output(s.cmd(&["backfill", "nokey"]));
    assert!(!ok && out.contains("has no primary key") && out.contains("add primary key"), "{out}");
    let (ok, out) = output(s.cmd(&["backfill", "t", "missing"]));
    assert!(!ok && out.contains("no table `public.missing`"), "{out}");
    let (ok, out) = output(s.cmd(&["backfill", "--cancel", "t"]));
    assert!(!ok && out.contains("has no pending or running backfill"), "{out}");
    assert_eq!(s.scalar("select count(*) from weir.backfills").await, 0, "nothing created");
    // Adding a table with rows to the publication backfills it.
    s.db.psql("create table later (id int primary key); insert into later values (1), (2), (3);")
        .unwrap();
    std::fs::write(s.config.path(), "[source]\ntables = [\"t\", \"nokey\", \"later\"]\n").unwrap();
    let (ok, out) = output(s.cmd(&["init"]));
    assert!(ok && out.contains("`public.later` is watched from now on: backfill"), "{out}");
    let _run = s.run();
    eventually("the added table backfilled", Duration::from_secs(60), || async {
        s.scalar("select count(*) from weir.events where entity = 'later' and kind = 'read'").await
            == 3
    })
    .await;
}
