//! The job queue's figures at `/metrics`: an embedded `Weir` with a worker runs jobs of queue
//! `mail`, and `GET /metrics` over real HTTP shows that queue's queued, running, completed,
//! failed and discarded figures and its wait histogram (this binary has the process's only
//! recorder, so the values are exact).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use weir::Config;
use weir_core::{QueueConfig, Secret};
use weir_jobs::{Job, JobArgs, JobContext, JobError, Worker};
use weir_server::Server;

#[derive(Serialize, Deserialize)]
struct Send {
    fail: bool,
}

impl JobArgs for Send {
    const KIND: &'static str = "send";
}

struct Mailer;

impl Worker for Mailer {
    type Args = Send;

    async fn work(&self, _ctx: JobContext, args: Send) -> Result<(), JobError> {
        if args.fail { Err(JobError::retry("the mail server said no")) } else { Ok(()) }
    }
}

/// The value of the sample `line_start` (name and labels) in Prometheus text, if present.
fn sample(text: &str, line_start: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(line_start).and_then(|v| v.trim().parse::<f64>().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_runner_shows_its_queue_at_metrics() {
    let db = weir_testkit::shared().database("jobs_metrics").unwrap();
    let pool = PgPool::connect(&db.url()).await.unwrap();
    let mut config = Config::default();
    config.database.url = Some(Secret::new(db.url()));
    config.jobs.queues = vec![QueueConfig::new("mail", 2)];
    config.jobs.poll_interval = Duration::from_millis(200);
    config.jobs.heartbeat_interval = Duration::from_millis(100);
    config.jobs.rescue_after = Duration::from_millis(600);
    config.jobs.sweep_interval = Duration::from_millis(100);
    let running = weir::Weir::builder(config.clone())
        .pool(pool.clone())
        .without_ingestion()
        .worker(Mailer)
        .start()
        .await
        .unwrap();
    let cancel = running.cancel_token();
    let server = Server::start(pool.clone(), config, running.wake(), cancel.clone()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let serve_cancel = cancel.clone();
    tokio::spawn(async move { server.serve(listener, serve_cancel).await.unwrap() });

    // Two that complete, one whose only attempt fails (so it is discarded), and one for a kind
    // nobody works, which stays queued.
    {
        let mut conn = pool.acquire().await.unwrap();
        for fail in [false, false, true] {
            let job = Job::new(&Send { fail }).unwrap().queue("mail").max_attempts(1);
            weir_jobs::enqueue(&mut conn, &job).await.unwrap();
        }
        let orphan = Job::raw("nobody_works_this", serde_json::json!({})).queue("mail");
        weir_jobs::enqueue(&mut conn, &orphan).await.unwrap();
    }

    let url = format!("{base}/metrics");
    let metrics = || async { reqwest::get(&url).await.unwrap().text().await.unwrap() };
    weir_testkit::eventually(
        "/metrics shows the mail queue's jobs",
        Duration::from_secs(20),
        || async {
            let text = metrics().await;
            sample(&text, r#"weir_jobs_completed_total{queue="mail"}"#) == Some(2.0)
                && sample(&text, r#"weir_jobs_discarded_total{queue="mail"}"#) == Some(1.0)
                && sample(&text, r#"weir_jobs_queued{queue="mail"}"#) == Some(1.0)
                && sample(&text, r#"weir_jobs_running{queue="mail"}"#) == Some(0.0)
        },
    )
    .await;
    let text = metrics().await;
    assert_eq!(sample(&text, r#"weir_jobs_failed_total{queue="mail"}"#), Some(1.0), "{text}");
    assert_eq!(sample(&text, r#"weir_jobs_wait_seconds_count{queue="mail"}"#), Some(3.0), "{text}");
    // The wait histogram has the job buckets (up to an hour), not the request ones.
    assert!(text.contains(r#"weir_jobs_wait_seconds_bucket{queue="mail",le="3600"}"#), "{text}");

    running.stop().await.unwrap();
}
