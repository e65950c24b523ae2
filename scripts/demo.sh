#!/usr/bin/env bash
# make demo: the main job end to end on a built-in sample image.
set -euo pipefail
BIN=${1:-.build/release/erofs-compat}
BIN=$(readlink -f "$BIN")
work=$(mktemp -d /var/tmp/erofs-compat-demo.XXXXXX)
daemon=
cleanup() {
    [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
    for m in "$work/mnt" "$work/lazy"; do
        mountpoint -q "$m" 2>/dev/null && "$BIN" umount "$m" >/dev/null 2>&1 || true
        mountpoint -q "$m" 2>/dev/null && umount -l "$m" || true
    done
    [ -f "$work/ngx/nginx.conf" ] && nginx -c "$work/ngx/nginx.conf" -p "$work/ngx" -s stop 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "== building the sample image (the project's own sources, lz4hc-compressed)"
mkdir -p "$work/tree"
cp -r "$(dirname "$0")/../Sources" "$work/tree/"
head -c 3000000 /dev/urandom > "$work/tree/random.bin"
ln -s Sources/Probe "$work/tree/probe-link"
mkfs.erofs --quiet -zlz4hc "$work/sample.erofs" "$work/tree"
ls -l "$work/sample.erofs"

echo
echo "== erofs-compat probe $work/sample.erofs"
set +e
"$BIN" probe --cache-dir "$work/cache" "$work/sample.erofs"
rc=$?
set -e
echo "probe exit code: $rc (0: a backend can mount a local image here, 1: none can)"
if [ "$(id -u)" -ne 0 ]; then
    echo "not root: skipping the mount part of the demo (mount needs CAP_SYS_ADMIN)"
    exit 0
fi
export EROFS_COMPAT_STATE_DIR="$work/state"
mkdir -p "$work/mnt"
echo
echo "== erofs-compat mount --explain $work/sample.erofs $work/mnt"
"$BIN" mount --explain "$work/sample.erofs" "$work/mnt"
echo
echo "== what the mount holds"
ls -l "$work/mnt" | head
echo "bytes identical to the source tree: $(diff -r "$work/tree" "$work/mnt" >/dev/null && echo yes || echo NO)"
echo
echo "== erofs-compat status"
"$BIN" status
echo
echo "== erofs-compat umount (from another directory, by a relative path)"
(cd "$work/tree" && "$BIN" umount ../mnt)
echo
echo "== the same image on a loop device, then removed behind the tool's back with umount(8)"
"$BIN" mount --backend loop "$work/sample.erofs" "$work/mnt"
umount "$work/mnt"
"$BIN" status || true
"$BIN" status --prune

if command -v nginx >/dev/null; then
    echo
    echo "== the same image over HTTP, mounted lazily (fanotify pre-content events; nginx on 127.0.0.1)"
    mkdir -p "$work/ngx" "$work/www" "$work/lazy"
    cp "$work/sample.erofs" "$work/www/"
    port=$((20000 + RANDOM % 30000))
    cat > "$work/ngx/nginx.conf" <<CONF
daemon on; user root; pid $work/ngx/pid; error_log $work/ngx/err; events {}
http { access_log off; client_body_temp_path $work/ngx; proxy_temp_path $work/ngx; fastcgi_temp_path $work/ngx;
       uwsgi_temp_path $work/ngx; scgi_temp_path $work/ngx; server { listen 127.0.0.1:$port; root $work/www; } }
CONF
    nginx -c "$work/ngx/nginx.conf" -p "$work/ngx"
    digest=$(sha256sum "$work/sample.erofs" | cut -c1-64)
    "$BIN" mount --explain --cache-dir "$work/cache" --digest "sha256:$digest" "http://127.0.0.1:$port/sample.erofs" "$work/lazy"
    echo "right after mounting (metadata only):"
    "$BIN" status "$work/lazy" | grep -E "progress|health" || true
    echo "bytes identical to the source tree: $(diff -r "$work/tree" "$work/lazy" >/dev/null && echo yes || echo NO)"
    sleep 1
    "$BIN" status "$work/lazy" | grep -E "progress|health" || true
    "$BIN" cache ls --cache-dir "$work/cache"
    "$BIN" umount "$work/lazy"

    echo
    echo "== the same through 'erofs-compat daemon' (one resident process; a crash loses no fanotify group)"
    export EROFS_COMPAT_STATE_DIR="$work/state"
    "$BIN" daemon 2>"$work/daemon.log" &
    daemon=$!
    for _ in $(seq 100); do [ -S "$work/state/daemon.sock" ] && break; sleep 0.05; done
    rm -rf "$work/cache"
    "$BIN" mount --cache-dir "$work/cache" "http://127.0.0.1:$port/sample.erofs" "$work/lazy"
    child=$(cut -d' ' -f1 "/proc/$daemon/task/$daemon/children")
    kill -9 "$child"
    echo "SIGKILLed the daemon ($child) before anything but metadata was fetched; reading every file:"
    echo "bytes identical to the source tree: $(diff -r "$work/tree" "$work/lazy" >/dev/null && echo yes || echo NO)"
    "$BIN" status "$work/lazy" | grep -E "worker|health" || true
    "$BIN" umount "$work/lazy"
    kill "$daemon"; wait "$daemon" || true
    grep -E "died|serving again" "$work/daemon.log" || true
fi
exit 0
