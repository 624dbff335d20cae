#!/usr/bin/env bash
# Runs on a GPU machine, from the bundle scripts/gpu-bundle.sh made (`bash gpu-bundle/dist-gpu.sh`):
# vidfuse::dist's NCCL backend through examples/ddp_distill under torchrun (the machine's
# own torch), world 1 on one GPU against the same run without a launcher, and, with two or
# more GPUs, 2 ranks x 32 samples against 1 x 64 (the same global batches): the ranks'
# parameters must be bitwise equal, and norm and loss within 1e-5 of one process. Then the
# reduction's timings (--bench). About a minute.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out"
site=$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))' 2>/dev/null)
export LD_LIBRARY_PATH="$site/torch/lib:$site/nvidia/cu13/lib:$site/nvidia/nccl/lib:${LD_LIBRARY_PATH:-}"
bin=$here/bin/ddp_distill
common=(--steps 20 --device cuda --data "$here/data/mnist_5k.csv.gz")
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
status=0

final() { grep -h '^final:' "$@" | sort; }
field() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<"$1" | head -1; }
# within A B: |A - B| <= 1e-5 |B|
within() { python3 -c "import sys; a, b = map(float, sys.argv[1:]); sys.exit(abs(a - b) > 1e-5 * abs(b))" "$1" "$2"; }
launch() { # nproc, log, args...
    local n=$1 log=$2
    shift 2
    timeout 120 python3 -m torch.distributed.run --standalone --nproc-per-node "$n" --no-python \
        "$bin" "$@" >"$out/$log" 2>&1
}
compare() { # name, one-process final line, the ranks' final lines
    local name=$1 one=$2 ranks=$3
    echo "$name:"
    echo "  alone:  $one"
    sed 's/^/  ranks:  /' <<<"$ranks"
    local hashes norms
    hashes=$(sed -n 's/.*param_sha256=\([0-9a-f]*\).*/\1/p' <<<"$ranks" | sort -u | wc -l)
    [ "$hashes" = 1 ] || { echo "  FAIL: the ranks' parameters differ"; status=1; }
    local r0
    r0=$(head -1 <<<"$ranks")
    for k in param_norm loss; do
        within "$(field "$r0" $k)" "$(field "$one" $k)" ||
            { echo "  FAIL: $k differs from one process by more than 1e-5"; status=1; }
    done
}

echo "== dist: $gpus GPU(s), NCCL"
timeout 120 "$bin" "${common[@]}" --batch-per-rank 64 >"$out/dist-alone.log" 2>&1 || status=1
one=$(final "$out/dist-alone.log")
launch 1 dist-world1.log "${common[@]}" --batch-per-rank 64 || status=1
compare "world 1 (NCCL) vs alone" "$one" "$(final "$out/dist-world1.log")"
if [ "$gpus" -ge 2 ]; then
    launch 2 dist-world2.log "${common[@]}" --batch-per-rank 32 || status=1
    compare "2 x 32 (NCCL) vs 1 x 64" "$one" "$(final "$out/dist-world2.log")"
    launch 2 dist-bench.log --steps 50 --device cuda --data "$here/data/mnist_5k.csv.gz" \
        --batch-per-rank 256 --width 16 --bench 30 || status=1
    grep -hE '^(bench|timing):' "$out/dist-bench.log"
fi
[ "$status" = 0 ] && echo "dist: ok" || echo "dist: FAILED (logs in $out/dist-*.log)"
exit "$status"
