//! `weir operators list|rebuild|forget`: the `[[operators]]` of weir.toml (and the operators the
//! database still holds that it no longer declares), forgetting one of those (which releases
//! the log it holds back from retention), and rebuilding one's target
//! table from scratch into a shadow swapped in at the end (`weir_consumer::rebuild`, which draws
//! the steps). The rebuild runs in this process, chunk by chunk, with a progress line; the
//! consumer's lanes in the `weir run` processes wait while it runs and replay the log onto the
//! new table afterwards.
//!
//! Killed anywhere, a rebuild leaves the operator stopped (`weir status` says why) and its
//! shadow: running the command again starts the shadow over and finishes; `--abort` drops it
//! and starts the operator on its old table.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::Context;
use weir::Config;
use weir_consumer::rebuild::{self, Rebuild};

/// `weir operators` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum OperatorsCommand {
    /// List the [[operators]] of weir.toml with their state.
    List,
    /// Rebuild a SQL operator's target table from its source tables into a shadow table,
    /// swapped in when done; the operator waits meanwhile and then replays what changed.
    Rebuild {
        /// The operator's name (an [[operators]] entry of weir.toml).
        name: String,
        /// Give up a rebuild that was killed: drop its shadow table, start the operator on its
        /// old table.
        #[arg(long)]
        abort: bool,
    },
    /// Delete an operator that weir.toml no longer declares (a removed one, or a Rust
    /// operator no longer run) with its checkpoints, failures and parked events. Retention then
    /// no longer keeps the log for it.
    Forget {
        /// The operator's name (as `weir operators list` shows it).
        name: String,
    },
}

pub(crate) async fn run(config: &Config, cmd: OperatorsCommand) -> anyhow::Result<()> {
    let pool = weir::db::connect(config).await?;
    weir_log::migrate(&pool).await.context("migrating the log tables")?;
    weir_consumer::migrate(&pool).await.context("migrating the consumer tables")?;
    match cmd {
        OperatorsCommand::List => {
            if config.operators.is_empty() {
                println!("weir.toml declares no [[operators]]");
            }
            for op in &config.operators {
                let state = match weir_consumer::state(&pool, &op.name).await {
                    Ok((state, _)) => state.to_string(),
                    Err(weir_consumer::Error::UnknownConsumer(_)) => "not run yet".into(),
                    Err(e) => return Err(e.into()),
                };
                println!(
                    "{:<32} {:<12} target {}",
                    op.name,
                    state,
                    op.target.as_deref().unwrap_or(&op.name)
                );
            }
            let declared = |name: &str| config.operators.iter().any(|o| o.name == name);
            for (name, kind, state) in weir_consumer::registered(&pool).await? {
                if kind == weir_consumer::ConsumerKind::Operator && !declared(&name) {
                    println!(
                        "{name:<32} {state:<12} not in weir.toml (a Rust operator, or removed); \
                         retention keeps the log for it until `weir operators forget {name}`"
                    );
                }
            }
        }
        OperatorsCommand::Forget { name } => {
            if config.operators.iter().any(|o| o.name == name) {
                anyhow::bail!(
                    "`{name}` is an [[operators]] entry of weir.toml: remove it there first (a \
                     `weir run` would register it again)"
                );
            }
            let registered = weir_consumer::registered(&pool).await?;
            match registered.iter().find(|(n, ..)| *n == name) {
                None => anyhow::bail!(
                    "no consumer `{name}` in the database; `weir operators list` shows them"
                ),
                Some((_, weir_consumer::ConsumerKind::Subscription, _)) => anyhow::bail!(
                    "`{name}` is a subscription: delete it with `weir subscriptions delete {name}`"
                ),
                Some(_) => {}
            }
            let mut tx = pool.begin().await?;
            weir_consumer::delete(&mut tx, &name).await?;
            tx.commit().await?;
            println!(
                "forgot operator {name}: its checkpoints, failures and parked events are deleted, \
                 and retention no longer keeps the log for it (a process that still runs it \
                 registers it again as a new operator)"
            );
        }
        OperatorsCommand::Rebuild { name, abort: true } => {
            rebuild::abort(&pool, &name).await?;
            println!(
                "aborted the rebuild of {name}: its shadow is dropped, it runs again on its old table"
            );
        }
        OperatorsCommand::Rebuild { name, abort: false } => {
            let Some(op) = config.operators.iter().find(|o| o.name == name) else {
                let names: Vec<String> = config.operators.iter().map(|o| o.name.clone()).collect();
                return Err(rebuild::not_configured(&pool, &name, &names).await.into());
            };
            let process = weir_core::ProcessId::generate();
            let mut r = Rebuild::begin(&pool, op, process.as_str()).await?;
            if let Some(p) = r.restarted() {
                println!("a rebuild of {name} by {p} did not finish; starting its shadow over");
            }
            println!(
                "rebuilding {} into {}: {name} is stopped, {} keys to recompute",
                r.target(),
                r.shadow(),
                r.keys_total()
            );
            let mut bar = Bar::new(r.keys_total());
            while r.step().await? {
                bar.show(r.keys_done());
            }
            bar.done(r.keys_done());
            let (target, keys) = (r.target().to_string(), r.keys_done());
            r.finish().await?;
            println!(
                "rebuilt {target} from {keys} keys in {:.1} s and swapped it in; {name} runs again \
                 and replays the changes since it stopped",
                bar.started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

/// The progress of a rebuild: one line rewritten in place on a terminal, a plain line every
/// few seconds otherwise (a log, a pipe).
struct Bar {
    total: usize,
    started: Instant,
    last: Option<Instant>,
    terminal: bool,
}

impl Bar {
    fn new(total: usize) -> Self {
        Self {
            total,
            started: Instant::now(),
            last: None,
            terminal: std::io::stdout().is_terminal(),
        }
    }

    fn line(&self, done: usize) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        let left = if rate > 0.0 { (self.total - done) as f64 / rate } else { 0.0 };
        let percent = (done * 100).checked_div(self.total).unwrap_or(100);
        format!(
            "{done}/{} keys ({percent}%), {rate:.0} keys/s, {} left",
            self.total,
            duration(Duration::from_secs_f64(left))
        )
    }

    fn show(&mut self, done: usize) {
        let every = if self.terminal { Duration::from_millis(100) } else { Duration::from_secs(2) };
        if self.last.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        let mut out = std::io::stdout();
        if self.terminal {
            let _ = write!(out, "\r\x1b[2K{}", self.line(done));
        } else {
            let _ = writeln!(out, "{}", self.line(done));
        }
        let _ = out.flush();
    }

    fn done(&mut self, done: usize) {
        if self.terminal {
            print!("\r\x1b[2K");
        }
        println!("{}", self.line(done));
    }
}

/// `42 s`, `3 min 5 s`, `2 h 10 min`.
fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}
