//! `weir status [--json]`: the source's slot lag, last position, rate and delay, the backfills
//! that run (and the last that ended), and each
//! consumer's state and lanes (`weir::status`, `weir::consumer_status`); subscriptions are
//! consumers too, shown as such with their emitters — and, for a webhook or NATS sink, one line
//! of what it delivered: how many, how long ago, the last error, the lag.

use weir::Config;
use weir_streams::{Sink, Subscription};

use crate::subscriptions::age;

pub(crate) async fn run(config: &Config, json: bool) -> anyhow::Result<()> {
    let pool = weir::db::connect(config).await?;
    let s = weir::status::source_status(&pool, config).await?;
    let consumers = weir::consumer_status::consumers(&pool).await.unwrap_or_default();
    // Before the streams migration there are none.
    let subscriptions = weir_streams::subscriptions::list(&pool).await.unwrap_or_default();
    let subscription = |name: &str| subscriptions.iter().find(|s| s.subscription_name == name);
    // Before the log's second migration there are none.
    let backfills = weir_log::backfill::list(&pool, 3).await.unwrap_or_default();
    let oldest = weir_log::LogReader::new(pool.clone()).await?.oldest().await?;
    // Before the consumers' migration there is none.
    let need = weir_consumer::oldest_need(&pool).await.unwrap_or_default();
    if json {
        let log = serde_json::json!({"oldest": oldest, "oldest_need": need,
                                     "retention_seconds": config.log.retention.as_secs()});
        let all = serde_json::json!({"source": s, "log": log, "consumers": consumers,
                                     "subscriptions": subscriptions, "backfills": backfills});
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    println!("slot            {} ({})", s.slot, if s.slot_active { "active" } else { "inactive" });
    println!("slot lag        {}", s.slot_lag_bytes.map_or("-".into(), weir::doctor::human_bytes));
    println!("log position    {} (commit LSN {})", s.position, s.lsn);
    println!("events/s        {:.1} (last 10 s)", s.events_per_second);
    println!("seconds behind  {:.3}", s.seconds_behind);
    match (&s.holder, s.heartbeat_age_seconds) {
        (Some(h), Some(age)) => println!("held by         {h} (heartbeat {age:.1} s ago)"),
        _ => println!("held by         nobody has run this slot yet"),
    }
    let retention = weir_core::format_duration(config.log.retention);
    match oldest {
        Some(p) => println!("log oldest      {p} (retention {retention})"),
        None => println!("log oldest      - (empty; retention {retention})"),
    }
    if let Some(n) = &need {
        // Retention keeps what the consumer furthest behind has not handled, however old.
        println!("log needed from {} by {} {} ({})", n.position, n.kind, n.consumer, n.state);
    }
    for b in &backfills {
        println!("{}", crate::backfill::line(b));
    }
    for c in &consumers {
        println!();
        let (what, lane) = if subscription(&c.name).is_some() {
            ("subscription", "emitter")
        } else {
            ("consumer", "lane")
        };
        print!("{what} {} — {}", c.name, c.state);
        if let Some(h) = &c.halted {
            print!(
                " at position {} (lane {}, attempt {}): {}",
                h["position"],
                h["lane"],
                h["attempt"],
                h["error"].as_str().unwrap_or("")
            );
        }
        match (&c.stopped_reason, subscription(&c.name).is_some()) {
            (Some(r), true) => print!(" by its sink: {r}"),
            // An operator is stopped by a rebuild, whose reason says so.
            (Some(r), false) => print!(", {r}"),
            (None, _) => {}
        }
        if c.parked > 0 {
            print!(", {} parked", c.parked);
        }
        println!();
        if let Some(line) = subscription(&c.name).and_then(sink_line) {
            println!("{line}");
        }
        for l in &c.lanes {
            println!(
                "  {lane} {:<3} {:<8} position {:<10} lag {} events / {:.1} s{}{}{}",
                l.lane,
                l.state,
                l.position,
                l.lag_events,
                l.lag_seconds,
                l.current_position
                    .map(|p| format!(", at #{p} attempt {}", l.attempt))
                    .unwrap_or_default(),
                l.last_error.as_deref().map(|e| format!(", last error: {e}")).unwrap_or_default(),
                l.owner.as_deref().map(|o| format!(", held by {o}")).unwrap_or_default(),
            );
        }
    }
    Ok(())
}

/// `  sink webhook: 120 delivered, the last 3 s ago; lag 4 events; last error 1 min ago: …`
/// for a webhook or NATS subscription.
fn sink_line(s: &Subscription) -> Option<String> {
    if !matches!(s.sink, Sink::Webhook(_) | Sink::Nats(_)) {
        return None;
    }
    let d = s.deliveries.as_ref()?;
    let mut line = format!("  sink {}: {} delivered", s.sink.kind().as_str(), d.delivered);
    if let Some(t) = d.last_delivered_at {
        line.push_str(&format!(", the last {} ago", age(t)));
    }
    let lag = s.emitters.iter().map(|e| e.lag_events).max().unwrap_or(0);
    line.push_str(&format!("; lag {lag} events"));
    if let Some(e) = &d.last_error {
        let at = d.last_error_at.map(|t| format!(" {} ago", age(t))).unwrap_or_default();
        line.push_str(&format!("; last error{at}: {e}"));
    }
    if let Some(e) = &s.sink_error {
        line.push_str(&format!("; cannot deliver: {e}"));
    }
    Some(line)
}
