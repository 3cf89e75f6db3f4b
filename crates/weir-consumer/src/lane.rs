//! The lane task: one per lane this process holds, handling that lane's events in log order.
//!
//! ```text
//! loop (Lane::run):
//!   retry requested parked events            (only while the lane has parked events)
//!   consumer halted or stopped? ─► wait     (its row as read for all lanes here: view.rs)
//!   a re-split in progress? ─► read only up to its position; there, wait
//!   head := the Wake's (told by the appender in this process, or NOTIFY; from the log at
//!           start and after a wait no wake-up ended)
//!   read a page after pos (shared by the consumer's lanes in this process: pages.rs)
//!                          ─► route each event the operator matches:
//!                             hash(k) % lanes == this lane for one of its partition keys k?
//!     no  ─► pos moves past it
//!     several keys (a row whose key moved) ─► alone, through handle_keys(the keys it owns here)
//!     yes ─► group (≤ spec.group, 50 by default; a short one may wait spec.linger for more):
//!            prepare (work outside the database: a sink's delivery, no transaction held)
//!            BEGIN; handle_group; fenced checkpoint; COMMIT
//!            a failure rolls the group back ─► its events one by one through Lane::handle
//!   nothing selected up to the head ─► checkpoint := head (the watermark moves, written with
//!                                       the other lanes' here: marks.rs), wait
//!
//! Lane::handle(event):
//!   its key parked earlier? ─► park it behind (same key, same lane, in order)
//!   loop { attempt: prepare; BEGIN; handler; fenced checkpoint; COMMIT
//!          failure ─► policy(failure, attempt):
//!            Retry(delay) ─► record, status retrying, sleep, again
//!            Halt         ─► record, halt the consumer, wait for resume (again) or skip (done)
//!            Skip         ─► record as skipped + checkpoint, in one transaction
//!            Park         ─► park + record + checkpoint, in one transaction }
//! ```
//!
//! `policy` applies the handler's own answer first ([`OperatorError`]: skip and park act at
//! once, `retry_after` replaces the backoff's wait), then the consumer's: retries up to
//! `max_retries` with [`RetryConfig::delay`](weir_core::RetryConfig::delay), then
//! `on_exhausted`. A retry whose cause is a failure of the statement itself (SQLSTATE class
//! `42`, [`weir_log::sqlstate::is_statement_error`]: a dropped column, a type that no longer
//! binds) halts at once, whatever `on_exhausted` says: it would fail every event alike.
//!
//! Parked keys: the events of a parked key must wait behind it. A lane checks each event's key
//! against `weir.parked` (one query per event, and no grouping) only when it may have parked
//! keys: always for an `on_exhausted = "park"` consumer, otherwise while the lane has parked
//! rows — known from one `exists` query when the lane starts (it holds the lane's lease: no
//! one else parks its events), set the moment the lane parks an event (a handler's
//! [`OperatorError::park`]), and looked up again per page while true (a discard or a retry
//! elsewhere clears it). A lane that never parked pays one query when it starts.
//!
//! At a live rate every lane wakes for every event, and most only move past it: such a lane
//! reads nothing alone (the page, the consumer's row and the head are shared) and writes only
//! its watermark, batched with the others'; its status stays `idle`, and a lane handling a
//! steady stream stays `running` until nothing came for a poll interval.
//!
//! [`OperatorError`]: crate::OperatorError
//! [`OperatorError::park`]: crate::OperatorError::park

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use weir_core::{Event, OnExhausted};

use crate::engine::{ConsumerSpec, Shared};
use crate::operator::Action;
use crate::route::route;
use crate::state::{ConsumerState, LaneState, Outcome};
use crate::{Result, store};

/// Events read per page.
const PAGE: i64 = 500;
/// How often a lane of a halted consumer looks whether it was resumed.
const HALTED_POLL: Duration = Duration::from_millis(200);

/// How handling ended.
enum Handled {
    /// Handled, skipped or parked: the checkpoint is past it.
    Done,
    /// The lease is gone or the lane is stopping: stop without touching anything.
    LostLease,
}

/// An event's keys on this lane: those of its [`partition_keys`](crate::Operator::partition_keys)
/// that route here, in the operator's order; `several` when it has more than one distinct key
/// (an update that moved its row): it is then handled alone, for `mine`, through
/// `handle_keys`, and never parked (it would be parked under two keys at once).
struct Keys {
    mine: Vec<String>,
    several: bool,
}

/// This lane's keys of an event, or why it has none (it then fails on lane 0).
type LaneKeys = std::result::Result<Keys, String>;

/// A failed attempt: its message and what the handler asked for.
struct Failure {
    error: String,
    action: Action,
    /// The handler's statement itself failed ([`weir_log::sqlstate::is_statement_error`]): it
    /// fails the same way for every event, so a retry halts at once.
    statement: bool,
}

impl Failure {
    fn retry(error: String) -> Self {
        Self { error, action: Action::Retry { after: None }, statement: false }
    }
}

/// The SQLSTATE of the first database error in `error`'s chain that says the statement
/// cannot run at all ([`weir_log::sqlstate::is_statement_error`]).
fn statement_error(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    std::iter::successors(Some(error), |e| e.source()).find_map(|e| {
        match e.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Database(db)) => db
                .code()
                .filter(|c| weir_log::sqlstate::is_statement_error_code(c))
                .map(std::borrow::Cow::into_owned),
            _ => None,
        }
    })
}

/// One attempt's result.
enum Attempted {
    Committed,
    LostLease,
    Failed(Failure),
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Retry(Duration),
    Halt,
    Skip,
    Park,
    Stop,
}

/// After halting: how the wait ended.
enum AfterHalt {
    /// `weir resume`: try the event again.
    Resumed,
    /// `weir skip` moved the checkpoint past the event.
    Skipped,
    /// The lane is stopping.
    Stopped,
}

pub(crate) struct Lane {
    shared: Shared,
    spec: ConsumerSpec,
    lane: i32,
    fence: i64,
    cancel: CancellationToken,
    /// The state last written to the lane's row (`None` before the first).
    state: Option<LaneState>,
    /// Whether this lane may have parked events (see the module doc).
    has_parked: bool,
}

impl Lane {
    pub(crate) fn new(
        shared: Shared,
        spec: ConsumerSpec,
        lane: i32,
        fence: i64,
        cancel: CancellationToken,
    ) -> Self {
        Self { shared, spec, lane, fence, cancel, state: None, has_parked: false }
    }

    pub(crate) async fn run(mut self) -> Result<()> {
        let filter = self.spec.operator.selector().filter();
        let lanes = self.spec.lane_count();
        let mut pos =
            store::lane::checkpoint_position(&self.shared.pool, &self.spec.name, self.lane).await?;
        let mut stored = pos;
        let mut wake = self.shared.wake.clone();
        // When the lane first saw a group that is not full (see `ConsumerSpec::linger`).
        let mut linger_since: Option<std::time::Instant> = None;
        // Whether the head this process knows may be behind (at start, and after a wait that
        // no wake-up ended: a notification may have been lost); then it is read from the log.
        let mut stale_head = true;
        // Only this lane parks its events, so after one look it knows, until it parks.
        let mut parked_known = false;
        loop {
            if self.cancel.is_cancelled() {
                return Ok(());
            }
            if self.spec.on_exhausted != OnExhausted::Park && (!parked_known || self.has_parked) {
                self.has_parked =
                    store::lane::lane_has_parked(&self.shared.pool, &self.spec.name, self.lane)
                        .await?;
                parked_known = true;
            }
            if self.checks_parked() {
                self.retry_parked().await?;
            }
            let (state, drain_to) = self.sync_state(false).await?;
            match state {
                ConsumerState::Halted => {
                    self.set_state(LaneState::Halted, None, 0, None).await?;
                    self.sleep(HALTED_POLL).await;
                    continue;
                }
                ConsumerState::Stopped => {
                    self.set_state(LaneState::Stopped, None, 0, None).await?;
                    self.sleep(HALTED_POLL).await;
                    continue;
                }
                ConsumerState::Running => {}
            }
            // The head: as this process was told of it (committed, so everything up to it can
            // be read), or from the log when that may be behind.
            if stale_head {
                wake.advance(self.shared.reader.head().await?);
                stale_head = false;
            }
            let mut head = wake.head();
            // A re-split in progress: nothing past its position until the lanes are re-split.
            if let Some(d) = drain_to {
                head = head.min(d);
                if pos >= d {
                    if d > stored {
                        if !self.checkpoint_alone(d).await? {
                            return Ok(());
                        }
                        stored = d;
                    }
                    self.set_state(LaneState::Stopped, None, 0, None).await?;
                    self.sleep(HALTED_POLL).await;
                    continue;
                }
            }
            // Read once per process for all the consumer's lanes (pages.rs).
            let page = self
                .shared
                .pages
                .read(
                    &self.shared.reader,
                    &self.spec.name,
                    self.spec.generation,
                    pos,
                    head,
                    PAGE,
                    &filter,
                )
                .await?;
            let mut short = page.short;
            let mut events = page.events();
            if let Some(d) = drain_to
                && events.last().is_some_and(|e| e.position > d)
            {
                events = &events[..events.partition_point(|e| e.position <= d)];
                short = true;
            }
            if events.is_empty() {
                // Nothing selected up to the head: move the watermark there.
                if head > stored {
                    if !self.checkpoint_alone(head).await? {
                        return Ok(());
                    }
                    stored = head;
                }
                pos = pos.max(head);
                let seen = tokio::select! {
                    _ = self.cancel.cancelled() => return Ok(()),
                    seen = wake.wait_past(pos, self.spec.poll_interval) => seen,
                };
                // Idle once nothing came for a poll interval: a lane at a steady rate stays
                // running rather than writing its status twice per event.
                stale_head = seen <= pos;
                if stale_head {
                    self.set_state(LaneState::Idle, None, 0, None).await?;
                }
                continue;
            }
            // A group that is not full may wait up to `linger` for more (a sink's batch).
            if short && !self.spec.linger.is_zero() && events.len() < self.spec.group {
                let since = *linger_since.get_or_insert_with(std::time::Instant::now);
                let left = self.spec.linger.saturating_sub(since.elapsed());
                if !left.is_zero() {
                    let last = events.last().expect("not empty").position;
                    tokio::select! {
                        _ = self.cancel.cancelled() => return Ok(()),
                        _ = wake.wait_past(last, left) => {}
                    }
                    continue;
                }
            }
            linger_since = None;
            // Consecutive events of this lane are handled in one transaction with one fenced
            // checkpoint (a group); `pos` only moves past events that are done or not ours.
            let mut group: Vec<&Event> = Vec::new();
            let mut last_seen = pos;
            let mut stopped = false;
            for event in events {
                if self.cancel.is_cancelled() || self.halted_here() {
                    stopped = true;
                    break;
                }
                last_seen = event.position;
                // Not selected (beyond the SQL filter), or another lane's: not ours.
                let Some(keys) = self.keys_here(event, lanes) else {
                    if group.is_empty() {
                        pos = event.position;
                    }
                    continue;
                };
                // Running only while it has events of its own (moving past the others' is
                // what an idle lane does too).
                self.set_state(LaneState::Running, None, 0, None).await?;
                // Alone: an event without a key, one with several, or one that may have to
                // wait behind its key.
                let single = keys.as_ref().is_err()
                    || keys.as_ref().is_ok_and(|k| k.several)
                    || self.checks_parked();
                if !single {
                    group.push(event);
                    if group.len() < self.spec.group.max(1) {
                        continue;
                    }
                }
                if let Handled::LostLease = self.flush(&mut group).await? {
                    return Ok(());
                }
                if single && let Handled::LostLease = self.handle(event, &keys).await? {
                    return Ok(());
                }
                pos = last_seen;
                stored = pos;
            }
            if !stopped {
                if let Handled::LostLease = self.flush(&mut group).await? {
                    return Ok(());
                }
                if last_seen > pos {
                    pos = last_seen;
                }
            }
            if short
                && !self.cancel.is_cancelled()
                && self.sync_state(false).await?.0 == ConsumerState::Running
            {
                pos = pos.max(head);
            }
            if pos > stored {
                if !self.checkpoint_alone(pos).await? {
                    return Ok(());
                }
                stored = pos;
            }
        }
    }

    /// The keys of `event` this lane owns; `None` when it is not this lane's (not matched, or
    /// every key routes elsewhere). A key that cannot be computed fails on lane 0.
    fn keys_here(&self, event: &Event, lanes: i32) -> Option<LaneKeys> {
        if !self.spec.operator.matches(event) {
            return None;
        }
        let all = match self.spec.operator.partition_keys(event) {
            Ok(all) if all.is_empty() => Err("the operator gave no partition key".to_string()),
            Ok(all) => Ok(all),
            Err(e) => Err(e.to_string()),
        };
        let all = match all {
            Ok(all) => all,
            Err(e) => return (self.lane == 0).then_some(Err(e)),
        };
        let mut distinct: Vec<&String> = Vec::with_capacity(all.len());
        let mut mine = Vec::new();
        for k in &all {
            if distinct.contains(&k) {
                continue;
            }
            distinct.push(k);
            if route(k, lanes) == self.lane {
                mine.push(k.clone());
            }
        }
        (!mine.is_empty()).then_some(Ok(Keys { mine, several: distinct.len() > 1 }))
    }

    /// Whether each event's key must be checked against the parked ones.
    fn checks_parked(&self) -> bool {
        self.has_parked || self.spec.on_exhausted == OnExhausted::Park
    }

    /// Handles a group of this lane's events: all in one transaction with one checkpoint; if
    /// any fails, the group rolls back and its events go one by one through the retry policy.
    async fn flush(&mut self, group: &mut Vec<&Event>) -> Result<Handled> {
        let events = std::mem::take(group);
        // One of them failing (`None`) sends them one by one below, to isolate it.
        if events.len() > 1
            && let Some(handled) = self.attempt_group(&events).await?
        {
            return Ok(handled);
        }
        for event in events {
            // A group holds events of this lane with one key each.
            let keys = self
                .keys_here(event, self.spec.lane_count())
                .unwrap_or_else(|| Err("the event no longer routes to this lane".into()));
            if let Handled::LostLease = self.handle(event, &keys).await? {
                return Ok(Handled::LostLease);
            }
        }
        Ok(Handled::Done)
    }

    /// One transaction for several events; `None` when a handler failed (rolled back).
    async fn attempt_group(&self, events: &[&Event]) -> Result<Option<Handled>> {
        if self.call(self.spec.operator.prepare(events)).await.is_some() {
            return Ok(None);
        }
        let mut conn = self.shared.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        if self.call_group(&mut tx, events).await.is_some() {
            let _ = tx.rollback().await;
            return Ok(None);
        }
        let last = events.last().expect("a group has events").position;
        if !self.fenced_checkpoint(&mut tx, last).await? {
            let _ = tx.rollback().await;
            return Ok(Some(Handled::LostLease));
        }
        if let Err(e) = tx.commit().await
            && !self.committed_anyway(last, &e).await?
        {
            return Ok(None);
        }
        metrics::counter!("weir_consumer_events_handled_total", "consumer" => self.spec.name.clone())
            .increment(events.len() as u64);
        Ok(Some(Handled::Done))
    }

    /// The first of `keys` with an earlier event parked (so this one must wait behind it).
    async fn parked_key<'k>(&self, keys: &'k LaneKeys) -> Result<Option<&'k String>> {
        if !self.checks_parked() {
            return Ok(None);
        }
        let Ok(keys) = keys else { return Ok(None) };
        for k in &keys.mine {
            if store::lane::key_parked(&self.shared.pool, &self.spec.name, k).await? {
                return Ok(Some(k));
            }
        }
        Ok(None)
    }

    /// Handles one event: attempts until it is done, or the policy halts, skips or parks it.
    /// An event with several keys is never parked (it would wait under two keys at once): where
    /// it would be, the consumer halts at it instead.
    async fn handle(&mut self, event: &Event, keys: &LaneKeys) -> Result<Handled> {
        let several = keys.as_ref().is_ok_and(|k| k.several);
        if !several && let Some(k) = self.parked_key(keys).await? {
            let k = k.clone();
            return self.park(event, &k, "an earlier event of this key is parked", 0).await;
        }
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            // Behind a parked key (checked again after every resume): halt, not park.
            let blocked = match several {
                true => self.parked_key(keys).await?.cloned(),
                false => None,
            };
            let behind_parked = blocked.is_some();
            let failure = match (keys, blocked) {
                (_, Some(k)) => Failure {
                    error: format!(
                        "the event moves its row from one key to another, and an earlier event \
                         of key `{k}` is parked; retry or discard the parked events of `{k}` \
                         (`weir parked`), then `weir resume {}`",
                        self.spec.name
                    ),
                    action: Action::Retry { after: None },
                    statement: false,
                },
                (Ok(k), None) => match self.attempt(event, k).await? {
                    Attempted::Committed => return Ok(Handled::Done),
                    Attempted::LostLease => return Ok(Handled::LostLease),
                    Attempted::Failed(failure) => failure,
                },
                (Err(e), None) => Failure::retry(format!("no partition key: {e}")),
            };
            metrics::counter!("weir_consumer_failures_total", "consumer" => self.spec.name.clone())
                .increment(1);
            let mut step = self.policy(&failure, attempt);
            let mut error = failure.error;
            if behind_parked {
                step = Step::Halt;
            } else if several && step == Step::Park {
                step = Step::Halt;
                error = format!(
                    "{error} (an event that moves its row to another key is halted at, never \
                     parked)"
                );
            }
            let outcome = match step {
                Step::Retry(delay) => {
                    if !self.retry(event, attempt, &error, delay).await? {
                        return Ok(Handled::LostLease);
                    }
                    continue;
                }
                Step::Stop => {
                    match self.stop(event, attempt as i32, &error).await? {
                        AfterHalt::Resumed => attempt = 0,
                        AfterHalt::Skipped => return Ok(Handled::Done),
                        AfterHalt::Stopped => return Ok(Handled::LostLease),
                    }
                    continue;
                }
                Step::Halt => OnExhausted::Halt,
                Step::Skip => OnExhausted::Skip,
                Step::Park => OnExhausted::Park,
            };
            self.shared.reporter.exhausted(&self.spec.name, event, attempt, &error, outcome);
            let attempts = attempt as i32;
            match step {
                Step::Halt => match self.halt(event, attempts, &error).await? {
                    AfterHalt::Resumed => attempt = 0,
                    AfterHalt::Skipped => return Ok(Handled::Done),
                    AfterHalt::Stopped => return Ok(Handled::LostLease),
                },
                Step::Skip => return self.skip(event, attempts, &error).await,
                Step::Park => {
                    let k = match keys {
                        Ok(k) => k.mine.first().map(String::as_str).unwrap_or_default(),
                        Err(_) => "",
                    };
                    return self.park(event, k, &error, attempts).await;
                }
                Step::Retry(_) | Step::Stop => unreachable!("handled above"),
            }
        }
    }

    /// What to do after failed attempt number `attempt` (from 1): the handler's answer first,
    /// then the consumer's retry policy and `on_exhausted`.
    fn policy(&self, failure: &Failure, attempt: u32) -> Step {
        let retry = &self.spec.retry;
        match failure.action {
            Action::Skip => Step::Skip,
            Action::Park => Step::Park,
            Action::Stop => Step::Stop,
            Action::Retry { .. } if failure.statement => Step::Halt,
            Action::Retry { after } if attempt <= retry.max_retries => {
                Step::Retry(after.unwrap_or_else(|| retry.delay(attempt)))
            }
            Action::Retry { .. } => match self.spec.on_exhausted {
                OnExhausted::Halt => Step::Halt,
                OnExhausted::Skip => Step::Skip,
                OnExhausted::Park => Step::Park,
            },
        }
    }

    /// One attempt: the handler (for this lane's keys when the event has several) and the
    /// checkpoint in one transaction.
    async fn attempt(&self, event: &Event, keys: &Keys) -> Result<Attempted> {
        if let Some(failure) = self.call(self.spec.operator.prepare(&[event])).await {
            return Ok(Attempted::Failed(failure));
        }
        let mut conn = self.shared.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let handled = match keys.several {
            true => self.call(self.spec.operator.handle_keys(&mut tx, event, &keys.mine)).await,
            false => self.call_handler(&mut tx, event).await,
        };
        if let Some(failure) = handled {
            let _ = tx.rollback().await;
            return Ok(Attempted::Failed(failure));
        }
        if !self.fenced_checkpoint(&mut tx, event.position).await? {
            let _ = tx.rollback().await;
            return Ok(Attempted::LostLease);
        }
        match tx.commit().await {
            Ok(()) => {
                metrics::counter!("weir_consumer_events_handled_total", "consumer" => self.spec.name.clone())
                    .increment(1);
                metrics::gauge!("weir_consumer_position", "consumer" => self.spec.name.clone(), "lane" => self.lane.to_string())
                    .set(event.position as f64);
                Ok(Attempted::Committed)
            }
            // A failed commit (serialization, constraint) is the handler's failure too.
            Err(e) if self.committed_anyway(event.position, &e).await? => Ok(Attempted::Committed),
            Err(e) => Ok(Attempted::Failed(Failure::retry(format!("commit failed: {e}")))),
        }
    }

    /// Retry: records the failure, shows the lane as retrying, and waits `delay`. False when
    /// the lane is stopping.
    async fn retry(
        &mut self,
        event: &Event,
        attempt: u32,
        error: &str,
        delay: Duration,
    ) -> Result<bool> {
        metrics::counter!("weir_consumer_retries_total", "consumer" => self.spec.name.clone())
            .increment(1);
        self.shared.reporter.retry(&self.spec.name, event, attempt, error, delay);
        let attempts = attempt as i32;
        let mut conn = self.shared.pool.acquire().await?;
        self.record_failure(&mut conn, event, attempts, error, Outcome::Retry).await?;
        drop(conn);
        self.set_state(LaneState::Retrying, Some(event.position), attempts, Some(error)).await?;
        self.sleep(delay).await;
        Ok(!self.cancel.is_cancelled())
    }

    /// Halt: records the failure, halts the consumer (every lane stops before its next event)
    /// and waits for `weir resume` or `weir skip`.
    async fn halt(&mut self, event: &Event, attempts: i32, error: &str) -> Result<AfterHalt> {
        let mut conn = self.shared.pool.acquire().await?;
        self.record_failure(&mut conn, event, attempts, error, Outcome::Halt).await?;
        drop(conn);
        store::consumer::halt(
            &self.shared.pool,
            &self.spec.name,
            self.lane,
            event.position,
            attempts,
            error,
        )
        .await?;
        self.set_state(LaneState::Halted, Some(event.position), attempts, Some(error)).await?;
        self.wait_until_running(event).await
    }

    /// Stop (the handler said nothing can succeed until someone acts): records the failure,
    /// stops the consumer with the error as its reason, and waits until it is started.
    async fn stop(&mut self, event: &Event, attempts: i32, error: &str) -> Result<AfterHalt> {
        let mut conn = self.shared.pool.acquire().await?;
        self.record_failure(&mut conn, event, attempts, error, Outcome::Stop).await?;
        drop(conn);
        tracing::warn!(consumer = %self.spec.name, position = event.position, %error, "stopped by its handler; start it again once the cause is fixed");
        store::consumer::stop(&self.shared.pool, &self.spec.name, Some(error)).await?;
        self.set_state(LaneState::Stopped, Some(event.position), attempts, Some(error)).await?;
        self.wait_until_running(event).await
    }

    /// After a halt or a stop at `event`: waits until the consumer runs again, and says whether
    /// the event is to be tried again or was skipped meanwhile.
    async fn wait_until_running(&mut self, event: &Event) -> Result<AfterHalt> {
        // Halted, then perhaps stopped: either way nothing runs until it runs again.
        while self.sync_state(true).await?.0 != ConsumerState::Running {
            self.sleep(HALTED_POLL).await;
            if self.cancel.is_cancelled() {
                return Ok(AfterHalt::Stopped);
            }
        }
        self.set_state(LaneState::Running, None, 0, None).await?;
        let now =
            store::lane::checkpoint_position(&self.shared.pool, &self.spec.name, self.lane).await?;
        Ok(if now >= event.position { AfterHalt::Skipped } else { AfterHalt::Resumed })
    }

    /// Skip: records the failure as skipped and moves the checkpoint past the event.
    async fn skip(&self, event: &Event, attempts: i32, error: &str) -> Result<Handled> {
        let mut conn = self.shared.pool.acquire().await?;
        let tx = conn.begin().await?;
        self.settle(tx, event, attempts, error, Outcome::Skip).await
    }

    /// Park: sets the event aside under its key, records it and moves the checkpoint past it,
    /// in one transaction. The key's later events wait behind it from now on.
    async fn park(
        &mut self,
        event: &Event,
        key: &str,
        error: &str,
        attempts: i32,
    ) -> Result<Handled> {
        self.has_parked = true;
        let mut conn = self.shared.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        store::lane::park(
            &mut tx,
            &self.spec.name,
            self.lane,
            event.position,
            key,
            &event.entity,
            error,
            attempts,
        )
        .await?;
        self.settle(tx, event, attempts, error, Outcome::Park).await
    }

    /// Ends an event without its handler's effect: records the failure with `outcome` and
    /// moves the fenced checkpoint past it, in `tx` (which may already hold a parked row).
    async fn settle(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        event: &Event,
        attempts: i32,
        error: &str,
        outcome: Outcome,
    ) -> Result<Handled> {
        self.record_failure(&mut tx, event, attempts, error, outcome).await?;
        if !self.fenced_checkpoint(&mut tx, event.position).await? {
            return Ok(Handled::LostLease);
        }
        tx.commit().await?;
        Ok(Handled::Done)
    }

    /// Runs the handler in `tx`; a returned error or a panic is the failure.
    async fn call_handler(&self, tx: &mut PgConnection, event: &Event) -> Option<Failure> {
        self.call(self.spec.operator.handle(tx, event)).await
    }

    /// Runs the handler on a group of events in `tx`, as [`call_handler`](Self::call_handler).
    async fn call_group(&self, tx: &mut PgConnection, events: &[&Event]) -> Option<Failure> {
        self.call(self.spec.operator.handle_group(tx, events)).await
    }

    async fn call(
        &self,
        handling: futures::future::BoxFuture<'_, std::result::Result<(), crate::OperatorError>>,
    ) -> Option<Failure> {
        let started = std::time::Instant::now();
        let outcome = AssertUnwindSafe(handling).catch_unwind().await;
        metrics::histogram!("weir_consumer_handler_seconds", "consumer" => self.spec.name.clone())
            .record(started.elapsed().as_secs_f64());
        match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(match (e.action, statement_error(&*e.error)) {
                (Action::Retry { .. }, Some(code)) => Failure {
                    error: format!(
                        "{} (SQLSTATE {code}: the statement fails for every event, so the \
                         consumer halted without retrying; fix the statement or the table, then \
                         `weir resume {}`)",
                        e.error, self.spec.name
                    ),
                    action: e.action,
                    statement: true,
                },
                _ => Failure { error: e.error.to_string(), action: e.action, statement: false },
            }),
            Err(panic) => Some(Failure::retry(format!(
                "handler panicked: {}",
                weir_core::panic_message(panic.as_ref())
            ))),
        }
    }

    /// Handles parked events someone asked to retry, oldest first; on success the parked row
    /// goes in the same transaction; a failure leaves it (and the rest of its key) parked.
    async fn retry_parked(&self) -> Result<()> {
        let pool = &self.shared.pool;
        let requests = store::lane::retry_requests(pool, &self.spec.name, self.lane).await?;
        let mut failed_keys: Vec<String> = Vec::new();
        for (position, key) in requests {
            if failed_keys.contains(&key) {
                continue;
            }
            let read = self.shared.reader.read(position - 1, 1, &Default::default()).await?;
            let Some(event) = read.into_iter().next() else {
                // Dropped by retention: nothing to retry.
                store::lane::unpark(&mut *pool.acquire().await?, &self.spec.name, position).await?;
                continue;
            };
            let prepared = self.call(self.spec.operator.prepare(&[&event])).await;
            let mut conn = pool.acquire().await?;
            let mut tx = conn.begin().await?;
            let failed = match prepared {
                Some(failure) => Some(failure),
                None => self.call_handler(&mut tx, &event).await,
            };
            match failed {
                None => {
                    store::lane::unpark(&mut tx, &self.spec.name, position).await?;
                    tx.commit().await?;
                }
                Some(failure) => {
                    let _ = tx.rollback().await;
                    store::lane::retry_failed(pool, &self.spec.name, position, &failure.error)
                        .await?;
                    failed_keys.push(key);
                }
            }
        }
        Ok(())
    }

    /// After a failed COMMIT: the connection may have dropped after the commit took effect.
    /// The fenced checkpoint tells: if it reached `position`, the effects are in and handling
    /// again would apply them twice.
    async fn committed_anyway(&self, position: i64, error: &sqlx::Error) -> Result<bool> {
        let stored =
            store::lane::checkpoint_position(&self.shared.pool, &self.spec.name, self.lane).await?;
        if stored >= position {
            tracing::warn!(consumer = %self.spec.name, position, %error, "commit reported an error but took effect");
            return Ok(true);
        }
        Ok(false)
    }

    /// Records a failed attempt of `event` with what became of it, in `conn` (which may be the
    /// transaction that also settles the event).
    async fn record_failure(
        &self,
        conn: &mut PgConnection,
        event: &Event,
        attempts: i32,
        error: &str,
        outcome: Outcome,
    ) -> Result<()> {
        store::lane::record_failure(
            conn,
            &self.spec.name,
            self.lane,
            event.position,
            attempts,
            error,
            outcome,
        )
        .await
    }

    /// The checkpoint of the transaction that handled events up to `position`, fenced by the
    /// lease (see [`store::lane::checkpoint`]); false, and the caller rolls back, when the lease
    /// is gone or a re-split drains to an earlier position (begun after this lane last looked:
    /// the events past it belong to the new lanes). The drain position is read after the
    /// update, which waits while a re-split being begun holds the lanes' rows.
    async fn fenced_checkpoint(&self, conn: &mut PgConnection, position: i64) -> Result<bool> {
        if !self.checkpoint_row(conn, position).await? {
            return Ok(false);
        }
        let drain_to = store::consumer::drain_to(conn, &self.spec.name).await?;
        Ok(drain_to.is_none_or(|d| position <= d))
    }

    /// The fenced checkpoint alone, moving past events this lane does not handle (nothing
    /// handled to undo, so a re-split's drain position does not matter here): written with the
    /// other lanes' of this process (marks.rs).
    async fn checkpoint_alone(&self, position: i64) -> Result<bool> {
        let mark = crate::marks::Mark {
            consumer: self.spec.name.clone(),
            lane: self.lane,
            fence: self.fence,
            position,
        };
        self.shared.marks.advance(&self.shared.pool, &self.shared.node, mark).await
    }

    async fn checkpoint_row(&self, conn: &mut PgConnection, position: i64) -> Result<bool> {
        store::lane::checkpoint(
            conn,
            &self.spec.name,
            self.lane,
            &self.shared.node,
            self.fence,
            position,
        )
        .await
    }

    fn halted_here(&self) -> bool {
        self.shared.halted.lock().expect("halted set").contains(&self.spec.name)
    }

    /// The consumer's state (and the drain position of a re-split in progress), as read for
    /// this process's lanes within the last [`view::FRESH`](crate::view::FRESH), or from the
    /// database when `fresh`; whether it is halted goes into the shared set.
    async fn sync_state(&self, fresh: bool) -> Result<(ConsumerState, Option<i64>)> {
        if fresh {
            self.shared.view.forget(&self.spec.name).await;
        }
        let (state, drain_to) = self.shared.view.state(&self.shared.pool, &self.spec.name).await?;
        let halted = state == ConsumerState::Halted;
        let mut set = self.shared.halted.lock().expect("halted set");
        if halted {
            set.insert(self.spec.name.clone());
        } else {
            set.remove(&self.spec.name);
        }
        Ok((state, drain_to))
    }

    async fn sleep(&self, d: Duration) {
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            _ = tokio::time::sleep(d) => {}
        }
    }

    /// Writes the lane's live status; skipped when nothing changed.
    async fn set_state(
        &mut self,
        state: LaneState,
        at: Option<i64>,
        attempt: i32,
        error: Option<&str>,
    ) -> Result<()> {
        if self.state == Some(state) && error.is_none() && at.is_none() {
            return Ok(());
        }
        self.state = Some(state);
        store::lane::set_status(
            &self.shared.pool,
            &self.spec.name,
            self.lane,
            self.fence,
            state,
            at,
            attempt,
            error,
        )
        .await
    }
}
