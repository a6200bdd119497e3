#!/usr/bin/env bash
# Set up everything (idempotent, offline after the first run) and run the
# whole test suite in release mode.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh --tests
source .deps/env.sh
# style and lint gates first: they fail in seconds, not after the tests
cargo fmt --all --check
cargo clippy --release --workspace --all-targets --quiet -- -D warnings
cargo build --release --workspace --all-targets
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
status=0
cargo test --release --workspace --lib --bins --tests 2>&1 | tee "$LOG" || status=$?
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$LOG" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$LOG" | awk '{s+=$1} END {print s+0}')
echo
echo "caev2: $passed passed, $failed failed"
exit $status
