#!/usr/bin/env bash
# Idempotent set-up: a Python venv at .venv/ holding the torch that the locked tch pairs
# with (torch==2.11.0 for tch 0.24, 2.13.0 for tch 0.26; plus libnvrtc from its CUDA wheels,
# and torchrun, which launches data-parallel jobs), gloo's headers for vidfuse::dist's Gloo
# backend (Debian's libgloo-dev: the torch wheel lacks them), and a stable link `.libtorch`
# -> that torch folder, which .cargo/config.toml points LIBTORCH at. VIDFUSE_TORCH_VERSION overrides the version; VIDFUSE_VENV the venv's folder, and
# VIDFUSE_LINKS=0 leaves the links alone (scripts/older-pair.sh keeps a second venv this way).
# A user who already exported LIBTORCH or LIBTORCH_USE_PYTORCH keeps their libtorch.
set -euo pipefail
cd "$(dirname "$0")/.."

# torch-sys checks that libtorch is the release its build.rs names (TORCH_VERSION there).
locked_torch_sys=$(awk '$0 == "name = \"torch-sys\"" { getline; gsub(/"/, "", $3); print $3; exit }' \
    Cargo.lock 2>/dev/null || true)
case "$locked_torch_sys" in
0.26.*) default_torch=2.13.0 ;;
0.25.*) default_torch=2.12.0 ;;
*) default_torch=2.11.0 ;;
esac
TORCH_VERSION=${VIDFUSE_TORCH_VERSION:-$default_torch}
PYTHON=${PYTHON:-python3}

# gloo's headers (ProcessGroupGloo.hpp includes them; libtorch exports gloo's symbols).
if [ ! -f /usr/include/gloo/context.h ] && [ -z "${VIDFUSE_GLOO_INCLUDE:-}" ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=$(command -v sudo || true)
    if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; }; then
        echo "setup: installing libgloo-dev (gloo's headers, for vidfuse::dist)" >&2
        { $sudo apt-get update -qq && $sudo apt-get install -y -qq libgloo-dev >/dev/null; } ||
            echo "setup: libgloo-dev not installed; vidfuse::dist will have no Gloo backend" >&2
    else
        echo "setup: no gloo headers (install libgloo-dev, or set VIDFUSE_GLOO_INCLUDE); vidfuse::dist will have no Gloo backend" >&2
    fi
fi

if [ -n "${LIBTORCH:-}" ] || [ -n "${LIBTORCH_USE_PYTORCH:-}" ]; then
    echo "setup: using the libtorch you configured (LIBTORCH / LIBTORCH_USE_PYTORCH); nothing to do" >&2
    exit 0
fi

venv=${VIDFUSE_VENV:-.venv}
venv_python=$venv/bin/python
if [ ! -x "$venv_python" ]; then
    echo "setup: creating $venv" >&2
    "$PYTHON" -m venv "$venv"
fi

have=$("$venv_python" -W ignore -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ "$have" != "$TORCH_VERSION" ]; then
    echo "setup: installing torch==$TORCH_VERSION into $venv (about 4.6 GB, a few minutes)" >&2
    "$venv_python" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
fi

# The CUDA runtime headers' crt/ folder, which the torch wheels lack: needed to build the
# wrappers of PyTorch's CUDA streams and graphs (the crate builds without them).
if ! "$venv_python" -c 'import importlib.metadata as m; m.version("nvidia-cuda-crt")' >/dev/null 2>&1; then
    "$venv_python" -m pip install --quiet --disable-pip-version-check "nvidia-cuda-crt==13.0.*" ||
        echo "setup: nvidia-cuda-crt not installed; CUDA stream/graph helpers will be unavailable" >&2
fi

# CCCL's headers (<nv/target>, which cuda_fp16.h includes): with nccl.h (the nvidia-nccl
# wheel that comes with torch's CUDA builds) they let vidfuse::dist build its NCCL backend.
if ! "$venv_python" -c 'import importlib.metadata as m; m.version("nvidia-cuda-cccl")' >/dev/null 2>&1; then
    "$venv_python" -m pip install --quiet --disable-pip-version-check "nvidia-cuda-cccl==13.0.*" ||
        echo "setup: nvidia-cuda-cccl not installed; vidfuse::dist will have no NCCL backend" >&2
fi

torch_dir=$("$venv_python" -W ignore -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)
if [ "${VIDFUSE_LINKS:-1}" = 0 ]; then
    echo "setup: ready (libtorch at $torch_dir)" >&2
    exit 0
fi
if [ "$(readlink .libtorch 2>/dev/null || true)" != "$torch_dir" ]; then
    ln -sfn "$torch_dir" .libtorch
fi
# libnvrtc (and CUDA headers) ship in the nvidia wheels next to torch.
nvidia_dir=$(dirname "$torch_dir")/nvidia/cu13
if [ -d "$nvidia_dir" ] && [ "$(readlink .cuda-libs 2>/dev/null || true)" != "$nvidia_dir" ]; then
    ln -sfn "$nvidia_dir" .cuda-libs
fi
echo "setup: ready (libtorch at $torch_dir)" >&2
