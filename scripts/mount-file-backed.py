#!/usr/bin/env python3
"""mount-file-backed.py IMAGE DIR: the kernel's own file-backed EROFS mount (Linux 6.12+), read-only.

The benches' baseline. mount(8) from util-linux 2.38 (Debian 12) puts a regular file on a loop device
before it mounts, so `mount -t erofs IMAGE DIR` measures loop, not file-backed; this passes the file
to the new mount API (fsopen/fsconfig/fsmount/move_mount) as EROFS's source instead. Exit 1 (with the
failing call) where the kernel cannot: the caller falls back to mount(8).
"""
import ctypes
import os
import sys

libc = ctypes.CDLL(None, use_errno=True)
SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 429, 430, 431, 432  # x86_64
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
MOUNT_ATTR_RDONLY, MOVE_MOUNT_F_EMPTY_PATH, AT_FDCWD = 1, 4, -100


def call(name, *args):
    r = libc.syscall(*args)
    if r < 0:
        e = ctypes.get_errno()
        sys.exit(f"mount-file-backed: {name}: {os.strerror(e)}")
    return r


def main():
    image, target = os.path.abspath(sys.argv[1]), sys.argv[2]
    fc = call("fsopen(erofs)", SYS_FSOPEN, b"erofs", 1)
    call("fsconfig(source)", SYS_FSCONFIG, fc, FSCONFIG_SET_STRING, b"source", image.encode(), 0)
    call("fsconfig(ro)", SYS_FSCONFIG, fc, FSCONFIG_SET_FLAG, b"ro", None, 0)
    call("fsconfig(create)", SYS_FSCONFIG, fc, FSCONFIG_CMD_CREATE, None, None, 0)
    mnt = call("fsmount", SYS_FSMOUNT, fc, 1, MOUNT_ATTR_RDONLY)
    call("move_mount", SYS_MOVE_MOUNT, mnt, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH)


if __name__ == "__main__":
    main()
