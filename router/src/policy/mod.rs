//! Routing policies: which worker serves a request.

mod cache_aware;
mod least_load;
mod prefix_tree;
mod round_robin;

use std::sync::Arc;

pub use cache_aware::CacheAware;
pub use least_load::LeastLoad;
pub use round_robin::RoundRobin;

use crate::cli::PolicyKind;
use crate::worker::Worker;

pub trait Policy: Send + Sync {
    /// Picks one of `candidates` (healthy, not yet tried for this request, never empty) for a
    /// request with these prompt tokens; returns its position in `candidates`.
    fn pick(&self, candidates: &[Arc<Worker>], input_ids: &[u32]) -> usize;

    /// The worker went down (and lost its cache).
    fn forget(&self, _worker: usize) {}
}

pub fn from_kind(kind: PolicyKind) -> Box<dyn Policy> {
    match kind {
        PolicyKind::RoundRobin => Box::new(RoundRobin::default()),
        PolicyKind::LeastLoad => Box::new(LeastLoad),
        PolicyKind::CacheAware => Box::new(CacheAware::default()),
    }
}

/// Load used to compare workers: the router's own in-flight count (exact and current), then the
/// worker's polled outstanding tokens and KV use (a little stale, but they see request sizes).
pub fn load_key(worker: &Worker) -> (usize, u64, u64) {
    let polled = worker.load();
    (worker.inflight(), polled.outstanding_tokens, polled.kv_tokens_used)
}

#[cfg(test)]
pub(crate) fn test_workers(n: usize) -> Vec<Arc<Worker>> {
    // A lazy gRPC channel spawns its connection task, so it needs a runtime around.
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let _guard = RUNTIME.get_or_init(|| tokio::runtime::Runtime::new().unwrap()).enter();
    (0..n).map(|i| Arc::new(Worker::new(i, &format!("http://127.0.0.1:{}", 1 + i), None).unwrap())).collect()
}
