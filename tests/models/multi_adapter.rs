//! Many LoRA adapters in one engine, on the real SmolLM2 weights and real reviews: sequences of
//! different adapters (and of the base model) share a batch and each writes what it writes
//! alone; the prefix cache never shares a block between two adapters; adapters load by name
//! from a directory or from bytes, are checked (base model, shapes, NaN), evicted least
//! recently used within the memory budget unless pinned or running, and a thousand registered
//! adapters keep sixteen resident.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::Path;

use ghostwriter_generator::adapter::Adapter;
use ghostwriter_generator::backend::AdapterShape;
use ghostwriter_generator::engine::{
    AdapterSettings, Engine, EngineConfig, EngineError, Event, Input, Job, Params,
};
use ghostwriter_generator::prompt::{DEFAULT_SYSTEM, Parts};
use ghostwriter_generator::{LanguageModel, LoadOptions};

fn model_path() -> std::path::PathBuf {
    common::model_dir().join(ghostwriter_common::models::GENERATOR_Q8_0)
}

/// The engine over the native CPU model with adapters from `dir` within `memory_mb`; the
/// adapters' shape and the model's sha256.
fn engine(dir: &Path, memory_bytes: usize) -> (Engine, AdapterShape, String) {
    let sha = ghostwriter_common::models::sha256_file(&model_path()).unwrap();
    let model = LanguageModel::load(
        &model_path(),
        &LoadOptions {
            model_sha256: Some(sha.clone()),
            ..LoadOptions::cpu(2048, 128)
        },
    )
    .unwrap();
    let shape = model.backend.adapter_shape().unwrap();
    let engine = Engine::start(
        model,
        EngineConfig {
            queue_capacity: 64,
            system: DEFAULT_SYSTEM.into(),
            repeat_last_n: 64,
            max_running: 16,
            max_batch_tokens: 256,
            prefix_cache: true,
            adapters: AdapterSettings {
                dir: Some(dir.to_path_buf()),
                memory_bytes,
            },
        },
    );
    (engine, shape, sha)
}

/// A seeded adapter of the shipped shape (rank 8, seven projections, every layer), written to
/// `dir/name.safetensors`; its weight bytes.
fn write_adapter(dir: &Path, name: &str, shape: &AdapterShape, seed: u64, sha: &str) -> usize {
    let a = Adapter::seeded(shape, 8, 0.08, seed, sha);
    a.save(&dir.join(format!("{name}.safetensors"))).unwrap();
    a.weight_bytes()
}

fn params(adapter: &str, max_new_tokens: usize) -> Params {
    Params {
        max_new_tokens,
        repeat_penalty: 1.1,
        ignore_eos: true,
        adapter: adapter.into(),
        ..Params::default()
    }
}

/// Real reviews: a few users' earlier reviews and a later start.
fn inputs(n: usize) -> Vec<Input> {
    let path = common::amazon_docs().expect("the review data");
    let docs = ghostwriter::loaders::load(&path).unwrap().documents;
    let mut by_user: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for d in docs {
        by_user.entry(d.user_id).or_default().push(d.text);
    }
    let inputs: Vec<Input> = by_user
        .into_values()
        .filter(|t| t.len() >= 3 && t.iter().all(|x| x.len() > 40))
        .take(n)
        .map(|mut t| {
            let last = t.pop().unwrap();
            t.truncate(2);
            Input::Personalized(Parts {
                passage_start: last.chars().take(80).collect(),
                past_passages: t,
                ..Default::default()
            })
        })
        .collect();
    assert_eq!(inputs.len(), n);
    inputs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_batch_of_adapters_writes_what_each_writes_alone() {
    let _slot = common::slot(module_path!());
    if common::amazon_docs().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (e, shape, sha) = engine(dir.path(), 256 << 20);
    for (i, name) in ["a0", "a1", "a2"].iter().enumerate() {
        write_adapter(dir.path(), name, &shape, 100 + i as u64, &sha);
    }
    let names = ["base", "a0", "a1", "a2"];
    let inputs = inputs(8);
    let job = |i: usize, adapter: &'static str| {
        let e = e.clone();
        let input = inputs[i].clone();
        async move { e.generate(input, params(adapter, 12), None).await.unwrap() }
    };
    // Each case alone with its adapter, and alone on the base model.
    let mut alone = Vec::new();
    let mut base = Vec::new();
    for i in 0..inputs.len() {
        alone.push(job(i, names[i % 4]).await);
        base.push(job(i, "base").await.tokens);
    }
    // All at once: four adapters (base included) in every forward pass.
    let together = futures::future::join_all((0..inputs.len()).map(|i| job(i, names[i % 4]))).await;
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(
            a.tokens,
            t.tokens,
            "case {i} ({}): mixed batch differs",
            names[i % 4]
        );
        assert_eq!(a.adapter, t.adapter);
    }
    assert_eq!(together[0].adapter, "", "the base model names no adapter");
    assert!(
        together[1].adapter.starts_with("a0@"),
        "{}",
        together[1].adapter
    );
    let changed = (0..inputs.len())
        .filter(|&i| i % 4 != 0 && alone[i].tokens != base[i])
        .count();
    assert!(
        changed >= 5,
        "the adapters changed only {changed} of 6 outputs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_adapters_never_share_a_cached_block() {
    let _slot = common::slot(module_path!());
    if common::amazon_docs().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (e, shape, sha) = engine(dir.path(), 256 << 20);
    write_adapter(dir.path(), "a0", &shape, 1, &sha);
    write_adapter(dir.path(), "a1", &shape, 2, &sha);
    let input = inputs(1).remove(0);
    let run = |adapter: &'static str| {
        let (e, input) = (e.clone(), input.clone());
        async move { e.generate(input, params(adapter, 4), None).await.unwrap() }
    };
    let first = run("a0").await;
    assert_eq!(first.cached_tokens, 0);
    let again = run("a0").await;
    assert!(
        again.cached_tokens >= first.prompt_tokens / 2,
        "the same adapter reuses its blocks: {} of {}",
        again.cached_tokens,
        first.prompt_tokens
    );
    assert_eq!(again.tokens, first.tokens);
    // The same tokens under another adapter, or none, have other keys and values: not one
    // block is shared, the instruction's included.
    assert_eq!(run("a1").await.cached_tokens, 0);
    assert_eq!(run("base").await.cached_tokens, 0);
    assert!(run("a1").await.cached_tokens > 0);
}

fn info(e: &Engine, name: &str) -> ghostwriter_generator::engine::AdapterInfo {
    e.adapters()
        .list()
        .into_iter()
        .find(|a| a.name == name)
        .unwrap_or_else(|| panic!("{name} is not listed"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_load_check_evict_and_stay_while_running() {
    let _slot = common::slot(module_path!());
    let dir = tempfile::tempdir().unwrap();
    // Room for two adapters of the shipped shape.
    let probe = tempfile::tempdir().unwrap();
    let (probe_engine, shape, sha) = engine(probe.path(), 0);
    drop(probe_engine);
    let size = Adapter::seeded(&shape, 8, 0.02, 0, &sha).weight_bytes();
    let (e, _, _) = engine(dir.path(), size * 5 / 2);
    for (i, name) in ["a0", "a1", "a2", "a3"].iter().enumerate() {
        write_adapter(dir.path(), name, &shape, i as u64, &sha);
    }
    let a = e.adapters();
    assert!(a.load("a0", None, false).unwrap().resident);
    a.load("a1", None, false).unwrap();
    // A third evicts the least recently used.
    drop(a.resolve("a2").unwrap());
    assert!(!info(&e, "a0").resident);
    assert_eq!(info(&e, "a0").evictions, 1);
    assert!(info(&e, "a1").resident && info(&e, "a2").resident);
    // Pinned, a1 stays; a2 goes.
    assert!(a.load("a1", None, true).unwrap().pinned);
    drop(a.resolve("a3").unwrap());
    assert!(info(&e, "a1").resident && !info(&e, "a2").resident);

    // A job running on a3 keeps it: no unload, no eviction.
    let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
    e.submit(Job {
        input: Input::Instruction("Write a long story about a lighthouse.".into()),
        params: params("a3", 400),
        events,
        deadline: None,
    })
    .unwrap();
    assert!(matches!(rx.recv().await, Some(Event::Text(_))));
    assert_eq!(info(&e, "a3").running, 1);
    assert!(matches!(
        a.unload("a3"),
        Err(EngineError::FailedPrecondition(_))
    ));
    assert!(matches!(
        a.resolve("a0"),
        Err(EngineError::ResourceExhausted(_))
    ));
    drop(rx); // the caller goes away: the job ends and lets go of a3
    let waited = std::time::Instant::now();
    while info(&e, "a3").running > 0 {
        assert!(
            waited.elapsed().as_secs() < 30,
            "the job never let go of a3"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    a.unload("a3").unwrap();
    assert!(!info(&e, "a3").resident);
    assert!(matches!(a.unload("nope"), Err(EngineError::NotFound(_))));

    // Names are names, never paths; unknown names and bad files are refused with the reason.
    for bad in ["../a0", "a/b", ".hidden", ""] {
        assert!(
            matches!(
                a.load(bad, None, false),
                Err(EngineError::InvalidArgument(_))
            ),
            "{bad:?}"
        );
    }
    assert!(
        matches!(a.resolve("nope"), Err(EngineError::InvalidArgument(m)) if m.contains("unknown"))
    );
    let mut nan = Adapter::seeded(&shape, 8, 0.02, 9, &sha);
    nan.pairs.values_mut().next().unwrap().b[3] = f32::NAN;
    let refused = a.load("nan", Some(nan.to_bytes().unwrap()), false);
    assert!(matches!(refused, Err(EngineError::InvalidArgument(m)) if m.contains("NaN")));
    let other = Adapter::seeded(&shape, 8, 0.02, 9, &"0".repeat(64));
    let refused = a.load("other", Some(other.to_bytes().unwrap()), false);
    assert!(matches!(refused, Err(EngineError::InvalidArgument(m)) if m.contains("base model")));
    let mut narrow = shape.clone();
    narrow.widths.insert("attn_q".into(), (64, 64));
    let wrong = Adapter::seeded(&narrow, 8, 0.02, 9, &sha);
    let refused = a.load("wrong", Some(wrong.to_bytes().unwrap()), false);
    assert!(
        matches!(refused, Err(EngineError::InvalidArgument(_))),
        "{refused:?}"
    );
    // Bytes register a name that jobs then use; the same name with other bytes is refused
    // while resident.
    let given = Adapter::seeded(&shape, 8, 0.02, 11, &sha);
    assert!(
        a.load("given", Some(given.to_bytes().unwrap()), false)
            .unwrap()
            .resident
    );
    let refused = a.load("given", Some(nan.to_bytes().unwrap()), false);
    assert!(matches!(refused, Err(EngineError::FailedPrecondition(_))));
    let s = e
        .generate(
            Input::Instruction("Say hello.".into()),
            params("given", 3),
            None,
        )
        .await
        .unwrap();
    assert!(s.adapter.starts_with("given@"), "{}", s.adapter);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_registered_adapters_keep_sixteen_resident() {
    let _slot = common::slot(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let probe = tempfile::tempdir().unwrap();
    let (probe_engine, shape, sha) = engine(probe.path(), 0);
    drop(probe_engine);
    // Small adapters (rank 1 on one projection of one layer) keep the directory small.
    let small = AdapterShape {
        layers: 1,
        widths: [("attn_q".to_string(), shape.widths["attn_q"])].into(),
    };
    let mut size = 0;
    for i in 0..1000 {
        let a = Adapter::seeded(&small, 1, 0.02, i, &sha);
        size = a.weight_bytes();
        a.save(&dir.path().join(format!("t{i:04}.safetensors")))
            .unwrap();
    }
    let (e, _, _) = engine(dir.path(), size * 16);
    assert_eq!(e.adapters().list().len(), 1000);
    for i in 0..1000 {
        drop(e.adapters().resolve(&format!("t{i:04}")).unwrap());
    }
    let list = e.adapters().list();
    assert_eq!(list.len(), 1000);
    let resident: Vec<&str> = list
        .iter()
        .filter(|a| a.resident)
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(resident.len(), 16);
    assert_eq!(resident[0], "t0984", "the sixteen most recently used stay");
    let s = e
        .generate(
            Input::Instruction("Say hello.".into()),
            params("t0999", 2),
            None,
        )
        .await
        .unwrap();
    assert_eq!(s.generated_tokens, 2);
}

/// Logits of the last token of each of `prompts` (with its adapter id), all in one forward pass
/// or each alone.
fn step_logits(
    backend: &mut dyn ghostwriter_generator::backend::Backend,
    prompts: &[(Vec<u32>, u32)],
    together: bool,
) -> Vec<Vec<f32>> {
    use ghostwriter_generator::backend::SeqStep;
    // Each prompt in blocks of its own.
    let mut next = 0u32;
    let blocks: Vec<Vec<u32>> = prompts
        .iter()
        .map(|(ids, _)| {
            let n = ids.len().div_ceil(16) as u32;
            next += n;
            (next - n..next).collect()
        })
        .collect();
    let steps: Vec<SeqStep<'_>> = prompts
        .iter()
        .zip(&blocks)
        .map(|((ids, adapter), blocks)| SeqStep {
            tokens: ids,
            start: 0,
            blocks,
            logits: true,
            adapter: *adapter,
        })
        .collect();
    if together {
        backend.forward(&steps).unwrap()
    } else {
        steps
            .iter()
            .map(|s| backend.forward(std::slice::from_ref(s)).unwrap().remove(0))
            .collect()
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let n = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

fn argmax(v: &[f32]) -> usize {
    ghostwriter_generator::sampler::argmax(v) as usize
}

#[test]
fn candle_serves_a_mixed_batch_of_adapters_as_each_alone_and_as_the_native_engine() {
    let _slot = common::slot(module_path!());
    let sha = ghostwriter_common::models::sha256_file(&model_path()).unwrap();
    let options = LoadOptions {
        model_sha256: Some(sha.clone()),
        ..LoadOptions::cpu(1024, 64)
    };
    let native = LanguageModel::load(&model_path(), &options).unwrap();
    let prompter = native.prompter;
    let mut native = native.backend;
    let mut candle = ghostwriter_generator::gpu::CandleModel::load(
        &model_path(),
        &candle_core::Device::Cpu,
        &options,
    )
    .unwrap();
    let shape = native.adapter_shape().unwrap();
    assert_eq!(
        Some(&shape),
        ghostwriter_generator::backend::Backend::adapter_shape(&candle).as_ref()
    );
    for id in [2, 3] {
        let a = Adapter::seeded(&shape, 8, 0.08, id as u64, &sha);
        native.install_adapter(id, &a).unwrap();
        ghostwriter_generator::backend::Backend::install_adapter(&mut candle, id, &a).unwrap();
    }
    let prompt = |text: &str| {
        prompter
            .encode(&ghostwriter_generator::prompt::instruction(
                DEFAULT_SYSTEM,
                text,
            ))
            .unwrap()
    };
    let prompts = vec![
        (prompt("Describe a quiet harbour at dawn."), 2),
        (prompt("Describe a quiet harbour at dawn."), 0),
        (prompt("Review a pair of headphones."), 3),
        (prompt("Review a pair of headphones."), 2),
    ];
    let candle_mixed = step_logits(&mut candle, &prompts, true);
    let candle_alone = step_logits(&mut candle, &prompts, false);
    let native_mixed = step_logits(native.as_mut(), &prompts, true);
    let native_alone = step_logits(native.as_mut(), &prompts, false);
    for i in 0..prompts.len() {
        assert_eq!(
            native_mixed[i], native_alone[i],
            "native row {i}: mixed differs"
        );
        let c = cosine(&candle_mixed[i], &candle_alone[i]);
        assert!(c > 0.99999, "candle row {i}: mixed vs alone cosine {c}");
        assert_eq!(argmax(&candle_mixed[i]), argmax(&candle_alone[i]));
        let c = cosine(&candle_mixed[i], &native_mixed[i]);
        assert!(c > 0.99, "row {i}: candle vs native cosine {c}");
    }
    // The adapters change the logits: the same prompt under adapter 2 and the base model,
    // under adapters 3 and 2.
    for (a, b) in [(0, 1), (2, 3)] {
        let c = cosine(&candle_mixed[a], &candle_mixed[b]);
        assert!(c < 0.9995, "rows {a} and {b} barely differ: cosine {c}");
    }
}
