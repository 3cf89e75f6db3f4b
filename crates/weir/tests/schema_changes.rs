//! Schema changes while weir runs, against a real PostgreSQL with ingestion and a declarative
//! operator running through each change: `add column`, `drop column`, `alter column … type`, a
//! table created later in a watched schema, and `truncate`. Events after a change carry the new
//! shape (their `source.columns` and a new `weir.relations` row); an operator whose statement
//! no longer runs (a dropped column, a key whose type no longer binds `$1`) halts at its first
//! failure with the SQL error as the reason, without burning its retries.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgPool;
use weir::{Config, ConsumerState, Event, EventFilter, Kind, LogReader};
use weir_core::{OperatorConfig, Secret};
use weir_testkit::eventually;

/// Generous: the machine is small and other tests run beside.
const WAIT: Duration = Duration::from_secs(30);

struct Env {
    pool: PgPool,
    running: Option<weir::Running>,
    _db: weir_testkit::TestDatabase<'static>,
}

impl Env {
    /// A database with `schema`, watched as the whole `public` schema (`tables` empty), and
    /// weir running ingestion plus `operators`. Retries are slow on purpose (10 s, 5 of them):
    /// a halt within the test's wait is a halt at the first failure.
    async fn start(prefix: &str, schema: &str, operators: Vec<Value>) -> Env {
        let db = weir_testkit::shared().database(prefix).unwrap();
        let pool = PgPool::connect(&db.url()).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(schema.to_string())).execute(&pool).await.unwrap();
        let mut config = Config::default();
        config.database.url = Some(Secret::new(db.url()));
        config.source.slot = db.name().to_string();
        assert!(config.source.tables.is_empty(), "the whole schema is watched");
        config.consumers.lanes = 1;
        config.consumers.retry = weir_core::RetryConfig {
            min_restart_time: Duration::from_secs(10),
            backoff_multiplicator: 1.0,
            max_restart_time: Duration::from_secs(10),
            max_retries: 5,
        };
        config.operators = operators
            .into_iter()
            .map(|o| serde_json::from_value::<OperatorConfig>(o).unwrap())
            .collect();
        weir::setup::init(&pool, &config).await.unwrap();
        let running = weir::Weir::builder(config).pool(pool.clone()).start().await.unwrap();
        Env { pool, running: Some(running), _db: db }
    }

    async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).execute(&self.pool).await.unwrap();
    }

    /// The logged events of `entity`, once there are at least `n`.
    async fn events(&self, entity: &str, n: usize) -> Vec<Event> {
        let reader = LogReader::new(self.pool.clone()).await.unwrap();
        let filter = EventFilter { entities: vec![entity.into()], kinds: vec![] };
        let read = || async { reader.read(0, 1000, &filter).await.unwrap() };
        eventually(&format!("{n} {entity} events in the log"), WAIT, || async {
            read().await.len() >= n
        })
        .await;
        read().await
    }

    async fn rows(&self, sql: &str) -> Vec<Value> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select to_jsonb(t) from ({sql}) t")))
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    /// Waits until `sql` returns `expected` (as JSON rows).
    async fn wait_rows(&self, sql: &str, expected: Value) {
        eventually(&format!("`{sql}` returns {expected}"), WAIT, || async {
            Value::Array(self.rows(sql).await) == expected
        })
        .await;
    }

    /// The `(columns, key_columns)` rows of `weir.relations` for `table`, oldest first.
    async fn relations(&self, table: &str) -> Vec<(Value, Vec<String>)> {
        sqlx::query_as(
            "select columns, key_columns from weir.relations
             where schema_name = 'public' and table_name = $1 order by id",
        )
        .bind(table)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Waits until `consumer` is halted, and answers its `halted` record.
    async fn halted(&self, consumer: &str) -> Value {
        eventually(&format!("{consumer} halted"), WAIT, || async {
            let s = weir::consumer_status::consumer(&self.pool, consumer).await.unwrap().unwrap();
            s.state == ConsumerState::Halted
        })
        .await;
        let s = weir::consumer_status::consumer(&self.pool, consumer).await.unwrap().unwrap();
        s.halted.expect("a halted consumer says where")
    }

    async fn running(&self, consumer: &str) -> bool {
        let s = weir::consumer_status::consumer(&self.pool, consumer).await.unwrap().unwrap();
        s.state == ConsumerState::Running
    }

    async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await.unwrap();
        }
    }
}

/// The event's `source.columns`, sorted by name (`weir.relations` keeps them as `jsonb`, whose
/// keys are in its own order).
fn columns(e: &Event) -> Vec<(&str, &str)> {
    let mut c: Vec<_> =
        e.source.columns.iter().map(|(k, v)| (k.as_str(), v.as_str().unwrap())).collect();
    c.sort();
    c
}

/// An operator copying `items` into `item_copy` with `select`.
fn copy_operator(select: &str, set: &str) -> Value {
    json!({
        "name": "item_copy",
        "entities": ["items"],
        "sql": format!(
            "insert into item_copy {select} from items where id = $1
             on conflict (id) do update set {set}"
        ),
    })
}

#[tokio::test]
async fn add_column_while_running() {
    let env = Env::start(
        "add_column",
        "create table items (id int primary key, v text);
         create table item_copy (id int primary key, v text);",
        vec![copy_operator("select id, v", "v = excluded.v")],
    )
    .await;
    env.exec("insert into items values (1, 'a')").await;
    env.events("items", 1).await;
    env.exec("alter table items add column w int not null default 7").await;
    env.exec("insert into items values (2, 'b', 8)").await;
    env.exec("update items set v = 'a2' where id = 1").await;
    let e = env.events("items", 3).await;
    assert_eq!(e[0].new_record, Some(json!({"id": 1, "v": "a"})));
    assert_eq!(columns(&e[0]), [("id", "int4"), ("v", "text")]);
    assert_eq!(e[1].new_record, Some(json!({"id": 2, "v": "b", "w": 8})));
    assert_eq!(columns(&e[1]), [("id", "int4"), ("v", "text"), ("w", "int4")]);
    // The default fills the old row: the update after the change shows it.
    assert_eq!(e[2].new_record, Some(json!({"id": 1, "v": "a2", "w": 7})));
    assert_eq!(columns(&e[2]), columns(&e[1]));
    let relations = env.relations("items").await;
    assert_eq!(relations.len(), 2, "one relation row per shape: {relations:?}");
    assert_eq!(relations[1].0, json!({"id": "int4", "v": "text", "w": "int4"}));
    assert_eq!(relations[1].1, relations[0].1, "the key did not change");
    // The operator never named the new column: it goes on.
    env.wait_rows(
        "select id, v from item_copy order by id",
        json!([{"id": 1, "v": "a2"}, {"id": 2, "v": "b"}]),
    )
    .await;
    assert!(env.running("item_copy").await);
    env.stop().await;
}

#[tokio::test]
async fn drop_column_halts_an_operator_that_reads_it_at_once() {
    let env = Env::start(
        "drop_column",
        "create table items (id int primary key, v text, gone text);
         create table item_copy (id int primary key, gone text);",
        vec![copy_operator("select id, gone", "gone = excluded.gone")],
    )
    .await;
    env.exec("insert into items values (1, 'a', 'x')").await;
    env.wait_rows("select id, gone from item_copy", json!([{"id": 1, "gone": "x"}])).await;
    env.exec("alter table items drop column gone").await;
    env.exec("insert into items values (2, 'b')").await;
    let e = env.events("items", 2).await;
    assert_eq!(e[1].new_record, Some(json!({"id": 2, "v": "b"})));
    assert_eq!(columns(&e[1]), [("id", "int4"), ("v", "text")]);
    assert_eq!(env.relations("items").await.len(), 2);
    // The statement names a column that is gone: halted at the first attempt (the retries
    // would take 50 s), the SQL error and its SQLSTATE as the reason.
    let halted = env.halted("item_copy").await;
    assert_eq!(halted["position"], e[1].position, "{halted}");
    assert_eq!(halted["attempt"], 1, "{halted}");
    let error = halted["error"].as_str().unwrap();
    assert!(error.contains(r#"column "gone" does not exist"#), "{error}");
    assert!(error.contains("SQLSTATE 42703"), "{error}");
    assert!(error.contains("weir resume item_copy"), "{error}");
    // The lane says the same (`weir status`, `GET /v1/consumers`).
    let status = weir::consumer_status::consumer(&env.pool, "item_copy").await.unwrap().unwrap();
    assert_eq!(status.lanes[0].last_error.as_deref(), Some(error));
    // Put the column back, resume: the event is handled.
    env.exec("alter table items add column gone text").await;
    assert!(weir::resume(&env.pool, "item_copy").await.unwrap());
    env.wait_rows(
        "select id, gone from item_copy order by id",
        json!([{"id": 1, "gone": "x"}, {"id": 2, "gone": null}]),
    )
    .await;
    assert!(env.running("item_copy").await);
    env.stop().await;
}

#[tokio::test]
async fn alter_column_type_while_running() {
    let env = Env::start(
        "alter_type",
        "create table items (id int primary key, n int);
         create table item_copy (id int primary key, n numeric);",
        vec![copy_operator("select id, n", "n = excluded.n")],
    )
    .await;
    env.exec("insert into items values (1, 5)").await;
    env.wait_rows("select id, n from item_copy", json!([{"id": 1, "n": 5}])).await;
    // A column's type: the events carry the new type's JSON, the operator goes on.
    env.exec("alter table items alter column n type numeric(10, 2)").await;
    env.exec("insert into items values (2, 1.25)").await;
    let e = env.events("items", 2).await;
    assert_eq!(e[0].new_record, Some(json!({"id": 1, "n": 5})));
    assert_eq!(e[1].new_record, Some(json!({"id": 2, "n": "1.25"})));
    assert_eq!(columns(&e[1]), [("id", "int4"), ("n", "numeric")]);
    env.wait_rows(
        "select id, n from item_copy order by id",
        json!([{"id": 1, "n": 5}, {"id": 2, "n": 1.25}]),
    )
    .await;
    // The key's type: `$1` was prepared as int4 and no longer compares with a text id.
    env.exec("alter table items alter column id type text").await;
    env.exec("insert into items values ('3', 1)").await;
    let e = env.events("items", 3).await;
    assert_eq!(e[2].key, json!({"id": "3"}));
    assert_eq!(columns(&e[2]), [("id", "text"), ("n", "numeric")]);
    let relations = env.relations("items").await;
    assert_eq!(relations.len(), 3, "{relations:?}");
    assert_eq!(relations[2].0, json!({"id": "text", "n": "numeric"}));
    let halted = env.halted("item_copy").await;
    assert_eq!(halted["position"], e[2].position, "{halted}");
    assert_eq!(halted["attempt"], 1, "{halted}");
    let error = halted["error"].as_str().unwrap();
    assert!(error.contains("operator does not exist: text = integer"), "{error}");
    assert!(error.contains("SQLSTATE 42883"), "{error}");
    env.stop().await;
}

#[tokio::test]
async fn a_table_created_later_in_a_watched_schema_is_captured() {
    let env = Env::start("new_table", "create table first (id int primary key);", vec![]).await;
    env.exec("insert into first values (1)").await;
    env.events("first", 1).await;
    // No `weir init` again: the publication is `for tables in schema public`.
    env.exec("create table later (id int primary key, v text)").await;
    env.exec("insert into later values (1, 'a')").await;
    // Created and written in one transaction.
    env.exec(
        "begin; create table at_once (id int primary key); insert into at_once values (7); commit;",
    )
    .await;
    let e = env.events("later", 1).await;
    assert_eq!(e[0].kind, Kind::Insert);
    assert_eq!(e[0].new_record, Some(json!({"id": 1, "v": "a"})));
    assert_eq!(columns(&e[0]), [("id", "int4"), ("v", "text")]);
    assert_eq!(e[0].key, json!({"id": 1}));
    let e = env.events("at_once", 1).await;
    assert_eq!(e[0].new_record, Some(json!({"id": 7})));
    assert_eq!(env.relations("later").await.len(), 1);
    // A table of another schema is not watched.
    env.exec("create schema elsewhere; create table elsewhere.t (id int primary key); insert into elsewhere.t values (1); insert into first values (2);").await;
    env.events("first", 2).await;
    let reader = LogReader::new(env.pool.clone()).await.unwrap();
    let all = reader.read(0, 1000, &EventFilter::default()).await.unwrap();
    assert!(all.iter().all(|e| e.entity != "elsewhere.t"), "{all:#?}");
    env.stop().await;
}

#[tokio::test]
async fn truncate_while_running() {
    let env = Env::start(
        "truncate",
        "create table items (id int primary key, v text);
         create table item_copy (id int primary key, v text);",
        vec![copy_operator("select id, v", "v = excluded.v")],
    )
    .await;
    env.exec("insert into items values (1, 'a'), (2, 'b')").await;
    // The operator reads the table's current rows: let it copy them before they go.
    env.wait_rows(
        "select id, v from item_copy order by id",
        json!([{"id": 1, "v": "a"}, {"id": 2, "v": "b"}]),
    )
    .await;
    env.exec("truncate items").await;
    env.exec("insert into items values (3, 'c')").await;
    let e = env.events("items", 4).await;
    let kinds: Vec<Kind> = e.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [Kind::Insert, Kind::Insert, Kind::Truncate, Kind::Insert]);
    assert_eq!(e[2].new_record, Some(json!({"cascade": false, "restart_identity": false})));
    assert_eq!(e[2].key, json!({}));
    assert_eq!(e[3].new_record, Some(json!({"id": 3, "v": "c"})));
    assert_eq!(columns(&e[3]), [("id", "int4"), ("v", "text")]);
    // The operator does not listen to truncates (its kinds are insert, update, delete): it
    // copies on, untouched by the truncate.
    env.wait_rows(
        "select id, v from item_copy order by id",
        json!([{"id": 1, "v": "a"}, {"id": 2, "v": "b"}, {"id": 3, "v": "c"}]),
    )
    .await;
    assert!(env.running("item_copy").await);
    env.stop().await;
}
