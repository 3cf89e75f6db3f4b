#!/usr/bin/env bash
# The fuzz smoke: builds every target and runs each for a short time from its seed corpus.
#
#   fuzz/smoke.sh                      # 20 s per target
#   FUZZ_SECONDS=120 fuzz/smoke.sh     # longer
#   fuzz/smoke.sh pgoutput cast        # some targets only
#   FUZZ_SANITIZER=none fuzz/smoke.sh  # no AddressSanitizer (CI: faster to build; panics and
#                                      # debug assertions are still caught)
#   FUZZ_TARGET_DIR=DIR fuzz/smoke.sh  # build there (CI keeps it between runs, as a cache)
#
# Needs the nightly toolchain (libFuzzer's instrumentation); installs cargo-fuzz when it is
# missing. Exits non-zero when a target crashes (a panic is a crash): the input is left in
# fuzz/artifacts/<target>/ and `cargo +nightly fuzz run <target> <that file>` replays it.
# The committed seeds (fuzz/corpus/<target>) are only read: what the runs find goes to
# fuzz/target/smoke/<target>, which is not committed. See docs/fuzzing.md.
set -euo pipefail

cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-20}"
toolchain="${FUZZ_TOOLCHAIN:-nightly}"

if ! cargo "+$toolchain" --version >/dev/null 2>&1; then
    echo "fuzz/smoke.sh: the $toolchain toolchain is missing (rustup toolchain install $toolchain)" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz/smoke.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo "+$toolchain" fuzz list)
fi

flags=()
if [ -n "${FUZZ_SANITIZER:-}" ]; then flags+=(-s "$FUZZ_SANITIZER"); fi
if [ -n "${FUZZ_TARGET_DIR:-}" ]; then flags+=(--target-dir "$FUZZ_TARGET_DIR"); fi

cargo "+$toolchain" fuzz build "${flags[@]}"

declare -A execs rates results
failed=0
for target in "${targets[@]}"; do
    work="target/smoke/$target"
    mkdir -p "$work" "artifacts/$target"
    log="target/smoke/$target.log"
    echo "== $target: ${seconds}s"
    if cargo "+$toolchain" fuzz run "${flags[@]}" "$target" "$work" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        results[$target]=ok
    else
        results[$target]=CRASH
        failed=1
        # The panic or sanitizer report, and where the input was written.
        grep -E "panicked|ERROR: |SUMMARY|Test unit written|artifact_prefix" "$log" >&2 || tail -30 "$log" >&2
    fi
    execs[$target]=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rates[$target]=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
done

echo
printf '%-14s %-6s %14s %10s\n' target result executions exec/s
for target in "${targets[@]}"; do
    printf '%-14s %-6s %14s %10s\n' "$target" "${results[$target]}" \
        "${execs[$target]:-?}" "${rates[$target]:-?}"
done
exit "$failed"
