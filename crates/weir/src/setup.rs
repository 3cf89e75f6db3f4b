//! `weir init`: everything weir needs in the database, created idempotently.
//!
//! 1. checks `wal_level = logical` (nothing else works without it);
//! 2. the `weir` schema and its tables (numbered migrations);
//! 3. the publication: the configured tables, or every table of the configured schemas — never
//!    weir's own bookkeeping tables — plus the event store's `weir.stream_events`, so appended
//!    events reach the log through the WAL like row changes;
//! 4. replica identity: a table about to be published without one (no primary key under the
//!    default identity) gets `replica identity full` before it is published — PostgreSQL
//!    refuses updates and deletes on a published table without an identity — or, with
//!    `manage_replica_identity = false` or an explicit `nothing`, `init` refuses and changes
//!    nothing; a watched table that an operator or subscription routes by a column
//!    its identity leaves out of deleted rows gets `replica identity full` when
//!    `[source] manage_replica_identity` (the default), else is reported as needing it
//!    ([`crate::replica_identity`]);
//! 5. a permanent `pgoutput` replication slot.
//!
//! Running it again reconciles the publication with the configuration and leaves the slot be.

use sqlx::PgPool;
use weir_core::Config;

use crate::{Error, Result};

/// What `init` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitReport {
    /// The publication was created (false: it existed and was brought up to date).
    pub created_publication: bool,
    /// The slot was created (false: it existed).
    pub created_slot: bool,
    /// Tables now in the publication (`schema.table`).
    pub tables: Vec<String>,
    /// Tables this run added to an existing publication, each with the backfill asked for its
    /// existing rows (its id) or why there is none (`[source] backfill_added_tables`).
    pub backfills: Vec<(String, std::result::Result<i64, String>)>,
    /// Tables whose replica identity was set to full now (`schema.table`) because a consumer
    /// routes them by a column outside their primary key.
    pub identity_set: Vec<String>,
    /// Tables whose replica identity was set to full now because they have no primary key:
    /// published without an identity, they would refuse updates and deletes.
    pub identity_set_keyless: Vec<String>,
    /// With `manage_replica_identity = false`: what still needs `replica identity full`.
    pub identity_needed: Vec<crate::replica_identity::Need>,
}

/// Creates or updates the schema, publication and slot.
pub async fn init(pool: &PgPool, config: &Config) -> Result<InitReport> {
    require_logical(pool).await?;
    weir_log::migrate(pool).await?;
    // Before the publication: it names the event store's table.
    weir_streams::migrate(pool).await?;
    // Every component, so an application can enqueue (`weir.enqueue`) right after `init`.
    weir_jobs::migrate(pool).await?;
    // The configuration checked before anything changes; then, before the publication, the
    // tables that would refuse the application's updates and deletes once published.
    let target = publication_target(pool, config).await?;
    let identity_set_keyless = settle_keyless(pool, config).await?;
    let before = publication_tables(pool, &config.source.publication).await?;
    let created_publication = ensure_publication(pool, config, &target).await?;
    // Before the slot: its first changes then carry whole old rows.
    let routed = crate::replica_identity::config_columns(pool, config).await?;
    let needs = crate::replica_identity::needs(pool, config, &routed).await?;
    let (identity_set, identity_needed) = if config.source.manage_replica_identity {
        (crate::replica_identity::apply(pool, &needs).await?, Vec::new())
    } else {
        (Vec::new(), needs)
    };
    let created_slot = ensure_slot(pool, &config.source.slot).await?;
    let tables = publication_tables(pool, &config.source.publication).await?;
    let mut backfills = Vec::new();
    if !created_publication {
        // A table watched from now on: its existing rows are not in the WAL to come.
        for added in tables.iter().filter(|t| !before.contains(t)) {
            let answer = if config.source.backfill_added_tables {
                crate::backfill::request(
                    pool,
                    config,
                    std::slice::from_ref(added),
                    "table added",
                    None,
                )
                .await
                .map(|b| b[0].id)
                .map_err(|e| e.to_string())
            } else {
                Err("[source] backfill_added_tables is off".into())
            };
            backfills.push((added.clone(), answer));
        }
    }
    Ok(InitReport {
        created_publication,
        created_slot,
        tables,
        backfills,
        identity_set,
        identity_set_keyless,
        identity_needed,
    })
}

/// Gives each table about to be published without a replica identity (no primary key under
/// the default identity) `replica identity full` when `[source] manage_replica_identity`, and
/// returns them; refuses, changing nothing, when it is off or the identity is an explicit
/// `nothing`, with the statements that fix it.
async fn settle_keyless(pool: &PgPool, config: &Config) -> Result<Vec<String>> {
    use crate::replica_identity::Identity;
    let keyless = crate::replica_identity::keyless(pool, config).await?;
    let refused: Vec<String> = keyless
        .iter()
        .filter(|(_, identity)| {
            *identity == Identity::Nothing || !config.source.manage_replica_identity
        })
        .map(|(table, identity)| {
            let full = crate::replica_identity::full_identity_statement(table);
            match identity {
                Identity::Nothing => format!(
                    "`{table}` (replica identity nothing): run `{full}` (or `default` when it \
                     has a primary key, or `using index …`)"
                ),
                _ => format!(
                    "`{table}` (replica identity {identity}): add a primary key, or run `{full}` \
                     (or `… replica identity using index …`)"
                ),
            }
        })
        .collect();
    if !refused.is_empty() {
        return Err(Error::Setup(format!(
            "once published, PostgreSQL would refuse every UPDATE and DELETE on {}: {}; then \
             run `weir init` again (nothing was changed{})",
            if refused.len() == 1 { "this table" } else { "these tables" },
            refused.join("; "),
            if config.source.manage_replica_identity {
                ""
            } else {
                "; with `[source] manage_replica_identity = true` weir init sets full on a \
                 table without a primary key itself"
            }
        )));
    }
    let mut set: Vec<String> = Vec::new();
    for (table, _) in keyless {
        if let Err(e) = crate::replica_identity::set_full(pool, &table).await {
            if set.is_empty() {
                return Err(e);
            }
            return Err(Error::Setup(format!(
                "{e} (already set to full before this one, and left so: {})",
                set.join(", ")
            )));
        }
        set.push(table);
    }
    Ok(set)
}

pub(crate) async fn require_logical(pool: &PgPool) -> Result<()> {
    let level: String =
        sqlx::query_scalar("select current_setting('wal_level')").fetch_one(pool).await?;
    if level != "logical" {
        return Err(Error::Setup(format!(
            "wal_level is `{level}`, weir needs `logical`: run `alter system set wal_level = logical;` \
             as a superuser and restart PostgreSQL"
        )));
    }
    Ok(())
}

pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Splits `schema.table` (default schema `public`).
pub(crate) fn split_table(name: &str) -> (&str, &str) {
    name.split_once('.').unwrap_or(("public", name))
}

/// What the publication should cover (`table a, b, weir.stream_events` or `tables in schema
/// …`), every configured table and schema checked to exist and not be weir's own.
async fn publication_target(pool: &PgPool, config: &Config) -> Result<String> {
    let source = &config.source;
    Ok(if !source.tables.is_empty() {
        let mut parts = Vec::new();
        for t in &source.tables {
            let (schema, table) = split_table(t);
            if schema == "weir" {
                return Err(Error::Setup(format!(
                    "source.tables lists `{t}`: weir's own tables cannot be watched"
                )));
            }
            let exists: bool = sqlx::query_scalar(
                "select exists (select 1 from pg_tables where schemaname = $1 and tablename = $2)",
            )
            .bind(schema)
            .bind(table)
            .fetch_one(pool)
            .await?;
            if !exists {
                return Err(Error::Setup(format!(
                    "source.tables lists `{t}`, but there is no table {schema}.{table}; create it \
                     or fix the name"
                )));
            }
            parts.push(format!("{}.{}", quote_ident(schema), quote_ident(table)));
        }
        parts.push(STREAM_EVENTS_SQL.into());
        format!("table {}", parts.join(", "))
    } else {
        let mut parts = Vec::new();
        for s in &source.schemas {
            if s == "weir" {
                return Err(Error::Setup(
                    "source.schemas lists `weir`: weir's own tables cannot be watched".into(),
                ));
            }
            let exists: bool =
                sqlx::query_scalar("select exists (select 1 from pg_namespace where nspname = $1)")
                    .bind(s)
                    .fetch_one(pool)
                    .await?;
            if !exists {
                return Err(Error::Setup(format!(
                    "source.schemas lists `{s}`, but there is no such schema"
                )));
            }
            parts.push(quote_ident(s));
        }
        format!("tables in schema {}, table {STREAM_EVENTS_SQL}", parts.join(", "))
    })
}

/// Creates the publication for `target`, or sets an existing one to exactly it; whether it
/// was created.
async fn ensure_publication(pool: &PgPool, config: &Config, target: &str) -> Result<bool> {
    let source = &config.source;
    let name = quote_ident(&source.publication);
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from pg_publication where pubname = $1)")
            .bind(&source.publication)
            .fetch_one(pool)
            .await?;
    let sql = if exists {
        // `set` replaces both table and schema members with exactly the configured ones.
        format!("alter publication {name} set {target}")
    } else {
        format!("create publication {name} for {target}")
    };
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await.map_err(|e| match &e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("42501") => {
            Error::Setup(format!(
                "the role may not create or change publication `{}` ({}); run `weir init` as the \
             owner of the watched tables or a superuser",
                source.publication,
                db.message()
            ))
        }
        _ => Error::Database(e),
    })?;
    Ok(!exists)
}

async fn ensure_slot(pool: &PgPool, slot: &str) -> Result<bool> {
    let existing: Option<(String, Option<String>, Option<String>)> = sqlx::query_as(
        "select plugin::text, database::text, wal_status from pg_replication_slots where slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await?;
    let db: String = sqlx::query_scalar("select current_database()").fetch_one(pool).await?;
    if let Some((plugin, slot_db, wal_status)) = existing {
        if plugin != "pgoutput" {
            return Err(Error::Setup(format!(
                "replication slot `{slot}` exists with plugin `{plugin}`; weir needs pgoutput: \
                 choose another `source.slot` or drop it with `select pg_drop_replication_slot('{slot}')`"
            )));
        }
        if slot_db.as_deref() != Some(db.as_str()) {
            return Err(Error::Setup(format!(
                "replication slot `{slot}` belongs to database `{}`, not `{db}`; choose another \
                 `source.slot`",
                slot_db.unwrap_or_default()
            )));
        }
        if wal_status.as_deref() == Some("lost") {
            return Err(Error::Setup(format!(
                "replication slot `{slot}` was invalidated (wal_status = lost): WAL it needed was \
                 removed. Drop it (`select pg_drop_replication_slot('{slot}')`), run `weir init` \
                 again and re-sync derived data"
            )));
        }
        return Ok(false);
    }
    sqlx::query("select pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(slot)
        .execute(pool)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.code().as_deref() == Some("42501") => {
                Error::Setup(format!(
                    "the role may not create replication slots ({}); grant it with `alter role \
                 <role> replication`",
                    d.message()
                ))
            }
            sqlx::Error::Database(d) if d.code().as_deref() == Some("53400") => {
                Error::Setup(format!(
                    "no free replication slot ({}); raise max_replication_slots in postgresql.conf \
                 and restart PostgreSQL",
                    d.message()
                ))
            }
            _ => Error::Database(e),
        })?;
    Ok(true)
}

/// The event store's table, as the publication names it.
const STREAM_EVENTS_SQL: &str = "\"weir\".\"stream_events\"";

/// The watched tables in the publication (`schema.table`), without the event store's own.
pub(crate) async fn publication_tables(pool: &PgPool, publication: &str) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "select schemaname || '.' || tablename from pg_publication_tables
         where pubname = $1 and (schemaname, tablename) <> ('weir', 'stream_events')
         order by 1",
    )
    .bind(publication)
    .fetch_all(pool)
    .await?)
}

/// What `weir run` needs to find, without creating it: `wal_level = logical`, the schema (it
/// migrates that), the publication and a healthy slot. A missing slot is never re-created
/// here: changes made while it was gone are not in the log, and someone must decide.
pub async fn check(pool: &PgPool, config: &Config) -> Result<()> {
    require_logical(pool).await?;
    weir_log::migrate(pool).await?;
    let publication: bool =
        sqlx::query_scalar("select exists (select 1 from pg_publication where pubname = $1)")
            .bind(&config.source.publication)
            .fetch_one(pool)
            .await?;
    if !publication {
        return Err(Error::Source(weir_source::Error::PublicationMissing {
            publication: config.source.publication.clone(),
        }));
    }
    weir_streams::migrate(pool).await?;
    weir_jobs::migrate(pool).await?;
    if !publishes_stream_events(pool, &config.source.publication).await? {
        return Err(Error::Setup(format!(
            "publication `{}` does not cover the event store's table weir.stream_events (it was \
             made by an older weir); run `weir init` to add it",
            config.source.publication
        )));
    }
    // A table that joined the publication without an identity (a keyless table created in a
    // watched schema after `weir init`): capture goes on, the application's updates and
    // deletes on it fail. Not weir's to refuse; said at every start.
    for (table, identity) in
        crate::replica_identity::keyless_published(pool, &config.source.publication).await?
    {
        let who = match identity {
            crate::replica_identity::Identity::Nothing => "its identity is `nothing`",
            _ if config.source.manage_replica_identity => {
                "it has no primary key; `weir init` sets full on it"
            }
            _ => "it has no primary key",
        };
        tracing::warn!(
            table,
            "published without a replica identity ({who}): PostgreSQL refuses every UPDATE and \
             DELETE on it; add a primary key or run `{}`",
            crate::replica_identity::full_identity_statement(&table)
        );
    }
    let slot: Option<Option<String>> =
        sqlx::query_scalar("select wal_status from pg_replication_slots where slot_name = $1")
            .bind(&config.source.slot)
            .fetch_optional(pool)
            .await?;
    match slot {
        None => {
            Err(Error::Source(weir_source::Error::SlotMissing { slot: config.source.slot.clone() }))
        }
        Some(Some(status)) if status == "lost" => {
            Err(Error::Source(weir_source::Error::SlotInvalidated {
                slot: config.source.slot.clone(),
                detail: "wal_status = lost".into(),
            }))
        }
        Some(_) => Ok(()),
    }
}

/// Whether the publication covers `weir.stream_events` (appends reach the log).
pub(crate) async fn publishes_stream_events(pool: &PgPool, publication: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "select exists (select 1 from pg_publication_tables
                        where pubname = $1 and schemaname = 'weir' and tablename = 'stream_events')",
    )
    .bind(publication)
    .fetch_one(pool)
    .await?)
}
