//! Reading the log: a range of positions, optionally filtered by entity and kind.
//!
//! Readers never see a gap: positions are committed in order by the single appender, so
//! "everything after my last position" is always a complete answer.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::{PgPool, Row};
use weir_core::{Event, Kind, Lsn, Position, Source};

use crate::{Error, Result};

/// Which events to return. Empty lists match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Entities (`posts`, `sales.orders`).
    pub entities: Vec<String>,
    /// Kinds.
    pub kinds: Vec<Kind>,
}

impl EventFilter {
    /// Matches `event`?
    pub fn matches(&self, event: &Event) -> bool {
        (self.entities.is_empty() || self.entities.contains(&event.entity))
            && (self.kinds.is_empty() || self.kinds.contains(&event.kind))
    }
}

/// Reads events from `weir.events`.
#[derive(Debug, Clone)]
pub struct LogReader {
    pool: PgPool,
    db: String,
}

impl LogReader {
    /// A reader over `pool`'s database.
    pub async fn new(pool: PgPool) -> Result<Self> {
        let db: String = sqlx::query_scalar("select current_database()").fetch_one(&pool).await?;
        Ok(Self { pool, db })
    }

    /// Up to `limit` events with a position greater than `after`, in order.
    pub async fn read(
        &self,
        after: Position,
        limit: i64,
        filter: &EventFilter,
    ) -> Result<Vec<Event>> {
        let entities: Option<Vec<String>> =
            (!filter.entities.is_empty()).then(|| filter.entities.clone());
        let kinds: Option<Vec<String>> = (!filter.kinds.is_empty())
            .then(|| filter.kinds.iter().map(|k| k.as_str().to_string()).collect());
        let rows = sqlx::query(
            "select e.position, e.lsn::text as lsn, e.xid, e.commit_ts, e.kind, e.entity,
                    e.key, e.new_record, e.old_record, e.changes, e.unchanged_toast,
                    r.schema_name, r.table_name, r.columns
             from weir.events e
             left join weir.relations r on r.id = e.relation_id
             where e.position > $1
               and ($2::text[] is null or e.entity = any($2))
               and ($3::text[] is null or e.kind = any($3))
             order by e.position
             limit $4",
        )
        .bind(after)
        .bind(entities)
        .bind(kinds)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| self.event_from_row(row)).collect()
    }

    /// The last position appended (0 when the log is empty).
    pub async fn head(&self) -> Result<Position> {
        let head: Option<i64> = sqlx::query_scalar("select max(position) from weir.source_state")
            .fetch_one(&self.pool)
            .await?;
        Ok(head.unwrap_or(0))
    }

    /// The entities the log has seen (`posts`, `sales.orders`, `weir.stream_events`), by name:
    /// one per table in `weir.relations`, whatever versions of its columns it went through.
    pub async fn entities(&self) -> Result<Vec<String>> {
        let tables: Vec<(String, String)> = sqlx::query_as(
            "select distinct schema_name, table_name from weir.relations order by 1, 2",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut names: Vec<String> =
            tables.iter().map(|(s, t)| weir_core::Event::entity_name(s, t)).collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// The oldest position still retained, if any.
    pub async fn oldest(&self) -> Result<Option<Position>> {
        Ok(sqlx::query_scalar("select min(position) from weir.events")
            .fetch_one(&self.pool)
            .await?)
    }

    fn event_from_row(&self, row: &sqlx::postgres::PgRow) -> Result<Event> {
        let position: i64 = row.try_get("position")?;
        let corrupt = |problem: String| Error::Corrupt { position, problem };
        let kind: String = row.try_get("kind")?;
        let kind = Kind::parse(&kind).ok_or_else(|| corrupt(format!("unknown kind {kind}")))?;
        let lsn: String = row.try_get("lsn")?;
        let lsn: Lsn = lsn.parse().map_err(|e| corrupt(format!("{e}")))?;
        let entity: String = row.try_get("entity")?;
        let schema: Option<String> = row.try_get("schema_name")?;
        let source = match schema {
            Some(schema) => Source {
                db: self.db.clone(),
                schema,
                table: row.try_get("table_name")?,
                columns: match row.try_get::<Option<Value>, _>("columns")? {
                    Some(Value::Object(m)) => m,
                    _ => Map::new(),
                },
            },
            None => Source {
                db: self.db.clone(),
                schema: String::new(),
                table: entity.clone(),
                columns: Map::new(),
            },
        };
        let commit_ts: DateTime<Utc> = row.try_get("commit_ts")?;
        let unchanged: Option<Vec<String>> = row
            .try_get::<Option<Value>, _>("unchanged_toast")?
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| corrupt(format!("unchanged_toast: {e}")))?;
        Ok(Event {
            position,
            lsn,
            xid: row.try_get("xid")?,
            commit_ts,
            kind,
            entity,
            source,
            key: row.try_get("key")?,
            new_record: row.try_get("new_record")?,
            old_record: row.try_get("old_record")?,
            changes: row.try_get("changes")?,
            unchanged_toast: unchanged.unwrap_or_default(),
        })
    }
}
