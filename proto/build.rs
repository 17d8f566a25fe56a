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

const ETCD: &[&str] = &["proto/etcd/kv.proto", "proto/etcd/rpc.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(env::var("OUT_DIR")?);

    let api = protox::compile(GHOSTWRITER, ["proto"])?;
    std::fs::write(out.join("ghostwriter_descriptor.bin"), api.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(api)?;

    let etcd = protox::compile(ETCD, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(etcd)?;
    Ok(())
}
