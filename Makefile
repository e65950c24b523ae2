# erofs-compat — build, test, demo, bench, install.
SHELL := /bin/bash
SWIFT ?= $(shell command -v swift 2>/dev/null || echo /opt/swift/usr/bin/swift)
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR = $(DESTDIR)$(PREFIX)/bin
CONFIG ?= debug

# Debian packages: to build, to test, to package.
BUILD_DEPS = libkmod-dev libblkid-dev libcurl4-openssl-dev libfuse3-dev \
             liblz4-dev liblzma-dev libzstd-dev zlib1g-dev
TEST_DEPS  = erofs-utils fuse3 util-linux attr nginx-light docker-registry apache2-utils curl python3 systemd strace libnbd-bin python3-libnbd nbdkit fsverity \
             qemu-system-x86 busybox-static cpio kmod file
DEB_DEPS   = debhelper dpkg-dev lintian

.PHONY: all build release check test vm-check deps demo bench install deb clean

all: build

## Install missing Debian packages (only when running as root; otherwise just report them).
deps:
	@scripts/apt-deps.sh $(BUILD_DEPS) $(TEST_DEPS)

build: deps
	$(SWIFT) build

## The Swift runtime is linked statically: a cold start (after the page cache was dropped) loads
## far fewer files, which is what the first lazy mount of a boot waits for.
release: deps
	$(SWIFT) build -c release --static-swift-stdlib

## All tests: the live kernel tests need root; without it they are skipped with the reason.
## The VM tier (Debian's 6.1 and 6.12 kernels under QEMU) runs the debug binary here: ~45 s.
check: deps
	$(SWIFT) build
	$(SWIFT) test
	scripts/vm-check.sh .build/debug/erofs-compat

## The VM tier alone, on the release binary.
vm-check: release
	@scripts/apt-deps.sh $(TEST_DEPS)
	scripts/vm-check.sh .build/release/erofs-compat

test: check

## End to end on a built-in sample image.
demo: release
	@scripts/apt-deps.sh nginx-light
	scripts/demo.sh .build/release/erofs-compat

## Speed figures as ratios against baselines measured in the same run. BENCH_BASELINE: a commit whose
## remote figures are measured too (built in a worktree; empty skips it), here the one before the
## shared serving threads.
BENCH_BASELINE ?= 1a98143
bench: release
	@scripts/apt-deps.sh curl nginx-light python3
	BENCH_BASELINE=$(BENCH_BASELINE) SWIFT=$(SWIFT) scripts/bench.sh .build/release/erofs-compat

install: release
	install -d $(BINDIR)
	install -s -m 0755 .build/release/erofs-compat $(BINDIR)/erofs-compat

## The Debian binary package, checked by lintian: .build/deb/erofs-compat_VERSION_ARCH.deb.
deb:
	@scripts/apt-deps.sh $(BUILD_DEPS) $(DEB_DEPS)
	scripts/build-deb.sh

clean:
	$(SWIFT) package clean
	rm -rf .build
