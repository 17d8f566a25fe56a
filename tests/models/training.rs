//! Fine-tuning with the real SmolLM2 weights: the training forward pass (candle, from
//! differentiable primitives) gives the serving engine's logits, with and without an adapter
//! (saved, loaded and applied unmerged by the native engine), and optimizer steps lower the
//! loss of a real review.

#![allow(clippy::unwrap_used)]

use crate::common;

use candle_core::{Device, Tensor};
use ghostwriter::train::AdamW;
use ghostwriter::train::model::{Scored, TrainModel};
use ghostwriter_generator::LoadOptions;
use ghostwriter_generator::adapter::{Adapter, PROJECTIONS};
use ghostwriter_generator::model::Prompter;
use ghostwriter_generator::native::NativeModel;
use ghostwriter_generator::prompt::{DEFAULT_SYSTEM, Parts, personalized};

fn model_path() -> std::path::PathBuf {
    common::model_dir().join(ghostwriter_common::models::GENERATOR_Q8_0)
}

/// A prompt over a real review and the review's next words.
fn real_example() -> Option<(Vec<u32>, Vec<u32>)> {
    let path = common::amazon_docs()?;
    let docs = ghostwriter::loaders::load(&path).unwrap().documents;
    let doc = docs.iter().find(|d| d.text.len() > 400).unwrap();
    let prompter = Prompter::load(&model_path()).unwrap();
    let start: String = doc.text.chars().take(150).collect();
    let rest: String = doc.text.chars().skip(150).take(200).collect();
    let prompt = personalized(
        DEFAULT_SYSTEM,
        &Parts {
            passage_start: start,
            ..Default::default()
        },
    );
    Some((
        prompter.encode(&prompt).unwrap(),
        prompter.encode_plain(&rest).unwrap(),
    ))
}

fn load_native(adapter: Option<std::path::PathBuf>) -> anyhow::Result<NativeModel> {
    NativeModel::load(
        &model_path(),
        &LoadOptions {
            adapter,
            ..LoadOptions::cpu(1024, 32)
        },
    )
}

fn native(adapter: Option<std::path::PathBuf>) -> NativeModel {
    load_native(adapter).unwrap()
}

fn serving_logits(model: &mut NativeModel, ids: &[u32]) -> Vec<f32> {
    model.logits_after(ids).unwrap()
}

fn training_logits(model: &TrainModel, ids: &[u32]) -> Vec<f32> {
    let hidden = model.hidden(ids).unwrap();
    model
        .logits(&hidden, &[ids.len() as u32 - 1])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (n(a) * n(b))
}

fn top5(v: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    idx.truncate(5);
    idx
}

fn argmax(v: &[f32]) -> usize {
    ghostwriter_generator::sampler::argmax(v) as usize
}

#[test]
fn training_forward_matches_the_serving_engine_with_and_without_an_adapter() {
    let _slot = crate::common::slot(module_path!());
    let Some((ids, _)) = real_example() else { return };
    let train = TrainModel::load(&model_path(), &Device::Cpu, 4, 8.0, &PROJECTIONS, 7).unwrap();
    let base_train = training_logits(&train, &ids);
    let base_serve = serving_logits(&mut native(None), &ids);
    assert_eq!(argmax(&base_train), argmax(&base_serve));
    assert!(cosine(&base_train, &base_serve) > 0.99);

    // A non-trivial adapter: random B, saved and served by the native engine.
    let mut rng = ghostwriter::eval::Rng::new(3);
    for pair in train.lora.values() {
        let n = pair.b.elem_count();
        let v: Vec<f32> = (0..n).map(|_| (rng.unit() as f32 - 0.5) * 2.0).collect();
        pair.b
            .set(&Tensor::from_vec(v, pair.b.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let tuned_train = training_logits(&train, &ids);
    assert!(
        cosine(&tuned_train, &base_train) < 0.99,
        "the adapter should change the logits: {}",
        cosine(&tuned_train, &base_train)
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adapter.safetensors");
    let sha = ghostwriter_common::models::sha256_file(&model_path()).unwrap();
    train
        .adapter([("base_sha256".to_string(), sha)].into())
        .unwrap()
        .save(&path)
        .unwrap();
    let tuned_serve = serving_logits(&mut native(Some(path.clone())), &ids);
    eprintln!(
        "cosine: tuned/base {:.4}, training/serving base {:.4}, tuned {:.4}",
        cosine(&tuned_train, &base_train),
        cosine(&base_train, &base_serve),
        cosine(&tuned_train, &tuned_serve)
    );
    // The serving engine quantizes activations to 8 bits; with a perturbation this large the
    // top two tokens can swap, so each top token must be in the other's top 5.
    assert!(top5(&tuned_train).contains(&argmax(&tuned_serve)));
    assert!(top5(&tuned_serve).contains(&argmax(&tuned_train)));
    assert!(cosine(&tuned_train, &tuned_serve) > 0.995);

    // An adapter trained on another base is refused.
    let mut other = Adapter::load(&path).unwrap();
    other.metadata.insert("base_sha256".into(), "0".repeat(64));
    other.save(&path).unwrap();
    let err = load_native(Some(path)).err().unwrap();
    assert!(err.to_string().contains("trained on base model"), "{err}");
}

#[test]
fn optimizer_steps_lower_the_loss_of_a_real_review() {
    let _slot = crate::common::slot(module_path!());
    let Some((prompt, answer)) = real_example() else { return };
    let mut ids = prompt.clone();
    ids.extend(&answer);
    let model = TrainModel::load(&model_path(), &Device::Cpu, 8, 16.0, &PROJECTIONS, 1).unwrap();
    let mut opt = AdamW::new(&model, 0.0).unwrap();
    let first = model
        .loss(&ids, prompt.len())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let mut last = first;
    for t in 1..=4 {
        let loss = model.loss(&ids, prompt.len()).unwrap();
        let store = loss.backward().unwrap();
        let grads: Vec<Tensor> = model
            .vars()
            .iter()
            .map(|v| store.get(v.as_tensor()).unwrap().clone())
            .collect();
        opt.step(&model, &grads, 1.0, 1e-3, t).unwrap();
        last = model
            .loss(&ids, prompt.len())
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
    }
    assert!(first.is_finite() && first > 0.5, "{first}");
    assert!(last < first * 0.9, "loss {first} -> {last}");
}

/// Sequences of different lengths run as one padded batch give the loss and the gradients of
/// each run alone (summed with their weights): padding at the end is never attended to.
#[test]
fn a_padded_batch_gives_each_sequences_own_loss_and_gradients() {
    let _slot = crate::common::slot(module_path!());
    let Some((prompt, answer)) = real_example() else { return };
    let long: Vec<u32> = prompt.iter().chain(&answer).copied().collect();
    let short: Vec<u32> = prompt
        .iter()
        .chain(&answer[..answer.len() / 3])
        .copied()
        .collect();
    // A third sequence with another prompt length: the answer's tail, predicted from its head.
    let third: Vec<u32> = answer.clone();
    let model = TrainModel::load(&model_path(), &Device::Cpu, 8, 16.0, &PROJECTIONS, 3).unwrap();
    // One optimizer step first, so that the B matrices are not zero and every variable gets a
    // gradient.
    let mut opt = AdamW::new(&model, 0.0).unwrap();
    let grads_of = |loss: &Tensor| -> Vec<Vec<f32>> {
        let store = loss.backward().unwrap();
        model
            .vars()
            .iter()
            .map(|v| {
                store
                    .get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect()
    };
    let warm = model.loss(&long, prompt.len()).unwrap();
    let g: Vec<Tensor> = grads_of(&warm)
        .into_iter()
        .zip(model.vars())
        .map(|(g, v)| Tensor::from_vec(g, v.shape(), &Device::Cpu).unwrap())
        .collect();
    opt.step(&model, &g, 1.0, 1e-2, 1).unwrap();

    let seqs = [
        Scored {
            ids: &long,
            prompt: prompt.len(),
            weight: 3.0,
        },
        Scored {
            ids: &short,
            prompt: prompt.len(),
            weight: 1.0,
        },
        Scored {
            ids: &third,
            prompt: answer.len() / 2,
            weight: 0.5,
        },
    ];
    let batched = model.weighted_loss(&seqs).unwrap();
    let batched_grads = grads_of(&batched);
    let mut alone = 0.0;
    let mut alone_grads: Vec<Vec<f32>> = Vec::new();
    for s in &seqs {
        let loss = (model.loss(s.ids, s.prompt).unwrap() * s.weight).unwrap();
        alone += loss.to_scalar::<f32>().unwrap();
        for (i, g) in grads_of(&loss).into_iter().enumerate() {
            match alone_grads.get_mut(i) {
                Some(acc) => acc.iter_mut().zip(g).for_each(|(a, b)| *a += b),
                None => alone_grads.push(g),
            }
        }
    }
    let batched = batched.to_scalar::<f32>().unwrap();
    assert!(
        (batched - alone).abs() < 1e-4 * alone.abs(),
        "batched {batched}, alone {alone}"
    );
    let flat = |g: &[Vec<f32>]| g.concat();
    let (b, a) = (flat(&batched_grads), flat(&alone_grads));
    let norm = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let diff = b
        .iter()
        .zip(&a)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f32>()
        .sqrt();
    assert!(
        norm > 0.0 && diff < 1e-3 * norm,
        "gradient difference {diff} of norm {norm}"
    );
}

/// `train --resume` over an example cache with an explicit `--model` (how a GPU worker given
/// only the base GGUF and `examples.jsonl` trains): no model is pulled, `--max-steps` stops the
/// run after that many optimizer steps, and the adapter written then records them; resuming
/// refuses other settings and, with the same ones, finishes the epoch.
#[test]
fn train_from_a_cache_stops_at_max_steps_without_pulling_models() {
    let _slot = crate::common::slot(module_path!());
    let Some((prompt, answer)) = real_example() else { return };
    let out = tempfile::tempdir().unwrap();
    let empty_models = tempfile::tempdir().unwrap();
    let mut ids = prompt.clone();
    ids.extend(&answer[..answer.len().min(24)]);
    let example = |user: &str| ghostwriter::train::data::TrainExample {
        task: ghostwriter::train::data::Task::Generation,
        preset: "immediate-context".into(),
        user_id: user.into(),
        ids: ids.clone(),
        prompt: prompt.len(),
    };
    let mut cache = String::new();
    for (is_val, user) in [(false, "a"), (false, "b"), (false, "c"), (true, "v")] {
        cache += &serde_json::to_string(&(is_val, example(user))).unwrap();
        cache.push('\n');
    }
    std::fs::write(out.path().join("examples.jsonl"), cache).unwrap();
    let train = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ghostwriter"))
            .env("GHOSTWRITER_MODEL_DIR", empty_models.path())
            .args(["train", "--resume", "--grad-accum", "1"])
            .args(extra)
            .arg("--model")
            .arg(model_path())
            .arg("--out")
            .arg(out.path())
            .output()
            .unwrap()
    };
    let report = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(out.path().join("train.json")).unwrap()).unwrap()
    };
    let run = train(&["--max-steps", "2"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("after step 2 of 3"), "{stderr}");
    let stopped = report();
    assert_eq!(stopped["steps"], 2, "{stopped}");
    assert_eq!(stopped["total_steps"], 3, "{stopped}");
    assert_eq!(stopped["stopped_early"], true, "{stopped}");
    let adapter = Adapter::load(&out.path().join("adapter.safetensors")).unwrap();
    assert_eq!(adapter.metadata.get("steps").map(String::as_str), Some("2"));
    assert_eq!(
        std::fs::read_dir(empty_models.path()).unwrap().count(),
        0,
        "nothing is pulled"
    );
    // The checkpoint continues only the run that wrote it.
    let other = train(&["--loss-weighting", "example"]);
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success(), "{stderr}");
    assert!(
        stderr.contains("--loss-weighting = token, this run has example"),
        "{stderr}"
    );
    // With the same settings it goes on from step 2 to the end of the epoch.
    let rest = train(&[]);
    let stderr = String::from_utf8_lossy(&rest.stderr);
    assert!(rest.status.success(), "{stderr}");
    assert!(stderr.contains("resuming at step 2"), "{stderr}");
    let finished = report();
    assert_eq!(finished["steps"], 3, "{finished}");
    assert_eq!(finished["stopped_early"], false, "{finished}");
}

/// `--distinction-pairs matched` pairs a start with what the served `Distinguish` compares it
/// with: an earlier document of its author (never its own, never a later one), or a document of
/// the other user, each the retriever's best match for the start, so it shares more of the
/// start's words than the user's typical document; random pairs draw any document.
#[tokio::test(flavor = "multi_thread")]
async fn matched_distinction_pairs_are_the_retrievers_best_matches() {
    let _slot = crate::common::slot(module_path!());
    use ghostwriter::eval::protocol::{self, Split};
    use ghostwriter::train::data::{DistinctionPairs, distinction_partners};
    use std::collections::{BTreeMap, BTreeSet};

    let Some(path) = common::amazon_docs() else { return };
    let dataset = protocol::build(ghostwriter::loaders::load(&path).unwrap().documents);
    // The two training users with the most targets.
    let mut targets: BTreeMap<&str, usize> = BTreeMap::new();
    for e in dataset.examples.iter().filter(|e| e.split == Split::Train) {
        *targets.entry(e.user_id.as_str()).or_default() += 1;
    }
    let mut ranked: Vec<(&str, usize)> = targets.into_iter().collect();
    ranked.sort_by_key(|(u, n)| (std::cmp::Reverse(*n), *u));
    let users: BTreeSet<&str> = ranked.iter().take(2).map(|(u, _)| *u).collect();
    let mut by_user: BTreeMap<String, Vec<ghostwriter_proto::v1::Document>> = BTreeMap::new();
    for d in dataset
        .documents
        .iter()
        .filter(|d| users.contains(d.user_id.as_str()))
    {
        by_user
            .entry(d.user_id.clone())
            .or_default()
            .push(d.clone());
    }
    let documents: Vec<_> = by_user.values().flatten().cloned().collect();
    let starts: Vec<&protocol::Example> = dataset
        .examples
        .iter()
        .filter(|e| users.contains(e.user_id.as_str()))
        .take(8)
        .collect();
    assert!(starts.len() >= 4, "{} starts", starts.len());
    let words = |t: &str| -> BTreeSet<String> {
        t.to_lowercase()
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| w.len() > 3)
            .map(str::to_owned)
            .collect()
    };
    let shared = |e: &protocol::Example, d: &ghostwriter_proto::v1::Document| {
        words(&e.context())
            .intersection(&words(&format!("{} {}", d.title, d.text)))
            .count()
    };
    let (matched, random) = ghostwriter::embedded::Embedded::with_pipeline(
        common::model_dir(),
        None,
        &documents,
        async |embedded| {
            let mut retriever = ghostwriter_proto::v1::retriever_client::RetrieverClient::new(
                ghostwriter_transport::client::channel(&embedded.orchestrator.retriever_url, None)?,
            );
            let matched = distinction_partners(
                &starts,
                &by_user,
                DistinctionPairs::Matched,
                Some(&mut retriever),
                7,
            )
            .await?;
            let random =
                distinction_partners(&starts, &by_user, DistinctionPairs::Random, None, 7).await?;
            Ok((matched, random))
        },
    )
    .await
    .unwrap();
    assert!(matched.len() >= 4, "{} matched pairs", matched.len());
    assert!(matched.iter().any(|p| p.2) && matched.iter().any(|p| !p.2));
    let (mut best, mut typical) = (0, 0);
    for (i, doc, same) in &matched {
        let e = starts[*i];
        assert_eq!(*same, doc.user_id == e.user_id, "{i}");
        assert_eq!(*same, i % 2 == 0, "{i}");
        if *same {
            assert_ne!(doc.doc_id, e.doc_id, "the start's own document");
            assert!(
                doc.timestamp <= e.timestamp,
                "a later document of the author"
            );
        }
        let pool = &by_user[&doc.user_id];
        best += shared(e, doc);
        typical += pool.iter().map(|d| shared(e, d)).sum::<usize>() / pool.len();
    }
    assert!(
        best > typical,
        "matched documents share {best} words with their starts, typical ones {typical}"
    );
    // Random pairs draw from the same users, with the same labels.
    assert_eq!(
        random.iter().map(|p| (p.0, p.2)).collect::<Vec<_>>(),
        matched.iter().map(|p| (p.0, p.2)).collect::<Vec<_>>()
    );
}
