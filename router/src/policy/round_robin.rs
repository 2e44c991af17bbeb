use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::Policy;
use crate::worker::Worker;

#[derive(Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Policy for RoundRobin {
    fn pick(&self, candidates: &[Arc<Worker>], _input_ids: &[u32]) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % candidates.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles() {
        let workers = crate::policy::test_workers(3);
        let p = RoundRobin::default();
        let picks: Vec<usize> = (0..6).map(|_| p.pick(&workers, &[])).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }
}
