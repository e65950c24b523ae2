#!/usr/bin/env bash
# make deb: builds the binary package from a copy of the tracked sources with packaging/debian as
# its debian/ directory and packaging/systemd's units, then runs lintian on the result.
# Output: .build/deb/erofs-compat_VERSION_ARCH.deb (and the -dbgsym package beside it).
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
version=$(dpkg-parsechangelog -l packaging/debian/changelog -SVersion)
upstream=${version%-*}
out=$top/.build/deb
# A fixed place (inside .build, which git ignores), so a second `make deb` rebuilds incrementally.
src=$out/src/erofs-compat-$upstream
rm -rf "$src/debian" && mkdir -p "$src"
# The tracked files as they are in the working tree (no .build, no Package.resolved).
if git -C "$top" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$top" ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
        [ -e "$f" ] && cp --parents --preserve=timestamps -- "$f" "$src"
    done
else
    tar -C "$top" --exclude=./.build -cf - . | tar -C "$src" -xf -
fi
cp -a packaging/debian "$src/debian"
cp packaging/systemd/erofs-compat.service packaging/systemd/erofs-compat.socket "$src/debian/"
# --no-pre-clean: debian/rules clean would remove .build and with it the incremental build.
(cd "$src" && dpkg-buildpackage --build=binary --no-pre-clean -us -uc)
arch=$(dpkg-architecture -qDEB_HOST_ARCH)
deb=$out/src/erofs-compat_${version}_${arch}.deb
cp "$out"/src/erofs-compat*_"${version}_${arch}".deb "$out/"
echo "== lintian (the .changes: both packages and the build record)"
lintian --fail-on warning --info "$out/src/erofs-compat_${version}_${arch}.changes"
echo "built $out/$(basename "$deb")"
