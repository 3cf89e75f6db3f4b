//! `weir webhooks …`: make a webhook sink's signing secret, and check a request's signature
//! from a terminal the way a receiver does. No database and no configuration: both work on
//! the secret in an environment variable (as `weir run` reads a sink's `secret_env`) and never
//! print it.
//!
//! Where it sits: a person at a terminal ─► this ─► weir_sinks::Secrets (generate, verify).
//!
//! ```text
//! weir webhooks secret                          whsec_<base64 of 32 random bytes>
//! weir webhooks verify --secret-env NAME --id ID --timestamp TS --signature SIG [--body FILE]
//!   body: FILE, else stdin, byte for byte ─► "valid (secret N)", exit 0
//!                                        └─► why not (the VerifyError), exit 1
//! ```

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::Context;
use weir_sinks::Secrets;

/// `weir webhooks` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum WebhooksCommand {
    /// Print a new signing secret (`whsec_` and 32 random bytes in base64) for the variable a
    /// webhook sink's secret_env names.
    Secret,
    /// Check a request's Standard Webhooks signature as a receiver does: a `v1` signature made
    /// with one of the secrets over `<id>.<timestamp>.<body>`, the timestamp within five
    /// minutes of now.
    Verify(VerifyArgs),
}

/// What `weir webhooks verify` checks.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The environment variable holding the secret(s) (several, space-separated, during a
    /// rotation); never printed.
    #[arg(long)]
    pub secret_env: String,
    /// The request's `webhook-id` header.
    #[arg(long)]
    pub id: String,
    /// The request's `webhook-timestamp` header (Unix seconds).
    #[arg(long)]
    pub timestamp: i64,
    /// The request's `webhook-signature` header.
    #[arg(long)]
    pub signature: String,
    /// A file holding the exact body. Defaults to reading stdin.
    #[arg(long)]
    pub body: Option<PathBuf>,
    /// Check the signature only, not how far the timestamp is from now (a request captured
    /// earlier).
    #[arg(long)]
    pub ignore_timestamp: bool,
}

/// Runs a `weir webhooks` command, printing to `out`; the body of `verify` comes from `stdin`
/// unless `--body` names a file.
pub fn run(cmd: WebhooksCommand, out: &mut impl Write, stdin: impl Read) -> anyhow::Result<()> {
    match cmd {
        WebhooksCommand::Secret => writeln!(out, "{}", Secrets::generate())?,
        WebhooksCommand::Verify(args) => {
            let secrets = Secrets::from_env(&args.secret_env).map_err(anyhow::Error::msg)?;
            let body = match &args.body {
                Some(path) => std::fs::read(path)
                    .with_context(|| format!("cannot read the body from {}", path.display()))?,
                None => {
                    let mut body = Vec::new();
                    let mut stdin = stdin;
                    stdin.read_to_end(&mut body).context("cannot read the body from stdin")?;
                    body
                }
            };
            let now =
                if args.ignore_timestamp { args.timestamp } else { chrono::Utc::now().timestamp() };
            let which = secrets.verify(&args.id, args.timestamp, &body, &args.signature, now)?;
            writeln!(out, "valid (secret {which})")?;
        }
    }
    Ok(())
}
