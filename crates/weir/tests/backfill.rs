//! Backfill against a real PostgreSQL (in-process ingestion): existing rows become `read`
//! events shaped like live inserts; live writes during the backfill always win over the rows a
//! chunk read (DBLog watermarks); a backfill interrupted mid-way resumes from its last chunk;
//! requests that cannot work are refused with nothing changed.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weir::{Config, Event, EventFilter, Kind, LogReader};
use weir_core::Secret;
use weir_log::backfill::BackfillState;
use weir_testkit::eventually;

struct Harness {
    pool: PgPool,
    config: Config,
    cancel: CancellationToken,
    ingest: Option<JoinHandle<weir::Result<()>>>,
}

impl Harness {
    async fn new(name: &str, schema: &str) -> (Self, weir_testkit::TestDatabase<'static>) {
        let db = weir_testkit::shared().database(name).unwrap();
        let url = db.url();
        let pool = PgPool::connect(&url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(schema.to_string())).execute(&pool).await.unwrap();
        let mut config = Config::default();
        config.database.url = Some(Secret::new(&url));
        config.source.slot = url.rsplit('/').next().unwrap().to_string();
        weir::setup::init(&pool, &config).await.unwrap();
        (Self { pool, config, cancel: CancellationToken::new(), ingest: None }, db)
    }

    fn start(&mut self) {
        self.cancel = CancellationToken::new();
        let (config, pool, cancel) = (self.config.clone(), self.pool.clone(), self.cancel.clone());
        self.ingest = Some(tokio::spawn(async move {
            weir::ingest::run(&config, &pool, &weir::ProcessId::generate(), cancel).await
        }));
    }

    async fn stop(&mut self) {
        self.cancel.cancel();
        if let Some(h) = self.ingest.take() {
            h.await.unwrap().unwrap();
        }
    }

    /// Ends ingestion the hard way: the task is dropped wherever it is (a crash, as far as
    /// the database can tell: its connections close mid-transaction).
    async fn crash(&mut self) {
        if let Some(h) = self.ingest.take() {
            h.abort();
            let _ = h.await;
        }
    }

    async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).execute(&self.pool).await.unwrap();
    }

    async fn backfill(&self, table: &str, chunk: i32) -> i64 {
        let created =
            weir::backfill::request(&self.pool, &self.config, &[table.into()], "test", Some(chunk))
                .await
                .unwrap();
        created[0].id
    }

    async fn state(&self, id: i64) -> weir_log::backfill::Backfill {
        weir_log::backfill::get(&self.pool, id).await.unwrap().unwrap()
    }

    async fn wait_done(&self, id: i64, timeout: Duration) {
        eventually("the backfill to finish", timeout, || async {
            if let Some(h) = &self.ingest {
                assert!(!h.is_finished(), "ingestion stopped early");
            }
            let b = self.state(id).await;
            assert!(b.state != BackfillState::Failed, "backfill failed: {:?}", b.error);
            b.state == BackfillState::Done
        })
        .await;
    }

    async fn head(&self) -> i64 {
        sqlx::query_scalar::<_, Option<i64>>("select max(position) from weir.source_state")
            .fetch_one(&self.pool)
            .await
            .unwrap()
            .unwrap_or(0)
    }

    /// Waits until the log holds everything committed so far (a marker message goes last).
    async fn caught_up(&self) {
        self.exec("select pg_logical_emit_message(true, 'weir', 'marker')").await;
        eventually("the log to reach the marker", Duration::from_secs(60), || async {
            let n: i64 = sqlx::query_scalar(
                "select count(*) from weir.events where kind = 'message'
                 and new_record->>'content' = 'marker'",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap();
            n > 0
        })
        .await;
    }

    async fn events(&self, entity: &str) -> Vec<Event> {
        let reader = LogReader::new(self.pool.clone()).await.unwrap();
        let filter = EventFilter { entities: vec![entity.into()], ..EventFilter::default() };
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page = reader.read(after, 10_000, &filter).await.unwrap();
            let Some(last) = page.last() else { return all };
            after = last.position;
            all.extend(page);
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Folds a table's events into the rows they say it holds now: key → record.
fn fold(events: &[Event]) -> HashMap<String, Value> {
    let mut rows = HashMap::new();
    for e in events {
        let key = e.key.to_string();
        match e.kind {
            Kind::Insert | Kind::Update | Kind::Read => {
                rows.insert(key, e.new_record.clone().unwrap());
            }
            Kind::Delete => {
                rows.remove(&key);
            }
            Kind::Truncate => rows.clear(),
            _ => {}
        }
    }
    rows
}

async fn table_rows(pool: &PgPool, sql: &str) -> HashMap<String, Value> {
    let rows: Vec<(Value, Value)> =
        sqlx::query_as(sqlx::AssertSqlSafe(sql.to_string())).fetch_all(pool).await.unwrap();
    rows.into_iter().map(|(k, r)| (k.to_string(), r)).collect()
}

#[tokio::test]
async fn existing_rows_become_read_events_shaped_like_inserts() {
    let (mut h, _db) = Harness::new(
        "backfill_shape",
        "create type mood as enum ('happy', 'sad');
         create table t (a int, b text, v numeric, m mood, tags text[], at timestamptz,
                         g int generated always as (a * 2) stored, primary key (b, a));
         insert into t (a, b, v, m, tags, at)
           select i, 'k' || (i % 7), i * 1.5, 'sad', array['x', 'y'], '2024-01-02 03:04:05+02'
           from generate_series(1, 2345) i;",
    )
    .await;
    h.start();
    let id = h.backfill("t", 100).await;
    h.wait_done(id, Duration::from_secs(60)).await;
    // A live insert of a row of the same shape, for comparison.
    h.exec("insert into t (a, b, v, m, tags, at) values (0, 'live', 1.5, 'sad', array['x', 'y'], '2024-01-02 03:04:05+02')").await;
    h.caught_up().await;
    let events = h.events("t").await;
    let reads: Vec<&Event> = events.iter().filter(|e| e.kind == Kind::Read).collect();
    assert_eq!(reads.len(), 2345, "every existing row once");
    let live = events.iter().find(|e| e.kind == Kind::Insert).unwrap();
    let read = reads.iter().find(|e| e.key == json!({"a": 1, "b": "k1"})).unwrap();
    assert_eq!(read.source.columns, live.source.columns, "the same shape as a live insert");
    let r = read.new_record.as_ref().unwrap();
    let l = live.new_record.as_ref().unwrap();
    for column in ["v", "m", "tags", "at"] {
        assert_eq!(r[column], l[column], "column {column} cast like a live change");
    }
    assert!(r.get("g").is_none(), "generated columns are not published, so not read either");
    let b = h.state(id).await;
    assert_eq!((b.rows_done, b.rows_written, b.rows_total), (2345, 2345, Some(2345)));
    assert_eq!(b.last_key, Some(json!(["k6", "2344"])), "the key in primary key order (b, a)");
    h.stop().await;
}

#[tokio::test]
async fn live_changes_during_a_backfill_are_never_overwritten_by_older_rows() {
    let (mut h, _db) = Harness::new(
        "backfill_race",
        "create table r (id int primary key, version int not null, payload text);
         insert into r select i, 0, repeat('x', 50) from generate_series(1, 1000000) i;",
    )
    .await;
    h.start();
    // 5,000 changes/s into the same table while it is backfilled: updates of random rows
    // (version + 1), deletes and inserts.
    let stop = CancellationToken::new();
    let mut writers = Vec::new();
    for w in 0..4 {
        let (pool, stop) = (h.pool.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut n = 0i64;
            while !stop.is_cancelled() {
                tick.tick().await;
                n += 1;
                let sql = if n % 10 == 0 {
                    format!(
                        "delete from r where id in (select (random() * 1000000)::int from generate_series(1, 5));
                         insert into r values ({}, 0, 'new') on conflict do nothing",
                        1_000_000 + w * 1_000_000 + n
                    )
                } else {
                    "update r set version = version + 1
                     where id in (select (random() * 1000000)::int from generate_series(1, 12))"
                        .to_string()
                };
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&pool).await.unwrap();
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let id = h.backfill("r", 5_000).await;
    h.wait_done(id, Duration::from_secs(600)).await;
    stop.cancel();
    for w in writers {
        w.await.unwrap();
    }
    h.caught_up().await;
    let events = h.events("r").await;
    let reads = events.iter().filter(|e| e.kind == Kind::Read).count();
    let live = events.len() - reads;
    let b = h.state(id).await;
    assert_eq!(b.rows_written as usize, reads);
    assert!(live > 1_000, "the writers ran during the backfill ({live} live changes)");
    assert!(
        b.rows_done > b.rows_written || live < 10_000,
        "some rows raced a live change and were dropped (done {}, written {})",
        b.rows_done,
        b.rows_written
    );
    // No row appears twice as read, and the log's last word on every row is the table's.
    let mut seen = std::collections::HashSet::new();
    for e in events.iter().filter(|e| e.kind == Kind::Read) {
        assert!(seen.insert(e.key.to_string()), "row {} read twice", e.key);
    }
    let folded = fold(&events);
    let actual =
        table_rows(&h.pool, "select json_build_object('id', id)::jsonb, to_jsonb(r) from r").await;
    assert_eq!(folded.len(), actual.len(), "rows in the log vs the table");
    for (key, row) in &actual {
        assert_eq!(folded.get(key), Some(row), "row {key}: the log's last state differs");
    }
    h.stop().await;
}

#[tokio::test]
async fn an_interrupted_backfill_resumes_from_its_last_chunk() {
    let (mut h, _db) = Harness::new(
        "backfill_resume",
        "create table s (id bigint primary key, v text);
         insert into s select i, 'v' || i from generate_series(1, 200000) i;",
    )
    .await;
    h.start();
    let id = h.backfill("s", 1_000).await;
    eventually("some chunks stored", Duration::from_secs(60), || async {
        h.state(id).await.rows_done >= 20_000
    })
    .await;
    h.crash().await;
    let at_crash = h.state(id).await;
    assert_eq!(at_crash.state, BackfillState::Running);
    assert!(at_crash.rows_done < 200_000, "the crash came mid-way");
    h.start();
    h.wait_done(id, Duration::from_secs(120)).await;
    h.caught_up().await;
    let events = h.events("s").await;
    assert_eq!(events.len(), 200_000, "every row exactly once across the crash");
    let mut ids: Vec<i64> = events.iter().map(|e| e.key["id"].as_i64().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 200_000);
    let positions: Vec<i64> = events.iter().map(|e| e.position).collect();
    assert!(positions.windows(2).all(|w| w[1] == w[0] + 1), "gap-free");
    assert!(h.head().await >= 200_000);
    h.stop().await;
}

#[tokio::test]
async fn requests_that_cannot_work_are_refused_and_change_nothing() {
    let (mut h, _db) = Harness::new(
        "backfill_refused",
        "create table ok (id int primary key);
         create table nokey (v text);
         insert into ok select generate_series(1, 100000);",
    )
    .await;
    // `unwatched` is created after init, and the publication lists tables explicitly.
    let mut config = h.config.clone();
    config.source.tables = vec!["ok".into(), "nokey".into()];
    weir::setup::init(&h.pool, &config).await.unwrap();
    h.config = config;
    h.exec("create table unwatched (id int primary key)").await;
    let refuse = |tables: &'static [&'static str]| {
        let (pool, config) = (h.pool.clone(), h.config.clone());
        async move {
            let tables: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
            weir::backfill::request(&pool, &config, &tables, "test", None)
                .await
                .unwrap_err()
                .to_string()
        }
    };
    let e = refuse(&["nope"]).await;
    assert!(e.contains("no table `public.nope`"), "{e}");
    let e = refuse(&["ok", "unwatched"]).await;
    assert!(e.contains("`unwatched` is not watched") && e.contains("weir init"), "{e}");
    let e = refuse(&["nokey"]).await;
    assert!(e.contains("has no primary key") && e.contains("add primary key"), "{e}");
    let n: i64 =
        sqlx::query_scalar("select count(*) from weir.backfills").fetch_one(&h.pool).await.unwrap();
    assert_eq!(n, 0, "a refused request creates nothing, not even for the good table");
    // A second backfill of a table while one is active.
    let id = h.backfill("ok", 10).await;
    let e = refuse(&["ok"]).await;
    assert!(e.contains("already pending") && e.contains(&format!("id {id}")), "{e}");
    let cancelled = weir::backfill::cancel(&h.pool, "ok").await.unwrap().unwrap();
    assert_eq!(cancelled.state, BackfillState::Cancelled);
    // Once cancelled, a new one may start, and it runs to the end.
    let id = h.backfill("public.ok", 20_000).await;
    h.start();
    h.wait_done(id, Duration::from_secs(60)).await;
    h.stop().await;
}
