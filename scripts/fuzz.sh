#!/usr/bin/env bash
# Runs every cargo-fuzz target under fuzz/ for a bounded time each (ETASK_FUZZ_SECONDS, 30 by
# default). cargo-fuzz is installed once into $HOME/.cache/etask-tools/cargo (outside the
# clone); libFuzzer needs nightly compiler flags, which RUSTC_BOOTSTRAP=1 allows on the stable
# toolchain. A crash fails the run; its input is left in fuzz/artifacts/<target>/ — fix the
# bug and copy the input into fuzz/regressions/<target>/, which every run replays first.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${ETASK_FUZZ_SECONDS:-30}"
tools="$HOME/.cache/etask-tools/cargo"
export PATH="$tools/bin:$PATH"
if ! command -v cargo-fuzz >/dev/null; then
    echo "fuzz.sh: installing cargo-fuzz into $tools"
    cargo install --locked --root "$tools" cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${ETASK_FUZZ_TARGET_DIR:-$HOME/.cache/etask-fuzz-target}"
cd fuzz
for t in $(cargo fuzz list); do
    mkdir -p "corpus/$t" "regressions/$t"
    echo "fuzz.sh: $t for ${secs}s"
    # Regression inputs first (each must pass), then a bounded run from the corpus.
    if compgen -G "regressions/$t/*" >/dev/null; then
        cargo fuzz run "$t" regressions/$t/* -- -runs=0
    fi
    cargo fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536
done
echo "fuzz.sh: all targets ran ${secs}s without a crash"
