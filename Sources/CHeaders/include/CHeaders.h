/*
 * CHeaders: the one C boundary of erofs-compat.
 *
 * Every kernel constant and structure the Swift code needs is exposed here under an `ecx_` / `ECX_`
 * prefixed name that exists whether or not the system headers (Debian 12 ships linux-libc-dev 6.1) know
 * it. Macros, variadic calls and raw syscalls are wrapped in static inline functions so Swift can call
 * them. The Debian libraries (libkmod, libblkid, libcurl, libfuse3, liblz4, liblzma, libzstd, zlib)
 * are included here and nowhere else.
 */
#ifndef ECX_CHEADERS_H
#define ECX_CHEADERS_H

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/fanotify.h>
#include <sys/inotify.h>
#include <sys/file.h>
#include <sys/xattr.h>
#include <linux/loop.h>
#include <linux/netlink.h>
#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/nbd.h>

#include <libkmod.h>
#include <blkid/blkid.h>
#include <curl/curl.h>
#ifndef FUSE_USE_VERSION
#define FUSE_USE_VERSION 31
#endif
#include <fuse3/fuse.h>
#include <lz4.h>
#include <lzma.h>
#include <zstd.h>
#include <zlib.h>

/* ---------------------------------------------------------------- fanotify (pre-content, 6.14+) */

#ifndef FAN_CLASS_PRE_CONTENT
#define FAN_CLASS_PRE_CONTENT 0x00000008
#endif
#ifndef FAN_CLASS_CONTENT
#define FAN_CLASS_CONTENT 0x00000004
#endif
#ifndef FAN_CLASS_NOTIF
#define FAN_CLASS_NOTIF 0x00000000
#endif
#ifndef FAN_CLOEXEC
#define FAN_CLOEXEC 0x00000001
#endif
#ifndef FAN_NONBLOCK
#define FAN_NONBLOCK 0x00000002
#endif
#ifndef FAN_PRE_ACCESS
#define FAN_PRE_ACCESS 0x00100000
#endif
#ifndef FAN_OPEN_PERM
#define FAN_OPEN_PERM 0x00010000
#endif
#ifndef FAN_ACCESS_PERM
#define FAN_ACCESS_PERM 0x00020000
#endif
#ifndef FAN_ONDIR
#define FAN_ONDIR 0x40000000
#endif
#ifndef FAN_EVENT_INFO_TYPE_RANGE
#define FAN_EVENT_INFO_TYPE_RANGE 6
#endif
#ifndef FAN_ALLOW
#define FAN_ALLOW 0x01
#endif
#ifndef FAN_DENY
#define FAN_DENY 0x02
#endif
#ifndef FAN_ERRNO_BITS
#define FAN_ERRNO_BITS 8
#endif
#ifndef FAN_ERRNO_SHIFT
#define FAN_ERRNO_SHIFT (32 - FAN_ERRNO_BITS)
#endif
#ifndef FAN_MARK_ADD
#define FAN_MARK_ADD 0x00000001
#endif
#ifndef FAN_MARK_REMOVE
#define FAN_MARK_REMOVE 0x00000002
#endif
#ifndef FAN_MARK_FLUSH
#define FAN_MARK_FLUSH 0x00000080
#endif
#ifndef FANOTIFY_METADATA_VERSION
#define FANOTIFY_METADATA_VERSION 3
#endif
#ifndef FAN_NOFD
#define FAN_NOFD -1
#endif
/* Provisional: restartable events are posted upstream but merged in no release. Both posted values. */
#define ECX_FAN_RESTARTABLE_EVENTS_V1 0x00008000u
#define ECX_FAN_RESTARTABLE_EVENTS_V2 0x00010000u
#define ECX_FAN_IOC_OPEN_QUEUE_FD _IO('F', 0xF0)

static const unsigned int ecx_fan_class_notif = FAN_CLASS_NOTIF;
static const unsigned int ecx_fan_class_content = FAN_CLASS_CONTENT;
static const unsigned int ecx_fan_class_pre_content = FAN_CLASS_PRE_CONTENT;
static const unsigned int ecx_fan_cloexec = FAN_CLOEXEC;
static const unsigned int ecx_fan_nonblock = FAN_NONBLOCK;
static const unsigned long long ecx_fan_pre_access = FAN_PRE_ACCESS;
static const unsigned long long ecx_fan_open_perm = FAN_OPEN_PERM;
static const unsigned long long ecx_fan_access_perm = FAN_ACCESS_PERM;
static const unsigned long long ecx_fan_ondir = FAN_ONDIR;
static const unsigned int ecx_fan_mark_add = FAN_MARK_ADD;
static const unsigned int ecx_fan_mark_remove = FAN_MARK_REMOVE;
static const unsigned int ecx_fan_mark_flush = FAN_MARK_FLUSH;
static const unsigned int ecx_fan_allow = FAN_ALLOW;
static const unsigned int ecx_fan_deny = FAN_DENY;
static const unsigned char ecx_fan_event_info_type_range = FAN_EVENT_INFO_TYPE_RANGE;
static const unsigned char ecx_fanotify_metadata_version = FANOTIFY_METADATA_VERSION;
static const unsigned int ecx_fan_restartable_events_v1 = ECX_FAN_RESTARTABLE_EVENTS_V1;
static const unsigned int ecx_fan_restartable_events_v2 = ECX_FAN_RESTARTABLE_EVENTS_V2;
static const unsigned long ecx_fan_ioc_open_queue_fd = ECX_FAN_IOC_OPEN_QUEUE_FD;

/** FAN_DENY_ERRNO(e): deny a permission event and make the blocked syscall fail with `e` (6.13+). */
static inline unsigned int ecx_fan_deny_errno(int err) {
    return (unsigned int)FAN_DENY | ((unsigned int)err << FAN_ERRNO_SHIFT);
}

/** struct fanotify_event_metadata, spelled out so its layout is asserted here. */
struct ecx_fanotify_event_metadata {
    uint32_t event_len;
    uint8_t vers;
    uint8_t reserved;
    uint16_t metadata_len;
    uint64_t mask __attribute__((aligned(8)));
    int32_t fd;
    int32_t pid;
};
_Static_assert(sizeof(struct ecx_fanotify_event_metadata) == 24, "fanotify_event_metadata is 24 bytes");
_Static_assert(sizeof(struct ecx_fanotify_event_metadata) == sizeof(struct fanotify_event_metadata),
               "matches the system header");

/** The header every info record starts with. */
struct ecx_fanotify_event_info_header {
    uint8_t info_type;
    uint8_t pad;
    uint16_t len;
};
_Static_assert(sizeof(struct ecx_fanotify_event_info_header) == 4, "info header is 4 bytes");

/** struct fanotify_event_info_range (FAN_EVENT_INFO_TYPE_RANGE), 6.14+. */
struct ecx_fanotify_event_info_range {
    struct ecx_fanotify_event_info_header hdr;
    uint32_t pad;
    uint64_t offset;
    uint64_t count;
};
_Static_assert(sizeof(struct ecx_fanotify_event_info_range) == 24, "info range record is 24 bytes");
_Static_assert(offsetof(struct ecx_fanotify_event_info_range, offset) == 8, "range offset at 8");
_Static_assert(offsetof(struct ecx_fanotify_event_info_range, count) == 16, "range count at 16");

/** struct fanotify_response. */
struct ecx_fanotify_response {
    int32_t fd;
    uint32_t response;
};
_Static_assert(sizeof(struct ecx_fanotify_response) == 8, "fanotify_response is 8 bytes");

static inline int ecx_fanotify_init(unsigned int flags, unsigned int event_f_flags) {
    return (int)syscall(SYS_fanotify_init, flags, event_f_flags);
}
static inline int ecx_fanotify_mark(int fd, unsigned int flags, uint64_t mask, int dirfd, const char *path) {
    return fanotify_mark(fd, flags, mask, dirfd, path);
}

/* ---------------------------------------------------------------- new mount API (5.2+) */

#ifndef __NR_open_tree
#define __NR_open_tree 428
#endif
#ifndef __NR_move_mount
#define __NR_move_mount 429
#endif
#ifndef __NR_fsopen
#define __NR_fsopen 430
#endif
#ifndef __NR_fsconfig
#define __NR_fsconfig 431
#endif
#ifndef __NR_fsmount
#define __NR_fsmount 432
#endif

#define ECX_FSOPEN_CLOEXEC 0x00000001u
#define ECX_FSMOUNT_CLOEXEC 0x00000001u
#define ECX_FSCONFIG_SET_FLAG 0u
#define ECX_FSCONFIG_SET_STRING 1u
#define ECX_FSCONFIG_CMD_CREATE 6u
#define ECX_MOUNT_ATTR_RDONLY 0x00000001u
#define ECX_MOUNT_ATTR_NOSUID 0x00000002u
#define ECX_MOUNT_ATTR_NODEV 0x00000004u
#define ECX_MOUNT_ATTR_NOEXEC 0x00000008u
#define ECX_MOUNT_ATTR_NOATIME 0x00000010u
#define ECX_MOVE_MOUNT_F_EMPTY_PATH 0x00000004u
#define ECX_MOVE_MOUNT_T_EMPTY_PATH 0x00000040u

static const unsigned int ecx_fsopen_cloexec = ECX_FSOPEN_CLOEXEC;
static const unsigned int ecx_fsmount_cloexec = ECX_FSMOUNT_CLOEXEC;
static const unsigned int ecx_fsconfig_set_flag = ECX_FSCONFIG_SET_FLAG;
static const unsigned int ecx_fsconfig_set_string = ECX_FSCONFIG_SET_STRING;
static const unsigned int ecx_fsconfig_cmd_create = ECX_FSCONFIG_CMD_CREATE;
static const unsigned int ecx_mount_attr_rdonly = ECX_MOUNT_ATTR_RDONLY;
static const unsigned int ecx_mount_attr_nosuid = ECX_MOUNT_ATTR_NOSUID;
static const unsigned int ecx_mount_attr_nodev = ECX_MOUNT_ATTR_NODEV;
static const unsigned int ecx_mount_attr_noexec = ECX_MOUNT_ATTR_NOEXEC;
static const unsigned int ecx_mount_attr_noatime = ECX_MOUNT_ATTR_NOATIME;
static const unsigned int ecx_move_mount_f_empty_path = ECX_MOVE_MOUNT_F_EMPTY_PATH;
static const unsigned int ecx_move_mount_t_empty_path = ECX_MOVE_MOUNT_T_EMPTY_PATH;

static inline int ecx_fsopen(const char *fsname, unsigned int flags) {
    return (int)syscall(__NR_fsopen, fsname, flags);
}
static inline int ecx_fsconfig(int fd, unsigned int cmd, const char *key, const void *value, int aux) {
    return (int)syscall(__NR_fsconfig, fd, cmd, key, value, aux);
}
static inline int ecx_fsmount(int fd, unsigned int flags, unsigned int attr_flags) {
    return (int)syscall(__NR_fsmount, fd, flags, attr_flags);
}
static inline int ecx_move_mount(int from_dfd, const char *from_path, int to_dfd, const char *to_path,
                                 unsigned int flags) {
    return (int)syscall(__NR_move_mount, from_dfd, from_path, to_dfd, to_path, flags);
}

/* ---------------------------------------------------------------- loop devices */

#ifndef LOOP_CTL_GET_FREE
#define LOOP_CTL_GET_FREE 0x4C82
#endif
#ifndef LOOP_CONFIGURE
#define LOOP_CONFIGURE 0x4C0A
#endif
#ifndef LOOP_CLR_FD
#define LOOP_CLR_FD 0x4C01
#endif
#ifndef LOOP_GET_STATUS64
#define LOOP_GET_STATUS64 0x4C05
#endif
#ifndef LO_FLAGS_READ_ONLY
#define LO_FLAGS_READ_ONLY 1
#endif
#ifndef LO_FLAGS_AUTOCLEAR
#define LO_FLAGS_AUTOCLEAR 4
#endif
#ifndef LO_FLAGS_DIRECT_IO
#define LO_FLAGS_DIRECT_IO 16
#endif

static const unsigned long ecx_loop_ctl_get_free = LOOP_CTL_GET_FREE;
static const unsigned long ecx_loop_configure = LOOP_CONFIGURE;
static const unsigned long ecx_loop_clr_fd = LOOP_CLR_FD;
static const unsigned int ecx_lo_flags_read_only = LO_FLAGS_READ_ONLY;
static const unsigned int ecx_lo_flags_autoclear = LO_FLAGS_AUTOCLEAR;
static const unsigned int ecx_lo_flags_direct_io = LO_FLAGS_DIRECT_IO;

/** struct loop_info64 + struct loop_config (LOOP_CONFIGURE, 5.8), spelled out for old headers. */
struct ecx_loop_info64 {
    uint64_t lo_device;
    uint64_t lo_inode;
    uint64_t lo_rdevice;
    uint64_t lo_offset;
    uint64_t lo_sizelimit;
    uint32_t lo_number;
    uint32_t lo_encrypt_type;
    uint32_t lo_encrypt_key_size;
    uint32_t lo_flags;
    uint8_t lo_file_name[64];
    uint8_t lo_crypt_name[64];
    uint8_t lo_encrypt_key[32];
    uint64_t lo_init[2];
};
_Static_assert(sizeof(struct ecx_loop_info64) == 232, "loop_info64 is 232 bytes");
struct ecx_loop_config {
    uint32_t fd;
    uint32_t block_size;
    struct ecx_loop_info64 info;
    uint64_t reserved[8];
};
_Static_assert(sizeof(struct ecx_loop_config) == 304, "loop_config is 304 bytes");

/* ---------------------------------------------------------------- NBD (netlink setup, 4.12+) */

#define ECX_NBD_GENL_FAMILY_NAME "nbd"
#ifndef NBD_SET_SOCK
#define NBD_SET_SOCK 0xab00
#endif
#ifndef NBD_DO_IT
#define NBD_DO_IT 0xab03
#endif
#ifndef NBD_CLEAR_SOCK
#define NBD_CLEAR_SOCK 0xab04
#endif
#ifndef NBD_SET_SIZE_BLOCKS
#define NBD_SET_SIZE_BLOCKS 0xab07
#endif
#ifndef NBD_DISCONNECT
#define NBD_DISCONNECT 0xab08
#endif
static const unsigned long ecx_nbd_set_sock = NBD_SET_SOCK;
static const unsigned long ecx_nbd_do_it = NBD_DO_IT;
static const unsigned long ecx_nbd_disconnect = NBD_DISCONNECT;
static const unsigned long ecx_nbd_set_blksize = NBD_SET_BLKSIZE;
static const unsigned long ecx_nbd_set_size = NBD_SET_SIZE;
static const unsigned long ecx_nbd_clear_sock = NBD_CLEAR_SOCK;
static const unsigned long ecx_nbd_set_timeout = NBD_SET_TIMEOUT;
static const unsigned long ecx_nbd_set_flags = NBD_SET_FLAGS;

/* NBD generic netlink (linux/nbd-netlink.h, 4.12+) */
static const unsigned char ecx_nbd_cmd_connect = NBD_CMD_CONNECT;
static const unsigned char ecx_nbd_cmd_disconnect = NBD_CMD_DISCONNECT;
static const unsigned short ecx_nbd_attr_index = NBD_ATTR_INDEX;
static const unsigned short ecx_nbd_attr_size_bytes = NBD_ATTR_SIZE_BYTES;
static const unsigned short ecx_nbd_attr_block_size_bytes = NBD_ATTR_BLOCK_SIZE_BYTES;
static const unsigned short ecx_nbd_attr_timeout = NBD_ATTR_TIMEOUT;
static const unsigned short ecx_nbd_attr_server_flags = NBD_ATTR_SERVER_FLAGS;
static const unsigned short ecx_nbd_attr_client_flags = NBD_ATTR_CLIENT_FLAGS;
static const unsigned short ecx_nbd_attr_sockets = NBD_ATTR_SOCKETS;
static const unsigned short ecx_nbd_attr_dead_conn_timeout = NBD_ATTR_DEAD_CONN_TIMEOUT;
static const unsigned short ecx_nbd_sock_item = NBD_SOCK_ITEM;
static const unsigned short ecx_nbd_sock_fd = NBD_SOCK_FD;
static const unsigned long long ecx_nbd_flag_has_flags = NBD_FLAG_HAS_FLAGS;
static const unsigned long long ecx_nbd_flag_read_only = NBD_FLAG_READ_ONLY;
static const unsigned long long ecx_nbd_cflag_destroy_on_disconnect = NBD_CFLAG_DESTROY_ON_DISCONNECT;
static const unsigned long long ecx_nbd_cflag_disconnect_on_close = NBD_CFLAG_DISCONNECT_ON_CLOSE;
static const unsigned char ecx_nbd_cmd_reconfigure = NBD_CMD_RECONFIGURE;
static const unsigned short ecx_nlm_f_ack = NLM_F_ACK;

/* generic netlink control family */
static const unsigned short ecx_genl_id_ctrl = GENL_ID_CTRL;
static const unsigned char ecx_ctrl_cmd_getfamily = CTRL_CMD_GETFAMILY;
static const unsigned short ecx_ctrl_attr_family_name = CTRL_ATTR_FAMILY_NAME;
static const unsigned short ecx_ctrl_attr_family_id = CTRL_ATTR_FAMILY_ID;
static const int ecx_netlink_generic = NETLINK_GENERIC;
static const unsigned short ecx_nlm_f_request = NLM_F_REQUEST;
static const unsigned short ecx_nlmsg_error = NLMSG_ERROR;

/* ---------------------------------------------------------------- FUSE INIT (wire protocol) */

#define ECX_FUSE_INIT_OPCODE 26u
#define ECX_FUSE_INIT_EXT (1u << 30)
#define ECX_FUSE_PASSTHROUGH (1ull << 37)
#define ECX_FUSE_OVER_IO_URING (1ull << 41)
static const unsigned int ecx_fuse_init_opcode = ECX_FUSE_INIT_OPCODE;
static const unsigned long long ecx_fuse_init_ext = ECX_FUSE_INIT_EXT;
static const unsigned long long ecx_fuse_passthrough = ECX_FUSE_PASSTHROUGH;
static const unsigned long long ecx_fuse_over_io_uring = ECX_FUSE_OVER_IO_URING;

/** fuse_in_header + the leading part of fuse_init_in (protocol 7.36+ carries flags2). */
struct ecx_fuse_init_request {
    uint32_t len;
    uint32_t opcode;
    uint64_t unique;
    uint64_t nodeid;
    uint32_t uid;
    uint32_t gid;
    uint32_t pid;
    uint16_t total_extlen;
    uint16_t padding;
    uint32_t major;
    uint32_t minor;
    uint32_t max_readahead;
    uint32_t flags;
    uint32_t flags2;
};
_Static_assert(offsetof(struct ecx_fuse_init_request, major) == 40, "fuse_in_header is 40 bytes");

/* FUSE passthrough (Linux 6.9+): FUSE_DEV_IOC_BACKING_OPEN registers a file on a connection (the
 * caller needs CAP_SYS_ADMIN) and returns its backing id, which an OPEN reply names with
 * FOPEN_PASSTHROUGH; reads of that open file then go to the backing file without the server. Not in
 * Debian 12's linux/fuse.h (6.1), so spelled out here as the kernel's uapi defines it. */
struct ecx_fuse_backing_map {
    int32_t fd;
    uint32_t flags;
    uint64_t padding;
};
static const unsigned long ecx_fuse_dev_ioc_backing_open = _IOW(229, 1, struct ecx_fuse_backing_map);

/* ---------------------------------------------------------------- mount(2) & friends */

static const unsigned long ecx_ms_rdonly = MS_RDONLY;
static const unsigned long ecx_ms_nosuid = MS_NOSUID;
static const unsigned long ecx_ms_nodev = MS_NODEV;
static const unsigned long ecx_ms_noexec = MS_NOEXEC;
static const unsigned long ecx_ms_noatime = MS_NOATIME;
static const unsigned long ecx_ms_rec = MS_REC;
static const unsigned long ecx_ms_private = MS_PRIVATE;
static const int ecx_mnt_detach = MNT_DETACH;
static const int ecx_umount_nofollow = UMOUNT_NOFOLLOW;

/* ---------------------------------------------------------------- splice */

/* Raw syscalls: glibc declares splice(2) and F_SETPIPE_SZ only under _GNU_SOURCE. */
static inline long ecx_splice(int fd_in, long long *off_in, int fd_out, size_t len, unsigned int flags) {
    return syscall(SYS_splice, fd_in, off_in, fd_out, (long long *)0, len, flags);
}
/* F_SETPIPE_SZ is F_LINUX_SPECIFIC_BASE + 7. */
static inline int ecx_set_pipe_size(int fd, int size) { return fcntl(fd, 1024 + 7, size); }

/* ---------------------------------------------------------------- shared memory */

/* A MAP_SHARED read-write mapping of `fd` (NULL on failure), and ordered 32-bit loads and stores in
 * it: another process reading the memory after a crash sees a slot's bytes before its state. */
static inline void *ecx_map_shared(int fd, size_t length) {
    void *p = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}
static inline uint32_t ecx_load_acquire_u32(const void *p) {
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE);
}
static inline void ecx_store_release_u32(void *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE); }

/* ---------------------------------------------------------------- variadic wrappers */

static inline int ecx_open(const char *path, int flags, unsigned int mode) {
    return open(path, flags, (mode_t)mode);
}
static inline int ecx_openat(int dirfd, const char *path, int flags, unsigned int mode) {
    return openat(dirfd, path, flags, (mode_t)mode);
}
static inline int ecx_ioctl_ptr(int fd, unsigned long request, void *arg) {
    return ioctl(fd, request, arg);
}
static inline int ecx_ioctl_val(int fd, unsigned long request, unsigned long arg) {
    return ioctl(fd, request, arg);
}
static inline int ecx_errno(void) { return errno; }
static inline void ecx_set_errno(int e) { errno = e; }
static inline unsigned int ecx_major(dev_t dev) { return major(dev); }
static inline unsigned int ecx_minor(dev_t dev) { return minor(dev); }
static inline long ecx_gettid(void) { return syscall(SYS_gettid); }
static inline int ecx_flock(int fd, int op) { return flock(fd, op); }
/* inotify: IN_UNMOUNT arrives when a superblock is really shut down, also after a lazy umount once
 * the last open file on it is closed. */
static const unsigned int ecx_in_unmount = IN_UNMOUNT;
static const unsigned int ecx_in_ignored = IN_IGNORED;
static const unsigned int ecx_in_onlydir = IN_ONLYDIR;
static inline int ecx_inotify_init(void) { return inotify_init1(IN_CLOEXEC | IN_NONBLOCK); }
static inline int ecx_inotify_add_watch(int fd, const char *path, unsigned int mask) { return inotify_add_watch(fd, path, mask); }
/* Defined in shim.c, which is compiled with _GNU_SOURCE (kept out of this header so its structs match
 * the ones Swift's Glibc module sees). */
int ecx_unshare(int flags);
/** uname(2) release (which = 0) or machine (which = 1) into buf. */
int ecx_uname_field(int which, char *buf, size_t len);
extern const int ecx_o_tmpfile;
extern const int ecx_o_path;
extern const int ecx_o_largefile;
extern const int ecx_clone_newns;
extern const short ecx_posix_spawn_setsid;
/** posix_spawn_file_actions_addclosefrom_np (glibc 2.34+, a GNU extension the Glibc module does
 * not show): the child closes every descriptor from `from` up before exec. */
int ecx_spawn_addclosefrom(void *actions, int from);
int ecx_pipe2(int fds[2], int flags);
/** Whether anyone but the caller's open file description has the file open: takes a write lease
 * (F_SETLEASE F_WRLCK, granted only when `fd` is the file's sole opener) and drops it at once.
 * Returns 0 (sole opener), 1 (others have it open: EAGAIN/EBUSY) or -1 with errno. In shim.c. */
int ecx_file_shared(int fd);
static const int ecx_lock_sh = LOCK_SH;
static const int ecx_lock_ex = LOCK_EX;
static const int ecx_lock_nb = LOCK_NB;
static const int ecx_lock_un = LOCK_UN;

static const int ecx_o_cloexec = O_CLOEXEC;
static const int ecx_o_directory = O_DIRECTORY;
static const int ecx_o_nofollow = O_NOFOLLOW;

/* ---------------------------------------------------------------- statx mount identity, capabilities */

#include <linux/capability.h>

/** The mount id of the mount holding `path` and whether `path` is that mount's root (Linux 5.8+);
 * is_root is -1 when the kernel does not report it. In shim.c (statx needs _GNU_SOURCE). */
int ecx_mount_identity(const char *path, uint64_t *mnt_id, int *is_root);

/** Opens `path` with `flags` (plus O_CLOEXEC) only if no component of it is a symbolic link
 * (openat2 with RESOLVE_NO_SYMLINKS, Linux 5.6+): ELOOP when one is, ENOSYS on older kernels. In shim.c. */
int ecx_open_no_symlinks(const char *path, int flags);
/** The same with a mode for O_CREAT / O_TMPFILE. */
int ecx_open_no_symlinks_mode(const char *path, int flags, unsigned int mode);
/** ecx_mount_identity of `path` relative to `dirfd` ("" with AT_EMPTY_PATH: the descriptor itself);
 * a final symlink is not followed. */
int ecx_mount_identity_at(int dirfd, const char *path, uint64_t *mnt_id, int *is_root);

/** The effective capability set (capget, version 3). */
static inline int ecx_effective_caps(uint64_t *out) {
    struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof(data));
    if (syscall(SYS_capget, &hdr, data) != 0) return -1;
    *out = (uint64_t)data[0].effective | ((uint64_t)data[1].effective << 32);
    return 0;
}

/* ---------------------------------------------------------------- library versions (libcurl, libfuse3) */

/** libcurl, loaded on first use: 0, or -1 with the reason in ecx_curl_load_error(). */
int ecx_curl_load(void);
const char *ecx_curl_load_error(void);
/** "" when libcurl cannot be loaded. */
const char *ecx_curl_version_string(void);
/** NULL when libcurl cannot be loaded. */
void *ecx_curl_easy_init(void);
void ecx_curl_easy_cleanup(void *handle);

/* ---------------------------------------------------------------- unix sockets, descriptor passing */

/** bind/connect an AF_UNIX socket to `path`; "@name" is an abstract address. */
int ecx_unix_bind(int fd, const char *path);
int ecx_unix_connect(int fd, const char *path);
/** sendmsg with `nfds` descriptors (SCM_RIGHTS, at most 253); `path` NULL: the connected peer. */
long ecx_send_fds(int sock, const char *path, const void *buf, size_t len, const int *fds, int nfds);
/** recvmsg keeping up to `maxfds` received descriptors (close-on-exec), closing any beyond. */
long ecx_recv_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds);
/** The uid of a connected AF_UNIX peer (SO_PEERCRED). */
int ecx_peer_uid(int sock, unsigned *uid);
/** memfd_create(name, MFD_CLOEXEC). */
int ecx_memfd(const char *name);
/** accept4(fd, NULL, NULL, SOCK_CLOEXEC). */
int ecx_accept_cloexec(int fd);

/* ---------------------------------------------------------------- fs-verity */

/** FS_IOC_ENABLE_VERITY on `fd` (opened read-only, no writer anywhere): SHA-256, 4 KiB blocks, no
 * salt — the tree `image verity` builds. 0, or -1 with errno. */
int ecx_fsverity_enable(int fd);
/** FS_IOC_MEASURE_VERITY: the file's fs-verity digest (SHA-256) into `out` (32 bytes). */
int ecx_fsverity_measure(int fd, unsigned char *out);

/* ---------------------------------------------------------------- HTTP transfers (libcurl) */

/** Sees a body in memory grow: its start and how much of it has arrived. */
typedef void (*ecx_body_observer)(void *ctx, const unsigned char *body, size_t received);

/** What one HTTP request produced. `headers` is malloc'd (free with ecx_http_result_free). */
struct ecx_http_result {
    long status;
    int curl_code;
    size_t body_len;
    int body_truncated;
    /* the body could not be written to `body_fd` */
    int body_write_failed;
    char *headers;
    size_t headers_len;
    char error[256];
};

/**
 * One request on a reusable easy handle (connection reuse comes from reusing the handle).
 * `range` ("a-b") may be NULL; `head_only` sends HEAD; the body goes into `body` up to `body_cap`
 * bytes (the transfer is aborted beyond that and body_truncated set). `headers` is an array of
 * "Name: value" strings. Timeouts: connect and low-speed limits derived from `timeout_ms`; the whole
 * transfer ends after `deadline_ms` (0: none). `body_fd` >= 0 streams the body into that file
 * (pwrite from `body_fd_offset` on, still bounded by `body_cap`; `body` may then be NULL).
 * `observer` (may be NULL) is called with `body` and the length received so far after each piece
 * kept in memory, so the caller can work on a body while the rest is still arriving.
 */
int ecx_http_request(CURL *handle, const char *url, const char *range, int head_only,
                     const char *const *headers, size_t n_headers,
                     unsigned char *body, size_t body_cap, long timeout_ms, long deadline_ms, int body_fd,
                     long long body_fd_offset, ecx_body_observer observer, void *observer_ctx,
                     struct ecx_http_result *result);
/**
 * A request with `method` ("PUT", "POST", "DELETE") whose body is `upload_len` bytes of `upload_fd`
 * read from offset 0 (-1: an empty body); the response body as for ecx_http_request.
 */
int ecx_http_send(CURL *handle, const char *url, const char *method, const char *const *headers, size_t n_headers,
                  int upload_fd, long long upload_len, unsigned char *body, size_t body_cap, long timeout_ms,
                  struct ecx_http_result *result);
void ecx_http_result_free(struct ecx_http_result *result);

/* ---------------------------------------------------------------- EROFS decompression helpers */

static const int ecx_lzma_ok = LZMA_OK;
static const int ecx_lzma_stream_end = LZMA_STREAM_END;

/** Raw MicroLZMA/LZMA1 stream decoder as EROFS uses it (lzma_microlzma_decoder, liblzma ≥ 5.3.3). */
int ecx_microlzma_decode(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len,
                         uint32_t dict_size, size_t *produced);

/** Raw DEFLATE (no zlib header) into a fixed buffer; returns bytes produced or a negative zlib code. */
long ecx_raw_inflate(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len);

/* ---------------------------------------------------------------- the Debian libraries, loaded on first use
 * Every call into libkmod, libblkid, libfuse3, liblz4, liblzma, libzstd and zlib goes through these
 * ecx_ wrappers, which dlopen the library by SONAME the first time one of its functions is needed:
 * a command that needs none of them (a mount handed to the daemon, status, umount) does not load
 * them at start. A library that cannot be loaded ends the process with one line naming it and the
 * Debian package to install. */
struct kmod_ctx *ecx_kmod_new(const char *dirname, const char *const *config_paths);
struct kmod_ctx *ecx_kmod_unref(struct kmod_ctx *ctx);
int ecx_kmod_load_resources(struct kmod_ctx *ctx);
int ecx_kmod_module_new_from_name(struct kmod_ctx *ctx, const char *name, struct kmod_module **mod);
struct kmod_module *ecx_kmod_module_unref(struct kmod_module *mod);
const char *ecx_kmod_module_get_path(const struct kmod_module *mod);
int ecx_kmod_module_get_initstate(const struct kmod_module *mod);
blkid_probe ecx_blkid_new_probe(void);
void ecx_blkid_free_probe(blkid_probe pr);
int ecx_blkid_probe_set_device(blkid_probe pr, int fd, blkid_loff_t off, blkid_loff_t size);
int ecx_blkid_probe_enable_superblocks(blkid_probe pr, int enable);
int ecx_blkid_probe_set_superblocks_flags(blkid_probe pr, int flags);
int ecx_blkid_probe_filter_superblocks_type(blkid_probe pr, int flag, char *names[]);
int ecx_blkid_do_safeprobe(blkid_probe pr);
int ecx_blkid_probe_lookup_value(blkid_probe pr, const char *name, const char **data, size_t *len);
int ecx_blkid_get_library_version(const char **ver_string, const char **date_string);
int ecx_libfuse_version(void);
const char *ecx_libfuse_pkgversion(void);
int ecx_LZ4_decompress_safe_partial(const char *src, char *dst, int src_size, int target_output_size, int dst_capacity);
unsigned ecx_ZSTD_isError(size_t code);
unsigned long long ecx_ZSTD_getFrameContentSize(const void *src, size_t src_size);
const char *ecx_ZSTD_getErrorName(size_t code);
size_t ecx_ZSTD_decompress(void *dst, size_t dst_capacity, const void *src, size_t compressed_size);
int ecx_inflateInit2_(z_streamp strm, int window_bits, const char *version, int stream_size);
int ecx_inflate(z_streamp strm, int flush);
int ecx_inflateEnd(z_streamp strm);

/* ---------------------------------------------------------------- libblkid / libkmod */

#ifndef BLKID_SUBLKS_FSINFO
#define BLKID_SUBLKS_FSINFO (1 << 11)
#endif
static const int ecx_blkid_sublks_flags =
    BLKID_SUBLKS_LABEL | BLKID_SUBLKS_UUID | BLKID_SUBLKS_TYPE | BLKID_SUBLKS_VERSION | BLKID_SUBLKS_FSINFO;
static const int ecx_blkid_fltr_onlyin = BLKID_FLTR_ONLYIN;
static const int ecx_kmod_builtin = KMOD_MODULE_BUILTIN;
static const int ecx_kmod_live = KMOD_MODULE_LIVE;
static const int ecx_kmod_coming = KMOD_MODULE_COMING;
static const int ecx_kmod_going = KMOD_MODULE_GOING;

#endif /* ECX_CHEADERS_H */
