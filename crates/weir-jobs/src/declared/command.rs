//! `type = "command"`: each attempt runs a program (no shell), the job as JSON on its stdin.
//!
//! ```text
//! attempt ─► spawn command[0] command[1..]   in a process group of its own; env, dir
//!              stdin  ◄── the job document {id, kind, queue, args, attempt, …}, then closed
//!              stdout ──► its last 4 KiB kept: the last line may answer the runner
//!              stderr ──► its last 20 lines (2 KiB at most) kept, for the error
//!            exit 0                                   ─► completed
//!            non-zero, last stdout line {"snooze": "30s"} ─► snoozed (no attempt spent)
//!            non-zero, last stdout line {"discard": "why"} ─► discarded
//!            any other non-zero exit or a signal      ─► failed: code + stderr, retried
//!            the attempt ends (exit, timeout, cancel, runner stop) ─► SIGKILL to the group
//! ```
//!
//! Invariants:
//! - No process of the program's group outlives its attempt: when the attempt ends for any
//!   reason — the program exited, the attempt timed out, the job was cancelled, `weir run`
//!   stops hard (the attempt's future is dropped) — the whole group gets `SIGKILL`
//!   ([`Group`]'s `Drop`). A background process the program left behind dies with it; one
//!   that left the group (`setsid`) is the program's business.
//! - Every child is reaped: waited on when it exits, or reaped by tokio (`kill_on_drop`) when
//!   the attempt is dropped. No zombies pile up in a long-running `weir run`.
//! - Completion is not transactional with what the program did: a crash between its exit and
//!   the recorded completion runs it again. Programs should be idempotent on the job's `id`.
//!
//! At start-up the program is resolved (through `PATH` when its name has no `/`; a relative
//! path from `dir`) and must be an executable file, and `dir` must be a directory, so a typo
//! stops `weir run` naming the entry and its line instead of failing every job.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rustix::process::{Pid, Signal, kill_process_group};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Child;
use weir_core::WorkerConfig;

use super::{Common, Declared, DeclaredType, job_document, refused};
use crate::Result;
use crate::worker::{ErasedWorker, JobContext, JobError};

/// Bytes of stdout kept: enough for the answer on its last line.
const STDOUT_KEEP: usize = 4096;
/// Bytes and lines of stderr quoted in a failed attempt's error.
const STDERR_KEEP: usize = 2048;
const STDERR_LINES: usize = 20;
/// After the program exits (and its group is killed), how long reading its output may go on:
/// a process that left the group can hold the pipes open for ever.
const LINGER: Duration = Duration::from_secs(1);

pub(super) struct CommandWorker {
    /// `command[0]`, resolved at start-up.
    program: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    dir: Option<PathBuf>,
    common: Common,
}

pub(super) async fn build(entry: &WorkerConfig, common: Common) -> Result<Arc<dyn ErasedWorker>> {
    let dir = match &entry.dir {
        Some(d) => {
            let path =
                std::path::absolute(d).map_err(|e| refused(entry, format!("dir {d:?}: {e}")))?;
            match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() => Some(path),
                Ok(_) => return Err(refused(entry, format!("dir {d:?} is not a directory"))),
                Err(e) => {
                    return Err(refused(entry, format!("dir {d:?} cannot be used: {e}")));
                }
            }
        }
        None => None,
    };
    let (name, args) = entry.command.split_first().expect("validated: command is not empty");
    let program = resolve(name, dir.as_deref(), entry.env.get("PATH").map(String::as_str))
        .map_err(|problem| refused(entry, problem))?;
    Ok(Arc::new(Declared(CommandWorker {
        program,
        args: args.to_vec(),
        env: entry.env.clone(),
        dir,
        common,
    })))
}

/// The program `name` names: a path (relative ones from `dir`, else from `weir run`'s working
/// directory), or a name looked up in `PATH` (the entry's own `env.PATH` when it sets one).
fn resolve(
    name: &str,
    dir: Option<&Path>,
    path_var: Option<&str>,
) -> std::result::Result<PathBuf, String> {
    if name.contains('/') {
        let path = match (Path::new(name), dir) {
            (p, Some(dir)) if p.is_relative() => dir.join(p),
            (p, _) => std::path::absolute(p).map_err(|e| format!("command[0] {name:?}: {e}"))?,
        };
        return match executable(&path) {
            Ok(()) => Ok(path),
            Err(why) => Err(format!("command[0] {name:?} ({}) {why}", path.display())),
        };
    }
    let search = match path_var {
        Some(p) => p.into(),
        None => std::env::var_os("PATH").unwrap_or_default(),
    };
    for d in std::env::split_paths(&search).filter(|d| !d.as_os_str().is_empty()) {
        let candidate = d.join(name);
        if executable(&candidate).is_ok() {
            return std::path::absolute(&candidate)
                .map_err(|e| format!("command[0] {name:?}: {e}"));
        }
    }
    Err(format!(
        "command[0] {name:?} is not an executable in PATH ({}); install it or give its path",
        search.to_string_lossy()
    ))
}

fn executable(path: &Path) -> std::result::Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Err("is not a file".into()),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => {
            Err("is not executable (chmod +x it)".into())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(format!("cannot be run: {e}")),
    }
}

impl DeclaredType for CommandWorker {
    fn attempt(
        &self,
        ctx: JobContext,
        args: Value,
    ) -> BoxFuture<'_, std::result::Result<(), JobError>> {
        Box::pin(async move {
            let document = job_document(&ctx, &args);
            let mut command = tokio::process::Command::new(&self.program);
            command
                .args(&self.args)
                .envs(&self.env)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0)
                .kill_on_drop(true);
            if let Some(dir) = &self.dir {
                command.current_dir(dir);
            }
            let child = command.spawn().map_err(|e| {
                JobError::retry(format!("{} could not be started: {e}", self.program.display()))
            })?;
            let mut group = Group::new(child);
            let stdin = group.child.stdin.take();
            let stdout = group.child.stdout.take();
            let stderr = group.child.stderr.take();
            let mut out = Tail::new(STDOUT_KEEP);
            let mut err = Tail::new(STDERR_KEEP);
            let status = {
                let io = async {
                    tokio::join!(feed(stdin, document), out.fill(stdout), err.fill(stderr))
                };
                tokio::pin!(io);
                let (status, io_done) = tokio::select! {
                    status = group.child.wait() => (status, false),
                    _ = &mut io => (group.child.wait().await, true),
                };
                // What the program left running in its group would hold the pipes open.
                group.kill();
                if !io_done {
                    let _ = tokio::time::timeout(LINGER, io).await;
                }
                status
            };
            let status = status.map_err(|e| {
                JobError::retry(format!("waiting for {}: {e}", self.program.display()))
            })?;
            if status.success() {
                return Ok(());
            }
            if let Some(answer) = answer(&out.text()) {
                return Err(answer);
            }
            Err(JobError::retry(failure(status, &err.text())))
        })
    }

    fn common(&self) -> &Common {
        &self.common
    }
}

/// The child and its process group (whose id is the child's pid, `process_group(0)`): the
/// group is killed when this is dropped, before the child is (reaped by tokio, `kill_on_drop`).
struct Group {
    child: Child,
    pgid: Option<Pid>,
}

impl Group {
    fn new(child: Child) -> Self {
        let pgid = child.id().and_then(|id| i32::try_from(id).ok()).and_then(Pid::from_raw);
        Self { child, pgid }
    }

    /// `SIGKILL` to every process of the group; none left is fine.
    fn kill(&self) {
        if let Some(pgid) = self.pgid {
            let _ = kill_process_group(pgid, Signal::KILL);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes the job document and closes stdin. A program that does not read it (the pipe
/// breaks) is fine.
async fn feed(stdin: Option<tokio::process::ChildStdin>, document: String) {
    if let Some(mut stdin) = stdin {
        let _ = stdin.write_all(document.as_bytes()).await;
    }
}

/// The last bytes of an output stream.
struct Tail {
    keep: usize,
    bytes: Vec<u8>,
    cut: bool,
}

impl Tail {
    fn new(keep: usize) -> Self {
        Self { keep, bytes: Vec::new(), cut: false }
    }

    /// Reads to the end, keeping the last `keep` bytes (trimming as it goes).
    async fn fill(&mut self, from: Option<impl AsyncRead + Unpin>) {
        let Some(mut from) = from else { return };
        let mut chunk = [0u8; 8192];
        loop {
            match from.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    self.bytes.extend_from_slice(&chunk[..n]);
                    if self.bytes.len() > 2 * self.keep {
                        self.bytes.drain(..self.bytes.len() - self.keep);
                        self.cut = true;
                    }
                }
            }
        }
    }

    fn text(&self) -> String {
        let start = self.bytes.len().saturating_sub(self.keep);
        String::from_utf8_lossy(&self.bytes[start..]).into_owned()
    }
}

/// The program's answer: its last non-empty stdout line, when that is a JSON object with
/// `snooze` (a duration as `"30s"`, or seconds) or `discard` (the reason).
fn answer(stdout: &str) -> Option<JobError> {
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty())?;
    let Ok(Value::Object(answer)) = serde_json::from_str::<Value>(line.trim()) else {
        return None;
    };
    if let Some(reason) = answer.get("discard") {
        let reason = match reason {
            Value::String(s) if !s.is_empty() => s.clone(),
            Value::String(_) | Value::Null => "the program discarded the job".into(),
            other => other.to_string(),
        };
        return Some(JobError::discard(reason));
    }
    let snooze = answer.get("snooze")?;
    let after = match snooze {
        Value::String(s) => weir_core::parse_duration(s).ok(),
        Value::Number(n) => n.as_f64().and_then(|s| Duration::try_from_secs_f64(s).ok()),
        _ => None,
    };
    Some(match after {
        Some(after) => JobError::snooze(after),
        None => JobError::retry(format!(
            "the program answered {line:?}, but `snooze` must be a duration such as \"30s\" or \
             a number of seconds"
        )),
    })
}

/// A failed attempt's error: how the program ended and the end of its stderr.
fn failure(status: ExitStatus, stderr: &str) -> String {
    let ended = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}{}", signal_name(signal)),
        (None, None) => format!("ended: {status}"),
    };
    let lines: Vec<&str> = stderr.lines().collect();
    let last = &lines[lines.len().saturating_sub(STDERR_LINES)..];
    if last.iter().all(|l| l.trim().is_empty()) {
        format!("the program {ended} (nothing on stderr)")
    } else {
        format!("the program {ended}; stderr (last lines):\n{}", last.join("\n"))
    }
}

fn signal_name(signal: i32) -> &'static str {
    match Signal::from_named_raw(signal) {
        Some(Signal::KILL) => " (SIGKILL)",
        Some(Signal::TERM) => " (SIGTERM)",
        Some(Signal::INT) => " (SIGINT)",
        Some(Signal::SEGV) => " (SIGSEGV)",
        Some(Signal::ABORT) => " (SIGABRT)",
        Some(Signal::PIPE) => " (SIGPIPE)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_from_the_last_line() {
        let kind = |e: Option<JobError>| e.map(|e| e.to_string());
        assert_eq!(
            kind(answer("working\n{\"snooze\": \"30s\"}\n")),
            Some("snoozed for 30s".into())
        );
        assert_eq!(kind(answer("{\"snooze\": 2}")), Some("snoozed for 2s".into()));
        assert_eq!(
            kind(answer("{\"discard\": \"no such user\"}\n\n")),
            Some("discarded: no such user".into())
        );
        // Only the last line answers; anything else is a plain failure.
        assert_eq!(kind(answer("{\"discard\": \"x\"}\nlater output")), None);
        assert_eq!(kind(answer("")), None);
        assert_eq!(kind(answer("[1, 2]")), None);
        assert!(kind(answer("{\"snooze\": \"soon\"}")).unwrap().contains("must be a duration"));
    }

    #[test]
    fn failures_quote_the_end_of_stderr() {
        let status = ExitStatus::from_raw(3 << 8);
        let stderr: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        let error = failure(status, &stderr);
        assert!(error.starts_with("the program exited with code 3; stderr"), "{error}");
        assert!(
            error.contains("line 30") && error.contains("line 11") && !error.contains("line 10\n")
        );
        assert_eq!(
            failure(ExitStatus::from_raw(9), ""),
            "the program was killed by signal 9 (SIGKILL) (nothing on stderr)"
        );
    }

    #[test]
    fn programs_resolve_through_path_or_from_dir() {
        let sh = resolve("sh", None, None).unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        let err = resolve("no-such-program-here", None, Some("/nonexistent")).unwrap_err();
        assert!(err.contains("not an executable in PATH (/nonexistent)"), "{err}");
        let err = resolve("./missing.sh", Some(Path::new("/tmp")), None).unwrap_err();
        assert!(err.contains("/tmp/./missing.sh"), "{err}");
        let err = resolve("/etc/passwd", None, None).unwrap_err();
        assert!(err.contains("is not executable"), "{err}");
    }
}
