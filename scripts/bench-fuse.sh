#!/usr/bin/env bash
# fuse-erofs figures (part of `make bench`): a full read of every file through erofs-compat's FUSE
# server against the kernel's own file-backed mount of the same image, in the same run, one
# sequential reader (find -exec cat), page cache dropped before every cold read.
set -euo pipefail
BIN=$(readlink -f "$1")
work=$2
. "$(dirname "$0")/bench-lib.sh"
if [ "$(id -u)" -ne 0 ] || [ ! -e /dev/fuse ]; then echo "fuse benches skipped: need root and /dev/fuse"; exit 0; fi
export EROFS_COMPAT_STATE_DIR=/dev/shm/erofs-compat-bench-fuse
mkdir -p "$work/fk" "$work/ff" "$work/fp"
# The peer a user would run instead: erofsfuse, built from Debian's erofs-utils source once.
peer=$("$(dirname "$0")/build-peer-erofsfuse.sh" "$(dirname "$0")/../.build/peer" 2>"$work/peer.err") \
    || { echo "peer erofsfuse skipped: $(cat "$work/peer.err")"; peer=; }
cleanup() {
    mountpoint -q "$work/ff" && { "$BIN" umount "$work/ff" >/dev/null 2>&1 || umount -l "$work/ff"; }
    mountpoint -q "$work/fk" && umount -l "$work/fk"
    mountpoint -q "$work/fp" && { fusermount3 -u "$work/fp" || umount -l "$work/fp"; }
    rm -rf "$EROFS_COMPAT_STATE_DIR"
}
trap cleanup EXIT
readall() { find "$1" -type f -exec cat {} + > /dev/null; }
# The kernel's file-backed mount where it has one (mount(8) would put the file on a loop device).
mountkernel() { python3 "$(dirname "$0")/mount-file-backed.py" "$1" "$2" 2>/dev/null || mount -t erofs -o ro "$1" "$2"; }

# Five hot passes, timed together (one pass of a small image is a few ms: process start would
# dominate a single one); prints microseconds per pass.
hot5() {
    local s e
    s=$(now_us); for _ in 1 2 3 4 5; do readall "$1"; done; e=$(now_us)
    echo $(((e - s) / 5))
}

# IMAGE LABEL: cold and hot full reads, kernel vs fuse-erofs (and the peer erofsfuse where it
# built), median of 5 each, the three interleaved.
compare() {
    local kc=() kh=() fc=() fh=() pc=() ph=() s e
    for i in 1 2 3 4 5; do
        mountkernel "$1" "$work/fk"
        drop; s=$(now_us); readall "$work/fk"; e=$(now_us); kc+=($((e - s)))
        kh+=($(hot5 "$work/fk"))
        umount "$work/fk"
        "$BIN" mount --backend fuse-erofs "$1" "$work/ff" >/dev/null
        drop; s=$(now_us); readall "$work/ff"; e=$(now_us); fc+=($((e - s)))
        fh+=($(hot5 "$work/ff"))
        "$BIN" umount "$work/ff" >/dev/null
        [ -n "$peer" ] || continue
        "$peer" "$1" "$work/fp" >/dev/null 2>&1
        drop; s=$(now_us); readall "$work/fp"; e=$(now_us); pc+=($((e - s)))
        ph+=($(hot5 "$work/fp"))
        fusermount3 -u "$work/fp"
    done
    local a b c d
    a=$(printf '%s\n' "${kc[@]}" | median); b=$(printf '%s\n' "${fc[@]}" | median)
    c=$(printf '%s\n' "${kh[@]}" | median); d=$(printf '%s\n' "${fh[@]}" | median)
    awk -v a="$a" -v b="$b" -v c="$c" -v d="$d" -v n="$2" 'BEGIN {
        printf "%s: cold kernel %.3f s, fuse-erofs %.3f s, ratio %.2f (target <= 1.25); ", n, a/1e6, b/1e6, b/a
        printf "hot kernel %.3f s, fuse-erofs %.3f s, ratio %.2f (target <= 1.1)\n", c/1e6, d/1e6, d/c }'
    [ -n "$peer" ] || return 0
    local p q
    p=$(printf '%s\n' "${pc[@]}" | median); q=$(printf '%s\n' "${ph[@]}" | median)
    awk -v a="$a" -v b="$b" -v c="$c" -v d="$d" -v p="$p" -v q="$q" 'BEGIN {
        printf "   peer erofsfuse 1.9.4: cold %.3f s, %.2fx the kernel, fuse-erofs %.2fx of it; ", p/1e6, p/a, b/p
        printf "hot %.3f s, %.2fx the kernel, fuse-erofs %.2fx of it\n", q/1e6, q/c, d/q }'
}

echo "== fuse-erofs vs the kernel's file-backed mount: full read, one sequential reader (median of 5; hot: 5 passes each)"
python3 - "$work/large" "$work/small" <<'PY'
import os, random, sys
random.seed(3)
large, small = sys.argv[1], sys.argv[2]
os.makedirs(large); os.makedirs(small)
for i in range(16):
    with open(os.path.join(large, f"f{i:02d}.bin"), "wb") as f: f.write(os.urandom(16 << 20))
words = [bytes(random.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(random.randint(2, 9))) for _ in range(3000)]
total, i = 0, 0
while total < 260 << 20:
    d = os.path.join(small, f"d{i // 500:03d}")
    os.makedirs(d, exist_ok=True)
    size = random.randint(1, 48) << 10
    with open(os.path.join(d, f"f{i:05d}"), "wb") as f:
        if i % 3 == 0:
            f.write(os.urandom(size))
        else:
            out = bytearray()
            while len(out) < size: out += b" ".join(random.choices(words, k=256)) + b"\n"
            f.write(bytes(out[:size]))
    total += size; i += 1
PY
mkfs.erofs --quiet "$work/large.erofs" "$work/large"
mkfs.erofs --quiet -zlz4hc "$work/small.erofs" "$work/small"
# A large compressible file in 1 MiB pclusters: FUSE reads of 128 KiB each hit one pcluster (the
# reader's pcluster cache decompresses it once).
mkdir -p "$work/text"
python3 - "$work/text/log.txt" <<'PY'
import random, sys
random.seed(5)
words = [''.join(random.choice('abcdefghij') for _ in range(random.randint(2, 9))) for _ in range(2000)]
with open(sys.argv[1], 'w') as f:
    for _ in range(1 << 15): f.write(' '.join(random.choices(words, k=300)) + '\n')
PY
mkfs.erofs --quiet -zlz4hc -C1048576 "$work/text.erofs" "$work/text"
rm -rf "$work/text"
nsmall=$(find "$work/small" -type f | wc -l)
rm -rf "$work/large" "$work/small"
echo "   images: $(($(stat -c %s "$work/large.erofs") >> 20)) MiB of uncompressed 16 MiB files;" \
     "$(($(stat -c %s "$work/small.erofs") >> 20)) MiB lz4hc of $nsmall files of 1-48 KiB"
compare "$work/large.erofs" "large files, uncompressed"
# Why hot large-file reads trail the kernel: its page cache of the same file, read the same way.
mountkernel "$work/large.erofs" "$work/fk"
"$BIN" mount --backend fuse-erofs "$work/large.erofs" "$work/ff" >/dev/null
f=$(cd "$work/fk" && ls | head -1)
echo "   page cache after a read: kernel $(python3 "$(dirname "$0")/page-cache-folios.py" "$work/fk/$f" | cut -d: -f2-);" \
     "fuse-erofs $(python3 "$(dirname "$0")/page-cache-folios.py" "$work/ff/$f" | cut -d: -f2-)"
"$BIN" umount "$work/ff" >/dev/null
umount "$work/fk"
compare "$work/small.erofs" "small files, lz4hc"
compare "$work/text.erofs" "one large text file, lz4hc, 1 MiB pclusters"
rm -f "$work/large.erofs" "$work/small.erofs" "$work/text.erofs"
