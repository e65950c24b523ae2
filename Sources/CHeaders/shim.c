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
    struct statx st;
    memset(&st, 0, sizeof(st));
    if (statx(AT_FDCWD, path, 0, STATX_MNT_ID, &st) != 0) return -1;
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

int ecx_open_path_no_symlinks(const char *path) {
    struct ecx_open_how how = { O_PATH | O_CLOEXEC, 0, RESOLVE_NO_SYMLINKS };
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
};

static size_t ecx_write_cb(char *ptr, size_t size, size_t nmemb, void *userdata) {
    struct ecx_sink *s = userdata;
    size_t n = size * nmemb;
    if (s->len + n > s->cap) {
        s->truncated = 1;
        return 0; /* aborts the transfer: more than the caller asked for */
    }
    memcpy(s->body + s->len, ptr, n);
    s->len += n;
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

int ecx_http_request(CURL *h, const char *url, const char *range, int head_only,
                     const char *const *headers, size_t n_headers,
                     unsigned char *body, size_t body_cap, long timeout_ms,
                     struct ecx_http_result *result) {
    struct ecx_sink sink = { body, body_cap, 0, 0, NULL, 0, 0 };
    struct curl_slist *list = NULL;
    for (size_t i = 0; i < n_headers; i++) list = curl_slist_append(list, headers[i]);
    memset(result, 0, sizeof(*result));
    char errbuf[CURL_ERROR_SIZE];
    errbuf[0] = 0;
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_RANGE, range);
    curl_easy_setopt(h, CURLOPT_NOBODY, head_only ? 1L : 0L);
    curl_easy_setopt(h, CURLOPT_HTTPGET, head_only ? 0L : 1L);
    if (head_only) curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, list);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, ecx_write_cb);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &sink);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, ecx_header_cb);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, &sink);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(h, CURLOPT_MAXREDIRS, 8L);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 2L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms < 10000 ? timeout_ms : 10000L);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, (timeout_ms + 999) / 1000);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 0L);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    CURLcode rc = curl_easy_perform(h);
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &result->status);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, NULL);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, NULL);
    curl_easy_setopt(h, CURLOPT_RANGE, NULL);
    curl_slist_free_all(list);
    result->curl_code = (int)rc;
    result->body_len = sink.len;
    result->body_truncated = sink.truncated;
    result->headers = sink.headers;
    result->headers_len = sink.headers_len;
    snprintf(result->error, sizeof(result->error), "%s", errbuf[0] ? errbuf : curl_easy_strerror(rc));
    return (int)rc;
}

void ecx_http_result_free(struct ecx_http_result *result) {
    free(result->headers);
    result->headers = NULL;
}
