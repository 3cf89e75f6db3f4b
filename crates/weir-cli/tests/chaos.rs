//! The chaos run: real `weir run` processes under a mixed workload while they are SIGKILLed at
//! random, PostgreSQL is restarted with `-m immediate` and their connections are cut by a
//! proxy; then a checker that trusts only PostgreSQL's own tables verifies the log, a derived
//! table, jobs and the slot.
//!
//! ```text
//! writer (direct) ──► accounts, ops, weir.append ──WAL──► proxy ──► weir run × N ──► weir.events
//!                                                 │ operator `balances`    ► derived_balances
//!                                                 │ operator `jobs`        ► weir.enqueue
//!                                                 │ sql worker             ► job_done
//!                                                 │ subscription `hooks`   ► webhook receiver
//!                                                 └ subscription `jetstream` ► nats-server
//! chaos: SIGKILL a process (and start another), cut every proxied connection,
//!        pg_ctl stop -m immediate + start; the receiver fails one request in 20
//! ```
//!
//! The truth is what the writer committed, as PostgreSQL keeps it: each transaction inserts one
//! `ops` row with its sequence number and the number of `accounts` rows it changed (a single
//! writer, so sequence order is commit order). The checker then requires: the log gap-free from
//! 1; every committed transaction's events in it exactly once (the `ops` insert and as many
//! `accounts` events as the transaction changed rows), transactions in commit order and
//! contiguous; `derived_balances` equal to `accounts`; one completed job and one effect per
//! tenth transaction; every event appended to a stream (one transaction in five appends one)
//! answered 2xx by the webhook receiver at least once, nothing else, and in version order per
//! stream by first delivery; every one in the JetStream stream exactly once (the duplicate
//! window drops redeliveries by `Nats-Msg-Id`); the slot's confirmed position close to the
//! server's end of WAL.
//!
//! Quick by default (CI): about a minute, two processes. The long run for docs/guarantees.md:
//! `WEIR_CHAOS_SECONDS=900 WEIR_CHAOS_PROCESSES=3 cargo test -p weir-cli --test chaos --
//! --nocapture` (prints its figures; `WEIR_CHAOS_SEED` repeats a run's choices).

mod support;

use std::time::{Duration, Instant};

use sqlx::PgPool;
use support::{Proc, output, sigkill, weir};
use weir_testkit::proxy::{Mode, Proxy};
use weir_testkit::receiver::{Answer, Receiver};
use weir_testkit::{Cluster, NatsServer, Options, StopMode, eventually};

/// weir.toml, with `{hook}` and `{nats}` to fill in.
const CONFIG: &str = r#"
[source]
tables = ["accounts", "ops"]

[consumers]
lanes = 4

[consumers.retry]
min_restart_time = "20ms"
max_restart_time = "200ms"

[jobs]
rescue_after = "6s"

[[operators]]
name = "balances"
entities = ["accounts"]
delete_with = ["accounts"]
target = "derived_balances"
target_key = "id"
sql = """
insert into derived_balances (id, balance)
select id, balance from accounts where id = $1
on conflict (id) do update set balance = excluded.balance
"""

[[operators]]
name = "jobs"
entities = ["ops"]
sql = """
select weir.enqueue('default', 'chaos_job', jsonb_build_object('seq', o.seq))
  from ops o where o.seq = $1 and o.seq % 10 = 0
"""

[[workers]]
kind = "chaos_job"
type = "sql"
sql = "insert into job_done (seq) values (($1->>'seq')::bigint)"

[[subscriptions]]
name = "hooks"
type = "stream"
selector = "acct-*"
pool_size = 3
retry = { min_restart_time = "20ms", backoff_multiplicator = 2.0, max_restart_time = "500ms", max_retries = 100000 }

[subscriptions.sink]
type = "webhook"
url = "{hook}"
secret_env = "CHAOS_HOOK_SECRET"

[[subscriptions]]
name = "jetstream"
type = "stream"
selector = "acct-*"
pool_size = 2
retry = { min_restart_time = "20ms", backoff_multiplicator = 2.0, max_restart_time = "500ms", max_retries = 100000 }

[subscriptions.sink]
type = "nats"
url = "{nats}"
subject = "chaos.{stream}"
stream = "CHAOS"
create_stream = true
"#;

/// The webhook sink's secret (`weir webhooks secret` makes such values).
const HOOK_SECRET: &str = "whsec_Y2hhb3MtdGVzdC1zZWNyZXQtb2YtMzItYnl0ZXMh";

const SCHEMA: &str = "
    create table accounts (id bigint primary key, balance bigint not null);
    create table ops (seq bigint primary key, kind text not null, changes bigint not null);
    create table derived_balances (id bigint primary key, balance bigint not null);
    create table job_done (seq bigint not null);";

/// A small deterministic generator (xorshift), so a seed repeats a run's choices.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One transaction of the workload: some change to `accounts` and its `ops` row. Returns
/// whether it committed as far as the writer knows (an error at commit leaves it in doubt;
/// the checker reads what PostgreSQL kept).
async fn transaction(pool: &PgPool, seq: i64, rng: &mut Rng, next_id: &mut i64) -> bool {
    let Ok(mut tx) = pool.begin().await else { return false };
    let some_id = |rng: &mut Rng, next: i64| (rng.below(next.max(1) as u64)) as i64;
    let pick = rng.below(100);
    let (kind, result) = if pick < 35 {
        *next_id += 1;
        let r = sqlx::query("insert into accounts values ($1, $2)")
            .bind(*next_id)
            .bind(rng.below(1000) as i64)
            .execute(&mut *tx)
            .await;
        ("insert", r)
    } else if pick < 65 {
        let r = sqlx::query("update accounts set balance = balance + $2 where id = $1")
            .bind(some_id(rng, *next_id))
            .bind(rng.below(100) as i64 - 50)
            .execute(&mut *tx)
            .await;
        ("update", r)
    } else if pick < 75 {
        // A key that moves: the derived row of the old id must go.
        *next_id += 1;
        let r = sqlx::query("update accounts set id = $2 where id = $1")
            .bind(some_id(rng, *next_id - 1))
            .bind(*next_id)
            .execute(&mut *tx)
            .await;
        ("move", r)
    } else if pick < 98 {
        let r = sqlx::query("delete from accounts where id = $1")
            .bind(some_id(rng, *next_id))
            .execute(&mut *tx)
            .await;
        ("delete", r)
    } else if pick < 99 {
        let first = *next_id + 1;
        *next_id += 500;
        let r = sqlx::query(
            "insert into accounts select g, g % 1000 from generate_series($1::bigint, $2) g",
        )
        .bind(first)
        .bind(*next_id)
        .execute(&mut *tx)
        .await;
        ("large insert", r)
    } else {
        let r = sqlx::query(
            "update accounts set balance = balance + 1 where id between $1 and $1 + 999",
        )
        .bind(some_id(rng, *next_id))
        .execute(&mut *tx)
        .await;
        ("large update", r)
    };
    let Ok(changed) = result else { return false };
    // One transaction in five appends an event to one of 20 streams, with its row changes.
    if seq % 5 == 0 {
        let appended = sqlx::query("select * from weir.append($1, 'any', $2)")
            .bind(format!("acct-{}", seq % 20))
            .bind(serde_json::json!([{"type": "chaos.appended", "data": {"seq": seq}}]))
            .execute(&mut *tx)
            .await;
        if appended.is_err() {
            return false;
        }
    }
    let ops = sqlx::query("insert into ops values ($1, $2, $3)")
        .bind(seq)
        .bind(kind)
        .bind(changed.rows_affected() as i64)
        .execute(&mut *tx)
        .await;
    ops.is_ok() && tx.commit().await.is_ok()
}

/// The `Nats-Msg-Id` of every message in stream CHAOS, once it holds at least `n` (or after
/// 120 s, whatever it holds then).
async fn eventually_nats_ids(js: &async_nats::jetstream::Context, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // weir creates the stream (`create_stream = true`) when its emitters start.
        if let Ok(mut stream) = js.get_stream("CHAOS").await {
            let state = stream.info().await.unwrap().state.clone();
            if state.messages as usize >= n || Instant::now() > deadline {
                let mut ids = Vec::new();
                for seq in state.first_sequence..=state.last_sequence {
                    let m = stream.get_raw_message(seq).await.unwrap();
                    let id = m.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_string());
                    ids.push(id.unwrap_or_default());
                }
                return ids;
            }
        }
        assert!(Instant::now() < deadline + Duration::from_secs(1), "no stream CHAOS in 120 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What the chaos did, for the report.
#[derive(Debug, Default)]
struct Chaos {
    kills: u64,
    restarts: u64,
    cuts: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_derived_data_and_jobs_survive_kills_restarts_and_cut_connections() {
    let seconds = env_u64("WEIR_CHAOS_SECONDS", 60);
    let processes = env_u64("WEIR_CHAOS_PROCESSES", 2) as usize;
    let restarts_wanted = env_u64("WEIR_CHAOS_RESTARTS", (seconds / 150).max(1));
    let seed = env_u64("WEIR_CHAOS_SEED", u64::from(std::process::id()) * 2_654_435_761 + 1);
    eprintln!("chaos: {seconds} s, {processes} processes, seed {seed}");
    let mut rng = Rng(seed | 1);

    // A cluster of its own, restarted under everyone's feet. The tests' usual
    // `synchronous_commit = off` would let an immediate stop lose commits PostgreSQL had
    // acknowledged; `fsync = off` alone is safe here, as the machine itself does not crash.
    let cluster = Cluster::start_temp(Options {
        fsync: false,
        settings: vec![("synchronous_commit".into(), "on".into())],
    })
    .unwrap();
    let db = cluster.database("chaos").unwrap();
    db.psql(SCHEMA).unwrap();
    let proxy = Proxy::start(cluster.port(), Mode::Pass).await.unwrap();
    // The sinks' far ends: a receiver that fails one request in 20 (500, or the connection
    // closed without an answer), and a private nats-server with JetStream.
    let mut answered = 0u64;
    let receiver = Receiver::start(move |_| {
        answered += 1;
        match answered % 40 {
            7 => Answer::status(500),
            27 => Answer::Close,
            _ => Answer::ok(),
        }
    })
    .await;
    let nats =
        NatsServer::start().unwrap_or_else(|e| panic!("starting a private nats-server: {e}"));
    let config = tempfile::NamedTempFile::new().unwrap();
    let text = CONFIG.replace("{hook}", &receiver.url("/hooks")).replace("{nats}", &nats.url());
    std::fs::write(config.path(), text).unwrap();
    let proxied = proxy.url(&db.url());
    // `weir` on this database, every connection through the proxy.
    let cmd = |args: &[&str]| {
        let mut c = weir(&db, args);
        c.arg("--config")
            .arg(config.path())
            .env("DATABASE_URL", &proxied)
            .env("CHAOS_HOOK_SECRET", HOOK_SECRET);
        c
    };
    let (ok, out) = output(cmd(&["init"]));
    assert!(ok, "weir init: {out}");
    let pool = PgPool::connect(&db.url()).await.unwrap();

    // The writer: one transaction after another, directly to PostgreSQL, until told to stop.
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (pool, stop) = (pool.clone(), stop.clone());
        let mut rng = Rng(seed.rotate_left(17) | 1);
        tokio::spawn(async move {
            let (mut seq, mut next_id, mut acknowledged) = (0i64, 0i64, Vec::new());
            while !stop.is_cancelled() {
                seq += 1;
                if transaction(&pool, seq, &mut rng, &mut next_id).await {
                    acknowledged.push(seq);
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (seq, acknowledged)
        })
    };

    // Every process's output in one file, shown if the checker fails.
    let log = std::env::temp_dir().join(format!("weir-chaos-{}.log", std::process::id()));
    let start = || {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let mut c = cmd(&["run"]);
        c.stdout(file.try_clone().unwrap()).stderr(file);
        Proc(c.spawn().unwrap())
    };
    let mut running: Vec<Proc> = (0..processes).map(|_| start()).collect();
    let mut chaos = Chaos::default();
    let mut exited = 0;
    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let restart_every = Duration::from_secs(seconds) / (restarts_wanted as u32 + 1);
    let mut next_restart = started + restart_every;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(800 + rng.below(2400))).await;
        // Processes that exited on their own (PostgreSQL was down as they started) are
        // replaced like killed ones.
        running.retain_mut(|p| match p.0.try_wait().unwrap() {
            None => true,
            Some(_) => {
                exited += 1;
                false
            }
        });
        // A process that starts while PostgreSQL is down or its connection is cut exits
        // (with the reason); a few per minute are expected, a crash loop is not.
        if exited > (seconds / 15).max(10) {
            let logs = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = logs.lines().rev().take(20).collect();
            panic!("`weir run` exited {exited} times on its own; last lines:\n{}", tail.join("\n"));
        }
        if Instant::now() >= next_restart && chaos.restarts < restarts_wanted {
            cluster.stop(StopMode::Immediate).unwrap();
            tokio::time::sleep(Duration::from_millis(500 + rng.below(1500))).await;
            cluster.restart().unwrap();
            chaos.restarts += 1;
            next_restart += restart_every;
        } else if rng.below(4) == 0 {
            proxy.cut();
            chaos.cuts += 1;
        } else if !running.is_empty() {
            let victim = rng.below(running.len() as u64) as usize;
            sigkill(&running.remove(victim));
            chaos.kills += 1;
        }
        while running.len() < processes {
            running.push(start());
        }
    }
    stop.cancel();
    let (transactions, acknowledged) = writer.await.unwrap();
    // What PostgreSQL acknowledged is there (a failed commit may or may not have happened).
    let kept: Vec<i64> = sqlx::query_scalar("select seq from ops where seq = any($1)")
        .bind(&acknowledged)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(kept.len(), acknowledged.len(), "every acknowledged commit is in `ops`");

    // Catch up: every committed change processed by every operator.
    let lsn: String = sqlx::query_scalar("select pg_current_wal_insert_lsn()::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    let caught_up = Instant::now();
    let processed = weir::process::wait_for(&pool, lsn.parse().unwrap(), Duration::from_secs(180))
        .await
        .unwrap();
    if !processed {
        let (_, status) = output(cmd(&["status"]));
        let logs = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = logs.lines().rev().take(60).collect();
        panic!(
            "the operators did not catch up within 180 s of the writes stopping\n{status}\n\
             the processes' last lines:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let catch_up = caught_up.elapsed();

    let committed: i64 =
        sqlx::query_scalar("select count(*) from ops").fetch_one(&pool).await.unwrap();
    let (events, lowest, highest): (i64, i64, i64) = sqlx::query_as(
        "select count(*), coalesce(min(position), 0), coalesce(max(position), 0) from weir.events",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((lowest, highest), (1, events), "the log is gap-free from 1");

    // Each committed transaction exactly once: its ops row once, as many accounts events as it
    // changed rows, nothing of any transaction that did not commit.
    let wrong_transactions: i64 = sqlx::query_scalar(
        "with logged as (
             select xid, max((new_record->>'seq')::bigint) filter (where entity = 'ops') seq,
                    count(*) filter (where entity = 'ops') ops_events,
                    count(*) filter (where entity = 'accounts') changes,
                    min(position) first, max(position) last
               from weir.events group by xid)
         select count(*) from ops o full join logged l using (seq)
          where l.seq is null or o.seq is null or l.ops_events <> 1 or l.changes <> o.changes",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(wrong_transactions, 0, "every committed transaction in the log exactly once");
    // In commit order, and each transaction's events together.
    let out_of_order: i64 = sqlx::query_scalar(
        "with t as (
             select max((new_record->>'seq')::bigint) filter (where entity = 'ops') seq,
                    min(position) first, max(position) last, count(*) n
               from weir.events group by xid)
         select count(*) from (
             select seq, first, last, n, lag(last) over (order by seq) previous from t) s
          where last - first + 1 <> n or first <= previous",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(out_of_order, 0, "transactions in commit order, each one contiguous");

    let wrong_rows: i64 = sqlx::query_scalar(
        "select count(*) from derived_balances d full join accounts a using (id)
          where d.balance is distinct from a.balance",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    if wrong_rows > 0 {
        let detail: Vec<(i64, Option<i64>, Option<i64>, String)> = sqlx::query_as(
            "select id, d.balance, a.balance,
                    (select string_agg(format('%s %s %s old=%s xid=%s', e.position, e.kind,
                                              e.key, e.old_record, e.xid), E'\n  '
                                       order by e.position)
                       from weir.events e
                      where e.entity = 'accounts'
                        and (e.key->>'id' = id::text or e.old_record->>'id' = id::text))
               from derived_balances d full join accounts a using (id)
              where d.balance is distinct from a.balance limit 5",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let (_, status) = output(cmd(&["status"]));
        panic!(
            "derived_balances differs from accounts in {wrong_rows} rows:\n{}\n{status}",
            detail
                .iter()
                .map(|(id, d, a, e)| format!("id {id}: derived {d:?}, accounts {a:?}\n  {e}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    // Jobs: one per tenth transaction, each completed once with one effect.
    let wanted: i64 = sqlx::query_scalar("select count(*) from ops where seq % 10 = 0")
        .fetch_one(&pool)
        .await
        .unwrap();
    eventually("every job completed", Duration::from_secs(120), || async {
        let done: i64 = sqlx::query_scalar(
            "select count(*) from weir.job_history where kind = 'chaos_job' and state = 'completed'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        done >= wanted
    })
    .await;
    let (jobs, distinct_jobs, effects, distinct_effects): (i64, i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from weir.job_history where kind = 'chaos_job'),
                (select count(distinct args->>'seq') from weir.job_history where kind = 'chaos_job'),
                (select count(*) from job_done), (select count(distinct seq) from job_done)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((jobs, distinct_jobs), (wanted, wanted), "one job per tenth transaction");
    assert_eq!((effects, distinct_effects), (wanted, wanted), "one effect per job");

    // Deliveries: every appended event answered 2xx at least once, nothing else; per stream,
    // first deliveries in version order. JetStream holds each exactly once.
    let appended: Vec<(i64, String, i64)> = sqlx::query_as(
        "select e.position, s.stream, s.version from weir.events e
           join weir.stream_events s on s.id = (e.new_record->>'id')::uuid
          where e.entity = 'weir.stream_events' order by e.position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let wanted_ids: std::collections::BTreeSet<String> =
        appended.iter().map(|(p, ..)| format!("hooks:{p}")).collect();
    let exchanges = receiver
        .wait_for("every appended event delivered", Duration::from_secs(120), |x| {
            let ok: std::collections::BTreeSet<&str> = x
                .iter()
                .filter(|e| e.answer.is_success())
                .filter_map(|e| e.request.header("webhook-id"))
                .collect();
            wanted_ids.iter().all(|id| ok.contains(id.as_str()))
        })
        .await;
    let delivered: Vec<(String, serde_json::Value)> = exchanges
        .iter()
        .filter(|e| e.answer.is_success())
        .map(|e| {
            let id = e.request.header("webhook-id").unwrap_or_default().to_string();
            (id, serde_json::from_slice(&e.request.body).unwrap())
        })
        .collect();
    let distinct: std::collections::BTreeSet<&String> =
        delivered.iter().map(|(id, _)| id).collect();
    assert_eq!(distinct.len(), wanted_ids.len(), "webhook: one id per appended event, no other");
    let mut last_version: std::collections::HashMap<String, i64> = Default::default();
    let mut seen = std::collections::HashSet::new();
    for (id, body) in &delivered {
        if !seen.insert(id.clone()) {
            continue;
        }
        let row = &body["event"]["new_record"];
        let (stream, version) = (row["stream"].as_str().unwrap(), row["version"].as_i64().unwrap());
        let previous = last_version.insert(stream.to_string(), version).unwrap_or(0);
        assert!(version > previous, "{stream}: version {version} first delivered after {previous}");
    }
    let hook_requests = exchanges.len();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let nats_ids = eventually_nats_ids(&js, appended.len()).await;
    let wanted_nats: std::collections::BTreeSet<String> =
        appended.iter().map(|(p, ..)| format!("jetstream:{p}")).collect();
    assert_eq!(nats_ids.len(), appended.len(), "JetStream: each appended event once");
    assert_eq!(
        nats_ids.into_iter().collect::<std::collections::BTreeSet<_>>(),
        wanted_nats,
        "JetStream: exactly the appended events"
    );

    // The slot follows once writes stop: its confirmed position close to the end of WAL.
    let behind = || async {
        sqlx::query_scalar::<_, i64>(
            "select pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
               from pg_replication_slots where slot_name = $1",
        )
        .bind(db.name())
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    eventually("the slot close to the end of WAL", Duration::from_secs(60), || async {
        behind().await < 16 << 20
    })
    .await;

    eprintln!(
        "chaos figures: {seconds} s, {processes} processes, seed {seed}: {} SIGKILLs, {} \
         immediate restarts, {} connection cuts; {transactions} transactions attempted, \
         {committed} committed ({} acknowledged), {events} events, {jobs} jobs, {} appended \
         events ({hook_requests} webhook requests, {} answered 2xx), JetStream {} messages; \
         caught up {catch_up:.1?} after the writes stopped; slot {} bytes behind; mismatches: 0",
        chaos.kills,
        chaos.restarts,
        chaos.cuts,
        acknowledged.len(),
        appended.len(),
        delivered.len(),
        appended.len(),
        behind().await
    );
    drop(running);
}
