//! `weir jobs …`: enqueue, list, show, retry, cancel and stats of the job queue.

use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use weir_jobs::admin::{self, ListFilter};
use weir_jobs::{Job, JobId, JobState, Unique};

/// `weir jobs` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum JobsCommand {
    /// Enqueue a job (in its own transaction).
    Enqueue(EnqueueArgs),
    /// List jobs, newest first, with why each waiting job waits.
    List(ListArgs),
    /// Show one job with its errors.
    Show {
        /// The job id.
        id: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a job again now: scheduled or retryable ones, or re-queue a discarded or cancelled one.
    Retry {
        /// The job id.
        id: i64,
    },
    /// Cancel an unfinished job; a running one is told to stop.
    Cancel {
        /// The job id.
        id: i64,
    },
    /// The workers of the live processes: kind, type, queue, slots, running jobs, last error.
    Workers {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Figures per queue: queued, running, completed/s, discarded, oldest wait.
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `weir jobs enqueue`.
#[derive(Debug, clap::Args)]
pub struct EnqueueArgs {
    /// The job kind (the worker that runs it).
    pub(crate) kind: String,
    /// The arguments, as JSON.
    #[arg(default_value = "{}")]
    pub(crate) args: String,
    /// The queue.
    #[arg(long, default_value = weir_jobs::DEFAULT_QUEUE)]
    pub(crate) queue: String,
    /// 0 (runs first) to 9 (last).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub(crate) priority: i64,
    /// Run at this time (RFC 3339).
    #[arg(long, conflicts_with = "delay")]
    pub(crate) at: Option<DateTime<Utc>>,
    /// Run after this delay (`500ms`, `10s`, `5m`, `2h`, `1d`).
    #[arg(long = "in", value_name = "DURATION")]
    pub(crate) delay: Option<String>,
    /// Attempts before the job is discarded (1 to 1000).
    #[arg(long, default_value_t = i64::from(weir_jobs::DEFAULT_MAX_ATTEMPTS), allow_negative_numbers = true)]
    pub(crate) max_attempts: i64,
    /// A unique key: no second unfinished job with it (or, with --unique-for, none within that
    /// period).
    #[arg(long)]
    pub(crate) unique_key: Option<String>,
    /// Keep the unique key taken for this long after the first enqueue.
    #[arg(long, requires = "unique_key", value_name = "DURATION")]
    pub(crate) unique_for: Option<String>,
    /// Fail an attempt that runs longer than this (1ms to 24h).
    #[arg(long, value_name = "DURATION")]
    pub(crate) timeout: Option<String>,
    /// NOTIFY weir_job_events when the job completes or is discarded.
    #[arg(long)]
    pub(crate) notify: bool,
}

/// `weir jobs list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only jobs in this state (scheduled, available, running, retryable, completed,
    /// discarded, cancelled).
    #[arg(long)]
    pub(crate) state: Option<String>,
    /// Only this queue.
    #[arg(long)]
    pub(crate) queue: Option<String>,
    /// Only this kind.
    #[arg(long)]
    pub(crate) kind: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 50)]
    pub(crate) limit: i64,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

fn duration(flag: &str, text: &str) -> anyhow::Result<Duration> {
    weir_core::parse_duration(text).with_context(|| format!("--{flag}"))
}

impl EnqueueArgs {
    /// The job these arguments describe; every bad field is a clear error.
    pub(crate) fn job(&self) -> anyhow::Result<Job> {
        let args: serde_json::Value = serde_json::from_str(&self.args)
            .with_context(|| format!("job args are not JSON: {}", self.args))?;
        let priority = u8::try_from(self.priority).ok().filter(|p| *p <= weir_jobs::MAX_PRIORITY);
        let Some(priority) = priority else {
            bail!(
                "--priority must be between 0 (first) and {} (last), got {}",
                weir_jobs::MAX_PRIORITY,
                self.priority
            );
        };
        let Some(max_attempts) = u32::try_from(self.max_attempts).ok() else {
            bail!("--max-attempts must be between 1 and 1000, got {}", self.max_attempts);
        };
        let mut job = Job::raw(&self.kind, args)
            .queue(&self.queue)
            .priority(priority)
            .max_attempts(max_attempts)
            .notify(self.notify);
        if let Some(at) = self.at {
            job = job.scheduled_at(at);
        }
        if let Some(delay) = &self.delay {
            job = job.run_in(duration("in", delay)?);
        }
        if let Some(t) = &self.timeout {
            job = job.timeout(duration("timeout", t)?);
        }
        if let Some(key) = &self.unique_key {
            job = job.unique(match &self.unique_for {
                Some(period) => Unique::for_period(key, duration("unique-for", period)?),
                None => Unique::while_active(key),
            });
        }
        job.validate()?;
        Ok(job)
    }
}

/// Runs a `weir jobs` subcommand (migrating the job tables first; idempotent).
pub async fn run(cmd: JobsCommand, pool: PgPool) -> anyhow::Result<()> {
    weir_jobs::migrate(&pool).await?;
    let mut conn = pool.acquire().await?;
    match cmd {
        JobsCommand::Enqueue(args) => {
            let job = args.job()?;
            let done = weir_jobs::enqueue(&mut conn, &job).await?;
            if done.duplicate {
                println!(
                    "job {} already holds unique key {:?}; nothing enqueued",
                    done.id,
                    args.unique_key.unwrap_or_default()
                );
            } else {
                println!("enqueued job {} (queue {}, kind {})", done.id, args.queue, args.kind);
            }
        }
        JobsCommand::List(args) => {
            let state = args.state.as_deref().map(str::parse::<JobState>).transpose()?;
            let filter =
                ListFilter { state, queue: args.queue, kind: args.kind, limit: args.limit };
            let jobs = admin::list(&mut conn, &filter).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
            } else if jobs.is_empty() {
                println!("no jobs");
            } else {
                println!(
                    "{:>8}  {:<9}  {:<12}  {:<20}  {:>7}  {:<20}  NOTE",
                    "ID", "STATE", "QUEUE", "KIND", "ATTEMPT", "SCHEDULED"
                );
                for j in jobs {
                    println!(
                        "{:>8}  {:<9}  {:<12}  {:<20}  {:>7}  {:<20}  {}",
                        j.id,
                        j.state,
                        j.queue,
                        j.kind,
                        format!("{}/{}", j.attempt, j.max_attempts),
                        j.scheduled_at.format("%Y-%m-%d %H:%M:%S"),
                        j.note.unwrap_or_default()
                    );
                }
            }
        }
        JobsCommand::Show { id, json } => {
            let j = admin::show(&mut conn, JobId(id)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&j)?);
            } else {
                println!("job {} — {} ({}/{} attempts)", j.id, j.state, j.attempt, j.max_attempts);
                println!("  queue {}  kind {}  priority {}", j.queue, j.kind, j.priority);
                println!("  args {}", j.args);
                println!("  created {}  scheduled {}", j.created_at, j.scheduled_at);
                if let Some(at) = j.attempted_at {
                    println!(
                        "  last attempt {} on {}",
                        at,
                        j.attempted_by.as_deref().unwrap_or("?")
                    );
                }
                if let Some(at) = j.finished_at {
                    println!("  finished {at}");
                }
                if let Some(note) = j.note {
                    println!("  note: {note}");
                }
                for e in j.errors.as_array().into_iter().flatten() {
                    println!(
                        "  attempt {} at {}: {}",
                        e["attempt"],
                        e["at"].as_str().unwrap_or("?"),
                        e["error"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        JobsCommand::Retry { id } => {
            let was = admin::retry(&mut conn, JobId(id)).await?;
            println!("job {id} was {was}; it is available now");
        }
        JobsCommand::Cancel { id } => {
            let was = admin::cancel(&mut conn, JobId(id)).await?;
            println!("job {id} was {was}; it is cancelled");
        }
        JobsCommand::Workers { json } => {
            let workers = admin::workers(&mut conn).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&workers)?);
            } else if workers.is_empty() {
                println!("no live process runs workers (start `weir run` with [[workers]])");
            } else {
                println!(
                    "{:<20} {:<8} {:<12} {:>6} {:>9} {:>8}  LAST ERROR",
                    "KIND", "TYPE", "QUEUE", "SLOTS", "PROCESSES", "RUNNING"
                );
                for w in workers {
                    let error = match (&w.last_error, w.last_error_at, w.last_error_job) {
                        (Some(e), Some(at), Some(job)) => {
                            let e: String = e.chars().take(120).collect();
                            format!("{} (job {job}): {e}", at.format("%Y-%m-%d %H:%M:%S"))
                        }
                        _ => "-".into(),
                    };
                    println!(
                        "{:<20} {:<8} {:<12} {:>6} {:>9} {:>8}  {error}",
                        w.kind, w.worker_type, w.queue, w.concurrency, w.processes, w.running
                    );
                }
            }
        }
        JobsCommand::Stats { json } => {
            let stats = admin::stats(&mut conn).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                println!(
                    "{:<16} {:>10} {:>10} {:>10} {:>8} {:>12} {:>10} {:>12}",
                    "QUEUE",
                    "AVAILABLE",
                    "SCHEDULED",
                    "RETRYABLE",
                    "RUNNING",
                    "COMPLETED/S",
                    "DISCARDED",
                    "OLDEST WAIT"
                );
                for s in stats {
                    println!(
                        "{:<16} {:>10} {:>10} {:>10} {:>8} {:>12.1} {:>10} {:>12}",
                        s.queue,
                        s.available,
                        s.scheduled,
                        s.retryable,
                        s.running,
                        s.completed_per_sec,
                        s.discarded_last_hour,
                        s.oldest_available_secs.map(|w| format!("{w:.1}s")).unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}
