//! Pages of the log shared by the lanes of one consumer in one process: every lane reads every
//! page (it moves past the other lanes' events), so without sharing a consumer with N lanes
//! reads and decodes each page N times. One lane reads a page; the others find it here.
//!
//! ```text
//! lane at pos, knowing the head h ─► a kept full page with after ≤ pos < last? ─► its events
//!                                                                         after pos
//!   └► the consumer's gate (one read at a time per consumer; the lanes that wait behind a
//!      read are usually waiting for that same read):
//!        the last read that reached the head, with after ≤ pos and h ≤ its upto? ─► its
//!                                                                         events after pos
//!        otherwise read the log ─► full: kept (the oldest go past MAX_PAGES)
//!                               └► short: kept as the last read to the head, upto = h
//! ```
//!
//! Sound because the log never changes below its head and is appended in order by one writer,
//! so a read sees a prefix of the positions: the events with positions in `(after, last]` of a
//! full page that the consumer's filter selects are exactly the page's, forever; and a read
//! that came back short, started after the lane saw head `h` (committed), holds every selected
//! event in `(after, h]`. A lane that knows a later head than the last short read reads again.
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use weir_core::Event;
use weir_log::{EventFilter, LogReader};

use crate::Result;

/// Full pages kept per consumer (at 500 events a page, a few MiB).
const MAX_PAGES: usize = 16;

/// A read: the events after the asked position (`events[start..]`), and whether the read
/// reached the head of the log (fewer events than asked for, from the database).
pub(crate) struct Page {
    events: Arc<Vec<Event>>,
    start: usize,
    /// The database answered with fewer than `limit` events: nothing more up to the head.
    pub(crate) short: bool,
}

impl Page {
    pub(crate) fn events(&self) -> &[Event] {
        &self.events[self.start..]
    }
}

/// One consumer's full pages, by the position each was read after.
type Pages = BTreeMap<i64, Arc<Vec<Event>>>;

/// The last read of a consumer that reached the head: every selected event in `(after, upto]`.
struct ToHead {
    after: i64,
    upto: i64,
    events: Arc<Vec<Event>>,
}

/// One consumer's gate: held across a read, with the last read that reached the head.
type Gate = Arc<tokio::sync::Mutex<Option<ToHead>>>;

/// Pages of every consumer of the engine, keyed by consumer and generation (a new selector is
/// a new filter).
#[derive(Default)]
pub(crate) struct PageCache {
    pages: Mutex<HashMap<(String, i64), Pages>>,
    gates: Mutex<HashMap<(String, i64), Gate>>,
}

impl PageCache {
    /// Up to `limit` events of `consumer` after `after`, from a kept page or the log. `head` is
    /// a committed head the caller knew before asking: a short page holds everything up to it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn read(
        &self,
        reader: &LogReader,
        consumer: &str,
        generation: i64,
        after: i64,
        head: i64,
        limit: i64,
        filter: &EventFilter,
    ) -> Result<Page> {
        let key = (consumer.to_string(), generation);
        if let Some(page) = self.find(&key, after) {
            return Ok(page);
        }
        let gate = self.gate(&key);
        let mut to_head = gate.lock().await;
        if let Some(page) = to_head.as_ref().and_then(|t| t.serves(after, head)) {
            return Ok(page);
        }
        // The lane ahead in the gate may have read this very page.
        if let Some(page) = self.find(&key, after) {
            return Ok(page);
        }
        let events = reader.read(after, limit, filter).await?;
        let short = (events.len() as i64) < limit;
        let events = Arc::new(events);
        if short {
            *to_head = Some(ToHead { after, upto: head, events: events.clone() });
        } else {
            let mut all = self.pages.lock().expect("page cache");
            // A new generation's pages replace the older ones' (a selector changed).
            all.retain(|(name, g), _| name != consumer || *g == generation);
            let pages = all.entry(key).or_default();
            pages.insert(after, events.clone());
            while pages.len() > MAX_PAGES {
                pages.pop_first();
            }
        }
        Ok(Page { events, start: 0, short })
    }

    /// The consumer's gate (a new generation's replaces the older ones').
    fn gate(&self, key: &(String, i64)) -> Gate {
        let mut gates = self.gates.lock().expect("page gates");
        if !gates.contains_key(key) {
            gates.retain(|(name, _), _| name != &key.0);
        }
        gates.entry(key.clone()).or_default().clone()
    }

    /// A kept page holding events after `after`: read after some `a ≤ after`, its last event
    /// past `after`.
    fn find(&self, key: &(String, i64), after: i64) -> Option<Page> {
        let all = self.pages.lock().expect("page cache");
        let (_, events) = all.get(key)?.range(..=after).next_back()?;
        let last = events.last()?.position;
        if last <= after {
            return None;
        }
        let start = events.partition_point(|e| e.position <= after);
        Some(Page { events: events.clone(), start, short: false })
    }
}

impl ToHead {
    /// The events after `after` for a lane that knows `head`, when this read holds them all.
    fn serves(&self, after: i64, head: i64) -> Option<Page> {
        if self.after > after || head > self.upto || after > self.upto {
            return None;
        }
        let start = self.events.partition_point(|e| e.position <= after);
        Some(Page { events: self.events.clone(), start, short: true })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(position: i64) -> Event {
        Event {
            position,
            lsn: weir_core::Lsn(1),
            xid: 1,
            commit_ts: chrono::Utc::now(),
            kind: weir_core::Kind::Insert,
            entity: "t".into(),
            source: Default::default(),
            key: serde_json::json!({}),
            new_record: None,
            old_record: None,
            changes: None,
            unchanged_toast: Vec::new(),
        }
    }

    #[test]
    fn a_kept_page_answers_reads_inside_it_and_only_those() {
        let cache = PageCache::default();
        let key = ("c".to_string(), 0);
        let page = Arc::new(vec![event(12), event(15), event(20)]);
        cache.pages.lock().unwrap().entry(key.clone()).or_default().insert(10, page);
        let at = |after| {
            cache
                .find(&key, after)
                .map(|p| p.events().iter().map(|e| e.position).collect::<Vec<_>>())
        };
        assert_eq!(at(10), Some(vec![12, 15, 20]));
        assert_eq!(at(12), Some(vec![15, 20]));
        assert_eq!(at(13), Some(vec![15, 20]), "no selected event in 13..15");
        assert_eq!(at(19), Some(vec![20]));
        assert_eq!(at(20), None, "past the page: ask the log");
        assert_eq!(at(9), None, "before the page: not known");
        assert!(cache.find(&("c".to_string(), 1), 10).is_none(), "another generation");
    }

    #[test]
    fn a_read_to_the_head_serves_only_lanes_that_know_no_later_head() {
        let read = ToHead { after: 10, upto: 30, events: Arc::new(vec![event(12), event(20)]) };
        let at = |after, head| {
            read.serves(after, head).map(|p| p.events().iter().map(|e| e.position).collect())
        };
        assert_eq!(at(10, 30), Some(vec![12, 20]));
        assert_eq!(at(15, 25), Some(vec![20]), "an earlier head is covered");
        assert_eq!(at(20, 30), Some(Vec::<i64>::new()), "nothing selected up to the head");
        assert_eq!(at(10, 31), None, "a later head: read again");
        assert_eq!(at(9, 30), None, "before the read: not known");
        assert_eq!(at(31, 31), None, "past what the read covers");
    }
}
