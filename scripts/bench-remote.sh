#!/usr/bin/env bash
# Remote-image figures (part of `make bench`): lazy fanotify mounts over nginx on 127.0.0.1 against
# what a user does without this tool, each measured in the same run, page cache dropped before each.
set -euo pipefail
BIN=$(readlink -f "$1")
work=$2
# Optional: the binary of an earlier commit; (a), (b) and (c) are then measured for it too, in this run.
BASE_BIN=${3:-}
BASE_LABEL=${4:-base}
. "$(dirname "$0")/bench-lib.sh"
if [ "$(id -u)" -ne 0 ] || ! command -v nginx >/dev/null; then echo "remote benches skipped: need root and nginx"; exit 0; fi

www="$work/www"; mkdir -p "$www" "$work/ngx" "$work/m1" "$work/m2"
port=$((20000 + RANDOM % 30000))
cat > "$work/ngx/nginx.conf" <<CONF
daemon on; user root; worker_processes 2; pid $work/ngx/pid; error_log $work/ngx/err;
events { worker_connections 256; }
http { access_log off; client_body_temp_path $work/ngx; proxy_temp_path $work/ngx; fastcgi_temp_path $work/ngx;
       uwsgi_temp_path $work/ngx; scgi_temp_path $work/ngx; keepalive_requests 100000;
       server { listen 127.0.0.1:$port; root $www; } }
CONF
nginx -c "$work/ngx/nginx.conf" -p "$work/ngx"
rport=$((20000 + RANDOM % 30000)); [ "$rport" = "$port" ] && rport=$((rport + 1))
registry_pid=
if command -v docker-registry >/dev/null; then
    cat > "$work/registry.yml" <<CONF
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$rport}
CONF
    docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
    registry_pid=$!
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$rport/v2/" && break; sleep 0.05; done
fi
state=/dev/shm/erofs-compat-bench-remote
cleanup() {
    for m in "$work/m1" "$work/m2"; do mountpoint -q "$m" && { EROFS_COMPAT_STATE_DIR=$state "$BIN" umount "$m" >/dev/null 2>&1 || umount -l "$m"; }; done
    nginx -c "$work/ngx/nginx.conf" -p "$work/ngx" -s stop 2>/dev/null || true
    [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null || true
    stop_daemon
    rm -rf "$state"
}
trap cleanup EXIT
export EROFS_COMPAT_STATE_DIR=$state

mkimage() {  # NAME MiB
    python3 - "$work/t-$1" "$2" <<'PY'
import os, random, sys
random.seed(7)
root, budget = sys.argv[1], int(sys.argv[2]) << 20
os.makedirs(root)
total, i = 0, 0
while total < budget:
    size = min(random.randint(1, 16) << 20, budget - total)
    with open(os.path.join(root, f"f{i:03d}.bin"), "wb") as f: f.write(os.urandom(size))
    total += size; i += 1
for j in range(40):
    with open(os.path.join(root, f"text{j:02d}.txt"), "w") as f: f.write(f"small file {j}\n" * 100)
os.symlink("text00.txt", os.path.join(root, "link"))
PY
    mkfs.erofs --quiet "$www/$1.erofs" "$work/t-$1"
    rm -rf "$work/t-$1"
}
readall() { find "$1" -type f -print0 | xargs -0 -P 4 -n 8 cat > /dev/null; }
readone() { find "$1" -type f -exec cat {} + > /dev/null; }
# A local image as a user mounts it: file-backed where the kernel can, else through a loop device.
# The kernel's file-backed mount where it has one (mount(8) would put the file on a loop device).
mountlocal() {
    python3 "$(dirname "$0")/mount-file-backed.py" "$1" "$2" 2>/dev/null || mount -t erofs -o ro "$1" "$2" 2>/dev/null \
        || mount -t erofs -o ro,loop "$1" "$2"
}
# The binaries measured: this commit's, and the earlier one when given.
bins() { echo "$BIN"; [ -n "$BASE_BIN" ] && echo "$BASE_BIN"; true; }
tag() { [ "$1" = "$BIN" ] && echo "" || echo " [$BASE_LABEL]"; }

# push NAME: the image as the only layer of oci://127.0.0.1:$rport/bench/NAME:latest (Distribution API).
push() {
    local f="$www/$1.erofs" d size loc cfg cd
    d=sha256:$(sha256sum "$f" | cut -c1-64); size=$(stat -c %s "$f")
    up() {  # FILE DIGEST
        loc=$(curl -s -D - -o /dev/null -X POST "http://127.0.0.1:$rport/v2/bench/$1/blobs/uploads/" | tr -d '\r' | awk 'tolower($1)=="location:" {print $2}')
        case "$loc" in /*) loc="http://127.0.0.1:$rport$loc" ;; esac
        curl -s -f -H "Content-Type: application/octet-stream" -T "$2" "$loc&digest=$3" >/dev/null
    }
    printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}' > "$work/config.json"
    cd=sha256:$(sha256sum "$work/config.json" | cut -c1-64)
    up "$1" "$work/config.json" "$cd"
    up "$1" "$f" "$d"
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.erofs.layer.v1","digest":"%s","size":%s}]}' \
        "$cd" "$(stat -c %s "$work/config.json")" "$d" "$size" > "$work/manifest.json"
    curl -s -f -X PUT -H "Content-Type: application/vnd.oci.image.manifest.v1+json" --data-binary "@$work/manifest.json" \
        "http://127.0.0.1:$rport/v2/bench/$1/manifests/latest" >/dev/null
    echo "http://127.0.0.1:$rport/v2/bench/$1/blobs/$d"
}

# cold SOURCE DOWNLOAD_URL LABEL [BACKEND] [BINARY]: (a) lazy mount + read all vs download whole +
# file-backed mount + read all, with four parallel readers and with one sequential reader.
cold() {
    local backend=${4:-auto} B=${5:-$BIN} readers
    for readers in 4 1; do
        local lazy=() base=() l b target
        for i in 1 2 3; do
            rm -rf "$work/cache"; drop
            s=$(now_us); "$B" mount --backend "$backend" --cache-dir "$work/cache" "$1" "$work/m1" >/dev/null 2>&1
            if [ $readers = 4 ]; then readall "$work/m1"; else readone "$work/m1"; fi; e=$(now_us)
            lazy+=($((e - s))); "$B" umount "$work/m1" >/dev/null
            rm -f "$work/dl.erofs"; drop
            s=$(now_us); curl -s -o "$work/dl.erofs" "$2"; mountlocal "$work/dl.erofs" "$work/m2"
            if [ $readers = 4 ]; then readall "$work/m2"; else readone "$work/m2"; fi; e=$(now_us)
            base+=($((e - s))); umount "$work/m2"
        done
        l=$(printf '%s\n' "${lazy[@]}" | median); b=$(printf '%s\n' "${base[@]}" | median)
        [ $readers = 4 ] && target=1.0 || target=1.25
        awk -v l="$l" -v b="$b" -v n="$3$(tag "$B")" -v r="$readers" -v t="$target" 'BEGIN {
            printf "cold (%s), %d reader%s: erofs-compat %.2f s, download+mount %.2f s, ratio %.2f (target <= %s)\n",
                n, r, r == 1 ? "" : "s", l/1e6, b/1e6, l/b, t }'
    done
}

# small SOURCE DOWNLOAD_URL LABEL [daemon]: (c) lazy mount + one small file vs downloading the whole
# blob. With "daemon", `erofs-compat daemon` (started once, outside the timing) performs the mount.
small() {
    local one=() dl=() x d how="--no-daemon" backend=${5:-auto} B=${6:-$BIN}
    [ "${4:-}" = daemon ] && how=""
    for i in 1 2 3 4 5; do
        rm -rf "$work/cache"; drop
        s=$(now_us); "$B" mount $how --backend "$backend" --cache-dir "$work/cache" "$1" "$work/m1" >/dev/null 2>&1
        cat "$work/m1/text05.txt" > /dev/null; e=$(now_us)
        one+=($((e - s))); "$B" umount "$work/m1" >/dev/null
        rm -f "$work/dl.erofs"; drop
        s=$(now_us); curl -s -o "$work/dl.erofs" "$2"; e=$(now_us); dl+=($((e - s)))
    done
    x=$(printf '%s\n' "${one[@]}" | median); d=$(printf '%s\n' "${dl[@]}" | median)
    awk -v x="$x" -v d="$d" -v n="$3" 'BEGIN {printf "one small file (%s): erofs-compat %.3f s, whole download %.3f s, ratio %.1f%% (target <= 5%%)\n", n "'"$(tag "$B")"'", x/1e6, d/1e6, 100*x/d}'
}

# The resident service for the (c) figures "with the daemon" (its own keeper, as when started by hand).
daemon_pid=
start_daemon() {
    "${1:-$BIN}" daemon 2>>"$work/daemon.log" &
    daemon_pid=$!
    for _ in $(seq 100); do [ -S "$state/daemon.sock" ] && break; sleep 0.05; done
}
stop_daemon() { [ -n "$daemon_pid" ] && { kill "$daemon_pid"; wait "$daemon_pid" 2>/dev/null; daemon_pid=; }; true; }

# BENCH_REMOTE_ONLY=c: the (c) figures alone.
if [ "${BENCH_REMOTE_ONLY:-}" != c ]; then
mkimage img256 256
url="http://127.0.0.1:$port/img256.erofs"
# BENCH_REMOTE_ONLY=b: the warm figures alone.
if [ "${BENCH_REMOTE_ONLY:-}" != b ]; then
echo "== (a) cold 256 MiB image of 1-16 MiB files: lazy mount + read every file vs download whole + file-backed mount + read (median of 3)"
[ -n "$registry_pid" ] && blob=$(push img256)
for B in $(bins); do
    if [ -n "$registry_pid" ]; then cold "oci://127.0.0.1:$rport/bench/img256:latest" "$blob" "docker-registry, oci://" auto "$B"; fi
    cold "$url" "$url" "(d) nginx, http://" auto "$B"
done
echo "   the same through fuse-blob (the lazy path for kernels without pre-content fanotify)"
if [ -n "$registry_pid" ]; then cold "oci://127.0.0.1:$rport/bench/img256:latest" "$blob" "fuse-blob, docker-registry, oci://" fuse-blob; fi
cold "$url" "$url" "fuse-blob, nginx, http://" fuse-blob
fi

# BENCH_REMOTE_ONLY=a: the cold figures alone (for comparing two binaries quickly).
[ "${BENCH_REMOTE_ONLY:-}" = a ] && exit 0
echo "== (b) warm: full read with the cache complete vs the local image file-backed (median of 3)"
for B in $(bins); do
    rm -rf "$work/cache"; "$B" mount --cache-dir "$work/cache" "$url" "$work/m1" >/dev/null; readall "$work/m1"; sleep 1
    warm=(); loc=()
    for i in 1 2 3; do
        drop; s=$(now_us); readall "$work/m1"; e=$(now_us); warm+=($((e - s)))
        mountlocal "$www/img256.erofs" "$work/m2"
        drop; s=$(now_us); readall "$work/m2"; e=$(now_us); loc+=($((e - s))); umount "$work/m2"
    done
    "$B" status "$work/m1" | grep -E "progress" || true
    "$B" umount "$work/m1" >/dev/null
    w=$(printf '%s\n' "${warm[@]}" | median); o=$(printf '%s\n' "${loc[@]}" | median)
    awk -v w="$w" -v o="$o" -v t="$(tag "$B")" 'BEGIN {
        printf "warm%s: erofs-compat %.3f s, local file-backed %.3f s, ratio %.2f (target <= 1.05)\n", t, w/1e6, o/1e6, w/o }'
done
# fuse-blob warm, median of 9 (passes of either spread 0.11-0.21 s), page cache dropped before each
# pass, the local baseline interleaved with the passes (measured minutes earlier it drifts as much
# as the gap being measured):
#  - remounted: a new mount of the complete cache entry with --backend fuse-blob (FUSE passthrough
#    where the kernel has it); then as auto mounts it (the kernel's own mount of the cache file);
#  - same mount: the mount that filled the cache, read again (the server answers every read).
warmfuse() {
    local warm=() loc=() w o
    for i in 1 2 3 4 5 6 7 8 9; do
        drop; s=$(now_us); readall "$work/m1"; e=$(now_us); warm+=($((e - s)))
        mountlocal "$www/img256.erofs" "$work/m2"
        drop; s=$(now_us); readall "$work/m2"; e=$(now_us); loc+=($((e - s))); umount "$work/m2"
    done
    "$BIN" status "$work/m1" | grep -E "passthru" || true
    w=$(printf '%s\n' "${warm[@]}" | median); o=$(printf '%s\n' "${loc[@]}" | median)
    awk -v w="$w" -v o="$o" -v n="$1" 'BEGIN {
        printf "warm fuse-blob, %s (median of 9): %.3f s, local file-backed %.3f s, ratio %.2f (target <= 1.1)\n",
            n, w/1e6, o/1e6, w/o }'
}
rm -rf "$work/cache"; "$BIN" mount --backend fuse-blob --cache-dir "$work/cache" "$url" "$work/m1" >/dev/null; readall "$work/m1"
sleep 1; "$BIN" umount "$work/m1" >/dev/null
"$BIN" mount --backend fuse-blob --cache-dir "$work/cache" "$url" "$work/m1" >/dev/null
warmfuse "remounted"
"$BIN" umount "$work/m1" >/dev/null
# What auto does with that complete entry on a host where it serves cold images with fuse-blob (a test
# and the VM tier prove the choice on 6.1 and 6.12): the kernel mounts the cache file itself, as
# `--backend file` does here (auto picks fanotify on this host).
"$BIN" mount --backend file --cache-dir "$work/cache" "$url" "$work/m1" >/dev/null
warmfuse "remounted by auto: the kernel on the complete entry"
"$BIN" umount "$work/m1" >/dev/null
rm -rf "$work/cache"; "$BIN" mount --backend fuse-blob --cache-dir "$work/cache" "$url" "$work/m1" >/dev/null; readall "$work/m1"
warmfuse "same mount"
"$BIN" umount "$work/m1" >/dev/null
[ "${BENCH_REMOTE_ONLY:-}" = b ] && exit 0

fi

mkimage img1g 1024
url="http://127.0.0.1:$port/img1g.erofs"
echo "== (c) 1 GiB image: cold lazy mount + read one small file vs downloading the whole blob (median of 5)"
echo "   with the daemon running (mount hands the request to it), then without (--no-daemon)"
[ -n "$registry_pid" ] && blob=$(push img1g)
for B in $(bins); do
    start_daemon "$B"
    if [ -n "$registry_pid" ]; then small "oci://127.0.0.1:$rport/bench/img1g:latest" "$blob" "docker-registry, oci://, daemon" daemon auto "$B"; fi
    small "$url" "$url" "(d) nginx, http://, daemon" daemon auto "$B"
    stop_daemon
    if [ -n "$registry_pid" ]; then small "oci://127.0.0.1:$rport/bench/img1g:latest" "$blob" "docker-registry, oci://, no daemon" no auto "$B"; fi
    small "$url" "$url" "(d) nginx, http://, no daemon" no auto "$B"
done
start_daemon
if [ -n "$registry_pid" ]; then small "oci://127.0.0.1:$rport/bench/img1g:latest" "$blob" "fuse-blob, docker-registry, oci://, daemon" daemon fuse-blob; fi
small "$url" "$url" "fuse-blob, nginx, http://, daemon" daemon fuse-blob
stop_daemon
if [ -n "$registry_pid" ]; then small "oci://127.0.0.1:$rport/bench/img1g:latest" "$blob" "fuse-blob, docker-registry, oci://, no daemon" no fuse-blob; fi
small "$url" "$url" "fuse-blob, nginx, http://, no daemon" no fuse-blob
[ -n "$registry_pid" ] || echo "docker-registry not installed: registry figures skipped"
rm -f "$work/dl.erofs"
[ "${BENCH_REMOTE_ONLY:-}" = c ] && exit 0

# (e) The daemon's threads: one idle lazy mount, then twenty (each its own cache directory, so
# twenty entries, groups and servers). The issue's bound: independent of the number of mounts.
echo "== (e) daemon threads with idle lazy mounts (nginx, http://)"
url="http://127.0.0.1:$port/img256.erofs"
for B in $(bins); do
    start_daemon "$B"
    child=$(awk '{print $1}' "/proc/$daemon_pid/task/$daemon_pid/children" 2>/dev/null)
    threads() { awk '/^Threads:/ {print $2}' "/proc/$child/status"; }
    mps=()
    for i in $(seq 20); do
        mkdir -p "$work/e$i"; mps+=("$work/e$i")
        "$B" mount --cache-dir "$work/ecache$i" "$url" "$work/e$i" >/dev/null
        cat "$work/e$i/text05.txt" >/dev/null
        [ "$i" = 1 ] && { sleep 0.5; one=$(threads); }
    done
    sleep 0.5; twenty=$(threads)
    echo "daemon threads$(tag "$B"): $one with 1 lazy mount, $twenty with 20 (target: bounded, independent of the count)"
    for m in "${mps[@]}"; do "$B" umount "$m" >/dev/null; done
    stop_daemon
    rm -rf "$work"/ecache* "$work"/e[0-9]*
done
