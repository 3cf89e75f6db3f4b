//! `weir init`: creates or updates the weir schema, the publication, the replica identity of
//! tables an operator routes by a non-key column, and the replication slot
//! (`weir::setup::init`, idempotent), and says what it did — and which watched tables hold
//! rows from before capture (`weir backfill` loads them; a table added later is backfilled).
//! Then it checks every `[[operators]]` entry as `weir run` will (`SqlOperator::prepare`), so
//! an operator `weir run` would refuse fails `weir init` too, with the same reason.

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
    for table in &report.identity_set_keyless {
        println!(
            "table {table}: replica identity set to full (it has no primary key, and PostgreSQL \
             refuses updates and deletes on a published table without an identity)"
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
    for (table, backfill) in &report.backfills {
        match backfill {
            Ok(id) => println!(
                "`{table}` is watched from now on: backfill {id} loads its existing rows once `weir run` runs"
            ),
            Err(why) => println!(
                "`{table}` is watched from now on; its existing rows are not backfilled: {why}"
            ),
        }
    }
    if report.created_publication {
        // Rows written before the slot existed are not in the WAL to come.
        for table in &report.tables {
            let (schema, name) = table.split_once('.').unwrap_or(("public", table));
            let sql = format!(
                "select exists (select 1 from \"{}\".\"{}\")",
                schema.replace('"', "\"\""),
                name.replace('"', "\"\"")
            );
            if sqlx::query_scalar::<_, bool>(sqlx::AssertSqlSafe(sql))
                .fetch_one(&pool)
                .await
                .unwrap_or(false)
            {
                println!(
                    "`{table}` already holds rows, which capture will not see: `weir backfill {table}` loads them into the log"
                );
            }
        }
    }
    // The checks `weir run` makes before it starts an operator, made now.
    let mut refused = 0;
    for op in &config.operators {
        if let Err(e) = weir_consumer::SqlOperator::prepare(&pool, op).await {
            eprintln!("{e}");
            refused += 1;
        }
    }
    if refused > 0 {
        anyhow::bail!(
            "capture is set up, but `weir run` would refuse {refused} of the {} [[operators]] \
             of the configuration (above): fix them and run `weir init` again",
            config.operators.len()
        );
    }
    Ok(())
}
