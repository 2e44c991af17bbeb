//! Background polling of every worker's `Load`: drives health and the per-worker gauges. A worker
//! out of rotation that also sends its streams nothing for `stall_timeout` has them failed
//! (generate.rs), so a frozen worker cannot hang its requests.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::app::AppState;

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub poll_interval: Duration,
    /// A `Load` poll not answered within this counts as a failure.
    pub poll_timeout: Duration,
    /// Consecutive failed polls before a worker is taken out of rotation.
    pub failures_to_unhealthy: u32,
    /// How long a stream waits for its next chunk from a worker out of rotation before it fails
    /// (`--worker-stall-timeout-secs`).
    pub stall_timeout: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            poll_interval: Duration::from_millis(500),
            poll_timeout: Duration::from_secs(2),
            failures_to_unhealthy: 2,
            stall_timeout: Duration::from_secs(3),
        }
    }
}

pub async fn poll_forever(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let (workers, metrics, config) = (&state.workers, &state.metrics, &state.health);
    let mut failures = vec![0u32; workers.len()];
    let mut was_healthy = vec![false; workers.len()];
    let mut tick = tokio::time::interval(config.poll_interval);
    // A slow poll (dead worker, 2 s timeout) must not be followed by a burst of catch-up polls.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let polls = workers.iter().map(|w| w.poll_load(config.poll_timeout));
        let results = futures_util::future::join_all(polls).await;
        for (((worker, result), failures), was_healthy) in
            workers.iter().zip(results).zip(failures.iter_mut()).zip(was_healthy.iter_mut())
        {
            match result {
                Ok(load) => {
                    *failures = 0;
                    worker.resend_aborts();
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
                    if *failures >= config.failures_to_unhealthy {
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
