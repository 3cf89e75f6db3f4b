//! `weir status [--json]`: the source's slot lag, last position, rate and delay, and each
//! consumer's state and lanes (`weir::status`, `weir::consumer_status`); subscriptions are
//! consumers too, shown as such with their emitters.

use weir::Config;

pub(crate) async fn run(config: &Config, json: bool) -> anyhow::Result<()> {
    let pool = weir::db::connect(config).await?;
    let s = weir::status::source_status(&pool, config).await?;
    let consumers = weir::consumer_status::consumers(&pool).await.unwrap_or_default();
    // Before the streams migration there are none.
    let subscriptions = weir_streams::subscriptions::list(&pool).await.unwrap_or_default();
    let is_subscription = |name: &str| subscriptions.iter().any(|s| s.subscription_name == name);
    if json {
        let all = serde_json::json!({"source": s, "consumers": consumers,
                                     "subscriptions": subscriptions});
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
    for c in &consumers {
        println!();
        let (what, lane) = if is_subscription(&c.name) {
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
        if c.parked > 0 {
            print!(", {} parked", c.parked);
        }
        println!();
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
