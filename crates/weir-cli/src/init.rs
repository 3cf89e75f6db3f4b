//! `weir init`: creates or updates the weir schema, the publication, the replica identity of
//! tables an operator routes by a non-key column, and the replication slot
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
    for table in &report.identity_set {
        println!(
            "table {table}: replica identity set to full (an operator routes it by a column \
             outside its primary key; deleted and moved rows now carry it)"
        );
    }
    for need in &report.identity_needed {
        println!("table {}: needs replica identity full, left as it is: {need}", need.table);
    }
    println!(
        "slot `{}` {}",
        config.source.slot,
        if report.created_slot { "created" } else { "exists" }
    );
    Ok(())
}
