//! `weir doctor`: checks the server and database for what weir needs and prints the fix for
//! each problem (the checks are the library's, `weir::doctor`). Fails when one check fails.

use std::process::ExitCode;

use weir::Config;

pub(crate) async fn run(config: &Config) -> ExitCode {
    let checks = weir::doctor::diagnose(config).await;
    let mut failed = false;
    for c in &checks {
        println!("{c}");
        failed |= c.verdict == weir::doctor::Verdict::Fail;
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
