//! `weir subscriptions …` end to end on a database, through the weir-cli library: the command
//! line as typed (parsed by [`weir_cli::Cli`]), the configuration from `--database-url`, and the
//! errors as `weir` prints them (`{:#}`). Nothing runs the engine here: the commands only keep
//! the definitions, which the database shows.

use clap::Parser;
use sqlx::PgPool;
use weir_testkit::TestDatabase;

/// Runs `weir --database-url <db> subscriptions <args>` as the binary would.
async fn subs(db: &TestDatabase<'_>, args: &[&str]) -> anyhow::Result<()> {
    let url = db.url();
    let argv =
        ["weir", "--database-url", &url, "subscriptions"].into_iter().chain(args.iter().copied());
    let cli = weir_cli::Cli::try_parse_from(argv).unwrap();
    let code = weir_cli::run(cli).await?;
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    Ok(())
}

async fn row(pool: &PgPool, name: &str) -> Option<(String, serde_json::Value, i32, String)> {
    sqlx::query_as(
        "select s.type, s.selector, k.lanes, k.state::text
         from weir.subscriptions s join weir.consumers k on k.name = s.name where s.name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn create_list_show_update_stop_start_delete() {
    let db = weir_testkit::shared().database("subs_cli").expect("test database");
    subs(
        &db,
        &["create", "orders", "--type", "stream", "--selector", "order-*", "--pool-size", "2"],
    )
    .await
    .unwrap();
    subs(
        &db,
        &[
            "create",
            "vips",
            "--type",
            "tags",
            "--selector",
            r#"{"any": ["vip"]}"#,
            "--start-from",
            "now",
            "--on-exhausted",
            "park",
            "--partition-by",
            "customer.id",
        ],
    )
    .await
    .unwrap();
    let pool = PgPool::connect(&db.url()).await.unwrap();
    let (kind, selector, lanes, state) = row(&pool, "orders").await.unwrap();
    assert_eq!((kind.as_str(), lanes, state.as_str()), ("stream", 2, "running"));
    assert_eq!(selector, "order-*");
    let (kind, selector, _, _) = row(&pool, "vips").await.unwrap();
    assert_eq!(kind, "tags");
    assert_eq!(selector, serde_json::json!({"any": ["vip"]}), "JSON selectors are JSON");
    let options: serde_json::Value =
        sqlx::query_scalar("select options from weir.subscriptions where name = 'vips'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(options, serde_json::json!({"on_exhausted": "park", "partition_by": "customer.id"}));

    subs(&db, &["list"]).await.unwrap();
    subs(&db, &["list", "--json"]).await.unwrap();
    subs(&db, &["show", "orders"]).await.unwrap();
    subs(&db, &["show", "orders", "--json"]).await.unwrap();

    subs(&db, &["update", "orders", "--selector", "order-1*"]).await.unwrap();
    let (_, selector, _, _) = row(&pool, "orders").await.unwrap();
    assert_eq!(selector, "order-1*");
    subs(&db, &["update", "orders", "--pool-size", "4"]).await.unwrap();
    let next: Option<i32> =
        sqlx::query_scalar("select next_lanes from weir.consumers where name = 'orders'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(next, Some(4), "a re-split is pending until an engine completes it");

    subs(&db, &["stop", "orders"]).await.unwrap();
    assert_eq!(row(&pool, "orders").await.unwrap().3, "stopped");
    subs(&db, &["start", "orders"]).await.unwrap();
    assert_eq!(row(&pool, "orders").await.unwrap().3, "running");
    subs(&db, &["delete", "orders"]).await.unwrap();
    assert!(row(&pool, "orders").await.is_none());

    // Bad input: one clear line, nothing stored.
    let cases: &[(&[&str], &str)] = &[
        (
            &["create", "x", "--type", "streams", "--selector", "a"],
            "`streams` is not a subscription type",
        ),
        (
            &["create", "x", "--type", "event_pattern", "--selector", "a.[b]"],
            "`[` is not supported",
        ),
        (
            &["create", "x", "--type", "stream", "--selector", "a", "--pool-size", "0"],
            "pool_size 0 is out of range",
        ),
        (
            &["create", "x", "--type", "stream", "--selector", "a", "--start-from", "soon"],
            "start_from `soon`",
        ),
        (
            &["create", "x", "--type", "stream", "--selector", "a", "--on-exhausted", "retry"],
            "--on-exhausted `retry`: use halt, skip or park",
        ),
        (
            &["create", "vips", "--type", "stream", "--selector", "a"],
            "a subscription named `vips` exists already",
        ),
        (&["show", "nope"], "no subscription named `nope`"),
        (&["stop", "nope"], "no subscription named `nope`"),
        (&["update", "vips"], "nothing to change"),
    ];
    for (args, message) in cases {
        let err = subs(&db, args).await.unwrap_err();
        let line = format!("{err:#}");
        assert!(line.contains(message), "{args:?}: `{line}` should say `{message}`");
        assert!(!line.contains('\n'), "{args:?}: one line, got `{line}`");
    }
    let n: i64 = sqlx::query_scalar("select count(*) from weir.subscriptions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1, "only vips");
}
