#!/usr/bin/env python3
"""The size sweep's PyTorch peers: eager and torch.compile, forward+backward of the VID loss.

Usage: python3 vid_sweep_peers.py --csv OUT [--device cpu|cuda] [--budget-ms MS] SHAPE...
with SHAPE as NxCxHxW (the Rust bench prints the sweep's: `cpu_sweep shapes`). Gradients
are returned with torch.autograd.grad (nothing accumulated into .grad), as the Rust side
returns them with run_backward. Writes rows in the sweep CSV format of benches/sweep/mod.rs.
"""
import argparse
import csv
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vid_peers import vid_eager  # noqa: E402  the peers' formula

HEADER = ["device", "implementation", "dtype", "shape", "elems", "ms", "gb_s", "calls", "threads"]


def median_ms(fn, budget_ms, device):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    times, total = [], 0.0
    while len(times) < 5 or (total < budget_ms and len(times) < 100_000):
        t0 = time.perf_counter()
        fn()
        sync()
        ms = (time.perf_counter() - t0) * 1e3
        total += ms
        times.append(ms)
    return statistics.median(times), len(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--csv", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--budget-ms", type=float, default=1000.0)
    p.add_argument("shapes", nargs="+")
    args = p.parse_args()
    dev = args.device
    threads = torch.get_num_threads() if dev == "cpu" else 0
    rows = []
    for name in args.shapes:
        size = tuple(int(d) for d in name.split("x"))
        torch.manual_seed(0)
        mu = torch.randn(size, device=dev, dtype=torch.float32, requires_grad=True)
        t = torch.randn(size, device=dev, dtype=torch.float32)
        alpha = torch.full((size[1],), 1.0, device=dev, dtype=torch.float32, requires_grad=True)
        torch._dynamo.reset()  # a fresh compile per shape, no recompile limit
        compiled = torch.compile(vid_eager)
        for impl, fn in (("torch_eager", vid_eager), ("torch_compile", compiled)):
            def step():
                return torch.autograd.grad(fn(mu, t, alpha), [mu, alpha])
            try:
                ms, calls = median_ms(step, args.budget_ms, dev)
            except Exception as e:  # report, keep going
                print(f"{name} {impl} failed: {e}", file=sys.stderr)
                continue
            elems = mu.numel()
            rows.append(dict(device=dev, implementation=impl, dtype="float32", shape=name,
                             elems=elems, ms=f"{ms:.6f}",
                             gb_s=f"{5 * elems * 4 / (ms * 1e-3) / 1e9:.3f}",
                             calls=calls, threads=threads))
            print(f"{name:>14}: {impl} {ms:9.4f} ms", file=sys.stderr, flush=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HEADER, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
