/* The parts of the C boundary that need _GNU_SOURCE. The header stays free of it so that struct
 * layouts seen through CHeaders match those of Swift's Glibc module. */
#define _GNU_SOURCE 1
#include <fcntl.h>
#include <sched.h>
#include <string.h>
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
