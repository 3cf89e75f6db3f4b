//! `weir init`: creates or updates the weir schema, the publication and the replication slot
//! (`weir::setup::init`, idempotent), and says what it did.

use weir::Config;

pub(crate) async fn run(config: &Config) -> anyhow::Result<()> {
    let pool = weir::db::connect(config).await?;
    let report = weir::setup::init(&pool, config).await?;
    println!(
        "publication `{}` {} ({} tables: {})",
        config.source.publication,
        if report.created_publication { "created" } else { "up to date" },
        report.tables.len(),
        report.tables.join(", ")
    );
    println!(
        "slot `{}` {}",
        config.source.slot,
        if report.created_slot { "created" } else { "exists" }
    );
    Ok(())
}
