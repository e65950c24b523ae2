#!/usr/bin/env bash
# Verified lazy mounts (part of `make bench`): cold lazy mount + read of every file over nginx with
# every block checked against the fs-verity tree (--verity) vs without, same image, same run; and
# what the tree adds to the transfer. Medians of 5 (BENCH_VERITY_RUNS), page cache dropped before each.
set -euo pipefail
BIN=$(readlink -f "$1")
work=$2/verity
. "$(dirname "$0")/bench-lib.sh"
{ [ "$(id -u)" -eq 0 ] && command -v nginx >/dev/null; } || { echo "verity benches skipped: need root and nginx"; exit 0; }
mkdir -p "$work/tree" "$work/www" "$work/ngx" "$work/mnt"
state=/dev/shm/erofs-compat-bench-verity
port=$((20000 + RANDOM % 30000))
cleanup() {
    mountpoint -q "$work/mnt" && { EROFS_COMPAT_STATE_DIR=$state "$BIN" umount "$work/mnt" >/dev/null 2>&1 || umount -l "$work/mnt"; }
    nginx -c "$work/ngx/nginx.conf" -p "$work/ngx" -s stop 2>/dev/null || true
    rm -rf "$work" "$state"
}
trap cleanup EXIT
export EROFS_COMPAT_STATE_DIR=$state
python3 - "$work/tree" <<'PY'
import os, random, sys
random.seed(11)
total = 0
i = 0
while total < 256 << 20:
    size = min(random.randint(1, 16) << 20, (256 << 20) - total)
    with open(os.path.join(sys.argv[1], f"f{i:03d}.bin"), "wb") as f: f.write(os.urandom(size))
    total += size; i += 1
PY
mkfs.erofs --quiet "$work/www/img.erofs" "$work/tree"
digest=$("$BIN" image verity "$work/www/img.erofs" --tree "$work/www/img.erofs.verity" | cut -c8-71)
cat > "$work/ngx/nginx.conf" <<CONF
daemon on; user root; worker_processes 2; pid $work/ngx/pid; error_log $work/ngx/err;
events { worker_connections 256; }
http { access_log $work/ngx/access; client_body_temp_path $work/ngx; proxy_temp_path $work/ngx; fastcgi_temp_path $work/ngx;
       uwsgi_temp_path $work/ngx; scgi_temp_path $work/ngx; keepalive_requests 100000;
       server { listen 127.0.0.1:$port; root $work/www; } }
CONF
nginx -c "$work/ngx/nginx.conf" -p "$work/ngx"
url=http://127.0.0.1:$port/img.erofs
run() {  # extra mount arguments...
    rm -rf "$work/cache"; : > "$work/ngx/access"; nginx -c "$work/ngx/nginx.conf" -p "$work/ngx" -s reopen 2>/dev/null; drop
    local s e
    s=$(now_us)
    "$BIN" mount --no-daemon --cache-dir "$work/cache" "$@" "$url" "$work/mnt" >/dev/null
    find "$work/mnt" -type f -exec cat {} + >/dev/null
    e=$(now_us)
    "$BIN" umount "$work/mnt" >/dev/null
    echo $((e - s))
}
plain=(); checked=()
for _ in $(seq "${BENCH_VERITY_RUNS:-5}"); do
    plain+=("$(run)")
    checked+=("$(run --verity "sha256:$digest")")
done
tree_bytes=$(awk '$7 ~ /img.erofs.verity/ {s += $10} END {print s + 0}' "$work/ngx/access")
p=$(printf '%s\n' "${plain[@]}" | median); c=$(printf '%s\n' "${checked[@]}" | median)
size=$(stat -c %s "$work/www/img.erofs")
echo "== verified lazy mounts: cold mount + read every file of a 256 MiB image over nginx (median of ${BENCH_VERITY_RUNS:-5})"
awk -v p="$p" -v c="$c" -v t="$tree_bytes" -v s="$size" 'BEGIN {
    printf "without --verity %.3f s, with %.3f s: %.3fx (target <= 1.05)\n", p/1e6, c/1e6, c/p
    # The whole fs-verity tree: its leaves alone are 1/128 of the data, the levels above add more.
    b = int((s + 4095) / 4096); n = 0
    while (b > 1) { b = int((b + 127) / 128); n += b }
    printf "tree transferred: %d bytes = 1/%d of the blob (target <= 1/128; the whole tree is %d bytes = 1/%.1f)\n", \
        t, (t > 0 ? s/t : 0), n * 4096, s / (n * 4096) }'
