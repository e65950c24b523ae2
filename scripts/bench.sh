#!/usr/bin/env bash
# make bench: figures as medians, and ratios against baselines measured in the same run.
set -euo pipefail
BIN=$(readlink -f "${1:-.build/release/erofs-compat}")
work=$(mktemp -d /var/tmp/erofs-compat-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
now_us() { echo $(( $(date +%s%N) / 1000 )); }

echo "== probe: wall time of 'erofs-compat probe --json' (median of 20; target <= 50 ms)"
for i in $(seq 20); do
    s=$(now_us); "$BIN" probe --json --cache-dir "$work" >/dev/null || true; e=$(now_us)
    echo $(( e - s ))
done | median | awk '{printf "probe median: %.1f ms\n", $1/1000}'

exit 0
