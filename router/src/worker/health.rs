//! Background polling of every worker's `Load`: drives health and the per-worker gauges.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::app::AppState;

const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Consecutive failed polls before a worker is taken out of rotation.
const FAILURES_TO_UNHEALTHY: u32 = 2;

pub async fn poll_forever(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let (workers, metrics) = (&state.workers, &state.metrics);
    let mut failures = vec![0u32; workers.len()];
    let mut was_healthy = vec![false; workers.len()];
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    // A slow poll (dead worker, 2 s timeout) must not be followed by a burst of catch-up polls.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let polls = workers.iter().map(|w| w.poll_load());
        let results = futures_util::future::join_all(polls).await;
        for (((worker, result), failures), was_healthy) in
            workers.iter().zip(results).zip(failures.iter_mut()).zip(was_healthy.iter_mut())
        {
            match result {
                Ok(load) => {
                    *failures = 0;
                    // Only a worker that answered Info serves requests. One that was late for startup
                    // (which set up the model from the first ones) is picked up here.
                    if !worker.is_ready() && state.model.get().is_some() {
                        let _ = worker.info().await;
                    } else if worker.is_ready() && !worker.is_failed() {
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
            let healthy = worker.is_healthy();
            if *was_healthy && !healthy {
                // Whatever it had cached is gone or unreachable: stop routing by it.
                state.policy.forget(worker.index);
            }
            *was_healthy = healthy;
            metrics.record_worker_state(worker.index, healthy, worker.inflight());
        }
    }
}
