//! Pages of the log shared by the lanes of one consumer in one process: every lane reads every
//! page (it moves past the other lanes' events), so without sharing a consumer with N lanes
//! reads and decodes each page N times. The first lane to need a page reads it; the others find
//! it here.
//!
//! ```text
//! lane at pos ─► a cached full page of this consumer with after ≤ pos < last? ─► its events
//!                after pos (never "the end of the log": only full pages are kept)
//!             └► otherwise read the log; a full page is kept (the oldest go past MAX_PAGES)
//! ```
//!
//! Sound because the log never changes below its head: the events with positions in
//! `(after, last]` that the consumer's filter selects are exactly the page's, forever. A page
//! read short (it reached the head) is not kept, so the live path always asks the database.

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

/// Pages of every consumer of the engine, keyed by consumer and generation (a new selector is
/// a new filter).
#[derive(Default)]
pub(crate) struct PageCache {
    pages: Mutex<HashMap<(String, i64), Pages>>,
}

impl PageCache {
    /// Up to `limit` events of `consumer` after `after`, from a kept page or the log.
    pub(crate) async fn read(
        &self,
        reader: &LogReader,
        consumer: &str,
        generation: i64,
        after: i64,
        limit: i64,
        filter: &EventFilter,
    ) -> Result<Page> {
        let key = (consumer.to_string(), generation);
        if let Some(page) = self.find(&key, after) {
            return Ok(page);
        }
        let events = reader.read(after, limit, filter).await?;
        let short = (events.len() as i64) < limit;
        let events = Arc::new(events);
        if !short {
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
}
