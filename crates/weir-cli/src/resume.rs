//! `weir resume <name>`: restarts a halted consumer at the event it halted on. Refuses a
//! consumer that does not exist or is not halted, naming it.

use anyhow::Context;
use weir::Config;

pub(crate) async fn run(config: &Config, name: &str) -> anyhow::Result<()> {
    let pool = weir::db::connect(config).await?;
    let halted = weir::consumer_status::consumers(&pool)
        .await?
        .into_iter()
        .find(|c| c.name == name)
        .with_context(|| format!("no consumer named `{name}`; `weir status` lists them"))?;
    if halted.state != weir::ConsumerState::Halted {
        anyhow::bail!("consumer `{name}` is not halted (it is {})", halted.state);
    }
    weir::resume(&pool, name).await?;
    println!("consumer `{name}` resumed at the event it halted on");
    Ok(())
}
