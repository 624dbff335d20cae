#!/usr/bin/env bash
# Builds and runs ci/downstream (a crate that depends on vidfuse and has no build script) with
# each recipe of README.md's "In your own crate", run exactly as written there, from a copy
# outside this repository so that none of this repository's settings apply. Needs
# scripts/setup.sh's .venv and .libtorch.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

# The ```sh block of README.md whose first line is "# recipe: $1".
recipe() {
    awk -v want="# recipe: $1" '
        /^```/ {
            if (inside) { if (found) exit; inside = 0 }
            else if ($0 == "```sh") { inside = 1; first = 1 }
            next
        }
        inside && first { first = 0; if ($0 == want) found = 1 }
        inside && found { print }
    ' README.md
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r ci/downstream/Cargo.toml ci/downstream/src "$work/"
# The versions this repository is tested with.
cp Cargo.lock "$work/"
sed -i "s|^vidfuse = { path = \"../..\" }|vidfuse = { path = \"$repo\" }|" "$work/Cargo.toml"
grep -q "^vidfuse = { path = \"$repo\" }" "$work/Cargo.toml"

libtorch="$(cd .libtorch && pwd -P)"
export CARGO_TARGET_DIR="$repo/target/downstream"
if [ -e "$libtorch/lib/libtorch_cuda.so" ]; then
    export VIDFUSE_DOWNSTREAM_EXPECT_CUDA_LIBS=1
fi

for name in LIBTORCH LIBTORCH_USE_PYTORCH; do
    script="$(recipe "$name")"
    if [ -z "$script" ]; then
        echo "downstream-check: README.md has no \"# recipe: $name\" block" >&2
        exit 1
    fi
    printf -- '--- README recipe %s:\n%s\n---\n' "$name" "$script"
    case "$name" in
    LIBTORCH)
        (cd "$work" && env -u LIBTORCH_USE_PYTORCH LIBTORCH="$libtorch" \
            bash -euo pipefail -c "$script")
        ;;
    LIBTORCH_USE_PYTORCH)
        (cd "$work" && env -u LIBTORCH PATH="$repo/.venv/bin:$PATH" \
            bash -euo pipefail -c "$script")
        ;;
    esac
done
echo "downstream-check: both recipes built and ran a dependent crate"
