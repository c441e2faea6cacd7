#!/usr/bin/env bash
# Alternating A/B of two streammerge trees through the CLI alone (whole process, the output deleted and synced
# between runs). Prints each side's times and the per-pair ratio B/A; quote the median of the ratios.
# Usage: benchmarks/ab_cli.sh ADAPTER PAIRS TREE_A TREE_B [cold]
#   ADAPTER: qv | all-linear (a /tmp/smbench/llama-1b/lora-ADAPTER made by bench_merge.py)
#   cold:    drop torch's files from the page cache before each run (as on a fresh node)
# Runs from /tmp so that PYTHONPATH, not the current directory, decides which streammerge is imported.
set -u
ad=${1:?adapter}; n=${2:?pairs}; A=${3:?tree A}; B=${4:?tree B}; cold=${5:-}
case_dir=/tmp/smbench/llama-1b; out=/tmp/smbench/out/ab
torch_dir=$(python3 -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('torch').origin))")
evict() {  # posix_fadvise(DONTNEED) on every file under torch's package directory
  python3 - "$torch_dir" <<'PY'
import os, sys
for d, _, files in os.walk(sys.argv[1]):
    for f in files:
        try:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
        except OSError:
            continue
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
PY
}
for _ in $(seq 1 "$n"); do
  for side in A B; do
    tree=$A; [ "$side" = B ] && tree=$B
    rm -rf "$out"; sync; [ "$cold" = cold ] && evict
    s=$(date +%s.%N)
    (cd /tmp && PYTHONPATH=$tree python3 -m streammerge merge --base "$case_dir/base" \
        --adapter "$case_dir/lora-$ad" --out "$out" -q)
    e=$(date +%s.%N)
    echo "$side $(echo "$e - $s" | bc)"
  done
done | awk '{v[$1]=v[$1]" "$2; if($1=="A")a=$2; else {r=r" "sprintf("%.3f",$2/a)}}
            END {print "A:"v["A"]; print "B:"v["B"]; print "B/A per pair:" r}'
rm -rf "$out"
