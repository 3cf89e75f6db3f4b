//! A key that moves: an update that changes an operator's key column (a comment moved from
//! one post to another) is handled for the old key and for the new key, each on its own lane,
//! old first when they share one — with the README's SQL operator on real tables and a Rust
//! operator that records which keys each lane ran it for. Events are appended straight to the
//! log, as the ingestion would write them for a table with `REPLICA IDENTITY FULL`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use weir_consumer::{
    ConsumerSpec, Engine, Operator, OperatorError, Selector, SqlOperator, TracingReporter,
};
use weir_core::{
    Change, ConsumersConfig, Event, Kind, Lsn, OperatorConfig, Ordering, ProcessId, Source,
    Transaction,
};
use weir_log::Appender;

const SCHEMA: &str = "
    create table posts (id int primary key, title text not null);
    create table comments (id int primary key, post_id int, body text);
    create table post_with_comments_counts (id int primary key, title text not null, comments_count int not null);
    create table ran (seq bigserial primary key, position bigint, lane_keys text);";

struct Log {
    pool: PgPool,
    appender: Appender,
    lsn: u64,
}

impl Log {
    async fn new(db: &weir_testkit::TestDatabase<'_>) -> Self {
        let pool = PgPool::connect(&db.url()).await.unwrap();
        weir_log::migrate(&pool).await.unwrap();
        weir_consumer::migrate(&pool).await.unwrap();
        sqlx::raw_sql(SCHEMA).execute(&pool).await.unwrap();
        let appender = Appender::open(&db.url().parse().unwrap(), "weir", 1_000_000).await.unwrap();
        Self { pool, appender, lsn: 0 }
    }

    /// Runs `sql` on the tables, then appends the change it made to the log (one transaction).
    async fn change(&mut self, sql: &str, change: Change) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).execute(&self.pool).await.unwrap();
        self.lsn += 100;
        self.appender
            .append(&[Transaction {
                xid: 1,
                commit_lsn: Lsn(self.lsn),
                commit_ts: chrono::Utc::now(),
                changes: vec![change],
                staged: false,
            }])
            .await
            .unwrap();
    }

    /// Waits until every consumer's lanes are past the log's head.
    async fn processed(&self) {
        weir_testkit::eventually("every lane past the head", Duration::from_secs(30), || async {
            let behind: i64 = sqlx::query_scalar(
                "select count(*) from weir.checkpoints
                 where position < (select coalesce(max(position), 0) from weir.events)",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap();
            behind == 0
        })
        .await;
    }

    async fn counts(&self) -> Vec<(i32, i32)> {
        sqlx::query_as("select id, comments_count from post_with_comments_counts order by id")
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }
}

fn relation(table: &str, columns: &[&str]) -> Arc<Source> {
    Arc::new(Source {
        db: String::new(),
        schema: "public".into(),
        table: table.into(),
        columns: columns.iter().map(|c| (c.to_string(), json!("int4"))).collect(),
    })
}

fn change(kind: Kind, table: &str, new: Option<Value>, old: Option<Value>) -> Change {
    let row = new.as_ref().or(old.as_ref()).unwrap();
    Change {
        kind,
        entity: table.into(),
        relation: Some(relation(table, &["id", "post_id"])),
        key: json!({"id": row["id"]}),
        new_record: new,
        old_record: old,
        changes: None,
        unchanged_toast: vec![],
    }
}

/// The README's operator.
fn readme_operator() -> OperatorConfig {
    OperatorConfig {
        name: "post_with_comments_counts".into(),
        entities: vec!["posts".into(), "comments".into()],
        kinds: vec![Kind::Insert, Kind::Update, Kind::Delete],
        key: [("comments".to_string(), "post_id".to_string())].into(),
        sql: "insert into post_with_comments_counts (id, title, comments_count)
              select p.id, p.title, (select count(*) from comments c where c.post_id = p.id)
              from posts p where p.id = $1
              on conflict (id) do update
                set title = excluded.title, comments_count = excluded.comments_count"
            .into(),
        delete_with: vec!["posts".into()],
        target: None,
        target_key: None,
        ordering: None,
        lanes: None,
        retry: None,
        on_exhausted: None,
        backfill: false,
    }
}

/// Routes comments by `post_id` like the SQL operator, and records which keys each lane ran
/// an event for (one row per call, keys joined by `,`).
struct KeyRecorder;

impl KeyRecorder {
    fn post(record: Option<&Value>) -> Option<String> {
        record.and_then(|r| r.get("post_id")).filter(|v| !v.is_null()).map(|v| v.to_string())
    }
}

impl Operator for KeyRecorder {
    fn selector(&self) -> Selector {
        Selector { entities: vec!["comments".into()], kinds: vec![] }
    }
    fn partition_keys(&self, e: &Event) -> Result<Vec<String>, weir_core::BoxError> {
        let new = Self::post(e.new_record.as_ref());
        let old = Self::post(e.old_record.as_ref());
        Ok(match (old, new) {
            (Some(o), Some(n)) if o != n => vec![o, n],
            (_, Some(n)) => vec![n],
            (Some(o), None) => vec![o],
            (None, None) => return Err("no post_id".into()),
        })
    }
    async fn handle(&self, tx: &mut PgConnection, e: &Event) -> Result<(), OperatorError> {
        let keys = self.partition_keys(e).map_err(OperatorError::retry)?;
        self.handle_keys(tx, e, &keys).await
    }
    async fn handle_keys(
        &self,
        tx: &mut PgConnection,
        e: &Event,
        keys: &[String],
    ) -> Result<(), OperatorError> {
        sqlx::query("insert into ran (position, lane_keys) values ($1, $2)")
            .bind(e.position)
            .bind(keys.join(","))
            .execute(tx)
            .await?;
        Ok(())
    }
}

fn with_lanes(mut spec: ConsumerSpec, lanes: u32) -> ConsumerSpec {
    spec.ordering = if lanes == 1 { Ordering::Global } else { Ordering::PerKey };
    spec.lanes = lanes;
    spec.poll_interval = Duration::from_millis(100);
    spec
}

/// Two posts whose keys route to different lanes of 8 (or, for one lane, any two).
fn two_posts(lanes: i32) -> (i32, i32) {
    let a = 1;
    let b = (2..100)
        .find(|b| {
            lanes == 1
                || weir_consumer::lane_of(&b.to_string(), lanes)
                    != weir_consumer::lane_of("1", lanes)
        })
        .unwrap();
    (a, b)
}

async fn moved_key_recomputes_both_sides(lanes: u32, db_name: &str) {
    let db = weir_testkit::shared().database(db_name).unwrap();
    let mut log = Log::new(&db).await;
    let defaults = ConsumersConfig::default();
    let sql_op = SqlOperator::prepare(&log.pool, &readme_operator()).await.unwrap();
    let specs = vec![
        with_lanes(
            ConsumerSpec::new("post_with_comments_counts", Arc::new(sql_op), &defaults),
            lanes,
        ),
        with_lanes(ConsumerSpec::new("keys", Arc::new(KeyRecorder), &defaults), lanes),
    ];
    let cancel = CancellationToken::new();
    let (wake, _l) = weir_log::listen_for_appends(log.pool.clone(), cancel.clone());
    let engine = Engine::start(
        log.pool.clone(),
        specs,
        wake,
        Arc::new(TracingReporter),
        &ProcessId::generate(),
        cancel.clone(),
    )
    .await
    .unwrap();
    let (a, b) = two_posts(lanes as i32);
    for p in [a, b] {
        log.change(
            &format!("insert into posts values ({p}, 'p{p}')"),
            change(Kind::Insert, "posts", Some(json!({"id": p})), None),
        )
        .await;
    }
    log.change(
        &format!("insert into comments values (10, {a}, 'c')"),
        change(Kind::Insert, "comments", Some(json!({"id": 10, "post_id": a})), None),
    )
    .await;
    log.processed().await;
    assert_eq!(log.counts().await, [(a, 1), (b, 0)]);

    // The comment moves from post a to post b: both are recomputed.
    log.change(
        &format!("update comments set post_id = {b} where id = 10"),
        change(
            Kind::Update,
            "comments",
            Some(json!({"id": 10, "post_id": b})),
            Some(json!({"id": 10, "post_id": a})),
        ),
    )
    .await;
    let moved: i64 = sqlx::query_scalar("select max(position) from weir.events")
        .fetch_one(&log.pool)
        .await
        .unwrap();
    log.processed().await;
    assert_eq!(log.counts().await, [(a, 0), (b, 1)], "the post it left is recomputed too");
    // Which lanes ran the move, for which keys: one call per lane, old key first on one lane.
    let runs: Vec<String> =
        sqlx::query_scalar("select lane_keys from ran where position = $1 order by seq")
            .bind(moved)
            .fetch_all(&log.pool)
            .await
            .unwrap();
    let (old, new) = (a.to_string(), b.to_string());
    if lanes == 1 {
        assert_eq!(runs, [format!("{old},{new}")], "one lane: both keys, the old one first");
    } else {
        let mut sorted = runs.clone();
        sorted.sort();
        let mut want = vec![old.clone(), new.clone()];
        want.sort();
        assert_eq!(sorted, want, "each lane ran it for its own key only: {runs:?}");
    }

    // A deleted comment (its whole old row) and a deleted post.
    log.change(
        "delete from comments where id = 10",
        change(Kind::Delete, "comments", None, Some(json!({"id": 10, "post_id": b}))),
    )
    .await;
    log.processed().await;
    assert_eq!(log.counts().await, [(a, 0), (b, 0)]);
    log.change(
        &format!("delete from posts where id = {a}"),
        change(Kind::Delete, "posts", None, Some(json!({"id": a}))),
    )
    .await;
    log.processed().await;
    assert_eq!(log.counts().await, [(b, 0)], "delete_with removed the deleted post's row");
    engine.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_key_runs_on_the_old_and_the_new_lane_of_eight() {
    moved_key_recomputes_both_sides(8, "move8").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_key_runs_for_both_keys_old_first_on_one_global_lane() {
    moved_key_recomputes_both_sides(1, "move1").await;
}
