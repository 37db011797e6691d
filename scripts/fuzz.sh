#!/usr/bin/env bash
# Runs every cargo-fuzz target under fuzz/ for a bounded time each; scripts/test.sh calls it.
#   scripts/fuzz.sh                 each target ETASK_FUZZ_SECONDS (default 20) seconds
#   scripts/fuzz.sh TARGET...       only these targets
#
# What it needs and where it keeps things (all outside the clone, so a fresh clone is clean):
# - cargo-fuzz, pinned, installed once into $HOME/.cache/etask-tools/cargo;
# - the fuzz build in $ETASK_FUZZ_TARGET_DIR (default $HOME/.cache/etask-fuzz-target): the
#   first run builds every dependency once more with libFuzzer's instrumentation (minutes);
#   later runs rebuild only ETask;
# - the growing corpus in $HOME/.cache/etask-fuzz/corpus/TARGET, started from the seeds in
#   fuzz/seeds/TARGET (a few valid inputs of each format, so the first seconds are not spent
#   rediscovering JSON).
# libFuzzer needs nightly compiler flags; RUSTC_BOOTSTRAP=1 allows them on the stable
# toolchain. AddressSanitizer is on (cargo-fuzz's default), with overflow checks and debug
# assertions (cargo-fuzz builds release with them).
#
# A crash, a panic, an input over -rss_limit_mb or one that runs past -timeout fails the run
# and leaves its input in fuzz/artifacts/TARGET/. Fix the bug, then copy the input into
# fuzz/regressions/TARGET/: every run replays those first, so the fix stays.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${ETASK_FUZZ_SECONDS:-20}"
CARGO_FUZZ_VERSION=0.13.2
tools="${ETASK_TOOLS:-$HOME/.cache/etask-tools}/cargo"
export PATH="$tools/bin:$PATH"
if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    echo "fuzz.sh: installing cargo-fuzz $CARGO_FUZZ_VERSION into $tools"
    cargo install --locked --quiet --root "$tools" "cargo-fuzz@$CARGO_FUZZ_VERSION"
fi
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${ETASK_FUZZ_TARGET_DIR:-$HOME/.cache/etask-fuzz-target}"
corpus_root="${ETASK_FUZZ_CORPUS:-$HOME/.cache/etask-fuzz/corpus}"
cd fuzz
if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi
[ ${#targets[@]} -gt 0 ] || { echo "fuzz.sh: no fuzz targets found" >&2; exit 1; }
echo "fuzz.sh: building ${targets[*]}"
cargo fuzz build --release
for t in "${targets[@]}"; do
    corpus="$corpus_root/$t"
    mkdir -p "$corpus"
    if compgen -G "seeds/$t/*" >/dev/null; then
        cp -n seeds/"$t"/* "$corpus"/
    fi
    if compgen -G "regressions/$t/*" >/dev/null; then
        echo "fuzz.sh: $t: replaying fuzz/regressions/$t"
        cargo fuzz run --release "$t" regressions/"$t"/* -- -runs=0
    fi
    echo "fuzz.sh: $t for ${secs}s"
    # -timeout: one input may take 10 s at most (an endless cron search is a bug);
    # -max_len: the parsers face bodies up to MiBs, but 64 KiB finds the structure bugs.
    log="$CARGO_TARGET_DIR/fuzz-$t.log"
    rc=0
    cargo fuzz run --release "$t" "$corpus" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -print_final_stats=1 >"$log" 2>&1 || rc=$?
    # The figures of the run (executions, corpus, peak memory); the whole output on failure.
    grep -E '^#[0-9]+ +DONE|^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" || true
    if [ "$rc" -ne 0 ]; then
        tail -n 60 "$log" >&2
        echo "fuzz.sh: $t FAILED: the input is in fuzz/artifacts/$t/ (fix it, then copy it into fuzz/regressions/$t/)" >&2
        exit 1
    fi
done
echo "fuzz.sh: ${targets[*]}: ${secs}s each without a crash"
