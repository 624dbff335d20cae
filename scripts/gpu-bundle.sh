#!/usr/bin/env bash
# Builds the release GPU test and bench binaries here and gathers them, with what the GPU
# machine lacks (the peers script, the run script), into gpu-bundle/ (ignored by git, a few
# MiB: small enough to carry). Then run `bash gpu-bundle/gpu-run.sh` on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# The GPU machines have torch 2.11.0, the libtorch of tch 0.24 (tch 0.26 needs 2.13): whatever
# this checkout locks, the bundle is built in scripts/older-pair.sh's tch 0.24 copy and
# brought back here.
if ! grep -A1 '^name = "torch-sys"$' Cargo.lock | grep -q '^version = "0\.24\.'; then
    bash scripts/older-pair.sh bash scripts/gpu-bundle.sh
    rm -rf gpu-bundle
    cp -r target/older-pair/src/gpu-bundle gpu-bundle
    git rev-parse --short HEAD > gpu-bundle/commit.txt
    du -sh gpu-bundle
    exit 0
fi
bash scripts/setup.sh

peers=${VID_PEERS:-scripts/vid_peers.py}
[ -f "$peers" ] || { echo "gpu-bundle: peers script not found at $peers (set VID_PEERS)" >&2; exit 1; }

# The path of the executable cargo builds for a target, from its JSON messages.
executable() {
    cargo "$@" --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])' | tail -n 1
}

out=gpu-bundle
rm -rf "$out"
mkdir -p "$out/bin"
cp "$(executable test --release --test gpu)" "$out/bin/gpu-tests"
cp "$(executable bench --features bench --bench gpu)" "$out/bin/gpu-bench"
# vidfuse::dist on NCCL (scripts/dist-gpu.sh): the example and its data.
cargo build --release --quiet --example ddp_distill
cp "${CARGO_TARGET_DIR:-target}/release/examples/ddp_distill" "$out/bin/"
mkdir -p "$out/data"
cp data/mnist_5k.csv.gz "$out/data/"
cp scripts/dist-gpu.sh "$out/"
strip "$out"/bin/* 2>/dev/null || true
cp scripts/gpu-run.sh "$out/"
cp "$peers" "$out/vid_peers.py"
cp scripts/vid_sweep_peers.py "$out/"
git rev-parse --short HEAD > "$out/commit.txt"
du -sh "$out"
