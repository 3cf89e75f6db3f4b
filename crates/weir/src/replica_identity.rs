//! Replica identity, decided up front: which watched tables must carry more than their
//! primary key in the old rows the WAL sends, because an operator or a subscription routes
//! their events by another column — and which have no identity at all, which PostgreSQL
//! turns into refused `UPDATE`s and `DELETE`s once they are published.
//!
//! ```text
//! keyless tables (no primary key under `default`, or `nothing`; leaf partitions, not unlogged)
//!        ─► keyless(): those `weir init` is about to publish
//!           weir init:   `replica identity full` before publishing them (managed), or a
//!                        refusal naming each with its statement, nothing changed
//!        ─► keyless_published(): those that joined a watched schema later
//!           weir run:    a warning at start, with the statement
//!
//! routed columns: [[operators]] key maps (unmapped entities: their primary key),
//!                 Rust operators' Operator::key_columns, entity subscriptions' partition_by
//!        ─► needs(): those of watched tables their replica identity does not carry
//!           (default: the primary key; using index: its columns; full: all; nothing: none)
//!        ─► weir doctor: the table fails, naming the operator and column, with the fix
//!           weir init:   `alter table … replica identity full` when
//!                        `[source] manage_replica_identity` (else: says what is needed)
//!           weir run:    refuses to start (Error::ReplicaIdentity), never a halt at the
//!                        first delete
//! ```
//!
//! A delete's old row holds only the identity's columns, and so does an update's old row
//! (when it is sent at all): an operator keyed by `comments.post_id` could neither route a
//! deleted comment nor recompute the post a comment moved away from. Only consumers that
//! receive deletes or updates count; subscriptions route an update by its new row, so only
//! their deletes do.

use std::fmt;

use sqlx::PgPool;
use weir_consumer::ConsumerSpec;
use weir_core::{Config, Kind};
use weir_streams::{SubscriptionDef, SubscriptionKind};

use crate::Result;
use crate::setup::{publication_tables, quote_ident, split_table};

/// A column a consumer routes a table's events by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyColumn {
    /// `operator` or `subscription`.
    pub role: &'static str,
    /// The operator or subscription.
    pub consumer: String,
    /// The table, as configured (`comments`, `sales.orders`).
    pub entity: String,
    /// The column.
    pub column: String,
}

/// A watched table's replica identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// `default`: the primary key's columns (none without a primary key).
    Default(Vec<String>),
    /// `using index`: that index's columns.
    Index(Vec<String>),
    /// `full`: every column.
    Full,
    /// `nothing`: no column.
    Nothing,
}

impl Identity {
    /// Whether a deleted row's old values include `column`.
    pub fn covers(&self, column: &str) -> bool {
        match self {
            Identity::Full => true,
            Identity::Default(cols) | Identity::Index(cols) => cols.iter().any(|c| c == column),
            Identity::Nothing => false,
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Default(cols) if cols.is_empty() => {
                f.write_str("default, without a primary key")
            }
            Identity::Default(cols) => write!(f, "default: the primary key ({})", cols.join(", ")),
            Identity::Index(cols) => write!(f, "using index ({})", cols.join(", ")),
            Identity::Full => f.write_str("full"),
            Identity::Nothing => f.write_str("nothing"),
        }
    }
}

/// A consumer that routes a watched table by a column the table's replica identity does not
/// carry: it cannot work until the identity is full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// `schema.table`.
    pub table: String,
    /// The column routed by.
    pub column: String,
    /// `operator` or `subscription`.
    pub role: &'static str,
    /// The operator or subscription that routes by it.
    pub consumer: String,
    /// The table's identity now.
    pub identity: Identity,
}

impl Need {
    /// The statement that fixes it.
    pub fn fix(&self) -> String {
        full_identity_statement(&self.table)
    }
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} `{}` routes `{}` by `{}`, which the table's replica identity ({}) leaves out of \
             deleted and moved rows; run `{}` (`weir init` does it with `[source] \
             manage_replica_identity = true`)",
            self.role,
            self.consumer,
            self.table,
            self.column,
            self.identity,
            self.fix()
        )
    }
}

/// Whether a consumer receiving `kinds` (empty: all) needs its routing columns in old rows:
/// deletes always, updates when it recomputes the key a row moved away from (operators).
fn reads_old_rows(kinds: &[Kind], updates_too: bool) -> bool {
    kinds.is_empty()
        || kinds.contains(&Kind::Delete)
        || (updates_too && kinds.contains(&Kind::Update))
}

/// The columns the `[[operators]]` and `[[subscriptions]]` of `config` route by (an operator's
/// unmapped entity routes by its one-column primary key). Entries that are wrong in other
/// ways are left to the checks that refuse them.
pub async fn config_columns(pool: &PgPool, config: &Config) -> Result<Vec<KeyColumn>> {
    let mut out = Vec::new();
    for op in &config.operators {
        if !reads_old_rows(&op.kinds, true) {
            continue;
        }
        for entity in &op.entities {
            let column = match op.key.get(entity) {
                Some(c) => Some(c.clone()),
                None => match primary_key(pool, entity).await?.as_slice() {
                    [one] => Some(one.clone()),
                    _ => None,
                },
            };
            if let Some(column) = column {
                out.push(KeyColumn {
                    role: "operator",
                    consumer: op.name.clone(),
                    entity: entity.clone(),
                    column,
                });
            }
        }
    }
    for c in &config.subscriptions {
        if let Ok(def) = SubscriptionDef::from_config(c) {
            out.extend(subscription_columns(&def));
        }
    }
    Ok(out)
}

/// The columns a running consumer routes by ([`Operator::key_columns`](crate::Operator)).
pub fn spec_columns(spec: &ConsumerSpec) -> Vec<KeyColumn> {
    if !reads_old_rows(&spec.selector().kinds, true) {
        return Vec::new();
    }
    spec.key_columns()
        .into_iter()
        .map(|(entity, column)| KeyColumn {
            role: "operator",
            consumer: spec.name.clone(),
            entity,
            column,
        })
        .collect()
}

/// The column an `entity` subscription routes by (`partition_by`, its first segment), when it
/// receives deletes.
pub fn subscription_columns(def: &SubscriptionDef) -> Vec<KeyColumn> {
    let Some(path) = def.options.partition_by.as_deref() else { return Vec::new() };
    if def.kind != SubscriptionKind::Entity {
        return Vec::new();
    }
    let selector = def.coarse_selector();
    if !reads_old_rows(&selector.kinds, false) {
        return Vec::new();
    }
    let column = path.split('.').next().unwrap_or(path).to_string();
    selector
        .entities
        .into_iter()
        .map(|entity| KeyColumn {
            role: "subscription",
            consumer: def.name.clone(),
            entity,
            column: column.clone(),
        })
        .collect()
}

/// The tables weir watches (`schema.table`): `source.tables`, else the publication's.
async fn watched(pool: &PgPool, config: &Config) -> Result<Vec<String>> {
    if config.source.tables.is_empty() {
        return publication_tables(pool, &config.source.publication).await;
    }
    Ok(config.source.tables.iter().map(|t| qualified(t)).collect())
}

fn qualified(entity: &str) -> String {
    let (schema, table) = split_table(entity);
    format!("{schema}.{table}")
}

/// The columns of `columns` on watched tables that their replica identity does not carry, in
/// the order given. A table that does not exist is left to the checks that refuse it.
pub async fn needs(pool: &PgPool, config: &Config, columns: &[KeyColumn]) -> Result<Vec<Need>> {
    let watched = watched(pool, config).await?;
    let mut out = Vec::new();
    for c in columns {
        let table = qualified(&c.entity);
        if !watched.contains(&table) {
            continue;
        }
        let Some(identity) = identity(pool, &table).await? else { continue };
        if !identity.covers(&c.column) {
            out.push(Need {
                role: c.role,
                table,
                column: c.column.clone(),
                consumer: c.consumer.clone(),
                identity,
            });
        }
    }
    Ok(out)
}

/// Sets `replica identity full` on each table of `needs` (once each); returns those changed.
pub async fn apply(pool: &PgPool, needs: &[Need]) -> Result<Vec<String>> {
    let mut changed: Vec<String> = Vec::new();
    for need in needs {
        if changed.contains(&need.table) {
            continue;
        }
        set_full(pool, &need.table).await?;
        changed.push(need.table.clone());
    }
    Ok(changed)
}

/// `alter table … replica identity full` on `schema.table`, a refusal for want of ownership
/// said with the statement to run.
pub(crate) async fn set_full(pool: &PgPool, qualified: &str) -> Result<()> {
    // Every name quoted here (a schema named like a reserved word needs it); the statement
    // shown to people quotes only where the characters call for it.
    let (schema, table) = split_table(qualified);
    let sql =
        format!("alter table {}.{} replica identity full", quote_ident(schema), quote_ident(table));
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await.map_err(|e| match &e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("42501") => {
            crate::Error::Setup(format!(
                "the role may not change {qualified}'s replica identity ({}); run `{}` as the \
                 table's owner, or `weir init` as its owner",
                db.message(),
                full_identity_statement(qualified),
            ))
        }
        _ => crate::Error::Database(e),
    })?;
    Ok(())
}

/// The tables `config` would publish (`source.tables`, or the tables of `source.schemas`
/// now) that have no replica identity. Once such a table is in a publication that publishes
/// updates and deletes, PostgreSQL refuses every `UPDATE` and `DELETE` on it — the
/// application's writes, not weir's — so `weir init` settles them before it publishes.
pub async fn keyless(pool: &PgPool, config: &Config) -> Result<Vec<(String, Identity)>> {
    let schemas = if config.source.tables.is_empty() { &config.source.schemas[..] } else { &[] };
    keyless_among(pool, &config.source.tables, schemas).await
}

/// The tables of `publication` that have no replica identity (see [`keyless`]): a keyless
/// table created in a watched schema after `weir init` joins the publication by itself.
pub async fn keyless_published(
    pool: &PgPool,
    publication: &str,
) -> Result<Vec<(String, Identity)>> {
    keyless_among(pool, &publication_tables(pool, publication).await?, &[]).await
}

/// Of `tables` (`posts`, `sales.orders`) and every table of `schemas`, the ones a publication
/// would carry rows of — a table, or a partitioned table's leaf partitions; not unlogged or
/// temporary ones — without a replica identity: no primary key under the default identity,
/// or identity `nothing`. `schema.table`, sorted, with the identity.
async fn keyless_among(
    pool: &PgPool,
    tables: &[String],
    schemas: &[String],
) -> Result<Vec<(String, Identity)>> {
    let (names_schemas, names): (Vec<String>, Vec<String>) = tables
        .iter()
        .map(|t| {
            let (schema, table) = split_table(t);
            (schema.to_string(), table.to_string())
        })
        .unzip();
    let rows: Vec<(String, String)> = sqlx::query_as(
        "with listed as (
             select c.oid, c.relkind from pg_class c join pg_namespace n on n.oid = c.relnamespace
              where c.relkind in ('r', 'p')
                and ((n.nspname, c.relname) in (select * from unnest($1::text[], $2::text[]))
                     or n.nspname = any($3))
         ), leaves as (
             select oid from listed where relkind = 'r'
             union
             select t.relid from listed l cross join lateral pg_partition_tree(l.oid) t
              where l.relkind = 'p' and t.isleaf
         )
         select n.nspname || '.' || c.relname, c.relreplident::text
           from leaves l join pg_class c on c.oid = l.oid
           join pg_namespace n on n.oid = c.relnamespace
          where c.relpersistence = 'p'
            and (c.relreplident = 'n'
                 or (c.relreplident = 'd'
                     and not exists (select 1 from pg_index i
                                      where i.indrelid = c.oid and i.indisprimary)))
          order by 1",
    )
    .bind(&names_schemas)
    .bind(&names)
    .bind(schemas)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(table, ident)| {
            let identity =
                if ident == "n" { Identity::Nothing } else { Identity::Default(Vec::new()) };
            (table, identity)
        })
        .collect())
}

/// `alter table <schema>.<table> replica identity full;` for `schema.table`, each name quoted
/// when it must be (`"Audit"`), so the statement can be pasted as it is.
pub fn full_identity_statement(qualified: &str) -> String {
    let (schema, table) = split_table(qualified);
    format!("alter table {}.{} replica identity full;", ident(schema), ident(table))
}

/// `name` for a statement shown to people: bare when it is lowercase letters, digits and `_`,
/// else quoted. (A schema named like a reserved word would need quotes too; what weir runs
/// itself always quotes.)
fn ident(name: &str) -> String {
    let bare = name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if bare { name.to_string() } else { format!("\"{}\"", name.replace('"', "\"\"")) }
}

/// The replica identity of `schema.table`; `None` when there is no such table.
pub async fn identity(pool: &PgPool, table: &str) -> Result<Option<Identity>> {
    let (schema, name) = split_table(table);
    let row: Option<(String, Vec<String>)> = sqlx::query_as(
        "select c.relreplident::text,
                coalesce((select array_agg(a.attname::text order by a.attnum)
                          from pg_index i
                          join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
                          where i.indrelid = c.oid
                            -- default: the primary key; using index: the chosen index
                            and ((c.relreplident = 'd' and i.indisprimary)
                                 or (c.relreplident = 'i' and i.indisreplident))), '{}')
         from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')",
    )
    .bind(schema)
    .bind(name)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(kind, cols)| match kind.as_str() {
        "f" => Identity::Full,
        "n" => Identity::Nothing,
        "i" => Identity::Index(cols),
        _ => Identity::Default(cols),
    }))
}

/// The primary key's columns of `entity` (empty without one).
async fn primary_key(pool: &PgPool, entity: &str) -> Result<Vec<String>> {
    let (schema, table) = split_table(entity);
    Ok(sqlx::query_scalar(
        "select a.attname::text from pg_index i
         join pg_class c on c.oid = i.indrelid join pg_namespace n on n.oid = c.relnamespace
         join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
         where n.nspname = $1 and c.relname = $2 and i.indisprimary",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(pool)
    .await?)
}
