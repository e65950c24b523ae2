/* The parts of the C boundary that need _GNU_SOURCE. The header stays free of it so that struct
 * layouts seen through CHeaders match those of Swift's Glibc module. */
#define _GNU_SOURCE 1
#include <fcntl.h>
#include <sched.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include "CHeaders.h"

const int ecx_o_tmpfile = O_TMPFILE;
const int ecx_o_path = O_PATH;
const int ecx_o_largefile = O_LARGEFILE;
const int ecx_clone_newns = CLONE_NEWNS;

int ecx_unshare(int flags) { return unshare(flags); }

int ecx_uname_field(int which, char *buf, size_t len) {
    struct utsname u;
    if (uname(&u) != 0) return -1;
    const char *src = which == 0 ? u.release : u.machine;
    strncpy(buf, src, len - 1);
    buf[len - 1] = 0;
    return 0;
}

#ifndef STATX_MNT_ID
#define STATX_MNT_ID 0x00001000U
#endif
#ifndef STATX_ATTR_MOUNT_ROOT
#define STATX_ATTR_MOUNT_ROOT 0x00002000
#endif

int ecx_mount_identity(const char *path, uint64_t *mnt_id, int *is_root) {
    struct statx st;
    memset(&st, 0, sizeof(st));
    if (statx(AT_FDCWD, path, 0, STATX_MNT_ID, &st) != 0) return -1;
    *mnt_id = (st.stx_mask & STATX_MNT_ID) ? st.stx_mnt_id : 0;
    *is_root = (st.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT) ? ((st.stx_attributes & STATX_ATTR_MOUNT_ROOT) != 0) : -1;
    return 0;
}
