#!/usr/bin/env bash
# Every __syncthreads() in kernels/ must be caught by the emulated tests: deletes each call
# in turn (one at a time, replaced by `(void)0`), runs `cargo test --test emu`, and reports
# whether the tests failed and how. PASS when every deletion makes them fail.
#
# Usage: scripts/check-barriers.sh [extra cargo test arguments, e.g. --release]
# The kernel file is patched in place and restored after each run, and on exit or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO=${CARGO:-cargo}
logs=$(mktemp -d)
backup="$logs/original"
patched=""

restore() {
    if [[ -n "$patched" ]]; then
        cat "$backup" >"$patched"
        patched=""
    fi
}
trap 'restore; rm -rf "$logs"' EXIT
trap 'exit 130' INT TERM

# file:line:column of every __syncthreads() call outside // comments.
sites=$(awk '{
    code = $0
    comment = index(code, "//")
    if (comment > 0) code = substr(code, 1, comment - 1)
    col = 0
    while ((i = index(substr(code, col + 1), "__syncthreads()")) > 0) {
        col += i
        print FILENAME ":" FNR ":" col
        col += length("__syncthreads()") - 1
    }
}' kernels/*.cu kernels/*.cuh)

if [[ -z "$sites" ]]; then
    echo "no __syncthreads() in kernels/"
    exit 0
fi

total=0
caught=0
for site in $sites; do
    IFS=: read -r file line col <<<"$site"
    total=$((total + 1))
    cp "$file" "$backup"
    patched=$file
    awk -v L="$line" -v C="$col" 'FNR == L {
        $0 = substr($0, 1, C - 1) "(void)0" substr($0, C + length("__syncthreads()"))
    } { print }' "$backup" >"$file"
    code=$(sed -n "${line}p" "$backup" | sed 's/^ *//')
    log="$logs/run.log"
    if nice -n 10 "$CARGO" test --test emu "$@" >"$log" 2>&1; then
        verdict="NOT CAUGHT"
        detail="cargo test --test emu passed"
    elif grep -q "^test result: FAILED" "$log"; then
        verdict="caught"
        caught=$((caught + 1))
        failed=$(sed -n 's/^test \(.*\) \.\.\. FAILED$/\1/p' "$log" | paste -sd, -)
        why=$(grep -o -m1 -E "(shared-memory race|deadlock|thread \([0-9,]+\) of block)[^;]*" "$log" ||
            grep -m1 "panicked at" -A1 "$log" | tail -1)
        detail="failed: $failed; first error: $why"
    else
        verdict="BUILD FAILED"
        detail=$(grep -m1 -E "^error" "$log" || tail -1 "$log")
    fi
    restore
    echo "[$verdict] $file:$line: $code"
    echo "    $detail"
done

echo
if [[ $caught -eq $total ]]; then
    echo "PASS: all $total __syncthreads() deletions make cargo test --test emu fail"
else
    echo "FAIL: $((total - caught)) of $total __syncthreads() deletions not caught"
    exit 1
fi
