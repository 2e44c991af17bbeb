use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::least_load::least_loaded;
use super::prefix_tree::PrefixTree;
use super::{load_key, Policy};
use crate::worker::Worker;

/// Load is unbalanced when the busiest worker has this many more requests in flight than the
/// idlest one, and this many times as many; then cache affinity gives way to least load.
const BALANCE_ABS: usize = 8;
const BALANCE_REL: f64 = 1.25;
/// A worker whose tree holds at least this fraction of the prompt gets the request.
const MATCH_THRESHOLD: f64 = 0.5;
/// Tokens remembered per worker (a few MiB of tree).
const TREE_CAPACITY: usize = 1 << 21;

/// SGLang-style cache-aware routing: send a prompt where its prefix was served before, so the
/// worker can reuse its KV cache, unless that would overload one worker.
#[derive(Default)]
pub struct CacheAware {
    trees: Mutex<HashMap<usize, PrefixTree>>,
}

impl Policy for CacheAware {
    fn pick(&self, candidates: &[Arc<Worker>], input_ids: &[u32]) -> usize {
        let mut trees = self.trees.lock().unwrap_or_else(|p| p.into_inner());
        let chosen = if unbalanced(candidates) {
            least_loaded(candidates)
        } else {
            let matched = |i: usize| trees.get(&candidates[i].index).map_or(0, |t| t.match_len(input_ids));
            let best = (0..candidates.len())
                .max_by_key(|&i| (matched(i), Reverse(load_key(&candidates[i]))))
                .unwrap_or(0);
            if matched(best) as f64 >= MATCH_THRESHOLD * input_ids.len() as f64 && !input_ids.is_empty() {
                best
            } else {
                least_loaded(candidates)
            }
        };
        trees
            .entry(candidates[chosen].index)
            .or_insert_with(|| PrefixTree::new(TREE_CAPACITY))
            .insert(input_ids);
        chosen
    }

    fn forget(&self, worker: usize) {
        self.trees.lock().unwrap_or_else(|p| p.into_inner()).remove(&worker);
    }
}

fn unbalanced(candidates: &[Arc<Worker>]) -> bool {
    let loads = candidates.iter().map(|w| w.inflight());
    let (min, max) = loads.fold((usize::MAX, 0), |(lo, hi), l| (lo.min(l), hi.max(l)));
    max.saturating_sub(min) > BALANCE_ABS && max as f64 > BALANCE_REL * min as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_prefix_goes_to_same_worker() {
        let workers = crate::policy::test_workers(3);
        let p = CacheAware::default();
        let first = p.pick(&workers, &[1, 2, 3, 4]);
        let _busy = workers[first].track();
        // Shares 4 of 5 tokens: stays, although that worker is now the busiest.
        assert_eq!(p.pick(&workers, &[1, 2, 3, 4, 5]), first);
        // Unrelated prompt: least loaded worker.
        assert_ne!(p.pick(&workers, &[9, 9, 9, 9]), first);
    }

    #[test]
    fn forgotten_worker_loses_its_prefixes() {
        let workers = crate::policy::test_workers(2);
        let p = CacheAware::default();
        let first = p.pick(&workers, &[1, 2, 3, 4]);
        let _busy = workers[first].track();
        p.forget(workers[first].index);
        assert_ne!(p.pick(&workers, &[1, 2, 3, 4]), first);
    }

    #[test]
    fn falls_back_to_least_load_when_unbalanced() {
        let workers = crate::policy::test_workers(2);
        let p = CacheAware::default();
        let first = p.pick(&workers, &[7, 7, 7]);
        let _busy: Vec<_> = (0..BALANCE_ABS + 1).map(|_| workers[first].track()).collect();
        assert_ne!(p.pick(&workers, &[7, 7, 7]), first);
    }

    #[test]
    fn identical_prompts_spread_under_load() {
        let workers = crate::policy::test_workers(2);
        let p = CacheAware::default();
        let guards: Vec<_> = (0..32).map(|_| workers[p.pick(&workers, &[5, 6, 7])].track()).collect();
        assert!(
            workers.iter().all(|w| w.inflight() >= 8),
            "{:?}",
            workers.iter().map(|w| w.inflight()).collect::<Vec<_>>()
        );
        drop(guards);
    }
}
