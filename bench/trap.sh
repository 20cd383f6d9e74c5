#!/usr/bin/env bash
# The per-trap rows of docs/BENCHMARKS.md: `cpuid_loop N` three times under each runner,
# in µs per CPUID. Run where CPUID faulting exists, e.g. in the nested guest:
#   python3 tests/guest/run_in_guest.py -- bash bench/trap.sh [N]
# MASK picks the view (default x87,sse: the guest's CPU has AVX2, no AVX-512); PYTHON
# the interpreter with xcr0run's dependencies (default python3). The compiled core is
# built from the checkout, as the tests build it; "Python loop" rows run without it.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-3000}
mask=${MASK:-x87,sse}
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
gcc -O2 -o "$bin/cpuid_loop" bench/cpuid_loop.c
gcc -O2 -o "$bin/floor_tracer" bench/floor_tracer.c
gcc -O2 -o "$bin/sigsegv_cpuid" bench/sigsegv_cpuid.c
gcc -O2 -std=gnu11 -fvisibility=hidden -fPIC -shared -o "$bin/libxcr0run_core.so" xcr0run/_core.c
export XCR0RUN_CORE_LIBRARY=$bin/libxcr0run_core.so
xcr0run=("${PYTHON:-python3}" -m xcr0run -q --mask "$mask")

run() {
    local name=$1
    shift
    local out
    for _ in 1 2 3; do
        if out=$("$@" "${prog:-$bin/cpuid_loop}" "$n" 2>&1); then
            awk -v name="$name" '/^cpuid_ns/ { printf "%-20s %8.1f µs\n", name, $2 / 1000 }' <<<"$out"
        else
            printf '%-20s failed: %s\n' "$name" "$(tail -n 1 <<<"$out")"
            return
        fi
    done
}

run native
prog=$bin/sigsegv_cpuid run "in-process handler"
run "C floor tracer" "$bin/floor_tracer"
run "xcr0run, audit on" "${xcr0run[@]}" --
run "xcr0run --no-audit" "${xcr0run[@]}" --no-audit --
XCR0RUN_CORE_LIBRARY=/nonexistent run "Python loop, audit on" "${xcr0run[@]}" --
XCR0RUN_CORE_LIBRARY=/nonexistent run "Python loop --no-audit" "${xcr0run[@]}" --no-audit --
