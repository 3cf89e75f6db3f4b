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
