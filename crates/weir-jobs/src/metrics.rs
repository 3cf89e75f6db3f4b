//! What a runner did, per queue: in-process counters (for [`MetricsSnapshot`]) and the same
//! figures through the `metrics` facade, which `weir-server` exports at `/metrics`.
//!
//! | metric | kind | recorded |
//! |---|---|---|
//! | `weir_jobs_queued{queue}` | gauge | available jobs in the table, sampled at each heartbeat |
//! | `weir_jobs_running{queue}` | gauge | jobs running in this process |
//! | `weir_jobs_completed_total{queue}` | counter | jobs completed (by the runner or in the worker's transaction) |
//! | `weir_jobs_failed_total{queue}` | counter | failed attempts (errors, timeouts, panics), retried or not |
//! | `weir_jobs_discarded_total{queue}` | counter | jobs discarded (attempts exhausted, or by the worker) |
//! | `weir_jobs_wait_seconds{queue}` | histogram | from the time a job could run (`scheduled_at`) to its start here (its claim, plus any wait in the local queue with `prefetch`) |
//!
//! The facade's macros are called at each event (not handles taken at start), so a recorder
//! installed after the runner started still sees everything from then on. Database-wide
//! figures of every queue (scheduled, retryable, completed in the last minute) come from
//! [`crate::admin::stats`].

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Gauge: available jobs of a queue in `weir.jobs`.
pub const QUEUED: &str = "weir_jobs_queued";
/// Gauge: jobs of a queue running in this process.
pub const RUNNING: &str = "weir_jobs_running";
/// Counter: jobs of a queue completed.
pub const COMPLETED: &str = "weir_jobs_completed_total";
/// Counter: failed attempts of a queue's jobs.
pub const FAILED: &str = "weir_jobs_failed_total";
/// Counter: jobs of a queue discarded.
pub const DISCARDED: &str = "weir_jobs_discarded_total";
/// Histogram: seconds from the time a job could run (`scheduled_at`) to its claim.
pub const WAIT_SECONDS: &str = "weir_jobs_wait_seconds";

/// Counters of one queue in one process.
#[derive(Debug)]
pub(crate) struct QueueCounters {
    queue: String,
    running: AtomicU64,
    claims: AtomicU64,
    claimed: AtomicU64,
    completion_writes: AtomicU64,
    completed: AtomicU64,
    retried: AtomicU64,
    discarded: AtomicU64,
    snoozed: AtomicU64,
    fenced: AtomicU64,
    wait: Mutex<Histogram>,
}

fn add(counter: &AtomicU64, n: u64) -> u64 {
    counter.fetch_add(n, Ordering::Relaxed) + n
}

impl QueueCounters {
    fn new(queue: String) -> Self {
        Self {
            queue,
            running: AtomicU64::new(0),
            claims: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
            completion_writes: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            snoozed: AtomicU64::new(0),
            fenced: AtomicU64::new(0),
            wait: Mutex::new(Histogram::default()),
        }
    }

    /// A claim statement that claimed `jobs` jobs, now running here.
    pub(crate) fn claimed(&self, jobs: usize) {
        add(&self.claims, 1);
        add(&self.claimed, jobs as u64);
        let running = add(&self.running, jobs as u64);
        metrics::gauge!(RUNNING, "queue" => self.queue.clone()).set(running as f64);
    }

    /// A job starts after waiting `wait` since the time it could run.
    pub(crate) fn waited(&self, wait: Duration) {
        self.wait.lock().expect("histogram lock").record(wait);
        metrics::histogram!(WAIT_SECONDS, "queue" => self.queue.clone()).record(wait.as_secs_f64());
    }

    /// A claimed job stopped running here (finished, or never started).
    pub(crate) fn ended(&self) {
        let running = self.running.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        metrics::gauge!(RUNNING, "queue" => self.queue.clone()).set(running as f64);
    }

    /// Sets the running gauge from the count (the heartbeat does, so it converges).
    pub(crate) fn sample_running(&self) {
        let running = self.running.load(Ordering::Relaxed);
        metrics::gauge!(RUNNING, "queue" => self.queue.clone()).set(running as f64);
    }

    /// `n` jobs completed.
    pub(crate) fn completed(&self, n: u64) {
        if n > 0 {
            add(&self.completed, n);
            metrics::counter!(COMPLETED, "queue" => self.queue.clone()).increment(n);
        }
    }

    /// A batched completion statement ran.
    pub(crate) fn completion_written(&self) {
        add(&self.completion_writes, 1);
    }

    /// An attempt failed and the job will be retried.
    pub(crate) fn retried(&self) {
        add(&self.retried, 1);
        metrics::counter!(FAILED, "queue" => self.queue.clone()).increment(1);
    }

    /// A job was discarded; `failed` when its last attempt failed (rather than the worker
    /// discarding it).
    pub(crate) fn discarded(&self, failed: bool) {
        add(&self.discarded, 1);
        if failed {
            metrics::counter!(FAILED, "queue" => self.queue.clone()).increment(1);
        }
        metrics::counter!(DISCARDED, "queue" => self.queue.clone()).increment(1);
    }

    /// A job snoozed.
    pub(crate) fn snoozed(&self) {
        add(&self.snoozed, 1);
    }

    /// An outcome was rejected by the fence.
    pub(crate) fn fenced(&self) {
        add(&self.fenced, 1);
    }
}

/// Sets the queued gauge of `queue`: its available jobs in the table.
pub(crate) fn sample_queued(queue: &str, available: i64) {
    metrics::gauge!(QUEUED, "queue" => queue.to_string()).set(available as f64);
}

/// The counters of every queue of a runner.
#[derive(Debug)]
pub(crate) struct Metrics {
    pub(crate) started: Instant,
    pub(crate) queues: BTreeMap<String, QueueCounters>,
}

impl Metrics {
    pub(crate) fn new(queues: impl IntoIterator<Item = String>) -> Self {
        Self {
            started: Instant::now(),
            queues: queues.into_iter().map(|q| (q.clone(), QueueCounters::new(q))).collect(),
        }
    }

    pub(crate) fn queue(&self, name: &str) -> Option<&QueueCounters> {
        self.queues.get(name)
    }

    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        let uptime = self.started.elapsed();
        let queues = self
            .queues
            .iter()
            .map(|(name, c)| {
                let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
                let wait = c.wait.lock().expect("histogram lock");
                let completed = get(&c.completed);
                QueueMetrics {
                    queue: name.clone(),
                    running: get(&c.running),
                    claims: get(&c.claims),
                    claimed: get(&c.claimed),
                    completion_writes: get(&c.completion_writes),
                    completed,
                    retried: get(&c.retried),
                    discarded: get(&c.discarded),
                    snoozed: get(&c.snoozed),
                    fenced: get(&c.fenced),
                    completed_per_sec: completed as f64 / uptime.as_secs_f64().max(1e-3),
                    wait_p50: wait.quantile(0.5),
                    wait_p99: wait.quantile(0.99),
                }
            })
            .collect();
        MetricsSnapshot { uptime, queues }
    }
}

/// What a runner did, per queue, since it started.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MetricsSnapshot {
    /// Time since the runner started.
    pub uptime: Duration,
    /// One entry per queue the runner works.
    pub queues: Vec<QueueMetrics>,
}

/// One queue's figures in one process.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct QueueMetrics {
    /// The queue.
    pub queue: String,
    /// Jobs running now.
    pub running: u64,
    /// Claim statements run.
    pub claims: u64,
    /// Jobs claimed.
    pub claimed: u64,
    /// Batched completion statements run.
    pub completion_writes: u64,
    /// Jobs completed (by the runner or in the worker's transaction).
    pub completed: u64,
    /// Failed attempts that will be retried.
    pub retried: u64,
    /// Jobs discarded (attempts exhausted or discarded by the worker).
    pub discarded: u64,
    /// Snoozes.
    pub snoozed: u64,
    /// Outcomes rejected by the fence (the job was rescued or cancelled meanwhile).
    pub fenced: u64,
    /// `completed` over the uptime.
    pub completed_per_sec: f64,
    /// Median wait between the time a job could run and its start.
    pub wait_p50: Duration,
    /// 99th percentile of that wait.
    pub wait_p99: Duration,
}

/// A log-linear histogram of microseconds: 16 buckets per power of two (~6% resolution).
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { counts: vec![0; 64 * 16], total: 0 }
    }
}

impl Histogram {
    fn index(us: u64) -> usize {
        if us < 16 {
            return us as usize;
        }
        let e = 63 - us.leading_zeros() as usize; // >= 4
        let sub = ((us >> (e - 4)) & 15) as usize;
        (e - 3) * 16 + sub
    }

    fn lower_bound(index: usize) -> u64 {
        if index < 16 {
            return index as u64;
        }
        let e = index / 16 + 3;
        let sub = (index % 16) as u64;
        (16 + sub) << (e - 4)
    }

    /// Records one value.
    pub fn record(&mut self, value: Duration) {
        let us = value.as_micros().min(u128::from(u64::MAX)) as u64;
        self.counts[Self::index(us)] += 1;
        self.total += 1;
    }

    /// Number of values.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The value at quantile `q` (0..=1), to the bucket's resolution; zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                // The middle of the bucket.
                let lo = Self::lower_bound(i);
                let hi = Self::lower_bound(i + 1);
                return Duration::from_micros(lo + (hi - lo) / 2);
            }
        }
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_within_resolution() {
        let mut h = Histogram::default();
        for us in 1..=10_000u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile(0.5).as_micros() as f64;
        let p99 = h.quantile(0.99).as_micros() as f64;
        assert!((p50 / 5000.0 - 1.0).abs() < 0.07, "{p50}");
        assert!((p99 / 9900.0 - 1.0).abs() < 0.07, "{p99}");
        assert_eq!(Histogram::default().quantile(0.5), Duration::ZERO);
    }
}
