#!/usr/bin/env bash
# The test suite under AddressSanitizer (nightly Rust): out-of-bounds and use-after-free in
# vidfuse's own Rust code (the CPU backend's raw slices, the autograd and host-cache FFI),
# caught where it happens instead of as a wrong value. libtorch and the C++ shim are not
# instrumented; leaks are reported for Rust allocations.
#
#   bash scripts/sanitize.sh [-- test binary arguments...]
#
# By default the emulated-kernel tests (`emu`) and the NVRTC compile tests (`nvrtc`) are
# skipped: their work is C++ (the SIMT emulation, NVRTC) that is not instrumented, and they
# take 10 minutes under ASan; pass your own arguments to choose (e.g. `-- emu`).
# Needs the nightly toolchain (`rustup toolchain install nightly`); builds into
# target/asan so the normal build is untouched (about 9 minutes the first time on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "sanitize: no nightly toolchain (rustup toolchain install nightly)" >&2
    exit 2
fi
host=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps build scripts and proc macros uninstrumented (they run on the host).
export RUSTFLAGS="-Zsanitizer=address ${RUSTFLAGS:-}"
export RUSTDOCFLAGS="-Zsanitizer=address ${RUSTDOCFLAGS:-}"
# libtorch's own one-time allocations at exit are not ours to report; a refused huge
# allocation (tests of oversized modules) must be an error, as with the system allocator.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:${ASAN_OPTIONS:-}"
# The proptests run fewer cases: each is much slower instrumented.
export PROPTEST_CASES=${PROPTEST_CASES:-64}
# The peak-memory test measures the resident set, which under ASan also holds shadow memory
# and quarantined blocks: its numbers mean nothing here.
if [ $# -eq 0 ]; then
    set -- -- --skip emu --skip nvrtc --skip allocates_only_the_gradient
fi
cargo +nightly test --target "$host" --target-dir target/asan --lib --tests "$@"
