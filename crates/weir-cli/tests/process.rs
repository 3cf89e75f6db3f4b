//! The real `weir` binary against a real PostgreSQL: crash windows (fault injection aborts the
//! process before and after an append), SIGKILL at random moments, standby takeover, and every
//! bad-input case of the foundation (each a clear line and a non-zero exit).

use std::time::{Duration, Instant};

use sqlx::PgPool;
use weir_testkit::{Cluster, Options, eventually};

mod support;
use support::*;

async fn head(pool: &PgPool) -> i64 {
    sqlx::query_scalar::<_, Option<i64>>("select max(position) from weir.source_state")
        .fetch_one(pool)
        .await
        .unwrap()
        .unwrap_or(0)
}

async fn wait_head(pool: &PgPool, n: i64, timeout: Duration) {
    eventually(&format!("{n} events in the log"), timeout, || async { head(pool).await >= n })
        .await;
}

/// Exactly the table's rows, once each, at positions 1..n.
async fn assert_log_matches_table(pool: &PgPool) {
    let (events, distinct, max, rows): (i64, i64, Option<i64>, i64) = sqlx::query_as(
        "select count(*), count(distinct key->>'id'), max(position), (select count(*) from t)
         from weir.events",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(events, rows, "one event per inserted row");
    assert_eq!(distinct, rows, "no duplicates");
    assert_eq!(max, Some(rows), "positions without gaps");
}

async fn insert(pool: &PgPool, from: i32, to: i32) {
    for i in from..=to {
        sqlx::query("insert into t values ($1, 'x')").bind(i).execute(pool).await.unwrap();
    }
}

#[tokio::test]
async fn crash_before_and_after_the_append_loses_and_duplicates_nothing() {
    for (fault, n) in [("before_append", 1), ("after_append", 2)] {
        let (db, pool) = setup(fault).await;
        insert(&pool, 1, 50).await;
        let written: String =
            sqlx::query_scalar("select pg_current_wal_lsn()::text").fetch_one(&pool).await.unwrap();
        let mut cmd = weir(&db, &["run"]);
        cmd.env("WEIR_FAULT", fault);
        let (ok, out) = output(cmd);
        assert!(!ok, "the fault must abort the process");
        assert!(out.contains(&format!("aborting at {fault}")), "{out}");
        let stored = head(&pool).await;
        if fault == "before_append" {
            assert_eq!(stored, 0);
        } else {
            assert!(stored > 0, "the append committed before the crash");
        }
        // The slot was not acknowledged past what is stored: before the append, not up to the
        // transactions written; after it, not beyond the stored commit LSN.
        let (confirmed_ok,): (bool,) = sqlx::query_as(
            "select case when $2 then confirmed_flush_lsn < $3::pg_lsn
                         else confirmed_flush_lsn <= (select lsn from weir.source_state where slot = $1) end
             from pg_replication_slots where slot_name = $1",
        )
        .bind(db.name())
        .bind(fault == "before_append")
        .bind(&written)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert!(confirmed_ok, "{fault}: the slot was acknowledged past what the log holds");
        insert(&pool, 51, 50 + 10 * n).await;
        let mut run = spawn(weir(&db, &["run"]));
        wait_head(&pool, 50 + 10 * i64::from(n), Duration::from_secs(30)).await;
        sigterm(&mut run);
        assert_log_matches_table(&pool).await;
    }
}

#[tokio::test]
async fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let (db, pool) = setup("sigkill").await;
    let writer = {
        let pool = pool.clone();
        tokio::spawn(async move {
            for i in 0..60 {
                let mut tx = pool.begin().await.unwrap();
                for j in 0..20 {
                    sqlx::query("insert into t values ($1, 'x')")
                        .bind(i * 20 + j)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                tx.commit().await.unwrap();
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    for round in 0..4u64 {
        let p = spawn(weir(&db, &["run"]));
        // Random-ish moments, different each round.
        let wait = 150 + (std::process::id() as u64 * 7 + round * 131) % 400;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        sigkill(&p);
        drop(p);
    }
    writer.await.unwrap();
    let mut run = spawn(weir(&db, &["run"]));
    wait_head(&pool, 1200, Duration::from_secs(60)).await;
    sigterm(&mut run);
    assert_log_matches_table(&pool).await;
}

#[tokio::test]
async fn a_standby_takes_over_within_five_seconds() {
    let (db, pool) = setup("standby").await;
    let a = spawn(weir(&db, &["run"]));
    wait_holder(&pool, db.name(), None).await;
    let b = spawn(weir(&db, &["run"]));
    insert(&pool, 1, 10).await;
    wait_head(&pool, 10, Duration::from_secs(20)).await;
    let holder = wait_holder(&pool, db.name(), None).await;
    let (leader, standby) = if holder_pid(&holder) == a.0.id() { (a, b) } else { (b, a) };
    sigkill(&leader);
    let killed = Instant::now();
    drop(leader);
    insert(&pool, 11, 20).await;
    wait_head(&pool, 20, Duration::from_secs(10)).await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(5), "takeover took {took:?}");
    let new_holder = wait_holder(&pool, db.name(), Some(&holder)).await;
    assert_eq!(holder_pid(&new_holder), standby.0.id(), "{new_holder}");
    drop(standby);
    assert_log_matches_table(&pool).await;
}

/// The pid in a process identity `host:pid:tag`.
fn holder_pid(holder: &str) -> u32 {
    holder.rsplit(':').nth(1).and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{holder}"))
}

/// The current holder (one that is not `not`), waiting up to 10 s for one to appear.
async fn wait_holder(pool: &PgPool, slot: &str, not: Option<&str>) -> String {
    let found = std::sync::Mutex::new(None);
    eventually("a (new) holder", Duration::from_secs(10), || async {
        let h: Option<String> =
            sqlx::query_scalar("select holder from weir.source_state where slot = $1")
                .bind(slot)
                .fetch_optional(pool)
                .await
                .unwrap()
                .flatten();
        let h = h.filter(|h| Some(h.as_str()) != not);
        let done = h.is_some();
        *found.lock().unwrap() = h;
        done
    })
    .await;
    found.into_inner().unwrap().expect("a holder")
}

#[tokio::test]
async fn a_dropped_slot_or_publication_stops_weir_with_a_clear_error() {
    let (db, pool) = setup("dropped").await;
    sqlx::query("select pg_drop_replication_slot($1)")
        .bind(db.name())
        .execute(&pool)
        .await
        .unwrap();
    let (ok, out) = output(weir(&db, &["run"]));
    assert!(!ok);
    assert!(out.contains("does not exist") && out.contains("weir init"), "{out}");

    let (db, pool) = setup("nopub").await;
    sqlx::query("drop publication weir").execute(&pool).await.unwrap();
    insert(&pool, 1, 1).await;
    let (ok, out) = output(weir(&db, &["run"]));
    assert!(!ok);
    assert!(
        out.contains("publication `weir` does not exist") && out.contains("weir init"),
        "{out}"
    );
    drop(db);
}

#[tokio::test]
async fn bad_configuration_and_urls_give_one_clear_line() {
    let db = weir_testkit::shared().database("badcfg").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("weir.toml");
    std::fs::write(&cfg, "[source]\nslot = \"a\"\npublicaton = \"p\"\n").unwrap();
    let (ok, out) = output(weir(&db, &["init", "-c", cfg.to_str().unwrap()]));
    assert!(!ok);
    assert!(out.contains("publicaton") && out.contains("line 3"), "{out}");

    std::fs::write(&cfg, "[log]\nretention = 7\n").unwrap();
    let (ok, out) = output(weir(&db, &["init", "-c", cfg.to_str().unwrap()]));
    assert!(!ok);
    assert!(out.contains("retention") && out.contains("line 2"), "{out}");

    let (ok, out) = output(weir(&db, &["init", "--database-url", "mysql://x"]));
    assert!(!ok);
    assert!(out.contains("database.url"), "{out}");

    let (ok, out) =
        output(weir(&db, &["init", "--database-url", "postgres://127.0.0.1:1/nowhere"]));
    assert!(!ok);
    assert!(out.contains("cannot connect to 127.0.0.1:1/nowhere"), "{out}");
    // Why, once: the pool alone would say only that it timed out.
    assert!(out.contains("Connection refused"), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "one line: {out}");

    // A login the server refuses: its message and SQLSTATE, said once, without the line of
    // PostgreSQL's source that sqlx appends.
    let url = db.url().replace("postgres@", "no_such_role@");
    let (ok, out) = output(weir(&db, &["init", "--database-url", &url]));
    assert!(!ok);
    assert!(out.contains(r#"role "no_such_role" does not exist (SQLSTATE 28000)"#), "{out}");
    assert_eq!(out.matches("does not exist").count(), 1, "{out}");
    assert!(!out.contains("at line"), "{out}");
    assert!(out.contains("check the role, password and database name"), "{out}");
}

#[tokio::test]
async fn a_role_without_replication_is_told_how_to_fix_it() {
    let db = weir_testkit::shared().database("norepl").unwrap();
    db.psql("create table t (id int primary key)").unwrap();
    let role = format!("{}_role", db.name());
    let _ = db.psql(&format!("drop role if exists {role}"));
    db.psql(&format!("create role {role} login; grant all on database \"{}\" to {role}; grant all on schema public to {role}; alter table t owner to {role}", db.name())).unwrap();
    let url = db.url().replace("postgres@", &format!("{role}@"));
    let (ok, out) = output({
        let mut c = weir(&db, &["init"]);
        c.env("DATABASE_URL", &url).env("WEIR_SOURCE_TABLES", "[\"t\"]");
        c
    });
    assert!(!ok);
    assert!(
        out.contains("may not create replication slots") && out.contains("replication`"),
        "{out}"
    );
    let (ok, out) = output({
        let mut c = weir(&db, &["doctor"]);
        c.env("DATABASE_URL", &url);
        c
    });
    assert!(!ok);
    assert!(out.contains(&format!("alter role \"{role}\" replication")), "{out}");
    drop(db);
    let _ = weir_testkit::shared().psql("postgres", &format!("drop role if exists {role}"));
}

#[tokio::test]
async fn a_server_without_logical_wal_is_refused_with_the_fix() {
    let cluster = Cluster::start_temp(Options {
        fsync: false,
        settings: vec![("wal_level".into(), "replica".into())],
    })
    .unwrap();
    let db = cluster.database("nolog").unwrap();
    let (ok, out) = output(weir(&db, &["init"]));
    assert!(!ok);
    assert!(
        out.contains("wal_level is `replica`")
            && out.contains("alter system set wal_level = logical"),
        "{out}"
    );
    let (ok, out) = output(weir(&db, &["doctor"]));
    assert!(!ok, "{out}");
    assert!(out.contains("[FAIL] wal_level"), "{out}");
}

#[tokio::test]
async fn doctor_passes_on_a_healthy_setup_and_status_reports() {
    let (db, pool) = setup("doctor").await;
    let (ok, out) = output(weir(&db, &["doctor"]));
    assert!(ok, "{out}");
    assert!(out.contains("[ok  ] wal_level"), "{out}");
    assert!(out.contains("table public.t"), "{out}");
    let mut run = spawn(weir(&db, &["run"]));
    insert(&pool, 1, 5).await;
    wait_head(&pool, 5, Duration::from_secs(20)).await;
    let (ok, out) = output(weir(&db, &["status", "--json"]));
    assert!(ok, "{out}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["source"]["position"], 5);
    let (ok, out) = output(weir(&db, &["tail", "--from", "0", "--limit", "2", "--entity", "t"]));
    assert!(ok, "{out}");
    let lines: Vec<serde_json::Value> =
        out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["position"], 2);
    sigterm(&mut run);
}

/// A plain HTTP/1.0 GET: (status, body).
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

#[tokio::test]
async fn weir_run_serves_http_and_a_taken_port_is_a_clear_error() {
    let (db, pool) = setup("http").await;
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut cmd = weir(&db, &["run"]);
    cmd.env("WEIR_HTTP_BIND", &addr);
    let mut p = spawn(cmd);
    eventually(&format!("weir run answers on {addr}"), Duration::from_secs(20), || async {
        let answered = http_get(&addr, "/v1/health");
        if let Ok((200, body)) = &answered {
            assert!(body.contains("ok"), "{body}");
        }
        matches!(answered, Ok((200, _)))
    })
    .await;
    insert(&pool, 1, 3).await;
    wait_head(&pool, 3, Duration::from_secs(20)).await;
    let (status, body) = http_get(&addr, "/v1/log?entity=t").unwrap();
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 3, "{page}");

    // A second process on the same address stops before starting anything, and says why.
    let mut cmd = weir(&db, &["run"]);
    cmd.env("WEIR_HTTP_BIND", &addr);
    let (ok, out) = output(cmd);
    assert!(!ok);
    assert!(out.contains("cannot listen on") && out.contains("http.bind"), "{out}");

    // SIGTERM stops the server too (open connections do not hold it up).
    sigterm(&mut p);
    assert!(p.0.wait().unwrap().success());
    assert!(http_get(&addr, "/v1/health").is_err(), "the port is released");
}
