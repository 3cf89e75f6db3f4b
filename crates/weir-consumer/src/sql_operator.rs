//! Declarative operators from `weir.toml`: one SQL statement run with the event's key as `$1`
//! (the EventStreamex `query(sql, id(...), delete_with(...))` helper, generalised to any key
//! type).
//!
//! ```toml
//! [[operators]]
//! name = "post_with_comments_counts"
//! entities = ["posts", "comments"]
//! key = { comments = "post_id" }          # posts use their primary key
//! delete_with = ["posts"]                 # a deleted post deletes its row
//! sql = """
//! insert into post_with_comments_counts (id, title, comments_count)
//! select p.id, p.title, (select count(*) from comments c where c.post_id = p.id)
//! from posts p where p.id = $1
//! on conflict (id) do update set title = excluded.title, comments_count = excluded.comments_count
//! """
//! ```
//!
//! Everything that can be known at start-up is checked then: the tables and key columns exist,
//! each unmapped entity has a one-column primary key, the statements prepare, `$1`'s type is
//! supported. A key that turns out null for an event fails that event (retry policy), never a
//! silent skip.
//!
//! An update that changes the key column (a comment moved from post 1 to post 2) has two keys,
//! the old one first: the statement runs for each, on the lane each routes to (for both, old
//! first, when they share one). The old key comes from `old_record`, so the table's replica
//! identity must carry the column ([`key_columns`](crate::Operator::key_columns) lets weir
//! check that before it starts). For an entity in `delete_with`, the old key of such an update
//! is a row gone: its target row is deleted.
//!
//! A group of a lane's events (up to the consumer's `group`) runs in one round trip: at
//! start-up the statement is also compiled into a PL/pgSQL function in the `weir` schema that
//! loops over the group's keys and runs it (or the delete) for each, in order, with plans kept
//! for the session. The function is named after a hash of what it runs
//! (`weir.sql_operator_<hash>`), so two processes with different statements for one operator
//! (a rolling deploy) never run each other's. Where the function cannot be made or turns out
//! not to run what a plain statement runs, the operator runs one statement per event, as it
//! does for a single event.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{Executor, PgConnection, PgPool, TypeInfo};
use weir_core::{Event, Kind, OperatorConfig};

use crate::{BoxError, Error, Operator, OperatorError, Result, Selector};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyType {
    Int2,
    Int4,
    Int8,
    Uuid,
    Text,
}

impl KeyType {
    fn of(name: &str) -> Option<Self> {
        Some(match name {
            "INT2" => KeyType::Int2,
            "INT4" => KeyType::Int4,
            "INT8" => KeyType::Int8,
            "UUID" => KeyType::Uuid,
            "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" => KeyType::Text,
            _ => return None,
        })
    }

    /// The type's name in SQL.
    fn sql(self) -> &'static str {
        match self {
            KeyType::Int2 => "int2",
            KeyType::Int4 => "int4",
            KeyType::Int8 => "int8",
            KeyType::Uuid => "uuid",
            KeyType::Text => "text",
        }
    }
}

/// A declarative operator, prepared against the database.
#[derive(Debug)]
pub struct SqlOperator {
    name: String,
    selector: Selector,
    /// Entity → the column holding the key.
    key_columns: BTreeMap<String, String>,
    sql: String,
    key_type: KeyType,
    delete_with: HashSet<String>,
    delete_sql: Option<(String, KeyType)>,
    /// The function that runs a group in one call ([`group_function`]), while it works.
    group: Option<GroupFunction>,
}

/// `weir.sql_operator_<hash>(key, delete_key, keys text[], deletes boolean[])`: runs the
/// operator's statement for each of `keys` in order (its delete statement where `deletes` says
/// so), the key bound as `$1` is for a single event.
#[derive(Debug)]
struct GroupFunction {
    /// `select weir."sql_operator_<hash>"(null, null, $1, $2)`.
    call: String,
    /// Cleared when a call fails in a way a plain statement would not (the statement cannot
    /// run inside PL/pgSQL): from then on each event runs alone.
    works: AtomicBool,
}

fn split(entity: &str) -> (&str, &str) {
    entity.split_once('.').unwrap_or(("public", entity))
}

async fn columns(pool: &PgPool, entity: &str) -> Result<Vec<String>> {
    let (schema, table) = split(entity);
    Ok(sqlx::query_scalar(
        "select column_name::text from information_schema.columns
         where table_schema = $1 and table_name = $2 order by ordinal_position",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(pool)
    .await?)
}

/// An operator configured wrongly: `problem` says what, and the fix.
fn misconfigured(op: &str, problem: String) -> Error {
    Error::Config { consumer: op.to_string(), problem }
}

/// The type of `$1` in `sql`, and whether the statement returns rows.
async fn param_type(
    pool: &PgPool,
    op: &str,
    what: &'static str,
    sql: &str,
) -> Result<(KeyType, bool)> {
    let described = pool
        .describe(sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(sql.to_string())))
        .await
        .map_err(|source| Error::Prepare { consumer: op.to_string(), statement: what, source })?;
    let params = match described.parameters() {
        Some(sqlx::Either::Left(types)) => {
            types.iter().map(|t| t.name().to_string()).collect::<Vec<_>>()
        }
        _ => Vec::new(),
    };
    let returns_rows = !described.columns().is_empty();
    let ty = match params.as_slice() {
        [one] => KeyType::of(one).ok_or_else(|| {
            misconfigured(
                op,
                format!(
                    "$1 in the {what} has type {one}; keys bind as integer, uuid or text \
                 — write `$1::text::{}` to convert",
                    one.to_lowercase()
                ),
            )
        }),
        other => Err(misconfigured(
            op,
            format!(
                "the {what} must take exactly one parameter ($1, the key); it takes {}",
                other.len()
            ),
        )),
    }?;
    Ok((ty, returns_rows))
}

/// A dollar-quote tag that occurs nowhere in `texts`.
fn quote_tag(stem: &str, texts: &[&str]) -> String {
    (0..)
        .map(|n| format!("${stem}{n}$"))
        .find(|tag| texts.iter().all(|t| !t.contains(tag.as_str())))
        .expect("some tag is free")
}

/// Creates (once per distinct body, shared by every process) the function that runs a group's
/// statements in one call, and answers how to call it; `None`, with a warning, when the
/// database refuses it (the operator then runs one statement per event).
///
/// Inside the loop `$1` (the statement's key) and `$2` (the delete's) are assigned each key in
/// turn, cast from text as a bound key is. A statement that returns rows runs through
/// `EXECUTE … USING` (PL/pgSQL refuses a bare one whose rows go nowhere), as does one whose
/// last line may end in a comment; any other runs as static SQL, planned once per session. `#variable_conflict use_column` keeps the loop's one
/// variable from shadowing a column of the user's tables.
async fn group_function(
    pool: &PgPool,
    op: &str,
    (sql, key_type, returns_rows): (&str, KeyType, bool),
    delete: Option<(&str, KeyType)>,
) -> Option<GroupFunction> {
    let sql = sql.trim_end_matches(|c: char| c == ';' || c.is_whitespace()).trim_start();
    // A statement ending in a comment would swallow the `;` PL/pgSQL needs after it.
    let ends_in_comment =
        sql.rsplit('\n').next().is_some_and(|last| last.contains("--")) || sql.ends_with("*/");
    let (delete_sql, delete_type) = delete.unwrap_or(("", key_type));
    // The delete statement is weir's own, ending in its one parameter.
    let delete_sql = format!("{}$2", delete_sql.strip_suffix("$1").unwrap_or(delete_sql));
    let outer = quote_tag("weir_body_", &[sql]);
    let inner = quote_tag("weir_statement_", &[sql]);
    let statement = if returns_rows || ends_in_comment {
        format!("execute {inner}{sql}{inner} using $1;")
    } else {
        format!("{sql};")
    };
    let on_delete = if delete.is_some() {
        format!(
            "if $4[weir__i] then\n      $2 := $3[weir__i]::{dt};\n      {delete_sql};\n      continue;\n    end if;\n    ",
            dt = delete_type.sql()
        )
    } else {
        String::new()
    };
    let body = format!(
        "\n#variable_conflict use_column\ndeclare weir__i integer;\nbegin\n  \
         for weir__i in 1 .. coalesce(array_length($3, 1), 0) loop\n    {on_delete}\
         $1 := $3[weir__i]::{kt};\n    {statement}\n  end loop;\nend\n",
        kt = key_type.sql()
    );
    let signature = format!("({}, {}, text[], boolean[])", key_type.sql(), delete_type.sql());
    let hash: String = Sha256::digest(format!("{signature}{body}").as_bytes())
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect();
    let name = format!("weir.\"sql_operator_{hash}\"");
    let create = format!(
        "create or replace function {name}{signature} returns void language plpgsql as {outer}{body}{outer}"
    );
    let made = async {
        let mut tx = pool.begin().await?;
        // Two processes starting at once would otherwise race on the catalog row.
        sqlx::query("select pg_advisory_xact_lock(hashtext('weir.sql_operator'))")
            .execute(&mut *tx)
            .await?;
        let exists: bool = sqlx::query_scalar("select to_regprocedure($1) is not null")
            .bind(format!("{name}{signature}"))
            .fetch_one(&mut *tx)
            .await?;
        if !exists {
            sqlx::raw_sql(sqlx::AssertSqlSafe(create)).execute(&mut *tx).await?;
        }
        tx.commit().await
    };
    match made.await {
        Ok(()) => Some(GroupFunction {
            call: format!("select {name}(null, null, $1, $2)"),
            works: AtomicBool::new(true),
        }),
        Err(e) => {
            tracing::warn!(
                operator = op,
                error = %e,
                "could not create the function that runs a group of events in one call; \
                 each event runs its own statement (grant CREATE on schema weir to fix)"
            );
            None
        }
    }
}

impl SqlOperator {
    /// Validates `config` against the database and prepares the statements.
    pub async fn prepare(pool: &PgPool, config: &OperatorConfig) -> Result<Self> {
        let op = &config.name;
        let mut key_columns = BTreeMap::new();
        for entity in &config.entities {
            let cols = columns(pool, entity).await?;
            if cols.is_empty() {
                return Err(misconfigured(
                    op,
                    format!("it listens to `{entity}`, but there is no such table"),
                ));
            }
            let column = match config.key.get(entity) {
                Some(c) => {
                    if !cols.contains(c) {
                        return Err(misconfigured(
                            op,
                            format!(
                                "key.{entity} = \"{c}\", but `{entity}` has no column `{c}` (it has {})",
                                cols.join(", ")
                            ),
                        ));
                    }
                    c.clone()
                }
                None => {
                    let (schema, table) = split(entity);
                    let pk: Vec<String> = sqlx::query_scalar(
                        "select a.attname::text from pg_index i
                         join pg_class c on c.oid = i.indrelid join pg_namespace n on n.oid = c.relnamespace
                         join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
                         where n.nspname = $1 and c.relname = $2 and i.indisprimary",
                    )
                    .bind(schema)
                    .bind(table)
                    .fetch_all(pool)
                    .await?;
                    match pk.as_slice() {
                        [one] => one.clone(),
                        _ => {
                            return Err(misconfigured(
                                op,
                                format!(
                                    "`{entity}` has no one-column primary key; map its key \
                                 column with `key = {{ {entity} = \"column\" }}`"
                                ),
                            ));
                        }
                    }
                }
            };
            key_columns.insert(entity.clone(), column);
        }
        let (key_type, returns_rows) = param_type(pool, op, "sql", &config.sql).await?;
        let delete_sql = if config.delete_with.is_empty() {
            None
        } else {
            let target = config.target.clone().unwrap_or_else(|| op.clone());
            let target_key = config.target_key.clone().unwrap_or_else(|| "id".into());
            let cols = columns(pool, &target).await?;
            if !cols.contains(&target_key) {
                return Err(misconfigured(
                    op,
                    format!(
                        "delete_with needs the target table `{target}` with a column \
                     `{target_key}` (set `target` and `target_key`)"
                    ),
                ));
            }
            let (schema, table) = split(&target);
            let sql = format!(
                "delete from \"{}\".\"{}\" where \"{}\" = ",
                schema.replace('"', "\"\""),
                table.replace('"', "\"\""),
                target_key.replace('"', "\"\"")
            ) + "$1";
            let (t, _) = param_type(pool, op, "delete_with statement", &sql).await?;
            Some((sql, t))
        };
        let group = group_function(
            pool,
            op,
            (&config.sql, key_type, returns_rows),
            delete_sql.as_ref().map(|(sql, t)| (sql.as_str(), *t)),
        )
        .await;
        Ok(Self {
            name: op.clone(),
            selector: Selector { entities: config.entities.clone(), kinds: config.kinds.clone() },
            key_columns,
            sql: config.sql.clone(),
            key_type,
            delete_with: config.delete_with.iter().cloned().collect(),
            delete_sql,
            group,
        })
    }

    /// The operator's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Each listened entity with the column holding its key (a rebuild reads the keys there).
    pub fn key_columns(&self) -> &BTreeMap<String, String> {
        &self.key_columns
    }

    /// Runs the statement for `key` (its text, as in a partition key) in `conn`, bound as a
    /// live event's key is: what a rebuild does for every key (`rebuild.rs`).
    pub async fn recompute(
        &self,
        conn: &mut PgConnection,
        key: &str,
    ) -> std::result::Result<(), OperatorError> {
        run(conn, &self.sql, self.key_type, &Value::String(key.to_string())).await
    }

    /// The key before an update, when the old row carries a value for the key column and it
    /// differs from the new one (the row moved to another key).
    fn moved_from(&self, event: &Event, new: &str) -> Option<String> {
        if event.kind != Kind::Update {
            return None;
        }
        let column = self.key_columns.get(&event.entity)?;
        match event.old_record.as_ref()?.get(column)? {
            Value::Null => None,
            v => Some(key_text(v)).filter(|old| old != new),
        }
    }

    /// Runs the statement for one of the event's keys: the delete statement for a deleted row
    /// of a `delete_with` entity, or for the old key of one that moved.
    async fn run_for(
        &self,
        tx: &mut PgConnection,
        event: &Event,
        key: &str,
        old: bool,
    ) -> std::result::Result<(), OperatorError> {
        let key = Value::String(key.to_string());
        match &self.delete_sql {
            Some((sql, ty))
                if self.deletes(event) || old && self.delete_with.contains(&event.entity) =>
            {
                run(tx, sql, *ty, &key).await
            }
            _ => run(tx, &self.sql, self.key_type, &key).await,
        }
    }

    /// Whether `event`'s (single, current) key runs the delete statement.
    fn deletes(&self, event: &Event) -> bool {
        self.delete_sql.is_some()
            && event.kind == Kind::Delete
            && self.delete_with.contains(&event.entity)
    }

    fn key_value<'e>(&self, event: &'e Event) -> std::result::Result<&'e Value, BoxError> {
        let column = self.key_columns.get(&event.entity).ok_or_else(|| {
            format!(
                "operator `{}` got an event of `{}`, which it does not listen to",
                self.name, event.entity
            )
        })?;
        let record = if event.kind == Kind::Delete {
            event.old_record.as_ref()
        } else {
            event.new_record.as_ref()
        };
        match record.and_then(|r| r.get(column)) {
            Some(Value::Null) | None => Err(format!(
                "operator `{}`: the {} event at position {} has no value for `{}.{column}` (null or not \
                 in the event; a delete needs REPLICA IDENTITY FULL for a non-key column)",
                self.name, event.kind, event.position, event.entity
            )
            .into()),
            Some(v) => Ok(v),
        }
    }
}

/// A key value as the text a partition key (and `$1`) is made of.
fn key_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

async fn run(
    conn: &mut PgConnection,
    sql: &str,
    ty: KeyType,
    key: &Value,
) -> std::result::Result<(), OperatorError> {
    let q = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()));
    let text = match key {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let q = match ty {
        KeyType::Int2 => q.bind(
            text.parse::<i16>()
                .map_err(|e| OperatorError::retry(format!("key `{text}` is not an int2: {e}")))?,
        ),
        KeyType::Int4 => q.bind(
            text.parse::<i32>()
                .map_err(|e| OperatorError::retry(format!("key `{text}` is not an int4: {e}")))?,
        ),
        KeyType::Int8 => q.bind(
            text.parse::<i64>()
                .map_err(|e| OperatorError::retry(format!("key `{text}` is not an int8: {e}")))?,
        ),
        KeyType::Uuid => q.bind(
            text.parse::<uuid::Uuid>()
                .map_err(|e| OperatorError::retry(format!("key `{text}` is not a uuid: {e}")))?,
        ),
        KeyType::Text => q.bind(text),
    };
    q.execute(conn).await?;
    Ok(())
}

impl Operator for SqlOperator {
    fn selector(&self) -> Selector {
        self.selector.clone()
    }

    fn partition_key(&self, event: &Event) -> std::result::Result<String, BoxError> {
        Ok(key_text(self.key_value(event)?))
    }

    fn partition_keys(&self, event: &Event) -> std::result::Result<Vec<String>, BoxError> {
        let new = self.partition_key(event)?;
        Ok(match self.moved_from(event, &new) {
            Some(old) => vec![old, new],
            None => vec![new],
        })
    }

    fn key_columns(&self) -> Vec<(String, String)> {
        self.key_columns.iter().map(|(e, c)| (e.clone(), c.clone())).collect()
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        event: &Event,
    ) -> std::result::Result<(), OperatorError> {
        let key = self.partition_key(event).map_err(OperatorError::retry)?;
        self.run_for(tx, event, &key, false).await
    }

    async fn handle_keys(
        &self,
        tx: &mut PgConnection,
        event: &Event,
        keys: &[String],
    ) -> std::result::Result<(), OperatorError> {
        let new = self.partition_key(event).map_err(OperatorError::retry)?;
        let old = self.moved_from(event, &new);
        for key in keys {
            self.run_for(tx, event, key, old.as_ref() == Some(key)).await?;
        }
        Ok(())
    }

    /// One call of the group function for all of `events` (each has one key: an event with
    /// several is handled alone); one statement each where there is no such function.
    async fn handle_group(
        &self,
        tx: &mut PgConnection,
        events: &[&Event],
    ) -> std::result::Result<(), OperatorError> {
        let Some(group) = self.group.as_ref().filter(|g| g.works.load(Ordering::Relaxed)) else {
            for event in events {
                self.handle(tx, event).await?;
            }
            return Ok(());
        };
        let mut keys = Vec::with_capacity(events.len());
        let mut deletes = Vec::with_capacity(events.len());
        for event in events {
            keys.push(self.partition_key(event).map_err(OperatorError::retry)?);
            deletes.push(self.deletes(event));
        }
        let called = sqlx::query(sqlx::AssertSqlSafe(group.call.clone()))
            .bind(keys)
            .bind(deletes)
            .execute(tx)
            .await;
        if let Err(sqlx::Error::Database(db)) = &called
            && db.code().is_some_and(|c| c.starts_with("42") || c.starts_with("0A"))
        {
            // The engine now runs the group's events one by one, each through `handle`: if the
            // statement itself is at fault, that says so; if it was only its PL/pgSQL form,
            // the events succeed, and later groups should not try it again.
            group.works.store(false, Ordering::Relaxed);
            tracing::warn!(
                operator = %self.name,
                error = %db,
                "the group function failed as a statement would not; this process now runs \
                 one statement per event for this operator"
            );
        }
        called?;
        Ok(())
    }
}
