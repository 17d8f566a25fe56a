//! What the engine needs from a model implementation: one batched forward pass over ragged
//! sequences whose keys and values live in blocks of a paged cache.

/// One sequence's share of a forward step.
#[derive(Debug, Clone)]
pub struct SeqStep<'a> {
    /// Tokens fed this step.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`.
    pub start: usize,
    /// The sequence's cache blocks, covering at least `start + tokens.len()` positions.
    pub blocks: &'a [u32],
    /// Whether the logits of the last token are wanted.
    pub logits: bool,
}

/// A batched causal language model over a paged key/value cache.
pub trait Backend: Send {
    /// Runs every sequence's tokens (writing their keys and values into their blocks) and
    /// returns the last-token logits of the sequences that asked for them, in order.
    fn forward(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<Vec<Vec<f32>>>;
    /// Copies the keys and values of block `src` into block `dst`, for each `(src, dst)` (the
    /// partly filled last block of a forked beam: copy on write).
    fn copy_blocks(&mut self, pairs: &[(u32, u32)]) -> anyhow::Result<()>;
    /// Positions per cache block.
    fn block_size(&self) -> usize;
    /// Blocks in the cache.
    fn cache_blocks(&self) -> usize;
    /// Context window in tokens.
    fn context(&self) -> usize;
    /// One line about the implementation (kernel, device, dtype).
    fn describe(&self) -> String;
}
