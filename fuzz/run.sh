#!/usr/bin/env bash
# Builds the fuzz targets and runs each one after the other (one fuzzer
# process at a time) for a bounded time, then prints per target: executions,
# crashes and hangs of this run, and the totals over every run so far.
#
#   fuzz/run.sh [seconds-per-target] [target...]     (default: 60, every target)
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
# The corpus grows in fuzz/corpus/<target> (seeded from fuzz/seeds/<target>);
# crashes and hangs land in fuzz/artifacts/<target>; both are git-ignored.
set -euo pipefail

secs=${1:-60}
shift || true
cd "$(dirname "$0")"
here=$(pwd)
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
# Rust is memory-safe: no sanitizer buys speed; debug assertions keep the
# overflow checks on.
cargo +nightly fuzz build --sanitizer none --debug-assertions
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

history=artifacts/runs.tsv
mkdir -p artifacts
printf '%-16s %12s %8s %6s %14s\n' target executions crashes hangs 'total execs'
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    cp -n "seeds/$t"/* "corpus/$t/" 2>/dev/null || true
    before=$(ls "artifacts/$t" | sort)
    # -jobs=1: the fuzzer runs as a child writing to fuzz-0.log in its folder.
    rm -f "artifacts/$t/fuzz-0.log"
    (
        cd "artifacts/$t"
        "$here/target/$triple/release/$t" "$here/corpus/$t" \
            -jobs=1 -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
            -max_len=8192 -print_final_stats=1 -artifact_prefix="$here/artifacts/$t/" \
            >/dev/null 2>&1 || true
    )
    log="artifacts/$t/fuzz-0.log"
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    # Without final stats (the fuzzer died), the last progress line counts.
    [ -n "$execs" ] || execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
    execs=${execs:-0}
    new=$(comm -13 <(echo "$before") <(ls "artifacts/$t" | sort))
    crashes=$(grep -cE '^(crash|oom|leak)-' <<<"$new" || true)
    hangs=$(grep -cE '^(timeout|slow-unit)-' <<<"$new" || true)
    printf '%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$t" "$execs" "$crashes" "$hangs" >>"$history"
    total=$(awk -F'\t' -v t="$t" '$2 == t { s += $3 } END { print s + 0 }' "$history")
    printf '%-16s %12s %8s %6s %14s\n' "$t" "$execs" "$crashes" "$hangs" "$total"
    for a in $new; do
        case $a in fuzz-0.log) ;; *) echo "    $t: fuzz/artifacts/$t/$a" ;; esac
    done
done
