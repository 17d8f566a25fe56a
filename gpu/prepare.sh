#!/usr/bin/env bash
# Prepares, on this machine (no GPU needed), what gpu/bench.sh needs on a lent GPU machine, in
# .gpu/ (ignored by git; name it in the device call's `carry`):
#   .gpu/ghostwriter.gz  the binary built with `--features cuda` (../shared/tools/cuda), stripped
#                      and gzipped (105 MB → 36 MB; gzip is on every machine, zstd is not);
#   .gpu/head.gguf     the header of SmolLM2-135M-Instruct Q8_0: metadata, tokenizer, tensor
#                      shapes, no weights (1.8 MB; bench.sh synthesizes weights of that shape);
#   .gpu/texts.jsonl   2,200 real reviews to build the benchmark's prompts from.
# Everything fits one call (under 64 MiB). The CUDA build uses its own target directory
# (target-cuda/), so the CPU build in target/ stays as it is. First run: the CUDA toolkit wheels
# (~1.2 GB) and candle's kernels (~8 minutes on 2 cores), then the release build.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${GHOSTWRITER_SHARED:-../shared}
models=${GHOSTWRITER_MODEL_DIR:-$HOME/.cache/ghostwriter/models}
mkdir -p .gpu
# The CUDA environment (its RUSTFLAGS among it) stays in this subshell: the CPU build in target/
# is not rebuilt.
(
  eval "$("$shared/tools/cuda/cuda-env.sh")"
  CARGO_TARGET_DIR=target-cuda CARGO_INCREMENTAL=0 cargo build --release --features cuda --bin ghostwriter
)
strip -o .gpu/ghostwriter target-cuda/release/ghostwriter
gzip -9 -f .gpu/ghostwriter
# The CUDA binary needs the driver's libcuda to start: the header comes from the CPU build.
CARGO_INCREMENTAL=0 cargo build --release
./target/release/ghostwriter models synthesize --header-only \
  --like "$models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q8_0.gguf" --to .gpu/head.gguf
python3 - "$shared/data/amazon-musical-instruments/docs.jsonl" .gpu/texts.jsonl <<'PY'
import json, sys
src, dst = sys.argv[1], sys.argv[2]
kept = 0
with open(src) as f, open(dst, "w") as out:
    for line in f:
        if len(json.loads(line).get("text", "")) > 200:
            out.write(line)
            kept += 1
            if kept == 2200:
                break
PY
du -ch .gpu/* | tail -1
