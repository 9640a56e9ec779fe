//! The tasks that run beside the fraud path inside `run` — the Redis
//! writer and the session follower — started and stopped one way: a task
//! that fails for good cancels `shutdown` (the pipeline then exits
//! non-zero); at the end each is awaited, at most 10 s.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Spawns `task`; if it returns an error, logs it and cancels `shutdown`.
pub(super) fn spawn(
    name: &'static str,
    shutdown: CancellationToken,
    task: impl Future<Output = anyhow::Result<()>> + Send + 'static,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let r = task.await;
        if let Err(e) = &r {
            tracing::error!(error = format!("{e:#}"), "{name} failed; stopping");
            shutdown.cancel();
        }
        r
    })
}

/// Awaits a task started by [`spawn`] (already told to stop), at most 10 s.
pub(super) async fn join(
    name: &'static str,
    handle: JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    match tokio::time::timeout(Duration::from_secs(10), handle).await {
        Ok(Ok(r)) => r.map_err(|e| e.context(name)),
        Ok(Err(e)) => anyhow::bail!("{name} task failed: {e}"),
        Err(_) => {
            tracing::warn!("{name} did not stop within 10 s");
            Ok(())
        }
    }
}
