#!/usr/bin/env bash
# The full suite behind RESULTS.md. Usage: benchmarks/run_suite.sh SHA [RESULTS_FILE [NAME...]]
# (NAMEs pick a subset: l1b-all l1b-qv l1b-all-nonfinite s2-all s4-all)
# Needs ~25 GB under /tmp/smbench for the cases and up to ~22 GB more for outputs (70b-slice-4 PEFT).
set -u
SHA=${1:?usage: run_suite.sh SHA [RESULTS_FILE]}
RES=${2:-/tmp/smbench/results.jsonl}
shift $(( $# >= 2 ? 2 : 1 ))
ONLY=" $* "
B="python3 $(dirname "$0")/bench_merge.py --sm-rev $SHA --results $RES --quiet-wait 45 --retry-noisy 4"
mkdir -p /tmp/smbench/logs
run() { local name=$1; shift; [[ "$ONLY" == "  " || "$ONLY" == *" $name "* ]] || return 0; echo "== $name: $*" >&2; $B "$@" --label "suite $SHA $name" \
        > /tmp/smbench/logs/suite-$name.out 2> /tmp/smbench/logs/suite-$name.err; echo "   rc=$?" >&2; }
run l1b-all   --case llama-1b --adapter all-linear --reps 3
run l1b-qv    --case llama-1b --adapter qv --reps 3
run l1b-all-nonfinite --case llama-1b --adapter all-linear --reps 3 --tools cp,streammerge --sm-args "--allow-nonfinite"
run s2-all    --case 70b-slice-2 --adapter all-linear --reps 3 --peft-reps 1 --no-peft-warmup
run s4-all    --case 70b-slice-4 --adapter all-linear --reps 3 --peft-reps 1 --no-peft-warmup
