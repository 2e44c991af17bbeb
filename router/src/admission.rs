//! Admission control: at most `max_concurrent` requests run; up to `queue_size` more wait for
//! `queue_timeout`; anything beyond is refused with 429 so clients back off instead of piling up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

pub struct Admission {
    slots: Arc<Semaphore>,
    queued: Arc<AtomicUsize>,
    queue_size: usize,
    queue_timeout: Duration,
    queue_depth: IntGauge,
}

/// Holds one running slot until dropped (i.e. until the response body is gone).
pub type Permit = OwnedSemaphorePermit;

impl Admission {
    pub fn new(
        max_concurrent: usize,
        queue_size: usize,
        queue_timeout: Duration,
        queue_depth: IntGauge,
    ) -> Self {
        Admission {
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            queued: Arc::new(AtomicUsize::new(0)),
            queue_size,
            queue_timeout,
            queue_depth,
        }
    }

    pub async fn acquire(&self) -> Result<Permit, ApiError> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let _slot = QueueSlot::enter(self)?;
        match tokio::time::timeout(self.queue_timeout, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(ApiError::unavailable("the server is shutting down")),
            Err(_) => Err(ApiError::too_many_requests(format!(
                "request waited {}s in the queue without a free slot; retry later",
                self.queue_timeout.as_secs()
            ))),
        }
    }
}

/// A place in the queue, given back on drop (also when the client goes away while waiting).
struct QueueSlot {
    queued: Arc<AtomicUsize>,
    gauge: IntGauge,
}

impl QueueSlot {
    fn enter(admission: &Admission) -> Result<Self, ApiError> {
        let before = admission.queued.fetch_add(1, Ordering::AcqRel);
        let slot = QueueSlot { queued: admission.queued.clone(), gauge: admission.queue_depth.clone() };
        if before >= admission.queue_size {
            return Err(ApiError::too_many_requests("too many requests waiting; retry later"));
        }
        slot.gauge.set((before + 1) as i64);
        Ok(slot)
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        let after = self.queued.fetch_sub(1, Ordering::AcqRel) - 1;
        self.gauge.set(after.min(i64::MAX as usize) as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn admission(max: usize, queue: usize, timeout_ms: u64) -> Admission {
        Admission::new(max, queue, Duration::from_millis(timeout_ms), IntGauge::new("q", "q").unwrap())
    }

    #[tokio::test]
    async fn queue_full_is_429_with_retry_after() {
        let a = admission(1, 0, 1000);
        let _running = a.acquire().await.unwrap();
        let err = a.acquire().await.unwrap_err();
        assert_eq!(err.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(err.retry_after.is_some());
        assert_eq!(a.queued.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn queued_request_runs_when_a_slot_frees_or_times_out() {
        let a = Arc::new(admission(1, 4, 200));
        let running = a.acquire().await.unwrap();
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.acquire().await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(a.queue_depth.get(), 1);
        drop(running);
        assert!(waiter.await.unwrap().is_ok());
        assert_eq!(a.queue_depth.get(), 0);

        let _running = a.acquire().await.unwrap();
        let err = a.acquire().await.unwrap_err();
        assert_eq!(err.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(a.queue_depth.get(), 0);
    }
}
