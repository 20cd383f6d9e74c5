#!/usr/bin/env bash
# The 200-process rows of docs/BENCHMARKS.md: a shell loop starting /bin/true 200 times,
# once under each runner, in wall-clock seconds (xcr0run's own start-up included). Run
# where CPUID faulting exists, e.g. in the nested guest:
#   python3 tests/guest/run_in_guest.py -- bash bench/loop200.sh
# MASK picks the view (default x87,sse: the guest's CPU has AVX2, no AVX-512); PYTHON
# the interpreter with xcr0run's dependencies (default python3). The compiled core is
# built from the checkout, as the tests build it; "Python loop" rows run without it.
set -euo pipefail
cd "$(dirname "$0")/.."
mask=${MASK:-x87,sse}
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
gcc -O2 -o "$bin/floor_tracer" bench/floor_tracer.c
gcc -O2 -std=gnu11 -fvisibility=hidden -fPIC -shared -o "$bin/libxcr0run_core.so" xcr0run/_core.c
export XCR0RUN_CORE_LIBRARY=$bin/libxcr0run_core.so
py=${PYTHON:-python3}
loop=(sh -c 'i=0; while [ $i -lt 200 ]; do /bin/true; i=$((i+1)); done')
TIMEFORMAT=%R

run() {
    local name=$1 took
    shift
    if took=$({ time "$@" "${loop[@]}" >/dev/null 2>&1; } 2>&1); then
        printf '%-40s %6s s\n' "$name" "$took"
    else
        printf '%-40s failed (exit status %s)\n' "$name" "$?"
    fi
}

run native
run "C floor tracer (follows every process)" "$bin/floor_tracer"
run "xcr0run, audit on" "$py" -m xcr0run -q --mask "$mask" --
run "xcr0run --no-audit" "$py" -m xcr0run -q --mask "$mask" --no-audit --
run "xcr0run follow-only" "$py" -m xcr0run -q --mask host --audit --
XCR0RUN_CORE_LIBRARY=/nonexistent run "Python loop, audit on" "$py" -m xcr0run -q --mask "$mask" --
XCR0RUN_CORE_LIBRARY=/nonexistent run "Python loop --no-audit" "$py" -m xcr0run -q --mask "$mask" --no-audit --
