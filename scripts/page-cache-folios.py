#!/usr/bin/env python3
# FILE: reads every page of FILE through an mmap, then counts from /proc/self/pagemap and
# /proc/kpageflags how its page cache is held: pages in large folios (compound) or single pages.
# (Root only: kpageflags.) `make bench` uses it to show why hot FUSE reads trail the kernel's
# own EROFS mount: the two page caches are not held alike.
import ctypes, os, struct, sys
libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
path = sys.argv[1]
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
base = libc.mmap(None, size, 1, 1, fd, 0)
npages = size // 4096
for i in range(npages): ctypes.c_char.from_address(base + i * 4096).value
pm = os.open("/proc/self/pagemap", os.O_RDONLY)
kf = os.open("/proc/kpageflags", os.O_RDONLY)
heads = tails = other = 0
for i in range(npages):
    e = struct.unpack("Q", os.pread(pm, 8, ((base // 4096) + i) * 8))[0]
    if not (e >> 63) & 1: other += 1; continue
    pfn = e & ((1 << 55) - 1)
    f = struct.unpack("Q", os.pread(kf, 8, pfn * 8))[0]
    if (f >> 15) & 1: heads += 1
    elif (f >> 16) & 1: tails += 1
    else: other += 1
print(f"{path}: {npages} pages, {heads + tails} in {heads} large folios, {other} single pages")
