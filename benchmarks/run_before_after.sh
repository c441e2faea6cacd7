#!/usr/bin/env bash
# The before/after suite of issue 12 (RESULTS.md, 2026-11-29): both commits in the same alternating rounds.
# Usage: benchmarks/run_before_after.sh AFTER BEFORE [RESULTS_FILE [NAME...]]   (run from the repository root)
# NAMEs pick a subset: l1b-all l1b-qv s2-all profile startup copy
set -u
AFTER=${1:?usage: run_before_after.sh AFTER BEFORE [RESULTS_FILE [NAME...]]}
BEFORE=${2:?usage: run_before_after.sh AFTER BEFORE [RESULTS_FILE [NAME...]]}
RES=${3:-/tmp/smbench/results-issue12.jsonl}
shift $(( $# >= 3 ? 3 : 2 ))
ONLY=" $* "
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
LOGS=/tmp/smbench/logs
mkdir -p "$LOGS"
B="python3 $HERE/bench_merge.py --sm-repo $REPO --sm-rev $AFTER --sm-before-rev $BEFORE --results $RES"
B="$B --quiet-wait 45 --retry-noisy 3"
want() { [[ "$ONLY" == "  " || "$ONLY" == *" $1 "* ]]; }
run() { local name=$1; shift; want "$name" || return 0; echo "== $name: $* (load $(cut -d' ' -f1 /proc/loadavg))" >&2
        $B "$@" --label "issue12 $AFTER vs $BEFORE $name" > "$LOGS/issue12-$name.out" 2> "$LOGS/issue12-$name.err"
        echo "   rc=$?" >&2; }
run l1b-all --case llama-1b --adapter all-linear --reps 5 --tools cp,sm-before,streammerge,peft
run l1b-qv  --case llama-1b --adapter qv --reps 5 --tools cp,sm-before,streammerge
run s2-all  --case 70b-slice-2 --adapter all-linear --reps 5 --tools cp,sm-before,streammerge --peft-reps 0
if want profile; then  # per-stage profile, in process, each commit's own snapshot
  for rev in "$BEFORE" "$AFTER"; do
    snap=$(ls -d /tmp/smbench/sm-"$(git -C "$REPO" rev-parse --short=9 "$rev")")
    for ad in all-linear qv; do
      echo "== profile $rev $ad (load $(cut -d' ' -f1 /proc/loadavg))" >&2
      PYTHONPATH=$snap python3 "$HERE/profile_sm.py" --case llama-1b --adapter "$ad" --quiet-wait 45 \
        > "$LOGS/issue12-profile-$rev-$ad.out" 2>&1
    done
  done
fi
if want startup; then  # a bad adapter: the error is found while planning
  mkdir -p /tmp/smbench/bad-adapter && echo "{not json" > /tmp/smbench/bad-adapter/adapter_config.json
  for rev in "$BEFORE" "$AFTER"; do
    snap=$(ls -d /tmp/smbench/sm-"$(git -C "$REPO" rev-parse --short=9 "$rev")")
    for i in 1 2 3 4 5 6 7; do
      ( cd /tmp && PYTHONPATH=$snap /usr/bin/time -f "$rev %e s wall %U user %S sys" python3 -m streammerge merge \
          --base /tmp/smbench/llama-1b/base --adapter /tmp/smbench/bad-adapter --out /tmp/smbench/out/bad 2>&1 | tail -1 )
    done
  done > "$LOGS/issue12-startup.out"
fi
if want copy; then
  python3 "$HERE/copy_calls.py" --case llama-1b --reps 3 > "$LOGS/issue12-copy.out" 2>&1
fi
