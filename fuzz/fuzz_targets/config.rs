//! Fuzz target `config`: arbitrary text as weir.toml, through what `weir run` does with its
//! configuration before it connects to anything.
//!
//! ```text
//! input: [weir.toml text] ( \0 [NAME=value lines: the environment] )?
//!           ▼
//!   Config::from_toml(text, "weir.toml", env)   parse, WEIR_* overrides, DATABASE_URL, validate
//!           ▼ (valid)
//!   [[periodic]]: the job, its cron and time zone   (weir's App::start, periodic_from_config)
//!   [[subscriptions]]: SubscriptionDef::from_config, its sink's environment   (App::start)
//! ```
//!
//! `weir run` reads the file with `read_to_string`: text that is not UTF-8 never reaches the
//! parser, so it is skipped here. The seeds (fuzz/corpus/config) are the repository's
//! weir.toml files and the TOML blocks of the docs, written by fuzz/capture.py.
//!
//! Checked: nothing panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_core::Config;
use weir_jobs::{Job, PeriodicJob};
use weir_streams::SubscriptionDef;

fuzz_target!(|data: &[u8]| {
    let (text, env) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else { return };
    let env: Vec<(String, String)> = String::from_utf8_lossy(env)
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    let Ok(config) = Config::from_toml(text, "weir.toml", env) else { return };

    for entry in &config.periodic {
        // As weir's `periodic_from_config`.
        let mut job = Job::raw(&entry.kind, entry.args.clone()).queue(&entry.queue);
        if let Some(n) = entry.max_attempts {
            job = job.max_attempts(n);
        }
        let _ = job.validate();
        if let Ok(periodic) = PeriodicJob::new(entry.name(), &entry.cron, job)
            && let Some(tz) = &entry.timezone
        {
            let _ = periodic.timezone(tz);
        }
        let _ = entry.entry();
    }
    for c in &config.subscriptions {
        if let Ok(def) = SubscriptionDef::from_config(c) {
            let _ = def.sink.check_environment();
            let _ = def.matcher();
        }
    }
});
