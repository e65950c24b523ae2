#!/usr/bin/env bash
# make bench: figures as medians, and ratios against baselines measured in the same run.
set -euo pipefail
BIN=$(readlink -f "${1:-.build/release/erofs-compat}")
work=$(mktemp -d /var/tmp/erofs-compat-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
# Measure the binary as `make install` ships it: stripped.
strip -o "$work/erofs-compat" "$BIN"
BENCH_DIR=$(dirname "$BIN")
BIN=$work/erofs-compat

. "$(dirname "$0")/bench-lib.sh"

echo "== probe: wall time of 'erofs-compat probe --json' (median of 20; target <= 50 ms)"
for i in $(seq 20); do
    s=$(now_us); "$BIN" probe --json --cache-dir "$work" >/dev/null || true; e=$(now_us)
    echo $(( e - s ))
done | median | awk '{printf "probe median: %.1f ms\n", $1/1000}'

echo
echo "== mount+umount latency per backend, in process, vs raw syscalls on the same image (median of 100, interleaved; target <= 1.3x)"
echo "   (mount and umount timed apart, the mount left in place 2 ms between them on every side; 'required steps alone':"
echo "   the checks and state the runtime must do around the same syscalls, with no planner, as a floor)"
mkdir -p "$work/tree" "$work/mnt"
cp -r "$(dirname "$0")/../Sources" "$work/tree/"
mkfs.erofs --quiet "$work/img.erofs" "$work/tree"
state_base=/run
[ "$(stat -f -c %T /run 2>/dev/null)" = tmpfs ] || state_base=/dev/shm   # state lives on tmpfs on real hosts
BENCH_STATE_BASE=$state_base "$BENCH_DIR/Bench" mount-latency "$work/img.erofs" "$work"

echo
echo "== the same through the CLI (two processes; start-up included), median of 10"
for i in $(seq 10); do
    s=$(now_us)
    EROFS_COMPAT_STATE_DIR=$state_base/erofs-compat-bench-cli "$BIN" mount "$work/img.erofs" "$work/mnt" >/dev/null
    EROFS_COMPAT_STATE_DIR=$state_base/erofs-compat-bench-cli "$BIN" umount "$work/mnt" >/dev/null
    e=$(now_us); echo $(( e - s ))
done | median | awk '{printf "erofs-compat mount + umount (CLI): %.1f ms\n", $1/1000}'
rm -rf "$state_base/erofs-compat-bench-cli"

echo
echo "== image extract: ~200 MiB lz4hc image, erofs-compat vs fsck.erofs --extract (median of 3, same run)"
mkdir -p "$work/big"
python3 - "$work/big" <<'PY'
import os, random, sys
random.seed(1)
root = sys.argv[1]
words = [bytes(random.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(random.randint(2, 9))) for _ in range(4000)]
total = 0
i = 0
while total < 200 << 20:
    size = random.randint(1, 16) << 20
    with open(os.path.join(root, f"f{i:02d}"), "wb") as f:
        if i % 2:
            f.write(os.urandom(size))
        else:
            out = bytearray()
            while len(out) < size:
                out += b" ".join(random.choices(words, k=512)) + b"\n"
            f.write(out[:size])
    total += size
    i += 1
PY
mkfs.erofs --quiet -zlz4hc "$work/big.erofs" "$work/big"
ls -l "$work/big.erofs" | awk '{printf "image: %.0f MiB\n", $5/1048576}'
ours=(); theirs=()
for i in 1 2 3; do
    rm -rf "$work/x1" "$work/x2"
    s=$(now_us); "$BIN" image extract "$work/big.erofs" "$work/x1" >/dev/null; e=$(now_us); ours+=($((e - s)))
    s=$(now_us); fsck.erofs --extract="$work/x2" "$work/big.erofs" >/dev/null 2>&1; e=$(now_us); theirs+=($((e - s)))
done
o=$(printf '%s\n' "${ours[@]}" | median); t=$(printf '%s\n' "${theirs[@]}" | median)
diff -rq "$work/x1" "$work/x2" >/dev/null && same=identical || same=DIFFERENT
awk -v o="$o" -v t="$t" -v s="$same" 'BEGIN {printf "extract: erofs-compat %.2f s, fsck.erofs %.2f s, ratio %.2f (outputs %s)\n", o/1e6, t/1e6, o/t, s}'
rm -rf "$work/x1" "$work/x2" "$work/big" "$work/big.erofs"

echo
echo "== meta-ranges on a 10k-file image (median of 5)"
python3 - "$work/many" <<'PY'
import os, sys
root = sys.argv[1]
for d in range(100):
    os.makedirs(os.path.join(root, f"d{d:03d}"))
    for f in range(100):
        with open(os.path.join(root, f"d{d:03d}", f"file{f:03d}.txt"), "w") as fh:
            fh.write(f"{d} {f}\n" * (f % 40 + 1))
PY
mkfs.erofs --quiet -zlz4hc "$work/many.erofs" "$work/many"
for i in 1 2 3 4 5; do
    s=$(now_us); "$BIN" image meta-ranges "$work/many.erofs" >/dev/null; e=$(now_us); echo $((e - s))
done | median | awk '{printf "meta-ranges (10k files, CLI incl. start-up): %.1f ms\n", $1/1000}'
"$BIN" image meta-ranges "$work/many.erofs" | tail -1

echo
# (a)-(c) of the remote figures also for an earlier commit (BENCH_BASELINE=REV, built here in a
# worktree; empty: skipped), so a change is judged against its predecessor in the same run.
base_bin=
if [ -n "${BENCH_BASELINE:-}" ] && git -C "$(dirname "$0")/.." rev-parse -q --verify "$BENCH_BASELINE^{commit}" >/dev/null; then
    repo=$(cd "$(dirname "$0")/.." && pwd)
    echo "== building $BENCH_BASELINE for the baseline rows"
    git -C "$repo" worktree add -q --detach "$work/base" "$BENCH_BASELINE"
    if (cd "$work/base" && "${SWIFT:-swift}" build -c release --static-swift-stdlib >"$work/base-build.log" 2>&1); then
        strip -o "$work/erofs-compat-base" "$work/base/.build/release/erofs-compat" && base_bin=$work/erofs-compat-base
    else
        echo "baseline $BENCH_BASELINE did not build (rows skipped): $(tail -3 "$work/base-build.log")"
    fi
    git -C "$repo" worktree remove --force "$work/base"
fi
"$(dirname "$0")/bench-remote.sh" "$BIN" "$work" "$base_bin" "${BENCH_BASELINE:-}"
echo
"$(dirname "$0")/bench-nbd.sh" "$BIN" "$work"
echo
"$(dirname "$0")/bench-fuse.sh" "$BIN" "$work"
echo
"$(dirname "$0")/bench-verity.sh" "$BIN" "$work"
exit 0
