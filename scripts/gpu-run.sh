#!/usr/bin/env bash
# Runs on a GPU machine, from the bundle scripts/gpu-bundle.sh made: the GPU tests (every
# dtype/layout/reduction against the f64 reference with poisoned outputs, > 2^31 elements,
# CUDA-graph capture and replay, a non-default stream), compute-sanitizer (memcheck,
# racecheck) on a small case, the CUDA-event timings with the size sweep (gpu-sweep.csv and
# .png), and the PyTorch peers on the same card. Uses the machine's own torch libraries and
# libnvrtc. Fits in about 9 minutes.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out"

site=$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))' 2>/dev/null)
export LD_LIBRARY_PATH="$site/torch/lib:$site/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
export VIDFUSE_CACHE_DIR="$out/kernel-cache"

{
    echo "commit $(cat "$here/commit.txt" 2>/dev/null)"
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
} | tee "$out/device.txt"

status=0
step() {
    local name=$1
    shift
    local start=$SECONDS
    echo "== $name"
    "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
}

# Step limits add up to 520 s. The peers script writes its CSV only at the end; its log has
# every finished row if it runs out of time (it compiles each case anew).
step tests timeout 100 "$here/bin/gpu-tests" --test-threads=1
grep -E "^test |test result" "$out/tests.log"
# Without PyTorch's caching allocator, so that memcheck sees reads past each tensor.
step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 45 compute-sanitizer --tool memcheck \
    --error-exitcode 1 "$here/bin/gpu-tests" gpu_sanitizer_small_case --test-threads=1
step racecheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 45 compute-sanitizer --tool racecheck \
    --error-exitcode 1 "$here/bin/gpu-tests" gpu_sanitizer_small_case --test-threads=1
grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|test result" "$out/memcheck.log" "$out/racecheck.log"
# The size sweep's PyTorch peers (640 to 16.7M f32 elements), merged into the bench's sweep.
step sweep-peers timeout 100 python3 "$here/vid_sweep_peers.py" --device cuda --budget-ms 200 \
    --csv "$out/sweep-peers.csv" $("$here/bin/gpu-bench" --list-sweep-shapes)
step bench timeout 120 "$here/bin/gpu-bench" --csv "$out/gpu-bench.csv" \
    --sweep-csv "$out/gpu-sweep.csv" --sweep-peers "$out/sweep-peers.csv" \
    --sweep-png "$out/gpu-sweep.png" \
    --sweep-title "VID loss forward+backward, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
cat "$out/bench.log"
step peers timeout 110 python3 "$here/vid_peers.py" --device cuda --iters 20 --csv "$out/peers.csv"
cat "$out/peers.log"

# One table: the fused op's forward+backward against eager and torch.compile (same card).
python3 - "$out" <<'PY'
import csv, os, sys
out = sys.argv[1]
def rows(name):
    path = os.path.join(out, name)
    return list(csv.DictReader(open(path))) if os.path.exists(path) else []
peers = {(r["shape"], r["dtype"], r["layout"]): r for r in rows("peers.csv")}
print(f"{'shape':>16} {'dtype':>8} {'lay':>4} {'fused f+b':>10} {'eager':>8} {'compile':>8} {'vs compile':>10}")
for r in rows("gpu-bench.csv"):
    dtype = {"float": "float32", "bfloat16": "bfloat16", "half": "float16"}.get(r["dtype"], r["dtype"])
    p = peers.get((r["shape"], dtype, r["layout"]), {})
    fused = float(r["fused_fwd_bwd_ms"])
    comp = float(p.get("compiled_ms", "nan"))
    print(f"{r['shape']:>16} {dtype:>8} {r['layout']:>4} {fused:10.4f} {float(p.get('eager_ms', 'nan')):8.4f}"
          f" {comp:8.4f} {comp / fused:9.2f}x")
PY
exit $status
