//! One subscriber, whatever its transport: replay from its cursor, the seam, then live.
//!
//! ```text
//! cursor? ─no──► register (P, Q) ─────────────────────────────────────────► live (> P, > Q)
//!    │yes
//!    ▼
//! replay (cursor, ~head] in pages ─► register (P, Q) ─► replay the rest up to P and Q ─► live,
//!                                                        dropping anything already sent
//! ```
//!
//! Every state change happens after the last `.await` of [`Session::next`], so a caller may
//! drop that future (in a `select!`) without losing or repeating a message.
//!
//! Channels added live (WebSocket `subscribe`) before the session is live wait in `pending`
//! and are registered when it gets there: they are not replayed, their messages do not pile
//! up during a long replay, and nothing is in the hub for a session that ends before.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use weir_core::{Event, Position};
use weir_log::EventFilter;

use super::hub::{Client, Hub, PAGE, Shared, Taken, processed_rows};
use super::message::{
    Channel, Cursor, GivenCursor, MAX_CHANNELS, Msg, MsgKind, event_json, too_many_channels,
};
use crate::ApiError;

/// Keep-alive after this much silence.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Why a stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    SlowClient,
    Shutdown,
}

/// What to write next.
#[derive(Debug)]
pub(crate) enum Step {
    /// Messages with the cursor each one leaves the client at.
    Messages(Vec<(Arc<Msg>, Cursor)>),
    /// The cursor was older than the oldest retained event: replay starts at `oldest`.
    Gap {
        after: Position,
        oldest: Position,
    },
    KeepAlive,
    Close(CloseReason),
    End,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    ReplayChanges,
    ReplayProcessed,
    Register,
    Seam { p: Position, q: Position },
    Live { floor_change: Position, floor_processed: Position },
    Done,
}

/// A subscriber.
#[derive(Debug)]
pub(crate) struct Session {
    hub: Arc<Shared>,
    client: Arc<Client>,
    /// What it replays and is (or will be, at registration) registered on.
    channels: HashSet<Channel>,
    /// Live-only additions received before the session is live: registered on reaching it.
    pending: HashSet<Channel>,
    /// Change channel names, for matching replayed events.
    names: HashSet<Box<str>>,
    /// Their entities, for reading the log.
    entities: BTreeSet<Box<str>>,
    wants_processed: bool,
    /// Where the client is: the last change position covered and, with `processed`, the last
    /// processed position covered.
    cursor: Cursor,
    /// The processed cursor is not known yet (no cursor given, or one without it): it becomes
    /// Q at registration.
    processed_from_q: bool,
    phase: Phase,
    gap_checked: bool,
    /// Whether the hub may hold this client: set before anything is registered, so that
    /// dropping the session always unregisters it.
    registered: bool,
    transport: &'static str,
    pub(crate) client_buffer: usize,
}

impl Session {
    /// A subscriber of `channels`; without a cursor it is registered at once (live from now).
    pub(crate) fn new(
        hub: &Hub,
        channels: Vec<Channel>,
        given: Option<GivenCursor>,
        transport: &'static str,
    ) -> Session {
        let shared = hub.shared.clone();
        let client = shared.client();
        let channels: HashSet<Channel> = channels.into_iter().collect();
        let wants_processed = channels.contains(&Channel::Processed);
        let mut names = HashSet::new();
        let mut entities = BTreeSet::new();
        for c in &channels {
            if let Channel::Change { name, entity } = c {
                names.insert(name.clone());
                entities.insert(entity.clone());
            }
        }
        metrics::gauge!("weir_channel_clients", "transport" => transport).increment(1.0);
        let client_buffer = shared.client_buffer;
        let mut s = Session {
            hub: shared,
            client,
            channels,
            pending: HashSet::new(),
            names,
            entities,
            wants_processed,
            cursor: Cursor { change: 0, processed: None },
            processed_from_q: true,
            phase: Phase::Register,
            gap_checked: true,
            registered: false,
            transport,
            client_buffer,
        };
        match given {
            None => {
                let (p, q) = s.register();
                s.cursor = Cursor { change: p, processed: wants_processed.then_some(q) };
                s.phase = Phase::Live { floor_change: p, floor_processed: q };
            }
            Some(g) => {
                s.cursor.change = g.change;
                if wants_processed && let Some(p) = g.processed {
                    s.cursor.processed = Some(p);
                    s.processed_from_q = false;
                }
                s.gap_checked = false;
                s.phase = Phase::ReplayChanges;
            }
        }
        s
    }

    fn register(&mut self) -> (Position, Position) {
        self.registered = true;
        self.hub.register(&self.client, &self.channels)
    }

    /// Adds live-only channels (WebSocket `subscribe`): messages after now, or, before the
    /// session is live, after the moment it gets there. All or nothing: past
    /// [`MAX_CHANNELS`] on the connection nothing is added.
    pub(crate) fn add_live(&mut self, channels: Vec<Channel>) -> Result<(), ApiError> {
        let added: Vec<Channel> = channels
            .into_iter()
            .filter(|c| !self.channels.contains(c) && !self.pending.contains(c))
            .collect();
        let total = self.channels.len() + self.pending.len() + added.len();
        if total > MAX_CHANNELS {
            return Err(too_many_channels(total));
        }
        if added.is_empty() {
            return Ok(());
        }
        match self.phase {
            Phase::Live { .. } => self.register_live(added),
            Phase::Done => {}
            // Not replayed and not registered yet: registered on reaching Live.
            _ => self.pending.extend(added),
        }
        Ok(())
    }

    /// Registers `added` on a live session.
    fn register_live(&mut self, added: Vec<Channel>) {
        for c in &added {
            match c {
                Channel::Processed => {
                    // Processed ids join the cursor from here on.
                    self.wants_processed = true;
                }
                Channel::Change { name, entity } => {
                    self.names.insert(name.clone());
                    self.entities.insert(entity.clone());
                }
            }
            self.channels.insert(c.clone());
        }
        self.registered = true;
        let (_, q) = self.hub.register(&self.client, &added);
        if added.contains(&Channel::Processed) {
            if self.cursor.processed.is_none() {
                self.cursor.processed = Some(q);
            }
            if let Phase::Live { floor_processed, .. } = &mut self.phase {
                *floor_processed = (*floor_processed).max(q);
            }
        }
    }

    /// Resolves when the server shuts down or the client has been dropped as too slow (for a
    /// transport whose write is stuck on a client that stopped reading).
    pub(crate) async fn interrupted(&self) {
        loop {
            if self.hub.cancel.is_cancelled() || self.client.is_dropped() {
                return;
            }
            tokio::select! {
                _ = self.hub.cancel.cancelled() => {}
                _ = self.client.notify.notified() => {}
            }
        }
    }

    fn wants_changes(&self) -> bool {
        !self.names.is_empty()
    }

    /// The next thing to write. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Step {
        loop {
            if matches!(self.phase, Phase::Done) {
                return Step::End;
            }
            if self.hub.cancel.is_cancelled() {
                self.phase = Phase::Done;
                metrics::counter!("weir_channel_dropped_total", "reason" => "shutdown")
                    .increment(1);
                return Step::Close(CloseReason::Shutdown);
            }
            match self.phase {
                Phase::ReplayChanges => {
                    if !self.gap_checked {
                        match self.hub.reader.oldest().await {
                            Ok(oldest) => {
                                self.gap_checked = true;
                                let head = self.hub.change_pos();
                                let gap = self.wants_changes()
                                    && match oldest {
                                        Some(o) => self.cursor.change < o - 1,
                                        None => self.cursor.change < head,
                                    };
                                if gap {
                                    let oldest = oldest.unwrap_or(head + 1);
                                    return Step::Gap { after: self.cursor.change, oldest };
                                }
                            }
                            Err(e) => return self.failed(e),
                        }
                        continue;
                    }
                    if !self.wants_changes() || self.cursor.change >= self.hub.change_pos() {
                        self.phase = Phase::ReplayProcessed;
                        continue;
                    }
                    match self.replay_changes(None).await {
                        Ok((out, done)) => {
                            if done {
                                self.phase = Phase::ReplayProcessed;
                            }
                            if !out.is_empty() {
                                return Step::Messages(out);
                            }
                        }
                        Err(e) => return self.failed(e),
                    }
                }
                Phase::ReplayProcessed => {
                    let target = self.hub.processed_pos();
                    match self.cursor.processed {
                        Some(p) if !self.processed_from_q && p < target => {
                            match self.replay_processed(target).await {
                                Ok((out, done)) => {
                                    if done {
                                        self.phase = Phase::Register;
                                    }
                                    if !out.is_empty() {
                                        return Step::Messages(out);
                                    }
                                }
                                Err(e) => return self.failed(e),
                            }
                        }
                        _ => self.phase = Phase::Register,
                    }
                }
                Phase::Register => {
                    let (p, q) = self.register();
                    if self.wants_processed && self.processed_from_q {
                        self.cursor.processed = Some(q);
                    }
                    self.phase = Phase::Seam { p, q };
                }
                Phase::Seam { p, q } => {
                    if self.wants_changes() && self.cursor.change < p {
                        match self.replay_changes(Some(p)).await {
                            Ok((out, _)) => {
                                if !out.is_empty() {
                                    return Step::Messages(out);
                                }
                            }
                            Err(e) => return self.failed(e),
                        }
                        continue;
                    }
                    if let Some(cp) = self.cursor.processed
                        && self.wants_processed
                        && cp < q
                    {
                        match self.replay_processed(q).await {
                            Ok((out, _)) => {
                                if !out.is_empty() {
                                    return Step::Messages(out);
                                }
                            }
                            Err(e) => return self.failed(e),
                        }
                        continue;
                    }
                    if !self.wants_changes() {
                        self.cursor.change = self.cursor.change.max(p);
                    }
                    self.phase = Phase::Live {
                        floor_change: self.cursor.change.max(p),
                        floor_processed: self.cursor.processed.unwrap_or(q).max(q),
                    };
                    if !self.pending.is_empty() {
                        let added: Vec<Channel> = self.pending.drain().collect();
                        self.register_live(added);
                    }
                }
                Phase::Live { floor_change, floor_processed } => match self.client.take() {
                    Taken::Dropped => {
                        self.phase = Phase::Done;
                        return Step::Close(CloseReason::SlowClient);
                    }
                    Taken::Items(items) => {
                        let mut out = Vec::with_capacity(items.len());
                        for m in items {
                            match m.kind {
                                MsgKind::Change if m.position > floor_change => {
                                    self.cursor.change = m.position;
                                }
                                MsgKind::Processed if m.position > floor_processed => {
                                    self.cursor.processed = Some(m.position);
                                }
                                _ => continue,
                            }
                            out.push((m, self.cursor));
                        }
                        if !out.is_empty() {
                            return Step::Messages(out);
                        }
                    }
                    Taken::Empty => {
                        tokio::select! {
                            _ = self.hub.cancel.cancelled() => {}
                            _ = self.client.notify.notified() => {}
                            _ = tokio::time::sleep(KEEP_ALIVE) => return Step::KeepAlive,
                        }
                    }
                },
                Phase::Done => return Step::End,
            }
        }
    }

    /// A database failure mid-stream: the client is told to reconnect (as at shutdown, its
    /// cursor resumes it).
    fn failed(&mut self, e: impl std::fmt::Display) -> Step {
        tracing::warn!(error = %e, "channels: replay failed; closing the stream");
        self.phase = Phase::Done;
        Step::Close(CloseReason::Shutdown)
    }

    /// One page of the client's change channels after its cursor (up to `upto`). Returns the
    /// messages and whether the replay is done.
    async fn replay_changes(
        &mut self,
        upto: Option<Position>,
    ) -> Result<(Vec<(Arc<Msg>, Cursor)>, bool), weir_log::Error> {
        let filter = EventFilter {
            entities: self.entities.iter().map(|e| e.to_string()).collect(),
            kinds: vec![],
        };
        let from = self.cursor.change;
        let page = self.hub.reader.read(from, PAGE, &filter).await?;
        let keys = self.hub.key_columns(&page).await;
        let full = page.len() as i64 == PAGE;
        let target = self.hub.change_pos();
        let mut out = Vec::new();
        let mut covered = from;
        let mut reached = !full;
        for event in &page {
            if upto.is_some_and(|p| event.position > p) {
                reached = true;
                break;
            }
            covered = event.position;
            self.messages_for(event, keys.get(&event.entity).map(|k| &k[..]), &mut out);
        }
        if let Some(p) = upto {
            if reached || covered >= p {
                covered = covered.max(p);
                reached = true;
            }
        } else if covered >= target {
            reached = true;
        }
        self.cursor.change = covered;
        if !out.is_empty() {
            metrics::counter!("weir_channel_messages_total").increment(out.len() as u64);
        }
        Ok((out, reached))
    }

    fn messages_for(
        &self,
        event: &Event,
        key_columns: Option<&[String]>,
        out: &mut Vec<(Arc<Msg>, Cursor)>,
    ) {
        let mut json: Option<String> = None;
        for channel in self.hub.routing.channels_of(event, key_columns) {
            if self.names.contains(channel.as_str()) {
                let json = json.get_or_insert_with(|| event_json(event));
                let msg = Msg::change(&channel, event.position, json);
                out.push((
                    msg,
                    Cursor { change: event.position, processed: self.cursor.processed },
                ));
            }
        }
    }

    /// One page of processed notifications after the cursor, up to `upto`.
    async fn replay_processed(
        &mut self,
        upto: Position,
    ) -> Result<(Vec<(Arc<Msg>, Cursor)>, bool), sqlx::Error> {
        let from = self.cursor.processed.unwrap_or(upto);
        let rows = processed_rows(&self.hub.pool, from, upto, PAGE).await?;
        let done = (rows.len() as i64) < PAGE;
        let mut out = Vec::new();
        let mut covered = from;
        for row in rows {
            covered = row.event.position;
            if !row.parked {
                let cursor = Cursor { change: self.cursor.change, processed: Some(covered) };
                out.push((Msg::processed(&row.event), cursor));
            }
        }
        self.cursor.processed = Some(if done { upto } else { covered });
        if !out.is_empty() {
            metrics::counter!("weir_channel_messages_total").increment(out.len() as u64);
        }
        Ok((out, done))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.registered {
            self.hub.unregister(self.client.id);
        }
        metrics::gauge!("weir_channel_clients", "transport" => self.transport).decrement(1.0);
    }
}
