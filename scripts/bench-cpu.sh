#!/usr/bin/env bash
# CPU benchmark, side by side in one session: the fused op and plain tch ops (criterion,
# benches/cpu.rs), then PyTorch eager and torch.compile (the peers script), then one table.
#
#   scripts/bench-cpu.sh
#
# writes bench-results/cpu-<date>.csv and .md (BENCH_TAG=name replaces the date).
# Environment: VENV_PYTHON (default .venv/bin/python, needs torch), VID_PEERS (default
# scripts/vid_peers.py), PEER_ITERS (default 30), CARGO_TARGET_DIR.
# The run takes about 8 minutes on 2 cores; run it on a quiet machine (the load before,
# between and after the two halves goes into the Markdown).
set -euo pipefail
cd "$(dirname "$0")/.."

venv_python=${VENV_PYTHON:-.venv/bin/python}
peers=${VID_PEERS:-scripts/vid_peers.py}
peer_iters=${PEER_ITERS:-30}
tag=${BENCH_TAG:-$(date -u +%Y-%m-%d)}
criterion_dir=${CARGO_TARGET_DIR:-target}/criterion
out_dir=bench-results
mkdir -p "$out_dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

[ -f "$peers" ] || { echo "bench-cpu: peers script not found at $peers (set VID_PEERS)" >&2; exit 1; }
"$venv_python" -c 'import torch' 2>/dev/null || { echo "bench-cpu: $venv_python has no torch (run scripts/setup.sh)" >&2; exit 1; }

load() { # one line of load average and the three busiest processes
    local procs
    procs=$(top -bn1 | sed -n '8,10p' | awk '{printf "%s %s%%; ", $12, $9}')
    echo "$(uptime | sed 's/.*load average/load average/') | busiest: ${procs%; }"
}

{
    echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml build.rs csrc || echo ' (+ uncommitted changes)')"
    echo "nproc=$(nproc)"
    echo "cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
    echo "l3=$(lscpu | sed -n 's/^L3 cache: *//p' | head -1)"
    echo "memory=$(free -g | awk '/^Mem:/ {print $2 " GiB"}')"
    echo "rustc=$(rustc --version)"
    echo "torch=$("$venv_python" -W ignore -c 'import torch; print(torch.__version__)')"
    echo "load_before=$(load)"
} >"$work/meta"

echo "bench-cpu: building and running the criterion bench" >&2
cargo bench --features bench --bench cpu --no-run
rm -rf "$criterion_dir/copy" "$criterion_dir/vid_fwd" "$criterion_dir/vid_fwd_bwd"
cargo bench --features bench --bench cpu 2>&1 | tee "$work/criterion.log" | grep -E '^(vid_|copy)|time:|thrpt:' >&2
echo "load_between=$(load)" >>"$work/meta"

echo "bench-cpu: running the PyTorch peers (eager, torch.compile)" >&2
# The peers script's own loop (loss.backward(), which adds into an existing mu.grad), on the
# bench's shapes; then torch.compile once more with torch.autograd.grad (no accumulation),
# to compare with the fused op's run_backward figures like for like.
"$venv_python" -W ignore - "$peers" "$work/peers.csv" "$peer_iters" "$work/peers_grad.csv" \
    >"$work/peers.log" 2>&1 <<'EOF' || { cat "$work/peers.log" >&2; exit 1; }
import csv, os, sys
import torch
peers, out, iters, out_grad = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
sys.path.insert(0, os.path.dirname(os.path.abspath(peers)))
import vid_peers
shapes = [(16, 64, 32, 32), (64, 64, 32, 32)]
vid_peers.CPU_SHAPES = shapes
sys.argv = ["vid_peers", "--device", "cpu", "--csv", out, "--iters", iters]
vid_peers.main()
run = vid_peers.timer("cpu")
rows = []
for size in shapes:
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("nchw", "nhwc"):
            torch.manual_seed(0)
            mu = torch.randn(size, dtype=dtype)
            t = torch.randn(size, dtype=dtype)
            if layout == "nhwc":
                mu = mu.contiguous(memory_format=torch.channels_last)
                t = t.contiguous(memory_format=torch.channels_last)
            mu.requires_grad_(True)
            alpha = torch.full((size[1],), 1.0, dtype=torch.float32, requires_grad=True)
            torch._dynamo.reset()
            compiled = torch.compile(vid_peers.vid_eager)
            step = lambda: torch.autograd.grad(compiled(mu, t, alpha), [mu, alpha])
            for _ in range(3):
                step()
            ms = run(step, int(iters))
            rows.append(dict(shape="x".join(map(str, size)), dtype=str(dtype).replace("torch.", ""),
                             layout=layout, compiled_grad_ms=ms))
            print(f"{rows[-1]}", flush=True)
with open(out_grad, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
    w.writeheader()
    w.writerows(rows)
EOF
grep -E 'device|float|bfloat|compiled_grad' "$work/peers.log" >&2 || true
echo "load_after=$(load)" >>"$work/meta"

python3 - "$criterion_dir" "$work" "$out_dir/cpu-$tag" <<'EOF'
import csv, json, os, sys

crit, work, stem = sys.argv[1:4]
meta = dict(line.rstrip("\n").split("=", 1) for line in open(os.path.join(work, "meta")))

def median_ms(group, function, case):
    path = os.path.join(crit, group, function, case, "new", "estimates.json")
    with open(path) as f:
        return json.load(f)["median"]["point_estimate"] / 1e6

copy_bytes = 2 * 4 * (1 << 24)
criterion_bw = copy_bytes / (median_ms("copy", "copy_", "16777216_f32") * 1e-3)  # bytes/s

dtype_names = {"float32": "f32", "bfloat16": "bf16"}
peer = {}
for row in csv.DictReader(open(os.path.join(work, "peers.csv"))):
    peer[(row["shape"], dtype_names[row["dtype"]], row["layout"])] = row
for row in csv.DictReader(open(os.path.join(work, "peers_grad.csv"))):
    peer[(row["shape"], dtype_names[row["dtype"]], row["layout"])]["compiled_grad_ms"] = row["compiled_grad_ms"]
peer_bw = next(l for l in open(os.path.join(work, "peers.log")) if "copy bandwidth" in l)
peer_bw = peer_bw.strip().split("copy bandwidth ")[-1]
# Floors use the peers script's copy bandwidth (the figure the goal is stated against); the
# criterion copy bench is reported beside it (it varied from 46 to 98 GB/s between runs).
bandwidth = float(peer_bw.split()[0]) * 1e9

rows = []
for (shape, dtype, layout), p in peer.items():
    case = f"{shape}_{dtype}_{layout}"
    elems = int(p["elems"])
    size = 4 if dtype == "f32" else 2
    r = dict(shape=shape, dtype=dtype, layout=layout, elems=elems)
    r["fused_fwd_ms"] = median_ms("vid_fwd", "fused", case)
    r["plain_fwd_ms"] = median_ms("vid_fwd", "plain", case)
    r["fwd_floor_ms"] = 2 * elems * size / bandwidth * 1e3
    r["fused_fwd_bwd_ms"] = median_ms("vid_fwd_bwd", "fused", case)
    r["fused_accum_ms"] = median_ms("vid_fwd_bwd", "fused_accum", case)
    r["plain_fwd_bwd_ms"] = median_ms("vid_fwd_bwd", "plain", case)
    r["eager_ms"] = float(p["eager_ms"])
    r["compile_ms"] = float(p["compiled_ms"])
    r["compile_grad_ms"] = float(p["compiled_grad_ms"])
    r["floor_ms"] = 5 * elems * size / bandwidth * 1e3
    r["fused_over_floor"] = r["fused_fwd_bwd_ms"] / r["floor_ms"]
    r["fused_over_compile"] = r["fused_fwd_bwd_ms"] / r["compile_grad_ms"]
    r["accum_over_compile"] = r["fused_accum_ms"] / r["compile_ms"]
    r["fused_fwd_bwd_gelem_s"] = elems / (r["fused_fwd_bwd_ms"] * 1e-3) / 1e9
    r["fused_fwd_bwd_gb_s"] = 5 * elems * size / (r["fused_fwd_bwd_ms"] * 1e-3) / 1e9
    rows.append(r)

with open(stem + ".csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})

cols = [
    ("shape", "shape"), ("dtype", "dtype"), ("layout", "layout"), ("elems", "elems"),
    ("fused_fwd_ms", "fused fwd"), ("fwd_floor_ms", "fwd floor"),
    ("fused_fwd_bwd_ms", "fused fwd+bwd"), ("fused_accum_ms", "fused fwd+bwd, accum"),
    ("plain_fwd_bwd_ms", "plain tch fwd+bwd"), ("eager_ms", "eager, accum"),
    ("compile_ms", "compile, accum"), ("compile_grad_ms", "compile"),
    ("floor_ms", "fwd+bwd floor"), ("fused_over_floor", "fused / floor"),
    ("fused_over_compile", "fused / compile"), ("accum_over_compile", "accum / accum"),
    ("fused_fwd_bwd_gelem_s", "fused Gelem/s"), ("fused_fwd_bwd_gb_s", "fused GB/s"),
]
def fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)
with open(stem + ".md", "w") as f:
    f.write(f"# CPU benchmark, {meta['date']}\n\n")
    f.write(f"- commit {meta['commit']}; {meta['rustc']}; torch {meta['torch']}\n")
    f.write(f"- {meta['nproc']} cores, {meta['cpu']}, L3 {meta['l3']}, {meta['memory']}\n")
    f.write(f"- copy bandwidth, used for the floors: {peer_bw} (the peers script's measurement); "
            f"criterion's tch copy_ of 2^24 f32: {criterion_bw / 1e9:.1f} GB/s\n")
    for k in ("load_before", "load_between", "load_after"):
        f.write(f"- {k.replace('_', ' ')}: {meta[k]}\n")
    f.write("\nTimes in ms (medians). \"accum\": `loss.backward()` adding into an existing "
            "`mean.grad`, as the peers script times eager and torch.compile; the other fwd+bwd "
            "columns return the gradients without accumulating (`run_backward` / "
            "`torch.autograd.grad`). Floors: bytes / copy bandwidth, forward 2 tensors, "
            "forward+backward 5. \"fused / compile\" compares the non-accumulating pair, "
            "\"accum / accum\" the accumulating pair.\n\n")
    f.write("| " + " | ".join(h for _, h in cols) + " |\n")
    f.write("|" + "---|" * len(cols) + "\n")
    for r in rows:
        f.write("| " + " | ".join(fmt(r[k]) for k, _ in cols) + " |\n")
print(open(stem + ".md").read())
EOF
