//! `weir streams …` end to end on a database, through the weir-cli library: the command line as
//! typed (parsed by [`weir_cli::Cli`]), appends from flags and from a file, reads as text and
//! JSON lines, delete and truncate, and bad input as `weir` prints it (`{:#}`).

use clap::Parser;
use sqlx::PgPool;
use weir_cli::Command;
use weir_testkit::TestDatabase;

/// Runs `weir --database-url <db> streams <args>` as the binary would and returns what it
/// printed.
async fn streams(db: &TestDatabase<'_>, args: &[&str]) -> anyhow::Result<String> {
    let url = db.url();
    let argv = ["weir", "--database-url", &url, "streams"].into_iter().chain(args.iter().copied());
    let cli = weir_cli::Cli::try_parse_from(argv).unwrap();
    let Command::Streams(cmd) = cli.command else { unreachable!() };
    let mut out = Vec::new();
    weir_cli::streams::run(cmd, PgPool::connect(&url).await?, &mut out).await?;
    Ok(String::from_utf8(out).unwrap())
}

#[tokio::test]
async fn append_read_list_delete_and_bad_input() {
    let db = weir_testkit::shared().database("streams_cli").expect("test database");
    let id = uuid::Uuid::new_v4().to_string();
    let out = streams(
        &db,
        &[
            "append",
            "order-1",
            "--expected",
            "no_stream",
            "--type",
            "placed",
            "--data",
            r#"{"total": 3}"#,
            "--metadata",
            r#"{"user": "ann"}"#,
            "--tag",
            "orders",
            "--id",
            &id,
        ],
    )
    .await
    .unwrap();
    assert!(out.starts_with("appended versions 1..1 to stream order-1"), "{out}");
    // Run again with the same id: nothing appended twice.
    let again = streams(
        &db,
        &[
            "append",
            "order-1",
            "--expected",
            "no_stream",
            "--type",
            "placed",
            "--data",
            "{}",
            "--id",
            &id,
        ],
    )
    .await
    .unwrap();
    assert!(again.contains("nothing appended"), "{again}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.json");
    std::fs::write(
        &file,
        r#"[{"type": "paid", "data": {"by": "card"}}, {"type": "shipped", "data": {}}]"#,
    )
    .unwrap();
    let out =
        streams(&db, &["append", "order-1", "--expected", "1", "--events", file.to_str().unwrap()])
            .await
            .unwrap();
    assert!(out.starts_with("appended versions 2..3"), "{out}");

    let text = streams(&db, &["read", "order-1"]).await.unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.lines().next().unwrap().contains("placed"), "{text}");
    let json =
        streams(&db, &["read", "order-1", "--backward", "--limit", "2", "--json"]).await.unwrap();
    let events: Vec<serde_json::Value> =
        json.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        events.iter().map(|e| e["version"].as_i64().unwrap()).collect::<Vec<_>>(),
        vec![3, 2]
    );
    assert_eq!(events[1]["type"], "paid");
    let list = streams(&db, &["list", "--json"]).await.unwrap();
    let first: serde_json::Value = serde_json::from_str(list.lines().next().unwrap()).unwrap();
    assert_eq!((first["stream"].as_str(), first["version"].as_i64()), (Some("order-1"), Some(3)));
    let out = streams(&db, &["truncate", "order-1", "--before", "3"]).await.unwrap();
    assert!(out.contains("reads from version 3"), "{out}");
    assert_eq!(streams(&db, &["read", "order-1"]).await.unwrap().lines().count(), 1);

    // Bad input: one clear error, nothing stored.
    let err = streams(
        &db,
        &["append", "order-1", "--expected", "sometime", "--type", "t", "--data", "1"],
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("--expected: expected must be any, no_stream"), "{err:#}");
    let err = streams(&db, &["append", "order-1", "--type", "t", "--data", "not json"])
        .await
        .unwrap_err();
    assert!(format!("{err:#}").starts_with("--data is not JSON"), "{err:#}");
    let err = streams(&db, &["append", "order-1", "--expected", "1", "--type", "t", "--data", "1"])
        .await
        .unwrap_err();
    assert_eq!(format!("{err:#}"), "stream `order-1` is at 3, but the append expected 1");
    let pool = PgPool::connect(&db.url()).await.unwrap();
    let stored: i64 = sqlx::query_scalar("select count(*) from weir.stream_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 3);

    let out = streams(&db, &["delete", "order-1"]).await.unwrap();
    assert!(out.contains("starts it again at 4"), "{out}");
    let err = streams(&db, &["read", "order-1"]).await.unwrap_err();
    assert_eq!(format!("{err:#}"), "no stream named `order-1`");
}
