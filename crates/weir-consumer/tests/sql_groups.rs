//! A SQL operator's group in one call: `SqlOperator::handle_group` runs the statement for every
//! event of a lane's group through one PL/pgSQL function (`weir.sql_operator_<hash>`), with the
//! same effects, in the same order, as one statement per event — and falls back to one
//! statement per event where the function cannot be made or fails as a statement would not.
//! Real tables in a database of the shared test cluster; the operator is called directly inside
//! a transaction, as a lane calls it.

use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};
use weir_consumer::{Operator, SqlOperator};
use weir_core::{Event, Kind, Lsn, OperatorConfig, Source};

const SCHEMA: &str = "
    create table posts (id int primary key, title text not null);
    create table comments (id int primary key, post_id int, body text);
    create table post_with_comments_counts (id int primary key, title text not null, comments_count int not null);
    create table touched (seq bigserial primary key, id int);";

const COUNTS: &str = "
    insert into post_with_comments_counts (id, title, comments_count)
    select p.id, p.title, (select count(*) from comments c where c.post_id = p.id)
    from posts p where p.id = $1
    on conflict (id) do update set title = excluded.title, comments_count = excluded.comments_count;";

async fn database(db: &weir_testkit::TestDatabase<'_>) -> PgPool {
    let pool = PgPool::connect(&db.url()).await.unwrap();
    weir_log::migrate(&pool).await.unwrap();
    weir_consumer::migrate(&pool).await.unwrap();
    sqlx::raw_sql(SCHEMA).execute(&pool).await.unwrap();
    pool
}

fn config(name: &str, entities: &[&str], sql: &str) -> OperatorConfig {
    let mut c: OperatorConfig = serde_json::from_value(json!({
        "name": name,
        "entities": entities,
        "sql": sql,
    }))
    .unwrap();
    if entities.contains(&"comments") {
        c.key.insert("comments".into(), "post_id".into());
    }
    c
}

fn event(position: i64, kind: Kind, entity: &str, row: Value) -> Event {
    let (new_record, old_record) = match kind {
        Kind::Delete => (None, Some(row.clone())),
        _ => (Some(row.clone()), None),
    };
    Event {
        position,
        lsn: Lsn(position as u64 * 100),
        xid: 1,
        commit_ts: chrono::Utc::now(),
        kind,
        entity: entity.into(),
        source: Source::default(),
        key: json!({ "id": row["id"] }),
        new_record,
        old_record,
        changes: None,
        unchanged_toast: Vec::new(),
    }
}

/// Runs `events` as one group in one transaction, with function calls counted; answers how
/// many times a group function ran.
async fn run_group(pool: &PgPool, op: &SqlOperator, events: &[Event]) -> Result<i64, String> {
    let mut conn = pool.acquire().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("set local track_functions = 'all'").execute(&mut *tx).await.unwrap();
    let refs: Vec<&Event> = events.iter().collect();
    op.handle_group(&mut tx, &refs).await.map_err(|e| e.to_string())?;
    let calls = group_calls(&mut tx).await;
    tx.commit().await.unwrap();
    Ok(calls)
}

async fn group_calls(conn: &mut PgConnection) -> i64 {
    sqlx::query_scalar(
        "select coalesce(sum(pg_stat_get_xact_function_calls(p.oid)), 0)::bigint
         from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname = 'weir' and p.proname like 'sql_operator\\_%'",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

async fn functions(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname = 'weir' and p.proname like 'sql_operator\\_%'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn counts(pool: &PgPool) -> Vec<(i32, String, i32)> {
    sqlx::query_as("select id, title, comments_count from post_with_comments_counts order by id")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_group_runs_in_one_call_with_the_effects_of_one_statement_per_event() {
    let db = weir_testkit::shared().database("sql_groups").unwrap();
    let pool = database(&db).await;
    let mut c = config("counts", &["posts", "comments"], COUNTS);
    c.delete_with = vec!["posts".into()];
    c.target = Some("post_with_comments_counts".into());
    let op = SqlOperator::prepare(&pool, &c).await.unwrap();
    assert_eq!(functions(&pool).await, 1, "prepare made the group function");

    // The source rows as they are after the group's changes; the events in log order.
    sqlx::raw_sql(
        "insert into posts values (1, 'one'), (2, 'two renamed');
         insert into comments values (10, 1, 'a'), (11, 1, 'b'), (12, 2, 'c');",
    )
    .execute(&pool)
    .await
    .unwrap();
    let events = [
        event(1, Kind::Insert, "posts", json!({"id": 1, "title": "one"})),
        event(2, Kind::Insert, "posts", json!({"id": 2, "title": "two"})),
        event(3, Kind::Insert, "posts", json!({"id": 3, "title": "three"})),
        event(4, Kind::Insert, "comments", json!({"id": 10, "post_id": 1, "body": "a"})),
        event(5, Kind::Insert, "comments", json!({"id": 11, "post_id": 1, "body": "b"})),
        event(6, Kind::Insert, "comments", json!({"id": 12, "post_id": 2, "body": "c"})),
        event(7, Kind::Update, "posts", json!({"id": 2, "title": "two renamed"})),
        // Post 3 is gone: `delete_with` deletes its row, which its insert made earlier in
        // this very group — so the order inside the call matters.
        event(8, Kind::Delete, "posts", json!({"id": 3})),
    ];
    assert_eq!(run_group(&pool, &op, &events).await, Ok(1), "one call for eight events");
    assert_eq!(
        counts(&pool).await,
        vec![(1, "one".into(), 2), (2, "two renamed".into(), 1)],
        "what eight statements would have left"
    );

    // A key of the wrong type fails the group (the engine then runs its events one by one,
    // where the failing event gets its own clear error).
    let bad = [
        event(9, Kind::Insert, "posts", json!({"id": 1, "title": "one"})),
        event(10, Kind::Insert, "posts", json!({"id": "x", "title": "?"})),
    ];
    let err = run_group(&pool, &op, &bad).await.unwrap_err();
    assert!(err.contains("integer"), "{err}");
}

#[tokio::test]
async fn statements_that_return_rows_run_in_a_group_and_differing_statements_never_mix() {
    let db = weir_testkit::shared().database("sql_groups").unwrap();
    let pool = database(&db).await;
    // Returns rows: PL/pgSQL would refuse it as a bare statement.
    let returning = SqlOperator::prepare(
        &pool,
        &config("touch", &["posts"], "insert into touched (id) values ($1) returning seq"),
    )
    .await
    .unwrap();
    // The same operator name with another statement (a rolling deploy): its own function.
    let doubled = SqlOperator::prepare(
        &pool,
        &config("touch", &["posts"], "insert into touched (id) values ($1 * 100); -- times 100"),
    )
    .await
    .unwrap();
    assert_eq!(functions(&pool).await, 2);
    let events: Vec<Event> =
        (1..=3).map(|i| event(i, Kind::Insert, "posts", json!({"id": i, "title": "t"}))).collect();
    assert_eq!(run_group(&pool, &returning, &events).await, Ok(1));
    assert_eq!(run_group(&pool, &doubled, &events).await, Ok(1));
    let touched: Vec<i32> =
        sqlx::query_scalar("select id from touched order by seq").fetch_all(&pool).await.unwrap();
    assert_eq!(touched, vec![1, 2, 3, 100, 200, 300]);

    // Preparing the same statement again (a second process) reuses the function.
    SqlOperator::prepare(
        &pool,
        &config("touch", &["posts"], "insert into touched (id) values ($1) returning seq"),
    )
    .await
    .unwrap();
    assert_eq!(functions(&pool).await, 2);
}

#[tokio::test]
async fn without_a_working_function_each_event_runs_its_own_statement() {
    let db = weir_testkit::shared().database("sql_groups").unwrap();
    let pool = database(&db).await;
    let events: Vec<Event> =
        (1..=2).map(|i| event(i, Kind::Insert, "posts", json!({"id": i, "title": "t"}))).collect();

    // `select … into` creates a table at top level but names variables in PL/pgSQL: the
    // function is refused at start-up, and the operator runs plain statements.
    let into = SqlOperator::prepare(
        &pool,
        &config("into", &["posts"], "select $1::int as id into table made_by_select_into"),
    )
    .await
    .unwrap();
    assert_eq!(functions(&pool).await, 0);
    assert_eq!(run_group(&pool, &into, &events[..1]).await, Ok(0));
    let made: i64 = sqlx::query_scalar("select count(*) from made_by_select_into")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(made, 1);

    // A function that fails as a statement would not (here: replaced behind weir's back)
    // fails its group once; from then on the operator runs one statement per event.
    let touch = SqlOperator::prepare(
        &pool,
        &config("touch", &["posts"], "insert into touched (id) values ($1)"),
    )
    .await
    .unwrap();
    let name: String = sqlx::query_scalar(
        "select p.oid::regproc::text from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname = 'weir' and p.proname like 'sql_operator\\_%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create or replace function {name}(int4, int4, text[], boolean[]) returns void
         language plpgsql as $$ begin raise exception 'broken' using errcode = '42601'; end $$"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let err = run_group(&pool, &touch, &events).await.unwrap_err();
    assert!(err.contains("broken"), "{err}");
    assert_eq!(run_group(&pool, &touch, &events).await, Ok(0), "no call of the function");
    let touched: Vec<i32> =
        sqlx::query_scalar("select id from touched order by seq").fetch_all(&pool).await.unwrap();
    assert_eq!(touched, vec![1, 2]);
}
