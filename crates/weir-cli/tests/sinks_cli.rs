//! The surfaces of webhook and NATS sinks, through the real `weir` binary on a real PostgreSQL
//! (the binary, so that each case sets the environment it needs): `weir subscriptions
//! create|update` with `--webhook`, `--nats` and `--sink`, what `show`, `list` and `status`
//! print (deliveries, the last error, a sink error, a stop by the receiver; never a secret),
//! a URL with credentials refused (they would be stored and shown), bad flags refused with one line naming the fix, and `weir
//! doctor` on sinks: a secret's variable missing (a warning for a subscription kept in the
//! database, a failure for a `[[subscriptions]]` entry), a receiver that does or does not
//! accept a TCP connection, and what the last delivering process recorded.
//!
//! No engine delivers here: what a sink delivered is written into its tables the way the
//! engine writes it, and only its presentation is tested.

use std::process::Command;

use sqlx::PgPool;
use weir_testkit::TestDatabase;

mod support;
use support::*;

/// A valid Standard Webhooks secret (24 bytes, their documentation's example).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Variables these tests leave unset, so that their absence is what is tested.
const UNSET: &[&str] =
    &["SINKS_CLI_HOOK_SECRET", "SINKS_CLI_NATS_TOKEN", "DOCTOR_HOOK_SECRET", "DOCTOR_TOML_SECRET"];

fn weir(db: &TestDatabase<'_>, args: &[&str]) -> Command {
    let mut cmd = Command::new(WEIR);
    cmd.args(args)
        .env("DATABASE_URL", db.url())
        .env("WEIR_SOURCE_SLOT", db.name())
        .env_remove("WEIR_FAULT")
        .env_remove("WEIR_CONFIG")
        .current_dir(std::env::temp_dir());
    for v in UNSET {
        cmd.env_remove(v);
    }
    cmd
}

/// `weir subscriptions <args>`, which must succeed; what it printed.
fn subs(db: &TestDatabase<'_>, args: &[&str]) -> String {
    let mut all = vec!["subscriptions"];
    all.extend_from_slice(args);
    let (ok, out) = output(weir(db, &all));
    assert!(ok, "weir {all:?} failed: {out}");
    out
}

/// `weir subscriptions <args>`, which must fail; what it printed.
fn refused(db: &TestDatabase<'_>, args: &[&str]) -> String {
    let mut all = vec!["subscriptions"];
    all.extend_from_slice(args);
    let (ok, out) = output(weir(db, &all));
    assert!(!ok, "weir {all:?} should fail: {out}");
    out
}

async fn sink_of(pool: &PgPool, name: &str) -> (String, Option<serde_json::Value>) {
    sqlx::query_as("select sink, sink_config from weir.subscriptions where name = $1")
        .bind(name)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn sinks_from_flags_shown_in_words_without_secrets() {
    let (db, pool) = setup("sinks_cli").await;

    // --webhook, its secret's variable not set here: created, with a warning.
    let out = subs(
        &db,
        &[
            "create",
            "hooks",
            "--type",
            "stream",
            "--selector",
            "order-*",
            "--webhook",
            "https://example.com/hooks",
            "--secret-env",
            "SINKS_CLI_HOOK_SECRET",
            "--timeout",
            "5s",
            "--batch-size",
            "10",
            "--linger",
            "50ms",
        ],
    );
    assert!(out.contains("created subscription hooks (1 emitters, sink webhook)"), "{out}");
    assert!(
        out.contains("warning: the environment variable SINKS_CLI_HOOK_SECRET")
            && out.contains("make sure the processes that run weir"),
        "{out}"
    );
    let (kind, config) = sink_of(&pool, "hooks").await;
    assert_eq!(kind, "webhook");
    assert_eq!(
        config.unwrap(),
        serde_json::json!({"url": "https://example.com/hooks",
                           "secret_env": "SINKS_CLI_HOOK_SECRET", "timeout": "5s",
                           "batch_size": 10, "linger": "50ms"})
    );

    // The variable set (to a valid secret): no warning.
    let mut cmd = weir(
        &db,
        &[
            "subscriptions",
            "create",
            "signed",
            "--type",
            "stream",
            "--selector",
            "x",
            "--webhook",
            "http://127.0.0.1:9/h",
            "--secret-env",
            "SINKS_CLI_SET_SECRET",
        ],
    );
    cmd.env("SINKS_CLI_SET_SECRET", SECRET);
    let (ok, out) = output(cmd);
    assert!(ok && !out.contains("warning"), "{out}");

    // --nats with its flags; the token's variable is not set here.
    let out = subs(
        &db,
        &[
            "create",
            "rows",
            "--type",
            "entity",
            "--selector",
            "t",
            "--nats",
            "--nats-url",
            "nats://127.0.0.1:4222",
            "--subject",
            "rows.{entity}.{kind}",
            "--stream",
            "ROWS",
            "--create-stream",
            "--max-in-flight",
            "16",
            "--token-env",
            "SINKS_CLI_NATS_TOKEN",
        ],
    );
    assert!(out.contains("sink nats") && out.contains("SINKS_CLI_NATS_TOKEN"), "{out}");
    let (kind, config) = sink_of(&pool, "rows").await;
    let config = config.unwrap();
    assert_eq!(kind, "nats");
    assert_eq!(
        (&config["subject"], &config["stream"], &config["create_stream"]),
        (&"rows.{entity}.{kind}".into(), &"ROWS".into(), &true.into())
    );
    assert_eq!(config["max_in_flight"], 16);
    assert_eq!(config["token_env"], "SINKS_CLI_NATS_TOKEN");

    // --sink: the JSON table, or a word.
    subs(
        &db,
        &[
            "create",
            "raw",
            "--type",
            "stream",
            "--selector",
            "x",
            "--sink",
            r#"{"type": "nats", "subject": "raw.{type}", "retention": "workqueue"}"#,
        ],
    );
    assert_eq!(sink_of(&pool, "raw").await.1.unwrap()["retention"], "workqueue");
    subs(&db, &["create", "plain", "--type", "stream", "--selector", "x", "--sink", "client"]);
    assert_eq!(sink_of(&pool, "plain").await, ("client".into(), None));

    // show: the sink in words, deliveries at zero, no password.
    let out = subs(&db, &["show", "hooks"]);
    assert!(
        out.contains(
            "sink        webhook POST https://example.com/hooks (signed with \
             $SINKS_CLI_HOOK_SECRET; timeout 5s, batches of up to 10 within 50ms)"
        ),
        "{out}"
    );
    assert!(out.contains("delivered   0 events\n"), "{out}");
    assert!(out.contains("retries     0, failed 0"), "{out}");
    assert!(!out.contains("pw@") && !out.contains("sink error"), "{out}");
    let out = subs(&db, &["show", "rows"]);
    assert!(
        out.contains(
            "nats nats://127.0.0.1:4222 subject rows.{entity}.{kind} into stream ROWS \
             (created if missing) (16 in flight; token in $SINKS_CLI_NATS_TOKEN)"
        ),
        "{out}"
    );
    assert!(!out.contains("hunter2"), "{out}");
    let out = subs(&db, &["show", "plain"]);
    assert!(out.contains("client (SSE / WebSocket clients") && !out.contains("delivered"), "{out}");

    // What the engine records, as it records it: 12 delivered, a retried failure, a process
    // that could not build the sink, and a stop by the receiver (410 Gone).
    sqlx::raw_sql(
        "insert into weir.sink_deliveries
             (subscription, lane, delivered, last_position, last_delivered_at)
         values ('hooks', 0, 12, 345, now());
         insert into weir.consumer_failures (consumer, lane, position, attempt, error, outcome)
         values ('hooks', 0, 346, 1, 'HTTP 503 from https://example.com/hooks', 'retry');
         update weir.subscriptions set sink_error = 'the environment variable \
             SINKS_CLI_HOOK_SECRET (the webhook''s secret_env) is not set in this process',
             sink_error_at = now() where name = 'hooks';
         update weir.consumers set state = 'stopped',
             stopped_reason = 'the receiver answered 410 Gone' where name = 'hooks';",
    )
    .execute(&pool)
    .await
    .unwrap();
    let out = subs(&db, &["show", "hooks"]);
    assert!(out.contains("subscription hooks — stopped"), "{out}");
    assert!(out.contains("delivered   12 events, the last at position 345, "), "{out}");
    assert!(out.contains("retries     1, failed 0"), "{out}");
    assert!(out.contains("last error  HTTP 503 from https://example.com/hooks — "), "{out}");
    assert!(out.contains("sink error  the environment variable SINKS_CLI_HOOK_SECRET"), "{out}");
    assert!(
        out.contains("stopped by its sink: the receiver answered 410 Gone")
            && out.contains("weir subscriptions start hooks"),
        "{out}"
    );
    assert!(out.contains("emitter 0"), "the emitters' lines stay: {out}");
    let json: serde_json::Value =
        serde_json::from_str(&subs(&db, &["show", "hooks", "--json"])).unwrap();
    assert_eq!(json["deliveries"]["delivered"], 12);
    assert_eq!(json["stopped_reason"], "the receiver answered 410 Gone");

    // list: the sink's kind on each line.
    let out = subs(&db, &["list"]);
    let line = |name: &str| {
        out.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_default().to_string()
    };
    assert!(line("hooks").contains(" webhook ") && line("hooks").contains("cannot deliver"));
    assert!(line("rows").contains(" nats "), "{out}");
    assert!(line("plain").contains(" client "), "{out}");

    // status: one line per sink.
    let (ok, out) = output(weir(&db, &["status"]));
    assert!(ok, "{out}");
    assert!(out.contains("subscription hooks — stopped by its sink: the receiver answered 410"));
    assert!(
        out.contains("  sink webhook: 12 delivered, the last ")
            && out.contains("; lag 0 events; last error ")
            && out.contains(": HTTP 503 from https://example.com/hooks; cannot deliver: "),
        "{out}"
    );
    assert!(out.contains("  sink nats: 0 delivered; lag 0 events\n"), "{out}");

    // update: the sink replaced as a whole.
    subs(&db, &["update", "plain", "--nats", "--subject", "plain.{kind}"]);
    let (kind, config) = sink_of(&pool, "plain").await;
    assert_eq!((kind.as_str(), &config.unwrap()["subject"]), ("nats", &"plain.{kind}".into()));
    let out = subs(
        &db,
        &[
            "update",
            "raw",
            "--webhook",
            "https://example.com/raw",
            "--secret-env",
            "SINKS_CLI_HOOK_SECRET",
        ],
    );
    assert!(out.contains("updated subscription raw") && out.contains("warning:"), "{out}");
    assert_eq!(sink_of(&pool, "raw").await.0, "webhook");
    subs(&db, &["update", "raw", "--sink", "client"]);
    assert_eq!(sink_of(&pool, "raw").await, ("client".into(), None));

    // Bad input: one clear line naming the fix (clap's own errors: the first line), nothing
    // stored or changed.
    let create = |rest: &[&'static str]| {
        let mut a = vec!["create", "bad", "--type", "stream", "--selector", "x"];
        a.extend_from_slice(rest);
        a
    };
    let ours: Vec<(Vec<&str>, &str)> = vec![
        (
            create(&["--webhook", "ftp://x.io/h", "--secret-env", "S"]),
            "the scheme is `ftp`; a webhook is posted over http:// or https://",
        ),
        (create(&["--webhook", "x.io/h", "--secret-env", "S"]), "write it as https://host/path"),
        (
            create(&["--webhook", "https://x.io", "--secret-env", SECRET]),
            "it names the variable that holds the secret",
        ),
        (
            create(&["--webhook", "https://x.io", "--secret-env", "S", "--batch-size", "0"]),
            "batch_size 0 is out of range; use 1 to 1000",
        ),
        (
            create(&["--nats", "--subject", "weir.{nope}"]),
            "nats subject `weir.{nope}`: `{nope}` is not a token; use {subscription}",
        ),
        (create(&["--nats", "--nats-url", "http://n:4222"]), "use nats:// (or tls://)"),
        (
            create(&["--webhook", "https://me:hunter2@x.io/h", "--secret-env", "S"]),
            "webhook url `https://***@x.io/h` holds credentials, which would be stored and shown",
        ),
        (
            create(&["--nats", "--nats-url", "nats://user:hunter2@n:4222"]),
            "nats url `nats://***@n:4222` holds a password, which would be stored and shown",
        ),
        (create(&["--nats", "--max-in-flight", "0"]), "max_in_flight 0 is out of range"),
        (
            create(&[
                "--sink",
                r#"{"type": "webhook", "url": "https://x.io", "secret_env": "S", "secret": "whsec_x"}"#,
            ]),
            "--sink: webhook sink: unknown field `secret`",
        ),
        (create(&["--sink", "kafka"]), "`kafka` is not a sink; use client, rust"),
        (create(&["--sink", "webhook"]), "a webhook sink needs its settings"),
        (vec!["update", "rows", "--nats", "--stream", "a.b"], "a JetStream stream name is"),
        (vec!["update", "nope", "--nats"], "no subscription named `nope`"),
    ];
    for (args, says) in &ours {
        let out = refused(&db, args);
        assert!(out.contains(says), "{args:?}: `{out}` should say `{says}`");
        assert_eq!(out.trim().lines().count(), 1, "{args:?}: one line, got `{out}`");
        assert!(
            !out.contains("whsec_x") && !out.contains(SECRET) && !out.contains("hunter2"),
            "{args:?}: a secret was printed: {out}"
        );
    }
    let claps: Vec<(Vec<&str>, &str)> = vec![
        (create(&["--webhook", "https://x.io"]), "--secret-env <NAME>"),
        (
            create(&["--webhook", "https://x.io", "--secret-env", "S", "--nats"]),
            "the argument '--webhook <URL>' cannot be used with '--nats'",
        ),
        (create(&["--nats", "--sink", "client"]), "cannot be used with"),
        (create(&["--subject", "a.b"]), "--nats"),
        (create(&["--nats", "--timeout", "5s"]), "--webhook <URL>"),
        (
            create(&["--webhook", "https://x.io", "--secret-env", "S", "--timeout", "fast"]),
            "invalid value 'fast' for '--timeout <DURATION>'",
        ),
    ];
    for (args, says) in &claps {
        let out = refused(&db, args);
        assert!(out.starts_with("error: "), "{args:?}: clap's error first: {out}");
        assert!(out.contains(says), "{args:?}: `{out}` should say `{says}`");
    }
    let n: i64 = sqlx::query_scalar("select count(*) from weir.subscriptions where name = 'bad'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "nothing stored");
    assert_eq!(sink_of(&pool, "rows").await.1.unwrap()["stream"], "ROWS", "nothing changed");
}

#[tokio::test]
async fn doctor_checks_sinks_settings_secrets_and_receivers() {
    let (db, pool) = setup("sinks_doctor").await;
    // A receiver that accepts connections (never answered: the doctor sends no request), and
    // a port where nothing listens.
    let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let open_port = open.local_addr().unwrap().port();
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let hook_url = format!("http://127.0.0.1:{closed_port}/hooks");
    let nats_url = format!("nats://127.0.0.1:{open_port}");
    subs(
        &db,
        &[
            "create",
            "hooked",
            "--type",
            "stream",
            "--selector",
            "x",
            "--webhook",
            &hook_url,
            "--secret-env",
            "DOCTOR_HOOK_SECRET",
        ],
    );
    subs(
        &db,
        &[
            "create",
            "natty",
            "--type",
            "stream",
            "--selector",
            "x",
            "--nats",
            "--nats-url",
            &nats_url,
        ],
    );
    subs(&db, &["create", "plain", "--type", "stream", "--selector", "x"]);
    sqlx::query(
        "update weir.subscriptions set sink_error = 'DOCTOR_HOOK_SECRET is not set there',
                sink_error_at = now() where name = 'hooked'",
    )
    .execute(&pool)
    .await
    .unwrap();

    // Kept in the database: a missing secret is a warning, an unreachable receiver too.
    let (ok, out) = output(weir(&db, &["doctor"]));
    assert!(ok, "warnings only: {out}");
    assert!(
        out.contains("[warn] sink of hooked: the environment variable DOCTOR_HOOK_SECRET")
            && out.contains("the processes that run weir need it"),
        "{out}"
    );
    assert!(out.contains("set DOCTOR_HOOK_SECRET to the signing secret"), "{out}");
    assert!(
        out.contains(&format!(
            "[warn] sink of hooked: network: cannot connect from here to 127.0.0.1:{closed_port}"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "[ok  ] sink of natty: network: 127.0.0.1:{open_port} accepts TCP connections"
        )),
        "{out}"
    );
    assert!(out.contains(&format!("[ok  ] sink of natty: nats {nats_url} subject")), "{out}");
    assert!(
        out.contains(
            "[warn] sink of hooked: delivery: the last process that tried cannot deliver: \
             DOCTOR_HOOK_SECRET is not set there"
        ),
        "{out}"
    );
    assert!(!out.contains("sink of plain"), "client sinks have no sink checks: {out}");

    // The secret set here: fine.
    let mut cmd = weir(&db, &["doctor"]);
    cmd.env("DOCTOR_HOOK_SECRET", SECRET);
    let (ok, out) = output(cmd);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("[ok  ] sink of hooked: webhook POST {hook_url}"))
            && out.contains("$DOCTOR_HOOK_SECRET is set here"),
        "{out}"
    );
    assert!(!out.contains(SECRET), "the secret itself is never printed: {out}");

    // `[[subscriptions]]`: `weir run` would refuse to start without the secret, so a failure.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("weir.toml");
    std::fs::write(
        &config,
        format!(
            "[[subscriptions]]\nname = \"fromtoml\"\ntype = \"stream\"\nselector = \"x\"\n\
             [subscriptions.sink]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{open_port}/h\"\n\
             secret_env = \"DOCTOR_TOML_SECRET\"\n"
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let (ok, out) = output(weir(&db, &["--config", config, "doctor"]));
    assert!(!ok, "a failure: {out}");
    assert!(
        out.contains("[FAIL] sink of fromtoml: the environment variable DOCTOR_TOML_SECRET")
            && out.contains("`weir run` from this configuration would refuse to start"),
        "{out}"
    );
    let mut cmd = weir(&db, &["--config", config, "doctor"]);
    cmd.env("DOCTOR_TOML_SECRET", SECRET);
    let (ok, out) = output(cmd);
    assert!(ok, "{out}");
    assert!(out.contains("[ok  ] subscription fromtoml: stream `\"x\"`, 1 emitter(s)"), "{out}");
    assert!(out.contains("[ok  ] sink of fromtoml: webhook POST"), "{out}");
    assert!(out.contains("[ok  ] sink of fromtoml: network"), "{out}");

    // A wrong sink in weir.toml: the entry fails, naming the field.
    std::fs::write(
        dir.path().join("weir.toml"),
        "[[subscriptions]]\nname = \"badtoml\"\ntype = \"stream\"\nselector = \"x\"\n\
         [subscriptions.sink]\ntype = \"nats\"\nsubject = \"weir.{nope}\"\n",
    )
    .unwrap();
    let (ok, out) = output(weir(&db, &["--config", config, "doctor"]));
    assert!(!ok, "{out}");
    assert!(
        out.contains(
            "[FAIL] subscription badtoml: subscription `badtoml`: nats subject `weir.{nope}`"
        ),
        "{out}"
    );
    drop(open);
}
