//! `weir doctor`: checks the server and the database for everything ingestion needs, and
//! prints, for each problem, the exact fix.
//!
//! Subscriptions with a webhook or NATS sink (in `[[subscriptions]]` and in the database) get
//! three more: the settings and the secret's environment variable in this process (a failure
//! for a `[[subscriptions]]` entry — `weir run` from this configuration would refuse to start —
//! and a warning for one kept in the database, which the processes that run weir need, not
//! necessarily this one); whether the receiver accepts a TCP connection (a warning: weir retries
//! until it does; no request is sent); and what the last delivering process recorded (a sink it
//! could not build, a stop by the receiver).

use std::fmt;
use std::time::Duration;

use sqlx::PgPool;
use weir_core::Config;
use weir_streams::{Sink, Subscription, SubscriptionDef};

use crate::setup::split_table;
use crate::{Result, db};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Fine.
    Ok,
    /// Works, but deserves attention.
    Warn,
    /// Ingestion cannot work until fixed.
    Fail,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// The outcome.
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// The exact fix, when something is wrong.
    pub fix: Option<String>,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match self.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        write!(f, "[{mark}] {}: {}", self.name, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n       fix: {fix}")?;
        }
        Ok(())
    }
}

fn check(name: &str, verdict: Verdict, detail: impl Into<String>, fix: Option<String>) -> Check {
    Check { name: name.into(), verdict, detail: detail.into(), fix }
}

/// Runs every check. Connection failures come back as a single failed check.
pub async fn diagnose(config: &Config) -> Vec<Check> {
    let pool = match db::connect(config).await {
        Ok(p) => p,
        Err(e) => {
            // The driver's words too (`invalid peer certificate: UnknownIssuer`).
            let detail = std::iter::successors(std::error::Error::source(&e), |s| s.source())
                .fold(e.to_string(), |d, s| format!("{d}: {s}"));
            let fix = if e.is_tls_refusal() {
                "point `sslrootcert` in the database URL at the CA that signed the server's \
                 certificate and use the host name it names (or `sslmode=require` to encrypt \
                 without checking it)"
            } else if matches!(&e, crate::Error::Connect { cause, .. } if crate::error::is_login_refusal(&cause.0))
            {
                "the server answered and refused the login: use a role, password and database \
                 that exist there in `database.url` (weir.toml, WEIR_DATABASE_URL or \
                 DATABASE_URL), or create them"
            } else {
                "set `database.url` in weir.toml, WEIR_DATABASE_URL or DATABASE_URL to a \
                 reachable server"
            };
            return vec![check("connection", Verdict::Fail, detail, Some(fix.into()))];
        }
    };
    match checks(&pool, config).await {
        Ok(c) => c,
        Err(e) => vec![check("queries", Verdict::Fail, e.to_string(), None)],
    }
}

async fn checks(pool: &PgPool, config: &Config) -> Result<Vec<Check>> {
    let mut out = Vec::new();
    let src = &config.source;
    let (version, version_num): (String, i32) = sqlx::query_as(
        "select current_setting('server_version'), current_setting('server_version_num')::int",
    )
    .fetch_one(pool)
    .await?;
    out.push(if version_num >= 140_000 {
        check("server version", Verdict::Ok, format!("PostgreSQL {version}"), None)
    } else {
        check(
            "server version",
            Verdict::Fail,
            format!(
                "PostgreSQL {version}; weir needs 14 or later (streaming of large transactions)"
            ),
            Some("upgrade PostgreSQL to 14 or later".into()),
        )
    });

    let level: String =
        sqlx::query_scalar("select current_setting('wal_level')").fetch_one(pool).await?;
    out.push(if level == "logical" {
        check("wal_level", Verdict::Ok, "logical", None)
    } else {
        check(
            "wal_level",
            Verdict::Fail,
            format!("`{level}`; logical replication needs `logical`"),
            Some("run `alter system set wal_level = logical;` as a superuser, then restart PostgreSQL".into()),
        )
    });

    let (slots, senders, used): (i32, i32, i64) = sqlx::query_as(
        "select current_setting('max_replication_slots')::int, current_setting('max_wal_senders')::int,
                (select count(*) from pg_replication_slots)",
    )
    .fetch_one(pool)
    .await?;
    let slot_exists: bool = sqlx::query_scalar(
        "select exists (select 1 from pg_replication_slots where slot_name = $1)",
    )
    .bind(&src.slot)
    .fetch_one(pool)
    .await?;
    let needed = used + i64::from(!slot_exists);
    out.push(if i64::from(slots) >= needed.max(1) && senders >= 1 {
        check(
            "replication capacity",
            Verdict::Ok,
            format!("max_replication_slots = {slots} ({used} used), max_wal_senders = {senders}"),
            None,
        )
    } else {
        check(
            "replication capacity",
            Verdict::Fail,
            format!("max_replication_slots = {slots} ({used} used), max_wal_senders = {senders}"),
            Some(format!(
                "run `alter system set max_replication_slots = {}; alter system set max_wal_senders = {};` and restart PostgreSQL",
                needed.max(10),
                senders.max(10)
            )),
        )
    });

    let (role, can): (String, bool) = sqlx::query_as(
        "select current_user::text, rolreplication or rolsuper from pg_roles where rolname = current_user",
    )
    .fetch_one(pool)
    .await?;
    out.push(if can {
        check("replication role", Verdict::Ok, format!("role `{role}` may replicate"), None)
    } else {
        check(
            "replication role",
            Verdict::Fail,
            format!("role `{role}` has no REPLICATION attribute"),
            Some(format!("as a superuser: `alter role \"{role}\" replication;`")),
        )
    });

    // Every component `weir init` installs, at the version this binary carries.
    let installed: Vec<(String, i32)> =
        sqlx::query_as("select component, max(version) from weir.migrations group by component")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    let components = [
        ("log", weir_log::MIGRATIONS),
        ("consumers", weir_consumer::MIGRATIONS),
        ("streams", weir_streams::MIGRATIONS),
        ("jobs", weir_jobs::MIGRATIONS),
    ];
    let mut missing = Vec::new();
    for (component, migrations) in components {
        let want = migrations.iter().map(|m| m.version).max().unwrap_or(0);
        match installed.iter().find(|(c, _)| c == component) {
            Some((_, have)) if i64::from(*have) >= i64::from(want) => {}
            Some((_, have)) => missing.push(format!("{component} at version {have} of {want}")),
            None => missing.push(format!("{component} not installed")),
        }
    }
    out.push(if missing.is_empty() {
        check(
            "weir schema",
            Verdict::Ok,
            "installed: the log, consumers, streams and jobs (weir.enqueue)",
            None,
        )
    } else {
        check("weir schema", Verdict::Fail, missing.join("; "), Some("run `weir init`".into()))
    });

    let publication: bool =
        sqlx::query_scalar("select exists (select 1 from pg_publication where pubname = $1)")
            .bind(&src.publication)
            .fetch_one(pool)
            .await?;
    let tables = crate::setup::publication_tables(pool, &src.publication).await?;
    out.push(match (publication, tables.is_empty()) {
        (false, _) => check(
            "publication",
            Verdict::Fail,
            format!("`{}` does not exist", src.publication),
            Some("run `weir init`".into()),
        ),
        (true, true) => check(
            "publication",
            Verdict::Warn,
            format!("`{}` covers no table yet", src.publication),
            Some(
                "create the tables to watch (or list them in `source.tables`) and run `weir init`"
                    .into(),
            ),
        ),
        (true, false) => check(
            "publication",
            Verdict::Ok,
            format!("`{}` covers {}", src.publication, tables.join(", ")),
            None,
        ),
    });

    if publication {
        out.push(if crate::setup::publishes_stream_events(pool, &src.publication).await? {
            check("event store", Verdict::Ok, "weir.stream_events is in the publication", None)
        } else {
            check(
                "event store",
                Verdict::Fail,
                "weir.stream_events is not in the publication: appends would not reach the log",
                Some("run `weir init`".into()),
            )
        });
    }

    let slot: Option<SlotRow> = sqlx::query_as(
        "select plugin::text, active, wal_status,
                (pg_current_wal_lsn() - restart_lsn)::bigint,
                confirmed_flush_lsn::text
         from pg_replication_slots where slot_name = $1",
    )
    .bind(&src.slot)
    .fetch_optional(pool)
    .await?;
    out.push(match slot {
        None => check(
            "replication slot",
            Verdict::Fail,
            format!("`{}` does not exist", src.slot),
            Some("run `weir init`".into()),
        ),
        Some((_, _, Some(status), _, _)) if status == "lost" => check(
            "replication slot",
            Verdict::Fail,
            format!("`{}` was invalidated (wal_status = lost): WAL it needed is gone", src.slot),
            Some(format!(
                "`select pg_drop_replication_slot('{}')`, then `weir init`, then re-sync derived data",
                src.slot
            )),
        ),
        Some((plugin, _, _, _, _)) if plugin != "pgoutput" => check(
            "replication slot",
            Verdict::Fail,
            format!("`{}` uses plugin `{plugin}`, not pgoutput", src.slot),
            Some("choose another `source.slot`".into()),
        ),
        Some((_, active, status, retained, confirmed)) => {
            let retained = retained.unwrap_or(0);
            let verdict = if retained > 1 << 30 { Verdict::Warn } else { Verdict::Ok };
            check(
                "replication slot",
                verdict,
                format!(
                    "`{}` {}, confirmed up to {}, retains {} of WAL (wal_status = {})",
                    src.slot,
                    if active { "active" } else { "inactive" },
                    confirmed.unwrap_or_else(|| "-".into()),
                    human_bytes(retained),
                    status.unwrap_or_else(|| "-".into())
                ),
                (verdict == Verdict::Warn).then(|| {
                    "start `weir run` so the slot advances; a stopped slot keeps WAL forever".to_string()
                }),
            )
        }
    });

    // `[[subscriptions]]`: refused by `weir run` at start when wrong; said here first. Then
    // the sinks of those and of the subscriptions kept in the database (none before the
    // streams migration).
    let stored = weir_streams::subscriptions::list(pool).await.unwrap_or_default();
    for c in &config.subscriptions {
        let name = format!("subscription {}", c.name);
        match SubscriptionDef::from_config(c) {
            Ok(def) => {
                out.push(check(
                    &name,
                    Verdict::Ok,
                    format!("{} `{}`, {} emitter(s)", def.kind, def.selector, def.pool_size),
                    None,
                ));
                out.extend(sink_checks(&def.name, &def.sink, Origin::Config).await);
            }
            Err(e) => out.push(check(
                &name,
                Verdict::Fail,
                e.to_string(),
                Some("fix the entry in weir.toml".into()),
            )),
        }
        if let Some(s) = stored.iter().find(|s| s.subscription_name == c.name) {
            out.extend(recorded(s));
        }
    }
    for s in &stored {
        if config.subscriptions.iter().any(|c| c.name == s.subscription_name) {
            continue;
        }
        out.extend(sink_checks(&s.subscription_name, &s.sink, Origin::Database).await);
        out.extend(recorded(s));
    }

    // Each watched table's replica identity, and whether it carries every column an operator
    // or subscription routes it by.
    let routed = crate::replica_identity::config_columns(pool, config).await?;
    let needs = crate::replica_identity::needs(pool, config, &routed).await?;
    let watched: Vec<String> =
        if src.tables.is_empty() { tables.clone() } else { src.tables.clone() };
    for t in watched {
        let (schema, table) = split_table(&t);
        let name = format!("table {schema}.{table}");
        let unmet: Vec<_> =
            needs.iter().filter(|n| n.table == format!("{schema}.{table}")).collect();
        if let Some(first) = unmet.first() {
            let who = unmet
                .iter()
                .map(|n| format!("{} `{}` routes it by `{}`", n.role, n.consumer, n.column))
                .collect::<Vec<_>>()
                .join(", ");
            out.push(check(
                &name,
                Verdict::Fail,
                format!(
                    "replica identity {}: {who}, which deleted and moved rows would not carry \
                     (it would halt at the first delete; `weir run` refuses to start it)",
                    first.identity
                ),
                Some(format!(
                    "`{}` (or `weir init` with `[source] manage_replica_identity = true`)",
                    first.fix()
                )),
            ));
            continue;
        }
        let row: Option<(String, bool)> = sqlx::query_as(
            "select c.relreplident::text,
                    exists (select 1 from pg_index i where i.indrelid = c.oid and i.indisprimary)
             from pg_class c join pg_namespace n on n.oid = c.relnamespace
             where n.nspname = $1 and c.relname = $2",
        )
        .bind(schema)
        .bind(table)
        .fetch_optional(pool)
        .await?;
        out.push(match row {
            None => check(&name, Verdict::Fail, "does not exist", Some("create it or remove it from `source.tables`".into())),
            Some((ident, has_pk)) => match (ident.as_str(), has_pk) {
                ("f", _) => check(&name, Verdict::Ok, "replica identity FULL: old rows and `changes` are complete", None),
                ("d", true) => check(
                    &name,
                    Verdict::Ok,
                    "replica identity DEFAULT (primary key): old_record holds the key only, no `changes`",
                    Some(format!("for complete old rows: `alter table {schema}.{table} replica identity full;`")),
                ),
                ("d", false) => check(
                    &name,
                    Verdict::Fail,
                    "no primary key and no replica identity: updates and deletes will fail once published",
                    Some(format!(
                        "add a primary key, or `{}` (`weir init` does it unless `manage_replica_identity = false`)",
                        crate::replica_identity::full_identity_statement(&format!("{schema}.{table}"))
                    )),
                ),
                ("n", _) => check(
                    &name,
                    Verdict::Fail,
                    "replica identity NOTHING: updates and deletes will fail once published",
                    Some(format!(
                        "`{}`, or `default` when it has a primary key",
                        crate::replica_identity::full_identity_statement(&format!("{schema}.{table}"))
                    )),
                ),
                _ => check(&name, Verdict::Ok, "replica identity USING INDEX", None),
            },
        });
    }
    Ok(out)
}

/// Where a subscription is defined, which decides how bad a missing secret is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// `[[subscriptions]]`: `weir run` from this configuration refuses to start without it.
    Config,
    /// Kept in the database: the processes that run weir need it, maybe not this one.
    Database,
}

/// How long a receiver has to accept a TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A webhook or NATS sink's settings, its secret's environment variable here, and whether its
/// receiver accepts a TCP connection (nothing for client and rust sinks).
async fn sink_checks(subscription: &str, sink: &Sink, origin: Origin) -> Vec<Check> {
    let (addresses, variable) = match sink {
        Sink::Webhook(w) => (w.address().into_iter().collect(), Some(w.secret_env.as_str())),
        Sink::Nats(n) => (n.addresses(), n.token_env.as_deref()),
        Sink::Client | Sink::Rust => return Vec::new(),
    };
    let name = format!("sink of {subscription}");
    let fix_settings = match origin {
        Origin::Config => "fix the `[subscriptions.sink]` table in weir.toml".to_string(),
        Origin::Database => format!(
            "`weir subscriptions update {subscription}` with the sink's flags (or --sink JSON)"
        ),
    };
    if let Err(e) = sink.validate() {
        return vec![check(&name, Verdict::Fail, e, Some(fix_settings))];
    }
    let mut out = vec![match (sink.check_environment(), origin) {
        (Ok(()), _) => check(
            &name,
            Verdict::Ok,
            match variable {
                Some(v) => format!("{sink}; ${v} is set here"),
                None => sink.to_string(),
            },
            None,
        ),
        (Err(e), Origin::Config) => check(
            &name,
            Verdict::Fail,
            format!("{e}; `weir run` from this configuration would refuse to start"),
            Some(env_fix(sink, "for `weir run`")),
        ),
        (Err(e), Origin::Database) => check(
            &name,
            Verdict::Warn,
            format!("{e}; the processes that run weir need it (this one may not be one of them)"),
            Some(env_fix(sink, "for every process that runs weir")),
        ),
    }];
    let reached = futures::future::join_all(addresses.iter().map(|(host, port)| async move {
        let address = format!("{host}:{port}");
        let r =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&address)).await;
        let problem = match r {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {CONNECT_TIMEOUT:?}")),
        };
        (address, problem)
    }))
    .await;
    let name = format!("sink of {subscription}: network");
    let unreachable: Vec<String> =
        reached.iter().filter_map(|(a, p)| p.as_ref().map(|p| format!("{a} ({p})"))).collect();
    out.push(if unreachable.is_empty() {
        let all: Vec<&str> = reached.iter().map(|(a, _)| a.as_str()).collect();
        check(&name, Verdict::Ok, format!("{} accepts TCP connections", all.join(", ")), None)
    } else {
        check(
            &name,
            Verdict::Warn,
            format!("cannot connect from here to {}", unreachable.join(", ")),
            Some(
                "check the URL, and that the receiver runs and is reachable from the processes \
                 that run weir; until it is, deliveries are retried"
                    .into(),
            ),
        )
    });
    out
}

/// How to set the variable a sink needs.
fn env_fix(sink: &Sink, whom: &str) -> String {
    match sink {
        Sink::Webhook(w) => {
            format!("set {} to the signing secret in the environment {whom}", w.secret_env)
        }
        Sink::Nats(n) => format!(
            "set {} to the NATS server's token in the environment {whom}",
            n.token_env.as_deref().unwrap_or("the token's variable")
        ),
        Sink::Client | Sink::Rust => String::new(),
    }
}

/// What the processes delivering a subscription recorded: a sink one could not build, a stop
/// by the receiver.
fn recorded(s: &Subscription) -> Vec<Check> {
    let name = format!("sink of {}: delivery", s.subscription_name);
    let mut out = Vec::new();
    if let Some(e) = &s.sink_error {
        out.push(check(
            &name,
            Verdict::Warn,
            format!("the last process that tried cannot deliver: {e}"),
            Some("fix what it names in that process's environment and restart it".into()),
        ));
    }
    if let Some(r) = &s.stopped_reason {
        out.push(check(
            &name,
            Verdict::Warn,
            format!("stopped by its sink: {r}"),
            Some(format!(
                "`weir subscriptions start {}` once the receiver takes deliveries again",
                s.subscription_name
            )),
        ));
    }
    out
}

/// plugin, active, wal_status, retained bytes, confirmed LSN.
type SlotRow = (String, bool, Option<String>, Option<i64>, Option<String>);

/// `1.5 MiB`.
pub fn human_bytes(n: i64) -> String {
    let n = n as f64;
    if n >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", n / 1024.0 / 1024.0 / 1024.0)
    } else if n >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / 1024.0 / 1024.0)
    } else if n >= 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{n} B")
    }
}
