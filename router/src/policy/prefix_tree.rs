//! A radix tree over token ids: which prompt prefixes a worker has recently served (and so
//! probably still holds in its KV cache). Least recently used leaves go when it grows too big.

use std::collections::HashMap;

#[derive(Default)]
struct Node {
    /// Tokens on the edge into this node; empty only for the root and for freed slots.
    label: Vec<u32>,
    /// Children keyed by the first token of their label.
    children: HashMap<u32, usize>,
    parent: usize,
    last_used: u64,
}

pub struct PrefixTree {
    nodes: Vec<Node>,
    free: Vec<usize>,
    tokens: usize,
    capacity: usize,
    clock: u64,
}

const ROOT: usize = 0;

impl PrefixTree {
    /// A tree that keeps at most `capacity` tokens.
    pub fn new(capacity: usize) -> Self {
        PrefixTree { nodes: vec![Node::default()], free: Vec::new(), tokens: 0, capacity, clock: 0 }
    }

    #[cfg(test)]
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Length of the longest prefix of `ids` stored in the tree.
    pub fn match_len(&self, ids: &[u32]) -> usize {
        let (mut node, mut pos) = (ROOT, 0);
        while pos < ids.len() {
            let Some(&child) = self.nodes[node].children.get(&ids[pos]) else { break };
            let label = &self.nodes[child].label;
            let common = common_prefix(label, &ids[pos..]);
            pos += common;
            if common < label.len() {
                break;
            }
            node = child;
        }
        pos
    }

    pub fn insert(&mut self, ids: &[u32]) {
        self.clock += 1;
        let now = self.clock;
        let (mut node, mut pos) = (ROOT, 0);
        while pos < ids.len() {
            let Some(child) = self.nodes[node].children.get(&ids[pos]).copied() else {
                let leaf = self.alloc(Node {
                    label: ids[pos..].to_vec(),
                    children: HashMap::new(),
                    parent: node,
                    last_used: now,
                });
                self.nodes[node].children.insert(ids[pos], leaf);
                self.tokens += ids.len() - pos;
                break;
            };
            let common = common_prefix(&self.nodes[child].label, &ids[pos..]);
            if common < self.nodes[child].label.len() {
                self.split(child, common);
            }
            self.nodes[child].last_used = now;
            pos += common;
            node = child;
        }
        if self.tokens > self.capacity {
            self.evict(self.capacity * 9 / 10);
        }
    }

    /// Cuts `node`'s label after `at` tokens; the rest (and the children) move to a new child.
    fn split(&mut self, node: usize, at: usize) {
        let label = self.nodes[node].label.split_off(at);
        let children = std::mem::take(&mut self.nodes[node].children);
        let first = label[0];
        let last_used = self.nodes[node].last_used;
        let grandchildren: Vec<usize> = children.values().copied().collect();
        let tail = self.alloc(Node { label, children, parent: node, last_used });
        for g in grandchildren {
            self.nodes[g].parent = tail;
        }
        self.nodes[node].children.insert(first, tail);
    }

    /// Drops least recently used leaves until at most `target` tokens remain.
    fn evict(&mut self, target: usize) {
        while self.tokens > target {
            let mut leaves: Vec<(u64, usize)> = (1..self.nodes.len())
                .filter(|&i| !self.nodes[i].label.is_empty() && self.nodes[i].children.is_empty())
                .map(|i| (self.nodes[i].last_used, i))
                .collect();
            if leaves.is_empty() {
                return;
            }
            leaves.sort_unstable();
            for (_, leaf) in leaves {
                if self.tokens <= target {
                    return;
                }
                self.remove_leaf(leaf);
            }
        }
    }

    fn remove_leaf(&mut self, leaf: usize) {
        let node = std::mem::take(&mut self.nodes[leaf]);
        self.nodes[node.parent].children.remove(&node.label[0]);
        self.tokens -= node.label.len();
        self.free.push(leaf);
    }

    fn alloc(&mut self, node: Node) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.nodes[i] = node;
                i
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        }
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_shared_prefixes() {
        let mut t = PrefixTree::new(1000);
        t.insert(&[1, 2, 3, 4]);
        t.insert(&[1, 2, 5]);
        assert_eq!(t.match_len(&[1, 2, 3, 4, 9]), 4);
        assert_eq!(t.match_len(&[1, 2, 5, 6]), 3);
        assert_eq!(t.match_len(&[1, 2, 7]), 2);
        assert_eq!(t.match_len(&[9]), 0);
        assert_eq!(t.tokens(), 5);
        t.insert(&[1, 2]);
        assert_eq!(t.tokens(), 5);
        assert_eq!(t.match_len(&[1, 2, 3]), 3);
    }

    #[test]
    fn split_keeps_grandchildren() {
        let mut t = PrefixTree::new(1000);
        t.insert(&[1, 2, 3, 4]);
        t.insert(&[1, 2, 3, 4, 5, 6]);
        t.insert(&[1, 9]);
        assert_eq!(t.match_len(&[1, 2, 3, 4, 5, 6]), 6);
        assert_eq!(t.match_len(&[1, 9]), 2);
        assert_eq!(t.tokens(), 7);
    }

    #[test]
    fn evicts_least_recently_used() {
        let mut t = PrefixTree::new(10);
        t.insert(&[1, 1, 1, 1]);
        t.insert(&[2, 2, 2, 2]);
        t.insert(&[1, 1, 1, 1]); // touch
        t.insert(&[3, 3, 3, 3]); // 12 > 10: evict down to 9
        assert_eq!(t.match_len(&[2, 2, 2, 2]), 0);
        assert_eq!(t.match_len(&[1, 1, 1, 1]), 4);
        assert_eq!(t.match_len(&[3, 3, 3, 3]), 4);
        assert!(t.tokens() <= 9);
        t.insert(&[4, 4]); // reuses freed slots
        assert_eq!(t.match_len(&[4, 4]), 2);
    }
}
