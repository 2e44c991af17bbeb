use std::sync::Arc;

use super::{load_key, Policy};
use crate::worker::Worker;

/// The worker with the least load (see `load_key`); ties go to the first.
pub struct LeastLoad;

impl Policy for LeastLoad {
    fn pick(&self, candidates: &[Arc<Worker>], _input_ids: &[u32]) -> usize {
        least_loaded(candidates)
    }
}

pub fn least_loaded(candidates: &[Arc<Worker>]) -> usize {
    (0..candidates.len()).min_by_key(|&i| load_key(&candidates[i])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_fewest_in_flight() {
        let workers = crate::policy::test_workers(3);
        let _a = workers[0].track();
        let _b = workers[1].track();
        assert_eq!(LeastLoad.pick(&workers, &[]), 2);
        let _c = workers[2].track();
        let _d = workers[2].track();
        assert_eq!(LeastLoad.pick(&workers, &[]), 0);
        drop(_a);
        drop(_b);
        assert_eq!(LeastLoad.pick(&workers, &[]), 0);
    }
}
