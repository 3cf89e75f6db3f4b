//! `type = "command"` workers in real `weir run` processes, running real programs (shell
//! scripts written into a temp directory): a job completes, fails with its exit code and
//! stderr and is retried, is discarded or snoozed by the program's last line on stdout; an
//! attempt that times out or is cancelled kills the program's whole process group (a
//! background grandchild included) and reaps it; a program that is not there is refused at
//! start-up naming the entry and its line.

mod support;
#[path = "support/workers.rs"]
mod workers;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use workers::{BASE, Workers, line_of};

/// Writes an executable `#!/bin/sh` script `name` into `dir`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A `[[workers]]` entry of type command running `program` from `dir`, retried after 100 ms.
fn entry(kind: &str, program: &Path, extra: &str) -> String {
    format!(
        "\n[[workers]]\nkind = {kind:?}\ntype = \"command\"\ncommand = [{:?}]\n\
         backoff = {{ first = \"100ms\", max = \"100ms\" }}\n{extra}\n",
        program.to_str().unwrap()
    )
}

/// Whether process `pid` is gone: no `/proc` entry (reaped), or, with `zombie_ok`, a zombie
/// (a grandchild is its new parent's to reap, not weir's).
fn gone(pid: u32, zombie_ok: bool) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").split_whitespace().next();
            zombie_ok && matches!(state, Some("Z" | "X"))
        }
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

async fn wait_until(what: &str, within: Duration, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn complete_fail_retry_discard_snooze() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let work = d.join("work");
    std::fs::create_dir(&work).unwrap();
    // Completes: keeps the document it was given, its environment and working directory.
    let complete = script(
        d,
        "complete.sh",
        r#"cat > "$OUT/document.json"
echo "$GREETING" > "$OUT/env"
pwd > "$OUT/pwd"
# Left behind in the group: killed when the attempt ends, it must not hold the attempt.
sleep 1000 &
echo done"#,
    );
    // Fails its first attempt (code 3, two lines on stderr), completes the second.
    let flaky = script(
        d,
        "flaky.sh",
        r#"n=$(cat "$OUT/flaky.count" 2>/dev/null || echo 0)
n=$((n + 1)); echo $n > "$OUT/flaky.count"
if [ $n -lt 2 ]; then
  echo "connecting to smtp.example.com" >&2
  echo "connection refused" >&2
  exit 3
fi"#,
    );
    let discard = script(
        d,
        "discard.sh",
        r#"echo "looking the user up"
echo '{"discard": "no such user"}'
exit 1"#,
    );
    // Snoozes for 1 s the first time, completes the next.
    let snooze = script(
        d,
        "snooze.sh",
        r#"if [ ! -f "$OUT/snoozed" ]; then
  touch "$OUT/snoozed"
  echo '{"snooze": "1s"}'
  exit 75
fi"#,
    );
    let out = d.to_str().unwrap();
    let env = format!("env = {{ OUT = {out:?}, GREETING = \"bonjour\" }}");
    let config = [
        entry("complete", &complete, &format!("{env}\ndir = {:?}", work.to_str().unwrap())),
        entry("flaky", &flaky, &env),
        entry("discard", &discard, &env),
        entry("snooze", &snooze, &env),
    ]
    .concat();
    let mut w = Workers::new("workers_command", &config).await;
    let _run = w.run();

    let done = w.enqueue("complete", json!({"to": "a@example.com"}), 3).await;
    let job = w.wait_state(done, "completed").await;
    assert_eq!((job.attempt, job.errors.as_str()), (1, "[]"));
    let document: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("document.json")).unwrap()).unwrap();
    assert_eq!(document["id"], json!(done));
    assert_eq!(document["kind"], "complete");
    assert_eq!(document["queue"], "default");
    assert_eq!(document["args"], json!({"to": "a@example.com"}));
    assert_eq!(
        (document["attempt"].clone(), document["max_attempts"].clone()),
        (json!(1), json!(3))
    );
    assert!(document["enqueued_at"].is_string(), "{document}");
    assert_eq!(std::fs::read_to_string(d.join("env")).unwrap().trim(), "bonjour");
    assert_eq!(
        Path::new(std::fs::read_to_string(d.join("pwd")).unwrap().trim()),
        work.canonicalize().unwrap()
    );

    let flaky_id = w.enqueue("flaky", json!({}), 3).await;
    let job = w.wait_state(flaky_id, "completed").await;
    assert_eq!(job.attempt, 2, "{job:?}");
    let errors: serde_json::Value = serde_json::from_str(&job.errors).unwrap();
    let error = errors[0]["error"].as_str().unwrap();
    assert!(error.contains("exited with code 3"), "{error}");
    assert!(error.contains("connecting to smtp.example.com\nconnection refused"), "{error}");

    let discarded = w.enqueue("discard", json!({}), 5).await;
    let job = w.wait_state(discarded, "discarded").await;
    assert_eq!(job.attempt, 1, "discarded at once, attempts left or not: {job:?}");
    assert!(job.errors.contains("no such user"), "{job:?}");

    let snoozed = w.enqueue("snooze", json!({}), 1).await;
    let started = Instant::now();
    let job = w.wait_state(snoozed, "completed").await;
    assert!(started.elapsed() >= Duration::from_secs(1), "ran again before the snooze ended");
    // A snooze spends no attempt and records no error: one attempt was enough.
    assert_eq!((job.max_attempts, job.errors.as_str()), (2, "[]"), "{job:?}");
}

#[tokio::test]
async fn timeout_and_cancel_kill_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Records its pid and its background grandchild's, then waits for ever.
    let hang = script(
        d,
        "hang.sh",
        r#"mkdir -p "$OUT/$KIND"
echo $$ > "$OUT/$KIND/pid"
sleep 1000 &
echo $! > "$OUT/$KIND/grandchild"
wait"#,
    );
    let out = d.to_str().unwrap();
    let config = [
        entry(
            "hang",
            &hang,
            &format!("env = {{ OUT = {out:?}, KIND = \"hang\" }}\ntimeout = \"500ms\""),
        ),
        entry(
            "hang_cancel",
            &hang,
            &format!("env = {{ OUT = {out:?}, KIND = \"hang_cancel\" }}\ntimeout = \"1h\""),
        ),
    ]
    .concat();
    let mut w = Workers::new("workers_command_timeout", &config).await;
    let _run = w.run();

    // Timed out: the attempt fails (its last: discarded), the program and grandchild die.
    let id = w.enqueue("hang", json!({}), 1).await;
    let job = w.wait_state(id, "discarded").await;
    assert!(job.errors.contains("timed out after 500ms"), "{job:?}");
    let pid = read_pid(&d.join("hang/pid")).expect("the program ran");
    let grandchild = read_pid(&d.join("hang/grandchild")).expect("the program ran");
    wait_until("the program to be killed and reaped", Duration::from_secs(5), || gone(pid, false))
        .await;
    wait_until("the grandchild to be killed", Duration::from_secs(5), || gone(grandchild, true))
        .await;

    // Cancelled while running: the same.
    let id = w.enqueue("hang_cancel", json!({}), 1).await;
    wait_until("the program to start", Duration::from_secs(30), || {
        read_pid(&d.join("hang_cancel/grandchild")).is_some()
    })
    .await;
    let pid = read_pid(&d.join("hang_cancel/pid")).unwrap();
    let grandchild = read_pid(&d.join("hang_cancel/grandchild")).unwrap();
    assert!(!gone(pid, false) && !gone(grandchild, false), "the program runs");
    let (ok, printed) = support::output(support::weir(&w.db, &["jobs", "cancel", &id.to_string()]));
    assert!(ok, "{printed}");
    wait_until("the cancelled program to be killed and reaped", Duration::from_secs(10), || {
        gone(pid, false)
    })
    .await;
    wait_until("the cancelled grandchild to be killed", Duration::from_secs(5), || {
        gone(grandchild, true)
    })
    .await;
    assert_eq!(w.job(id).await.state, "cancelled");
}

#[tokio::test]
async fn a_missing_program_or_dir_is_refused_at_start_up() {
    let w = Workers::new("workers_command_refused", "").await;
    let missing = "\n[[workers]]\nkind = \"mail\"\ntype = \"command\"\n\
                   command = [\"no-such-mailer-program\", \"--send\"]\n";
    let printed = w.refused(missing);
    let line = line_of(&format!("{BASE}{missing}"), "mail");
    assert!(printed.contains(&format!("[[workers]] \"mail\" (line {line})")), "{printed}");
    assert!(
        printed.contains("\"no-such-mailer-program\" is not an executable in PATH"),
        "{printed}"
    );

    let no_dir = "\n[[workers]]\nkind = \"report\"\ntype = \"command\"\ncommand = [\"sh\"]\n\
                  dir = \"/nonexistent/reports\"\n";
    let printed = w.refused(no_dir);
    let line = line_of(&format!("{BASE}{no_dir}"), "report");
    assert!(printed.contains(&format!("[[workers]] \"report\" (line {line})")), "{printed}");
    assert!(printed.contains("dir \"/nonexistent/reports\" cannot be used"), "{printed}");

    let not_executable = w.path("plain.txt");
    std::fs::write(&not_executable, "not a program").unwrap();
    let plain = format!(
        "\n[[workers]]\nkind = \"plain\"\ntype = \"command\"\ncommand = [{:?}]\n",
        not_executable.to_str().unwrap()
    );
    let printed = w.refused(&plain);
    assert!(printed.contains("is not executable (chmod +x it)"), "{printed}");
}
