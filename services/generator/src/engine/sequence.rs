//! One sequence on the backend: its tokens, how many of them are computed, its cache blocks and
//! its place on the prefix cache's hash chain.

use crate::backend::AdapterId;
use crate::cache::{BlockTable, ChainStart, KvCache};
use crate::sampler::Sampler;

use super::output::Detokenizer;

/// Copy the keys and values of block `src` into block `dst` (a forked beam's partly filled
/// last block: copy on write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BlockCopy {
    pub src: u32,
    pub dst: u32,
}

/// A running sequence.
pub(super) struct Sequence {
    /// Prompt, then generated tokens (resumed ones first).
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    pub computed: usize,
    /// Its cache blocks, released when the sequence is dropped.
    pub blocks: BlockTable,
    /// Where its block-hash chain starts, the full blocks registered in the prefix cache, and
    /// the last one's hash.
    chain: ChainStart,
    registered: usize,
    last_hash: u64,
    pub sampler: Sampler,
    /// Sum of its generated tokens' log-probabilities.
    pub log_prob: f32,
    /// This step's next-token logits, waiting for the rest of its group's.
    pub logits: Option<Vec<f32>>,
    /// Its text, where the engine itself must read it (a beam's stop strings).
    pub text: Option<Detokenizer>,
    /// The adapter its rows run with.
    pub adapter: AdapterId,
}

impl Sequence {
    /// A sequence over `tokens` (of which the first `prompt_len` are the prompt) holding
    /// `blocks`, whose first `cached` blocks came from the prefix cache and end on `last_hash`.
    pub fn new(
        tokens: Vec<u32>,
        prompt_len: usize,
        blocks: BlockTable,
        cached: (usize, u64),
        chain: ChainStart,
        sampler: Sampler,
        block_size: usize,
    ) -> Self {
        Self {
            tokens,
            prompt_len,
            computed: cached.0 * block_size,
            blocks,
            chain,
            registered: cached.0,
            last_hash: cached.1,
            sampler,
            log_prob: 0.0,
            logits: None,
            text: None,
            adapter: crate::backend::BASE,
        }
    }

    /// Tokens after the prompt (resumed ones included).
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Tokens not yet computed.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Records that a forward pass computed `n` more positions, and registers the blocks that
    /// became full in the prefix cache.
    pub fn advance(&mut self, n: usize, cache: &KvCache) {
        self.computed += n;
        if !cache.enabled() {
            return;
        }
        let bs = cache.block_size();
        while (self.registered + 1) * bs <= self.computed {
            let r = self.registered;
            let parent = self.chain.parent(r, bs, self.last_hash);
            self.last_hash = cache.register(
                self.blocks.ids()[r],
                parent,
                &self.tokens[r * bs..(r + 1) * bs],
            );
            self.registered += 1;
        }
    }

    /// A copy of this beam that shares its full blocks and gets a fresh copy of its last,
    /// partly filled one (the copy to make is returned), so both hold the same keys and values;
    /// `None` when the pool has no blocks for it.
    pub fn fork(&self, cache: &KvCache) -> Option<(Sequence, Option<BlockCopy>)> {
        let bs = cache.block_size();
        let full = self.computed / bs;
        let fresh = cache.allocate(self.blocks.len() - full)?;
        let copy = (!self.computed.is_multiple_of(bs)).then(|| BlockCopy {
            src: self.blocks.ids()[full],
            dst: fresh.ids()[0],
        });
        let mut blocks = self.blocks.share_prefix(full);
        blocks.append(fresh);
        let child = Sequence {
            tokens: self.tokens.clone(),
            prompt_len: self.prompt_len,
            computed: self.computed,
            blocks,
            chain: self.chain,
            registered: self.registered,
            last_hash: self.last_hash,
            sampler: self.sampler.clone(),
            log_prob: self.log_prob,
            logits: None,
            text: self.text.clone(),
            adapter: self.adapter,
        };
        Some((child, copy))
    }
}
