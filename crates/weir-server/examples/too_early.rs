//! A small axum service that answers `425 Too Early` until weir has processed the client's
//! last write, then the fresh derived data.
//!
//! ```text
//! cargo run -p weir-server --example too_early
//! ```
//!
//! It starts a private PostgreSQL (wal_level=logical) from the installed server binaries, runs
//! weir in-process with one SQL operator keeping `post_stats` (comments per post), and serves:
//!
//! - `POST /posts/{id}/comments` — inserts a comment and returns the header the client sends
//!   back: `X-Weir-Entity-Timestamp: comments/<updated_at in µs>`;
//! - `GET /posts/{id}/stats` — behind [`weir_server::TooEarlyLayer`]: `425` while the comment
//!   is not yet counted, then `200` with the count.
//!
//! Then it plays the client: it posts comments and reads the stats back, retrying on 425 as a
//! browser or mobile app would, and prints what it saw.

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::routing::{get, post};
use sqlx::PgPool;
use weir::Config;
use weir_core::Secret;
use weir_server::TooEarlyLayer;
use weir_testkit::{Cluster, Options};

const SCHEMA: &str = "
    create table posts (id int primary key, title text not null);
    create table comments (
        id serial primary key,
        post_id int not null references posts (id),
        body text not null,
        updated_at timestamptz not null default now());
    create table post_stats (post_id int primary key, comments int not null);
    insert into posts values (1, 'Hello'), (2, 'World');";

const WEIR_TOML: &str = r#"
[source]
tables = ["posts", "comments"]

[[operators]]
name = "post_stats"
entities = ["comments"]
key = { comments = "post_id" }
sql = """
insert into post_stats (post_id, comments)
select $1, count(*) from comments where post_id = $1
on conflict (post_id) do update set comments = excluded.comments
"""
"#;

/// `POST /posts/{id}/comments`: the write, and the token that says what was written.
async fn add_comment(State(pool): State<PgPool>, Path(post): Path<i32>) -> (HeaderMap, String) {
    let ts_us: f64 = sqlx::query_scalar(
        "insert into comments (post_id, body) values ($1, 'nice')
         returning (extract(epoch from updated_at) * 1000000)::float8",
    )
    .bind(post)
    .fetch_one(&pool)
    .await
    .expect("insert");
    let mut headers = HeaderMap::new();
    let token = format!("comments/{}", ts_us as i64);
    headers.insert("x-weir-entity-timestamp", HeaderValue::from_str(&token).expect("ascii"));
    (headers, "created\n".into())
}

/// `GET /posts/{id}/stats`: the derived data (reached only once weir processed the write).
async fn stats(State(pool): State<PgPool>, Path(post): Path<i32>) -> String {
    let n: Option<i32> = sqlx::query_scalar("select comments from post_stats where post_id = $1")
        .bind(post)
        .fetch_optional(&pool)
        .await
        .expect("select");
    format!("post {post}: {} comments\n", n.unwrap_or(0))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("starting a private PostgreSQL…");
    let cluster = tokio::task::spawn_blocking(|| Cluster::start_temp(Options::default())).await??;
    cluster.psql("postgres", "create database example")?;
    let url = cluster.url("example");
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(SCHEMA).execute(&pool).await?;
    let mut config = Config::from_toml(WEIR_TOML, "example", [])?;
    config.database.url = Some(Secret::new(url));
    weir::setup::init(&pool, &config).await?;
    let running = weir::Weir::builder(config.clone()).pool(pool.clone()).start().await?;

    // The user's own service: one layer in front of the routes that read derived data.
    let app = Router::new()
        .route("/posts/{id}/stats", get(stats))
        .route_layer(TooEarlyLayer::new(pool.clone(), &config.consumers.timestamp_column))
        .route("/posts/{id}/comments", post(add_comment))
        .with_state(pool.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    println!("serving {base}\n");

    // The client.
    let client = reqwest::Client::new();
    for round in 1..=3 {
        let post = 1 + round % 2;
        let r = client.post(format!("{base}/posts/{post}/comments")).send().await?;
        let token = r.headers()["x-weir-entity-timestamp"].to_str()?.to_string();
        println!(
            "POST /posts/{post}/comments  →  {}  X-Weir-Entity-Timestamp: {token}",
            r.status()
        );
        let start = Instant::now();
        let mut early = 0;
        loop {
            let r = client
                .get(format!("{base}/posts/{post}/stats"))
                .header("x-weir-entity-timestamp", &token)
                .send()
                .await?;
            if r.status().as_u16() == 425 {
                early += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            println!(
                "GET  /posts/{post}/stats      →  {} after {early} × 425 ({:.1} ms): {}",
                r.status(),
                start.elapsed().as_secs_f64() * 1000.0,
                r.text().await?.trim()
            );
            break;
        }
    }
    running.stop().await?;
    pool.close().await;
    drop(cluster);
    Ok(())
}
