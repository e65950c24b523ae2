#!/bin/sh
# Runs inside a guest booted by scripts/vm-check.sh: every check prints one line
#   VMCHECK <name> PASS|FAIL|SKIP <detail>
# and what is only reported (timings, the kernel's own words) prints VMINFO <name> <detail>,
# which the host collects from the serial console. Images and their expected sums are in /w (ramfs:
# file-backed EROFS does not work from tmpfs).
E=/usr/bin/erofs-compat
export EROFS_COMPAT_STATE_DIR=/run/ec
K=$(uname -r)
case "$K" in 6.1.*) V=6.1 ;; 6.12.*) V=6.12 ;; *) V=$K ;; esac
echo "VMINFO kernel $K"

check() {  # NAME COMMAND...: PASS when COMMAND succeeds
    name=$1; shift
    if "$@" > /tmp/check.out 2>&1; then echo "VMCHECK $name PASS"
    else echo "VMCHECK $name FAIL $(tail -c 400 /tmp/check.out | tr '\n' ' ')"; fi
}
finding() {  # FILE ID STATUS: the probe's JSON (keys sorted) has finding ID with STATUS
    tr -d ' \n' < "$1" | grep -q "\"id\":\"$2\",\"status\":\"$3\""
}
module_value() {  # FILE ID: the finding's value
    tr -d ' \n' < "$1" | grep -o "\"id\":\"$2\",[^}]*" | sed -n 's/.*"value":"\([^"]*\)".*/\1/p'
}
sums() { (cd "$1" && find . -type f | LC_ALL=C sort | xargs sha256sum); }
same_tree() {  # DIR SUMS
    sums "$1" > /tmp/sums.got && cmp /tmp/sums.got "$2"
}
backend_is() {  # OUTPUT BACKEND
    grep -q "(backend $2" "$1" || { cat "$1"; return 1; }
}
nothing_left() {
    ! grep -q ' /w/\| /tmp/u\| /run/ec/' /proc/mounts || { grep ' /w/\| /tmp/u\| /run/ec/' /proc/mounts; return 1; }
    ! ps -o args | grep -v grep | grep -q __fuse-serve || { echo "a FUSE server is still running"; return 1; }
    [ -z "$(losetup -a 2>/dev/null)" ] || { losetup -a; return 1; }
    [ -z "$(ls $EROFS_COMPAT_STATE_DIR/mounts 2>/dev/null)" ] || { echo "records left"; return 1; }
}

# --- Module autoloading off: the probe reports "loadable" and loads nothing.
echo /nonexistent > /proc/sys/kernel/modprobe
$E probe --json --cache-dir /w > /w/probe0.json 2>/w/probe0.err
check probe-runs test -s /w/probe0.json
state=$(module_value /w/probe0.json erofs.module)
check erofs-loadable-not-loaded sh -c "[ '$state' = loadable ] || { echo 'erofs.module: $state'; exit 1; }"
for m in loop nbd; do
    v=$(module_value /w/probe0.json $m.module)
    check $m-loadable-not-loaded sh -c "[ '$v' = loadable ] || { echo '$m.module: $v'; exit 1; }"
done
# Before erofs is loaded its features are not known (no /sys/fs/erofs/features yet): not "missing".
$E probe --json --cache-dir /w /w/local.erofs > /w/probe0-img.json 2>/dev/null
check image-features-unknown-before-load finding /w/probe0-img.json image.features unknown
check nothing-loaded-by-probe sh -c 'for m in erofs loop nbd; do [ ! -d /sys/module/$m ] || { echo /sys/module/$m exists; exit 1; }; done'
echo /sbin/modprobe > /proc/sys/kernel/modprobe
# With --allow-module-load the probe's trials may load erofs (fsopen autoloads it) and find out.
$E probe --json --allow-module-load --cache-dir /w > /w/probe1.json 2>/w/probe1.err
check allow-module-load-loads-erofs sh -c '[ -d /sys/module/erofs ] || { cat /w/probe1.err; exit 1; }'
check allow-module-load-decides finding /w/probe1.json erofs.module present
for m in erofs loop fuse nbd; do modprobe "$m" 2>/dev/null; done
mkdir -p /dev/net
[ -e /dev/fuse ] || mknod /dev/fuse c 10 229
[ -e /dev/loop-control ] || mknod /dev/loop-control c 10 237

# --- The probe's findings on this kernel.
$E probe --json --cache-dir /w > /w/probe.json 2>/w/probe.err
check pre-access-absent finding /w/probe.json fanotify.pre_access absent
evidence_has() {  # FILE ID TEXT: the finding's evidence (keys sorted: it precedes the id) says TEXT
    tr -d ' \n' < "$1" | grep -o "\"evidence\":\[[^]]*\],\"id\":\"$2\"" | grep -q "$3"
}
check pre-access-einval evidence_has /w/probe.json fanotify.pre_access EINVAL
check fuse-present finding /w/probe.json fuse.device present
check loop-present finding /w/probe.json loop.module present
check nbd-present finding /w/probe.json nbd.module present
if [ "$V" = 6.1 ]; then
    check file-backed-absent finding /w/probe.json erofs.file_backed absent
    check deny-errno-absent finding /w/probe.json fanotify.deny_errno absent
else
    check file-backed-present finding /w/probe.json erofs.file_backed present
fi

# --- A local image: loop on 6.1, file-backed on 6.12; the content is the kernel's own view on the host.
mkdir -p /w/m /w/cache
local_backend=file; [ "$V" = 6.1 ] && local_backend=loop
$E mount --explain /w/local.erofs /w/m > /tmp/mount.out 2>&1
check local-backend-$local_backend backend_is /tmp/mount.out $local_backend
check local-content same_tree /w/m /w/local.sums
check local-umount $E umount /w/m
if [ "$V" = 6.1 ]; then
    $E mount --backend file /w/local.erofs /w/m > /tmp/file.out 2>&1; rc=$?
    check file-refused-clearly sh -c "[ $rc -ne 0 ] && grep -q 'file-backed' /tmp/file.out || { cat /tmp/file.out; exit 1; }"
fi

# --- An image whose compression this kernel lacks (zstd before 6.10) goes to fuse-erofs.
if [ "$V" = 6.1 ]; then
    $E probe --json --cache-dir /w /w/zstd.erofs > /w/probe-zstd.json 2>/dev/null
    check zstd-not-mountable-by-kernel finding /w/probe-zstd.json image.features absent
    $E mount /w/zstd.erofs /w/m > /tmp/zstd.out 2>&1
    check zstd-backend-fuse-erofs backend_is /tmp/zstd.out fuse-erofs
    check zstd-content same_tree /w/m /w/zstd.sums
    check zstd-umount $E umount /w/m
fi

# --- A remote image from busybox httpd on the guest's loopback: fuse-blob, lazily (loop on 6.1).
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
httpd -p 127.0.0.1:8080 -h /w/www
$E mount --explain --cache-dir /w/cache http://127.0.0.1:8080/local.erofs /w/m > /tmp/remote.out 2>&1
check remote-backend-fuse-blob backend_is /tmp/remote.out fuse-blob
[ "$V" = 6.1 ] && check remote-through-loop grep -q '/dev/loop' /tmp/remote.out
check remote-content same_tree /w/m /w/local.sums
echo "VMINFO fuse-blob-erofs-options $(grep ' /w/m ' /proc/mounts | cut -d' ' -f4)"
$E status /w/m > /tmp/status.out 2>&1
check remote-status grep -q 'health   ok' /tmp/status.out
# The FUSE server killed while it serves a read: httpd is stopped, so the read of a file not yet
# fetched is in flight (read from /dev/fuse, recorded, waiting for its bytes) when the server dies.
# Its successor answers it from the journal the supervisor keeps (6.1 cannot resend requests:
# without the journal the reader would wait forever), so the reader gets the right bytes.
mkdir -p /w/m3
$E mount --backend fuse-blob --cache-dir /w/cache-kill http://127.0.0.1:8080/local.erofs /w/m3 > /tmp/kill.out 2>&1
supervisor=$($E status /w/m3 | awk '$1 == "worker" {print $2}')
fuse_child() { awk '{print $1}' "/proc/$supervisor/task/$supervisor/children"; }
httpd_pid=$(ps -o pid,args | grep 'httpd -p 127.0.0.1:8080' | grep -v grep | awk '{print $1}' | head -1)
kill -STOP "$httpd_pid"
t0=$(date +%s)
(timeout 60 sha256sum /w/m3/big > /tmp/fuse-inflight.sum 2>&1) &
reader=$!
sleep 1
kill -9 "$(fuse_child)"
kill -CONT "$httpd_pid"
wait $reader
echo "VMINFO fuse-inflight-seconds $(($(date +%s) - t0)) s"
check fuse-killed-inflight-read grep -q "$(cut -d' ' -f1 /tmp/fuse-inflight.sum)  ./big" /w/local.sums
journal_line=$(grep -h 'from its journal' $EROFS_COMPAT_STATE_DIR/workers/*.log | tail -1)
check fuse-killed-inflight-from-journal sh -c "echo '$journal_line' | grep -q 'answered [1-9]'"
echo "VMINFO fuse-inflight $journal_line"
check fuse-killed-umount $E umount /w/m3
check remote-umount $E umount /w/m
check remote-nothing-left nothing_left
# A blob whole in the cache, mounted again with fuse-blob: passed through to the cache file where the
# kernel offers FUSE passthrough (6.9+: 6.12 here), served by the server on 6.1; the same bytes.
mkdir -p /w/m4
$E mount --backend fuse-blob --prefetch all --cache-dir /w/cache-pt http://127.0.0.1:8080/local.erofs /w/m4 >/dev/null 2>&1
for _ in $(seq 100); do $E status /w/m4 2>/dev/null | grep -q 'complete' && break; sleep 0.1; done
$E umount /w/m4 >/dev/null 2>&1
$E mount --backend fuse-blob --cache-dir /w/cache-pt http://127.0.0.1:8080/local.erofs /w/m4 > /tmp/pt.out 2>&1
check passthrough-content same_tree /w/m4 /w/local.sums
echo "VMINFO passthrough-mount $(tr '\n' ' ' < /tmp/pt.out) $(dmesg | tail -4 | tr '\n' ' ')"
sleep 0.6
$E status /w/m4 > /tmp/pt-status.out 2>&1
if [ "$V" = 6.1 ]; then check passthrough-absent-on-6.1 sh -c '! grep -q passthru /tmp/pt-status.out'
else check passthrough-used grep -q passthru /tmp/pt-status.out; fi
check passthrough-umount $E umount /w/m4
check passthrough-nothing-left nothing_left
# The same complete entry mounted by auto (which serves a cold image with fuse-blob here): the kernel's
# own mount of the cache file, file-backed on 6.12 and on a loop device on 6.1, with no FUSE server.
$E mount --cache-dir /w/cache-pt http://127.0.0.1:8080/local.erofs /w/m4 > /tmp/complete.out 2>&1
if [ "$V" = 6.1 ]; then check complete-entry-by-the-kernel backend_is /tmp/complete.out loop
else check complete-entry-by-the-kernel backend_is /tmp/complete.out file; fi
check complete-entry-no-server sh -c '! ps -o args | grep -v grep | grep -q __fuse-serve'
check complete-entry-content same_tree /w/m4 /w/local.sums
check complete-entry-umount $E umount /w/m4
check complete-entry-nothing-left nothing_left

# --- A cache on ext4 with the verity feature: the complete, verified entry goes to the kernel's
# fs-verity (measured equal to the tree's digest) once its server is gone; after that the kernel
# checks every page read from disk and refuses writes to it.
mkdir -p /w/vext
mount -o loop /w/verity.ext4 /w/vext
mkdir -p /w/vext/cache
$E probe --json --cache-dir /w/vext/cache > /tmp/probe-verity.json 2>/dev/null
check fsverity-cache-fs-present finding /tmp/probe-verity.json fsverity.cache_fs present
echo "VMINFO fsverity-evidence $(tr -d ' \n' < /tmp/probe-verity.json | grep -o '"evidence":\[[^]]*\],"id":"fsverity.cache_fs"')"
$E probe --json --cache-dir /w > /tmp/probe-ramfs.json 2>/dev/null
check fsverity-ramfs-absent finding /tmp/probe-ramfs.json fsverity.cache_fs absent
vd=$(cat /w/local.verity); sd=$(cat /w/local.sha256)
$E mount --cache-dir /w/vext/cache --prefetch all --verity sha256:$vd --digest sha256:$sd \
    http://127.0.0.1:8080/local.erofs /w/m > /tmp/verity-mount.out 2>&1
check verity-mount-content same_tree /w/m /w/local.sums
for i in $(seq 1 50); do $E cache ls --cache-dir /w/vext/cache 2>/dev/null | grep -q "verified whole" && break; sleep 0.2; done
$E umount /w/m
for i in $(seq 1 25); do $E cache ls --cache-dir /w/vext/cache 2>/dev/null | grep -q "kernel fs-verity" && break; sleep 0.2; done
$E cache ls --cache-dir /w/vext/cache > /tmp/verity-ls.out 2>&1
check verity-handed-to-kernel sh -c 'grep -q "kernel fs-verity" /tmp/verity-ls.out || { cat /tmp/verity-ls.out; tail -5 $EROFS_COMPAT_STATE_DIR/workers/*.log; exit 1; }'
check verity-cache-file-read-only sh -c "! echo x >> /w/vext/cache/blobs/sha256/$sd"
$E mount --cache-dir /w/vext/cache --verity sha256:$vd --digest sha256:$sd http://127.0.0.1:8080/local.erofs /w/m > /tmp/verity-mount2.out 2>&1
check verity-warm-content same_tree /w/m /w/local.sums
$E umount /w/m
for i in 1 2 3 4 5 6 7 8 9 10; do umount /w/vext 2>/tmp/vext.err && break; sleep 0.3; done
check verity-cache-fs-unmounted sh -c '! grep -q " /w/vext " /proc/mounts || { cat /tmp/vext.err; for p in /proc/[0-9]*; do ls -l $p/fd 2>/dev/null | grep -q vext && echo "$p: $(tr "\0" " " < $p/cmdline)"; done; losetup -a; exit 1; }'

# --- NBD: kernel EROFS on /dev/nbdN over netlink, served from the image or the lazy cache.
nbd_connected() { for p in /sys/block/nbd*/pid; do [ -e "$p" ] && return 0; done; return 1; }
$E mount --backend nbd --explain /w/local.erofs /w/m > /tmp/nbd.out 2>&1
check nbd-local-backend backend_is /tmp/nbd.out nbd
check nbd-local-device grep -q '/dev/nbd' /tmp/nbd.out
check nbd-local-content same_tree /w/m /w/local.sums
$E status /w/m > /tmp/nbd-status.out 2>&1
check nbd-status sh -c "grep -q 'health   ok' /tmp/nbd-status.out || { cat /tmp/nbd-status.out; exit 1; }"
check nbd-local-umount $E umount /w/m
check nbd-disconnected sh -c '! nbd_connected() { for p in /sys/block/nbd*/pid; do [ -e "$p" ] && return 0; done; return 1; }; ! nbd_connected'
$E mount --backend nbd --cache-dir /w/cache-nbd http://127.0.0.1:8080/local.erofs /w/m > /tmp/nbd-remote.out 2>&1
check nbd-remote-backend backend_is /tmp/nbd-remote.out nbd
check nbd-remote-content same_tree /w/m /w/local.sums
# The serving process killed under the mounted device: the supervisor starts another and reconnects
# the device to it (NBD_CMD_RECONFIGURE); idle, then with a reader in flight.
nbd_child() { ps -o pid,args | grep '__nbd-serve --child' | grep -v grep | awk '{print $1}' | head -1; }
first=$(nbd_child)
kill -9 "$first"
echo 3 > /proc/sys/vm/drop_caches
check nbd-killed-idle-content same_tree /w/m /w/local.sums
second=$(nbd_child)
check nbd-restarted sh -c "[ -n '$second' ] && [ '$second' != '$first' ]"
# A reader in flight waits for the kernel's request timeout (30 s), then gets the right bytes from the
# successor: on 6.1 only, to keep the tier short.
if [ "$V" = 6.1 ]; then
echo 3 > /proc/sys/vm/drop_caches
t0=$(date +%s)
(sums /w/m > /tmp/inflight.sums 2>&1; echo $? > /tmp/inflight.rc) &
reader=$!
usleep 50000 2>/dev/null || sleep 1
kill -0 $reader 2>/dev/null && alive=yes || alive=no
kill -9 "$(nbd_child)"
wait $reader
t1=$(date +%s)
check nbd-killed-inflight-read sh -c "[ '$alive' = yes ] && cmp /tmp/inflight.sums /w/local.sums"
echo "VMINFO nbd-inflight-seconds $((t1 - t0)) s (reader running at the kill: $alive)"
fi
echo "VMINFO nbd-kernel-said $(dmesg | grep -i 'nbd' | tail -4 | tr '\n' ' ')"
check nbd-remote-umount $E umount /w/m
check nbd-nothing-left sh -c 'for p in /sys/block/nbd*/pid; do [ -e "$p" ] && { echo "$p"; exit 1; }; done; ! ps -o args | grep -v grep | grep -q __nbd-serve'
# A lazy umount with a file open: it reads on, and the device disconnects itself once it is closed.
nbd_gone() { ! nbd_connected && ! ps -o args | grep -v grep | grep -q __nbd-serve; }
$E mount --backend nbd /w/local.erofs /w/m > /tmp/nbd-lazy.out 2>&1
exec 3< /w/m/big
$E umount --lazy /w/m
sum=$(sha256sum <&3 | cut -d' ' -f1)
check nbd-lazy-reads-on grep -q "$sum  ./big" /w/local.sums
check nbd-lazy-still-connected nbd_connected
exec 3<&-
for i in 1 2 3 4 5 6 7 8 9 10; do nbd_gone && break; sleep 0.3; done
check nbd-lazy-disconnected-after-close nbd_gone
# --- The daemon hosts served mounts in its own threads (no server process): a remote nbd mount and
# a remote fuse-blob one. A SIGKILLed daemon is restarted by its keeper with the stored descriptors:
# the NBD device is reconnected to a new socket, the FUSE connection served again; both read right.
$E daemon > /tmp/daemon.log 2>&1 &
keeper=$!
for i in $(seq 100); do [ -S "$EROFS_COMPAT_STATE_DIR/daemon.sock" ] && break; sleep 0.1; done
daemon_child() { awk '{print $1}' "/proc/$keeper/task/$keeper/children" 2>/dev/null; }
mkdir -p /w/m2
$E mount --backend nbd --cache-dir /w/cache-dnbd http://127.0.0.1:8080/local.erofs /w/m > /tmp/dnbd.out 2>&1
check daemon-nbd-hosted sh -c "grep -q 'served by the daemon' /tmp/dnbd.out && ! ps -o args | grep -v grep | grep -q __nbd-serve || { cat /tmp/dnbd.out; exit 1; }"
check daemon-nbd-content same_tree /w/m /w/local.sums
$E mount --backend fuse-blob --cache-dir /w/cache-dfuse http://127.0.0.1:8080/local.erofs /w/m2 > /tmp/dfuse.out 2>&1
check daemon-fuse-hosted sh -c "grep -q 'served by the daemon' /tmp/dfuse.out && ! ps -o args | grep -v grep | grep -q __fuse-serve || { cat /tmp/dfuse.out; exit 1; }"
first=$(daemon_child)
kill -9 "$first"
for i in $(seq 100); do c=$(daemon_child); [ -n "$c" ] && [ "$c" != "$first" ] && grep -q "serving 2 mounts again" /tmp/daemon.log && break; sleep 0.1; done
echo 3 > /proc/sys/vm/drop_caches
check daemon-restarted sh -c "grep -q 'serving 2 mounts again' /tmp/daemon.log || { cat /tmp/daemon.log; exit 1; }"
check daemon-nbd-reconnected grep -q "reconnected /dev/nbd" /tmp/daemon.log
check daemon-nbd-after-kill same_tree /w/m /w/local.sums
check daemon-fuse-after-kill same_tree /w/m2 /w/local.sums
check daemon-nbd-umount $E umount /w/m
check daemon-fuse-umount $E umount /w/m2
for i in 1 2 3 4 5 6 7 8 9 10; do nbd_gone && break; sleep 0.3; done
check daemon-nbd-disconnected nbd_gone
kill "$keeper"; wait "$keeper"
check daemon-nothing-left sh -c "! ps -o args | grep -v grep | grep -q 'erofs-compat daemon' && [ -z \"\$(ls $EROFS_COMPAT_STATE_DIR/workers/*.spec 2>/dev/null)\" ] && ! grep -q fuse.erofs-compat /proc/mounts"
echo "VMINFO daemon-log $(tail -6 /tmp/daemon.log | tr '\n' ' ')"
# In a network namespace of its own (a container's): 6.1's "nbd" netlink family is not visible there
# (6.12's is namespace-aware), so the device is set up through its ioctls.
unshare -n $E mount --backend nbd /w/local.erofs /w/m > /tmp/nbd-netns.out 2>&1
check nbd-netns-backend backend_is /tmp/nbd-netns.out nbd
check nbd-netns-content same_tree /w/m /w/local.sums
unshare -n $E probe --json --cache-dir /w > /tmp/probe-netns.json 2>/dev/null
if [ "$V" = 6.1 ]; then
    check nbd-netns-ioctl-interface sh -c 'grep -h "ioctl interface" $EROFS_COMPAT_STATE_DIR/workers/*.log'
    check nbd-netns-no-family finding /tmp/probe-netns.json nbd.netlink absent
else
    check nbd-netns-netlink sh -c '! grep -h "ioctl interface" $EROFS_COMPAT_STATE_DIR/workers/*.log'
    check nbd-netns-family finding /tmp/probe-netns.json nbd.netlink present
fi
unshare -n $E umount /w/m
for i in 1 2 3 4 5 6 7 8 9 10; do nbd_gone && break; sleep 0.3; done
check nbd-netns-umount nbd_gone

# --- fuse-erofs as uid 65534 through fusermount3, state under XDG_RUNTIME_DIR (the mountpoint on
# tmpfs: fusermount3 refuses to mount over ramfs).
chmod 666 /dev/fuse
mkdir -p /tmp/u/mnt /tmp/u/xdg && chown -R 65534:65534 /tmp/u && chmod 700 /tmp/u/xdg
asnobody() { /usr/bin/setpriv --reuid 65534 --regid 65534 --clear-groups env -u EROFS_COMPAT_STATE_DIR XDG_RUNTIME_DIR=/tmp/u/xdg "$@"; }
asnobody $E mount /w/local.erofs /tmp/u/mnt > /tmp/nobody.out 2>&1
check nobody-backend-fuse-erofs backend_is /tmp/nobody.out fuse-erofs
asnobody sh -c 'cd /tmp/u/mnt && find . -type f | LC_ALL=C sort | xargs sha256sum' > /tmp/sums.nobody 2>&1
check nobody-content cmp /tmp/sums.nobody /w/local.sums
check nobody-umount asnobody $E umount /tmp/u/mnt
check nobody-unmounted sh -c '! grep -q /tmp/u/mnt /proc/mounts'
check nothing-left nothing_left
echo "VMCHECK done PASS"
