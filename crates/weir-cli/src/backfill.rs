//! `weir backfill TABLE…`: asks for backfills of existing rows (`weir::backfill::request`,
//! which refuses a table it cannot load and then creates nothing), then follows them with a
//! progress line — rows done, rows/s, time left — until they end. The ingesting `weir run`
//! process does the work; Ctrl-C only stops following. `--list` shows them, `--cancel` stops
//! one.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::Context;
use weir::Config;
use weir::backfill::Progress;
use weir_log::backfill::{Backfill, BackfillState};

use crate::subscriptions::age;

/// What `weir backfill` was asked.
#[derive(Debug, clap::Args)]
pub struct BackfillArgs {
    /// Watched tables to load (`posts`, `sales.orders`).
    tables: Vec<String>,
    /// Rows per chunk.
    #[arg(long)]
    chunk_size: Option<i32>,
    /// Ask and return at once instead of following the progress.
    #[arg(long)]
    detach: bool,
    /// List the active backfills and the last ones that ended.
    #[arg(long, conflicts_with_all = ["tables", "cancel"])]
    list: bool,
    /// Cancel this table's active backfill (the chunks stored stay in the log).
    #[arg(long, value_name = "TABLE", conflicts_with = "tables")]
    cancel: Option<String>,
}

pub(crate) async fn run(config: &Config, args: BackfillArgs) -> anyhow::Result<()> {
    let pool = weir::db::connect(config).await?;
    if args.list {
        weir_log::migrate(&pool).await?;
        let all = weir_log::backfill::list(&pool, 20).await?;
        if all.is_empty() {
            println!("no backfills yet; `weir backfill TABLE` loads a table's existing rows");
        }
        for b in &all {
            println!("{}", line(b));
        }
        return Ok(());
    }
    if let Some(table) = &args.cancel {
        match weir::backfill::cancel(&pool, table).await? {
            Some(b) => println!("cancelled: {}", line(&b)),
            None => anyhow::bail!(
                "`{table}` has no pending or running backfill; `weir backfill --list` shows them"
            ),
        }
        return Ok(());
    }
    if args.tables.is_empty() {
        anyhow::bail!("name the tables to backfill: `weir backfill posts comments`");
    }
    let created =
        weir::backfill::request(&pool, config, &args.tables, "cli", args.chunk_size).await?;
    for b in &created {
        println!("backfill {} of `{}` asked for (chunks of {} rows)", b.id, b.entity, b.chunk_size);
    }
    if !ingesting(&pool, config).await {
        println!(
            "no `weir run` is ingesting slot `{}` right now: the backfill starts when one does",
            config.source.slot
        );
    }
    if args.detach {
        println!("follow it with `weir backfill --list` (or GET /v1/backfills)");
        return Ok(());
    }
    let tty = std::io::stdout().is_terminal();
    for b in &created {
        follow(&pool, b.id, tty).await?;
    }
    Ok(())
}

/// Whether a process held the slot in the last few seconds.
async fn ingesting(pool: &sqlx::PgPool, config: &Config) -> bool {
    sqlx::query_scalar::<_, bool>(
        "select coalesce(heartbeat_at > now() - interval '5 seconds', false)
         from weir.source_state where slot = $1",
    )
    .bind(&config.source.slot)
    .fetch_optional(pool)
    .await
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Prints the backfill's progress until it ends: a line redrawn in place on a terminal, a line
/// every 5 s otherwise.
async fn follow(pool: &sqlx::PgPool, id: i64, tty: bool) -> anyhow::Result<()> {
    let mut last_print = std::time::Instant::now() - Duration::from_secs(60);
    loop {
        let b = weir_log::backfill::get(pool, id)
            .await?
            .with_context(|| format!("backfill {id} disappeared"))?;
        let ended = !b.state.is_active();
        if tty {
            print!("\r\x1b[2K{}", bar(&b));
            std::io::stdout().flush()?;
            if ended {
                println!();
            }
        } else if ended || last_print.elapsed() >= Duration::from_secs(5) {
            println!("{}", line(&b));
            last_print = std::time::Instant::now();
        }
        match b.state {
            BackfillState::Done => return Ok(()),
            BackfillState::Failed => anyhow::bail!(
                "backfill {} of `{}` failed: {}",
                b.id,
                b.entity,
                b.error.as_deref().unwrap_or("no reason recorded")
            ),
            BackfillState::Cancelled => {
                anyhow::bail!("backfill {} of `{}` was cancelled", b.id, b.entity)
            }
            BackfillState::Pending | BackfillState::Running => {}
        }
        tokio::time::sleep(Duration::from_millis(if tty { 250 } else { 1000 })).await;
    }
}

/// `posts [#########-----------]  41%  412,000 / 1,000,000 rows  38,120 rows/s  15 s left`
fn bar(b: &Backfill) -> String {
    let p = Progress::of(b);
    let width = 24;
    let filled = (p.fraction.unwrap_or(0.0) * width as f64).round() as usize;
    format!(
        "{} [{}{}] {}",
        b.entity,
        "#".repeat(filled),
        "-".repeat(width - filled.min(width)),
        figures(b, &p)
    )
}

/// `backfill 3 of posts: running, 41%, 412,000 / 1,000,000 rows, 38,120 rows/s, 15 s left`
pub(crate) fn line(b: &Backfill) -> String {
    let p = Progress::of(b);
    let mut s =
        format!("backfill {} of {}: {}, {}", b.id, b.entity, b.state.as_str(), figures(b, &p));
    if let Some(e) = &b.error {
        s.push_str(&format!(", error: {e}"));
    }
    if let Some(at) = b.finished_at {
        s.push_str(&format!(", ended {} ago", age(at)));
    }
    s
}

fn figures(b: &Backfill, p: &Progress) -> String {
    let mut s = String::new();
    if let Some(f) = p.fraction {
        s.push_str(&format!("{:>3.0}%  ", f * 100.0));
    }
    s.push_str(&format!(
        "{} / {} rows",
        thousands(b.rows_done),
        b.rows_total.map_or("?".into(), thousands)
    ));
    if b.rows_done > b.rows_written {
        s.push_str(&format!(
            " ({} overtaken by live changes)",
            thousands(b.rows_done - b.rows_written)
        ));
    }
    if let Some(rate) = p.rows_per_second {
        s.push_str(&format!("  {} rows/s", thousands(rate as i64)));
    }
    if let Some(left) = p.seconds_left {
        s.push_str(&format!("  {} left", human_seconds(left)));
    }
    s
}

fn thousands(n: i64) -> String {
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn human_seconds(s: f64) -> String {
    let s = s.round() as i64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_well() {
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(12), "12");
        assert_eq!(human_seconds(75.0), "1 min 15 s");
        assert_eq!(human_seconds(7300.0), "2 h 1 min");
    }
}
