//! `weir subscriptions create|list|show|update|stop|start|delete`: the subscriptions kept in the
//! database (`weir_streams::subscriptions`), the same ones `/v1/subscriptions` and `weir.toml`
//! manage. Every process running the engine picks a change up; clients attached over SSE or
//! WebSocket are told to reattach when the definition changes.
//!
//! Sinks from flags: `--webhook URL --secret-env NAME`, `--nats [--subject …]`, or any sink as
//! JSON with `--sink` (clap refuses two of them at once). A secret's environment variable is
//! read by the processes that deliver (`weir run`), which may run on another machine than this
//! command: so one not set here is a warning, not a refusal.

use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use weir_core::OnExhausted;
use weir_sinks::{NatsSink, WebhookSink};
use weir_streams::{
    Sink, StartAt, Subscription, SubscriptionDef, SubscriptionUpdate, subscriptions,
};

/// `weir subscriptions` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum SubscriptionsCommand {
    /// Create a subscription: delivered to clients attached over SSE or WebSocket, or to a
    /// webhook (--webhook) or NATS JetStream (--nats) by the processes that run weir.
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
    /// Where it delivers (default: clients attached over SSE or WebSocket).
    #[command(flatten)]
    pub(crate) sink: SinkArgs,
}

/// Where a subscription delivers, from flags: a webhook, NATS, or any sink as JSON — one of
/// them (clap refuses two).
///
/// Secrets are never given here: only the names of the environment variables that hold them.
/// Every process that runs weir (`weir run`) reads them there and delivers; this command may
/// run elsewhere, so a variable not set in its own environment is only a warning.
#[derive(Debug, Default, clap::Args)]
#[command(next_help_heading = "Sink")]
pub struct SinkArgs {
    /// Deliver by POSTing each event to this http(s) URL, signed the Standard Webhooks way
    /// (needs --secret-env).
    #[arg(long, value_name = "URL", requires = "secret_env", conflicts_with_all = ["nats", "sink"])]
    pub(crate) webhook: Option<String>,
    /// The environment variable holding the webhook's signing secret (`whsec_…`; `weir webhooks
    /// secret` makes one), never the secret itself. It must be set for every process that runs
    /// weir; when it is not set here this command warns and creates the subscription anyway.
    #[arg(long, value_name = "NAME", requires = "webhook")]
    pub(crate) secret_env: Option<String>,
    /// How long one webhook request may take before it is retried (default 15s).
    #[arg(long, value_name = "DURATION", requires = "webhook", value_parser = duration)]
    pub(crate) timeout: Option<Duration>,
    /// Events per webhook request: 1 (the default) posts each alone; more posts
    /// `{"events": [...]}` (at most 1000).
    #[arg(long, value_name = "N", requires = "webhook")]
    pub(crate) batch_size: Option<u32>,
    /// How long to wait for a webhook batch to fill (default 0).
    #[arg(long, value_name = "DURATION", requires = "webhook", value_parser = duration)]
    pub(crate) linger: Option<Duration>,
    /// Deliver by publishing each event to NATS JetStream (the defaults: nats://127.0.0.1:4222,
    /// subject weir.{entity}.{kind}, stream WEIR).
    #[arg(long, conflicts_with_all = ["webhook", "sink"])]
    pub(crate) nats: bool,
    /// The NATS server(s): nats://host:4222, several separated by commas.
    #[arg(long, value_name = "URL", requires = "nats")]
    pub(crate) nats_url: Option<String>,
    /// The subject of each event; tokens {subscription}, {entity}, {kind}, {stream}, {type}.
    #[arg(long, value_name = "TEMPLATE", requires = "nats")]
    pub(crate) subject: Option<String>,
    /// The JetStream stream that stores the subjects.
    #[arg(long, value_name = "NAME", requires = "nats")]
    pub(crate) stream: Option<String>,
    /// Create the stream when it does not exist.
    #[arg(long, requires = "nats")]
    pub(crate) create_stream: bool,
    /// Publishes awaiting their PubAck at once, 1 to 4096 (default 256).
    #[arg(long, value_name = "N", requires = "nats")]
    pub(crate) max_in_flight: Option<u32>,
    /// The environment variable holding a token for the NATS server, if it needs one (set for
    /// every process that runs weir; a warning when it is not set here).
    #[arg(long, value_name = "NAME", requires = "nats")]
    pub(crate) token_env: Option<String>,
    /// Any sink: `client`, `rust`, or its JSON table, such as
    /// `{"type": "nats", "subject": "orders.{type}", "retention": "workqueue"}`.
    #[arg(long, value_name = "JSON", conflicts_with_all = ["webhook", "nats"])]
    pub(crate) sink: Option<String>,
}

impl SinkArgs {
    /// The sink the flags describe (`None`: no sink flag), its settings checked.
    fn sink(&self) -> anyhow::Result<Option<Sink>> {
        let sink = if let Some(url) = &self.webhook {
            let secret_env = self.secret_env.as_deref().unwrap_or_default();
            let mut w = WebhookSink::new(url, secret_env);
            w.timeout = self.timeout.unwrap_or(w.timeout);
            w.batch_size = self.batch_size.unwrap_or(w.batch_size);
            w.linger = self.linger.unwrap_or(w.linger);
            Sink::Webhook(w)
        } else if self.nats {
            let mut n = NatsSink::new();
            n.url = self.nats_url.clone().unwrap_or(n.url);
            n.subject = self.subject.clone().unwrap_or(n.subject);
            n.stream = self.stream.clone().unwrap_or(n.stream);
            n.create_stream = self.create_stream;
            n.max_in_flight = self.max_in_flight.unwrap_or(n.max_in_flight);
            n.token_env = self.token_env.clone();
            Sink::Nats(n)
        } else if let Some(text) = &self.sink {
            // JSON when it parses, else a word (`client`, `rust`).
            let value = serde_json::from_str(text).unwrap_or_else(|_| Value::from(text.as_str()));
            serde_json::from_value(value).map_err(|e| anyhow::anyhow!("--sink: {e}"))?
        } else {
            return Ok(None);
        };
        sink.validate().map_err(anyhow::Error::msg)?;
        Ok(Some(sink))
    }
}

/// `15s`, `50ms`, `2m`.
fn duration(text: &str) -> Result<Duration, String> {
    weir_core::parse_duration(text).map_err(|e| e.to_string())
}

/// A warning when this process could not deliver `sink` (a secret's variable not set here),
/// which is not a refusal: the processes that run weir may have it.
fn environment_warning(sink: &Sink) -> Option<String> {
    sink.check_environment().err().map(|e| {
        format!(
            "warning: {e}; make sure the processes that run weir (`weir run`) have it — until \
             one does, nothing is delivered (`weir subscriptions show` says so)"
        )
    })
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
    /// A new sink, replacing the current one (its settings as a whole: give every flag that
    /// differs from the defaults again).
    #[command(flatten)]
    pub(crate) sink: SinkArgs,
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
            if let Some(sink) = a.sink.sink()? {
                def.sink = sink;
            }
            let s = subscriptions::create(&pool, &def).await?;
            println!(
                "created subscription {} ({} emitters, sink {})",
                s.subscription_name,
                s.pool_size,
                s.sink.kind().as_str()
            );
            if let Some(w) = environment_warning(&s.sink) {
                eprintln!("{w}");
            }
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
                sink: a.sink.sink()?,
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
                     --partition-by, --on-exhausted, or a sink (--webhook, --nats, --sink)"
                );
            }
            let new_sink = update.sink.clone();
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
            if let Some(w) = new_sink.as_ref().and_then(environment_warning) {
                eprintln!("{w}");
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

/// One line: name, state, sink, type and selector, emitters, lag.
fn summary(s: &Subscription) -> String {
    let lag = s.emitters.iter().map(|e| e.lag_events).max().unwrap_or(0);
    let pending = s.pending_pool_size.map(|p| format!(" → {p}")).unwrap_or_default();
    format!(
        "{:<24} {:<8} {:<7} {} {}  emitters {}{pending}  checkpoint {}  lag {lag} events{}{}",
        s.subscription_name,
        s.state,
        s.sink.kind().as_str(),
        s.kind,
        s.selector,
        s.pool_size,
        s.checkpoint,
        if s.parked > 0 { format!(", {} parked", s.parked) } else { String::new() },
        if s.sink_error.is_some() { ", cannot deliver (see show)" } else { "" },
    )
}

/// The sink in words (a webhook's URL, a NATS subject; credentials in a URL redacted, secrets
/// only by their variable's name).
fn sink_words(sink: &Sink) -> String {
    match sink {
        Sink::Client => "client (SSE / WebSocket clients attached by name)".into(),
        Sink::Rust => "rust (a handler registered in a process)".into(),
        Sink::Webhook(_) | Sink::Nats(_) => sink.to_string(),
    }
}

/// `2026-12-01 12:00:00 UTC (3 s ago)`.
pub(crate) fn when(t: DateTime<Utc>) -> String {
    format!("{} ({} ago)", t.format("%Y-%m-%d %H:%M:%S UTC"), age(t))
}

/// `3 s`, `5 min`, `2 h`, `4 d` since `t`.
pub(crate) fn age(t: DateTime<Utc>) -> String {
    let s = (Utc::now() - t).num_seconds().max(0);
    match s {
        0..120 => format!("{s} s"),
        120..7200 => format!("{} min", s / 60),
        7200..172_800 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

/// The definition, what the sink delivered, and one line per emitter.
fn details(s: &Subscription) -> String {
    let mut out = format!(
        "subscription {} — {}\n  type        {}\n  selector    {}\n  sink        {}\n",
        s.subscription_name,
        s.state,
        s.kind,
        s.selector,
        sink_words(&s.sink),
    );
    if let Some(d) = &s.deliveries {
        out.push_str(&format!("  delivered   {} events", d.delivered));
        if let (Some(p), Some(t)) = (d.last_position, d.last_delivered_at) {
            out.push_str(&format!(", the last at position {p}, {}", when(t)));
        }
        out.push_str(&format!("\n  retries     {}, failed {}\n", d.retries, d.failed));
        if let Some(e) = &d.last_error {
            let at = d.last_error_at.map(|t| format!(" — {}", when(t))).unwrap_or_default();
            out.push_str(&format!("  last error  {e}{at}\n"));
        }
    }
    if let Some(e) = &s.sink_error {
        out.push_str(&format!(
            "  sink error  {e} (the last process that tried cannot deliver; set it there and \
             restart it)\n"
        ));
    }
    if let Some(r) = &s.stopped_reason {
        out.push_str(&format!(
            "  stopped by its sink: {r} (`weir subscriptions start {}` once it takes deliveries \
             again)\n",
            s.subscription_name
        ));
    }
    out.push_str(&format!(
        "  start from  {}\n  pool size   {}{}\n  checkpoint  {}\n  parked      {}\n",
        s.start_from,
        s.pool_size,
        s.pending_pool_size.map(|p| format!(" (re-splitting to {p})")).unwrap_or_default(),
        s.checkpoint,
        s.parked,
    ));
    if let Some(h) = &s.halted {
        out.push_str(&format!(
            "  halted      {h}\n              `weir resume {0}` tries the event again (once the \
             cause is fixed); `weir skip {0}` moves past it\n",
            s.subscription_name
        ));
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
