//! Key/value cache blocks and the prefix cache over them.
//!
//! The cache is a pool of fixed-size blocks; a sequence holds a table of blocks. Every full
//! block of computed tokens is registered under a hash chained over the sequence's token prefix
//! (the hash of the block's tokens and its parent block's hash), so a later request whose
//! prompt starts with the same tokens takes the same blocks and prefills only the rest (what
//! vLLM calls automatic prefix caching). Shared blocks are full and never written again; new
//! tokens always go to a sequence's own blocks. Blocks of finished sequences stay registered
//! and are evicted least recently used first when the pool runs out.
//!
//! A deleted user's blocks are not evicted when the user is deleted: no API reads a block back
//! (its keys and values, or the token ids of its key); a block is only reused by a request whose
//! prompt starts with the very same tokens, which only a caller who already has that text can
//! send, and what it reuses are attention keys and values, never text. The blocks leave as the
//! pool turns over (least recently used first).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// A block's identity: the tokens it holds and its parent's hash.
#[derive(Clone, PartialEq, Eq)]
struct Key {
    parent: u64,
    tokens: Vec<u32>,
}

/// The block pool and the prefix cache.
pub struct BlockManager {
    block_size: usize,
    refs: Vec<u32>,
    keys: Vec<Option<(u64, Key)>>,
    by_hash: HashMap<u64, u32>,
    free: Vec<u32>,
    /// Registered blocks no sequence holds, by last use.
    lru: BTreeMap<u64, u32>,
    last_use: Vec<u64>,
    tick: u64,
    enabled: bool,
}

/// The hash of a block holding `tokens` after the prefix whose last block hashed to `parent`.
pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = ahash::AHasher::default();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockManager {
    /// A pool of `blocks` blocks of `block_size` positions; `prefix_cache` turns reuse on.
    pub fn new(blocks: usize, block_size: usize, prefix_cache: bool) -> Self {
        Self {
            block_size,
            refs: vec![0; blocks],
            keys: vec![None; blocks],
            by_hash: HashMap::new(),
            free: (0..blocks as u32).rev().collect(),
            lru: BTreeMap::new(),
            last_use: vec![0; blocks],
            tick: 0,
            enabled: prefix_cache,
        }
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that can be handed out now (free, or cached and unused).
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Whether prefix reuse is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Takes the longest run of cached blocks that starts `tokens`, covering at most
    /// `max_tokens` positions; returns them (referenced) with the hash of the last one.
    pub fn lookup(&mut self, tokens: &[u32], max_tokens: usize) -> (Vec<u32>, u64) {
        let mut out = Vec::new();
        let mut parent = 0u64;
        if !self.enabled {
            return (out, parent);
        }
        let bs = self.block_size;
        for chunk in tokens[..max_tokens.min(tokens.len())].chunks_exact(bs) {
            let h = chain_hash(parent, chunk);
            let Some(&b) = self.by_hash.get(&h) else {
                break;
            };
            let matches = self.keys[b as usize]
                .as_ref()
                .is_some_and(|(_, k)| k.parent == parent && k.tokens == chunk);
            if !matches {
                break;
            }
            self.retain(b);
            out.push(b);
            parent = h;
        }
        (out, parent)
    }

    /// Takes one more reference to each of `blocks` (the full blocks a forked beam shares).
    pub fn share(&mut self, blocks: &[u32]) {
        for &b in blocks {
            self.retain(b);
        }
    }

    fn retain(&mut self, b: u32) {
        if self.refs[b as usize] == 0 {
            self.lru.remove(&self.last_use[b as usize]);
        }
        self.refs[b as usize] += 1;
    }

    /// Hands out `n` blocks, evicting the least recently used cached ones if needed; `None`
    /// (and nothing taken) when the pool cannot.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if self.available() < n {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let b = match self.free.pop() {
                Some(b) => b,
                None => {
                    let (&tick, &b) = self.lru.iter().next()?;
                    self.lru.remove(&tick);
                    if let Some((h, _)) = self.keys[b as usize].take() {
                        self.by_hash.remove(&h);
                    }
                    b
                }
            };
            self.refs[b as usize] = 1;
            out.push(b);
        }
        Some(out)
    }

    /// Registers full block `b` holding `tokens` after `parent`; returns its hash. A block
    /// whose content is already cached elsewhere stays private.
    pub fn register(&mut self, b: u32, parent: u64, tokens: &[u32]) -> u64 {
        let h = chain_hash(parent, tokens);
        if self.enabled && !self.by_hash.contains_key(&h) && self.keys[b as usize].is_none() {
            self.by_hash.insert(h, b);
            self.keys[b as usize] = Some((
                h,
                Key {
                    parent,
                    tokens: tokens.to_vec(),
                },
            ));
        }
        h
    }

    /// Drops one reference to each block; unreferenced registered blocks stay cached.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks {
            let i = b as usize;
            debug_assert!(self.refs[i] > 0, "double release of block {b}");
            self.refs[i] = self.refs[i].saturating_sub(1);
            if self.refs[i] == 0 {
                if self.keys[i].is_some() {
                    self.tick += 1;
                    self.last_use[i] = self.tick;
                    self.lru.insert(self.tick, b);
                } else {
                    self.free.push(b);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_blocks_are_shared_then_evicted_lru() {
        let mut m = BlockManager::new(4, 2, true);
        let a = m.allocate(2).unwrap();
        let h0 = m.register(a[0], 0, &[1, 2]);
        m.register(a[1], h0, &[3, 4]);
        // While `a` runs, a request with the same start shares its blocks.
        let (hit, _) = m.lookup(&[1, 2, 3, 4, 5], 4);
        assert_eq!(hit, a);
        // A different second block shares only the first.
        let (hit2, _) = m.lookup(&[1, 2, 9, 9], 4);
        assert_eq!(hit2, vec![a[0]]);
        m.release(&hit);
        m.release(&hit2);
        m.release(&a);
        assert_eq!(m.available(), 4);
        // Everything can be handed out again: the cached blocks are evicted last.
        let all = m.allocate(4).unwrap();
        assert_eq!(all.len(), 4);
        assert!(m.allocate(1).is_none());
        m.release(&all);
        let (none, _) = m.lookup(&[1, 2, 3, 4], 4);
        assert!(none.is_empty(), "evicted blocks are no longer found");
    }

    #[test]
    fn disabled_cache_never_matches() {
        let mut m = BlockManager::new(2, 2, false);
        let a = m.allocate(1).unwrap();
        m.register(a[0], 0, &[1, 2]);
        m.release(&a);
        assert!(m.lookup(&[1, 2, 3], 2).0.is_empty());
        assert_eq!(m.available(), 2);
    }
}
