/* LD_PRELOAD latency shim: sleeps BENCH_SHIM_DELAY_US microseconds in every stat-family
   and utimensat call whose target lies under BENCH_SHIM_PREFIX (one path, or several
   separated by ':'; every call when it is unset), then calls the real function. With
   BENCH_SHIM_OPENS=1 it delays the calls a copy makes there too: open and openat (creates
   included), mkdir, rename; without it those are only counted, as passed. With BENCH_SHIM_COUNTS=FILE it counts calls per
   symbol, delayed and passed, as 2 x I_N unsigned 64-bit integers in FILE, mapped shared:
   processes forked from the tool (which may leave through _exit) add to the same counters.
   It declares nothing from <sys/stat.h>: older glibc headers define lstat & co. as inline
   wrappers, which would clash with these definitions. */
#define _GNU_SOURCE
#undef _FORTIFY_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define SHIM_AT_FDCWD (-100)
#include "shim_table.h"  /* from bench.py: I_N, SHIM_NAMES, SHIM_WRAPPERS */

static const char *names[I_N] = {SHIM_NAMES};
static void *real[I_N];
static uint64_t local_counts[2 * I_N];
static uint64_t *counts = local_counts;  /* [2i] delayed, [2i+1] passed */
static long long delay_ns = 500000;
#define MAX_PREFIXES 8
static char prefix_buf[4096];
static const char *prefixes[MAX_PREFIXES];
static size_t prefix_lens[MAX_PREFIXES];
static int n_prefixes, delay_opens;

__attribute__((constructor)) static void shim_init(void) {
    const char *us = getenv("BENCH_SHIM_DELAY_US"), *p = getenv("BENCH_SHIM_PREFIX");
    const char *path = getenv("BENCH_SHIM_COUNTS");
    void *m;
    int fd;
    if (us)
        delay_ns = (long long)(atof(us) * 1000.0);
    if (p && strlen(p) < sizeof prefix_buf) {  /* real paths: no trailing '/' */
        char *q = strcpy(prefix_buf, p), *end;
        for (; q && *q && n_prefixes < MAX_PREFIXES; q = end ? end + 1 : NULL) {
            end = strchr(q, ':');
            if (end)
                *end = 0;
            prefixes[n_prefixes] = q;
            prefix_lens[n_prefixes++] = strlen(q);
        }
    }
    delay_opens = getenv("BENCH_SHIM_OPENS") && atoi(getenv("BENCH_SHIM_OPENS")) > 0;
    if (path && *path && (fd = open(path, O_RDWR | O_CLOEXEC)) >= 0) {
        m = ftruncate(fd, sizeof local_counts) ? MAP_FAILED : mmap(
            NULL, sizeof local_counts, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m != MAP_FAILED)
            counts = (uint64_t *)m;
        close(fd);
    }
}

static void *resolve(int i) {
    static const char *versions[] = {"GLIBC_2.2.5", "GLIBC_2.4", "GLIBC_2.0"};
    unsigned v;
    if (real[i] == NULL)
        real[i] = dlsym(RTLD_NEXT, names[i]);
    for (v = 0; real[i] == NULL && v < 3; v++)
        real[i] = dlvsym(RTLD_NEXT, names[i], versions[v]);
    return real[i];
}

/* Whether the call's target, or for a relative path its directory, is under the prefix. */
static int wanted(int dirfd, const char *path) {
    char buf[4096], link[64] = "/proc/self/cwd";
    const char *dir = path;
    ssize_t n;
    int r = 0, k, saved = errno;
    if (delay_ns <= 0 || n_prefixes == 0)
        return delay_ns > 0;
    if (!path || path[0] != '/') {
        if (dirfd != SHIM_AT_FDCWD)
            snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
        n = readlink(link, buf, sizeof buf - 1);
        buf[n < 0 ? 0 : n] = 0;
        dir = n < 0 ? NULL : buf;
    }
    for (k = 0; dir && !r && k < n_prefixes; k++)
        r = strncmp(dir, prefixes[k], prefix_lens[k]) == 0
            && (dir[prefix_lens[k]] == 0 || dir[prefix_lens[k]] == '/');
    errno = saved;
    return r;
}

static void gate(int i, int dirfd, const char *path) {
    int hit = wanted(dirfd, path), saved = errno;
    if (i >= I_FIRST_OPEN && !delay_opens)
        hit = 0;
    struct timespec t = {(time_t)(delay_ns / 1000000000LL), (long)(delay_ns % 1000000000LL)};
    while (hit && nanosleep(&t, &t) == -1 && errno == EINTR)
        ;
    errno = saved;
    __atomic_fetch_add(&counts[2 * i + !hit], 1, __ATOMIC_RELAXED);
}

/* One wrapper per symbol: params is its parameter list, args the call passing them on. */
#define WRAP(i, name, params, dirfd, args) \
    int name params { \
        if (resolve(i) == NULL) { errno = ENOSYS; return -1; } \
        gate(i, dirfd, p); \
        return ((int (*) params)real[i]) args; \
    }
#define AT(i, name) WRAP(i, name, (int fd, const char *p, void *b, int fl), fd, (fd, p, b, fl))
#define XAT(i, name) \
    WRAP(i, name, (int v, int fd, const char *p, void *b, int fl), fd, (v, fd, p, b, fl))
#define PATH(i, name) WRAP(i, name, (const char *p, void *b), SHIM_AT_FDCWD, (p, b))
#define XPATH(i, name) WRAP(i, name, (int v, const char *p, void *b), SHIM_AT_FDCWD, (v, p, b))
#define STATX(i, name) \
    WRAP(i, name, (int fd, const char *p, int fl, unsigned m, void *b), fd, (fd, p, fl, m, b))
#define UTIMENSAT(i, name) \
    WRAP(i, name, (int fd, const char *p, const void *t, int fl), fd, (fd, p, t, fl))
/* The calls of a copy (delayed only with BENCH_SHIM_OPENS=1). open's mode is variadic:
   passed on as read when the flags create (O_CREAT, O_TMPFILE), else 0. */
#define WANTS_MODE(fl) (((fl) & O_CREAT) || ((fl) & O_TMPFILE) == O_TMPFILE)
#define OPEN(i, name) \
    int name(const char *p, int fl, ...) { \
        unsigned m = 0; \
        if (WANTS_MODE(fl)) { va_list ap; va_start(ap, fl); m = va_arg(ap, unsigned); va_end(ap); } \
        if (resolve(i) == NULL) { errno = ENOSYS; return -1; } \
        gate(i, SHIM_AT_FDCWD, p); \
        return ((int (*)(const char *, int, ...))real[i])(p, fl, m); \
    }
#define OPENAT(i, name) \
    int name(int fd, const char *p, int fl, ...) { \
        unsigned m = 0; \
        if (WANTS_MODE(fl)) { va_list ap; va_start(ap, fl); m = va_arg(ap, unsigned); va_end(ap); } \
        if (resolve(i) == NULL) { errno = ENOSYS; return -1; } \
        gate(i, fd, p); \
        return ((int (*)(int, const char *, int, ...))real[i])(fd, p, fl, m); \
    }
#define MKDIR(i, name) WRAP(i, name, (const char *p, unsigned m), SHIM_AT_FDCWD, (p, m))
#define MKDIRAT(i, name) WRAP(i, name, (int fd, const char *p, unsigned m), fd, (fd, p, m))
#define RENAME(i, name) WRAP(i, name, (const char *p, const char *n), SHIM_AT_FDCWD, (p, n))
#define RENAMEAT(i, name) \
    WRAP(i, name, (int fd, const char *p, int nfd, const char *n), fd, (fd, p, nfd, n))
#define RENAMEAT2(i, name) \
    WRAP(i, name, (int fd, const char *p, int nfd, const char *n, unsigned fl), fd, \
         (fd, p, nfd, n, fl))

SHIM_WRAPPERS
