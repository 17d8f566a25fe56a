//! The adapter a generator serves by default: `serve generator` serves the shipped fine-tuned
//! adapter on its base model and names it in `Info` and in every response; `--zero-shot` serves
//! the model alone.

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
