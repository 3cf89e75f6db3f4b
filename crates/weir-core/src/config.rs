//! `weir.toml`: plain serde structs, `DEFAULT_*` constants, and a `validate()` that names the
//! failing field.
//!
//! Precedence, lowest first: built-in defaults, `weir.toml`, `WEIR_<SECTION>_<FIELD>` environment
//! variables (`WEIR_SOURCE_SLOT=orders`). The database URL comes from `WEIR_DATABASE_URL`, then
//! `[database] url`, then `DATABASE_URL`; when none is set, libpq's `PG*` variables
//! (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`) decide.
//!
//! The full reference, with every default, is `docs/configuration.md`.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::serde_duration;

/// Name of the replication slot. Defaults to `weir`.
pub const DEFAULT_SLOT: &str = "weir";
/// Name of the publication. Defaults to `weir`.
pub const DEFAULT_PUBLICATION: &str = "weir";
/// Prefix of the logical messages that become `message` events. Defaults to `weir`.
pub const DEFAULT_MESSAGE_PREFIX: &str = "weir";
/// Most events appended in one log transaction.
pub const DEFAULT_BATCH_MAX_EVENTS: usize = 10_000;
/// Positions per log partition.
pub const DEFAULT_PARTITION_SIZE: i64 = 1_000_000;
/// How long the log keeps events: 7 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 86_400);

/// A value that must not be printed (a URL with a password). `Debug` shows `Secret(***)`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself; do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[database]`: where the watched tables, the log and weir's state live.
    pub database: DatabaseConfig,
    /// `[source]`: what is captured and how.
    pub source: SourceConfig,
    /// `[log]`: the event log.
    pub log: LogConfig,
    /// `[consumers]`: defaults for every consumer (operators).
    pub consumers: ConsumersConfig,
    /// `[[operators]]`: declarative SQL operators.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub operators: Vec<OperatorConfig>,
    /// `[http]`: the HTTP API, realtime channels and metrics served by `weir run`.
    pub http: HttpConfig,
    /// `[channels.<entity>]`: scoped realtime channels of an entity.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub channels: std::collections::BTreeMap<String, ChannelConfig>,
    /// `[jobs]`: the job runner of this process (when workers are registered).
    pub jobs: JobsConfig,
    /// `[[subscriptions]]`: subscriptions created (or brought up to date) at every start.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<SubscriptionConfig>,
    /// `[[workers]]`: job workers run by `weir run` (`sql`, `http` or `command`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<WorkerConfig>,
    /// `[[periodic]]`: jobs enqueued on a cron schedule by the elected leader.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub periodic: Vec<PeriodicConfig>,
}

/// What a declared worker does with a job (`type` of `[[workers]]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerType {
    /// Runs one SQL statement with the job's args as `$1` (jsonb), in the transaction that
    /// completes the job.
    Sql,
    /// POSTs the job to `url`, signed with Standard Webhooks headers.
    Http,
    /// Runs `command` with the job as JSON on stdin.
    Command,
}

impl WorkerType {
    /// The name written in `weir.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sql => "sql",
            Self::Http => "http",
            Self::Command => "command",
        }
    }
}

/// `[[workers]]`: a job worker declared in `weir.toml`, run by `weir run` for applications in
/// any language. Exactly the fields of its `type` may be set (`sql`; `url`, `secret`,
/// `headers`; `command`, `env`, `dir`).
///
/// ```toml
/// [[workers]]
/// kind = "send_mail"
/// type = "http"
/// url = "http://127.0.0.1:3000/jobs/send_mail"
/// secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
/// timeout = "30s"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// The job kind this worker runs (one worker per kind).
    pub kind: String,
    /// `sql`, `http` or `command`.
    #[serde(rename = "type")]
    pub worker_type: WorkerType,
    /// The queue its jobs are claimed from; it must be listed in `[jobs.queues]`. Defaults to
    /// `default`.
    #[serde(default = "default_worker_queue")]
    pub queue: String,
    /// Jobs of this kind running at once in this process, on slots of their own (not the
    /// queue's). Defaults to sharing the queue's slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// The timeout of an attempt when the job sets none (1 ms to 24 h). Defaults to
    /// `[jobs] default_timeout`, and for `http` and `command` to 5 minutes when that is unset
    /// too.
    #[serde(default, with = "optional_duration", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Attempts a job of this kind may have at most, whatever it was enqueued with (1 to 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// The wait before each retry. Defaults to `attempt⁴` seconds with jitter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<JobBackoffConfig>,
    /// `sql`: the statement, with the job's args as `$1` (jsonb).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    /// `http`: the application's URL the job is POSTed to (http or https).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `http`: the Standard Webhooks signing secret (`whsec_` and base64). Unsigned when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secret>,
    /// `http`: extra request headers.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<String, String>,
    /// `command`: the program and its arguments (no shell), e.g. `["python3", "mail.py"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// `command`: extra environment variables of the program.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    /// `command`: the working directory (defaults to `weir run`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// The line of the entry's `[[workers]]` header in its file, for error messages.
    #[serde(skip)]
    pub line: Option<usize>,
}

fn default_worker_queue() -> String {
    DEFAULT_JOB_QUEUE.to_string()
}

impl WorkerConfig {
    /// A worker of `worker_type` for `kind` on the default queue, every other field unset.
    pub fn new(kind: impl Into<String>, worker_type: WorkerType) -> Self {
        Self {
            kind: kind.into(),
            worker_type,
            queue: default_worker_queue(),
            concurrency: None,
            timeout: None,
            max_attempts: None,
            backoff: None,
            sql: None,
            url: None,
            secret: None,
            headers: Default::default(),
            command: Vec::new(),
            env: Default::default(),
            dir: None,
            line: None,
        }
    }

    /// How errors name this entry: `[[workers]] kind "send_mail" (line 12)`.
    pub fn entry(&self) -> String {
        entry_name("workers", &self.kind, self.line)
    }
}

/// `backoff` of a `[[workers]]` entry: waits that start at `first` and grow by `multiplier`
/// up to `max`, with ±10% jitter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobBackoffConfig {
    /// The wait after the first failed attempt. Defaults to `1s`.
    #[serde(with = "serde_duration")]
    pub first: Duration,
    /// Each wait is the previous one times this (at least 1). Defaults to 2.
    pub multiplier: f64,
    /// The longest wait. Defaults to `1h`.
    #[serde(with = "serde_duration")]
    pub max: Duration,
}

impl Default for JobBackoffConfig {
    fn default() -> Self {
        Self { first: Duration::from_secs(1), multiplier: 2.0, max: Duration::from_secs(3600) }
    }
}

impl JobBackoffConfig {
    /// The waits as a [`Backoff`](crate::Backoff) (without the jitter).
    pub fn backoff(&self) -> crate::Backoff {
        crate::Backoff { first: self.first, multiplier: self.multiplier, max: self.max }
    }
}

/// `[[periodic]]`: a job enqueued at each time of a cron schedule, by the elected leader,
/// exactly once per time across processes.
///
/// ```toml
/// [[periodic]]
/// name = "nightly_report"
/// cron = "0 3 * * *"
/// timezone = "Europe/Paris"
/// kind = "report"
/// args = { scope = "all" }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeriodicConfig {
    /// Unique name; the schedule's progress is stored under it. Defaults to the kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The cron expression (5 fields, or 6 with seconds first, or `@daily` and the like).
    pub cron: String,
    /// The IANA time zone the expression is read in (`Europe/Paris`). Defaults to `UTC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// The job's kind.
    pub kind: String,
    /// The job's args. Defaults to `{}`.
    #[serde(default = "empty_args")]
    pub args: serde_json::Value,
    /// The queue. Defaults to `default`.
    #[serde(default = "default_worker_queue")]
    pub queue: String,
    /// Attempts of each enqueued job, 1 to 1000. Defaults to 5 (a job's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// The line of the entry's `[[periodic]]` header in its file, for error messages.
    #[serde(skip)]
    pub line: Option<usize>,
}

fn empty_args() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

impl PeriodicConfig {
    /// The name its progress is stored under: `name`, else the kind.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.kind)
    }

    /// How errors name this entry: `[[periodic]] "nightly_report" (line 30)`.
    pub fn entry(&self) -> String {
        entry_name("periodic", self.name(), self.line)
    }
}

fn entry_name(table: &str, name: &str, line: Option<usize>) -> String {
    match line {
        Some(line) => format!("[[{table}]] {name:?} (line {line})"),
        None => format!("[[{table}]] {name:?}"),
    }
}

/// The 1-based lines of the `[[name]]` headers of `text`, in order.
fn header_lines(text: &str, name: &str) -> Vec<usize> {
    let header = format!("[[{name}]]");
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let l = l.trim_start();
            l.strip_prefix(&header).is_some_and(|rest| {
                let rest = rest.trim_start();
                rest.is_empty() || rest.starts_with('#')
            })
        })
        .map(|(i, _)| i + 1)
        .collect()
}

/// `[[subscriptions]]`: a subscription over appended events or row changes, delivered to SSE
/// and WebSocket clients attached by name, or to a webhook or NATS JetStream (`sink`). Its selector is checked when `weir run` (or
/// `weir init`) starts; see `docs/streams.md` for each type's selector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    /// Unique name (shared with operators).
    pub name: String,
    /// `stream`, `event_type`, `event_pattern`, `event_payload`, `tags` or `entity`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The selector: a string, a list or a table, by type.
    pub selector: serde_json::Value,
    /// Emitters, 1 to 1024. Defaults to 1.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// `beginning` (the default), `now`, a log position, or an RFC 3339 time. Used when the
    /// subscription is created.
    #[serde(default)]
    pub start_from: Option<String>,
    /// Route by this field (a dotted path into the event's data, or a column) instead of the
    /// stream or row key.
    #[serde(default)]
    pub partition_by: Option<String>,
    /// Overrides `[consumers] retry`.
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// Overrides `[consumers] on_exhausted`.
    #[serde(default)]
    pub on_exhausted: Option<OnExhausted>,
    /// Where it delivers: `client` (the default: SSE and WebSocket clients), or a table
    /// `[subscriptions.sink]` with `type = "webhook"` or `type = "nats"` (see `docs/sinks.md`).
    #[serde(default)]
    pub sink: Option<serde_json::Value>,
}

fn default_pool_size() -> u32 {
    1
}

/// `[http]`: the HTTP API (`/v1`), realtime channels and `/metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serve HTTP from `weir run`. Defaults to `true`.
    pub enabled: bool,
    /// Address to listen on. Defaults to `127.0.0.1:7070`.
    pub bind: String,
    /// Bearer token. Every state-changing endpoint requires it; without a token they answer
    /// 403. Also `WEIR_HTTP_TOKEN`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// Require the token for reads and channels too (not for `/v1/health` and `/v1/ready`).
    /// Defaults to `false`.
    pub protect_reads: bool,
    /// Serve the console (the web page at `/`, `docs/console.md`). Defaults to `true`.
    pub console: bool,
    /// Largest request body in bytes; larger bodies get 413. Defaults to 1048576 (1 MiB).
    pub max_body_bytes: usize,
    /// Longest time to produce a response (streams excepted); then 503. Defaults to `60s`.
    #[serde(with = "serde_duration")]
    pub request_timeout: Duration,
    /// Longest wait a long-poll may ask for. Defaults to `30s`.
    #[serde(with = "serde_duration")]
    pub max_wait: Duration,
    /// Longest time a client may take to send a request head (the request line and headers),
    /// counted from when the server starts waiting for it: after accepting a connection, and
    /// between two requests of a kept-alive connection. Then the connection is closed, so a
    /// client trickling its head (slowloris) or an idle kept-alive connection holds nothing
    /// longer than this. Defaults to `10s`.
    #[serde(with = "serde_duration")]
    pub header_timeout: Duration,
    /// Messages queued for one channel client before it is dropped as too slow. Defaults to
    /// 4096.
    pub client_buffer: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bind: "127.0.0.1:7070".into(),
            token: None,
            protect_reads: false,
            console: true,
            max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(60),
            max_wait: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            client_buffer: 4096,
        }
    }
}

/// `[channels.<entity>]`: extra realtime channels of an entity.
///
/// ```toml
/// [channels.comments]
/// scopes = { post_id = "posts" }   # a comment also goes to `posts/<post_id>/comments`
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelConfig {
    /// Column of this entity → parent entity: each change is also published on
    /// `<parent>/<value of column>/<entity>` (for an update that moves the row, on both).
    pub scopes: std::collections::BTreeMap<String, String>,
}

/// Event ordering of a consumer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ordering {
    /// One lane: an event waits until the previous one is handled (EventStreamex).
    Global,
    /// `lanes` lanes; events go to `hash(key) % lanes`, each lane in order.
    #[default]
    PerKey,
}

/// What happens when an event's retries run out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExhausted {
    /// The consumer stops at the event until `weir resume`.
    #[default]
    Halt,
    /// Record the failure and go on.
    Skip,
    /// Set the event and later events of its key aside; other keys go on.
    Park,
}

/// Retry policy (EventStreamex's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First wait after a failure. Defaults to `500ms`.
    #[serde(with = "serde_duration")]
    pub min_restart_time: Duration,
    /// Each wait is the previous one times this. Defaults to 2.
    pub backoff_multiplicator: f64,
    /// Longest wait. Defaults to `10s`.
    #[serde(with = "serde_duration")]
    pub max_restart_time: Duration,
    /// Retries after the first failure before `on_exhausted`. Defaults to 5.
    pub max_retries: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            min_restart_time: Duration::from_millis(500),
            backoff_multiplicator: 2.0,
            max_restart_time: Duration::from_secs(10),
            max_retries: 5,
        }
    }
}

impl RetryConfig {
    /// The wait before retry number `retry` (1-based).
    pub fn delay(&self, retry: u32) -> Duration {
        self.backoff().delay(retry)
    }

    /// The waits as a [`Backoff`](crate::Backoff).
    pub fn backoff(&self) -> crate::Backoff {
        crate::Backoff {
            first: self.min_restart_time,
            multiplier: self.backoff_multiplicator,
            max: self.max_restart_time,
        }
    }
}

/// `[consumers]`: defaults for every consumer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumersConfig {
    /// Ordering. Defaults to `per_key`.
    pub ordering: Ordering,
    /// Lanes for `per_key`. Defaults to 8.
    pub lanes: u32,
    /// Where a new consumer starts: `beginning` (oldest retained event) or `now`.
    /// Defaults to `beginning`.
    pub start_from: StartFrom,
    /// Retry policy.
    pub retry: RetryConfig,
    /// After retries: `halt`, `skip` or `park`. Defaults to `halt`.
    pub on_exhausted: OnExhausted,
    /// Column of a row that `processed(entity, ts)` compares (µs); the commit time when the row
    /// has no such column. Defaults to `updated_at`.
    pub timestamp_column: String,
    /// How often a lane polls the log when no notification arrives. Defaults to `1s`.
    #[serde(with = "serde_duration")]
    pub poll_interval: Duration,
}

impl Default for ConsumersConfig {
    fn default() -> Self {
        Self {
            ordering: Ordering::PerKey,
            lanes: 8,
            start_from: StartFrom::Beginning,
            retry: RetryConfig::default(),
            on_exhausted: OnExhausted::Halt,
            timestamp_column: "updated_at".into(),
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// `[[operators]]`: a declarative operator — one SQL statement run with the event's key as `$1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// Unique name; also the default target table.
    pub name: String,
    /// Entities listened to (`posts`, `sales.orders`).
    pub entities: Vec<String>,
    /// Kinds listened to. Defaults to insert, update, delete and read (rows loaded by a
    /// backfill, which an operator recomputes like inserts).
    #[serde(default = "default_kinds")]
    pub kinds: Vec<crate::Kind>,
    /// Key column per entity (`comments = "post_id"`); others use their single-column primary key.
    #[serde(default)]
    pub key: std::collections::BTreeMap<String, String>,
    /// The statement, with the key as `$1`.
    pub sql: String,
    /// Entities whose delete removes the target row (`delete from <target> where <target_key> = $1`)
    /// instead of running `sql`.
    #[serde(default)]
    pub delete_with: Vec<String>,
    /// Target table for `delete_with`. Defaults to `name`.
    #[serde(default)]
    pub target: Option<String>,
    /// Target key column for `delete_with`. Defaults to `id`.
    #[serde(default)]
    pub target_key: Option<String>,
    /// Overrides `[consumers] ordering`.
    #[serde(default)]
    pub ordering: Option<Ordering>,
    /// Overrides `[consumers] lanes`.
    #[serde(default)]
    pub lanes: Option<u32>,
    /// Overrides `[consumers] retry`.
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// Overrides `[consumers] on_exhausted`.
    #[serde(default)]
    pub on_exhausted: Option<OnExhausted>,
    /// When the operator first starts (its consumer does not exist yet), backfill the rows its
    /// entities already hold, so it computes them too. Defaults to false.
    #[serde(default)]
    pub backfill: bool,
}

fn default_kinds() -> Vec<crate::Kind> {
    vec![crate::Kind::Insert, crate::Kind::Update, crate::Kind::Delete, crate::Kind::Read]
}

/// The queue jobs go to when they name none. Defaults to `default`.
pub const DEFAULT_JOB_QUEUE: &str = "default";
/// Jobs of the default queue running at once in one process: 10.
pub const DEFAULT_JOB_CONCURRENCY: u32 = 10;
/// How often an idle job producer claims without a wake-up: 1 s.
pub const DEFAULT_JOB_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often a job runner heartbeats: 2 s.
pub const DEFAULT_JOB_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// Silence after which a process's running jobs are rescued: 30 s.
pub const DEFAULT_JOB_RESCUE_AFTER: Duration = Duration::from_secs(30);
/// How often the maintenance leader activates due jobs: 1 s.
pub const DEFAULT_JOB_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// The longest timeout an attempt may have: 24 h.
pub const MAX_JOB_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// One queue a job runner works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// The queue name.
    pub name: String,
    /// Jobs of this queue running at once in this process.
    pub concurrency: u32,
}

impl QueueConfig {
    /// A queue with its concurrency.
    pub fn new(name: impl Into<String>, concurrency: u32) -> Self {
        Self { name: name.into(), concurrency }
    }
}

/// `[jobs]`: how this process's job runner works. Plain data, validated with the rest of the
/// configuration ([`JobsConfig::validate`] names the bad field).
///
/// ```toml
/// [jobs]
/// poll_interval = "1s"
///
/// [jobs.queues]        # queue name = jobs of it running at once in this process
/// default = 10
/// mail = 2
///
/// [jobs.limits.mail]   # across all processes
/// global_concurrency = 3
/// rate = "100/1m"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// The queues this process works and their concurrency, written as a table
    /// `name = concurrency`. Defaults to `default = 10`.
    #[serde(with = "queue_table")]
    pub queues: Vec<QueueConfig>,
    /// How often an idle producer claims even without a wake-up (covers lost notifications).
    /// Defaults to `1s`.
    #[serde(with = "serde_duration")]
    pub poll_interval: Duration,
    /// How often the process heartbeats (the heartbeat of all its running jobs). Defaults to
    /// `2s`.
    #[serde(with = "serde_duration")]
    pub heartbeat_interval: Duration,
    /// Running jobs of a process silent this long are rescued; at least 3 heartbeat intervals.
    /// Defaults to `30s`.
    #[serde(with = "serde_duration")]
    pub rescue_after: Duration,
    /// How often the maintenance leader activates due jobs (and elects). Defaults to `1s`.
    #[serde(with = "serde_duration")]
    pub sweep_interval: Duration,
    /// Completed jobs are deleted from history after this long. Defaults to `1d`.
    #[serde(with = "serde_duration")]
    pub completed_retention: Duration,
    /// Discarded and cancelled jobs are deleted from history after this long. Defaults to `7d`.
    #[serde(with = "serde_duration")]
    pub discarded_retention: Duration,
    /// Keep completed jobs in history at all. Defaults to `true`.
    pub keep_completed: bool,
    /// LISTEN for wake-ups; turn off behind a transaction-mode pooler (the poll remains).
    /// Defaults to `true`.
    pub listen: bool,
    /// The timeout of an attempt when neither the job nor its worker sets one, 1 ms to 24 h.
    /// Defaults to none (no timeout).
    #[serde(with = "optional_duration", skip_serializing_if = "Option::is_none")]
    pub default_timeout: Option<Duration>,
    /// Most completions written by one statement, 1 to 10000. Defaults to 1000.
    pub completion_batch: usize,
    /// Whether this process takes part in the maintenance election. Defaults to `true`.
    pub maintenance: bool,
    /// Jobs a producer may claim beyond its free slots while its queue has a backlog, held in
    /// memory and started as slots free (a local queue, as graphile-worker's): fewer, larger
    /// claims for short jobs, at the price of jobs waiting here instead of in the table.
    /// 0 claims exactly the free slots; at most 10000. Defaults to 0.
    pub prefetch: u32,
    /// `[jobs.limits.<queue>]`: limits of a queue across all processes, enforced by every
    /// claim of the queue. Each process that works the queue must declare the same limits (a
    /// process that does not declare them claims the queue unlimited). Defaults to none.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub limits: std::collections::BTreeMap<String, QueueLimits>,
}

/// `[jobs.limits.<queue>]`: a queue's limits across all processes together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueLimits {
    /// Jobs of the queue running at once across all processes, 1 to 10000 (each process also
    /// keeps its own `[jobs.queues]` concurrency). Defaults to no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_concurrency: Option<u32>,
    /// Jobs of the queue started per period across all processes, `"<jobs>/<period>"`:
    /// `"100/1m"`, `"5/1s"`, `"5/s"`; at most that many start in any window of that length.
    /// Jobs 1 to 10000, period 1 ms to 1 d. Defaults to no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
}

/// A rate: at most `jobs` starts in any window of length `per`. Written `"100/1m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Starts allowed per window.
    pub jobs: u32,
    /// The window's length.
    pub per: Duration,
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("`{s}` is not a rate; write <jobs>/<period>, e.g. `100/1m`, `5/1s` or `5/s`")
        };
        let (jobs, per) = s.split_once('/').ok_or_else(bad)?;
        let jobs: u32 = jobs.trim().parse().map_err(|_| bad())?;
        let per = per.trim();
        // `5/s` reads as `5/1s`.
        let per = if per.starts_with(|c: char| c.is_ascii_alphabetic()) {
            format!("1{per}")
        } else {
            per.to_string()
        };
        let per = crate::duration::parse_duration(&per).map_err(|e| format!("{}: {e}", bad()))?;
        Ok(Self { jobs, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.per.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}/{}s", self.jobs, ms / 1000)
        } else {
            write!(f, "{}/{ms}ms", self.jobs)
        }
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            queues: vec![QueueConfig::new(DEFAULT_JOB_QUEUE, DEFAULT_JOB_CONCURRENCY)],
            poll_interval: DEFAULT_JOB_POLL_INTERVAL,
            heartbeat_interval: DEFAULT_JOB_HEARTBEAT_INTERVAL,
            rescue_after: DEFAULT_JOB_RESCUE_AFTER,
            sweep_interval: DEFAULT_JOB_SWEEP_INTERVAL,
            completed_retention: Duration::from_secs(86_400),
            discarded_retention: Duration::from_secs(7 * 86_400),
            keep_completed: true,
            listen: true,
            default_timeout: None,
            completion_batch: 1000,
            maintenance: true,
            prefetch: 0,
            limits: Default::default(),
        }
    }
}

impl JobsConfig {
    /// Checks ranges and names; the error names the field (`jobs.rescue_after`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, problem: String| Err(ConfigError::Invalid { field, problem });
        let mut names = std::collections::HashSet::new();
        for q in &self.queues {
            if q.name.is_empty() || q.name.chars().count() > 128 {
                return invalid(
                    "jobs.queues",
                    format!("names must be 1 to 128 characters, got {:?}", q.name),
                );
            }
            if !(1..=10_000).contains(&q.concurrency) {
                return invalid(
                    "jobs.queues",
                    format!(
                        "queue {:?}: concurrency must be 1 to 10000, got {}",
                        q.name, q.concurrency
                    ),
                );
            }
            if !names.insert(&q.name) {
                return invalid("jobs.queues", format!("queue {:?} is listed twice", q.name));
            }
        }
        for (field, d) in [
            ("jobs.poll_interval", self.poll_interval),
            ("jobs.heartbeat_interval", self.heartbeat_interval),
            ("jobs.sweep_interval", self.sweep_interval),
        ] {
            if d < Duration::from_millis(10) || d > Duration::from_secs(3600) {
                return invalid(field, format!("must be 10 ms to 1 h, got {d:?}"));
            }
        }
        if self.rescue_after < self.heartbeat_interval * 3 {
            return invalid(
                "jobs.rescue_after",
                format!(
                    "must be at least 3 heartbeat intervals ({:?}), got {:?}",
                    self.heartbeat_interval * 3,
                    self.rescue_after
                ),
            );
        }
        if let Some(t) = self.default_timeout
            && (t.is_zero() || t > MAX_JOB_TIMEOUT)
        {
            return invalid("jobs.default_timeout", format!("must be 1 ms to 24 h, got {t:?}"));
        }
        if self.prefetch > 10_000 {
            return invalid(
                "jobs.prefetch",
                format!("must be at most 10000, got {}", self.prefetch),
            );
        }
        if !(1..=10_000).contains(&self.completion_batch) {
            return invalid(
                "jobs.completion_batch",
                format!("must be 1 to 10000, got {}", self.completion_batch),
            );
        }
        for (queue, limits) in &self.limits {
            if !names.contains(&queue) {
                let listed: Vec<&str> = self.queues.iter().map(|q| q.name.as_str()).collect();
                return invalid(
                    "jobs.limits",
                    format!(
                        "[jobs.limits.{queue}]: queue {queue:?} is not in [jobs.queues] \
                         (listed: {}); limits apply to the queues this process works",
                        listed.join(", ")
                    ),
                );
            }
            if limits.global_concurrency.is_none() && limits.rate.is_none() {
                return invalid(
                    "jobs.limits",
                    format!(
                        "[jobs.limits.{queue}] sets no limit; give `global_concurrency = 3` \
                         and/or `rate = \"100/1m\"`, or remove it"
                    ),
                );
            }
            if let Some(n) = limits.global_concurrency
                && !(1..=10_000).contains(&n)
            {
                return invalid(
                    "jobs.limits.global_concurrency",
                    format!("[jobs.limits.{queue}]: must be 1 to 10000, got {n}"),
                );
            }
            if let Some(r) = limits.rate {
                if !(1..=10_000).contains(&r.jobs) {
                    return invalid(
                        "jobs.limits.rate",
                        format!("[jobs.limits.{queue}]: jobs must be 1 to 10000, got {}", r.jobs),
                    );
                }
                if r.per < Duration::from_millis(1) || r.per > Duration::from_secs(86_400) {
                    return invalid(
                        "jobs.limits.rate",
                        format!(
                            "[jobs.limits.{queue}]: the period must be 1 ms to 1 d, got {:?}",
                            r.per
                        ),
                    );
                }
            }
        }
        Ok(())
    }
}

mod queue_table {
    //! `[jobs.queues]` as a TOML table `name = concurrency`, in the file's order.
    use super::QueueConfig;

    pub(super) fn serialize<S: serde::Serializer>(
        queues: &[QueueConfig],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(queues.len()))?;
        for q in queues {
            map.serialize_entry(&q.name, &q.concurrency)?;
        }
        map.end()
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<QueueConfig>, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<QueueConfig>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a table of queue name = concurrency (e.g. `default = 10`)")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut queues = Vec::new();
                while let Some((name, concurrency)) = map.next_entry::<String, u32>()? {
                    queues.push(QueueConfig { name, concurrency });
                }
                Ok(queues)
            }
        }
        d.deserialize_map(Visitor)
    }
}

mod optional_duration {
    //! `Option<Duration>` as an optional human string; absent means none.
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => crate::duration::serde_duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        crate::duration::serde_duration::deserialize(d).map(Some)
    }
}

/// `[database]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://` URL. Defaults to `WEIR_DATABASE_URL`, then `DATABASE_URL`, then libpq's
    /// `PG*` variables.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<Secret>,
    /// Connections in weir's pool. Defaults to 10.
    pub pool_size: u32,
}

/// Where a new consumer starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    /// From the oldest retained event.
    #[default]
    Beginning,
    /// From the next event logged.
    Now,
}

/// `[source]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// Replication slot name. Defaults to `weir`.
    pub slot: String,
    /// Publication name. Defaults to `weir`.
    pub publication: String,
    /// Tables to watch (`posts`, `sales.orders`). When empty, every table of `schemas`.
    /// Defaults to empty.
    pub tables: Vec<String>,
    /// Schemas whose tables are all watched when `tables` is empty. Defaults to `["public"]`.
    pub schemas: Vec<String>,
    /// Prefix of `pg_logical_emit_message` messages that become `message` events.
    /// Defaults to `weir`.
    pub message_prefix: String,
    /// Most events appended to the log in one transaction. Defaults to 10000.
    pub batch_max_events: usize,
    /// How often the slot's position is confirmed while nothing arrives, so an idle slot never
    /// pins WAL. Defaults to `10s`.
    #[serde(with = "serde_duration")]
    pub status_interval: Duration,
    /// `logical_decoding_work_mem` for the replication session: a transaction larger than this
    /// is streamed before it commits (and staged in the database by weir), which bounds the
    /// memory one transaction costs. Defaults to `16MB`.
    pub decoding_work_mem: String,
    /// When `weir init` adds a table to an existing publication, backfill the rows it already
    /// holds (`read` events). Defaults to true.
    pub backfill_added_tables: bool,
    /// Whether `weir init` sets `REPLICA IDENTITY FULL` on a watched table whose operator or
    /// subscription routes by a column its replica identity does not carry (a delete's old row
    /// would lack it). With `false`, `weir init` changes nothing and says what is needed, and
    /// `weir run` refuses to start such an operator. Defaults to `true`.
    pub manage_replica_identity: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self { url: None, pool_size: 10 }
    }
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            slot: DEFAULT_SLOT.into(),
            publication: DEFAULT_PUBLICATION.into(),
            tables: Vec::new(),
            schemas: vec!["public".into()],
            message_prefix: DEFAULT_MESSAGE_PREFIX.into(),
            batch_max_events: DEFAULT_BATCH_MAX_EVENTS,
            status_interval: Duration::from_secs(10),
            decoding_work_mem: "16MB".into(),
            backfill_added_tables: true,
            manage_replica_identity: true,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// How long events are kept, by commit time; whole partitions older than this are dropped.
    /// Defaults to `7d`.
    #[serde(with = "serde_duration")]
    pub retention: Duration,
    /// Positions per partition of `weir.events`. Defaults to 1000000.
    pub partition_size: i64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { retention: DEFAULT_RETENTION, partition_size: DEFAULT_PARTITION_SIZE }
    }
}

/// A configuration we cannot use. The message names the file or variable, the key and the fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type.
    #[error("{origin}: {message}")]
    Parse {
        /// File name or environment variable.
        origin: String,
        /// What toml/serde said, with the key and the line.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid configuration: `{field}` {problem}")]
    Invalid {
        /// `section.field`.
        field: &'static str,
        /// What is wrong and what would be right.
        problem: String,
    },
}

impl Config {
    /// Loads `path` (or only defaults when `None` or when the default `weir.toml` is absent),
    /// then applies `WEIR_*` variables from `env`, then validates.
    pub fn load(
        path: Option<&Path>,
        required: bool,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(p) if p.exists() || required => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                (text, p.display().to_string())
            }
            _ => (String::new(), "defaults".to_string()),
        };
        Self::from_toml(&text, &origin, env)
    }

    /// Parses TOML text, applies `WEIR_*` variables from `env`, and validates.
    pub fn from_toml(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let parse_err = |origin: &str, e: toml::de::Error| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        };
        // Parse the file alone first, so its errors carry its own line numbers.
        let mut config: Config = toml::from_str(text).map_err(|e| parse_err(origin, e))?;
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut database_url = None;
        let mut overrides = Vec::new();
        for (name, value) in &env {
            match name.as_str() {
                "DATABASE_URL" => database_url = database_url.or(Some(value.clone())),
                "WEIR_DATABASE_URL" => {}
                _ => {
                    if let Some(rest) = name.strip_prefix("WEIR_") {
                        overrides.push((name.clone(), rest.to_lowercase(), value.clone()));
                    }
                }
            }
        }
        if !overrides.is_empty() {
            // TOML has no null: a JSON value that holds one (a `nan` or `inf` read into a
            // selector, a sink or args) does not go back to TOML, so no override can apply.
            let mut table: toml::Table =
                toml::Table::try_from(&config).map_err(|e| ConfigError::Parse {
                    origin: origin.to_string(),
                    message: format!(
                        "the WEIR_* environment variables cannot be applied: {e} (a `nan` or \
                         `inf` in a JSON value?)"
                    ),
                })?;
            let sections: Vec<String> = table.keys().cloned().collect();
            let mut applied = false;
            for (var, rest, value) in overrides {
                // WEIR_<SECTION>_<FIELD>; variables of other tools (WEIR_PG_BIN, WEIR_LOG) that
                // name no section are left alone.
                let Some(section) = sections.iter().find(|s| rest.starts_with(&format!("{s}_")))
                else {
                    continue;
                };
                let field = rest[section.len() + 1..].to_string();
                let parsed = format!("v = {value}")
                    .parse::<toml::Table>()
                    .ok()
                    .and_then(|mut t| t.remove("v"))
                    .unwrap_or(toml::Value::String(value.clone()));
                let entry = table
                    .entry(section.clone())
                    .or_insert_with(|| toml::Value::Table(Default::default()));
                if let toml::Value::Table(t) = entry {
                    t.insert(field, parsed);
                }
                let text = toml::to_string(&table).expect("a TOML table prints");
                toml::from_str::<Config>(&text).map_err(|e| ConfigError::Parse {
                    origin: format!("environment variable {var}"),
                    message: e.message().to_string(),
                })?;
                applied = true;
            }
            if applied {
                let text = toml::to_string(&table).expect("a TOML table prints");
                config = toml::from_str(&text).map_err(|e| parse_err("environment", e))?;
            }
        }
        let weir_url = env.iter().find(|(k, _)| k == "WEIR_DATABASE_URL").map(|(_, v)| v.clone());
        if let Some(url) = weir_url {
            config.database.url = Some(Secret::new(url));
        } else if config.database.url.is_none() {
            config.database.url = database_url.map(Secret::new);
        }
        // Errors found later (at start-up) name the entry's line.
        let workers = header_lines(text, "workers");
        if workers.len() == config.workers.len() {
            for (w, line) in config.workers.iter_mut().zip(workers) {
                w.line = Some(line);
            }
        }
        let periodic = header_lines(text, "periodic");
        if periodic.len() == config.periodic.len() {
            for (p, line) in config.periodic.iter_mut().zip(periodic) {
                p.line = Some(line);
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges and names; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, problem: &str| {
            Err(ConfigError::Invalid { field, problem: problem.to_string() })
        };
        if let Some(url) = &self.database.url {
            let u = url.expose();
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                return invalid(
                    "database.url",
                    "must be a URL starting with postgres:// (e.g. postgres://user@host:5432/db)",
                );
            }
        }
        if self.database.pool_size == 0 {
            return invalid("database.pool_size", "must be at least 1 (e.g. 10)");
        }
        if !is_identifier(&self.source.slot) {
            return invalid(
                "source.slot",
                "must be lowercase letters, digits and underscores, at most 63 characters \
                 (PostgreSQL's rule for slot names)",
            );
        }
        if self.source.publication.is_empty() || self.source.publication.len() > 63 {
            return invalid("source.publication", "must be 1 to 63 characters");
        }
        if self.source.tables.is_empty() && self.source.schemas.is_empty() {
            return invalid(
                "source.tables",
                "and `source.schemas` are both empty; list tables or schemas to watch",
            );
        }
        if self.source.message_prefix.is_empty() {
            return invalid("source.message_prefix", "must not be empty (default: weir)");
        }
        if self.source.batch_max_events == 0 {
            return invalid("source.batch_max_events", "must be at least 1 (default: 10000)");
        }
        let mem = &self.source.decoding_work_mem;
        let digits = mem.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        if digits.is_empty()
            || !digits.chars().all(|c| c.is_ascii_digit())
            || !["kB", "MB", "GB", ""].contains(&&mem[digits.len()..])
        {
            return invalid("source.decoding_work_mem", "must be a size like `16MB` or `64kB`");
        }
        if self.source.status_interval < Duration::from_millis(100) {
            return invalid("source.status_interval", "must be at least 100ms (default: 10s)");
        }
        if self.log.partition_size < 1000 {
            return invalid("log.partition_size", "must be at least 1000 (default: 1000000)");
        }
        if self.log.retention < Duration::from_secs(60) {
            return invalid("log.retention", "must be at least 1m (default: 7d)");
        }
        if self.consumers.lanes == 0 || self.consumers.lanes > 1024 {
            return invalid("consumers.lanes", "must be from 1 to 1024 (default: 8)");
        }
        if self.http.bind.parse::<std::net::SocketAddr>().is_err() {
            return invalid("http.bind", "must be an address like 127.0.0.1:7070 or 0.0.0.0:7070");
        }
        if self.http.token.as_ref().is_some_and(|t| t.expose().len() < 16) {
            return invalid(
                "http.token",
                "must be at least 16 characters (e.g. `openssl rand -hex 32`)",
            );
        }
        if self.http.max_body_bytes == 0 {
            return invalid("http.max_body_bytes", "must be at least 1 (default: 1048576)");
        }
        if self.http.max_wait >= self.http.request_timeout {
            return invalid("http.max_wait", "must be shorter than http.request_timeout");
        }
        if self.http.header_timeout.is_zero() {
            return invalid(
                "http.header_timeout",
                "must be longer than 0 (default: 10s): it is how long a client may take to send \
                 a request head",
            );
        }
        if self.http.client_buffer < 16 {
            return invalid("http.client_buffer", "must be at least 16 (default: 4096)");
        }
        for (entity, channel) in &self.channels {
            for (column, parent) in &channel.scopes {
                if column.is_empty() || parent.is_empty() || parent.contains('/') {
                    return invalid(
                        "channels.scopes",
                        &format!(
                            "`{entity}`: `{column} = \"{parent}\"` needs a column and a parent entity without `/`"
                        ),
                    );
                }
            }
        }
        self.jobs.validate()?;
        self.validate_workers()?;
        let mut names = std::collections::HashSet::new();
        for op in &self.operators {
            if !names.insert(op.name.as_str()) {
                return invalid("operators.name", &format!("`{}` is used twice", op.name));
            }
            if op.name.is_empty() || op.name.len() > 63 {
                return invalid("operators.name", "must be 1 to 63 characters");
            }
            if op.entities.is_empty() {
                return invalid(
                    "operators.entities",
                    &format!("operator `{}` listens to no entity", op.name),
                );
            }
            if !op.sql.contains("$1") {
                return invalid(
                    "operators.sql",
                    &format!("operator `{}`: the statement must use the key as $1", op.name),
                );
            }
            if op.lanes.is_some_and(|l| l == 0 || l > 1024) {
                return invalid(
                    "operators.lanes",
                    &format!("operator `{}`: must be from 1 to 1024", op.name),
                );
            }
            for e in op.key.keys().chain(&op.delete_with) {
                if !op.entities.contains(e) {
                    return invalid(
                        "operators.key",
                        &format!("operator `{}` maps `{e}`, which is not in its entities", op.name),
                    );
                }
            }
        }
        Ok(())
    }
}

impl Config {
    /// `[[workers]]` and `[[periodic]]`: what can be checked without a database. What needs
    /// one (the statement prepares, the program exists, the cron parses) is checked when the
    /// job runner starts.
    fn validate_workers(&self) -> Result<(), ConfigError> {
        let queues: Vec<&str> = self.jobs.queues.iter().map(|q| q.name.as_str()).collect();
        let unknown_queue = |entry: String, queue: &str| ConfigError::Invalid {
            field: "workers.queue",
            problem: format!(
                "of {entry}: queue {queue:?} is not in [jobs.queues] (listed: {}); add \
                 `{queue} = 10` under [jobs.queues]",
                queues.join(", ")
            ),
        };
        let mut kinds: std::collections::HashMap<&str, String> = Default::default();
        for w in &self.workers {
            let entry = w.entry();
            let bad = |field: &'static str, problem: String| {
                Err(ConfigError::Invalid { field, problem: format!("of {entry}: {problem}") })
            };
            if w.kind.is_empty() || w.kind.chars().count() > 128 {
                return bad("workers.kind", "must be 1 to 128 characters".into());
            }
            if let Some(first) = kinds.insert(&w.kind, entry.clone()) {
                return bad(
                    "workers.kind",
                    format!("kind {:?} already has a worker: {first}; one worker per kind", w.kind),
                );
            }
            if !queues.contains(&w.queue.as_str()) {
                return Err(unknown_queue(entry, &w.queue));
            }
            if w.concurrency.is_some_and(|c| !(1..=10_000).contains(&c)) {
                return bad("workers.concurrency", "must be 1 to 10000".into());
            }
            if let Some(t) = w.timeout
                && (t.is_zero() || t > MAX_JOB_TIMEOUT)
            {
                return bad("workers.timeout", format!("must be 1 ms to 24 h, got {t:?}"));
            }
            if w.max_attempts.is_some_and(|m| !(1..=1000).contains(&m)) {
                return bad("workers.max_attempts", "must be 1 to 1000".into());
            }
            if let Some(b) = w.backoff
                && (b.first.is_zero()
                    || b.max < b.first
                    || !b.multiplier.is_finite()
                    || b.multiplier < 1.0)
            {
                return bad(
                    "workers.backoff",
                    "needs first > 0, max ≥ first and a multiplier of at least 1".into(),
                );
            }
            let t = w.worker_type.as_str();
            let set: [(&str, bool, WorkerType); 7] = [
                ("sql", w.sql.is_some(), WorkerType::Sql),
                ("url", w.url.is_some(), WorkerType::Http),
                ("secret", w.secret.is_some(), WorkerType::Http),
                ("headers", !w.headers.is_empty(), WorkerType::Http),
                ("command", !w.command.is_empty(), WorkerType::Command),
                ("env", !w.env.is_empty(), WorkerType::Command),
                ("dir", w.dir.is_some(), WorkerType::Command),
            ];
            for (field, present, owner) in set {
                if present && owner != w.worker_type {
                    return bad(
                        "workers.type",
                        format!("`{field}` belongs to type = \"{}\", not \"{t}\"", owner.as_str()),
                    );
                }
            }
            match w.worker_type {
                WorkerType::Sql if w.sql.as_deref().is_none_or(|s| s.trim().is_empty()) => {
                    return bad(
                        "workers.sql",
                        "type = \"sql\" needs `sql`, a statement with the job's args as $1".into(),
                    );
                }
                WorkerType::Http => {
                    let url = w.url.as_deref().unwrap_or("");
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return bad(
                            "workers.url",
                            format!(
                                "type = \"http\" needs an http:// or https:// `url`, got {url:?}"
                            ),
                        );
                    }
                }
                WorkerType::Command if w.command.first().is_none_or(|c| c.is_empty()) => {
                    return bad(
                        "workers.command",
                        "type = \"command\" needs `command`, the program and its arguments \
                         (e.g. [\"python3\", \"job.py\"])"
                            .into(),
                    );
                }
                _ => {}
            }
        }
        let mut names = std::collections::HashSet::new();
        for p in &self.periodic {
            let entry = p.entry();
            if !names.insert(p.name()) {
                return Err(ConfigError::Invalid {
                    field: "periodic.name",
                    problem: format!("of {entry}: the name is used twice; give each a `name`"),
                });
            }
            if p.kind.is_empty() {
                return Err(ConfigError::Invalid {
                    field: "periodic.kind",
                    problem: format!("of {entry}: must not be empty"),
                });
            }
            if !p.args.is_object() {
                return Err(ConfigError::Invalid {
                    field: "periodic.args",
                    problem: format!(
                        "of {entry}: must be a table (e.g. `args = {{ scope = \"all\" }}`)"
                    ),
                });
            }
            if p.max_attempts.is_some_and(|m| !(1..=1000).contains(&m)) {
                return Err(ConfigError::Invalid {
                    field: "periodic.max_attempts",
                    problem: format!("of {entry}: must be 1 to 1000"),
                });
            }
        }
        Ok(())
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_toml("", "weir.toml", env(&[])).unwrap();
        assert_eq!(c.source.slot, "weir");
        assert_eq!(c.log.retention, DEFAULT_RETENTION);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err =
            Config::from_toml("[source]\nslot = \"a\"\nslott = \"b\"\n", "weir.toml", env(&[]))
                .unwrap_err()
                .to_string();
        assert!(err.contains("weir.toml"), "{err}");
        assert!(err.contains("slott"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let err =
            Config::from_toml("[source]\nbatch_max_events = \"many\"\n", "weir.toml", env(&[]))
                .unwrap_err()
                .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("batch_max_events") || err.contains("integer"), "{err}");
    }

    #[test]
    fn http_and_channels() {
        let file = "[http]\nbind = \"0.0.0.0:9000\"\n[channels.comments]\nscopes = { post_id = \"posts\" }\n";
        let c = Config::from_toml(file, "f", env(&[("WEIR_HTTP_TOKEN", "0123456789abcdef0123")]))
            .unwrap();
        assert_eq!(c.http.bind, "0.0.0.0:9000");
        assert_eq!(c.http.token.as_ref().unwrap().expose(), "0123456789abcdef0123");
        assert!(!format!("{c:?}").contains("0123456789abcdef0123"), "the token is never printed");
        assert_eq!(c.channels["comments"].scopes["post_id"], "posts");
        for (file, field) in [
            ("[http]\nbind = \"localhost\"", "http.bind"),
            ("[http]\ntoken = \"short\"", "http.token"),
            ("[http]\nmax_wait = \"2m\"", "http.max_wait"),
            ("[http]\nheader_timeout = \"0s\"", "http.header_timeout"),
            ("[channels.comments]\nscopes = { post_id = \"a/b\" }", "channels.scopes"),
        ] {
            let err = Config::from_toml(file, "f", []).unwrap_err().to_string();
            assert!(err.contains(field), "{file}: {err}");
        }
        let err = Config::from_toml("[http]\nport = 1", "weir.toml", []).unwrap_err().to_string();
        assert!(err.contains("port") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn environment_overrides_file() {
        let c = Config::from_toml(
            "[source]\nslot = \"a\"\n",
            "weir.toml",
            env(&[("WEIR_SOURCE_SLOT", "b"), ("WEIR_LOG_RETENTION", "2d"), ("WEIR_PG_BIN", "/x")]),
        )
        .unwrap();
        assert_eq!(c.source.slot, "b");
        assert_eq!(c.log.retention, Duration::from_secs(2 * 86_400));
    }

    /// The environment's overrides go through a TOML round trip of the whole configuration:
    /// the JSON values in it (a subscription's selector and sink) keep their numbers, integers
    /// beyond an `f64`'s 53 bits and fractions alike.
    #[test]
    fn environment_overrides_keep_the_numbers_of_json_values() {
        let file = r#"
[[subscriptions]]
name = "big"
type = "event_payload"
selector = { total = 12.5, count = 3, id = 9007199254740993, nested = [0.25, -7] }

[subscriptions.sink]
type = "nats"
max_in_flight = 100
"#;
        for vars in [env(&[]), env(&[("WEIR_SOURCE_SLOT", "b")])] {
            let c = Config::from_toml(file, "f", vars).unwrap();
            let s = &c.subscriptions[0];
            assert_eq!(s.selector["total"].as_f64(), Some(12.5), "{}", s.selector);
            assert_eq!(s.selector["count"].as_u64(), Some(3), "{}", s.selector);
            assert_eq!(s.selector["id"].to_string(), "9007199254740993", "{}", s.selector);
            assert_eq!(s.selector["nested"].to_string(), "[0.25,-7]");
            assert_eq!(s.sink.as_ref().unwrap()["max_in_flight"].as_u64(), Some(100));
        }
    }

    /// Found by the `config` fuzz target (docs/fuzzing.md): a `nan` in a JSON value is read as
    /// null, which TOML cannot write back, and the overrides' round trip panicked.
    #[test]
    fn environment_overrides_of_a_file_with_nan_in_a_json_value_are_an_error() {
        let file = "[[subscriptions]]\nname = \"s\"\ntype = \"stream\"\nselector = nan\n";
        let err = Config::from_toml(file, "weir.toml", env(&[("WEIR_SOURCE_SLOT", "other")]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("weir.toml: the WEIR_* environment variables"), "{err}");
    }

    #[test]
    fn bad_environment_value_names_the_variable() {
        let err =
            Config::from_toml("", "weir.toml", env(&[("WEIR_SOURCE_BATCH_MAX_EVENTS", "lots")]))
                .unwrap_err()
                .to_string();
        assert!(err.contains("WEIR_SOURCE_BATCH_MAX_EVENTS"), "{err}");
        let err = Config::from_toml("", "weir.toml", env(&[("WEIR_SOURCE_SLOTT", "x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("WEIR_SOURCE_SLOTT") && err.contains("slott"), "{err}");
    }

    #[test]
    fn database_url_precedence() {
        let file = "[database]\nurl = \"postgres://file/db\"\n";
        let c =
            Config::from_toml(file, "f", env(&[("DATABASE_URL", "postgres://env/db")])).unwrap();
        assert_eq!(c.database.url.unwrap().expose(), "postgres://file/db");
        let c = Config::from_toml("", "f", env(&[("DATABASE_URL", "postgres://env/db")])).unwrap();
        assert_eq!(c.database.url.unwrap().expose(), "postgres://env/db");
        let c =
            Config::from_toml(file, "f", env(&[("WEIR_DATABASE_URL", "postgres://w/db")])).unwrap();
        assert_eq!(c.database.url.unwrap().expose(), "postgres://w/db");
        let err = Config::from_toml("", "f", env(&[("DATABASE_URL", "mysql://x")])).unwrap_err();
        assert!(err.to_string().contains("database.url"), "{err}");
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("postgres://u:hunter2@h/db");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn validate_names_the_field() {
        let err = Config::from_toml("[source]\nslot = \"Bad-Slot\"\n", "f", env(&[])).unwrap_err();
        assert!(err.to_string().contains("source.slot"), "{err}");
    }

    #[test]
    fn jobs_section() {
        let file = "[jobs]\npoll_interval = \"500ms\"\ndefault_timeout = \"5m\"\n\
                    [jobs.queues]\ndefault = 4\nmail = 2\n";
        let c = Config::from_toml(file, "f", env(&[("WEIR_JOBS_PREFETCH", "8")])).unwrap();
        assert_eq!(c.jobs.queues, [QueueConfig::new("default", 4), QueueConfig::new("mail", 2)]);
        assert_eq!(c.jobs.poll_interval, Duration::from_millis(500));
        assert_eq!(c.jobs.default_timeout, Some(Duration::from_secs(300)));
        assert_eq!(c.jobs.prefetch, 8);
        assert_eq!(Config::default().jobs, JobsConfig::default());
        let c = Config::from_toml(
            "",
            "f",
            env(&[("WEIR_JOBS_QUEUES", "{ reports = 3 }"), ("WEIR_JOBS_RESCUE_AFTER", "1m")]),
        )
        .unwrap();
        assert_eq!(c.jobs.queues, [QueueConfig::new("reports", 3)]);
        assert_eq!(c.jobs.rescue_after, Duration::from_secs(60));
        for (file, field) in [
            ("[jobs]\nrescue_after = \"3s\"", "jobs.rescue_after"),
            ("[jobs]\npoll_interval = \"1ms\"", "jobs.poll_interval"),
            ("[jobs]\ndefault_timeout = \"2d\"", "jobs.default_timeout"),
            ("[jobs]\nprefetch = 20000", "jobs.prefetch"),
            ("[jobs]\ncompletion_batch = 0", "jobs.completion_batch"),
            ("[jobs.queues]\ndefault = 0", "jobs.queues"),
            ("[jobs.queues]\n\"\" = 1", "jobs.queues"),
        ] {
            let err = Config::from_toml(file, "f", []).unwrap_err().to_string();
            assert!(err.contains(field), "{file}: {err}");
        }
        let err = Config::from_toml("[jobs]\nqueue = 1", "weir.toml", []).unwrap_err().to_string();
        assert!(err.contains("queue") && err.contains("line 2"), "{err}");
        let err = Config::from_toml("", "f", env(&[("WEIR_JOBS_LISTEN", "maybe")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("WEIR_JOBS_LISTEN"), "{err}");
    }

    #[test]
    fn queue_limits() {
        let file = "[jobs.queues]\ndefault = 4\nmail = 10\n\
                    [jobs.limits.mail]\nglobal_concurrency = 3\nrate = \"100/1m\"\n\
                    [jobs.limits.default]\nrate = \"5/s\"\n";
        let c = Config::from_toml(file, "f", []).unwrap();
        let mail = c.jobs.limits["mail"];
        assert_eq!(mail.global_concurrency, Some(3));
        assert_eq!(mail.rate, Some(Rate { jobs: 100, per: Duration::from_secs(60) }));
        assert_eq!(mail.rate.unwrap().to_string(), "100/60s");
        assert_eq!(c.jobs.limits["default"].rate.unwrap().per, Duration::from_secs(1));
        for (limits, expect) in [
            ("[jobs.limits.other]\nglobal_concurrency = 1", "\"other\" is not in [jobs.queues]"),
            ("[jobs.limits.mail]\n", "sets no limit"),
            ("[jobs.limits.mail]\nglobal_concurrency = 0", "jobs.limits.global_concurrency"),
            ("[jobs.limits.mail]\nrate = \"0/1s\"", "jobs.limits.rate"),
            ("[jobs.limits.mail]\nrate = \"5/2d\"", "1 ms to 1 d"),
            ("[jobs.limits.mail]\nrate = \"5 per second\"", "write <jobs>/<period>"),
            ("[jobs.limits.mail]\nrate = \"5/1x\"", "write <jobs>/<period>"),
            ("[jobs.limits.mail]\nconcurrency = 3", "concurrency"),
        ] {
            let file = format!("[jobs.queues]\nmail = 10\n{limits}");
            let err = Config::from_toml(&file, "f", []).unwrap_err().to_string();
            assert!(err.contains(expect), "{limits}: {err}");
        }
    }

    #[test]
    fn workers_and_periodic_entries_are_checked_and_named_by_line() {
        let text = r#"
[jobs.queues]
default = 4
mail = 2

[[workers]]
kind = "send_mail"
type = "http"
queue = "mail"
url = "http://127.0.0.1:3000/jobs"

[[workers]]  # the report
kind = "report"
type = "sql"
sql = "insert into reports (args) values ($1)"

[[periodic]]
cron = "0 3 * * *"
kind = "report"
"#;
        let c = Config::from_toml(text, "weir.toml", env(&[])).unwrap();
        assert_eq!(c.workers[0].line, Some(6));
        assert_eq!(c.workers[1].line, Some(12));
        assert_eq!(c.workers[1].queue, "default");
        assert_eq!(c.periodic[0].line, Some(17));
        assert_eq!(c.periodic[0].name(), "report");
        assert_eq!(c.periodic[0].args, serde_json::json!({}));

        let err =
            |text: &str| Config::from_toml(text, "weir.toml", env(&[])).unwrap_err().to_string();
        let e = err(
            "[[workers]]\nkind = \"a\"\ntype = \"sql\"\nqueue = \"nope\"\nsql = \"select $1\"\n",
        );
        assert!(
            e.contains("line 1") && e.contains("\"nope\"") && e.contains("[jobs.queues]"),
            "{e}"
        );
        let e = err(
            "[[workers]]\nkind = \"a\"\ntype = \"sql\"\nsql = \"select $1\"\n\n[[workers]]\nkind = \"a\"\ntype = \"command\"\ncommand = [\"true\"]\n",
        );
        assert!(
            e.contains("line 6") && e.contains("already has a worker") && e.contains("line 1"),
            "{e}"
        );
        let e = err("[[workers]]\nkind = \"a\"\ntype = \"http\"\nurl = \"ftp://x\"\n");
        assert!(e.contains("http:// or https://"), "{e}");
        let e = err(
            "[[workers]]\nkind = \"a\"\ntype = \"sql\"\nsql = \"select $1\"\nurl = \"http://x\"\n",
        );
        assert!(e.contains("`url` belongs to type = \"http\""), "{e}");
        let e = err("[[workers]]\nkind = \"a\"\ntype = \"shell\"\n");
        assert!(e.contains("line 3") && e.contains("shell"), "{e}");
        let e = err(
            "[[periodic]]\ncron = \"* * * * *\"\nkind = \"a\"\n[[periodic]]\ncron = \"* * * * *\"\nkind = \"a\"\n",
        );
        assert!(e.contains("line 4") && e.contains("used twice"), "{e}");
    }
}
