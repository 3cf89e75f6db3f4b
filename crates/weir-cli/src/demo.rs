//! `weir demo`: a private PostgreSQL from the installed server binaries, so weir can be tried
//! with no setup.
//!
//! The demo creates `posts` (integer key) and `comments` (uuid key, `REPLICA IDENTITY FULL`),
//! runs the ingestion and the HTTP server, writes a stream of changes for a few seconds and prints
//! each event as it lands in the log, with its delay from the commit. An SSE client subscribed
//! to the `posts` channel counts what it receives, and the process-status check answers for the
//! last write.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::Rng;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use weir::{Config, EventFilter};
use weir_core::Secret;
use weir_testkit::{Cluster, Options};

const SCHEMA: &str = "
    create table posts (
        id         serial primary key,
        title      text not null,
        body       text,
        updated_at timestamptz not null default now()
    );
    create table comments (
        id         uuid primary key default gen_random_uuid(),
        post_id    int not null references posts (id),
        body       text not null,
        updated_at timestamptz not null default now()
    );
    -- Complete old rows (and `changes`) for comments; posts keep the default identity.
    alter table comments replica identity full;
    -- Kept by the operator below.
    create table post_with_comments_counts (
        id             int primary key,
        title          text not null,
        comments_count int not null
    );";

/// The demo's configuration: the README's example operator.
pub(crate) const DEMO_TOML: &str = r#"
[source]
tables = ["posts", "comments"]

[[operators]]
name = "post_with_comments_counts"
entities = ["posts", "comments"]
key = { comments = "post_id" }      # a comment counts toward its post
delete_with = ["posts"]             # a deleted post deletes its row
sql = """
insert into post_with_comments_counts (id, title, comments_count)
select p.id, p.title, (select count(*) from comments c where c.post_id = p.id)
from posts p where p.id = $1
on conflict (id) do update
  set title = excluded.title, comments_count = excluded.comments_count
"""
"#;

/// `weir demo`.
pub(crate) async fn run(seconds: u64) -> anyhow::Result<()> {
    println!(
        "weir demo: starting a private PostgreSQL (wal_level=logical) from the installed server binaries…"
    );
    let cluster = tokio::task::spawn_blocking(|| Cluster::start_temp(Options::default())).await??;
    cluster.psql("postgres", "create database weir_demo")?;
    let url = cluster.url("weir_demo");
    let pool = PgPool::connect(&url).await.context("connecting to the demo database")?;
    sqlx::raw_sql(SCHEMA).execute(&pool).await?;

    let mut config = Config::from_toml(DEMO_TOML, "demo", [])?;
    config.database.url = Some(Secret::new(url.clone()));
    config.validate()?;
    let report = weir::setup::init(&pool, &config).await?;
    println!("  database   {url}");
    println!("  watching   {} (publication `weir`, slot `weir`)", report.tables.join(", "));
    println!("  operator   post_with_comments_counts (SQL from weir.toml, 8 lanes keyed by post)");
    println!();
    println!(
        "writing posts and comments for {seconds} s; each line is an event arriving in weir.events:"
    );
    println!();

    let running = weir::Weir::builder(config.clone()).pool(pool.clone()).start().await?;
    let cancel: CancellationToken = running.cancel_token();
    let server =
        weir_server::Server::start(pool.clone(), config.clone(), running.wake(), cancel.clone())
            .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    println!("the console: {base}/ (open it in a browser while the demo runs)");
    println!();
    let serve_cancel = cancel.clone();
    tokio::spawn(async move { server.serve(listener, serve_cancel).await });
    let sse_received = Arc::new(AtomicU64::new(0));
    let sse = tokio::spawn(sse_client(
        format!("{base}/v1/channels/sse?channel=posts"),
        sse_received.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut ingest = tokio::spawn(running.wait());
    let mut writer = tokio::spawn(write_changes(pool.clone(), Duration::from_secs(seconds)));

    let reader = weir::LogReader::new(pool.clone()).await?;
    let mut after = 0;
    let mut delays = Vec::new();
    let mut expected: Option<i64> = None;
    let mut last_write = weir::Lsn::ZERO;
    let deadline_after_writes = Duration::from_secs(15);
    let mut writes_done_at: Option<Instant> = None;
    loop {
        let events = reader.read(after, 500, &EventFilter::default()).await?;
        for e in &events {
            let delay =
                (chrono::Utc::now() - e.commit_ts).num_microseconds().unwrap_or(0) as f64 / 1000.0;
            delays.push(delay);
            let record =
                e.new_record.as_ref().or(e.old_record.as_ref()).cloned().unwrap_or_default();
            let mut shown = serde_json::to_string(&record)?;
            if shown.len() > 70 {
                shown.truncate(67);
                shown.push_str("...");
            }
            println!(
                "  #{:<4} {:<7} {:<9} {shown}  (+{delay:.1} ms)",
                e.position,
                e.kind.as_str(),
                e.entity
            );
            after = e.position;
        }
        if expected.is_none() && writer.is_finished() {
            let (n, lsn) = (&mut writer).await??;
            expected = Some(n);
            last_write = lsn;
            writes_done_at = Some(Instant::now());
        }
        if let Some(n) = expected {
            if after >= n {
                break;
            }
            if writes_done_at.is_some_and(|t| t.elapsed() > deadline_after_writes) {
                anyhow::bail!(
                    "only {after} of {n} changes reached the log within 15 s of the last write"
                );
            }
        }
        if ingest.is_finished() {
            (&mut ingest).await??;
            anyhow::bail!("weir stopped unexpectedly");
        }
        if events.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Read-your-writes for derived data: the writer's token, read right after its last commit.
    let lsn = last_write;
    let waited = Instant::now();
    let done = weir::process::wait_for(&pool, lsn, Duration::from_secs(30)).await?;
    anyhow::ensure!(done, "the operator did not catch up within 30 s");
    println!();
    println!(
        "every change up to {lsn} is processed by every operator ({:.1} ms after the last log line)",
        waited.elapsed().as_secs_f64() * 1000.0
    );
    let check = reqwest::Client::new()
        .get(format!("{base}/v1/process/check"))
        .header("X-Weir-Lsn", lsn.to_string())
        .send()
        .await?;
    println!("GET {base}/v1/process/check (X-Weir-Lsn: {lsn}) → {}", check.status());
    let rows: Vec<(i32, String, i32)> = sqlx::query_as(
        "select id, title, comments_count from post_with_comments_counts
         order by comments_count desc, id limit 5",
    )
    .fetch_all(&pool)
    .await?;
    println!("post_with_comments_counts (top 5 of the derived table):");
    for (id, title, n) in rows {
        println!("  post {id:<4} {n:>2} comments  {title}");
    }
    let wrong: i64 = sqlx::query_scalar(
        "select count(*) from post_with_comments_counts d
         full join (select p.id, p.title, count(c.id)::int as n from posts p
                    left join comments c on c.post_id = p.id group by p.id) r on r.id = d.id
         where d.comments_count is distinct from r.n or d.title is distinct from r.title",
    )
    .fetch_one(&pool)
    .await?;
    println!(
        "derived table vs. recomputed from scratch: {}",
        if wrong == 0 { "identical".to_string() } else { format!("{wrong} rows differ (a bug)") }
    );
    let posts_logged: i64 =
        sqlx::query_scalar("select count(*) from weir.events where entity = 'posts'")
            .fetch_one(&pool)
            .await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while sse_received.load(Ordering::Relaxed) < posts_logged as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cancel.cancel();
    ingest.await??;
    let (received, ordered, mut sse_delays) = sse.await??;

    delays.sort_by(f64::total_cmp);
    let pct = |p: f64| delays[((delays.len() - 1) as f64 * p) as usize];
    let gapless: bool = sqlx::query_scalar(
        "select count(*) = max(position) and min(position) = 1 from weir.events",
    )
    .fetch_one(&pool)
    .await?;
    println!();
    println!(
        "{after} changes logged, positions 1..{after} {}; commit → shown in this terminal: p50 {:.1} ms, p99 {:.1} ms",
        if gapless { "without a gap" } else { "WITH GAPS (a bug)" },
        pct(0.5),
        pct(0.99)
    );
    sse_delays.sort_by(f64::total_cmp);
    if !sse_delays.is_empty() {
        let pct = |p: f64| sse_delays[((sse_delays.len() - 1) as f64 * p) as usize];
        println!(
            "an SSE client on channel `posts` received {received} of {posts_logged} post changes{}; commit → SSE client: p50 {:.1} ms, p99 {:.1} ms",
            if ordered { ", in log order" } else { " OUT OF ORDER (a bug)" },
            pct(0.5),
            pct(0.99)
        );
    }
    println!(
        "The slot was acknowledged only after each batch committed to the log; stopping the demo removes its database."
    );
    pool.close().await;
    drop(cluster);
    Ok(())
}

/// Writes posts and comments for `duration`; returns how many row changes it made and the WAL
/// position read right after its last commit (the token a writer hands to `wait_for`).
async fn write_changes(pool: PgPool, duration: Duration) -> anyhow::Result<(i64, weir::Lsn)> {
    let mut last_lsn = weir::Lsn::ZERO;
    let start = Instant::now();
    let mut changes = 0i64;
    let mut posts: Vec<i32> = Vec::new();
    let mut comments: Vec<uuid::Uuid> = Vec::new();
    while start.elapsed() < duration {
        let (pick, n_comments, roll) = {
            let mut rng = rand::rng();
            (
                rng.random_range(0..100usize),
                rng.random_range(1..=3usize),
                rng.random_range(0..10u32),
            )
        };
        let mut tx = pool.begin().await?;
        let id: i32 =
            sqlx::query_scalar("insert into posts (title, body) values ($1, $2) returning id")
                .bind(format!(
                    "Post about {}",
                    ["weirs", "rivers", "WAL", "locks", "queues"][pick % 5]
                ))
                .bind("A body long enough to look like a post.")
                .fetch_one(&mut *tx)
                .await?;
        changes += 1;
        posts.push(id);
        for i in 0..n_comments {
            let target = posts[(pick + i) % posts.len()];
            let cid: uuid::Uuid = sqlx::query_scalar(
                "insert into comments (post_id, body) values ($1, $2) returning id",
            )
            .bind(target)
            .bind(format!("comment {i} on post {target}"))
            .fetch_one(&mut *tx)
            .await?;
            comments.push(cid);
            changes += 1;
        }
        tx.commit().await?;
        if roll < 5 {
            let target = posts[pick % posts.len()];
            sqlx::query(
                "update posts set title = title || ' (edited)', updated_at = now() where id = $1",
            )
            .bind(target)
            .execute(&pool)
            .await?;
            changes += 1;
        }
        if roll < 2 && !comments.is_empty() {
            let cid = comments.swap_remove(pick % comments.len());
            sqlx::query("delete from comments where id = $1").bind(cid).execute(&pool).await?;
            changes += 1;
        }
        let lsn: String =
            sqlx::query_scalar("select pg_current_wal_insert_lsn()::text").fetch_one(&pool).await?;
        last_lsn = lsn.parse()?;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok((changes, last_lsn))
}

/// Subscribes to an SSE channel until the server closes the stream; returns the change messages
/// received, whether their positions rose, and each one's delay from its commit in ms.
async fn sse_client(url: String, count: Arc<AtomicU64>) -> anyhow::Result<(u64, bool, Vec<f64>)> {
    let mut response = reqwest::get(&url).await?.error_for_status()?;
    let (mut buf, mut received, mut last, mut ordered) = (Vec::new(), 0u64, 0i64, true);
    let mut delays = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let message: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&message);
            if !text.lines().any(|l| l == "event: change") {
                continue;
            }
            let Some(data) = text.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            let value: serde_json::Value = serde_json::from_str(data)?;
            let position = value["position"].as_i64().unwrap_or(0);
            ordered &= position > last;
            last = position;
            received += 1;
            count.store(received, Ordering::Relaxed);
            if let Some(ts) = value["event"]["commit_ts"].as_str() {
                let ts = chrono::DateTime::parse_from_rfc3339(ts)?;
                let delay = chrono::Utc::now().signed_duration_since(ts);
                delays.push(delay.num_microseconds().unwrap_or(0) as f64 / 1000.0);
            }
        }
    }
    Ok((received, ordered, delays))
}
