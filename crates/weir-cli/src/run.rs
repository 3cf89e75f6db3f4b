//! `weir run`: ingestion, the operators and the HTTP server in one process until Ctrl-C or
//! SIGTERM; a second process on the same slot waits as standby (the library's election).
//!
//! ```text
//! bind [http] bind ──→ Weir::builder(config).start() ──→ Server::start(pool, wake) ──→ serve
//!       (a taken port is an error before anything starts)     │ one cancel token stops all
//! signal ──→ cancel ──→ running.wait() ──→ the server's task joined, its error logged
//! ```

use anyhow::Context;
use weir::Config;

pub(crate) async fn run(config: Config) -> anyhow::Result<()> {
    let http = config.http.clone();
    // Bind before starting anything: a taken port is a clear error, not a half start.
    let listener = if http.enabled {
        Some(tokio::net::TcpListener::bind(&http.bind).await.with_context(|| {
            format!(
                "cannot listen on {} (http.bind); another process may use it: \
                 set [http] bind or WEIR_HTTP_BIND, or [http] enabled = false",
                http.bind
            )
        })?)
    } else {
        None
    };
    let running = weir::Weir::builder(config.clone()).start().await?;
    let cancel = crate::shutdown_signal();
    let stop = running.cancel_token();
    tokio::spawn(async move {
        cancel.cancelled().await;
        stop.cancel();
    });
    let server = match listener {
        Some(listener) => {
            let server = weir_server::Server::start(
                running.pool().clone(),
                config,
                running.wake(),
                running.cancel_token(),
            )
            .await?;
            if http.console {
                tracing::info!(bind = %http.bind, "serving HTTP: the console at /, /v1, /v1/channels, /metrics");
            } else {
                tracing::info!(bind = %http.bind, "serving HTTP: /v1, /v1/channels, /metrics");
            }
            let cancel = running.cancel_token();
            Some(tokio::spawn(async move { server.serve(listener, cancel).await }))
        }
        None => None,
    };
    let result = running.wait().await;
    if let Some(server) = server {
        match server.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "HTTP server panicked"),
            Ok(Ok(())) => {}
        }
    }
    result.context("weir stopped")?;
    Ok(())
}
