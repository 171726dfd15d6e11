#!/usr/bin/env bash
# Runs every test: Rust unit and end-to-end tests, then the Python interop tests against a real
# server binary. This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

cargo build --bin artiflight
cargo test --workspace --all-targets
cargo test --workspace --doc

target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
export ARTIFLIGHT_BIN="$target_dir/debug/artiflight"
.venv/bin/python -m pytest -q tests/python "$@"

# The benchmark harness at tiny sizes: every case runs end to end (no timing is asserted).
bench_data=$(mktemp -d)
trap 'rm -rf "$bench_data"' EXIT
timeout 600 .venv/bin/python benches/harness.py --smoke --binary "$ARTIFLIGHT_BIN" --data "$bench_data"
