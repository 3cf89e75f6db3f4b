//! `weir skip <name>`: skips the event a halted consumer stopped on (recorded as skipped) and
//! resumes it after that event.

use weir::Config;

pub(crate) async fn run(config: &Config, name: &str) -> anyhow::Result<()> {
    let pool = weir::db::connect(config).await?;
    let position = weir::skip(&pool, name).await?;
    println!("consumer `{name}` skipped position {position} and resumed after it");
    Ok(())
}
