/* The parts of the C boundary that need _GNU_SOURCE. The header stays free of it so that struct
 * layouts seen through CHeaders match those of Swift's Glibc module. */
#define _GNU_SOURCE 1
#include <fcntl.h>
#include <sched.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <stdio.h>
#include "CHeaders.h"

const int ecx_o_tmpfile = O_TMPFILE;
const int ecx_o_path = O_PATH;
const int ecx_o_largefile = O_LARGEFILE;
const int ecx_clone_newns = CLONE_NEWNS;
#include <spawn.h>
const short ecx_posix_spawn_setsid = POSIX_SPAWN_SETSID;

int ecx_spawn_addclosefrom(void *actions, int from) {
    return posix_spawn_file_actions_addclosefrom_np((posix_spawn_file_actions_t *)actions, from);
}
int ecx_pipe2(int fds[2], int flags) { return pipe2(fds, flags); }

int ecx_unshare(int flags) { return unshare(flags); }

#include <errno.h>
int ecx_file_shared(int fd) {
    if (fcntl(fd, F_SETLEASE, F_WRLCK) == 0) {
        fcntl(fd, F_SETLEASE, F_UNLCK);
        return 0;
    }
    return (errno == EAGAIN || errno == EBUSY) ? 1 : -1;
}

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
    return ecx_mount_identity_at(AT_FDCWD, path, mnt_id, is_root);
}

int ecx_mount_identity_at(int dirfd, const char *path, uint64_t *mnt_id, int *is_root) {
    struct statx st;
    memset(&st, 0, sizeof(st));
    int flags = (path[0] == 0 ? AT_EMPTY_PATH : 0) | AT_SYMLINK_NOFOLLOW;
    if (statx(dirfd, path, flags, STATX_MNT_ID, &st) != 0) return -1;
    *mnt_id = (st.stx_mask & STATX_MNT_ID) ? st.stx_mnt_id : 0;
    *is_root = (st.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT) ? ((st.stx_attributes & STATX_ATTR_MOUNT_ROOT) != 0) : -1;
    return 0;
}

#include <sys/syscall.h>
#include <unistd.h>
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#ifndef RESOLVE_NO_SYMLINKS
#define RESOLVE_NO_SYMLINKS 0x04
#endif
/* struct open_how (linux/openat2.h, Linux 5.6): declared here for older headers. */
struct ecx_open_how { uint64_t flags; uint64_t mode; uint64_t resolve; };

int ecx_open_no_symlinks(const char *path, int flags) {
    return ecx_open_no_symlinks_mode(path, flags, 0);
}

int ecx_open_no_symlinks_mode(const char *path, int flags, unsigned int mode) {
    /* openat2 refuses a mode without O_CREAT/O_TMPFILE. */
    uint64_t m = (flags & (O_CREAT | __O_TMPFILE)) ? mode : 0;
    struct ecx_open_how how = { (uint64_t)(flags | O_CLOEXEC), m, RESOLVE_NO_SYMLINKS };
    return (int)syscall(SYS_openat2, AT_FDCWD, path, &how, sizeof(how));
}

/* ---------------------------------------------------------------- HTTP transfers */

#include <stdlib.h>

struct ecx_sink {
    unsigned char *body;
    size_t cap;
    size_t len;
    int truncated;
    char *headers;
    size_t headers_len;
    size_t headers_cap;
    /* >= 0: the body is written to this file from `fd_base` on instead of into `body` (never held
     * in memory); `cap` still bounds it. */
    int fd;
    int write_failed;
    long long fd_base;
    ecx_body_observer observer;
    void *observer_ctx;
};

static size_t ecx_write_cb(char *ptr, size_t size, size_t nmemb, void *userdata) {
    struct ecx_sink *s = userdata;
    size_t n = size * nmemb;
    if (s->len + n > s->cap) {
        s->truncated = 1;
        return 0; /* aborts the transfer: more than the caller asked for */
    }
    if (s->fd >= 0) {
        size_t done = 0;
        while (done < n) {
            ssize_t w = pwrite(s->fd, ptr + done, n - done, (off_t)(s->fd_base + (long long)(s->len + done)));
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) { s->write_failed = 1; return 0; }
            done += (size_t)w;
        }
        s->len += n;
        return n;
    }
    memcpy(s->body + s->len, ptr, n);
    s->len += n;
    if (s->observer) s->observer(s->observer_ctx, s->body, s->len);
    return n;
}

static size_t ecx_header_cb(char *ptr, size_t size, size_t nmemb, void *userdata) {
    struct ecx_sink *s = userdata;
    size_t n = size * nmemb;
    if (s->headers_len + n + 1 > s->headers_cap) {
        size_t cap = (s->headers_cap ? s->headers_cap * 2 : 4096);
        while (cap < s->headers_len + n + 1) cap *= 2;
        char *p = realloc(s->headers, cap);
        if (!p) return 0;
        s->headers = p;
        s->headers_cap = cap;
    }
    memcpy(s->headers + s->headers_len, ptr, n);
    s->headers_len += n;
    s->headers[s->headers_len] = 0;
    return n;
}

/* libcurl is loaded on first use (dlopen), not at exec: with its ~30 dependencies it is most of
 * what a cold start of this binary spends in the dynamic loader, and commands that do no HTTP
 * (status, umount, a mount handed to the daemon) should not pay for it. */
#include <dlfcn.h>
#include <pthread.h>

/* `symbol` of the library `soname` after dlopen'ing it (a library already loaded is found again by
 * dlopen itself; every caller caches the pointer), or NULL with the reason in `err`. */
static void *ecx_try_symbol(const char *soname, const char *symbol, char *err, size_t errlen) {
    void *handle = dlopen(soname, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        snprintf(err, errlen, "%s", dlerror());
        return NULL;
    }
    void *fn = dlsym(handle, symbol);
    if (!fn) snprintf(err, errlen, "%s lacks %s", soname, symbol);
    return fn;
}

static struct {
    CURLcode (*global_init)(long);
    CURL *(*easy_init)(void);
    void (*easy_cleanup)(CURL *);
    CURLcode (*easy_setopt)(CURL *, CURLoption, ...);
    CURLcode (*easy_perform)(CURL *);
    CURLcode (*easy_getinfo)(CURL *, CURLINFO, ...);
    const char *(*easy_strerror)(CURLcode);
    struct curl_slist *(*slist_append)(struct curl_slist *, const char *);
    void (*slist_free_all)(struct curl_slist *);
    curl_version_info_data *(*version_info)(CURLversion);
} ecx_curl;
static char ecx_curl_error[256];
static int ecx_curl_ok;
static pthread_once_t ecx_curl_once = PTHREAD_ONCE_INIT;

static void ecx_curl_load_once(void) {
    /* libcurl's SONAME has been libcurl.so.4 since 7.16 (2006), whatever its TLS backend. */
#define ECX_SYM(field, name) \
    if (!(*(void **)&ecx_curl.field = ecx_try_symbol("libcurl.so.4", name, ecx_curl_error, sizeof(ecx_curl_error)))) return;
    ECX_SYM(global_init, "curl_global_init")
    ECX_SYM(easy_init, "curl_easy_init")
    ECX_SYM(easy_cleanup, "curl_easy_cleanup")
    ECX_SYM(easy_setopt, "curl_easy_setopt")
    ECX_SYM(easy_perform, "curl_easy_perform")
    ECX_SYM(easy_getinfo, "curl_easy_getinfo")
    ECX_SYM(easy_strerror, "curl_easy_strerror")
    ECX_SYM(slist_append, "curl_slist_append")
    ECX_SYM(slist_free_all, "curl_slist_free_all")
    ECX_SYM(version_info, "curl_version_info")
#undef ECX_SYM
    if (ecx_curl.global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        snprintf(ecx_curl_error, sizeof(ecx_curl_error), "curl_global_init failed");
        return;
    }
    ecx_curl_ok = 1;
}

int ecx_curl_load(void) {
    pthread_once(&ecx_curl_once, ecx_curl_load_once);
    return ecx_curl_ok ? 0 : -1;
}

const char *ecx_curl_load_error(void) { return ecx_curl_error; }

void *ecx_curl_easy_init(void) { return ecx_curl_load() == 0 ? ecx_curl.easy_init() : NULL; }

void ecx_curl_easy_cleanup(void *handle) {
    if (handle && ecx_curl_ok) ecx_curl.easy_cleanup(handle);
}

const char *ecx_curl_version_string(void) {
    if (ecx_curl_load() != 0) return "";
    const curl_version_info_data *d = ecx_curl.version_info(CURLVERSION_NOW);
    return d ? d->version : "";
}

/* What every request sets: where, headers, sinks, limits, TLS and redirect rules. */
static void ecx_http_common(CURL *h, const char *url, struct curl_slist *list, struct ecx_sink *sink,
                            char *errbuf, long timeout_ms, long deadline_ms) {
    ecx_curl.easy_setopt(h, CURLOPT_URL, url);
    ecx_curl.easy_setopt(h, CURLOPT_HTTPHEADER, list);
    ecx_curl.easy_setopt(h, CURLOPT_WRITEFUNCTION, ecx_write_cb);
    ecx_curl.easy_setopt(h, CURLOPT_WRITEDATA, sink);
    ecx_curl.easy_setopt(h, CURLOPT_HEADERFUNCTION, ecx_header_cb);
    ecx_curl.easy_setopt(h, CURLOPT_HEADERDATA, sink);
    ecx_curl.easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    ecx_curl.easy_setopt(h, CURLOPT_FOLLOWLOCATION, 1L);
    ecx_curl.easy_setopt(h, CURLOPT_MAXREDIRS, 8L);
    ecx_curl.easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    /* Receive in 512 KiB pieces (libcurl's largest; its default is 16 KiB): a blob streams through
     * 32x fewer recv calls, write callbacks and pwrites. `nbdcopy` of a cold 256 MiB export over
     * docker-registry: 598 -> 517 ms, medians of 7 alternating runs (128 KiB: 548 ms). */
    ecx_curl.easy_setopt(h, CURLOPT_BUFFERSIZE, 512L * 1024);
    ecx_curl.easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 1L);
    ecx_curl.easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 2L);
    ecx_curl.easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms < 10000 ? timeout_ms : 10000L);
    ecx_curl.easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
    ecx_curl.easy_setopt(h, CURLOPT_LOW_SPEED_TIME, (timeout_ms + 999) / 1000);
    ecx_curl.easy_setopt(h, CURLOPT_TIMEOUT_MS, deadline_ms > 0 ? deadline_ms : 0L);
    ecx_curl.easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    /* A redirect never downgrades: from an https URL only to https (a plain http URL was allowed
     * by the caller's own rules, e.g. a loopback registry). */
    ecx_curl.easy_setopt(h, CURLOPT_REDIR_PROTOCOLS_STR, strncmp(url, "https:", 6) == 0 ? "https" : "http,https");
}

/* Performs the request set up on `h`, fills `result` and resets what must not leak into the
 * handle's next request. */
static int ecx_http_finish(CURL *h, struct curl_slist *list, struct ecx_sink *sink, const char *errbuf,
                           struct ecx_http_result *result) {
    CURLcode rc = ecx_curl.easy_perform(h);
    ecx_curl.easy_getinfo(h, CURLINFO_RESPONSE_CODE, &result->status);
    ecx_curl.easy_setopt(h, CURLOPT_HTTPHEADER, NULL);
    ecx_curl.easy_setopt(h, CURLOPT_ERRORBUFFER, NULL);
    ecx_curl.easy_setopt(h, CURLOPT_RANGE, NULL);
    ecx_curl.easy_setopt(h, CURLOPT_CUSTOMREQUEST, NULL);
    ecx_curl.easy_setopt(h, CURLOPT_UPLOAD, 0L);
    ecx_curl.slist_free_all(list);
    result->curl_code = (int)rc;
    result->body_len = sink->len;
    result->body_truncated = sink->truncated;
    result->body_write_failed = sink->write_failed;
    result->headers = sink->headers;
    result->headers_len = sink->headers_len;
    snprintf(result->error, sizeof(result->error), "%s", errbuf[0] ? errbuf : ecx_curl.easy_strerror(rc));
    return (int)rc;
}

int ecx_http_request(CURL *h, const char *url, const char *range, int head_only,
                     const char *const *headers, size_t n_headers,
                     unsigned char *body, size_t body_cap, long timeout_ms, long deadline_ms, int body_fd,
                     long long body_fd_offset, ecx_body_observer observer, void *observer_ctx,
                     struct ecx_http_result *result) {
    struct ecx_sink sink = { body, body_cap, 0, 0, NULL, 0, 0, body_fd, 0, body_fd_offset, observer, observer_ctx };
    struct curl_slist *list = NULL;
    for (size_t i = 0; i < n_headers; i++) list = ecx_curl.slist_append(list, headers[i]);
    memset(result, 0, sizeof(*result));
    char errbuf[CURL_ERROR_SIZE];
    errbuf[0] = 0;
    ecx_http_common(h, url, list, &sink, errbuf, timeout_ms, deadline_ms);
    ecx_curl.easy_setopt(h, CURLOPT_RANGE, range);
    ecx_curl.easy_setopt(h, CURLOPT_NOBODY, head_only ? 1L : 0L);
    ecx_curl.easy_setopt(h, CURLOPT_HTTPGET, head_only ? 0L : 1L);
    if (head_only) ecx_curl.easy_setopt(h, CURLOPT_NOBODY, 1L);
    return ecx_http_finish(h, list, &sink, errbuf, result);
}

/* The body of an upload, read from a file. */
struct ecx_source {
    int fd;
    long long off;
    long long len;
};

static size_t ecx_read_cb(char *buf, size_t size, size_t nitems, void *userdata) {
    struct ecx_source *s = userdata;
    size_t want = size * nitems;
    if ((long long)want > s->len - s->off) want = (size_t)(s->len - s->off);
    if (want == 0) return 0;
    ssize_t r;
    do { r = pread(s->fd, buf, want, (off_t)s->off); } while (r < 0 && errno == EINTR);
    if (r <= 0) return CURL_READFUNC_ABORT;
    s->off += r;
    return (size_t)r;
}

int ecx_http_send(CURL *h, const char *url, const char *method, const char *const *headers, size_t n_headers,
                  int upload_fd, long long upload_len, unsigned char *body, size_t body_cap, long timeout_ms,
                  struct ecx_http_result *result) {
    struct ecx_sink sink = { body, body_cap, 0, 0, NULL, 0, 0, -1, 0 };
    struct ecx_source source = { upload_fd, 0, upload_len };
    struct curl_slist *list = NULL;
    for (size_t i = 0; i < n_headers; i++) list = ecx_curl.slist_append(list, headers[i]);
    /* No "Expect: 100-continue" round trip before a body. */
    list = ecx_curl.slist_append(list, "Expect:");
    memset(result, 0, sizeof(*result));
    char errbuf[CURL_ERROR_SIZE];
    errbuf[0] = 0;
    ecx_http_common(h, url, list, &sink, errbuf, timeout_ms, 0);
    ecx_curl.easy_setopt(h, CURLOPT_NOBODY, 0L);
    ecx_curl.easy_setopt(h, CURLOPT_UPLOAD, 1L);
    ecx_curl.easy_setopt(h, CURLOPT_READFUNCTION, ecx_read_cb);
    ecx_curl.easy_setopt(h, CURLOPT_READDATA, &source);
    ecx_curl.easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t)(upload_fd >= 0 ? upload_len : 0));
    ecx_curl.easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
    return ecx_http_finish(h, list, &sink, errbuf, result);
}

void ecx_http_result_free(struct ecx_http_result *result) {
    free(result->headers);
    result->headers = NULL;
}

/* ---------------------------------------------------------------- unix sockets, descriptor passing */
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* "@name" is an abstract address (as in $NOTIFY_SOCKET); returns the address length or -1. */
static int ecx_sockaddr(const char *path, struct sockaddr_un *sa) {
    size_t n = strlen(path);
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    if (n == 0 || n >= sizeof(sa->sun_path)) { errno = ENAMETOOLONG; return -1; }
    memcpy(sa->sun_path, path, n);
    if (path[0] == '@') sa->sun_path[0] = 0;
    return (int)(offsetof(struct sockaddr_un, sun_path) + n + (path[0] == '@' ? 0 : 1));
}

int ecx_unix_bind(int fd, const char *path) {
    struct sockaddr_un sa;
    int len = ecx_sockaddr(path, &sa);
    return len < 0 ? -1 : bind(fd, (struct sockaddr *)&sa, (socklen_t)len);
}

int ecx_unix_connect(int fd, const char *path) {
    struct sockaddr_un sa;
    int len = ecx_sockaddr(path, &sa);
    return len < 0 ? -1 : connect(fd, (struct sockaddr *)&sa, (socklen_t)len);
}

long ecx_send_fds(int sock, const char *path, const void *buf, size_t len, const int *fds, int nfds) {
    struct sockaddr_un sa;
    int salen = 0;
    if (path && (salen = ecx_sockaddr(path, &sa)) < 0) return -1;
    struct iovec iov = { (void *)buf, len };
    union { char buf[CMSG_SPACE(sizeof(int) * 253)]; struct cmsghdr align; } control;
    if (nfds < 0 || nfds > 253) { errno = EINVAL; return -1; }
    struct msghdr msg = { 0 };
    msg.msg_name = path ? &sa : NULL;
    msg.msg_namelen = (socklen_t)salen;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (nfds > 0) {
        memset(&control, 0, sizeof(control));
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    }
    return (long)sendmsg(sock, &msg, MSG_NOSIGNAL);
}

long ecx_recv_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds) {
    struct iovec iov = { buf, len };
    union { char buf[CMSG_SPACE(sizeof(int) * 253)]; struct cmsghdr align; } control;
    struct msghdr msg = { 0 };
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof(control.buf);
    *nfds = 0;
    long n = (long)recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0) return n;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *in = (int *)CMSG_DATA(c);
        for (int i = 0; i < count; i++) {
            if (*nfds < maxfds) fds[(*nfds)++] = in[i];
            else close(in[i]);
        }
    }
    return n;
}

int ecx_peer_uid(int sock, unsigned *uid) {
    struct ucred cred;
    socklen_t len = sizeof(cred);
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return -1;
    *uid = cred.uid;
    return 0;
}

int ecx_memfd(const char *name) { return memfd_create(name, MFD_CLOEXEC); }

int ecx_accept_cloexec(int fd) { return accept4(fd, NULL, NULL, SOCK_CLOEXEC); }

/* ---------------------------------------------------------------- the Debian libraries, loaded on first use */
#include <stdatomic.h>

/* The same for a library the command cannot do without: a missing library or symbol ends the process
 * with one line (the install is broken). */
static void *ecx_symbol(const char *soname, const char *package, const char *symbol) {
    char err[256];
    void *fn = ecx_try_symbol(soname, symbol, err, sizeof(err));
    if (!fn) {
        fprintf(stderr, "erofs-compat: cannot load %s (%s): install Debian's %s\n", soname, err, package);
        exit(70);
    }
    return fn;
}

#define ECX_LAZY(soname, package, ret, name, params, args) \
    ret ecx_##name params { \
        static _Atomic(void *) cached; \
        void *fn = atomic_load_explicit(&cached, memory_order_acquire); \
        if (!fn) { \
            fn = ecx_symbol(soname, package, #name); \
            atomic_store_explicit(&cached, fn, memory_order_release); \
        } \
        return ((ret (*) params)fn) args; \
    }

/* Expands the library macros (SONAME, package) before ECX_LAZY splits its arguments. */
#define ECX_L(...) ECX_LAZY(__VA_ARGS__)

#define KMOD "libkmod.so.2", "libkmod2"
ECX_L(KMOD, struct kmod_ctx *, kmod_new, (const char *dirname, const char *const *config_paths), (dirname, config_paths))
ECX_L(KMOD, struct kmod_ctx *, kmod_unref, (struct kmod_ctx *ctx), (ctx))
ECX_L(KMOD, int, kmod_load_resources, (struct kmod_ctx *ctx), (ctx))
ECX_L(KMOD, int, kmod_module_new_from_name, (struct kmod_ctx *ctx, const char *name, struct kmod_module **mod), (ctx, name, mod))
ECX_L(KMOD, struct kmod_module *, kmod_module_unref, (struct kmod_module *mod), (mod))
ECX_L(KMOD, const char *, kmod_module_get_path, (const struct kmod_module *mod), (mod))
ECX_L(KMOD, int, kmod_module_get_initstate, (const struct kmod_module *mod), (mod))

#define BLKID "libblkid.so.1", "libblkid1"
ECX_L(BLKID, blkid_probe, blkid_new_probe, (void), ())
ECX_L(BLKID, void, blkid_free_probe, (blkid_probe pr), (pr))
ECX_L(BLKID, int, blkid_probe_set_device, (blkid_probe pr, int fd, blkid_loff_t off, blkid_loff_t size), (pr, fd, off, size))
ECX_L(BLKID, int, blkid_probe_enable_superblocks, (blkid_probe pr, int enable), (pr, enable))
ECX_L(BLKID, int, blkid_probe_set_superblocks_flags, (blkid_probe pr, int flags), (pr, flags))
ECX_L(BLKID, int, blkid_probe_filter_superblocks_type, (blkid_probe pr, int flag, char *names[]), (pr, flag, names))
ECX_L(BLKID, int, blkid_do_safeprobe, (blkid_probe pr), (pr))
ECX_L(BLKID, int, blkid_probe_lookup_value, (blkid_probe pr, const char *name, const char **data, size_t *len), (pr, name, data, len))
ECX_L(BLKID, int, blkid_get_library_version, (const char **ver_string, const char **date_string), (ver_string, date_string))

#define FUSE3 "libfuse3.so.3", "libfuse3-3"
static ECX_L(FUSE3, int, fuse_version, (void), ())
static ECX_L(FUSE3, const char *, fuse_pkgversion, (void), ())
int ecx_libfuse_version(void) { return ecx_fuse_version(); }
const char *ecx_libfuse_pkgversion(void) { return ecx_fuse_pkgversion(); }

ECX_LAZY("liblz4.so.1", "liblz4-1", int, LZ4_decompress_safe_partial,
         (const char *src, char *dst, int src_size, int target_output_size, int dst_capacity),
         (src, dst, src_size, target_output_size, dst_capacity))

#define ZSTD "libzstd.so.1", "libzstd1"
ECX_L(ZSTD, unsigned, ZSTD_isError, (size_t code), (code))
ECX_L(ZSTD, unsigned long long, ZSTD_getFrameContentSize, (const void *src, size_t src_size), (src, src_size))
ECX_L(ZSTD, const char *, ZSTD_getErrorName, (size_t code), (code))
ECX_L(ZSTD, size_t, ZSTD_decompress, (void *dst, size_t dst_capacity, const void *src, size_t compressed_size),
         (dst, dst_capacity, src, compressed_size))

#define ZLIB "libz.so.1", "zlib1g"
ECX_L(ZLIB, int, inflateInit2_, (z_streamp strm, int window_bits, const char *version, int stream_size),
         (strm, window_bits, version, stream_size))
ECX_L(ZLIB, int, inflate, (z_streamp strm, int flush), (strm, flush))
ECX_L(ZLIB, int, inflateEnd, (z_streamp strm), (strm))

#define LZMA "liblzma.so.5", "liblzma5"
static ECX_L(LZMA, lzma_ret, lzma_microlzma_decoder, (lzma_stream *strm, uint64_t comp_size, uint64_t uncomp_size, lzma_bool uncomp_size_is_exact, uint32_t dict_size),
                (strm, comp_size, uncomp_size, uncomp_size_is_exact, dict_size))
static ECX_L(LZMA, lzma_ret, lzma_code, (lzma_stream *strm, lzma_action action), (strm, action))
static ECX_L(LZMA, void, lzma_end, (lzma_stream *strm), (strm))

int ecx_microlzma_decode(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len,
                         uint32_t dict_size, size_t *produced) {
    lzma_stream strm = LZMA_STREAM_INIT;
    lzma_ret ret = ecx_lzma_microlzma_decoder(&strm, in_len, out_len, 1, dict_size);
    if (ret != LZMA_OK) return (int)ret;
    strm.next_in = in;
    strm.avail_in = in_len;
    strm.next_out = out;
    strm.avail_out = out_len;
    ret = ecx_lzma_code(&strm, LZMA_FINISH);
    *produced = out_len - strm.avail_out;
    ecx_lzma_end(&strm);
    return (ret == LZMA_STREAM_END || ret == LZMA_OK) ? 0 : (int)ret;
}

long ecx_raw_inflate(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len) {
    z_stream s;
    memset(&s, 0, sizeof(s));
    if (ecx_inflateInit2_(&s, -15, ZLIB_VERSION, (int)sizeof(z_stream)) != Z_OK) return -1000;
    s.next_in = (Bytef *)in;
    s.avail_in = (uInt)in_len;
    s.next_out = out;
    s.avail_out = (uInt)out_len;
    int r = ecx_inflate(&s, Z_FINISH);
    long produced = (long)(out_len - s.avail_out);
    ecx_inflateEnd(&s);
    if (r == Z_STREAM_END || r == Z_OK || (r == Z_BUF_ERROR && s.avail_out == 0)) return produced;
    return (long)r;
}

/* ---------------------------------------------------------------- fs-verity */
#include <linux/fsverity.h>
#include <sys/ioctl.h>

int ecx_fsverity_enable(int fd) {
    struct fsverity_enable_arg arg;
    memset(&arg, 0, sizeof(arg));
    arg.version = 1;
    arg.hash_algorithm = FS_VERITY_HASH_ALG_SHA256;
    arg.block_size = 4096;
    return ioctl(fd, FS_IOC_ENABLE_VERITY, &arg);
}

int ecx_fsverity_measure(int fd, unsigned char *out) {
    struct { struct fsverity_digest d; unsigned char buf[64]; } m;
    memset(&m, 0, sizeof(m));
    m.d.digest_size = 64;
    if (ioctl(fd, FS_IOC_MEASURE_VERITY, &m) != 0) return -1;
    if (m.d.digest_algorithm != FS_VERITY_HASH_ALG_SHA256 || m.d.digest_size != 32) { errno = EPROTO; return -1; }
    memcpy(out, m.d.digest, 32);
    return 0;
}
