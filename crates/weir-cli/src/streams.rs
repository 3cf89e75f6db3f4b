//! `weir streams …`: append to, read, list, delete and truncate the event store's streams
//! from a terminal. Thin over `weir_streams`: an append here is `weir.append` like any other,
//! so the expected-version and idempotency rules are the store's own.
//!
//! Where it sits: a person at a terminal ─► this ─► weir.append / weir.stream_events.

use std::io::{Read, Write};

use anyhow::{Context, bail};
use serde_json::Value;
use sqlx::PgPool;
use weir_streams::{Direction, Expected, NewEvent};

/// `weir streams` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum StreamsCommand {
    /// Append events to a stream if it is at the expected version (one event from --type and
    /// --data, or a JSON array from --events).
    Append(AppendArgs),
    /// Read a stream's events by version.
    Read {
        /// The stream.
        stream: String,
        /// The first version to print (inclusive). Defaults to the first, or with --backward
        /// the last.
        #[arg(long)]
        from: Option<i64>,
        /// Newest first.
        #[arg(long)]
        backward: bool,
        /// At most this many events.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// List streams by name.
    List {
        /// Only streams whose name starts with this.
        #[arg(long)]
        prefix: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Soft-delete a stream: reads say unknown; its events stay stored and in the log.
    Delete {
        /// The stream.
        stream: String,
    },
    /// Hide a stream's versions below --before from reads (nothing is deleted).
    Truncate {
        /// The stream.
        stream: String,
        /// The first version to keep visible.
        #[arg(long)]
        before: i64,
    },
}

/// `weir streams append`.
#[derive(Debug, clap::Args)]
pub struct AppendArgs {
    /// The stream.
    pub(crate) stream: String,
    /// What the stream must be at: any, no_stream, stream_exists or its version.
    #[arg(long, default_value = "any")]
    pub(crate) expected: String,
    /// The event's type.
    #[arg(long = "type", required_unless_present = "events", conflicts_with = "events")]
    pub(crate) event_type: Option<String>,
    /// The event's data, as JSON.
    #[arg(long, required_unless_present = "events", conflicts_with = "events")]
    pub(crate) data: Option<String>,
    /// The event's metadata, a JSON object.
    #[arg(long, conflicts_with = "events")]
    pub(crate) metadata: Option<String>,
    /// A tag (repeat for more).
    #[arg(long = "tag", conflicts_with = "events")]
    pub(crate) tags: Vec<String>,
    /// The event's id (a UUID), so that running the command again stores nothing twice.
    #[arg(long, conflicts_with = "events")]
    pub(crate) id: Option<uuid::Uuid>,
    /// A file holding a JSON array of {id?, type, data, metadata?, tags?}, or `-` for stdin.
    #[arg(long, value_name = "FILE")]
    pub(crate) events: Option<String>,
}

impl AppendArgs {
    fn events(&self) -> anyhow::Result<Vec<NewEvent>> {
        if let Some(source) = &self.events {
            let text = if source == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s).context("reading the events from stdin")?;
                s
            } else {
                std::fs::read_to_string(source)
                    .with_context(|| format!("reading the events from {source}"))?
            };
            return serde_json::from_str(&text).with_context(|| {
                format!(
                    "--events {source} is not a JSON array of {{id?, type, data, metadata?, \
                     tags?}}"
                )
            });
        }
        let (Some(event_type), Some(data)) = (&self.event_type, &self.data) else {
            bail!("give --type and --data, or --events FILE");
        };
        let data: Value =
            serde_json::from_str(data).with_context(|| format!("--data is not JSON: {data}"))?;
        let mut event = NewEvent::new(event_type.clone(), data);
        if let Some(m) = &self.metadata {
            let m: Value =
                serde_json::from_str(m).with_context(|| format!("--metadata is not JSON: {m}"))?;
            event = event.metadata(m);
        }
        event.tags = self.tags.clone();
        event.id = self.id;
        Ok(vec![event])
    }
}

/// Runs a `weir streams` command, printing to `out`.
pub async fn run(cmd: StreamsCommand, pool: PgPool, out: &mut dyn Write) -> anyhow::Result<()> {
    weir_streams::migrate(&pool).await?;
    match cmd {
        StreamsCommand::Append(args) => {
            let expected: Expected =
                args.expected.parse().map_err(|e| anyhow::anyhow!("--expected: {e}"))?;
            let events = args.events()?;
            let mut conn = pool.acquire().await?;
            let done = weir_streams::append(&mut conn, &args.stream, expected, &events).await?;
            let ids: Vec<String> = done.ids.iter().map(ToString::to_string).collect();
            if done.duplicate {
                writeln!(
                    out,
                    "stream {} holds these events already at versions {}..{} (ids {}); nothing \
                     appended",
                    done.stream,
                    done.first(),
                    done.last(),
                    ids.join(", ")
                )?;
            } else {
                writeln!(
                    out,
                    "appended versions {}..{} to stream {} (ids {})",
                    done.first(),
                    done.last(),
                    done.stream,
                    ids.join(", ")
                )?;
            }
        }
        StreamsCommand::Read { stream, from, backward, limit, json } => {
            let direction = if backward { Direction::Backward } else { Direction::Forward };
            let events = weir_streams::read_stream(&pool, &stream, from, direction, limit).await?;
            for e in events {
                if json {
                    writeln!(out, "{}", serde_json::to_string(&e)?)?;
                } else {
                    writeln!(
                        out,
                        "{:>6}  {}  {:<24} {}{}",
                        e.version,
                        e.recorded_at.format("%Y-%m-%d %H:%M:%S%.3f"),
                        e.event_type,
                        e.data,
                        if e.tags.is_empty() {
                            String::new()
                        } else {
                            format!("  [{}]", e.tags.join(", "))
                        }
                    )?;
                }
            }
        }
        StreamsCommand::List { prefix, limit, json } => {
            let streams = weir_streams::list_streams(&pool, prefix.as_deref(), limit, None).await?;
            for s in streams {
                if json {
                    writeln!(out, "{}", serde_json::to_string(&s)?)?;
                } else {
                    writeln!(
                        out,
                        "{:<32} version {:<8} updated {}{}",
                        s.stream,
                        s.version,
                        s.updated_at.format("%Y-%m-%d %H:%M:%S"),
                        if s.deleted_at.is_some() { "  (deleted)" } else { "" }
                    )?;
                }
            }
        }
        StreamsCommand::Delete { stream } => {
            let info = weir_streams::delete_stream(&pool, &stream).await?;
            writeln!(
                out,
                "deleted stream {} at version {}; appending with --expected any or no_stream \
                 starts it again at {}",
                info.stream,
                info.version,
                info.version + 1
            )?;
        }
        StreamsCommand::Truncate { stream, before } => {
            let info = weir_streams::truncate_stream(&pool, &stream, before).await?;
            writeln!(
                out,
                "stream {} now reads from version {} (of {})",
                info.stream, info.truncate_before, info.version
            )?;
        }
    }
    Ok(())
}
