//! `weir jobs …` end to end on a database.

use clap::Parser;

use crate::cli_jobs::{JobsCommand, run};
use crate::common::*;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: JobsCommand,
}

fn parse(args: &[&str]) -> JobsCommand {
    Cli::try_parse_from(std::iter::once("jobs").chain(args.iter().copied())).unwrap().cmd
}

#[tokio::test]
async fn enqueue_list_show_retry_cancel_stats() {
    let env = setup("jobs_cli").await;
    let cmd = |args: &[&str]| run(parse(args), env.pool.clone());
    cmd(&["enqueue", "mail", r#"{"to": "a@example.com"}"#, "--queue", "q", "--priority", "3"])
        .await
        .unwrap();
    cmd(&["enqueue", "mail", "--in", "1h", "--unique-key", "k", "--timeout", "30s"]).await.unwrap();
    // A duplicate is reported, not an error.
    cmd(&["enqueue", "mail", "--unique-key", "k"]).await.unwrap();
    assert_eq!(count(&env.pool, "select count(*) from weir.jobs").await, 2);
    let err = cmd(&["enqueue", "mail", "--priority", "-1"]).await.unwrap_err();
    assert!(format!("{err:#}").contains("--priority must be between 0"), "{err:#}");
    let err = cmd(&["enqueue", "mail", "not json"]).await.unwrap_err();
    assert!(format!("{err:#}").contains("job args are not JSON"), "{err:#}");
    let err = cmd(&["enqueue", "mail", "--timeout", "2d"]).await.unwrap_err();
    assert!(format!("{err:#}").contains("timeout must be between"), "{err:#}");
    let err = cmd(&["list", "--state", "sleeping"]).await.unwrap_err();
    assert!(format!("{err:#}").contains("unknown state"), "{err:#}");

    let id: i64 = sqlx::query_scalar("select id from weir.jobs where queue = 'q'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    cmd(&["list"]).await.unwrap();
    cmd(&["list", "--state", "available", "--json"]).await.unwrap();
    cmd(&["show", &id.to_string()]).await.unwrap();
    cmd(&["cancel", &id.to_string()]).await.unwrap();
    assert_eq!(state(&env.pool, weir_jobs::JobId(id)).await, "cancelled");
    cmd(&["retry", &id.to_string()]).await.unwrap();
    assert_eq!(state(&env.pool, weir_jobs::JobId(id)).await, "available");
    let err = cmd(&["show", "424242"]).await.unwrap_err();
    assert_eq!(format!("{err:#}"), "job 424242 not found");
    cmd(&["stats"]).await.unwrap();
}
