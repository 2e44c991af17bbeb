//! Background polling of every worker's `Load`: drives health and the per-worker gauges.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Worker;
use crate::metrics::Metrics;

const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Consecutive failed polls before a worker is taken out of rotation.
const FAILURES_TO_UNHEALTHY: u32 = 2;

pub async fn poll_forever(
    workers: Vec<Arc<Worker>>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failures = vec![0u32; workers.len()];
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let polls = workers.iter().map(|w| w.poll_load());
        let results = futures_util::future::join_all(polls).await;
        for ((worker, result), failures) in workers.iter().zip(results).zip(failures.iter_mut()) {
            match result {
                Ok(load) => {
                    *failures = 0;
                    // Only a worker that answered Info (so the router knows its model) serves requests.
                    if worker.is_ready() && !worker.is_failed() {
                        worker.set_healthy(true);
                    }
                    metrics.record_worker_load(worker.index, &load);
                }
                Err(_) => {
                    *failures += 1;
                    if *failures >= FAILURES_TO_UNHEALTHY {
                        worker.set_healthy(false);
                    }
                }
            }
            metrics.record_worker_state(worker.index, worker.is_healthy(), worker.inflight());
        }
    }
}
