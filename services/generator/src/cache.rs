//! Key/value cache blocks and the prefix cache over them.
//!
//! The cache is a pool of fixed-size blocks; a sequence holds a table of blocks (a
//! [`BlockTable`], which gives them back when it is dropped, so no path that ends a sequence
//! can forget them). Every full block of computed tokens is registered under a hash chained
//! over the sequence's token prefix (the hash of the block's tokens and its parent block's
//! hash), so a later request whose prompt starts with the same tokens takes the same blocks and
//! prefills only the rest (what vLLM calls automatic prefix caching). Shared blocks are full and
//! never written again; new tokens always go to a sequence's own blocks. Blocks of finished
//! sequences stay registered and are evicted least recently used first when the pool runs out.
//!
//! A chain does not start from nothing: its [`ChainStart`] holds what else, besides the tokens,
//! decides whether keys and values may be shared: the weights they were computed with, and the
//! caller's cache salt, chained in where the template prefix that every caller shares ends.
//!
//! A deleted user's blocks are not evicted when the user is deleted: no API reads a block back
//! (its keys and values, or the token ids of its key); a block is only reused by a request with
//! the same cache salt whose prompt starts with the very same tokens, which only a caller who
//! already has that text can send, and what it reuses are attention keys and values, never
//! text. The blocks leave as the pool turns over (least recently used first).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::rc::Rc;

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

/// Where a sequence's block-hash chain starts: what, besides its tokens, decides which cached
/// blocks it may share. Two sequences share a block only if their chains agree on everything
/// up to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChainStart {
    /// Keys every block, the first included: the weights the keys and values are computed
    /// with (0 = the base model; an adapter's content hash otherwise).
    pub weights: u64,
    /// The caller's cache salt, hashed (`None`: shared with every caller without one).
    pub salt: Option<u64>,
    /// Blocks wholly before this many tokens (the template's instruction, before the first
    /// caller-supplied token) are hashed without the salt, so every caller shares them; the
    /// salt enters the chain at the first block that reaches past it.
    pub shared_prefix: usize,
}

impl ChainStart {
    /// The start of a chain salted with `salt` (none if empty) after `shared_prefix` tokens.
    pub fn new(salt: &[u8], shared_prefix: usize) -> Self {
        let salt = (!salt.is_empty()).then(|| {
            let mut h = ahash::AHasher::default();
            b"cache salt".hash(&mut h);
            salt.hash(&mut h);
            h.finish()
        });
        Self {
            weights: 0,
            salt,
            shared_prefix,
        }
    }

    /// The parent hash block `index` is chained to, given the hash of the block before it
    /// (ignored for the first block).
    pub fn parent(&self, index: usize, block_size: usize, previous: u64) -> u64 {
        let parent = if index == 0 { self.weights } else { previous };
        match self.salt {
            Some(salt) if index == self.shared_prefix / block_size.max(1) => {
                let mut h = ahash::AHasher::default();
                parent.hash(&mut h);
                salt.hash(&mut h);
                h.finish()
            }
            _ => parent,
        }
    }
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

    /// Takes the longest run of cached blocks that starts `tokens` on the chain from `start`,
    /// covering at most `max_tokens` positions; returns them (referenced) with the hash of the
    /// last one.
    pub fn lookup(
        &mut self,
        tokens: &[u32],
        max_tokens: usize,
        start: &ChainStart,
    ) -> (Vec<u32>, u64) {
        let mut out = Vec::new();
        let mut previous = 0u64;
        if !self.enabled {
            return (out, previous);
        }
        let bs = self.block_size;
        for (i, chunk) in tokens[..max_tokens.min(tokens.len())]
            .chunks_exact(bs)
            .enumerate()
        {
            let parent = start.parent(i, bs, previous);
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
            previous = h;
        }
        (out, previous)
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
    fn release(&mut self, blocks: &[u32]) {
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

/// The block pool as the engine thread's sequences share it: block tables taken from it give
/// their blocks back when dropped. Single-threaded, like the engine loop that owns it.
#[derive(Clone)]
pub struct KvCache(Rc<RefCell<BlockManager>>);

impl KvCache {
    /// A pool of `blocks` blocks of `block_size` positions; `prefix_cache` turns reuse on.
    pub fn new(blocks: usize, block_size: usize, prefix_cache: bool) -> Self {
        Self(Rc::new(RefCell::new(BlockManager::new(
            blocks,
            block_size,
            prefix_cache,
        ))))
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.0.borrow().block_size()
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.0.borrow().total()
    }

    /// Blocks that can be handed out now.
    pub fn available(&self) -> usize {
        self.0.borrow().available()
    }

    /// Whether prefix reuse is on.
    pub fn enabled(&self) -> bool {
        self.0.borrow().enabled()
    }

    /// The cached blocks of the longest prefix of `tokens` (see [`BlockManager::lookup`]),
    /// with the hash of the last one.
    pub fn lookup(
        &self,
        tokens: &[u32],
        max_tokens: usize,
        start: &ChainStart,
    ) -> (BlockTable, u64) {
        let (ids, hash) = self.0.borrow_mut().lookup(tokens, max_tokens, start);
        (self.table(ids), hash)
    }

    /// `n` fresh blocks, or `None` (and nothing taken) when the pool cannot.
    pub fn allocate(&self, n: usize) -> Option<BlockTable> {
        let ids = self.0.borrow_mut().allocate(n)?;
        Some(self.table(ids))
    }

    /// Registers full block `b` holding `tokens` after `parent` (see
    /// [`BlockManager::register`]); returns its hash.
    pub fn register(&self, b: u32, parent: u64, tokens: &[u32]) -> u64 {
        self.0.borrow_mut().register(b, parent, tokens)
    }

    fn table(&self, ids: Vec<u32>) -> BlockTable {
        BlockTable {
            ids,
            cache: self.clone(),
        }
    }
}

/// A sequence's cache blocks in position order; dropping the table releases them.
pub struct BlockTable {
    ids: Vec<u32>,
    cache: KvCache,
}

impl BlockTable {
    /// The block ids.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no block is held.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Appends `other`'s blocks (which this table now releases).
    pub fn append(&mut self, mut other: BlockTable) {
        self.ids.append(&mut other.ids);
    }

    /// Another table holding the first `n` blocks too (one more reference to each): a forked
    /// beam's share of its parent's full blocks.
    pub fn share_prefix(&self, n: usize) -> BlockTable {
        let ids = self.ids[..n].to_vec();
        self.cache.0.borrow_mut().share(&ids);
        self.cache.table(ids)
    }
}

impl Drop for BlockTable {
    fn drop(&mut self) {
        if !self.ids.is_empty() {
            self.cache.0.borrow_mut().release(&self.ids);
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
        let (hit, _) = m.lookup(&[1, 2, 3, 4, 5], 4, &ChainStart::default());
        assert_eq!(hit, a);
        // A different second block shares only the first.
        let (hit2, _) = m.lookup(&[1, 2, 9, 9], 4, &ChainStart::default());
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
        let (none, _) = m.lookup(&[1, 2, 3, 4], 4, &ChainStart::default());
        assert!(none.is_empty(), "evicted blocks are no longer found");
    }

    #[test]
    fn salted_chains_share_only_the_template_prefix() {
        let bs = 2;
        let tokens = [1, 2, 3, 4, 5, 6, 7];
        let mut m = BlockManager::new(16, bs, true);
        // A sequence's three full blocks, registered along its chain.
        let fill = |m: &mut BlockManager, start: &ChainStart| {
            let blocks = m.allocate(3).unwrap();
            let mut previous = 0;
            for (i, &b) in blocks.iter().enumerate() {
                let parent = start.parent(i, bs, previous);
                previous = m.register(b, parent, &tokens[i * bs..(i + 1) * bs]);
            }
            blocks
        };
        // Three template tokens: block 0 is wholly before the first caller token.
        let alice = ChainStart::new(b"alice", 3);
        let bob = ChainStart::new(b"bob", 3);
        let a = fill(&mut m, &alice);
        let (hit, _) = m.lookup(&tokens, 6, &bob);
        assert_eq!(hit, a[..1], "another salt shares the template block only");
        m.release(&hit);
        let (hit, _) = m.lookup(&tokens, 6, &ChainStart::default());
        assert_eq!(hit, a[..1], "so does a request without a salt");
        m.release(&hit);
        let (hit, _) = m.lookup(&tokens, 6, &alice);
        assert_eq!(hit, a, "the same salt finds its own blocks");
        m.release(&hit);
        let adapter = ChainStart {
            weights: 7,
            ..alice
        };
        assert!(
            m.lookup(&tokens, 6, &adapter).0.is_empty(),
            "other weights share nothing, not even the template"
        );
        // Bob's own blocks past the template are his, and Alice does not find them.
        let b = fill(&mut m, &bob);
        assert!(b.iter().all(|x| !a.contains(x)));
        let (hit, _) = m.lookup(&tokens, 6, &bob);
        assert_eq!(hit[1..], b[1..], "bob's repeated prompt hits his blocks");
        m.release(&hit);
        m.release(&a);
        m.release(&b);
    }

    #[test]
    fn disabled_cache_never_matches() {
        let mut m = BlockManager::new(2, 2, false);
        let a = m.allocate(1).unwrap();
        m.register(a[0], 0, &[1, 2]);
        m.release(&a);
        assert!(m.lookup(&[1, 2, 3], 2, &ChainStart::default()).0.is_empty());
        assert_eq!(m.available(), 2);
    }
}
