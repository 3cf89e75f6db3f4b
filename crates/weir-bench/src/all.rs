//! `weir-bench all [--quick]`: the regression run. Every benchmark in sequence, in this process,
//! then one table of every ratio and target they recorded, so that the next change can be
//! checked against this one.
//!
//! ```text
//! for each benchmark (ingest, backfill, operators, jobs, fanout, streams, sinks, process,
//! http, backlog):
//!     parse `weir-bench <benchmark> <its arguments>` as the command line would (--quick: the
//!     small sizes of QUICK, printed in its heading; otherwise its defaults)
//!     run it: it prints its own figures and records its summary's rows (report::record)
//!     an error or a panic → a row `failed` (met = false) with the error; go on to the next
//! print report::table(every recorded row), each benchmark's time and the total
//! ```
//!
//! Each benchmark starts and stops what it needs (a private cluster, `weir run`, nats-server)
//! as when it runs alone, so one that fails leaves nothing behind for the next. A missed target
//! is a row, not an error; a benchmark that failed makes the command exit non-zero after the
//! table. `--quick` takes under 5 minutes on the 2-core development machine (figures in
//! `docs/benchmarks.md`): its sizes are small, so its figures are noisier than the defaults';
//! compare its ratios with another `--quick` run, not with a full run.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use futures::FutureExt;

use crate::report::{self, Row};
use crate::{
    Cli, Command, backfill, backlog, fanout, http, ingest, jobs, operators, process, sinks, streams,
};

/// Arguments of `weir-bench all`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Small sizes, for a regression run of under 5 minutes on two cores (each benchmark's
    /// arguments are printed in its heading); without it, every benchmark's defaults.
    #[arg(long)]
    quick: bool,
}

/// The benchmarks in the order they run, each with its arguments under `--quick`. `ingest` and
/// `backfill` run first: they measure this process's peak RSS, which memory the allocator
/// kept from the benchmarks before would inflate.
const QUICK: &[(&str, &[&str])] = &[
    ("ingest", &["--changes", "50000", "--repeat", "1", "--latency-seconds", "3"]),
    ("backfill", &["--rows", "50000"]),
    // The floor's single-lane variants commit per event (~300/s on a slow disk): 2,000 each.
    (
        "operators",
        &[
            "--events",
            "50000",
            "--floor-events",
            "2000",
            "--slow-events",
            "50000",
            "--slow-seconds",
            "3",
            "--latency-seconds",
            "4",
        ],
    ),
    (
        "jobs",
        &[
            "--jobs",
            "2000",
            "--concurrency",
            "10",
            "--declared-jobs",
            "2000",
            "--latency-duration",
            "3s",
            "--vacuum-rounds",
            "2",
        ],
    ),
    ("fanout", &["--clients", "100", "--seconds", "3", "--warmup-seconds", "1"]),
    (
        "streams",
        &["--append-events", "2000", "--delivery-events", "20000", "--latency-seconds", "3"],
    ),
    ("sinks", &["--events", "5000", "--latency-seconds", "3"]),
    ("process", &["--waiters", "200", "--seconds", "3"]),
    ("http", &["--seconds", "3", "--events", "2000", "--slowloris", "200"]),
    // The RSS of a `weir run` child, not this process's: it can run last. No tenth: 20,000
    // events are logged in under a second, before the catch-up's queue fills, so its peak
    // would say nothing of the backlog's size.
    ("backlog", &["--events", "200000", "--drain-seconds", "20", "--no-tenth"]),
];

/// What `--quick` promises on the development machine.
const QUICK_BUDGET: Duration = Duration::from_secs(300);

/// `weir-bench all`.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut times = Vec::new();
    let mut failed: Vec<(&str, String)> = Vec::new();
    for &(name, quick) in QUICK {
        let argv: &[&str] = if args.quick { quick } else { &[] };
        let command: Vec<&str> = [name].iter().chain(argv).copied().collect();
        println!("######## weir-bench {} ########", command.join(" "));
        let t = Instant::now();
        if let Err(e) = one(name, argv).await {
            println!("weir-bench {name}: error: {e:#}");
            report::record(Row {
                benchmark: name,
                figure: "failed".into(),
                measured: format!("{e:#}"),
                reference: String::new(),
                ratio: None,
                target: None,
                met: Some(false),
            });
            failed.push((name, format!("{e:#}")));
        }
        times.push((name, t.elapsed()));
        println!();
    }
    let total = started.elapsed();

    let rows = report::recorded();
    let met = rows.iter().filter(|r| r.met == Some(true)).count();
    let missed = rows.iter().filter(|r| r.met == Some(false)).count() - failed.len();
    println!(
        "######## weir-bench all{}: {} rows; {met} targets met, {missed} missed; {} of {} \
         benchmarks failed; {} ########",
        if args.quick { " --quick" } else { "" },
        rows.len(),
        failed.len(),
        QUICK.len(),
        minutes(total)
    );
    print!("{}", report::table(&rows));
    println!(
        "ratio: measured / reference, higher is better; for a latency, reference / measured. \
         Compare ratios of one machine and one mode (--quick or not), never figures across runs."
    );
    println!(
        "time: {}; total {}",
        times.iter().map(|(n, t)| format!("{n} {}", minutes(*t))).collect::<Vec<_>>().join(", "),
        minutes(total)
    );
    if args.quick && total > QUICK_BUDGET {
        println!("note: over the {} that --quick should take", minutes(QUICK_BUDGET));
    }
    // The table cuts long cells; the errors in full.
    for (name, error) in &failed {
        println!("failed: {name}: {error}");
    }
    if !failed.is_empty() {
        let names: Vec<&str> = failed.iter().map(|(n, _)| *n).collect();
        bail!("{} of {} benchmarks failed: {}", failed.len(), QUICK.len(), names.join(", "));
    }
    Ok(())
}

/// Runs one benchmark as `weir-bench <name> <argv…>` would; a panic becomes an error.
async fn one(name: &str, argv: &[&str]) -> anyhow::Result<()> {
    let cli = Cli::try_parse_from(["weir-bench", name].iter().chain(argv))?;
    let run = async move {
        match cli.command {
            Command::Ingest(a) => ingest::run(a).await,
            Command::Operators(a) => operators::run(a).await,
            Command::Jobs(a) => jobs::run(a).await,
            Command::Fanout(a) => fanout::run(a).await,
            Command::Streams(a) => streams::run(a).await,
            Command::Sinks(a) => sinks::run(a).await,
            Command::Backfill(a) => backfill::run(a).await,
            Command::Process(a) => process::run(a).await,
            Command::Http(a) => http::run(a).await,
            Command::Backlog(a) => backlog::run(a).await,
            other => bail!("`{other:?}` is not a benchmark"),
        }
    };
    match AssertUnwindSafe(Box::pin(run)).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            bail!("panicked: {message}")
        }
    }
}

/// `2 min 05 s`, or `42.3 s` under a minute.
fn minutes(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1} s")
    } else {
        format!("{} min {:02} s", (s / 60.0).floor() as u64, (s % 60.0).floor() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every benchmark's quick arguments parse (as `weir-bench all --quick` will parse them).
    #[test]
    fn quick_arguments_parse() {
        for &(name, argv) in QUICK {
            let cli = Cli::try_parse_from(["weir-bench", name].iter().chain(argv));
            assert!(cli.is_ok(), "weir-bench {name} {}: {}", argv.join(" "), cli.unwrap_err());
        }
    }

    #[test]
    fn durations() {
        assert_eq!(minutes(Duration::from_millis(42_349)), "42.3 s");
        assert_eq!(minutes(Duration::from_secs(125)), "2 min 05 s");
    }
}
