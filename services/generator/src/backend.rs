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
    /// The adapter its rows run with ([`BASE`] = none), as installed with
    /// [`Backend::install_adapter`].
    pub adapter: AdapterId,
}

/// Names an adapter installed in a backend.
pub type AdapterId = u32;

/// The base model, no adapter.
pub const BASE: AdapterId = 0;

/// The adapter given at load ([`crate::model::LoadOptions::adapter`]), if any.
pub const STARTUP: AdapterId = 1;

/// What an adapter must fit: the model's layer count and each projection's (in, out) widths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterShape {
    /// Decoder layers.
    pub layers: usize,
    /// (in, out) of each projection, by its GGUF name.
    pub widths: std::collections::BTreeMap<String, (usize, usize)>,
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
    /// The shape adapters installed at run time must have; `None` when the backend serves
    /// only the adapter it was loaded with.
    fn adapter_shape(&self) -> Option<AdapterShape> {
        None
    }
    /// Installs `adapter` (already checked against [`Backend::adapter_shape`]) as `id`, which
    /// sequences then name in [`SeqStep::adapter`]; rows of different adapters share a pass.
    fn install_adapter(
        &mut self,
        id: AdapterId,
        adapter: &crate::adapter::Adapter,
    ) -> anyhow::Result<()> {
        let _ = adapter;
        anyhow::bail!(
            "{} serves only the adapter it was loaded with, not #{id}",
            self.describe()
        )
    }
    /// Removes adapter `id` (no sequence names it any more).
    fn remove_adapter(&mut self, id: AdapterId) {
        let _ = id;
    }
}
