use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/ghostwriter/v1/common.proto",
    "proto/ghostwriter/v1/retriever.proto",
    "proto/ghostwriter/v1/ranker.proto",
    "proto/ghostwriter/v1/summarizer.proto",
    "proto/ghostwriter/v1/synthesizer.proto",
    "proto/ghostwriter/v1/generator.proto",
    "proto/ghostwriter/v1/ghostwriter.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("ghostwriter_descriptor.bin"))
        .compile_protos(PROTOS, &["proto"])?;
    Ok(())
}
