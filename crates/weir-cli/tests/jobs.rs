//! `weir jobs …` end to end on a database, through the weir-cli library: the command line as
//! typed (parsed by [`weir_cli::Cli`]), the configuration from `--database-url`, and the errors
//! as `weir` prints them (`{:#}`).

use clap::Parser;
use sqlx::PgPool;
use weir_testkit::TestDatabase;

/// Runs `weir --database-url <db> jobs <args>` as the binary would, without its process.
async fn jobs(db: &TestDatabase<'_>, args: &[&str]) -> anyhow::Result<()> {
    let url = db.url();
    let argv = ["weir", "--database-url", &url, "jobs"].into_iter().chain(args.iter().copied());
    let cli = weir_cli::Cli::try_parse_from(argv).unwrap();
    let code = weir_cli::run(cli).await?;
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    Ok(())
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

async fn state(pool: &PgPool, id: i64) -> String {
    sqlx::query_scalar("select state::text from weir.all_jobs where id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .unwrap()
        .unwrap_or_else(|| "missing".into())
}

#[tokio::test]
async fn enqueue_list_show_retry_cancel_stats() {
    let db = weir_testkit::shared().database("jobs_cli").expect("test database");
    jobs(
        &db,
        &["enqueue", "mail", r#"{"to": "a@example.com"}"#, "--queue", "q", "--priority", "3"],
    )
    .await
    .unwrap();
    let pool = PgPool::connect(&db.url()).await.unwrap();
    jobs(&db, &["enqueue", "mail", "--in", "1h", "--unique-key", "k", "--timeout", "30s"])
        .await
        .unwrap();
    // A duplicate is reported, not an error.
    jobs(&db, &["enqueue", "mail", "--unique-key", "k"]).await.unwrap();
    assert_eq!(count(&pool, "select count(*) from weir.jobs").await, 2);
    let err = jobs(&db, &["enqueue", "mail", "--priority", "-1"]).await.unwrap_err();
    assert!(format!("{err:#}").contains("--priority must be between 0"), "{err:#}");
    let err = jobs(&db, &["enqueue", "mail", "not json"]).await.unwrap_err();
    assert!(format!("{err:#}").contains("job args are not JSON"), "{err:#}");
    let err = jobs(&db, &["enqueue", "mail", "--timeout", "2d"]).await.unwrap_err();
    assert!(format!("{err:#}").contains("timeout must be between"), "{err:#}");
    let err = jobs(&db, &["list", "--state", "sleeping"]).await.unwrap_err();
    assert!(format!("{err:#}").contains("unknown state"), "{err:#}");

    let id: i64 = sqlx::query_scalar("select id from weir.jobs where queue = 'q'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let id_arg = id.to_string();
    jobs(&db, &["list"]).await.unwrap();
    jobs(&db, &["list", "--state", "available", "--json"]).await.unwrap();
    jobs(&db, &["show", &id_arg]).await.unwrap();
    jobs(&db, &["cancel", &id_arg]).await.unwrap();
    assert_eq!(state(&pool, id).await, "cancelled");
    jobs(&db, &["retry", &id_arg]).await.unwrap();
    assert_eq!(state(&pool, id).await, "available");
    let err = jobs(&db, &["show", "424242"]).await.unwrap_err();
    assert_eq!(format!("{err:#}"), "job 424242 not found");
    jobs(&db, &["stats"]).await.unwrap();
}
