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

echo
echo "== mount+umount latency per backend, in process, vs raw syscalls on the same image (median of 30; target <= 1.3x)"
mkdir -p "$work/tree" "$work/mnt"
cp -r "$(dirname "$0")/../Sources" "$work/tree/"
mkfs.erofs --quiet "$work/img.erofs" "$work/tree"
state_base=/run
[ "$(stat -f -c %T /run 2>/dev/null)" = tmpfs ] || state_base=/dev/shm   # state lives on tmpfs on real hosts
BENCH_STATE_BASE=$state_base "$(dirname "$BIN")/Bench" mount-latency "$work/img.erofs" "$work"

echo
echo "== the same through the CLI (two processes; start-up included), median of 10"
for i in $(seq 10); do
    s=$(now_us)
    EROFS_COMPAT_STATE_DIR=$state_base/erofs-compat-bench-cli "$BIN" mount "$work/img.erofs" "$work/mnt" >/dev/null
    EROFS_COMPAT_STATE_DIR=$state_base/erofs-compat-bench-cli "$BIN" umount "$work/mnt" >/dev/null
    e=$(now_us); echo $(( e - s ))
done | median | awk '{printf "erofs-compat mount + umount (CLI): %.1f ms\n", $1/1000}'
rm -rf "$state_base/erofs-compat-bench-cli"
exit 0
