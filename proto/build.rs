//! Compiles the protos with protox (pure Rust), so building needs no system protoc: the
//! `ghostwriter.v1` API (whose descriptor set serves reflection) and the subset of etcd's v3 API
//! that discovery speaks (clients only).

use std::{env, path::PathBuf};

use prost::Message;

const GHOSTWRITER: &[&str] = &[
    "proto/ghostwriter/v1/common.proto",
    "proto/ghostwriter/v1/retriever.proto",
    "proto/ghostwriter/v1/ranker.proto",
    "proto/ghostwriter/v1/summarizer.proto",
    "proto/ghostwriter/v1/synthesizer.proto",
    "proto/ghostwriter/v1/generator.proto",
    "proto/ghostwriter/v1/ghostwriter.proto",
];

/// etcd's own files (a trimmed copy, Apache-2.0), kept apart from ours as vendored code.
const ETCD: &[&str] = &["third_party/etcd/kv.proto", "third_party/etcd/rpc.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=third_party");
    let out = PathBuf::from(env::var("OUT_DIR")?);

    let api = protox::compile(GHOSTWRITER, ["proto"])?;
    std::fs::write(out.join("ghostwriter_descriptor.bin"), api.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(api)?;

    let etcd = protox::compile(ETCD, ["third_party"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(etcd)?;
    Ok(())
}
