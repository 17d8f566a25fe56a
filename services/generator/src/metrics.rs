//! The generator's own metrics: queue, running batch, tokens, prefix cache, beam search, decode
//! rate. Registered in the process's registry by [`register`] when the generator serves.

use std::sync::LazyLock;

use ghostwriter_transport::metrics::LATENCY_BUCKETS;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge};

/// Every generator metric.
pub struct GeneratorMetrics {
    /// Jobs waiting for admission to the running batch.
    pub generator_queue_depth: IntGauge,
    /// Sequences in the running batch.
    pub generator_running: IntGauge,
    /// Submission to admission.
    pub generator_queue_wait: Histogram,
    /// Submission to first generated token.
    pub generator_time_to_first_token: Histogram,
    /// Tokens per forward pass (decode tokens plus prefill chunks).
    pub generator_batch_tokens: Histogram,
    /// Prompt tokens admitted.
    pub generator_prompt_tokens: IntCounter,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub generator_prefix_cache_hit_tokens: IntCounter,
    /// Tokens generated.
    pub generated_tokens: IntCounter,
    /// Beam searches admitted.
    pub generator_beam_searches: IntCounter,
    /// Beams forked by beam searches.
    pub generator_beam_forks: IntCounter,
    /// Decode rate of finished jobs, tokens per second.
    pub decode_tokens_per_second: Histogram,
}

fn build() -> Result<GeneratorMetrics, prometheus::Error> {
    let latency = || LATENCY_BUCKETS.to_vec();
    Ok(GeneratorMetrics {
        generator_queue_depth: IntGauge::new(
            "ghostwriter_generator_queue_depth",
            "Generation jobs waiting for admission to the running batch",
        )?,
        generator_running: IntGauge::new(
            "ghostwriter_generator_running",
            "Sequences in the generator's running batch",
        )?,
        generator_queue_wait: Histogram::with_opts(
            HistogramOpts::new(
                "ghostwriter_generator_queue_wait_seconds",
                "Time from submission to admission into the running batch",
            )
            .buckets(latency()),
        )?,
        generator_time_to_first_token: Histogram::with_opts(
            HistogramOpts::new(
                "ghostwriter_generator_time_to_first_token_seconds",
                "Time from submission to the first generated token",
            )
            .buckets(latency()),
        )?,
        generator_batch_tokens: Histogram::with_opts(
            HistogramOpts::new(
                "ghostwriter_generator_batch_tokens",
                "Tokens per forward pass (decode tokens plus prefill chunks)",
            )
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
            ]),
        )?,
        generator_prompt_tokens: IntCounter::new(
            "ghostwriter_generator_prompt_tokens_total",
            "Prompt tokens admitted",
        )?,
        generator_prefix_cache_hit_tokens: IntCounter::new(
            "ghostwriter_generator_prefix_cache_hit_tokens_total",
            "Prompt tokens whose keys and values came from the prefix cache",
        )?,
        generated_tokens: IntCounter::new(
            "ghostwriter_generated_tokens_total",
            "Tokens generated",
        )?,
        generator_beam_searches: IntCounter::new(
            "ghostwriter_generator_beam_searches_total",
            "Beam searches admitted",
        )?,
        generator_beam_forks: IntCounter::new(
            "ghostwriter_generator_beam_forks_total",
            "Beams forked (each shares its parent's full cache blocks and copies its last one)",
        )?,
        decode_tokens_per_second: Histogram::with_opts(
            HistogramOpts::new(
                "ghostwriter_generator_decode_tokens_per_second",
                "Decode rate of finished jobs",
            )
            .buckets(vec![
                5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 120.0, 200.0, 400.0, 800.0,
            ]),
        )?,
    })
}

static METRICS: LazyLock<GeneratorMetrics> =
    LazyLock::new(|| build().expect("metric definitions are valid"));

/// The generator's metrics.
pub fn metrics() -> &'static GeneratorMetrics {
    &METRICS
}

/// Registers every generator metric in `registry`.
pub fn register(registry: &ghostwriter_transport::Metrics) {
    let m = metrics();
    registry.register(m.generator_queue_depth.clone());
    registry.register(m.generator_running.clone());
    registry.register(m.generator_queue_wait.clone());
    registry.register(m.generator_time_to_first_token.clone());
    registry.register(m.generator_batch_tokens.clone());
    registry.register(m.generator_prompt_tokens.clone());
    registry.register(m.generator_prefix_cache_hit_tokens.clone());
    registry.register(m.generated_tokens.clone());
    registry.register(m.generator_beam_searches.clone());
    registry.register(m.generator_beam_forks.clone());
    registry.register(m.decode_tokens_per_second.clone());
}
