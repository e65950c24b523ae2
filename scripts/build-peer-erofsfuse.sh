#!/usr/bin/env bash
# build-peer-erofsfuse.sh DIR: builds the peer fuse-erofs is measured against — erofsfuse of
# erofs-utils 1.9.4, from Debian's source package (bookworm ships no erofsfuse; trixie's is 1.9.4) —
# into DIR/erofsfuse, once. Prints the binary's path; exits non-zero with a reason when it cannot
# (no network, no build tools), and the bench then skips the peer's rows.
set -euo pipefail
dir=$(mkdir -p "$1" && cd "$1" && pwd)
bin="$dir/erofsfuse"
[ -x "$bin" ] && { echo "$bin"; exit 0; }
version=1.9.4
tarball="erofs-utils_$version.orig.tar.gz"
sha256=7d135aa2550326a5acf20f53c518aea5a8900015ce50700044e40f818c31dd80  # from erofs-utils_1.9.4-1.dsc
url="http://deb.debian.org/debian/pool/main/e/erofs-utils/$tarball"
deps="autoconf automake libtool pkgconf libfuse3-dev liblz4-dev zlib1g-dev"
# shellcheck disable=SC2086
if ! dpkg -s $deps >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $deps >"$dir/apt.log" 2>&1 \
        || { echo "cannot install $deps (see $dir/apt.log)" >&2; exit 1; }
fi
curl -sSf --max-time 120 -o "$dir/$tarball" "$url" || { echo "cannot download $url" >&2; exit 1; }
echo "$sha256  $dir/$tarball" | sha256sum -c --quiet - || { echo "$tarball: checksum mismatch" >&2; exit 1; }
src="$dir/erofs-utils-$version"
rm -rf "$src"
tar -xzf "$dir/$tarball" -C "$dir"
(
    cd "$src"
    ./autogen.sh
    # lz4 and zlib (the bench images are uncompressed and lz4hc); multithreaded, as configure defaults.
    ./configure --enable-fuse --disable-lzma --without-libzstd --without-libdeflate --without-xxhash \
        --without-selinux --without-uuid --without-openssl --without-libcurl --without-json-c --without-libxml2
    make -j"$(nproc)" -C lib
    make -j"$(nproc)" -C fuse
) >"$dir/build.log" 2>&1 || { echo "erofsfuse did not build (see $dir/build.log)" >&2; exit 1; }
cp "$src/fuse/erofsfuse" "$bin"
rm -rf "$src" "${dir:?}/$tarball"
echo "$bin"
