//! `weir webhooks secret` and `weir webhooks verify`, through the real binary: a secret it
//! makes signs a body (with the sink's own `Secrets::sign`) that `verify` accepts, from a file
//! and from stdin; a tampered body, another secret, an old timestamp and a missing variable
//! are refused with exit code 1 and the reason — and the secret is never printed.

use std::io::Write;
use std::process::{Command, Stdio};

use weir_sinks::Secrets;

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// Runs `weir webhooks <args>` with `env` and `stdin`: (exit code, stdout, stderr).
fn webhooks(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> (i32, String, String) {
    let mut cmd = Command::new(WEIR);
    cmd.arg("webhooks")
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("WEIR_CONFIG")
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_secret_it_makes_verifies_what_it_signed_and_refuses_a_tampered_body() {
    let (code, out, _) = webhooks(&["secret"], &[], b"");
    assert_eq!(code, 0);
    let secret = out.trim().to_string();
    let secrets = Secrets::parse(&secret).expect("a valid whsec_ secret");
    assert_eq!(secrets.len(), 1);
    let (_, again, _) = webhooks(&["secret"], &[], b"");
    assert_ne!(again.trim(), secret, "a new one each time");

    let body = br#"{"id":"orders:7","position":7,"event":{"note":"na\u00efve"}}"#;
    let ts = chrono::Utc::now().timestamp();
    let sig = secrets.sign("orders:7", ts, body);
    let ts_text = ts.to_string();
    let env = [("MY_HOOK_SECRET", secret.as_str())];
    let args = |extra: &[&'static str]| {
        let mut a = vec![
            "verify",
            "--secret-env",
            "MY_HOOK_SECRET",
            "--id",
            "orders:7",
            "--timestamp",
            ts_text.as_str(),
            "--signature",
            sig.as_str(),
        ];
        a.extend_from_slice(extra);
        a
    };

    // From stdin.
    let (code, out, err) = webhooks(&args(&[]), &env, body);
    assert_eq!((code, out.trim()), (0, "valid (secret 1)"), "{err}");

    // From a file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body.json");
    std::fs::write(&file, body).unwrap();
    let mut a = args(&[]);
    a.extend(["--body", file.to_str().unwrap()]);
    let (code, out, err) = webhooks(&a, &env, b"");
    assert_eq!((code, out.trim()), (0, "valid (secret 1)"), "{err}");

    // One byte changed.
    let mut tampered = body.to_vec();
    tampered[10] = b'8';
    let (code, out, err) = webhooks(&args(&[]), &env, &tampered);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("no signature matches the secret"), "{err}");
    assert!(out.is_empty());

    // Another secret; during a rotation either of two verifies, and says which.
    let other = Secrets::generate();
    let (code, _, err) = webhooks(&args(&[]), &[("MY_HOOK_SECRET", &other)], body);
    assert_eq!(code, 1, "{err}");
    let both = format!("{other} {secret}");
    let (code, out, _) = webhooks(&args(&[]), &[("MY_HOOK_SECRET", &both)], body);
    assert_eq!((code, out.trim()), (0, "valid (secret 2)"));

    for (_, out, err) in [
        webhooks(&args(&[]), &env, body),
        webhooks(&args(&[]), &env, &tampered),
        webhooks(&args(&[]), &[("MY_HOOK_SECRET", &both)], body),
    ] {
        assert!(!out.contains(&secret) && !err.contains(&secret), "never printed");
    }
}

#[test]
fn an_old_timestamp_or_a_missing_secret_is_refused_with_the_reason() {
    let secret = Secrets::generate();
    let secrets = Secrets::parse(&secret).unwrap();
    let old = chrono::Utc::now().timestamp() - 3600;
    let sig = secrets.sign("x:1", old, b"{}");
    let old = old.to_string();
    let args = ["verify", "--secret-env", "S", "--id", "x:1", "--timestamp", &old, "--signature"];
    let mut a = args.to_vec();
    a.push(&sig);

    let (code, _, err) = webhooks(&a, &[("S", &secret)], b"{}");
    assert_eq!(code, 1);
    assert!(err.contains("webhook-timestamp") && err.contains("replay"), "{err}");
    // A captured request checked later: the signature alone.
    a.push("--ignore-timestamp");
    let (code, out, err) = webhooks(&a, &[("S", &secret)], b"{}");
    assert_eq!((code, out.trim()), (0, "valid (secret 1)"), "{err}");

    let (code, _, err) = webhooks(&a, &[], b"{}");
    assert_eq!(code, 1);
    assert!(err.contains("environment variable S") && err.contains("not set"), "{err}");
    let (code, _, err) = webhooks(&a, &[("S", "hunter2")], b"{}");
    assert_eq!(code, 1);
    assert!(err.contains("whsec_") && !err.contains("hunter2"), "{err}");
}
