//! Realtime channels: log events fanned out to HTTP clients over Server-Sent Events and
//! WebSocket (`docs/channels.md` is the client's guide).
//!
//! ```text
//! weir.events ─► Hub (one change tail, one processed tail) ─► client queues ─► SSE / WS
//!                                                               ▲
//!        replay from the log (cursor, P] on resume ─────────────┘ then live (> P)
//! ```
//!
//! Channels:
//! - `<entity>`: every change of a table (`posts`, `sales.orders`);
//! - `<entity>/<id>`: one row, by its key (`posts/42`; composite keys joined by `,`);
//! - `<parent>/<value>/<entity>`: scoped by `[channels.<entity>] scopes` (`posts/42/comments`);
//! - `processed`: an event has been handled by every consumer listening to its entity.
//!
//! Message ids are cursors: `<position>`, or `<position>:<processed position>` when the
//! subscription includes `processed`.

mod hub;
mod message;
mod session;
mod sse;
mod ws;

pub use hub::Hub;

use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::{ApiError, AppState};
use message::{Channel, GivenCursor, parse_channels};
pub(crate) use sse::{SseEvent, event_stream};

/// The channel routes.
pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(sse::sse)).routes(routes!(ws::ws))
}

/// The query string as pairs: `channel` may repeat.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub(crate) struct ChannelQuery(Vec<(String, String)>);

/// The channels and the `after` cursor of a query.
fn parse_query(query: &ChannelQuery) -> Result<(Vec<Channel>, Option<GivenCursor>), ApiError> {
    let channels =
        parse_channels(query.0.iter().filter(|(k, _)| k == "channel").map(|(_, v)| v.as_str()))?;
    let mut after = None;
    for (k, v) in &query.0 {
        if k == "after" {
            after = GivenCursor::parse(v)?;
        }
    }
    Ok((channels, after))
}
