#!/usr/bin/env bash
# make vm-check: boots Debian's own 6.1 and 6.12 cloud kernels under QEMU (software emulation) from a
# small busybox initramfs holding the release binary, the libraries it loads, test images and their
# expected sums (the host kernel's view of each image), runs scripts/vm/scenario.sh in each guest and
# asserts on the VMCHECK lines the guest prints on its serial console.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$(readlink -f "${1:-$ROOT/.build/release/erofs-compat}")
VM=${VM_DIR:-$ROOT/.build/vm}
TIMEOUT=${VM_TIMEOUT:-300}
mkdir -p "$VM/debs"
skip() { echo "vm-check skipped: $*"; exit 0; }
[ "$(id -u)" -eq 0 ] || skip "needs root (to build images with the host kernel as the oracle)"
for t in qemu-system-x86_64 busybox cpio depmod dpkg-deb mkfs.erofs setpriv fusermount3 mke2fs; do
    command -v "$t" >/dev/null || skip "$t is missing (Debian: qemu-system-x86, busybox-static, cpio, kmod, erofs-utils, util-linux, fuse3, e2fsprogs)"
done
file -L "$(command -v busybox)" 2>/dev/null | grep -q 'statically linked' || [ -x /bin/busybox ] || skip "busybox-static is missing"

# The newest Debian package of each kernel line, downloaded once into $VM/debs.
fetch() {  # REGEX
    local pkg deb
    pkg=$(apt-cache search --names-only "$1" | awk '{print $1}' | sort -V | tail -1)
    [ -n "$pkg" ] || return 1
    deb=$(ls "$VM/debs/${pkg}_"*.deb 2>/dev/null | tail -1 || true)
    if [ -z "$deb" ]; then (cd "$VM/debs" && apt-get download "$pkg" >/dev/null 2>&1) || return 1; deb=$(ls "$VM/debs/${pkg}_"*.deb | tail -1); fi
    echo "$deb"
}

work=$(mktemp -d /var/tmp/erofs-compat-vm.XXXXXX)
trap 'umount -l "$work/oracle" 2>/dev/null || true; rm -rf "$work"' EXIT

# Test images and their sums as the host's kernel shows them.
mkdir -p "$work/images/www" "$work/oracle" "$work/tree/dir/sub"
python3 - "$work/tree" <<'PY'
import os, random, sys
random.seed(11)
root = sys.argv[1]
for i in range(60):
    d = os.path.join(root, "dir" if i % 2 else "", "sub" if i % 3 == 0 else "")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:02d}"), "wb") as f: f.write(os.urandom(random.randint(0, 200_000)))
with open(os.path.join(root, "big"), "wb") as f: f.write(os.urandom(6 << 20))
os.symlink("big", os.path.join(root, "link"))
PY
mkfs.erofs --quiet -zlz4hc "$work/images/local.erofs" "$work/tree"
cp "$work/images/local.erofs" "$work/images/www/local.erofs"
# Its fs-verity tree beside it (what a publisher serves), its digests, and an empty ext4 with the
# verity feature for a cache the guest's kernel can hand to fs-verity.
"$BIN" image verity "$work/images/www/local.erofs" --tree "$work/images/www/local.erofs.verity" \
    | cut -d' ' -f1 | cut -d: -f2 > "$work/images/local.verity"
sha256sum "$work/images/local.erofs" | cut -d' ' -f1 > "$work/images/local.sha256"
mke2fs -q -t ext4 -b 4096 -O verity -F "$work/images/verity.ext4" 48M >/dev/null
cp "$ROOT/Tests/Fixtures/mkfs-erofs-1.9.3/zstd.erofs" "$work/images/zstd.erofs"
for img in local zstd; do
    mount -t erofs -o ro "$work/images/$img.erofs" "$work/oracle"
    (cd "$work/oracle" && find . -type f | LC_ALL=C sort | xargs sha256sum) > "$work/images/$img.sums"
    umount "$work/oracle"
done

# Copies FILE and every library ldd lists for it to the same paths under DIR.
with_libs() {  # DIR FILE...
    local dir=$1 f l; shift
    for f in "$@"; do
        mkdir -p "$dir$(dirname "$f")"; cp -aL "$f" "$dir$f"
        for l in $(ldd "$f" 2>/dev/null | grep -o '/[^ ]*' || true); do
            [ -e "$dir$l" ] || { mkdir -p "$dir$(dirname "$l")"; cp -L "$l" "$dir$l"; }
        done
    done
}

# initramfs for one kernel: busybox, the kernel's modules with a regenerated modules.dep, the binary
# and the Debian libraries it dlopens (and theirs), setpriv, fusermount3, the images.
build_initramfs() {  # KERNEL_TREE VERSION OUT
    local k=$1 ver=$2 out=$3 r="$work/root-$2" lib
    rm -rf "$r"; mkdir -p "$r"/{bin,sbin,proc,sys,dev,tmp,run,w,etc,usr/bin}
    cp "$(command -v busybox)" "$r/bin/busybox"
    mkdir -p "$r/lib/modules/$ver"
    # Debian's kernel packages ship no modules.dep: generate it, copy the modules the scenarios load
    # (and what they depend on), and generate it again for that subset.
    depmod -b "$k" "$ver"
    local m ko
    for m in erofs loop fuse nbd; do
        for ko in $(modprobe -d "$k" -S "$ver" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" {print $2}'); do
            mkdir -p "$r$(dirname "${ko#"$k"}")"; cp "$ko" "$r${ko#"$k"}"
        done
    done
    cp "$k/lib/modules/$ver"/modules.{order,builtin,builtin.modinfo} "$r/lib/modules/$ver/" 2>/dev/null || true
    depmod -b "$r" "$ver"
    with_libs "$r" "$BIN"
    cp -a "$r$BIN" "$r/usr/bin/erofs-compat"
    for lib in libkmod.so.2 libblkid.so.1 libcurl.so.4 libfuse3.so.3 liblz4.so.1 libzstd.so.1 libz.so.1 liblzma.so.5; do
        with_libs "$r" "$(ldconfig -p | awk -v l="$lib" '$1 == l && /x86-64/ {print $NF; exit}')"
    done
    with_libs "$r" "$(command -v setpriv)" "$(command -v fusermount3)"
    chmod 4755 "$r$(command -v fusermount3)"
    echo "nobody:x:65534:65534:nobody:/nonexistent:/bin/sh" > "$r/etc/passwd"
    echo "root:x:0:0:root:/root:/bin/sh" >> "$r/etc/passwd"
    echo "nogroup:x:65534:" > "$r/etc/group"
    ln -sf /proc/self/mounts "$r/etc/mtab"
    cp -a "$work/images" "$r/images"
    cp "$ROOT/scripts/vm/scenario.sh" "$r/scenario.sh"
    cat > "$r/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
ln -s /bin/modprobe /sbin/modprobe
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs run /run; mount -t tmpfs tmp /tmp
mount -t ramfs w /w && cp -a /images/. /w/
sh /scenario.sh
echo VMCHECK-END
poweroff -f
INIT
    chmod +x "$r/init"
    (cd "$r" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"
}

failures=0
boot() {  # DEB LABEL
    local deb=$1 label=$2 k="$work/k-$2" ver log="$work/$2.log" start
    mkdir -p "$k"; dpkg-deb -x "$deb" "$k"
    ver=$(ls "$k/lib/modules" | head -1)
    build_initramfs "$k" "$ver" "$work/$label.cpio.gz"
    start=$(date +%s)
    timeout "$TIMEOUT" qemu-system-x86_64 -accel tcg -m 1536 -smp 2 -nographic -no-reboot \
        -kernel "$k/boot/vmlinuz-$ver" -initrd "$work/$label.cpio.gz" \
        -append "console=ttyS0 panic=-1 quiet" > "$log" 2>&1 || true
    local secs=$(( $(date +%s) - start )) pass fail
    pass=$(grep -c '^VMCHECK [^ ]* PASS' "$log" || true)
    fail=$(grep '^VMCHECK [^ ]* FAIL' "$log" || true)
    echo "== Linux $ver (Debian $(basename "$deb" | cut -d_ -f2)): $pass checks passed in ${secs} s"
    grep -E '^VM(CHECK|INFO) ' "$log" | sed -e 's/^VMCHECK /   /' -e 's/^VMINFO /   (info) /'
    if [ -n "$fail" ] || ! grep -q '^VMCHECK done PASS' "$log"; then
        echo "   FAILED on Linux $ver; the end of its serial log:"
        tail -40 "$log" | sed 's/^/   | /'
        failures=$((failures + 1))
    fi
}

[ -x "$BIN" ] || { echo "no release binary at $BIN (make release)"; exit 1; }
d61=$(fetch '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$') || skip "no linux-image-6.1.*-cloud-amd64-unsigned from Debian"
d612=$(fetch '^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$') || skip "no linux-image-6.12.*+deb12-cloud-amd64-unsigned from Debian"
boot "$d61" 6.1
boot "$d612" 6.12
[ "$failures" -eq 0 ] || exit 1
