//! The log against a real PostgreSQL: appends, idempotence by LSN, staged (streamed)
//! transactions, partitions and retention.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use weir_core::{Change, Kind, Lsn, Source, Transaction};
use weir_log::{Appender, EventFilter, LogReader};

async fn setup(prefix: &str) -> (weir_testkit::TestDatabase<'static>, PgPool) {
    let db = weir_testkit::shared().database(prefix).unwrap();
    let pool = PgPool::connect(&db.url()).await.unwrap();
    weir_log::migrate(&pool).await.unwrap();
    weir_log::migrate(&pool).await.unwrap(); // idempotent
    (db, pool)
}

fn source() -> Arc<Source> {
    let mut columns = serde_json::Map::new();
    columns.insert("id".into(), json!("int4"));
    columns.insert("title".into(), json!("text"));
    Arc::new(Source { db: String::new(), schema: "public".into(), table: "posts".into(), columns })
}

fn insert(rel: &Arc<Source>, id: i64, title: &str) -> Change {
    Change {
        kind: Kind::Insert,
        entity: "posts".into(),
        relation: Some(rel.clone()),
        key: json!({"id": id}),
        new_record: Some(json!({"id": id, "title": title})),
        old_record: None,
        changes: None,
        unchanged_toast: vec![],
    }
}

fn txn(lsn: u64, changes: Vec<Change>) -> Transaction {
    Transaction {
        xid: lsn as u32,
        commit_lsn: Lsn(lsn),
        commit_ts: chrono::Utc::now(),
        changes,
        staged: false,
    }
}

#[tokio::test]
async fn appends_in_order_and_skips_what_is_already_stored() {
    let (db, pool) = setup("log_append").await;
    let rel = source();
    let mut app = Appender::open(&db.url().parse().unwrap(), "weir", 1000).await.unwrap();
    let mut head = app.subscribe();
    let state = app
        .append(&[
            txn(100, vec![insert(&rel, 1, "a\tb\\c\n"), insert(&rel, 2, "β")]),
            txn(200, vec![insert(&rel, 3, "c")]),
        ])
        .await
        .unwrap();
    assert_eq!(state.position, 3);
    assert_eq!(state.lsn, Lsn(200));
    assert_eq!(*head.borrow_and_update(), 3);

    // A replay after a crash: the first transaction is already stored and is skipped.
    drop(app);
    let mut app = Appender::open(&db.url().parse().unwrap(), "weir", 1000).await.unwrap();
    assert_eq!(app.state().position, 3);
    let state = app
        .append(&[txn(200, vec![insert(&rel, 3, "c")]), txn(300, vec![insert(&rel, 4, "d")])])
        .await
        .unwrap();
    assert_eq!(state.position, 4);

    let reader = LogReader::new(pool.clone()).await.unwrap();
    let events = reader.read(0, 100, &EventFilter::default()).await.unwrap();
    let positions: Vec<i64> = events.iter().map(|e| e.position).collect();
    assert_eq!(positions, vec![1, 2, 3, 4]);
    assert_eq!(events[0].new_record.as_ref().unwrap()["title"], "a\tb\\c\n");
    assert_eq!(events[1].new_record.as_ref().unwrap()["title"], "β");
    assert_eq!(events[0].source.table, "posts");
    assert_eq!(events[0].source.columns["id"], "int4");
    assert_eq!(events[3].lsn, Lsn(300));
    let only: Vec<i64> = reader
        .read(1, 2, &EventFilter { entities: vec!["posts".into()], kinds: vec![Kind::Insert] })
        .await
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(only, vec![2, 3]);
    assert!(
        reader
            .read(0, 10, &EventFilter { entities: vec!["comments".into()], kinds: vec![] })
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn streamed_transactions_move_from_staging_in_wal_order() {
    let (db, pool) = setup("log_staged").await;
    let rel = source();
    let mut app = Appender::open(&db.url().parse().unwrap(), "weir", 1000).await.unwrap();
    app.append(&[txn(10, vec![insert(&rel, 1, "before")])]).await.unwrap();
    // Chunks of xid 77, one of them from subtransaction 78 which aborts.
    app.stage(77, &[(77, insert(&rel, 10, "x")), (77, insert(&rel, 11, "y"))], 0).await.unwrap();
    app.stage(77, &[(78, insert(&rel, 12, "aborted"))], 2).await.unwrap();
    app.stage(77, &[(77, insert(&rel, 13, "z"))], 3).await.unwrap();
    assert_eq!(app.discard_staged(77, Some(78)).await.unwrap(), 1);
    // Another streamed transaction that aborts entirely.
    app.stage(90, &[(90, insert(&rel, 99, "gone"))], 0).await.unwrap();
    assert_eq!(app.discard_staged(90, None).await.unwrap(), 1);
    let streamed = Transaction {
        xid: 77,
        commit_lsn: Lsn(20),
        commit_ts: chrono::Utc::now(),
        changes: vec![],
        staged: true,
    };
    let state = app.append(&[streamed, txn(30, vec![insert(&rel, 2, "after")])]).await.unwrap();
    assert_eq!(state.position, 5);
    let reader = LogReader::new(pool.clone()).await.unwrap();
    let ids: Vec<i64> = reader
        .read(0, 100, &EventFilter::default())
        .await
        .unwrap()
        .iter()
        .map(|e| e.key["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 10, 11, 13, 2]);
    let left: i64 = sqlx::query_scalar("select count(*) from weir.staged_changes")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn partitions_are_created_as_needed_and_old_ones_dropped_by_retention() {
    let (db, pool) = setup("log_retention").await;
    let rel = source();
    let mut app = Appender::open(&db.url().parse().unwrap(), "weir", 1000).await.unwrap();
    let mut lsn = 1;
    for chunk in 0..5 {
        let changes = (0..600).map(|i| insert(&rel, chunk * 600 + i, "r")).collect();
        let mut t = txn(lsn, changes);
        t.commit_ts = chrono::Utc::now() - chrono::Duration::days(30);
        app.append(&[t]).await.unwrap();
        lsn += 1;
    }
    let parts: i64 = sqlx::query_scalar(
        "select count(*) from pg_inherits where inhparent = 'weir.events'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(parts, 4, "3000 positions in partitions of 1000 starting at 1");
    let week = Duration::from_secs(7 * 86_400);
    // A consumer that still needs position 1500 holds its partition and the newer ones.
    let report = weir_log::enforce_retention(&pool, week, Some(1500)).await.unwrap();
    assert_eq!(report.dropped.len(), 1, "{report:?}");
    assert_eq!(report.held, Some((1000, 3000)), "{report:?}");
    assert_eq!(report.oldest_position, Some(1000));
    // Once it has handled them, they go.
    let report = weir_log::enforce_retention(&pool, week, Some(3001)).await.unwrap();
    assert_eq!(report.dropped.len(), 2, "{report:?}");
    assert_eq!(report.held, None);
    // Every partition wholly below the head's partition went; the head is kept.
    assert_eq!(report.oldest_position, Some(3000));
    let reader = LogReader::new(pool.clone()).await.unwrap();
    assert_eq!(reader.head().await.unwrap(), 3000);
    // Recent events are kept.
    app.append(&[txn(lsn, vec![insert(&rel, 1, "new")])]).await.unwrap();
    let report = weir_log::enforce_retention(&pool, week, None).await.unwrap();
    assert!(report.dropped.is_empty());
}

#[tokio::test]
async fn a_long_running_reader_blocks_neither_appends_nor_other_readers() {
    let (db, pool) = setup("log_lockwait").await;
    let rel = source();
    let mut app = Appender::open(&db.url().parse().unwrap(), "weir", 1000).await.unwrap();
    app.append(&[txn(1, vec![insert(&rel, 0, "first")])]).await.unwrap();
    // A reader that holds its lock on weir.events for a long time (an open transaction).
    let mut long = pool.begin().await.unwrap();
    sqlx::query("select count(*) from weir.events").execute(&mut *long).await.unwrap();
    // Appends that would like to create the next partition ahead of need still go through.
    let changes = (1..600).map(|i| insert(&rel, i, "r")).collect();
    tokio::time::timeout(Duration::from_secs(10), app.append(&[txn(2, changes)]))
        .await
        .expect("the append must not wait for the reader")
        .unwrap();
    // And other readers are not queued behind a pending partition DDL.
    let mut other = pool.acquire().await.unwrap();
    sqlx::query("set statement_timeout = '2s'").execute(&mut *other).await.unwrap();
    let n: i64 = sqlx::query_scalar("select count(*) from weir.events")
        .fetch_one(&mut *other)
        .await
        .unwrap();
    assert_eq!(n, 600);
    long.rollback().await.unwrap();
    // Once the reader is gone the partition is created ahead of need.
    app.append(&[txn(3, vec![insert(&rel, 1000, "x")])]).await.unwrap();
    let parts: i64 = sqlx::query_scalar(
        "select count(*) from pg_inherits where inhparent = 'weir.events'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(parts, 2);
}

#[tokio::test]
async fn readers_are_woken_in_process_when_the_append_returns_and_elsewhere_by_notify() {
    let (db, pool) = setup("log_wake").await;
    let rel = source();
    let cancel = tokio_util::sync::CancellationToken::new();
    // A reader elsewhere: only the NOTIFY reaches it.
    let (mut elsewhere, listener) = weir_log::listen_for_appends(pool.clone(), cancel.clone());
    // Readers in the appender's process: told directly, no listener at all.
    let local = weir_log::Wake::new(0);
    let mut app = Appender::open(&db.url().parse().unwrap(), "weir", 1000).await.unwrap();
    app.wake_readers(local.clone());
    let state =
        app.append(&[txn(100, vec![insert(&rel, 1, "a"), insert(&rel, 2, "b")])]).await.unwrap();
    assert_eq!(state.position, 2);
    assert_eq!(local.head(), 2, "the local readers know the head as the append returns");
    let seen = elsewhere.wait_past(0, std::time::Duration::from_secs(10)).await;
    assert_eq!(seen, 2, "the NOTIFY carries the head to other processes");
    // The head only moves forward, whoever tells it.
    local.advance(1);
    assert_eq!(local.head(), 2);
    cancel.cancel();
    listener.await.unwrap();
}

/// Appends submitted back to back overlap (one commits while the next is sent) and still land
/// gap-free in submission order, with the state reported only for what is committed.
#[tokio::test]
async fn overlapping_appends_land_in_submission_order() {
    let (db, pool) = setup("log_pipeline").await;
    let rel = source();
    let mut app = Appender::open(&db.url().parse().unwrap(), "weir", 100_000).await.unwrap();
    let mut id = 0;
    for batch in 0..200u64 {
        let changes = (0..(1 + batch % 7))
            .map(|_| {
                id += 1;
                insert(&rel, id, "x")
            })
            .collect();
        let committed = app.submit(&[txn(100 + batch, changes)], &[]).await.unwrap();
        assert!(app.in_flight(), "the append just submitted runs on");
        let stored: i64 = sqlx::query_scalar("select position from weir.source_state")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(
            committed.position <= stored,
            "reported {} but stored {stored}",
            committed.position
        );
    }
    let state = app.settle().await.unwrap();
    assert!(!app.in_flight());
    assert_eq!(state.position, id);
    assert_eq!(state.lsn, Lsn(299));
    let positions: Vec<i64> = sqlx::query_scalar("select position from weir.events order by 1")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(positions, (1..=id).collect::<Vec<_>>());
    let ids: Vec<i64> =
        sqlx::query_scalar("select (key->>'id')::int8 from weir.events order by position")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(ids, (1..=id).collect::<Vec<_>>(), "events keep the order they were submitted in");
}

/// When an append fails, the one submitted after it (already running) must not commit on top
/// of the gap: it refuses, and the log ends where the last good append left it.
#[tokio::test]
async fn an_append_after_a_failed_one_refuses_rather_than_leave_a_gap() {
    let (db, pool) = setup("log_pipeline_fail").await;
    let rel = source();
    let mut app = Appender::open(&db.url().parse().unwrap(), "weir", 100_000).await.unwrap();
    app.append(&[txn(100, vec![insert(&rel, 1, "a")])]).await.unwrap();
    // Position 2 is taken behind the appender's back: its next append fails on the key.
    sqlx::query(
        "insert into weir.events (position, lsn, xid, commit_ts, kind, entity, key)
         values (2, '0/1', 1, now(), 'insert', 'intruder', '{}')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let failing = app.submit(&[txn(200, vec![insert(&rel, 2, "b")])], &[]).await;
    assert!(failing.is_ok(), "the failure shows once the append is waited for");
    let next = app.submit(&[txn(300, vec![insert(&rel, 3, "c")])], &[]).await;
    let err = next.expect_err("the append that failed is reported");
    assert!(matches!(err, weir_log::Error::Database(_)), "{err:?}");
    let err = app.settle().await.expect_err("the append after it refuses");
    assert!(matches!(err, weir_log::Error::Moved { expected: 2 }), "{err:?}");
    let (position, lsn): (i64, String) =
        sqlx::query_as("select position, lsn::text from weir.source_state")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((position, lsn.as_str()), (1, "0/64"));
    let stored: Vec<(i64, String)> =
        sqlx::query_as("select position, entity from weir.events order by 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(stored, vec![(1, "posts".to_string()), (2, "intruder".to_string())]);
}

/// The appender analyzes the partition it fills (autovacuum is off on it here, as if it had not
/// come round yet), so that a consumer reading a backlog just ingested, with a filter of
/// entities, reads a page's worth of rows and not every later event of its entities. Counted
/// in the partition's `idx_tup_fetch` (rows fetched through an index, bitmap scans included):
/// without statistics a page of 500 fetched all 199,000 later posts.
#[tokio::test]
async fn the_partition_being_filled_is_analyzed_so_filtered_reads_stay_one_page() {
    let (db, pool) = setup("log_analyze").await;
    sqlx::query(
        "create table weir.events_000000000001 partition of weir.events
         for values from (1) to (1000000) with (autovacuum_enabled = false)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let partition = "weir.events_000000000001";
    let reltuples = || async {
        let n: f32 = sqlx::query_scalar("select reltuples from pg_class where oid = $1::regclass")
            .bind(partition)
            .fetch_one(&pool)
            .await
            .unwrap();
        n
    };
    let posts = source();
    let comments = Arc::new(Source { table: "comments".into(), ..(*posts).clone() });
    let mut app = Appender::open(&db.url().parse().unwrap(), "weir", 1_000_000).await.unwrap();
    // 200 transactions of 1,000: one comment in ten.
    for t in 0..200u64 {
        let changes = (0..1_000)
            .map(|i| {
                let id = (t * 1_000 + i) as i64;
                let mut c = insert(if i % 10 == 0 { &comments } else { &posts }, id, "x");
                if i % 10 == 0 {
                    c.entity = "comments".into();
                }
                c
            })
            .collect();
        app.append(&[txn(100 + t, changes)]).await.unwrap();
    }
    weir_testkit::eventually("the partition is analyzed", Duration::from_secs(30), || async {
        reltuples().await >= 160_000.0
    })
    .await;

    // One connection, so the read's statistics can be flushed from it on demand.
    let one = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&db.url()).await;
    let one = one.unwrap();
    let reader = LogReader::new(one.clone()).await.unwrap();
    let fetched = || async {
        sqlx::query("select pg_stat_force_next_flush()").execute(&one).await.unwrap();
        sqlx::query("select 1").execute(&one).await.unwrap();
        let n: i64 = sqlx::query_scalar(
            "select coalesce(idx_tup_fetch, 0) from pg_stat_user_tables where relid = $1::regclass",
        )
        .bind(partition)
        .fetch_one(&pool)
        .await
        .unwrap();
        n
    };
    let filter = EventFilter { entities: vec!["posts".into()], kinds: vec![] };
    let before = fetched().await;
    for after in [100, 50_000, 100_000] {
        let page = reader.read(after, 500, &filter).await.unwrap();
        let positions: Vec<i64> = page.iter().map(|e| e.position).collect();
        // Position p is change (p - 1) % 1000 of its transaction; every tenth is a comment.
        let expected: Vec<i64> = (after + 1..).filter(|p| (p - 1) % 10 != 0).take(500).collect();
        assert_eq!(positions, expected, "the posts after {after}, in order");
    }
    let read = fetched().await - before;
    assert!(read <= 6_000, "three pages of 500 fetched {read} rows of the partition");
}
