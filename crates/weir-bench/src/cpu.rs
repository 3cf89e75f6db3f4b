//! Where the CPU went during a measured window: one sampler for every benchmark.
//!
//! ```text
//! start() ──────────────── window ──────────────── stop() → CpuReport
//!   │ ticks of this process (and its waited-for children), of each watched pid, of the machine
//!   │ a thread of its own, every 100 ms (and once more at stop):
//!   │   each child of the postmaster → its ticks and its process titles
//!   └─────────────────────────────────────────────── the same ticks again; differences
//! ```
//!
//! The sampler knows nothing of what the processes are: the caller passes a [`Label`] that
//! names a server process from the titles it showed (`postgres: walsender …`, `… INSERT`), and
//! reads the report as it needs (a breakdown per label, a total per event, a share of one
//! core). Ticks come from `/proc/<pid>/stat` ([`crate::procfs`]); a server process born during
//! the window counts from zero, one that ended counts until it was last seen. Without a local
//! postmaster (a `--url` server elsewhere) only this machine's processes are measured.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::procfs::{ProcStat, children_of, clock_ticks, machine_busy_ticks, proc_stat, title};

/// Names a server process from the distinct titles it showed while sampled, in order.
pub(crate) type Label = fn(&[String]) -> String;

/// CPU used over a window, in seconds of one core.
#[derive(Debug, Default)]
pub(crate) struct CpuReport {
    /// From start to stop, in seconds.
    pub(crate) wall: f64,
    /// The server's processes by label, most first (empty when the server is not local).
    pub(crate) server: Vec<(String, f64)>,
    pub(crate) this_process: f64,
    /// This process's waited-for children (e.g. a `pg_recvlogical` it ran to completion).
    pub(crate) children: f64,
    /// The processes the caller asked to watch, by the name it gave.
    pub(crate) watched: Vec<(&'static str, f64)>,
    /// Every process on the machine (`/proc/stat`), including all of the above.
    pub(crate) machine: f64,
    /// Whether the server runs on this machine (its processes are measured).
    pub(crate) local: bool,
}

impl CpuReport {
    /// The server's processes together.
    pub(crate) fn server_total(&self) -> f64 {
        self.server.iter().map(|(_, s)| s).sum()
    }

    /// A watched process's, zero when it was not watched.
    pub(crate) fn watched(&self, name: &str) -> f64 {
        self.watched.iter().find(|(n, _)| *n == name).map_or(0.0, |(_, s)| *s)
    }
}

/// A server process as the sampler saw it: its distinct titles, ticks at first and last sight.
#[derive(Debug, Default)]
struct Seen {
    titles: Vec<String>,
    first: u64,
    last: u64,
}

/// Samples the CPU of a window; see the module documentation.
#[derive(Debug)]
pub(crate) struct CpuSampler {
    started: Instant,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<HashMap<u32, Seen>>>,
    label: Label,
    this_start: Option<ProcStat>,
    machine_start: Option<u64>,
    watched: Vec<(&'static str, u32, u64)>,
    local: bool,
}

impl CpuSampler {
    /// Starts sampling the server's processes (children of `postmaster`, when it is local),
    /// this process, and the machine.
    pub(crate) fn start(postmaster: Option<u32>, label: Label) -> Self {
        let this_start = proc_stat(std::process::id());
        let machine_start = machine_busy_ticks();
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = postmaster.map(|pm| {
            std::thread::spawn(move || {
                let mut seen: HashMap<u32, Seen> = HashMap::new();
                let mut first_round = true;
                let mut stopping = false;
                loop {
                    for pid in children_of(pm) {
                        let Some(st) = proc_stat(pid) else { continue };
                        let entry = seen.entry(pid).or_insert_with(|| Seen {
                            // A process born during the window counts from zero.
                            first: if first_round { st.ticks } else { 0 },
                            ..Seen::default()
                        });
                        entry.last = st.ticks;
                        let t = title(pid);
                        if !entry.titles.contains(&t) {
                            entry.titles.push(t);
                        }
                    }
                    first_round = false;
                    if stopping {
                        break;
                    }
                    // A message or a hang-up is the stop: one more round, then the end.
                    stopping = !matches!(
                        stopped.recv_timeout(Duration::from_millis(100)),
                        Err(mpsc::RecvTimeoutError::Timeout)
                    );
                }
                seen
            })
        });
        Self {
            started: Instant::now(),
            stop: Some(stop),
            thread,
            label,
            this_start,
            machine_start,
            watched: Vec::new(),
            local: postmaster.is_some(),
        }
    }

    /// Also measures `pid` (a process of this benchmark, e.g. a `weir run` it started), reported
    /// as `name`.
    pub(crate) fn watch(mut self, name: &'static str, pid: u32) -> Self {
        let ticks = proc_stat(pid).map_or(0, |s| s.ticks);
        self.watched.push((name, pid, ticks));
        self
    }

    /// Ends the window.
    pub(crate) fn stop(mut self) -> CpuReport {
        let wall = self.started.elapsed().as_secs_f64();
        let tck = clock_ticks();
        let seconds = |a: u64, b: u64| b.saturating_sub(a) as f64 / tck;
        let end = proc_stat(std::process::id());
        let (this_process, children) = match (&self.this_start, &end) {
            (Some(a), Some(b)) => {
                (seconds(a.ticks, b.ticks), seconds(a.child_ticks, b.child_ticks))
            }
            _ => (0.0, 0.0),
        };
        let watched = self
            .watched
            .iter()
            .map(|(name, pid, start)| {
                (*name, proc_stat(*pid).map_or(0.0, |s| seconds(*start, s.ticks)))
            })
            .collect();
        let machine = match (self.machine_start, machine_busy_ticks()) {
            (Some(a), Some(b)) => seconds(a, b),
            _ => 0.0,
        };
        drop(self.stop.take());
        let mut by_label: HashMap<String, f64> = HashMap::new();
        if let Some(t) = self.thread.take() {
            for seen in t.join().unwrap_or_default().into_values() {
                *by_label.entry((self.label)(&seen.titles)).or_default() +=
                    seconds(seen.first, seen.last);
            }
        }
        let mut server: Vec<(String, f64)> = by_label.into_iter().collect();
        server.sort_by(|a, b| b.1.total_cmp(&a.1));
        CpuReport { wall, server, this_process, children, watched, machine, local: self.local }
    }
}

/// What an auxiliary server process is, from its title (`walsender`, `checkpointer`, …), or
/// `None` for a client backend: the part of every benchmark's [`Label`] that is PostgreSQL's.
pub(crate) fn auxiliary(title: &str) -> Option<String> {
    let rest = title.strip_prefix("postgres: ").unwrap_or(title);
    if rest.starts_with("walsender") {
        return Some("walsender".into());
    }
    [
        "checkpointer",
        "background writer",
        "walwriter",
        "autovacuum",
        "logical replication",
        "archiver",
    ]
    .iter()
    .any(|p| rest.starts_with(p))
    .then(|| rest.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_auxiliary_processes() {
        assert_eq!(
            auxiliary("postgres: walsender postgres 127.0.0.1(5) START_REPLICATION").as_deref(),
            Some("walsender")
        );
        assert_eq!(auxiliary("postgres: checkpointer ").as_deref(), Some("checkpointer"));
        assert_eq!(
            auxiliary("postgres: autovacuum launcher").as_deref(),
            Some("autovacuum launcher")
        );
        assert_eq!(auxiliary("postgres: postgres db 127.0.0.1(5) INSERT"), None);
    }

    #[test]
    fn measures_this_process() {
        let sampler = CpuSampler::start(None, |_| String::new());
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_add(1);
        }
        let report = sampler.stop();
        assert!(x > 0 && report.wall >= 0.05 && !report.local && report.server.is_empty());
    }
}
