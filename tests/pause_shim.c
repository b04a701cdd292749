/* LD_PRELOAD shim that stops the process (raise(SIGSTOP)) at one chosen point, so that a
   test can act while the tool is held there and let it go on with SIGCONT: no test seam in
   the tool, and no sleep that guesses how long a step takes.

   PAUSE_SHIM_ON=stat   PAUSE_SHIM_PATH=P: before the first stat-family call (lstat, stat,
                        fstatat, a name relative to a directory fd included) naming
                        exactly P.
   PAUSE_SHIM_ON=open   PAUSE_SHIM_PATH=P: before the first open or openat naming exactly P
                        (the walk's main process opening a directory to list it).
   PAUSE_SHIM_ON=copy   PAUSE_SHIM_PATH=P: after the first copy_file_range that copied part
                        (not all) of the file P, i.e. with P half copied.

   It stops once per process (a worker process stops itself, not its parent). The test sees
   the stop as state "T" in /proc/PID/stat. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

static int done;

static int on(const char *what) {
    const char *v = getenv("PAUSE_SHIM_ON");
    return !done && v && strcmp(v, what) == 0 && getenv("PAUSE_SHIM_PATH");
}

static void stop_if(const char *what, const char *path) {
    if (on(what) && path && strcmp(path, getenv("PAUSE_SHIM_PATH")) == 0) {
        done = 1;
        raise(SIGSTOP);
    }
}

/* Stop if the call is `what` and p, relative to the directory fd (AT_FDCWD: the working
   directory), is the path. */
static void stop_at(const char *what, int fd, const char *p) {
    char link[64], path[8192];
    ssize_t n;
    if (!on(what) || !p)
        return;
    if (p[0] == '/') {
        stop_if(what, p);
        return;
    }
    if (fd == AT_FDCWD)
        strcpy(link, "/proc/self/cwd");
    else
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, 4096);
    if (n <= 0)
        return;
    path[n] = 0;
    if (*p)
        snprintf(path + n, sizeof path - n, "/%s", p);
    stop_if(what, path);
}

#define PATHSTAT(name) \
    int name(const char *p, void *b) { \
        static int (*real)(const char *, void *); \
        if (!real) real = (int (*)(const char *, void *))dlsym(RTLD_NEXT, #name); \
        stop_at("stat", AT_FDCWD, p); \
        return real(p, b); \
    }
#define FSTATAT(name) \
    int name(int fd, const char *p, void *b, int fl) { \
        static int (*real)(int, const char *, void *, int); \
        if (!real) real = (int (*)(int, const char *, void *, int))dlsym(RTLD_NEXT, #name); \
        stop_at("stat", fd, p); \
        return real(fd, p, b, fl); \
    }
PATHSTAT(lstat)
PATHSTAT(lstat64)
PATHSTAT(stat)
PATHSTAT(stat64)
FSTATAT(fstatat)
FSTATAT(fstatat64)

#define OPENAT(name) \
    int name(int fd, const char *p, int fl, ...) { \
        static int (*real)(int, const char *, int, ...); \
        unsigned mode = 0; \
        va_list ap; \
        va_start(ap, fl); \
        if (fl & (O_CREAT | O_TMPFILE)) mode = va_arg(ap, unsigned); \
        va_end(ap); \
        if (!real) real = (int (*)(int, const char *, int, ...))dlsym(RTLD_NEXT, #name); \
        stop_at("open", fd, p); \
        return real(fd, p, fl, mode); \
    }
#define OPEN(name) \
    int name(const char *p, int fl, ...) { \
        static int (*real)(const char *, int, ...); \
        unsigned mode = 0; \
        va_list ap; \
        va_start(ap, fl); \
        if (fl & (O_CREAT | O_TMPFILE)) mode = va_arg(ap, unsigned); \
        va_end(ap); \
        if (!real) real = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, #name); \
        stop_at("open", AT_FDCWD, p); \
        return real(p, fl, mode); \
    }
OPENAT(openat)
OPENAT(openat64)
OPEN(open)
OPEN(open64)

ssize_t copy_file_range(int in, loff_t *inoff, int out, loff_t *outoff, size_t len,
                        unsigned flags) {
    static ssize_t (*real)(int, loff_t *, int, loff_t *, size_t, unsigned);
    char link[64], path[4096];
    ssize_t n, r;
    off_t at, size;
    if (!real)
        real = (ssize_t (*)(int, loff_t *, int, loff_t *, size_t, unsigned))dlsym(
            RTLD_NEXT, "copy_file_range");
    r = real(in, inoff, out, outoff, len, flags);
    if (r > 0 && on("copy")) {
        snprintf(link, sizeof link, "/proc/self/fd/%d", in);
        n = readlink(link, path, sizeof path - 1);
        path[n < 0 ? 0 : n] = 0;
        at = lseek(in, 0, SEEK_CUR);
        size = lseek(in, 0, SEEK_END);
        lseek(in, at, SEEK_SET);
        if (n > 0 && inoff && *inoff < size)
            stop_if("copy", path);
    }
    return r;
}
