//! The SQL of a rebuild ([`crate::rebuild`]): weir's own row (`weir.rebuilds`), the lock that
//! keeps two rebuilds of one operator apart, the fence that freezes the consumer's lanes, and
//! the statements on the application's target table (what a shadow cannot carry, the shadow
//! itself, the swap).
//!
//! Identifiers of the application's tables are quoted here (`ident`) and never bound: DDL takes
//! no parameters.

use sqlx::PgConnection;

use crate::Result;

/// The schema that holds shadow tables while they are built.
pub(crate) const SHADOW_SCHEMA: &str = "weir_rebuild";

/// `"name"`, with inner quotes doubled.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The target table as the catalog knows it.
#[derive(Debug, Clone)]
pub(crate) struct TargetRow {
    /// `"schema"."table"`, usable as `$1::regclass` and in DDL.
    pub(crate) qualified: String,
    /// `r` (a table), `p` (partitioned), `v`, `m`, `f`: pg_class.relkind.
    pub(crate) relkind: String,
    pub(crate) partition_or_inherited: bool,
    pub(crate) row_security: bool,
    /// `d`, `n`, `f` or `i`: pg_class.relreplident.
    pub(crate) replica_identity: String,
    /// Whether the unqualified name resolves to this table on the current search_path.
    pub(crate) visible: bool,
}

/// The target `schema.table`, or None when there is no such relation.
pub(crate) async fn target(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<Option<TargetRow>> {
    type Row = (String, String, bool, bool, String, bool);
    let row: Option<Row> = sqlx::query_as(
        "select format('%I.%I', n.nspname, c.relname), c.relkind::text,
                c.relispartition or exists (select 1 from pg_inherits i
                                            where i.inhrelid = c.oid or i.inhparent = c.oid),
                c.relrowsecurity, c.relreplident::text,
                to_regclass(quote_ident(c.relname)) is not distinct from c.oid
         from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = $1 and c.relname = $2",
    )
    .bind(schema)
    .bind(table)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(qualified, relkind, partition_or_inherited, row_security, ri, visible)| {
        TargetRow {
            qualified,
            relkind,
            partition_or_inherited,
            row_security,
            replica_identity: ri,
            visible,
        }
    }))
}

/// What ties other objects to the target, which a swap would break or lose: one line each
/// (views over it, foreign keys to or from it, triggers, columns fed by a sequence,
/// publications with a row filter or column list). Empty when it can be swapped.
pub(crate) async fn ties(conn: &mut PgConnection, qualified: &str) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "select 'view ' || v.oid::regclass::text || ' reads it'
         from pg_depend d join pg_rewrite r on r.oid = d.objid join pg_class v on v.oid = r.ev_class
         where d.classid = 'pg_rewrite'::regclass and d.refobjid = $1::regclass
           and v.oid <> $1::regclass
         union
         select 'foreign key ' || quote_ident(conname) || ' from ' || conrelid::regclass::text
                || ' to ' || confrelid::regclass::text
         from pg_constraint where contype = 'f'
           and (conrelid = $1::regclass or confrelid = $1::regclass)
         union
         select 'trigger ' || quote_ident(tgname)
         from pg_trigger where tgrelid = $1::regclass and not tgisinternal
         union
         select 'column ' || quote_ident(a.attname) || ' takes its values from a sequence'
         from pg_attribute a left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
         where a.attrelid = $1::regclass and a.attnum > 0 and not a.attisdropped
           and (a.attidentity <> '' or pg_get_expr(d.adbin, d.adrelid) like '%nextval(%')
         union
         select 'publication ' || quote_ident(p.pubname) || ' has a row filter or column list for it'
         from pg_publication_rel pr join pg_publication p on p.oid = pr.prpubid
         where pr.prrelid = $1::regclass and (pr.prqual is not null or pr.prattrs is not null)
         order by 1",
    )
    .bind(qualified)
    .fetch_all(conn)
    .await?)
}

/// The rebuild's lock (`weir.rebuild`, the consumer), held by `conn`'s session while the
/// rebuild runs; a killed process's session ends and lets it go. False when another holds it.
pub(crate) async fn try_lock(conn: &mut PgConnection, consumer: &str) -> Result<bool> {
    Ok(sqlx::query_scalar("select pg_try_advisory_lock(hashtext('weir.rebuild'), hashtext($1))")
        .bind(consumer)
        .fetch_one(conn)
        .await?)
}

/// A rebuild's row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct RebuildRow {
    pub(crate) shadow: String,
    pub(crate) process: String,
    pub(crate) started_at: chrono::DateTime<chrono::Utc>,
    pub(crate) keys_total: Option<i64>,
    pub(crate) keys_done: i64,
}

/// The rebuild recorded for `consumer`, if any.
pub(crate) async fn row(conn: &mut PgConnection, consumer: &str) -> Result<Option<RebuildRow>> {
    Ok(sqlx::query_as(
        "select shadow, process, started_at, keys_total, keys_done
         from weir.rebuilds where consumer = $1",
    )
    .bind(consumer)
    .fetch_optional(conn)
    .await?)
}

/// Another consumer's rebuild that uses the same shadow table (a target of the same name in
/// another schema).
pub(crate) async fn shadow_taken(
    conn: &mut PgConnection,
    consumer: &str,
    shadow: &str,
) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "select consumer from weir.rebuilds where shadow = $1 and consumer <> $2",
    )
    .bind(shadow)
    .bind(consumer)
    .fetch_optional(conn)
    .await?)
}

/// Records the rebuild (a killed one's row starts over).
pub(crate) async fn record(
    conn: &mut PgConnection,
    consumer: &str,
    target: &str,
    shadow: &str,
    process: &str,
) -> Result<()> {
    sqlx::query(
        "insert into weir.rebuilds (consumer, target, shadow, process) values ($1, $2, $3, $4)
         on conflict (consumer) do update
         set target = excluded.target, shadow = excluded.shadow, process = excluded.process,
             started_at = now(), keys_total = null, keys_done = 0, updated_at = now()",
    )
    .bind(consumer)
    .bind(target)
    .bind(shadow)
    .bind(process)
    .execute(conn)
    .await?;
    Ok(())
}

/// Bumps the fence of every lane of `consumer`: whatever a holder had in flight (a handler's
/// transaction, a checkpoint) finds no row for its fence and rolls back, so the checkpoints
/// stand still from this commit on. The holders see their lease lost and take the lane again
/// under a new fence, and then see the consumer stopped.
pub(crate) async fn fence_lanes(conn: &mut PgConnection, consumer: &str) -> Result<()> {
    sqlx::query(
        // Rows locked in lane order, as every statement that locks several lanes does.
        "with l as (select lane from weir.checkpoints where consumer = $1 order by lane for update)
         update weir.checkpoints c set fence = fence + 1 from l
         where c.consumer = $1 and c.lane = l.lane",
    )
    .bind(consumer)
    .execute(conn)
    .await?;
    Ok(())
}

/// A fresh, empty shadow of `qualified` in [`SHADOW_SCHEMA`] (one left by a killed rebuild is
/// dropped first): columns, defaults, constraints, indexes, comments — `like … including all`.
pub(crate) async fn create_shadow(
    conn: &mut PgConnection,
    qualified: &str,
    shadow: &str,
) -> Result<()> {
    let sql = format!(
        "create schema if not exists {SHADOW_SCHEMA};
         drop table if exists {shadow};
         create table {shadow} (like {qualified} including all);"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(conn).await?;
    Ok(())
}

/// Every key of the operator's source entities, as text: `(entity, key column)` pairs, each
/// entity `"schema"."table"` and column quoted already.
pub(crate) async fn keys(
    conn: &mut PgConnection,
    sources: &[(String, String)],
) -> Result<Vec<String>> {
    let union = sources
        .iter()
        .map(|(entity, column)| format!("select {column}::text as k from {entity}"))
        .collect::<Vec<_>>()
        .join(" union ");
    let sql = format!("select k from ({union}) x where k is not null order by k");
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_all(conn).await?)
}

/// Puts [`SHADOW_SCHEMA`] first on the search path for the rest of the transaction: the
/// statement's unqualified target resolves to the shadow, everything else as before.
pub(crate) async fn shadow_first(conn: &mut PgConnection) -> Result<()> {
    sqlx::query(
        "select set_config('search_path', $1 || ', ' || current_setting('search_path'), true)",
    )
    .bind(SHADOW_SCHEMA)
    .execute(conn)
    .await?;
    Ok(())
}

/// Rows this transaction inserted, updated or deleted in `qualified` (the live target; the
/// statement must have written the shadow only).
pub(crate) async fn written_here(conn: &mut PgConnection, qualified: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "select pg_stat_get_xact_tuples_inserted($1::regclass) + pg_stat_get_xact_tuples_updated($1::regclass)
                + pg_stat_get_xact_tuples_deleted($1::regclass)",
    )
    .bind(qualified)
    .fetch_one(conn)
    .await?)
}

/// Progress: `done` keys of `total`.
pub(crate) async fn progress(
    conn: &mut PgConnection,
    consumer: &str,
    done: i64,
    total: i64,
) -> Result<()> {
    sqlx::query(
        "update weir.rebuilds set keys_done = $2, keys_total = $3, updated_at = now()
         where consumer = $1",
    )
    .bind(consumer)
    .bind(done)
    .bind(total)
    .execute(conn)
    .await?;
    Ok(())
}

/// Replaces `qualified` by `shadow` (in the caller's transaction, which holds the table's lock
/// from here to its commit): what a new table would not have — owner, grants, replica
/// identity, publications — is read from the old one under the lock and given to the new one.
pub(crate) async fn swap(conn: &mut PgConnection, qualified: &str, shadow: &str) -> Result<()> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("lock table {qualified} in access exclusive mode")))
        .execute(&mut *conn)
        .await?;
    let (schema, owner, is_me, identity): (String, String, bool, String) = sqlx::query_as(
        "select quote_ident(n.nspname), quote_ident(pg_get_userbyid(c.relowner)),
                pg_get_userbyid(c.relowner) = current_user, c.relreplident::text
         from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where c.oid = $1::regclass",
    )
    .bind(qualified)
    .fetch_one(&mut *conn)
    .await?;
    // Privileges granted to others (the owner's own are implied).
    let grants: Vec<String> = sqlx::query_scalar(
        "select format('grant %s on %s to %s%s', a.privilege_type, $1,
                       case when a.grantee = 0 then 'public' else quote_ident(pg_get_userbyid(a.grantee)) end,
                       case when a.is_grantable then ' with grant option' else '' end)
         from pg_class c, aclexplode(c.relacl) a
         where c.oid = $1::regclass and a.grantee <> c.relowner",
    )
    .bind(qualified)
    .fetch_all(&mut *conn)
    .await?;
    let publications: Vec<String> = sqlx::query_scalar(
        "select format('alter publication %I add table %s', p.pubname, $1)
         from pg_publication_rel pr join pg_publication p on p.oid = pr.prpubid
         where pr.prrelid = $1::regclass",
    )
    .bind(qualified)
    .fetch_all(&mut *conn)
    .await?;
    let mut ddl = vec![
        format!("drop table {qualified}"),
        format!("alter table {shadow} set schema {schema}"),
    ];
    if !is_me {
        ddl.push(format!("alter table {qualified} owner to {owner}"));
    }
    ddl.extend(grants);
    match identity.as_str() {
        "f" => ddl.push(format!("alter table {qualified} replica identity full")),
        "n" => ddl.push(format!("alter table {qualified} replica identity nothing")),
        _ => {}
    }
    ddl.extend(publications);
    for statement in ddl {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement)).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Drops the shadow (an abort).
pub(crate) async fn drop_shadow(conn: &mut PgConnection, shadow: &str) -> Result<()> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("drop table if exists {shadow}")))
        .execute(conn)
        .await?;
    Ok(())
}

/// Forgets the rebuild.
pub(crate) async fn forget(conn: &mut PgConnection, consumer: &str) -> Result<()> {
    sqlx::query("delete from weir.rebuilds where consumer = $1")
        .bind(consumer)
        .execute(conn)
        .await?;
    Ok(())
}

/// The consumer's kind, state and re-split drain position; None when there is no such
/// consumer.
pub(crate) async fn consumer(
    conn: &mut PgConnection,
    name: &str,
) -> Result<Option<(crate::ConsumerKind, crate::ConsumerState, Option<i64>)>> {
    Ok(sqlx::query_as("select kind, state, drain_to from weir.consumers where name = $1")
        .bind(name)
        .fetch_optional(conn)
        .await?)
}
