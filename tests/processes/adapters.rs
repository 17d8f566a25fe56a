//! The adapter a generator serves by default: `serve generator` serves the shipped fine-tuned
//! adapter on its base model and names it in `Info` and in every response; `--zero-shot` serves
//! the model alone. Adapters loaded at run time over gRPC: by name from `--adapter-dir` or from
//! bytes, used by name in requests, evicted within the memory budget, unloaded.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use ghostwriter::proto::generator_client::GeneratorClient;
use ghostwriter::proto::{
    GenerateRequest, GenerationParams, GeneratorInfoRequest, generate_request::Input,
};
use ghostwriter_runtime::stage_process::StageProcess;

use crate::common;

/// `serve generator` with `extra` flags on a port of its own: its Info and one short answer's
/// model name.
async fn served(extra: &[&str]) -> (String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ghostwriter"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--model-dir"])
        .arg(common::model_dir())
        .arg("generator")
        .args(extra)
        .env("RUST_LOG", "warn");
    let mut process = StageProcess::spawn("generator", cmd).await.unwrap();
    process
        .wait_serving(None, Duration::from_secs(120))
        .await
        .unwrap();
    let mut client = GeneratorClient::connect(process.url().to_string())
        .await
        .unwrap();
    let info = client
        .info(GeneratorInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let answer = client
        .generate(GenerateRequest {
            input: Some(Input::Instruction("Say hello.".into())),
            params: Some(GenerationParams {
                max_new_tokens: 2,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.model, info.model);
    (info.adapter, info.model)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_generator_serves_the_shipped_adapter_unless_zero_shot() {
    let _slot = crate::common::slot(module_path!());
    let (adapter, model) = served(&[]).await;
    assert!(
        adapter.starts_with("smollm2-135m-reviews@"),
        "the shipped adapter by default: {adapter:?}"
    );
    assert!(model.ends_with(&format!("+{adapter}")), "{model}");

    let (adapter, model) = served(&["--zero-shot"]).await;
    assert_eq!(adapter, "", "--zero-shot serves the model alone");
    assert!(!model.contains('+'), "{model}");
}

/// A seeded adapter of the shipped shape for the model under test, as safetensors bytes.
fn seeded_adapter(seed: u64) -> Vec<u8> {
    let model = common::model_dir().join(ghostwriter_common::models::GENERATOR_Q8_0);
    let sha = ghostwriter_common::models::sha256_file(&model).unwrap();
    let loaded = ghostwriter_generator::LanguageModel::load(
        &model,
        &ghostwriter_generator::LoadOptions {
            threads: 1,
            model_sha256: Some(sha.clone()),
            ..ghostwriter_generator::LoadOptions::cpu(256, 1)
        },
    )
    .unwrap();
    let shape = loaded.backend.adapter_shape().unwrap();
    ghostwriter_generator::adapter::Adapter::seeded(&shape, 8, 0.08, seed, &sha)
        .to_bytes()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_load_by_name_or_bytes_serve_requests_evict_and_unload_over_grpc() {
    use ghostwriter::proto::{ListAdaptersRequest, LoadAdapterRequest, UnloadAdapterRequest};
    let _slot = crate::common::slot(module_path!());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("reviews-a.safetensors"), seeded_adapter(1)).unwrap();
    std::fs::write(dir.path().join("reviews-b.safetensors"), seeded_adapter(2)).unwrap();
    let mut cmd = common::ghostwriter();
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--model-dir",
    ])
    .arg(common::model_dir())
    .args(["generator", "--zero-shot", "--adapter-memory-mb", "16"])
    .arg("--adapter-dir")
    .arg(dir.path())
    .env("RUST_LOG", "warn");
    let mut process = common::start("generator", cmd).await;
    common::wait_serving(&mut process, 120).await;
    let metrics = common::metrics_addr(&process);
    let mut client = GeneratorClient::connect(process.url().to_string())
        .await
        .unwrap();
    let write = |adapter: &str| GenerateRequest {
        input: Some(Input::Instruction("Say hello.".into())),
        params: Some(GenerationParams {
            max_new_tokens: 3,
            ..Default::default()
        }),
        adapter: adapter.into(),
        ..Default::default()
    };

    // By name from the directory.
    let loaded = client
        .load_adapter(LoadAdapterRequest {
            name: "reviews-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(loaded.resident && loaded.sha256.len() == 12, "{loaded:?}");
    let a = client
        .generate(write("reviews-a"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        a.model.ends_with(&format!("+reviews-a@{}", loaded.sha256)),
        "{}",
        a.model
    );
    let base = client.generate(write("base")).await.unwrap().into_inner();
    assert!(!base.model.contains('+'), "{}", base.model);
    let unknown = client.generate(write("nope")).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument, "{unknown:?}");
    assert!(unknown.message().contains("unknown adapter"), "{unknown:?}");

    // First use of another name in the directory loads it; 16 MiB hold one: reviews-a goes.
    let b = client
        .generate(write("reviews-b"))
        .await
        .unwrap()
        .into_inner();
    assert!(b.model.contains("+reviews-b@"), "{}", b.model);
    // The bytes of a file, pinned: reviews-b goes, and nothing evicts "given".
    let given = client
        .load_adapter(LoadAdapterRequest {
            name: "given".into(),
            safetensors: seeded_adapter(3),
            pin: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(given.resident && given.pinned);
    let no_room = client.generate(write("reviews-a")).await.unwrap_err();
    assert_eq!(
        no_room.code(),
        tonic::Code::ResourceExhausted,
        "{no_room:?}"
    );
    let list = client
        .list_adapters(ListAdaptersRequest {})
        .await
        .unwrap()
        .into_inner()
        .adapters;
    let by_name = |n: &str| list.iter().find(|a| a.name == n).unwrap().clone();
    assert_eq!(list.len(), 3, "{list:?}");
    assert!(!by_name("reviews-a").resident && by_name("reviews-a").evictions == 1);
    assert!(!by_name("reviews-b").resident && by_name("reviews-b").evictions == 1);
    assert!(by_name("given").resident);

    // Names, never paths; what is not there is NOT_FOUND.
    for (name, code) in [
        ("../reviews-a", tonic::Code::InvalidArgument),
        ("missing", tonic::Code::NotFound),
    ] {
        let e = client
            .load_adapter(LoadAdapterRequest {
                name: name.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{name}: {e:?}");
    }
    client
        .unload_adapter(UnloadAdapterRequest {
            name: "given".into(),
        })
        .await
        .unwrap();
    let again = client
        .unload_adapter(UnloadAdapterRequest {
            name: "given".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::NotFound);
    // Room again: reviews-a loads on use.
    client.generate(write("reviews-a")).await.unwrap();
    let info = client
        .info(GeneratorInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        info.adapters
            .iter()
            .any(|a| a.name == "reviews-a" && a.resident)
    );

    let scraped = common::http_get(&metrics, "/metrics").await;
    for line in [
        "ghostwriter_generator_adapter_loads_total{adapter=\"reviews-a\"} 2",
        "ghostwriter_generator_adapter_evictions_total{adapter=\"reviews-a\"} 1",
        "ghostwriter_generator_adapter_resident{adapter=\"given\"} 0",
        "ghostwriter_generator_adapter_resident{adapter=\"reviews-a\"} 1",
    ] {
        assert!(scraped.contains(line), "{line} not in /metrics:\n{scraped}");
    }
}

/// The names of the adapters resident on the generator at `url`.
async fn resident(url: &str) -> Vec<String> {
    use ghostwriter::proto::ListAdaptersRequest;
    GeneratorClient::connect(url.to_string())
        .await
        .unwrap()
        .list_adapters(ListAdaptersRequest {})
        .await
        .unwrap()
        .into_inner()
        .adapters
        .into_iter()
        .filter(|a| a.resident)
        .map(|a| a.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_naming_an_adapter_go_to_the_generator_that_holds_it() {
    let _slot = crate::common::slot(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let adapters = dir.path().join("adapters");
    std::fs::create_dir_all(&adapters).unwrap();
    let names: Vec<String> = (0..4).map(|i| format!("team-{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        std::fs::write(
            adapters.join(format!("{n}.safetensors")),
            seeded_adapter(10 + i as u64),
        )
        .unwrap();
    }
    let generator_args = [
        "--zero-shot".to_string(),
        "--adapter-dir".into(),
        adapters.display().to_string(),
        "--threads".into(),
        "1".into(),
    ];
    let a = common::serve("gen-a", "generator", &generator_args).await;
    let b = common::serve("gen-b", "generator", &generator_args).await;
    let orchestrator = common::serve(
        "orchestrator",
        "orchestrator",
        &["--generator-url".into(), format!("{},{}", a.url(), b.url())],
    )
    .await;
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "maya-token-0123456789 maya\nadmin-token-0123456789 *\n",
    )
    .unwrap();
    let guarded = common::serve(
        "guarded",
        "orchestrator",
        &[
            "--generator-url".into(),
            format!("{},{}", a.url(), b.url()),
            "--auth-tokens".into(),
            tokens.display().to_string(),
        ],
    )
    .await;
    for url in [a.url(), b.url(), orchestrator.url(), guarded.url()] {
        common::serving(url).await;
    }
    let mut client = common::client_over(orchestrator.url(), None);
    let write = |adapter: &str| {
        let mut w = ghostwriter_runtime::embedded::short_write(
            "maya",
            "These strings",
            "immediate-context",
            2,
        );
        w.adapter = adapter.to_string();
        w
    };
    // Each adapter, written with three times, is loaded on one generator only.
    for n in &names {
        for _ in 0..3 {
            let r = client.write(write(n)).await.unwrap().into_inner();
            let model = r.generation.unwrap().model;
            assert!(model.contains(&format!("+{n}@")), "{model}");
            let named = r.provenance.unwrap().adapter;
            assert!(named.starts_with(&format!("{n}@")), "{named}");
        }
    }
    let (on_a, on_b) = (resident(a.url()).await, resident(b.url()).await);
    for n in &names {
        assert!(
            on_a.contains(n) != on_b.contains(n),
            "{n} should be resident on exactly one generator: {on_a:?} / {on_b:?}"
        );
    }
    let unknown = client.write(write("nobody")).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument, "{unknown:?}");

    // Administrators manage the generators' adapters through the orchestrator; users may not.
    {
        use ghostwriter::proto::{ListAdaptersRequest, LoadAdapterRequest, UnloadAdapterRequest};
        fn as_who<T>(token: &str, m: T) -> tonic::Request<T> {
            let mut r = tonic::Request::new(m);
            r.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            r
        }
        let mut admin = common::client_over(guarded.url(), None);
        let denied = admin
            .list_adapters(as_who("maya-token-0123456789", ListAdaptersRequest {}))
            .await
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
        let listed = admin
            .list_adapters(as_who("admin-token-0123456789", ListAdaptersRequest {}))
            .await
            .unwrap()
            .into_inner()
            .generators;
        assert_eq!(listed.len(), 2);
        let holding = |n: &str| {
            listed
                .iter()
                .filter(|g| g.adapters.iter().any(|x| x.name == n && x.resident))
                .count()
        };
        assert_eq!(holding(&names[1]), 1);
        admin
            .unload_adapter(as_who(
                "admin-token-0123456789",
                UnloadAdapterRequest {
                    name: names[1].clone(),
                },
            ))
            .await
            .unwrap();
        let again = admin
            .unload_adapter(as_who(
                "admin-token-0123456789",
                UnloadAdapterRequest {
                    name: names[1].clone(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(again.code(), tonic::Code::NotFound, "{again:?}");
        // Bytes go to every generator, since no other could load them on demand.
        let loaded = admin
            .load_adapter(as_who(
                "admin-token-0123456789",
                LoadAdapterRequest {
                    name: "given".into(),
                    safetensors: seeded_adapter(99),
                    pin: false,
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .generators;
        assert_eq!(loaded.len(), 2);
        assert!(resident(a.url()).await.contains(&"given".to_string()));
        assert!(resident(b.url()).await.contains(&"given".to_string()));
        assert!(!resident(a.url()).await.contains(&names[1]));
        assert!(!resident(b.url()).await.contains(&names[1]));
    }

    // The generator that holds team-0 goes away: its writes go on, on the other, which loads
    // it; streams too.
    let (gone, other) = if on_a.contains(&names[0]) {
        (a, b)
    } else {
        (b, a)
    };
    drop(gone);
    for _ in 0..2 {
        client.write(write(&names[0])).await.unwrap();
    }
    let mut stream = client
        .write_stream(write(&names[0]))
        .await
        .unwrap()
        .into_inner();
    while stream.message().await.unwrap().is_some() {}
    assert!(resident(other.url()).await.contains(&names[0]));
}
