//! What every task of a runner shares: the pool, this process's identity, the configuration,
//! the workers, the counters and the cancel tokens of the jobs running here.
//!
//! ```text
//!            runner (creates it, stops the tasks)
//!               │ Arc<Shared>
//!   ┌───────────┼────────────┬────────────┬──────────────┐
//! producer   completer    heartbeat    listener     maintenance
//! ```
//!
//! It lives apart from the runner so that each role imports it without importing the runner
//! (and the runner imports the roles).

use std::collections::HashMap;
use std::sync::Mutex;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use weir_core::ProcessId;

use crate::Config;
use crate::metrics::Metrics;
use crate::worker::Workers;

/// What every task of a runner shares.
pub(crate) struct Shared {
    pub(crate) pool: PgPool,
    /// `attempted_by` of the jobs this process runs; the key of its heartbeat row.
    pub(crate) process: ProcessId,
    pub(crate) config: Config,
    pub(crate) workers: Workers,
    pub(crate) metrics: Metrics,
    /// Running jobs' cancel tokens, for cancel requests.
    pub(crate) running: Mutex<HashMap<i64, CancellationToken>>,
    /// Cancelled when running jobs must stop now.
    pub(crate) hard: CancellationToken,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("process", &self.process).finish_non_exhaustive()
    }
}
