#!/usr/bin/env bash
# CPU size sweep, 640 to 16.7M f32 elements, forward+backward: the fused op, plain tch ops,
# PyTorch eager and torch.compile, and the bytes floor; one command:
#
#   scripts/bench-sweep.sh
#
# writes bench-results/cpu-sweep.csv and bench-results/cpu-sweep.png (log-log: time and
# effective GB/s against the element count). Run it on a quiet machine: every point is a
# median over SWEEP_BUDGET_MS (default 1000) of calls per implementation, and
# torch.compile compiles once per shape (several minutes in all on 2 cores).
# Environment: VENV_PYTHON (default .venv/bin/python, needs torch), SWEEP_MAX_ELEMS (default
# 16777216; a smaller value gives a quick smoke run), SWEEP_BUDGET_MS, SWEEP_OUT (default
# bench-results/cpu-sweep), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

venv_python=${VENV_PYTHON:-.venv/bin/python}
max_elems=${SWEEP_MAX_ELEMS:-16777216}
budget_ms=${SWEEP_BUDGET_MS:-1000}
out=${SWEEP_OUT:-bench-results/cpu-sweep}
"$venv_python" -c 'import torch' 2>/dev/null || { echo "bench-sweep: $venv_python has no torch (run scripts/setup.sh)" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cargo bench --features bench --bench cpu_sweep --no-run
sweep() { cargo bench --quiet --features bench --bench cpu_sweep -- "$@"; }
mapfile -t shapes < <(sweep shapes --max-elems "$max_elems")
echo "bench-sweep: ${#shapes[@]} shapes, ${shapes[0]} to ${shapes[-1]}; $(uptime | sed 's/.*load average/load average/')" >&2
sweep measure --csv "$work/rust.csv" --max-elems "$max_elems" --budget-ms "$budget_ms"
"$venv_python" -W ignore scripts/vid_sweep_peers.py --csv "$work/peers.csv" \
    --budget-ms "$budget_ms" "${shapes[@]}"
sweep plot --csv "$out.csv" --png "$out.png" \
    --title "VID loss forward+backward, CPU ($(nproc) cores), $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD)" \
    "$work/rust.csv" "$work/peers.csv"
echo "bench-sweep: load after: $(uptime | sed 's/.*load average/load average/')" >&2
