//! The event store's streams against a real PostgreSQL (a private cluster, a database per
//! test): concurrent appends with exact expected versions, idempotent retries, every expected
//! word, every bad input (and that it stores nothing), appends inside a caller's transaction,
//! reads forward and backward with truncation and soft deletion, snapshots, and the SQL
//! function called directly as another language would.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;
use weir_streams::{Direction, Error, Expected, NewEvent, append};

async fn store(prefix: &str) -> (weir_testkit::TestDatabase<'static>, PgPool) {
    let db = weir_testkit::shared().database(prefix).unwrap();
    let pool = PgPool::connect(&db.url()).await.unwrap();
    weir_streams::migrate(&pool).await.unwrap();
    (db, pool)
}

async fn rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from weir.stream_events").fetch_one(pool).await.unwrap()
}

fn ev(t: &str, n: i64) -> NewEvent {
    NewEvent::new(t, json!({ "n": n }))
}

async fn put(
    pool: &PgPool,
    stream: &str,
    expected: Expected,
    events: &[NewEvent],
) -> Result<weir_streams::AppendResult, Error> {
    let mut conn = pool.acquire().await.unwrap();
    append(&mut conn, stream, expected, events).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_exact_appends_have_one_winner_per_version() {
    let (_db, pool) = store("concurrent").await;
    let tasks = 16;
    let attempts = 50;
    let mut set = tokio::task::JoinSet::new();
    for task in 0..tasks {
        let pool = pool.clone();
        set.spawn(async move {
            let mut won = Vec::new();
            for attempt in 0..attempts {
                // Read the version, then append expecting exactly it: a race with the others.
                let version = match weir_streams::stream_info(&pool, "race").await {
                    Ok(info) => info.version,
                    Err(Error::UnknownStream(_)) => 0,
                    Err(e) => panic!("{e}"),
                };
                let event = NewEvent::new("tried", json!({ "task": task, "attempt": attempt }));
                match put(&pool, "race", Expected::Exact(version), &[event]).await {
                    Ok(r) => {
                        assert_eq!(r.versions, vec![version + 1]);
                        won.push(version + 1);
                    }
                    Err(Error::WrongExpectedVersion { expected, actual, .. }) => {
                        assert_eq!(expected, version.to_string());
                        assert_ne!(actual, expected);
                    }
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
            won
        });
    }
    let mut winners: BTreeMap<i64, usize> = BTreeMap::new();
    while let Some(won) = set.join_next().await {
        for v in won.unwrap() {
            *winners.entry(v).or_default() += 1;
        }
    }
    assert!(winners.values().all(|n| *n == 1), "a version won twice: {winners:?}");
    let n = winners.len() as i64;
    assert!(n > 0);
    let versions: Vec<i64> = sqlx::query_scalar(
        "select version from weir.stream_events where stream = 'race' order by version",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(versions, (1..=n).collect::<Vec<_>>(), "versions are 1..N without gaps");
    assert_eq!(winners.keys().copied().collect::<Vec<_>>(), versions);
    let info = weir_streams::stream_info(&pool, "race").await.unwrap();
    assert_eq!(info.version, n);
}

#[tokio::test]
async fn a_retry_with_the_same_ids_stores_nothing_and_answers_the_same_versions() {
    let (_db, pool) = store("idempotent").await;
    put(&pool, "order-1", Expected::NoStream, &[ev("created", 0)]).await.unwrap();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let events = [ev("paid", 1).id(a), ev("shipped", 2).id(b)];
    let first = put(&pool, "order-1", Expected::Exact(1), &events).await.unwrap();
    assert_eq!((first.versions.clone(), first.duplicate), (vec![2, 3], false));
    assert_eq!(first.ids, vec![a, b]);
    assert_eq!((first.first(), first.last()), (2, 3));
    // The retry's expected version is stale (1, the stream is at 3): it still succeeds.
    let retry = put(&pool, "order-1", Expected::Exact(1), &events).await.unwrap();
    assert_eq!(retry.versions, vec![2, 3]);
    assert_eq!(retry.ids, vec![a, b]);
    assert!(retry.duplicate);
    assert_eq!(rows(&pool).await, 3);

    // Partial overlap: one stored id, one new.
    let err =
        put(&pool, "order-1", Expected::Any, &[ev("paid", 1).id(a), ev("x", 3)]).await.unwrap_err();
    let Error::EventIdConflict(m) = &err else { panic!("{err:?}") };
    assert!(m.contains(&a.to_string()), "{m}");
    // The same ids in another order.
    let err = put(&pool, "order-1", Expected::Any, &[ev("s", 2).id(b), ev("p", 1).id(a)])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::EventIdConflict(_)), "{err:?}");
    // The same ids in another stream.
    let err = put(&pool, "order-2", Expected::Any, &events).await.unwrap_err();
    let Error::EventIdConflict(m) = &err else { panic!("{err:?}") };
    assert!(m.contains("order-1"), "{m}");
    assert_eq!(rows(&pool).await, 3);
    // The failed append to order-2 left no stream behind.
    assert!(matches!(
        weir_streams::stream_info(&pool, "order-2").await,
        Err(Error::UnknownStream(_))
    ));
}

#[tokio::test]
async fn each_expected_word() {
    let (_db, pool) = store("expected").await;
    let wrong = |r: Result<weir_streams::AppendResult, Error>| match r {
        Err(Error::WrongExpectedVersion { stream, expected, actual }) => (stream, expected, actual),
        other => panic!("expected a wrong expected version, got {other:?}"),
    };
    let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(
        wrong(put(&pool, "s", Expected::StreamExists, &[ev("e", 1)]).await),
        s("s", "stream_exists", "no_stream")
    );
    assert_eq!(
        wrong(put(&pool, "s", Expected::Exact(1), &[ev("e", 1)]).await),
        s("s", "1", "no_stream")
    );
    let r = put(&pool, "s", Expected::Exact(0), &[ev("e", 1)]).await.unwrap();
    assert_eq!(r.versions, vec![1]);
    assert_eq!(
        wrong(put(&pool, "s", Expected::NoStream, &[ev("e", 2)]).await),
        s("s", "no_stream", "1")
    );
    let r = put(&pool, "s", Expected::StreamExists, &[ev("e", 2), ev("e", 3)]).await.unwrap();
    assert_eq!(r.versions, vec![2, 3]);
    let r = put(&pool, "s", Expected::Any, &[ev("e", 4)]).await.unwrap();
    assert_eq!(r.versions, vec![4]);
    assert_eq!(wrong(put(&pool, "s", Expected::Exact(3), &[ev("e", 5)]).await), s("s", "3", "4"));
    let r = put(&pool, "s", Expected::Exact(4), &[ev("e", 5)]).await.unwrap();
    assert_eq!(r.versions, vec![5]);
    let r = put(&pool, "t", Expected::NoStream, &[ev("e", 1)]).await.unwrap();
    assert_eq!(r.versions, vec![1]);
    let r = put(&pool, "u", Expected::Any, &[ev("e", 1)]).await.unwrap();
    assert_eq!(r.versions, vec![1]);
    // The message names both versions.
    let err = put(&pool, "s", Expected::Exact(2), &[ev("e", 6)]).await.unwrap_err();
    assert_eq!(err.to_string(), "stream `s` is at 5, but the append expected 2");
    assert_eq!(rows(&pool).await, 7);
}

#[tokio::test]
async fn bad_input_is_refused_and_stores_nothing() {
    let (_db, pool) = store("invalid").await;
    // Through the Rust API (checked before the database and by it).
    let cases: Vec<(&str, Vec<NewEvent>, &str)> = vec![
        ("s", vec![], "events is empty"),
        ("", vec![ev("e", 1)], "stream name must be 1 to 256"),
        ("s", vec![ev("", 1)], "needs a type"),
        ("s", vec![NewEvent::new("e", serde_json::Value::Null)], "has no data"),
        ("s", vec![ev("e", 1).metadata(json!([1]))], "metadata must be a JSON object"),
        ("s", vec![ev("e", 1).tag("")], "tags must be"),
    ];
    for (stream, events, want) in cases {
        match put(&pool, stream, Expected::Any, &events).await {
            Err(Error::Invalid(m)) => assert!(m.contains(want), "{m:?} should say {want:?}"),
            other => panic!("{stream:?} {events:?}: {other:?}"),
        }
    }
    // Straight to the SQL function, as another language would call it: its own checks.
    let raw: Vec<(&str, &str, serde_json::Value, &str)> = vec![
        ("s", "any", json!([]), "events is empty"),
        ("s", "any", json!({"type": "e", "data": 1}), "events must be a JSON array"),
        ("s", "any", json!([{"data": 1}]), "event 1 needs a type"),
        ("s", "any", json!([{"type": "", "data": 1}]), "event 1 needs a type"),
        ("s", "any", json!([{"type": 5, "data": 1}]), "event 1 needs a type"),
        (
            "s",
            "any",
            json!([{"type": "a", "data": 1}, {"type": "b"}]),
            "event 2 (type 'b') has no data",
        ),
        (
            "s",
            "any",
            json!([{"type": "e", "data": 1, "metadata": "x"}]),
            "metadata must be a JSON object",
        ),
        ("s", "any", json!([{"type": "e", "data": 1, "tags": "x"}]), "tags must be an array"),
        ("s", "any", json!([{"type": "e", "data": 1, "tags": [1]}]), "tags must be an array"),
        ("s", "any", json!([{"type": "e", "data": 1, "id": "nope"}]), "id must be a UUID"),
        ("s", "any", json!([{"type": "e", "data": 1, "typo": 1}]), "unknown field 'typo'"),
        ("s", "any", json!([1]), "event 1 is a JSON number"),
        ("", "any", json!([{"type": "e", "data": 1}]), "stream name must be 1 to 256"),
        ("s", "sometimes", json!([{"type": "e", "data": 1}]), "expected must be any, no_stream"),
        ("s", "-1", json!([{"type": "e", "data": 1}]), "expected must be any, no_stream"),
    ];
    let id = Uuid::new_v4();
    let twice = json!([{"type": "e", "data": 1, "id": id}, {"type": "e", "data": 2, "id": id}]);
    for (stream, expected, events, want) in
        raw.into_iter().chain([("s", "any", twice, "repeats the id")])
    {
        let err = sqlx::query("select * from weir.append($1, $2, $3)")
            .bind(stream)
            .bind(expected)
            .bind(&events)
            .execute(&pool)
            .await
            .unwrap_err();
        let db = err.as_database_error().unwrap();
        assert_eq!(db.code().as_deref(), Some("WR400"), "{events}: {err}");
        assert!(db.message().contains(want), "{events}: {:?} should say {want:?}", db.message());
    }
    assert_eq!(rows(&pool).await, 0);
    let streams: i64 =
        sqlx::query_scalar("select count(*) from weir.streams").fetch_one(&pool).await.unwrap();
    assert_eq!(streams, 0, "a refused append leaves no stream row behind");
}

#[tokio::test]
async fn the_sql_function_from_any_language() {
    let (_db, pool) = store("sql").await;
    // `expected` as text or as a number; ids given or made; metadata and tags stored.
    let id = Uuid::new_v4();
    let stored: Vec<(Uuid, i64, bool)> = sqlx::query_as(
        "select * from weir.append('cart-1', 'no_stream',
            jsonb_build_array(jsonb_build_object('id', $1::uuid, 'type', 'added', 'data', '{\"sku\": 1}'::jsonb,
                                                 'metadata', '{\"user\": \"ann\"}'::jsonb, 'tags', '[\"cart\"]'::jsonb),
                              '{\"type\": \"added\", \"data\": {\"sku\": 2}}'::jsonb))",
    )
    .bind(id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0], (id, 1, false));
    assert_eq!((stored[1].1, stored[1].2), (2, false));
    let stored: Vec<(Uuid, i64, bool)> = sqlx::query_as(
        "select * from weir.append('cart-1', 2, '[{\"type\": \"checked_out\", \"data\": {}}]')",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(stored[0].1, 3);
    let err =
        sqlx::query("select * from weir.append('cart-1', 1, '[{\"type\": \"x\", \"data\": {}}]')")
            .execute(&pool)
            .await
            .unwrap_err();
    let db = err.as_database_error().unwrap();
    assert_eq!(db.code().as_deref(), Some("WR409"));
    let events =
        weir_streams::read_stream(&pool, "cart-1", None, Direction::Forward, 10).await.unwrap();
    assert_eq!(events[0].metadata, json!({"user": "ann"}));
    assert_eq!(events[0].tags, vec!["cart".to_string()]);
    assert_eq!(events[1].metadata, json!({}));
    assert!(events[1].tags.is_empty());
}

#[tokio::test]
async fn an_append_in_a_rolled_back_transaction_stores_nothing() {
    let (_db, pool) = store("tx").await;
    sqlx::raw_sql("create table orders (id int primary key)").execute(&pool).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("insert into orders values (1)").execute(&mut *tx).await.unwrap();
    let r = append(&mut tx, "order-1", Expected::NoStream, &[ev("placed", 1)]).await.unwrap();
    assert_eq!(r.versions, vec![1]);
    tx.rollback().await.unwrap();
    assert_eq!(rows(&pool).await, 0);
    assert!(matches!(
        weir_streams::stream_info(&pool, "order-1").await,
        Err(Error::UnknownStream(_))
    ));
    // Committed: both the row and the event, and the version starts at 1 again.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("insert into orders values (1)").execute(&mut *tx).await.unwrap();
    let r = append(&mut tx, "order-1", Expected::NoStream, &[ev("placed", 1)]).await.unwrap();
    assert_eq!(r.versions, vec![1]);
    tx.commit().await.unwrap();
    assert_eq!(rows(&pool).await, 1);
}

#[tokio::test]
async fn reads_forward_backward_truncated_and_deleted() {
    let (_db, pool) = store("reads").await;
    let events: Vec<NewEvent> = (1..=10).map(|n| ev("counted", n)).collect();
    put(&pool, "count", Expected::NoStream, &events).await.unwrap();
    put(&pool, "other", Expected::NoStream, &[ev("x", 1)]).await.unwrap();
    let versions =
        |es: Vec<weir_streams::RecordedEvent>| es.iter().map(|e| e.version).collect::<Vec<_>>();
    let read = |from, dir, limit| weir_streams::read_stream(&pool, "count", from, dir, limit);
    assert_eq!(
        versions(read(None, Direction::Forward, 100).await.unwrap()),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(versions(read(Some(4), Direction::Forward, 3).await.unwrap()), vec![4, 5, 6]);
    assert_eq!(versions(read(None, Direction::Backward, 3).await.unwrap()), vec![10, 9, 8]);
    assert_eq!(versions(read(Some(2), Direction::Backward, 5).await.unwrap()), vec![2, 1]);
    let first = &read(None, Direction::Forward, 1).await.unwrap()[0];
    assert_eq!(
        (first.event_type.as_str(), &first.data, first.position),
        ("counted", &json!({"n": 1}), None)
    );
    assert!(matches!(read(None, Direction::Forward, 0).await, Err(Error::Invalid(_))));
    assert!(matches!(
        weir_streams::read_stream(&pool, "nope", None, Direction::Forward, 10).await,
        Err(Error::UnknownStream(_))
    ));

    // Truncation hides older versions from both directions; nothing is deleted.
    let info = weir_streams::truncate_stream(&pool, "count", 8).await.unwrap();
    assert_eq!(info.truncate_before, 8);
    assert_eq!(versions(read(None, Direction::Forward, 100).await.unwrap()), vec![8, 9, 10]);
    assert_eq!(versions(read(Some(2), Direction::Forward, 100).await.unwrap()), vec![8, 9, 10]);
    assert_eq!(versions(read(Some(9), Direction::Backward, 100).await.unwrap()), vec![9, 8]);
    // An earlier truncation point does not bring events back; past the end is refused.
    assert_eq!(weir_streams::truncate_stream(&pool, "count", 3).await.unwrap().truncate_before, 8);
    assert!(matches!(
        weir_streams::truncate_stream(&pool, "count", 12).await,
        Err(Error::Invalid(_))
    ));
    assert_eq!(rows(&pool).await, 11);

    // Listing.
    let list = weir_streams::list_streams(&pool, None, 10, None).await.unwrap();
    assert_eq!(list.iter().map(|s| s.stream.as_str()).collect::<Vec<_>>(), vec!["count", "other"]);
    let list = weir_streams::list_streams(&pool, Some("ot"), 10, None).await.unwrap();
    assert_eq!(
        list.iter().map(|s| (s.stream.as_str(), s.version)).collect::<Vec<_>>(),
        vec![("other", 1)]
    );
    let list = weir_streams::list_streams(&pool, None, 10, Some("count")).await.unwrap();
    assert_eq!(list.len(), 1);

    // Soft delete: reads say unknown; stream_exists is refused; any continues after 10.
    let deleted = weir_streams::delete_stream(&pool, "count").await.unwrap();
    assert!(deleted.deleted_at.is_some());
    assert!(matches!(read(None, Direction::Forward, 10).await, Err(Error::UnknownStream(_))));
    assert!(matches!(
        weir_streams::delete_stream(&pool, "count").await,
        Err(Error::UnknownStream(_))
    ));
    let err = put(&pool, "count", Expected::StreamExists, &[ev("again", 1)]).await.unwrap_err();
    assert!(matches!(&err, Error::Invalid(m) if m.contains("was deleted")), "{err:?}");
    let err = put(&pool, "count", Expected::Exact(10), &[ev("again", 1)]).await.unwrap_err();
    assert!(
        matches!(&err, Error::WrongExpectedVersion { actual, .. } if actual == "no_stream"),
        "{err:?}"
    );
    let again = put(&pool, "count", Expected::NoStream, &[ev("again", 1)]).await.unwrap();
    assert_eq!(again.versions, vec![11]);
    assert_eq!(versions(read(None, Direction::Forward, 100).await.unwrap()), vec![11]);
    let info = weir_streams::stream_info(&pool, "count").await.unwrap();
    assert_eq!((info.version, info.deleted_at, info.truncate_before), (11, None, 11));
    assert_eq!(rows(&pool).await, 12, "nothing was physically deleted");
}

#[tokio::test]
async fn snapshots_keep_the_latest() {
    let (_db, pool) = store("snapshots").await;
    let events: Vec<NewEvent> = (1..=5).map(|n| ev("added", n)).collect();
    put(&pool, "sum", Expected::NoStream, &events).await.unwrap();
    assert_eq!(weir_streams::load_snapshot(&pool, "sum").await.unwrap(), None);
    weir_streams::save_snapshot(&pool, "sum", 3, &json!({"sum": 6})).await.unwrap();
    weir_streams::save_snapshot(&pool, "sum", 5, &json!({"sum": 15})).await.unwrap();
    let latest = weir_streams::load_snapshot(&pool, "sum").await.unwrap().unwrap();
    assert_eq!((latest.version, latest.data), (5, json!({"sum": 15})));
    assert!(matches!(
        weir_streams::save_snapshot(&pool, "sum", 6, &json!({})).await,
        Err(Error::Invalid(m)) if m.contains("from 1 to 5")
    ));
    assert!(matches!(
        weir_streams::save_snapshot(&pool, "none", 1, &json!({})).await,
        Err(Error::UnknownStream(_))
    ));
    // Folding from the snapshot: the events after it.
    let rest =
        weir_streams::read_stream(&pool, "sum", Some(latest.version + 1), Direction::Forward, 100)
            .await
            .unwrap();
    assert!(rest.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_of_one_append_store_it_once() {
    let (_db, pool) = store("retries").await;
    let events: Arc<Vec<NewEvent>> =
        Arc::new((1..=3).map(|n| ev("e", n).id(Uuid::new_v4())).collect());
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (pool, events) = (pool.clone(), events.clone());
        set.spawn(async move { put(&pool, "once", Expected::NoStream, &events).await.unwrap() });
    }
    let mut fresh = 0;
    while let Some(r) = set.join_next().await {
        let r = r.unwrap();
        assert_eq!(r.versions, vec![1, 2, 3]);
        fresh += usize::from(!r.duplicate);
    }
    assert_eq!(fresh, 1, "exactly one append stored the events");
    assert_eq!(rows(&pool).await, 3);
}
