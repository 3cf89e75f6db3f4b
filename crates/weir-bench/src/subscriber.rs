//! `weir-bench subscriber` (hidden): a process that only delivers one subscription, for the
//! crash tests that SIGKILL it mid-stream (`tests/subscriber.rs`).
//!
//! ```text
//! Weir::builder(config).without_ingestion().subscription(def, Deliveries)
//!   Deliveries, in the checkpoint's transaction:
//!     insert into deliveries (position, stream, version) on conflict (position) do nothing
//!     nothing inserted (a committed event came again) ─► insert into duplicates (position)
//! ```
//!
//! The tables are the caller's: `deliveries (position bigint primary key, stream text, version
//! bigint, seq bigserial)` and `duplicates (position bigint)`. `seq` is taken at delivery, so
//! ordering by it gives the order of the deliveries. The process runs until it is killed.

use anyhow::Context;
use sqlx::PgConnection;
use weir::{Config, Event, Weir};
use weir_consumer::OperatorError;
use weir_core::Secret;
use weir_streams::{SubscriptionDef, SubscriptionKind};

/// Arguments of `weir-bench subscriber`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The database (weir initialised, ingestion running elsewhere).
    #[arg(long)]
    url: String,
    /// The subscription's name (created if missing).
    #[arg(long)]
    name: String,
    /// Its emitters.
    #[arg(long, default_value_t = 4)]
    pool_size: u32,
    /// A stream selector: one stream or a prefix such as `order-*`.
    #[arg(long, default_value = "*")]
    selector: String,
}

/// Records each delivery in `deliveries`, in the delivery's transaction.
struct Deliveries;

impl weir_streams::Handler for Deliveries {
    async fn handle(&self, tx: &mut PgConnection, event: &Event) -> Result<(), OperatorError> {
        let row = event.new_record.as_ref().ok_or_else(|| OperatorError::skip("no row"))?;
        let inserted = sqlx::query(
            "insert into deliveries (position, stream, version) values ($1, $2, $3)
             on conflict (position) do nothing",
        )
        .bind(event.position)
        .bind(row["stream"].as_str())
        .bind(row["version"].as_i64())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            sqlx::query("insert into duplicates (position) values ($1)")
                .bind(event.position)
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }
}

/// `weir-bench subscriber`: runs until killed.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = Config::default();
    config.database.url = Some(Secret::new(args.url.clone()));
    let def = SubscriptionDef::new(args.name, SubscriptionKind::Stream, args.selector.into())
        .pool_size(args.pool_size);
    let running = Weir::builder(config)
        .without_ingestion()
        .subscription(def, Deliveries)
        .start()
        .await
        .context("starting the subscriber")?;
    println!("ready");
    running.wait().await.context("the subscriber stopped")?;
    Ok(())
}
