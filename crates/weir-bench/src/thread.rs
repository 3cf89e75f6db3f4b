//! A task on a thread of its own, with a current-thread runtime: the writers and listeners
//! whose clocks the measured work (ingestion, consumers, SSE clients on the main runtime) must
//! not delay. Only the OS scheduler sits between them and the instants they record.

/// Runs `make()` to completion on a new thread with a current-thread runtime.
pub(crate) fn on_own_thread<F, Fut, T>(
    name: &str,
    make: F,
) -> tokio::sync::oneshot::Receiver<anyhow::Result<T>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name(name.to_string()).spawn(move || {
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(make()));
        let _ = tx.send(result);
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot spawn a benchmark thread");
    }
    rx
}

/// Every `NOTIFY weir_events` on `url`'s database until `stop`, with its arrival instant (the
/// payload is the appended head position), recorded on a thread of its own. Returns once the
/// listener listens; the receiver answers with what it saw after `stop`.
pub(crate) async fn append_notifications(
    url: &str,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<anyhow::Result<Vec<(i64, std::time::Instant)>>>>
{
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let url = url.to_string();
    let seen = on_own_thread("bench-listener", move || async move {
        let mut listener = sqlx::postgres::PgListener::connect(&url).await?;
        listener.listen(weir_log::NOTIFY_CHANNEL).await?;
        let _ = ready_tx.send(());
        let mut seen = Vec::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                n = listener.recv() => {
                    let at = std::time::Instant::now();
                    if let Ok(p) = n?.payload().parse::<i64>() {
                        seen.push((p, at));
                    }
                }
            }
        }
        anyhow::Ok(seen)
    });
    anyhow::Context::context(ready_rx.await, "the listener did not start")?;
    Ok(seen)
}
