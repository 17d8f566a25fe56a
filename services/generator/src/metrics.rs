//! The generator's own metrics: queue, running batch, tokens, prefix cache, beam search, decode
//! rate. A value made by whoever runs an engine, fed by the engine's step statistics, and
//! registered in the process's registry when the generator serves.

use ghostwriter_transport::metrics::LATENCY_BUCKETS;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

use crate::engine::{AdapterEvent, Stats, StepStats};

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
    /// Share of the key/value cache held by running sequences.
    pub kv_cache_usage: prometheus::Gauge,
    /// Time between two pieces of a stream's text.
    pub inter_token_latency: Histogram,
    /// 1 while an adapter is resident, by adapter.
    pub adapter_resident: IntGaugeVec,
    /// Times an adapter was made resident, by adapter.
    pub adapter_loads: IntCounterVec,
    /// Times an adapter was evicted to make room, by adapter.
    pub adapter_evictions: IntCounterVec,
    /// Time to read, check and install an adapter.
    pub adapter_load_seconds: Histogram,
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
        kv_cache_usage: prometheus::Gauge::new(
            "ghostwriter_generator_kv_cache_usage_ratio",
            "Share of the key/value cache's blocks held by running sequences (0..1)",
        )?,
        inter_token_latency: Histogram::with_opts(
            HistogramOpts::new(
                "ghostwriter_generator_inter_token_latency_seconds",
                "Time between two pieces of a streamed generation's text",
            )
            .buckets(vec![
                0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
            ]),
        )?,
        adapter_resident: IntGaugeVec::new(
            Opts::new(
                "ghostwriter_generator_adapter_resident",
                "1 while the LoRA adapter is resident on this worker",
            ),
            &["adapter"],
        )?,
        adapter_loads: IntCounterVec::new(
            Opts::new(
                "ghostwriter_generator_adapter_loads_total",
                "Times a LoRA adapter was made resident",
            ),
            &["adapter"],
        )?,
        adapter_evictions: IntCounterVec::new(
            Opts::new(
                "ghostwriter_generator_adapter_evictions_total",
                "Times a LoRA adapter was evicted to make room for another",
            ),
            &["adapter"],
        )?,
        adapter_load_seconds: Histogram::with_opts(
            HistogramOpts::new(
                "ghostwriter_generator_adapter_load_seconds",
                "Time to read, check and install a LoRA adapter",
            )
            .buckets(latency()),
        )?,
    })
}

impl GeneratorMetrics {
    /// Every metric at zero, registered nowhere yet.
    pub fn new() -> Self {
        build().expect("metric definitions are valid")
    }

    /// Registers every metric in `registry`.
    pub fn register(&self, registry: &ghostwriter_transport::Metrics) {
        registry.register(self.generator_queue_depth.clone());
        registry.register(self.generator_running.clone());
        registry.register(self.generator_queue_wait.clone());
        registry.register(self.generator_time_to_first_token.clone());
        registry.register(self.generator_batch_tokens.clone());
        registry.register(self.generator_prompt_tokens.clone());
        registry.register(self.generator_prefix_cache_hit_tokens.clone());
        registry.register(self.generated_tokens.clone());
        registry.register(self.generator_beam_searches.clone());
        registry.register(self.generator_beam_forks.clone());
        registry.register(self.decode_tokens_per_second.clone());
        registry.register(self.kv_cache_usage.clone());
        registry.register(self.inter_token_latency.clone());
        registry.register(self.adapter_resident.clone());
        registry.register(self.adapter_loads.clone());
        registry.register(self.adapter_evictions.clone());
        registry.register(self.adapter_load_seconds.clone());
    }

    /// Records what happened to an adapter.
    pub fn record_adapter(&self, e: &AdapterEvent) {
        match e {
            AdapterEvent::Loaded(name, took) => {
                self.adapter_resident.with_label_values(&[name]).set(1);
                self.adapter_loads.with_label_values(&[name]).inc();
                self.adapter_load_seconds.observe(took.as_secs_f64());
            }
            AdapterEvent::Evicted(name) => {
                self.adapter_resident.with_label_values(&[name]).set(0);
                self.adapter_evictions.with_label_values(&[name]).inc();
            }
            AdapterEvent::Unloaded(name) => {
                self.adapter_resident.with_label_values(&[name]).set(0);
            }
        }
    }

    /// Records an engine step's statistics.
    pub fn record_step(&self, s: &StepStats) {
        self.generator_queue_depth.set(s.waiting as i64);
        self.generator_running.set(s.running as i64);
        self.kv_cache_usage.set(s.kv_cache_usage);
        if s.batch_tokens > 0 {
            self.generator_batch_tokens.observe(s.batch_tokens as f64);
        }
        for a in &s.admitted {
            self.generator_queue_wait
                .observe(a.queue_wait.as_secs_f64());
            self.generator_prompt_tokens.inc_by(a.prompt_tokens as u64);
            self.generator_prefix_cache_hit_tokens
                .inc_by(a.cached_tokens as u64);
            if a.beams > 1 {
                self.generator_beam_searches.inc();
            }
        }
        for t in &s.first_tokens {
            self.generator_time_to_first_token.observe(t.as_secs_f64());
        }
        self.generated_tokens.inc_by(s.sampled_tokens as u64);
        self.generator_beam_forks.inc_by(s.beam_forks as u64);
    }

    /// Records a finished job's decode rate.
    pub fn record_finished(&self, stats: &Stats) {
        if stats.tokens_per_second > 0.0 {
            self.decode_tokens_per_second
                .observe(stats.tokens_per_second);
        }
    }
}

impl Default for GeneratorMetrics {
    fn default() -> Self {
        Self::new()
    }
}
