//! The `weir` binary: parses the command line, sets up tracing (stderr, `WEIR_LOG`, colours
//! on a terminal only), runs the command of the weir-cli library and turns an error into one
//! line and a non-zero exit code. Everything else is in `lib.rs`.

use std::process::ExitCode;

use clap::Parser;
use weir_cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cli.command.default_log_filter()));
    // Colours only on a terminal: logs sent to a file, journald or `docker logs` stay plain
    // text (tracing-subscriber colours any writer unless NO_COLOR is set).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weir: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(weir_cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weir: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
