#!/usr/bin/env bash
# Set up everything (idempotent, offline after the first run) and run the
# whole test suite in release mode.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh
source .deps/env.sh
cargo build --release --workspace --all-targets
cargo test --release --workspace
