//! A producer per queue: claims as many jobs as it has free slots, runs each in its own task,
//! and hands the outcomes on.
//!
//! ```text
//!   wake-up (listener) ─┐  poll timer ─┐  a slot freed while the last claim was full ─┐
//!                       ▼              ▼                                               ▼
//!   demand = concurrency − running (+ room in the local queue, with `prefetch` and a backlog)
//!        │ claim: one statement, SKIP LOCKED, which also completes the runs that ended since
//!        │ the last claim (one commit for both)
//!        ▼
//!   job task: worker.work(ctx, args) under timeout / cancel ─► Outcome
//!        ├─ Completed, another claim follows at once ─► rides along with that claim
//!        └─ anything else, or no claim follows      ─► the completer
//! ```
//!
//! Invariants:
//! - Demand is remembered: a producer with free slots and no jobs fetches again on a wake-up,
//!   on its poll timer, and at once when a slot frees while the last claim was full (a
//!   backlog). With a local queue and a backlog, it tops the queue up once it is half empty,
//!   before it runs dry.
//! - A successful run is written once: by the next claim of its producer when one follows at
//!   once (backlog), else by the completer; both use the same fenced statement.
//! - On stop, jobs of the local queue that never started go back as they were (`Unstarted`);
//!   the producer ends after its running jobs, dropping its sender to the completer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use weir_core::{Chain, panic_message};

use crate::completer::{Finished, Outcome};
use crate::job::JobId;
use crate::metrics::QueueCounters;
use crate::shared::Shared;
use crate::store::{self, Claimed, Completions};
use crate::worker::{JobContext, JobErrorKind};

/// Claims and runs the jobs of one queue.
pub(crate) struct Producer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) queue: String,
    /// The kinds it claims, sorted: the queue's kinds with a worker here, or one kind whose
    /// worker has slots of its own.
    pub(crate) kinds: Vec<String>,
    pub(crate) concurrency: usize,
    pub(crate) wake: Arc<Notify>,
    pub(crate) stop: CancellationToken,
    pub(crate) done: mpsc::UnboundedSender<Finished>,
}

impl Producer {
    pub(crate) async fn run(self) {
        let counters = self.shared.metrics.queue(&self.queue).expect("queue has counters");
        let mut tasks: JoinSet<Outcome> = JoinSet::new();
        let mut runs: HashMap<tokio::task::Id, Claimed> = HashMap::new();
        // Successful runs not yet written: they ride along with the next claim, or go to the
        // completer when no claim follows at once.
        let mut done = Completions::default();
        let mut poll = tokio::time::interval(self.shared.config.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut want = true;
        let mut backlog = false;
        // Prefetched jobs waiting for a slot (only with `prefetch`).
        // Each with its wait until the claim and the moment of the claim: its wait to start
        // is recorded when it starts.
        let mut buffer: std::collections::VecDeque<(
            Claimed,
            CancellationToken,
            Duration,
            Instant,
        )> = std::collections::VecDeque::new();
        let prefetch = self.shared.config.prefetch as usize;
        loop {
            if self.stop.is_cancelled() {
                break;
            }
            while tasks.len() < self.concurrency
                && let Some((job, cancel, wait, claimed)) = buffer.pop_front()
            {
                counters.waited(wait + claimed.elapsed());
                let handle = tasks.spawn(self.run_job(job.clone(), cancel));
                runs.insert(handle.id(), job);
            }
            let free = self.concurrency - tasks.len();
            // Demand: the free slots; with a local queue and a backlog, also refill the local
            // queue once it is half empty (not at every freed slot: claims stay large).
            let room = if backlog && prefetch > 0 && buffer.len() <= prefetch / 2 {
                free + prefetch - buffer.len()
            } else {
                free
            };
            if want && room > 0 && !self.kinds.is_empty() {
                want = false;
                let riding = std::mem::take(&mut done);
                match self.claim(room, &riding).await {
                    Ok((jobs, completed)) => {
                        self.count_completions(&riding, &completed, counters);
                        // A full claim means more may be waiting: refill as soon as a slot
                        // frees (and the local queue once it is half empty). A short one took
                        // what there was; new jobs wake the producer by notification. (Claiming
                        // on until a claim came back empty made two claims per job of a steady
                        // trickle.)
                        backlog = jobs.len() == room;
                        counters.claimed(jobs.len());
                        for mut job in jobs {
                            if let Some(cap) = self.shared.workers[&job.kind].max_attempts() {
                                job.max_attempts = job.max_attempts.min(cap as i32);
                            }
                            let wait = Duration::from_micros(job.wait_us.max(0) as u64);
                            // Registered at once, so a cancel reaches a job still in the local queue.
                            let cancel = self.shared.hard.child_token();
                            self.shared
                                .running
                                .lock()
                                .expect("running lock")
                                .insert(job.id, cancel.clone());
                            if tasks.len() < self.concurrency {
                                counters.waited(wait);
                                let handle = tasks.spawn(self.run_job(job.clone(), cancel));
                                runs.insert(handle.id(), job);
                            } else {
                                buffer.push_back((job, cancel, wait, Instant::now()));
                            }
                        }
                        if backlog && prefetch > 0 {
                            // Keep the local queue topped up while the slots work.
                            want = true;
                        }
                    }
                    Err(e) => {
                        let transient = weir_log::sqlstate::is_transient(&e);
                        warn!(error = %e, transient, "claim failed; retrying after the poll interval");
                        backlog = false;
                        done = riding;
                    }
                }
            }
            if !done.ids.is_empty() {
                self.hand_over(&mut done);
            }
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                Some(res) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    self.finished(res, &mut runs, &mut done, counters);
                    // Let runs that are about to end do so, then collect every run that ended,
                    // so that one claim refills all their slots.
                    tokio::task::yield_now().await;
                    while let Some(res) = tasks.try_join_next_with_id() {
                        self.finished(res, &mut runs, &mut done, counters);
                    }
                    if backlog {
                        want = true;
                    }
                }
                _ = self.wake.notified() => want = true,
                _ = poll.tick() => want = true,
            }
        }
        for (job, ..) in buffer {
            self.shared.running.lock().expect("running lock").remove(&job.id);
            counters.ended();
            let _ = self.done.send(Finished {
                id: job.id,
                attempt: job.attempt,
                max_attempts: job.max_attempts,
                queue: job.queue,
                outcome: Outcome::Unstarted,
            });
        }
        while let Some(res) = tasks.join_next_with_id().await {
            self.finished(res, &mut runs, &mut done, counters);
        }
        self.hand_over(&mut done);
    }

    async fn claim(
        &self,
        free: usize,
        done: &Completions,
    ) -> sqlx::Result<(Vec<Claimed>, Vec<i64>)> {
        let mut conn = self.shared.pool.acquire().await?;
        store::claim(
            &mut conn,
            &self.queue,
            &self.kinds,
            free as i64,
            self.shared.process.as_str(),
            done,
            self.shared.config.keep_completed,
            self.shared.config.limits.get(&self.queue),
        )
        .await
    }

    fn count_completions(&self, riding: &Completions, completed: &[i64], c: &QueueCounters) {
        c.completed(completed.len() as u64);
        if completed.len() < riding.ids.len() {
            let completed: std::collections::HashSet<&i64> = completed.iter().collect();
            for (id, attempt) in riding.ids.iter().zip(&riding.attempts) {
                if !completed.contains(id) {
                    c.fenced();
                    warn!(id, attempt, "completion rejected: the job was rescued or cancelled");
                }
            }
        }
    }

    /// Sends unwritten completions to the completer.
    fn hand_over(&self, done: &mut Completions) {
        for (id, attempt) in done.ids.drain(..).zip(done.attempts.drain(..)) {
            let _ = self.done.send(Finished {
                id,
                attempt,
                max_attempts: 0,
                queue: self.queue.clone(),
                outcome: Outcome::Completed,
            });
        }
    }

    fn run_job(
        &self,
        job: Claimed,
        cancel: CancellationToken,
    ) -> impl std::future::Future<Output = Outcome> + Send + 'static {
        let shared = self.shared.clone();
        async move {
            let worker = shared.workers[&job.kind].clone();
            let ctx = JobContext::new(
                JobId(job.id),
                job.queue.clone(),
                job.kind.clone(),
                job.attempt as u32,
                job.max_attempts as u32,
                job.created_at,
                shared.pool.clone(),
                cancel.clone(),
                shared.config.keep_completed,
            );
            let timeout = job
                .timeout_ms
                .map(|ms| Duration::from_millis(ms as u64))
                .or_else(|| worker.timeout())
                .or(shared.config.default_timeout);
            let work = worker.run(ctx.clone(), job.args);
            let result = tokio::select! {
                biased;
                _ = cancel.cancelled() => None,
                r = async {
                    match timeout {
                        Some(t) => tokio::time::timeout(t, work).await.map_err(|_| t),
                        None => Ok(work.await),
                    }
                } => Some(r),
            };
            shared.running.lock().expect("running lock").remove(&job.id);
            if ctx.completed() {
                return Outcome::CompletedInTx;
            }
            let attempt = job.attempt as u32;
            match result {
                None if shared.hard.is_cancelled() => Outcome::Interrupted,
                None => Outcome::Cancelled,
                Some(Err(t)) => {
                    cancel.cancel();
                    Outcome::Failed {
                        error: format!("timed out after {t:?}"),
                        retry_in: worker.backoff(attempt),
                    }
                }
                Some(Ok(Ok(()))) => Outcome::Completed,
                Some(Ok(Err(e))) => match e.kind {
                    JobErrorKind::Retry { error, after } => Outcome::Failed {
                        error: Chain(error.as_ref()).to_string(),
                        retry_in: after.unwrap_or_else(|| worker.backoff(attempt)),
                    },
                    JobErrorKind::Discard(error) => {
                        Outcome::Discard(Chain(error.as_ref()).to_string())
                    }
                    JobErrorKind::Snooze(d) => Outcome::Snooze(d),
                },
            }
        }
    }

    fn finished(
        &self,
        res: std::result::Result<(tokio::task::Id, Outcome), tokio::task::JoinError>,
        runs: &mut HashMap<tokio::task::Id, Claimed>,
        done: &mut Completions,
        counters: &QueueCounters,
    ) {
        let (task, outcome) = match res {
            Ok((task, outcome)) => (task, outcome),
            Err(e) => {
                let task = e.id();
                let outcome = if e.is_panic() {
                    let msg = panic_message(&*e.into_panic());
                    let attempt = runs.get(&task).map_or(1, |j| j.attempt as u32);
                    let backoff = runs
                        .get(&task)
                        .and_then(|j| self.shared.workers.get(&j.kind))
                        .map_or(Duration::from_secs(1), |w| w.backoff(attempt));
                    Outcome::Failed { error: format!("worker panicked: {msg}"), retry_in: backoff }
                } else {
                    Outcome::Interrupted
                };
                (task, outcome)
            }
        };
        counters.ended();
        let Some(job) = runs.remove(&task) else { return };
        if matches!(outcome, Outcome::Interrupted | Outcome::Cancelled | Outcome::Failed { .. })
            && let Some(t) = self.shared.running.lock().expect("running lock").remove(&job.id)
        {
            t.cancel();
        }
        if matches!(outcome, Outcome::Completed) {
            done.ids.push(job.id);
            done.attempts.push(job.attempt);
            return;
        }
        let _ = self.done.send(Finished {
            id: job.id,
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            queue: job.queue,
            outcome,
        });
    }
}
