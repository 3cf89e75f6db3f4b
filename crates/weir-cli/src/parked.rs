//! `weir parked list|retry|discard`: the events set aside by consumers with
//! `on_exhausted = "park"` (`weir::consumer_status`).

use weir::Config;

/// `weir parked` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ParkedCommand {
    /// List parked events.
    List {
        /// Only this consumer's.
        consumer: Option<String>,
    },
    /// Retry parked events of a consumer (all, or one position), in order per key.
    Retry {
        /// The consumer.
        consumer: String,
        /// Only this position.
        position: Option<i64>,
    },
    /// Discard parked events of a consumer (all, or one position).
    Discard {
        /// The consumer.
        consumer: String,
        /// Only this position.
        position: Option<i64>,
    },
}

pub(crate) async fn run(config: &Config, cmd: ParkedCommand) -> anyhow::Result<()> {
    let pool = weir::db::connect(config).await?;
    match cmd {
        ParkedCommand::List { consumer } => {
            let parked = weir::consumer_status::parked(&pool, consumer.as_deref()).await?;
            if parked.is_empty() {
                println!("no parked events");
            }
            for p in parked {
                println!(
                    "{} #{} {} key={} attempts={}{}: {}",
                    p.consumer,
                    p.position,
                    p.entity,
                    p.partition_key,
                    p.attempts,
                    if p.retry_requested { " (retry pending)" } else { "" },
                    p.error
                );
            }
        }
        ParkedCommand::Retry { consumer, position } => {
            let n = weir::consumer_status::retry_parked(&pool, &consumer, position).await?;
            println!("{n} parked events of `{consumer}` will be retried");
        }
        ParkedCommand::Discard { consumer, position } => {
            let n = weir::consumer_status::discard_parked(&pool, &consumer, position).await?;
            println!("{n} parked events of `{consumer}` discarded");
        }
    }
    Ok(())
}
