//! Rebuilding a SQL operator's target table from scratch while the operator's readers keep the
//! old one whole (`weir operators rebuild NAME`).
//!
//! A SQL operator recomputes a key's row from the current source tables, so a rebuild is that
//! statement run for every key of the source entities into a shadow table, swapped in at the
//! end; the consumer's own lanes then replay the log after their checkpoints onto the new
//! table:
//!
//! ```text
//! begin   checks (nothing changed when one fails): a SQL operator that has run; its target a
//!         plain table whose unqualified name the statement uses (the shadow takes that name),
//!         with nothing tied to it that a swap would break (views, foreign keys, triggers,
//!         sequences) · the rebuild's advisory lock (one rebuild per operator; a killed
//!         process's session lets it go)
//!         BEGIN; weir.rebuilds row; consumer := stopped (reason: the rebuild);
//!                every lane's fence + 1; COMMIT          — checkpoints stand still from here
//!         create weir_rebuild.<table> (like <target> including all)
//!         keys := distinct key column of every source entity
//! step    per chunk of keys: BEGIN; search_path := weir_rebuild, <search_path>;
//!         the statement for each key; refuse if the live target was written; progress; COMMIT
//! finish  BEGIN; lock the target; drop it; move the shadow into its schema; owner, grants,
//!         replica identity, publications as the old one had them; consumer := running;
//!         forget the row; COMMIT                        — readers see the old or the new table
//! then    the lanes resume from their checkpoints: every change since the stop is recomputed
//!         on the new table (the replay of the retained log)
//! ```
//!
//! Invariants:
//! - Nothing a change since the stop did is lost: the fence bump commits after the stop, so no
//!   lane moves its checkpoint past a position it read before the stop without rolling back;
//!   every change the build does not see commits after it read that key, so it is logged after
//!   every checkpoint and replayed onto the new table.
//! - Process status stays honest: with the checkpoints still, every write after them reads as
//!   not processed until the resumed lanes have handled it.
//! - A reader sees the old table (as it was at the stop) or the new one, never a part: the
//!   swap is one transaction holding the target's lock.
//! - A rebuild killed anywhere leaves the consumer stopped (its reason says why) and the row;
//!   running it again starts the shadow over; [`abort`] drops the shadow and starts the
//!   consumer.

use sqlx::{Connection, PgConnection, PgPool};
use weir_core::OperatorConfig;

use crate::store::rebuild::{self as store, SHADOW_SCHEMA, ident};
use crate::{ConsumerKind, ConsumerState, Error, Result, SqlOperator};

/// Keys recomputed per transaction (one progress update each).
const CHUNK: usize = 500;

/// A rebuild in progress: the consumer is stopped, the shadow exists, the keys are known.
/// [`step`](Self::step) until it answers false, then [`finish`](Self::finish).
#[derive(Debug)]
pub struct Rebuild {
    consumer: String,
    operator: SqlOperator,
    /// `"schema"."table"`.
    target: String,
    /// `weir_rebuild."table"`.
    shadow: String,
    /// The session holding the rebuild's lock; every statement runs on it.
    conn: PgConnection,
    keys: Vec<String>,
    done: usize,
    restarted: Option<String>,
}

fn refuse(consumer: &str, problem: impl Into<String>) -> Error {
    Error::Rebuild { consumer: consumer.to_string(), problem: problem.into() }
}

/// The error for a rebuild of `name`, which is not one of the `configured` SQL operators: a
/// Rust operator, a subscription, or nothing at all.
pub async fn not_configured(pool: &PgPool, name: &str, configured: &[String]) -> Error {
    let kind: Option<ConsumerKind> =
        match sqlx::query_scalar("select kind from weir.consumers where name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await
        {
            Ok(k) => k,
            Err(e) => return e.into(),
        };
    let list = if configured.is_empty() {
        "weir.toml declares none".to_string()
    } else {
        format!("weir.toml declares {}", configured.join(", "))
    };
    refuse(
        name,
        match kind {
            Some(ConsumerKind::Operator) => format!(
                "it is not an [[operators]] entry of weir.toml but an operator registered in code \
                 (Rust), whose target table this command cannot know. Rebuild it in the \
                 application (for instance: delete its consumer with its checkpoints and let it \
                 start from the beginning of the retained log); {list}"
            ),
            Some(ConsumerKind::Subscription) => {
                format!("it is a subscription, not an operator; it has no table to rebuild; {list}")
            }
            None => format!("there is no operator of that name; {list}"),
        },
    )
}

/// Whether `sql` names `table` after a dot (`schema.table`, `"schema"."table"`): such a
/// statement writes the live table whatever the search path says.
fn names_qualified(sql: &str, table: &str) -> bool {
    let sql = sql.to_lowercase();
    let table = table.to_lowercase();
    let bytes = sql.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$';
    let mut from = 0;
    while let Some(at) = sql[from..].find(&table) {
        let start = from + at;
        let end = start + table.len();
        from = end;
        if end < bytes.len() && word(bytes[end]) {
            continue;
        }
        let mut i = start;
        if i > 0 && bytes[i - 1] == b'"' {
            i -= 1;
        } else if i > 0 && word(bytes[i - 1]) {
            continue;
        }
        while i > 0 && bytes[i - 1].is_ascii_whitespace() {
            i -= 1;
        }
        if i > 0 && bytes[i - 1] == b'.' {
            return true;
        }
    }
    false
}

fn split(entity: &str) -> (&str, &str) {
    entity.split_once('.').unwrap_or(("public", entity))
}

impl Rebuild {
    /// Checks that `config`'s operator can be rebuilt (nothing is changed when it cannot), then
    /// stops its consumer, fences its lanes, creates the shadow and reads the keys. `process`
    /// names who runs it (shown in the consumer's stop reason). A rebuild of the same operator
    /// that was killed is started over.
    pub async fn begin(pool: &PgPool, config: &OperatorConfig, process: &str) -> Result<Self> {
        let name = config.name.as_str();
        let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
        match store::consumer(&mut conn, name).await? {
            None => {
                return Err(refuse(
                    name,
                    "it has not run yet (no consumer in weir.consumers): `weir run` builds its \
                     table from the log; there is nothing to rebuild",
                ));
            }
            Some((ConsumerKind::Subscription, ..)) => {
                return Err(refuse(name, "the name belongs to a subscription, not an operator"));
            }
            Some(_) => {}
        }
        let operator = SqlOperator::prepare(pool, config).await?;
        let target_name = config.target.clone().unwrap_or_else(|| name.to_string());
        let (schema, table) = split(&target_name);
        let Some(target) = store::target(&mut conn, schema, table).await? else {
            return Err(refuse(
                name,
                format!(
                    "its target table `{target_name}` does not exist; create it (or set \
                     `target` to the table the statement writes)"
                ),
            ));
        };
        let t = &target.qualified;
        if target.relkind != "r" || target.partition_or_inherited {
            return Err(refuse(
                name,
                format!(
                    "its target {t} is not a plain table (a partitioned, inherited, foreign or \
                     view relation); a shadow copy of it cannot be swapped in"
                ),
            ));
        }
        if target.row_security {
            return Err(refuse(
                name,
                format!(
                    "its target {t} has row-level security, whose policies a shadow table would \
                     not carry; disable it for the rebuild and enable it again after"
                ),
            ));
        }
        if target.replica_identity == "i" {
            return Err(refuse(
                name,
                format!(
                    "its target {t} has a replica identity by index, which a shadow table would \
                     not carry; set `replica identity default` or `full` for the rebuild"
                ),
            ));
        }
        if !target.visible || names_qualified(&config.sql, table) {
            return Err(refuse(
                name,
                format!(
                    "the statement must write its target by the bare name `{table}` (resolved \
                     through the search path to {t}), so that the rebuild can point that name at \
                     the shadow table; write it unqualified{}",
                    if target.visible { "" } else { " and put its schema on the search path" }
                ),
            ));
        }
        let ties = store::ties(&mut conn, t).await?;
        if !ties.is_empty() {
            return Err(refuse(
                name,
                format!(
                    "{} ties other objects to its target {t}, which swapping in a new table \
                     would break: {}; drop them for the rebuild and create them again after",
                    if ties.len() == 1 { "this" } else { "these" },
                    ties.join("; ")
                ),
            ));
        }
        let shadow = format!("{SHADOW_SCHEMA}.{}", ident(table));
        if !store::try_lock(&mut conn, name).await? {
            let running = store::row(&mut conn, name).await?;
            return Err(refuse(
                name,
                match running {
                    Some(r) => format!(
                        "a rebuild of it is running (process {}, since {}, {} of {} keys); wait \
                         for it to finish",
                        r.process,
                        r.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
                        r.keys_done,
                        r.keys_total.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
                    ),
                    None => "a rebuild or an abort of it is running; wait for it".into(),
                },
            ));
        }
        let restarted = store::row(&mut conn, name).await?.map(|r| r.process);
        if restarted.is_none() {
            let (_, state, drain_to) =
                store::consumer(&mut conn, name).await?.expect("checked above");
            if state == ConsumerState::Stopped {
                return Err(refuse(
                    name,
                    "it is stopped (not by a rebuild); a rebuild would start it — start it first",
                ));
            }
            if drain_to.is_some() {
                return Err(refuse(
                    name,
                    "its lanes are being re-split; run the rebuild once the re-split is done",
                ));
            }
        }
        if let Some(other) = store::shadow_taken(&mut conn, name, &shadow).await? {
            return Err(refuse(
                name,
                format!(
                    "the rebuild of `{other}` uses the shadow table {shadow} (a target of the \
                     same name); run this one after it"
                ),
            ));
        }
        let reason = format!(
            "rebuilding its table {t} into {shadow} (process {process}); it starts again once \
             the new table is swapped in (`weir operators rebuild {name}` again finishes a \
             killed rebuild, `--abort` gives it up)"
        );
        let mut tx = conn.begin().await?;
        store::record(&mut tx, name, t, &shadow, process).await?;
        crate::store::consumer::stop(&mut *tx, name, Some(&reason)).await?;
        store::fence_lanes(&mut tx, name).await?;
        tx.commit().await?;
        store::create_shadow(&mut conn, t, &shadow).await?;
        let sources: Vec<(String, String)> = operator
            .key_columns()
            .iter()
            .map(|(entity, column)| {
                let (s, tb) = split(entity);
                (format!("{}.{}", ident(s), ident(tb)), ident(column))
            })
            .collect();
        let keys = store::keys(&mut conn, &sources).await?;
        store::progress(&mut conn, name, 0, keys.len() as i64).await?;
        tracing::info!(consumer = name, target = %t, keys = keys.len(), "rebuild begun");
        Ok(Self {
            consumer: name.to_string(),
            operator,
            target: target.qualified,
            shadow,
            conn,
            keys,
            done: 0,
            restarted,
        })
    }

    /// How many keys the shadow is built from.
    pub fn keys_total(&self) -> usize {
        self.keys.len()
    }

    /// How many keys are in the shadow so far.
    pub fn keys_done(&self) -> usize {
        self.done
    }

    /// The process of a killed rebuild this one started over, if it did.
    pub fn restarted(&self) -> Option<&str> {
        self.restarted.as_deref()
    }

    /// The shadow table, `weir_rebuild."table"`.
    pub fn shadow(&self) -> &str {
        &self.shadow
    }

    /// The target table, `"schema"."table"`.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Recomputes the next chunk of keys into the shadow, in one transaction. False once every
    /// key is done. A key whose statement fails, or a statement that wrote the live table,
    /// gives the rebuild up ([`abort`]'s work: shadow dropped, consumer started) and answers
    /// the error.
    pub async fn step(&mut self) -> Result<bool> {
        if self.done >= self.keys.len() {
            return Ok(false);
        }
        let end = (self.done + CHUNK).min(self.keys.len());
        let mut tx = self.conn.begin().await?;
        store::shadow_first(&mut tx).await?;
        let mut failed = None;
        for key in &self.keys[self.done..end] {
            if let Err(e) = self.operator.recompute(&mut tx, key).await {
                failed = Some(Error::RebuildKey {
                    consumer: self.consumer.clone(),
                    key: key.clone(),
                    source: e.error,
                });
                break;
            }
        }
        if failed.is_none() && store::written_here(&mut tx, &self.target).await? > 0 {
            failed = Some(refuse(
                &self.consumer,
                format!(
                    "the statement wrote the live table {} instead of the shadow (it names it \
                     with its schema, or writes it through a function or view); write the \
                     target by its bare name",
                    self.target
                ),
            ));
        }
        if let Some(e) = failed {
            tx.rollback().await?;
            give_up(&mut self.conn, &self.consumer, &self.shadow).await?;
            tracing::warn!(consumer = %self.consumer, error = %e, "rebuild given up; the operator runs on its old table");
            return Err(e);
        }
        store::progress(&mut tx, &self.consumer, end as i64, self.keys.len() as i64).await?;
        tx.commit().await?;
        self.done = end;
        Ok(self.done < self.keys.len())
    }

    /// Swaps the shadow in and starts the consumer, in one transaction; its lanes then replay
    /// the log after their checkpoints onto the new table. Call once [`step`](Self::step) has
    /// answered false.
    pub async fn finish(mut self) -> Result<()> {
        if self.done < self.keys.len() {
            return Err(refuse(&self.consumer, "finish called before every key was built"));
        }
        let mut tx = self.conn.begin().await?;
        store::swap(&mut tx, &self.target, &self.shadow).await?;
        crate::store::consumer::start(&mut *tx, &self.consumer).await?;
        store::forget(&mut tx, &self.consumer).await?;
        tx.commit().await?;
        tracing::info!(consumer = %self.consumer, target = %self.target, keys = self.done, "rebuild swapped in");
        // Closing the session lets the lock go.
        self.conn.close().await?;
        Ok(())
    }
}

/// Drops the shadow, starts the consumer and forgets the rebuild, in one transaction.
async fn give_up(conn: &mut PgConnection, consumer: &str, shadow: &str) -> Result<()> {
    let mut tx = conn.begin().await?;
    store::drop_shadow(&mut tx, shadow).await?;
    crate::store::consumer::start(&mut *tx, consumer).await?;
    store::forget(&mut tx, consumer).await?;
    tx.commit().await?;
    Ok(())
}

/// Gives up the rebuild of `name` (one that was killed, or failed): drops its shadow and starts
/// the consumer on its old table. Refused while a rebuild of it runs, or when there is none.
pub async fn abort(pool: &PgPool, name: &str) -> Result<()> {
    let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
    if !store::try_lock(&mut conn, name).await? {
        return Err(refuse(name, "a rebuild of it is running; stop that process first"));
    }
    let Some(row) = store::row(&mut conn, name).await? else {
        return Err(refuse(name, "there is no rebuild of it to abort"));
    };
    give_up(&mut conn, name, &row.shadow).await?;
    tracing::info!(consumer = name, shadow = %row.shadow, "rebuild aborted");
    conn.close().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::names_qualified;

    #[test]
    fn a_schema_qualified_target_is_seen() {
        let t = "post_with_comments_counts";
        assert!(!names_qualified("insert into post_with_comments_counts (id) select 1", t));
        assert!(names_qualified("insert into public.post_with_comments_counts (id)", t));
        assert!(names_qualified("insert into \"public\" . \"Post_With_Comments_Counts\"", t));
        assert!(!names_qualified("insert into my_post_with_comments_counts values (1)", t));
        assert!(!names_qualified("select x.post_with_comments_counts_id from x", t));
        assert!(names_qualified("update public.post_with_comments_counts set", t));
    }
}
