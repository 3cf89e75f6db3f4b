//! `weir dev`: a private PostgreSQL from the installed server binaries, kept in a directory
//! across restarts, for developing against weir with no setup. Prints the URL to export.

use std::path::Path;

use weir_testkit::{Cluster, Options};

/// `weir dev`: a persistent private cluster in `dir`, until Ctrl-C.
pub(crate) async fn run(dir: &Path) -> anyhow::Result<()> {
    let cluster = tokio::task::spawn_blocking({
        let dir = dir.to_path_buf();
        move || Cluster::start_in(&dir, Options::default())
    })
    .await??;
    let exists = cluster.psql("postgres", "select 1 from pg_database where datname = 'weir'")?;
    if exists.is_empty() {
        cluster.psql("postgres", "create database weir")?;
    }
    let url = cluster.url("weir");
    println!("PostgreSQL (wal_level=logical) is running with its data in {}", dir.display());
    println!();
    println!("  export DATABASE_URL={url}");
    println!();
    println!("then `weir init` and `weir run`. Ctrl-C stops the server; the data stays.");
    crate::shutdown_signal().cancelled().await;
    drop(cluster);
    Ok(())
}
