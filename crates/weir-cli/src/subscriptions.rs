//! `weir subscriptions create|list|show|update|stop|start|delete`: the subscriptions kept in the
//! database (`weir_streams::subscriptions`), the same ones `/v1/subscriptions` and `weir.toml`
//! manage. Every process running the engine picks a change up; clients attached over SSE or
//! WebSocket are told to reattach when the definition changes.

use anyhow::{Context, bail};
use serde_json::Value;
use sqlx::PgPool;
use weir_core::OnExhausted;
use weir_streams::{StartAt, Subscription, SubscriptionDef, SubscriptionUpdate, subscriptions};

/// `weir subscriptions` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum SubscriptionsCommand {
    /// Create a subscription (delivered to clients attached over SSE or WebSocket).
    Create(CreateArgs),
    /// List subscriptions with their state and lag.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one subscription with its emitters (position, lag, state, owner).
    Show {
        /// The subscription.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a subscription; a new pool size re-splits its emitters without loss.
    Update(UpdateArgs),
    /// Stop a subscription (its checkpoints stay).
    Stop {
        /// The subscription.
        name: String,
    },
    /// Start a stopped subscription from its checkpoints.
    Start {
        /// The subscription.
        name: String,
    },
    /// Delete a subscription with its checkpoints and parked events.
    Delete {
        /// The subscription.
        name: String,
    },
}

/// `weir subscriptions create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Its name (letters, digits, `-`, `_`, `.`).
    pub(crate) name: String,
    /// stream, event_type, event_pattern, event_payload, tags or entity.
    #[arg(long = "type")]
    pub(crate) kind: String,
    /// The selector: JSON (`{"any": ["vip"]}`) or plain text (`order-*`).
    #[arg(long)]
    pub(crate) selector: String,
    /// Emitters, 1 to 1024.
    #[arg(long, default_value_t = 1)]
    pub(crate) pool_size: u32,
    /// beginning, now, a log position, or an RFC 3339 time.
    #[arg(long, default_value = "beginning")]
    pub(crate) start_from: String,
    /// Route by this field (`customer.id`) instead of the stream or row key.
    #[arg(long)]
    pub(crate) partition_by: Option<String>,
    /// After the retries: halt, skip or park.
    #[arg(long)]
    pub(crate) on_exhausted: Option<String>,
}

/// `weir subscriptions update`.
#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    /// The subscription.
    pub(crate) name: String,
    /// A new type (give a selector of that type too).
    #[arg(long = "type")]
    pub(crate) kind: Option<String>,
    /// A new selector: JSON or plain text.
    #[arg(long)]
    pub(crate) selector: Option<String>,
    /// A new pool size (a re-split).
    #[arg(long)]
    pub(crate) pool_size: Option<u32>,
    /// A new routing field.
    #[arg(long)]
    pub(crate) partition_by: Option<String>,
    /// A new failure policy: halt, skip or park.
    #[arg(long)]
    pub(crate) on_exhausted: Option<String>,
}

pub(crate) async fn run(cmd: SubscriptionsCommand, pool: PgPool) -> anyhow::Result<()> {
    weir_log::migrate(&pool).await.context("migrating the log tables")?;
    weir_streams::migrate(&pool).await.context("migrating the subscription tables")?;
    match cmd {
        SubscriptionsCommand::Create(a) => {
            let mut def = SubscriptionDef::new(&a.name, a.kind.parse()?, selector(&a.selector))
                .pool_size(a.pool_size)
                .start_from(StartAt::parse(&a.start_from)?);
            def.options.partition_by = a.partition_by;
            def.options.on_exhausted = a.on_exhausted.as_deref().map(on_exhausted).transpose()?;
            let s = subscriptions::create(&pool, &def).await?;
            println!("created subscription {} ({} emitters)", s.subscription_name, s.pool_size);
        }
        SubscriptionsCommand::List { json } => {
            let all = subscriptions::list(&pool).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no subscriptions; `weir subscriptions create` makes one");
            } else {
                for s in &all {
                    println!("{}", summary(s));
                }
            }
        }
        SubscriptionsCommand::Show { name, json } => {
            let s = subscriptions::get(&pool, &name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", details(&s));
            }
        }
        SubscriptionsCommand::Update(a) => {
            let mut update = SubscriptionUpdate {
                kind: a.kind.as_deref().map(str::parse).transpose()?,
                selector: a.selector.as_deref().map(selector),
                pool_size: a.pool_size,
                ..SubscriptionUpdate::default()
            };
            if a.partition_by.is_some() || a.on_exhausted.is_some() {
                let mut options = subscriptions::load(&pool, &a.name).await?.options;
                if let Some(p) = a.partition_by {
                    options.partition_by = Some(p);
                }
                if let Some(o) = a.on_exhausted.as_deref() {
                    options.on_exhausted = Some(on_exhausted(o)?);
                }
                update.options = Some(options);
            }
            if update == SubscriptionUpdate::default() {
                bail!(
                    "nothing to change; give --type with --selector, --selector, --pool-size, \
                     --partition-by or --on-exhausted"
                );
            }
            let s = subscriptions::update(&pool, &a.name, update).await?;
            match s.pending_pool_size {
                Some(p) => println!(
                    "updated subscription {}; re-splitting from {} to {p} emitters: a running \
                     engine completes it once every emitter has delivered up to the log head of \
                     now{}",
                    s.subscription_name,
                    s.pool_size,
                    if s.sink == weir_streams::Sink::Client {
                        " (for this subscription: once attached clients acknowledge up to there)"
                    } else {
                        ""
                    }
                ),
                None => println!("updated subscription {}", s.subscription_name),
            }
        }
        SubscriptionsCommand::Stop { name } => {
            subscriptions::stop(&pool, &name).await?;
            println!("stopped subscription {name}");
        }
        SubscriptionsCommand::Start { name } => {
            subscriptions::start(&pool, &name).await?;
            println!("started subscription {name}");
        }
        SubscriptionsCommand::Delete { name } => {
            subscriptions::delete(&pool, &name).await?;
            println!("deleted subscription {name}");
        }
    }
    Ok(())
}

/// JSON when it parses (`{"any": ["vip"]}`, `["posts"]`), else the text itself (`order-*`).
fn selector(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

fn on_exhausted(s: &str) -> anyhow::Result<OnExhausted> {
    serde_json::from_value(Value::String(s.to_string()))
        .map_err(|_| anyhow::anyhow!("--on-exhausted `{s}`: use halt, skip or park"))
}

/// One line: name, state, type and selector, emitters, lag.
fn summary(s: &Subscription) -> String {
    let lag = s.emitters.iter().map(|e| e.lag_events).max().unwrap_or(0);
    let pending = s.pending_pool_size.map(|p| format!(" → {p}")).unwrap_or_default();
    format!(
        "{:<24} {:<8} {} {}  emitters {}{pending}  checkpoint {}  lag {lag} events{}",
        s.subscription_name,
        s.state,
        s.kind,
        s.selector,
        s.pool_size,
        s.checkpoint,
        if s.parked > 0 { format!(", {} parked", s.parked) } else { String::new() }
    )
}

/// The sink in words (a webhook's URL, a NATS subject; secrets only by their variable's name).
fn sink_words(sink: &weir_streams::Sink) -> String {
    use weir_streams::Sink;
    match sink {
        Sink::Client => "client (SSE / WebSocket clients attached by name)".into(),
        Sink::Rust => "rust (a handler registered in a process)".into(),
        Sink::Webhook(w) => format!(
            "webhook POST {} (signed with ${}; timeout {:?}, batch {})",
            w.url, w.secret_env, w.timeout, w.batch_size
        ),
        Sink::Nats(n) => format!(
            "nats {} subject {} into stream {} ({} in flight)",
            n.url, n.subject, n.stream, n.max_in_flight
        ),
    }
}

/// The definition and one line per emitter.
fn details(s: &Subscription) -> String {
    let mut out = format!(
        "subscription {} — {}\n  type        {}\n  selector    {}\n  sink        {}\n  start from  {}\n  \
         pool size   {}{}\n  checkpoint  {}\n  parked      {}\n",
        s.subscription_name,
        s.state,
        s.kind,
        s.selector,
        sink_words(&s.sink),
        s.start_from,
        s.pool_size,
        s.pending_pool_size.map(|p| format!(" (re-splitting to {p})")).unwrap_or_default(),
        s.checkpoint,
        s.parked,
    );
    if let Some(h) = &s.halted {
        out.push_str(&format!("  halted      {h}\n"));
    }
    for e in &s.emitters {
        out.push_str(&format!(
            "  emitter {:<3} {:<8} position {:<10} lag {} events / {:.1} s  owner {}{}\n",
            e.lane,
            e.state,
            e.position,
            e.lag_events,
            e.lag_seconds,
            e.owner.as_deref().unwrap_or("-"),
            e.last_error.as_deref().map(|x| format!(", last error: {x}")).unwrap_or_default(),
        ));
    }
    out
}
