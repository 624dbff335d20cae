#!/usr/bin/env bash
# CPU benchmark of vidfuse::dist (Gloo over 127.0.0.1): examples/ddp_distill at the same
# global batch as 1 process and as 2 ranks under torchrun, for the small student (width 1,
# 0.3 MB of gradients) and a 16x wider one (6.6 MB; also with 256 KiB buckets instead of
# PyTorch's default 1 MiB + 25 MiB): time per training step, and from
# --bench the backward pass with and without the gradient reduction and the all-reduce of
# all gradients alone, giving the share of the all-reduce hidden behind backward
# (1 - (ddp - plain) / allreduce).
#
#   scripts/bench-dist.sh
#
# writes bench-results/dist-cpu-<date>.txt (BENCH_TAG=name replaces the date). A few
# minutes; run it on a quiet machine (the load is recorded).
set -euo pipefail
cd "$(dirname "$0")/.."
venv_python=${VENV_PYTHON:-.venv/bin/python}
tag=${BENCH_TAG:-$(date -u +%Y-%m-%d)}
out=bench-results/dist-cpu-$tag.txt
mkdir -p bench-results
cargo build --release --quiet --example ddp_distill
bin=${CARGO_TARGET_DIR:-target}/release/examples/ddp_distill
cores=$(nproc --all)
export OMP_NUM_THREADS=1 # one thread per rank, as torchrun sets; 1 process gets the same
{
    echo "vidfuse::dist CPU benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)"
    echo "machine: $cores cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1); OMP_NUM_THREADS=1 per process"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    for config in "1 default" "16 default" "16 256"; do
        read -r width buckets <<<"$config"
        for world in 1 2; do
            batch=$((256 / world))
            echo "-- width $width, buckets $buckets (KiB), world $world x batch $batch (global 256), 100 steps, 30 bench rounds"
            args=(--steps 100 --batch-per-rank "$batch" --width "$width" --device cpu --bench 30)
            [ "$buckets" = default ] || args+=(--bucket-kb "$buckets")
            if [ "$world" = 1 ]; then
                "$bin" "${args[@]}" 2>&1
            else
                "$venv_python" -m torch.distributed.run --standalone --nproc-per-node 2 --no-python \
                    "$bin" "${args[@]}" 2>&1
            fi | grep -E '^(timing|bench):' | sort
        done
    done
    echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$out"
