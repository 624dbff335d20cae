#!/usr/bin/env bash
# Runs a command against the older supported pair, tch 0.24 + libtorch 2.11 (the default set-up
# is tch 0.26 + libtorch 2.13), without touching this checkout's lock file or venv:
#
#   bash scripts/older-pair.sh cargo test --test nn
#
# It keeps a venv with torch==2.11.0 at .venv-torch2.11/ (made on first use, about 5 GB), copies
# the repository's files (tracked and untracked, not ignored) to target/older-pair/src, locks
# tch 0.24 there, links that copy's .venv and .libtorch to the 2.11 venv, and runs the command
# in it with its own target folder. The GPU bundle is built this way (the GPU machines have
# torch 2.11.0 only), and CI runs the test suite's core against this pair.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

TORCH_VERSION=2.11.0
venv=.venv-torch2.11
env -u LIBTORCH -u LIBTORCH_USE_PYTORCH VIDFUSE_VENV="$venv" VIDFUSE_TORCH_VERSION="$TORCH_VERSION" \
    VIDFUSE_LINKS=0 bash scripts/setup.sh
torch_dir=$("$venv/bin/python" -W ignore -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)

work=target/older-pair
src=$work/src
rm -rf "$src"
mkdir -p "$src"
# The working tree's own files (what a clean clone plus local edits has), not build output.
git ls-files -z --cached --others --exclude-standard |
    xargs -0 -I{} cp --parents -- {} "$src/" 2>/dev/null || true
for f in Cargo.toml Cargo.lock build.rs; do
    [ -f "$src/$f" ] || { echo "older-pair: copying the repository failed ($f missing)" >&2; exit 1; }
done
ln -sfn "$repo/$venv" "$src/.venv"
ln -sfn "$torch_dir" "$src/.libtorch"
ln -sfn "$(dirname "$torch_dir")/nvidia/cu13" "$src/.cuda-libs"

cd "$src"
# `--precise` on tch moves torch-sys along (tch pins it exactly).
cargo update --quiet -p tch --precise 0.24.0
grep -A1 '^name = "torch-sys"$' Cargo.lock | grep -q '^version = "0\.24\.' ||
    { echo "older-pair: torch-sys 0.24 is not locked" >&2; exit 1; }
export CARGO_TARGET_DIR="$repo/$work/target"
echo "older-pair: tch 0.24 + torch $TORCH_VERSION in $src: $*" >&2
"$@"
