#!/usr/bin/env bash
# NBD figures (part of `make bench`): `erofs-compat nbd serve` against reading the file directly,
# against nbdkit serving the same file, and (cold, over docker-registry) against pulling the blob.
# Every side is measured in the same run; medians of 3 (warm) and 9 (cold: a cold read here spreads 2-4x).
set -euo pipefail
BIN=$(readlink -f "$1")
work=$2/nbd
. "$(dirname "$0")/bench-lib.sh"
for t in nbdcopy nbdkit mkfs.erofs; do command -v $t >/dev/null || { echo "nbd benches skipped: $t missing"; exit 0; }; done
[ "$(id -u)" -eq 0 ] || { echo "nbd benches skipped: need root"; exit 0; }
mkdir -p "$work/tree"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
python3 - "$work/tree" <<'PY'
import os, sys
for i in range(16):
    with open(os.path.join(sys.argv[1], f"f{i:02d}.bin"), "wb") as f: f.write(os.urandom(16 << 20))
PY
mkfs.erofs --quiet "$work/img.erofs" "$work/tree"
img=$work/img.erofs
serve() {  # SOCKET ARGS...: waits for the socket
    local sock=$1; shift
    "$BIN" nbd serve "$@" --socket "$sock" 2>>"$work/serve.log" & pids+=($!)
    for _ in $(seq 800); do [ -S "$sock" ] && return 0; sleep 0.005; done
    echo "nbd serve did not start: $(cat "$work/serve.log")"; exit 1
}
time_us() { local s e; s=$(now_us); "$@" >/dev/null; e=$(now_us); echo $((e - s)); }

echo "== nbd: nbdcopy of a 256 MiB export, warm (page cache), median of 3; targets >= 0.70 of the file, >= 1.0 of nbdkit"
serve "$work/ours.sock" "$img"
nbdkit -U "$work/kit.sock" --exit-with-parent file "$img" & pids+=($!)
for _ in $(seq 200); do [ -S "$work/kit.sock" ] && break; sleep 0.02; done
cat "$img" >/dev/null
file=(); ours=(); kit=()
for _ in 1 2 3; do
    file+=("$(time_us dd if="$img" of=/dev/null bs=4M status=none)")
    ours+=("$(time_us nbdcopy "nbd+unix:///?socket=$work/ours.sock" null:)")
    kit+=("$(time_us nbdcopy "nbd+unix:///?socket=$work/kit.sock" null:)")
done
# nbdcopy's own ceiling: nbdkit's memory plugin answers zeros from memory and reads no file at all
# (--no-extents, or nbdcopy would skip what the plugin reports as holes).
nbdkit -U "$work/pattern.sock" --exit-with-parent memory "$(stat -c %s "$img")" & pids+=($!)
for _ in $(seq 200); do [ -S "$work/pattern.sock" ] && break; sleep 0.02; done
pat=()
for _ in 1 2 3; do pat+=("$(time_us nbdcopy --no-extents "nbd+unix:///?socket=$work/pattern.sock" null:)"); done
f=$(printf '%s\n' "${file[@]}" | median); o=$(printf '%s\n' "${ours[@]}" | median); k=$(printf '%s\n' "${kit[@]}" | median)
p=$(printf '%s\n' "${pat[@]}" | median)
awk -v f="$f" -v o="$o" -v k="$k" -v p="$p" 'BEGIN {
    printf "file %.3f s, erofs-compat nbd %.3f s, nbdkit file %.3f s, nbdkit memory (no reads) %.3f s\n", f/1e6, o/1e6, k/1e6, p/1e6
    printf "throughput: %.2f of the file (target >= 0.70; no server reaches more than %.2f with nbdcopy here), ", f/o, f/p
    printf "%.2f of nbdkit (target >= 1.0)\n", k/o }'

if command -v docker-registry >/dev/null; then
    echo
    echo "== nbd cold: nbdcopy of an oci:// export over docker-registry vs pulling the blob (page cache dropped, median of 9; target <= 1.25x)"
    port=$((20000 + RANDOM % 30000))
    printf 'version: 0.1\nlog: {level: error, accesslog: {disabled: true}}\nstorage: {filesystem: {rootdirectory: %s}}\nhttp: {addr: 127.0.0.1:%s}\n' \
        "$work/registry" "$port" > "$work/registry.yml"
    docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 & pids+=($!)
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/v2/" && break; sleep 0.05; done
    digest=sha256:$(sha256sum "$img" | cut -c1-64); size=$(stat -c %s "$img")
    loc=$(curl -s -D - -o /dev/null -X POST "http://127.0.0.1:$port/v2/bench/nbd/blobs/uploads/" | awk 'tolower($1)=="location:" {print $2}' | tr -d '\r')
    case "$loc" in http*) ;; *) loc="http://127.0.0.1:$port$loc" ;; esac
    curl -s -X PUT -H 'Content-Type: application/octet-stream' --data-binary @"$img" "$loc&digest=$digest" >/dev/null
    cfg='{}'; cfgd=sha256:$(printf %s "$cfg" | sha256sum | cut -c1-64)
    loc=$(curl -s -D - -o /dev/null -X POST "http://127.0.0.1:$port/v2/bench/nbd/blobs/uploads/" | awk 'tolower($1)=="location:" {print $2}' | tr -d '\r')
    case "$loc" in http*) ;; *) loc="http://127.0.0.1:$port$loc" ;; esac
    printf %s "$cfg" | curl -s -X PUT -H 'Content-Type: application/octet-stream' --data-binary @- "$loc&digest=$cfgd" >/dev/null
    manifest='{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"'$cfgd'","size":2},"layers":[{"mediaType":"application/vnd.erofs.layer.v1","digest":"'$digest'","size":'$size'}]}'
    curl -s -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' --data-binary "$manifest" "http://127.0.0.1:$port/v2/bench/nbd/manifests/v1" >/dev/null
    pull=(); cold=(); kitted=()
    for i in $(seq 9); do
        drop; pull+=("$(time_us curl -s -o "$work/pulled" "http://127.0.0.1:$port/v2/bench/nbd/blobs/$digest")")
        # What a user without a lazy server does: pull, then serve the file (nbdkit) and copy.
        rm -f "$work/pulled"; drop
        s=$(now_us)
        curl -s -o "$work/pulled" "http://127.0.0.1:$port/v2/bench/nbd/blobs/$digest"
        nbdkit -U "$work/pulled$i.sock" --exit-with-parent file "$work/pulled" & kp=$!
        while [ ! -S "$work/pulled$i.sock" ]; do sleep 0.005; done
        nbdcopy "nbd+unix:///?socket=$work/pulled$i.sock" null:
        e=$(now_us); kitted+=($((e - s)))
        kill $kp; wait $kp 2>/dev/null || true
        rm -f "$work/pulled"
        rm -rf "$work/cache"; drop
        s=$(now_us)
        serve "$work/cold$i.sock" "oci://127.0.0.1:$port/bench/nbd:v1" --cache-dir "$work/cache"
        m=$(now_us)
        nbdcopy "nbd+unix:///?socket=$work/cold$i.sock" null:
        e=$(now_us); cold+=($((e - s)))
        [ -n "${NBD_BENCH_DEBUG:-}" ] && echo "start $((m - s)) us, copy $((e - m)) us"
        kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
    done
    [ -n "${NBD_BENCH_DEBUG:-}" ] && echo "pull ${pull[*]}; cold ${cold[*]}; kitted ${kitted[*]}"
    [ -n "${NBD_BENCH_DEBUG:-}" ] && echo "pull ${pull[*]}; cold ${cold[*]}; pull + nbdkit ${kitted[*]}"
    # The peer a user would reach for: nbdkit's curl plugin on the blob's URL (it caches nothing).
    peer=()
    for i in 1 2 3; do
        drop; s=$(now_us)
        nbdkit -U "$work/peer$i.sock" --exit-with-parent curl "http://127.0.0.1:$port/v2/bench/nbd/blobs/$digest" & kp=$!
        while [ ! -S "$work/peer$i.sock" ]; do sleep 0.005; done
        nbdcopy "nbd+unix:///?socket=$work/peer$i.sock" null:
        e=$(now_us); peer+=($((e - s)))
        kill $kp; wait $kp 2>/dev/null || true
    done
    p=$(printf '%s\n' "${pull[@]}" | median); c=$(printf '%s\n' "${cold[@]}" | median)
    k=$(printf '%s\n' "${kitted[@]}" | median); n=$(printf '%s\n' "${peer[@]}" | median)
    awk -v p="$p" -v c="$c" -v k="$k" -v n="$n" 'BEGIN {
        printf "pull %.3f s, serve + nbdcopy %.3f s: %.2fx (target <= 1.25)\n", p/1e6, c/1e6, c/p
        printf "pull, then nbdkit serves the file + nbdcopy %.3f s: ours %.2fx of that\n", k/1e6, c/k
        printf "nbdkit curl plugin + nbdcopy (median of 3) %.3f s: ours %.2fx of that\n", n/1e6, c/n }'
fi
