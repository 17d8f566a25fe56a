#!/usr/bin/env bash
# Runs on the lent GPU machine, from the repository root, with .gpu/ carried (see gpu/prepare.sh):
#   device run --carry .gpu --timeout 600 'bash gpu/bench.sh'
# Synthesizes weights of SmolLM2-135M's shape on the machine (the real weights cannot travel in
# one call), then measures the candle CUDA backend with bench-generator: prompt and one-stream
# decode, 1/8/32/128/256 concurrent streams, and 64 distinct adapters (rank 8, seven projections,
# every layer) across 256 streams against the same streams with none (3 alternating runs). The
# JSON and the log come back in $OUT.
set -u
out=${OUT:-/tmp/out}
mkdir -p "$out"
lib=$(find /opt /usr/local -name 'libcublas.so.13' 2>/dev/null | head -1)
[[ -n $lib ]] && export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv > "$out/gpu.txt" 2>&1
bin=/tmp/ghostwriter
gunzip -c .gpu/ghostwriter.gz > "$bin" && chmod +x "$bin"
"$bin" models synthesize --like .gpu/head.gguf --to /tmp/smollm2-shape.gguf 2>&1 | tee "$out/bench.log"
"$bin" bench-generator --device cuda --model /tmp/smollm2-shape.gguf --data .gpu/texts.jsonl \
  --streams 1,8,32,128,256 --max-running 256 --max-batch-tokens 2048 --kv-cache-mb 8192 \
  --adapters 64 --adapter-runs 3 --beams 0 --runs 3 --new-tokens 128 \
  --out "$out/bench-generator-cuda.json" 2>&1 | tee -a "$out/bench.log"
nvidia-smi >> "$out/gpu.txt" 2>&1
