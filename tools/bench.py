#!/usr/bin/env python3
"""Benchmark scratch_keepalive.py against the floors the project measures it by.

    python3 tools/bench.py                  # default sizes: a few minutes
    python3 tools/bench.py --quick          # small preset, a smoke test
    python3 tools/bench.py --scale 0.1 --json /tmp/bench.json

Standard library only (Python 3.6+); gcc is optional: with it the benchmark
builds a C stat walker (the stat floor), a C atime-reset helper and the
LD_PRELOAD latency shim; without it the stat floor is `find DIR -printf ''`
and the latency simulation is skipped.

What it does, all in a temporary directory under --workdir (default /tmp):

  * builds test trees: wide (200 dirs x 2,500 files), deep (6 levels of
    directories, ~50 entries each), sparse (4 files of 1 TiB apparent size),
    two flat trees of 1M and 100k entries and one directory of 200k entries
    for the memory measurement; --scale F shrinks them, --quick is a small
    preset;
  * times whole processes, interleaved round by round (medians of --repeat
    runs, after one untimed warm-up pass per tree; caches are warm, never
    dropped): tool touch mode with every atime reset to 60 days ago,
    `find DIR -exec touch -a -c -h {} +` (atimes reset the same way first),
    tool --check, the stat floor (C walker: openat/fdopendir/readdir +
    fstatat AT_SYMLINK_NOFOLLOW on every entry), tool touch mode with every
    entry recent (all skipped);
  * peak RSS of each tool process (wait4's ru_maxrss) and the sampled peak
    PSS summed over its process tree (worker processes included), and the
    checkpoint's share of the walk (from the tool's --json "timing"; since no
    timed run lasts a checkpoint interval, one run with --checkpoint-every
    forced short gives the cost of one checkpoint);
  * a latency simulation: an LD_PRELOAD shim adds --latency-ms to every
    stat-family and utimensat call under the latency tree (counting the calls
    in a shared map, so forked workers count too); the baseline is the
    strictly sequential "--threads 1 --workers 1", then --threads and
    --workers 8, 16 and 32;
  * prints a table headed by the machine's description, writes every figure
    to --json FILE, and ends with PASS/FAIL per target (informational: the
    exit status is 0 unless the benchmark itself or a timed command failed).
"""

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "scratch_keepalive.py"
OLD_DAYS = 60                   # "old": atime 60 days ago (the tool's skip threshold is 11)
DAY = 86400
TOOL_CHECKPOINT_S = 30.0        # the tool's default --checkpoint-every
SINGLE_DIR_ENTRIES = 200000     # the one-directory memory tree, before --scale
PARALLEL = (8, 16, 32)          # --threads N and --workers N in the latency runs
PHASES = ("wide", "deep", "sparse", "memory", "latency")

TARGETS = {
    "touch_vs_find": 1.0,       # tool touch <= 1.0x find -exec touch
    "check_vs_walk": 1.5,       # tool check <= 1.5x C stat walk
    "skipped_vs_walk": 1.5,     # tool all-skipped <= 1.5x C stat walk
    "threads_speedup": 10.0,    # >= 10x at 0.5 ms latency
    "rss_mb_1m": 32.0,          # peak RSS <= 32 MB at 1M entries
    "checkpoint_share": 0.02,   # checkpoint <= 2% of the walk
}

CMD_LABELS = [
    ("tool_touch_old", "tool touch, all old"),
    ("find_touch", "find -exec touch -a -c -h {} +"),
    ("tool_check", "tool --check"),
    ("stat_walk", "stat floor"),
    ("tool_touch_recent", "tool touch, all recent"),
]

# ---------------------------------------------------------------- C sources

HELPER_C = r"""
/* bench helper: "walk DIR" stats every entry (fstatat, AT_SYMLINK_NOFOLLOW)
   depth-first without following symlinks; "reset DIR EPOCH" also sets every
   entry's atime to EPOCH (mtime omitted), each directory after its contents
   so that listing it does not move its atime again. Prints "entries errors". */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef O_NOATIME
#define O_NOATIME 0
#endif

static long long n_entries, n_errors;
static int do_reset;
static struct timespec times_[2];
static int noatime = O_NOATIME;

static int open_dir(int dfd, const char *name) {
    int flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC;
    int fd = openat(dfd, name, flags | noatime);
    if (fd < 0 && errno == EPERM && noatime) {
        noatime = 0;
        fd = openat(dfd, name, flags);
    }
    return fd;
}

static void walk(int dfd) {
    DIR *d = fdopendir(dfd);
    struct dirent *e;
    if (d == NULL) {
        n_errors++;
        close(dfd);
        return;
    }
    while ((e = readdir(d)) != NULL) {
        struct stat st;
        int fd = dirfd(d);
        const char *n = e->d_name;
        if (n[0] == '.' && (n[1] == 0 || (n[1] == '.' && n[2] == 0)))
            continue;
        if (fstatat(fd, n, &st, AT_SYMLINK_NOFOLLOW) != 0) {
            n_errors++;
            continue;
        }
        n_entries++;
        if (S_ISDIR(st.st_mode)) {
            int c = open_dir(fd, n);
            if (c < 0)
                n_errors++;
            else
                walk(c);
        }
        if (do_reset && utimensat(fd, n, times_, AT_SYMLINK_NOFOLLOW) != 0)
            n_errors++;
    }
    closedir(d);
}

int main(int argc, char **argv) {
    struct stat st;
    if (argc < 3 || (strcmp(argv[1], "walk") && strcmp(argv[1], "reset"))
        || (!strcmp(argv[1], "reset") && argc < 4)) {
        fprintf(stderr, "usage: %s walk DIR | reset DIR EPOCH\n", argv[0]);
        return 2;
    }
    if (!strcmp(argv[1], "reset")) {
        do_reset = 1;
        times_[0].tv_sec = (time_t)atoll(argv[3]);
        times_[0].tv_nsec = 0;
        times_[1].tv_sec = 0;
        times_[1].tv_nsec = UTIME_OMIT;
    }
    if (lstat(argv[2], &st) != 0) {
        perror(argv[2]);
        return 2;
    }
    n_entries = 1;
    if (S_ISDIR(st.st_mode)) {
        int fd = open_dir(AT_FDCWD, argv[2]);
        if (fd < 0) {
            perror(argv[2]);
            return 2;
        }
        walk(fd);
    }
    if (do_reset && utimensat(AT_FDCWD, argv[2], times_, AT_SYMLINK_NOFOLLOW) != 0)
        n_errors++;
    printf("%lld %lld\n", n_entries, n_errors);
    return n_errors ? 1 : 0;
}
"""

# Order of the shim's counters (must match its enum).
SHIM_NAMES = ["fstatat", "fstatat64", "__fxstatat", "__fxstatat64", "lstat", "lstat64",
              "__lxstat", "__lxstat64", "stat", "stat64", "__xstat", "__xstat64", "statx",
              "utimensat"]

# The shim declares nothing from <sys/stat.h>: older glibc headers define
# lstat & co. as inline wrappers, which would clash with these definitions.
SHIM_C = r"""
/* LD_PRELOAD latency shim: sleeps BENCH_SHIM_DELAY_US microseconds in every
   stat-family and utimensat call whose target lies under BENCH_SHIM_PREFIX
   (every call when it is unset), then calls the real function. With
   BENCH_SHIM_COUNTS=FILE it counts calls per symbol, delayed and passed, as
   2 x I_N unsigned 64-bit integers in FILE, mapped shared: processes forked
   from the tool (which may leave through _exit) add to the same counters. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define SHIM_AT_FDCWD (-100)

enum { I_FSTATAT, I_FSTATAT64, I_FXSTATAT, I_FXSTATAT64, I_LSTAT, I_LSTAT64,
       I_LXSTAT, I_LXSTAT64, I_STAT, I_STAT64, I_XSTAT, I_XSTAT64, I_STATX,
       I_UTIMENSAT, I_N };
static const char *names[I_N] = {
    "fstatat", "fstatat64", "__fxstatat", "__fxstatat64", "lstat", "lstat64",
    "__lxstat", "__lxstat64", "stat", "stat64", "__xstat", "__xstat64", "statx",
    "utimensat" };
static void *real[I_N];
static uint64_t local_counts[2 * I_N];
static uint64_t *counts = local_counts;  /* [2i] delayed, [2i+1] passed */
static long long delay_ns;
static char prefix[4096];
static size_t prefix_len;

__attribute__((constructor)) static void shim_init(void) {
    const char *us = getenv("BENCH_SHIM_DELAY_US");
    const char *p = getenv("BENCH_SHIM_PREFIX");
    delay_ns = us ? (long long)(atof(us) * 1000.0) : 500000;
    if (p && *p && strlen(p) < sizeof prefix) {
        strcpy(prefix, p);
        prefix_len = strlen(prefix);
        while (prefix_len > 1 && prefix[prefix_len - 1] == '/')
            prefix[--prefix_len] = 0;
    }
}

__attribute__((constructor)) static void shim_map_counts(void) {
    const char *path = getenv("BENCH_SHIM_COUNTS");
    size_t size = sizeof local_counts;
    void *m;
    int fd;
    if (!path || !*path)
        return;
    fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return;
    if (ftruncate(fd, (off_t)size) == 0) {
        m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m != MAP_FAILED)
            counts = (uint64_t *)m;
    }
    close(fd);
}

static void *resolve(int i) {
    void *f = real[i];
    if (f == NULL) {
        f = dlsym(RTLD_NEXT, names[i]);
        if (f == NULL)
            f = dlvsym(RTLD_NEXT, names[i], "GLIBC_2.2.5");
        if (f == NULL)
            f = dlvsym(RTLD_NEXT, names[i], "GLIBC_2.4");
        if (f == NULL)
            f = dlvsym(RTLD_NEXT, names[i], "GLIBC_2.0");
        real[i] = f;
    }
    return f;
}

static int under_prefix(const char *p) {
    return strncmp(p, prefix, prefix_len) == 0
        && (p[prefix_len] == 0 || p[prefix_len] == '/' || prefix_len == 1);
}

static int wanted(int dirfd, const char *path) {
    char buf[4096];
    ssize_t n = -1;
    int r = 0, saved = errno;
    if (delay_ns <= 0)
        return 0;
    if (prefix_len == 0)
        return 1;
    if (path && path[0] == '/') {
        r = under_prefix(path);
    } else {
        if (dirfd == SHIM_AT_FDCWD) {
            if (getcwd(buf, sizeof buf))
                n = (ssize_t)strlen(buf);
        } else {
            char lp[64];
            snprintf(lp, sizeof lp, "/proc/self/fd/%d", dirfd);
            n = readlink(lp, buf, sizeof buf - 1);
            if (n >= 0)
                buf[n] = 0;
        }
        if (n >= 0)
            r = under_prefix(buf);
    }
    errno = saved;
    return r;
}

static void gate(int i, int dirfd, const char *path) {
    if (wanted(dirfd, path)) {
        struct timespec t;
        int saved = errno;
        t.tv_sec = (time_t)(delay_ns / 1000000000LL);
        t.tv_nsec = (long)(delay_ns % 1000000000LL);
        while (nanosleep(&t, &t) == -1 && errno == EINTR)
            ;
        errno = saved;
        __atomic_fetch_add(&counts[2 * i], 1, __ATOMIC_RELAXED);
    } else {
        __atomic_fetch_add(&counts[2 * i + 1], 1, __ATOMIC_RELAXED);
    }
}

#define MISSING(i) do { if (resolve(i) == NULL) { errno = ENOSYS; return -1; } } while (0)

typedef int (*at_fn)(int, const char *, void *, int);
typedef int (*xat_fn)(int, int, const char *, void *, int);
typedef int (*path_fn)(const char *, void *);
typedef int (*xpath_fn)(int, const char *, void *);
typedef int (*statx_fn)(int, const char *, int, unsigned int, void *);
typedef int (*utimensat_fn)(int, const char *, const void *, int);

#define AT_WRAP(fname, idx) \
    int fname(int fd, const char *p, void *b, int fl) { \
        MISSING(idx); gate(idx, fd, p); return ((at_fn)real[idx])(fd, p, b, fl); }
#define XAT_WRAP(fname, idx) \
    int fname(int ver, int fd, const char *p, void *b, int fl) { \
        MISSING(idx); gate(idx, fd, p); return ((xat_fn)real[idx])(ver, fd, p, b, fl); }
#define PATH_WRAP(fname, idx) \
    int fname(const char *p, void *b) { \
        MISSING(idx); gate(idx, SHIM_AT_FDCWD, p); return ((path_fn)real[idx])(p, b); }
#define XPATH_WRAP(fname, idx) \
    int fname(int ver, const char *p, void *b) { \
        MISSING(idx); gate(idx, SHIM_AT_FDCWD, p); return ((xpath_fn)real[idx])(ver, p, b); }

AT_WRAP(fstatat, I_FSTATAT)
AT_WRAP(fstatat64, I_FSTATAT64)
XAT_WRAP(__fxstatat, I_FXSTATAT)
XAT_WRAP(__fxstatat64, I_FXSTATAT64)
PATH_WRAP(lstat, I_LSTAT)
PATH_WRAP(lstat64, I_LSTAT64)
XPATH_WRAP(__lxstat, I_LXSTAT)
XPATH_WRAP(__lxstat64, I_LXSTAT64)
PATH_WRAP(stat, I_STAT)
PATH_WRAP(stat64, I_STAT64)
XPATH_WRAP(__xstat, I_XSTAT)
XPATH_WRAP(__xstat64, I_XSTAT64)

int statx(int fd, const char *p, int fl, unsigned int mask, void *b) {
    MISSING(I_STATX);
    gate(I_STATX, fd, p);
    return ((statx_fn)real[I_STATX])(fd, p, fl, mask, b);
}

int utimensat(int fd, const char *p, const void *times, int fl) {
    MISSING(I_UTIMENSAT);
    gate(I_UTIMENSAT, fd, p);
    return ((utimensat_fn)real[I_UTIMENSAT])(fd, p, times, fl);
}
"""

# Run under the shim: how long each way of calling stat/utimensat takes.
SHIM_PROBE = r"""
import ctypes, ctypes.util, json, os, sys, time
tree, outside, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
sub = sorted(x for x in os.listdir(fd) if x.startswith("d"))[0]
dfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
name = sorted(os.listdir(dfd))[0]
bname = name.encode()
path = os.path.join(tree, sub, name)
res = {}

def timeit(label, fn, count=n):
    fn()
    t = time.perf_counter()
    for _ in range(count):
        fn()
    res[label] = (time.perf_counter() - t) / count * 1e3

class TS(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]
times = (TS * 2)(TS(0, (1 << 30) - 1), TS(0, (1 << 30) - 2))

def cfunc(lib):
    f = lib.utimensat
    f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
    f.restype = ctypes.c_int
    return lambda: f(dfd, bname, ctypes.addressof(times), 0x100)

timeit("os.stat(name, dir_fd=fd, follow_symlinks=False)",
       lambda: os.stat(name, dir_fd=dfd, follow_symlinks=False))
timeit("os.lstat(path)", lambda: os.lstat(path))
try:
    entries, how = list(os.scandir(dfd))[:n + 1], "os.scandir(fd)"
except TypeError:       # Python < 3.7: no scandir on an fd
    entries, how = list(os.scandir(os.path.join(tree, sub)))[:n + 1], "os.scandir(path)"
it = iter(entries)
timeit(how + " DirEntry.stat(follow_symlinks=False)",
       lambda: next(it).stat(follow_symlinks=False), count=len(entries) - 1)
timeit("os.utime(name, dir_fd=fd, follow_symlinks=False)",
       lambda: os.utime(name, dir_fd=dfd, follow_symlinks=False))
timeit("ctypes CDLL(None).utimensat (the tool's binding)",
       cfunc(ctypes.CDLL(None, use_errno=True)))
libc_name = ctypes.util.find_library("c") or "libc.so.6"
timeit("ctypes CDLL(%r).utimensat" % libc_name, cfunc(ctypes.CDLL(libc_name, use_errno=True)))
timeit("control: os.lstat(outside the tree)", lambda: os.lstat(outside))
print(json.dumps(res))
"""


# ---------------------------------------------------------------- small helpers

T0 = time.time()


def log(msg):
    sys.stderr.write("[%7.1fs] %s\n" % (time.time() - T0, msg))
    sys.stderr.flush()


def fmt_int(n):
    return "n/a" if n is None else "{:,}".format(int(n))


def fmt_rate(n):
    if n is None:
        return "n/a"
    return "{:,.0f}".format(n) if n >= 100 else "{:.1f}".format(n)


def fmt_s(x):
    return "n/a" if x is None else "%.3f" % x


def fmt_ratio(x):
    return "n/a" if x is None else "%.2fx" % x


def fmt_mb(kb):
    return "n/a" if kb is None else "%.1f MB" % (kb / 1024.0)


def fmt_share(x):
    return "n/a" if x is None else "%.3f%%" % (100.0 * x)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    if a is None or b is None or b <= 0:
        return None
    return a / b


def tail(text, lines=8):
    return "\n".join(text.strip().splitlines()[-lines:])


def first_line(argv):
    try:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
        out = p.communicate()[0].decode("utf-8", "replace").strip().splitlines()
        return out[0] if out else None
    except OSError:
        return None


def read_first(path, key, convert=str):
    """The value after `key` on the first line of a /proc file that starts with it."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return convert(line[len(key):].split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return None

# ---------------------------------------------------------------- processes


def _proc_children(pid):
    kids = []
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                kids.extend(int(x) for x in f.read().split())
    except (OSError, ValueError):
        pass
    return kids


class TreeSampler(threading.Thread):
    """Samples the summed RSS and PSS of a process and its descendants (worker
    processes included) every `interval` seconds. A lower bound of the peak: a
    spike between two samples is missed; ru_maxrss is exact but per process."""

    def __init__(self, pid, interval=0.02):
        threading.Thread.__init__(self)
        self.daemon = True
        self.pid = pid
        self.interval = interval
        self.done = threading.Event()
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.max_procs = 0

    def run(self):
        while not self.done.is_set():
            pids, todo = [], [self.pid]
            while todo:
                p = todo.pop()
                pids.append(p)
                todo.extend(_proc_children(p))
            rss = pss = n = 0
            for p in pids:
                r = read_first("/proc/%d/status" % p, "VmRSS:", int)
                if r is None:
                    continue
                q = read_first("/proc/%d/smaps_rollup" % p, "Pss:", int)
                n, rss, pss = n + 1, rss + r, pss + (r if q is None else q)
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.peak_pss_kb = max(self.peak_pss_kb, pss)
            self.max_procs = max(self.max_procs, n)
            self.done.wait(self.interval)


def run_proc(argv, env=None, timeout=None, sample=False):
    """Run one process; time it as a whole. Returns a dict with seconds, rc (-N: killed by
    signal N), maxrss_kb, cpu_seconds, stdout and stderr. A timeout kills it (timed_out).
    With sample, also the peak summed RSS/PSS of the process tree (sum_rss_kb, sum_pss_kb,
    max_procs)."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    killed = []
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
    sampler = TreeSampler(p.pid) if sample else None
    if sampler:
        sampler.start()

    def kill():
        killed.append(True)
        try:
            os.kill(p.pid, signal.SIGKILL)
        except OSError:
            pass
    timer = threading.Timer(timeout or 0, kill)
    if timeout:
        timer.daemon = True
        timer.start()
    while True:
        try:
            _, status, ru = os.wait4(p.pid, 0)
            break
        except InterruptedError:
            continue
    seconds = time.perf_counter() - t0
    timer.cancel()
    p.returncode = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
    out.seek(0)
    err.seek(0)
    res = {"argv": [str(a) for a in argv], "seconds": seconds, "rc": p.returncode,
           "maxrss_kb": ru.ru_maxrss, "cpu_seconds": ru.ru_utime + ru.ru_stime,
           "stdout": out.read().decode("utf-8", "replace"),
           "stderr": err.read().decode("utf-8", "replace"), "timed_out": bool(killed)}
    out.close()
    err.close()
    if sampler:
        sampler.done.set()
        sampler.join()
        res.update({"sum_rss_kb": sampler.peak_rss_kb, "sum_pss_kb": sampler.peak_pss_kb,
                    "max_procs": sampler.max_procs})
    return res


def parse_tool_json(stdout):
    """The first result of the tool's --json output, or None."""
    try:
        doc = json.loads(stdout[max(0, stdout.find("{")):])
    except ValueError:
        return None
    results = doc.get("results") if isinstance(doc, dict) else None
    return results[0] if results else None

# ---------------------------------------------------------------- the machine


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = (x.strip() for x in line.partition(":"))
                if key.lower() in ("model name", "hardware", "cpu model", "processor") \
                        and value and not value.isdigit():
                    return value
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mount_of(path):
    """(device, mount point, fs type, options) of the mount holding path."""
    path = os.path.realpath(path)
    best = None
    try:
        with open("/proc/self/mounts") as f:
            for parts in (line.split() for line in f):
                mnt = parts[1].replace("\\040", " ") if len(parts) >= 4 else None
                if mnt and (path == mnt or path.startswith(mnt.rstrip("/") + "/")) \
                        and (best is None or len(mnt) >= len(best[1])):
                    best = (parts[0], mnt, parts[2], parts[3])
    except OSError:
        pass
    return best or (None, None, None, None)


def machine_info(workdir, gcc):
    _, mnt, fs_type, fs_options = mount_of(workdir)
    mem_kb = read_first("/proc/meminfo", "MemTotal:", int)
    return {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else None,
        "kernel": "%s %s" % (platform.system(), platform.release()),
        "machine": platform.machine(),
        "workdir": os.path.realpath(workdir),
        "fs_type": fs_type, "fs_mount": mnt, "fs_options": fs_options,
        "python": "%s (%s)" % (platform.python_version(), sys.executable),
        "glibc": os.confstr("CS_GNU_LIBC_VERSION")
        if "CS_GNU_LIBC_VERSION" in getattr(os, "confstr_names", {}) else None,
        "gcc": first_line([gcc, "--version"]) if gcc else None,
        "find": first_line(["find", "--version"]),
        "memory_mb": mem_kb // 1024 if mem_kb else None,
        "loadavg_at_start": " ".join("%.2f" % x for x in os.getloadavg()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }

# ---------------------------------------------------------------- C builds


def build_c(gcc, builddir):
    """Compile the helper and the shim. Returns (helper path or None, shim path or None, notes)."""
    if not gcc:
        return None, None, ["gcc not found: stat floor is `find DIR -printf ''`, atime resets "
                            "use Python, latency simulation skipped"]
    built, notes = [], []
    for name, source, flags, fallback in (
            ("benchhelper", HELPER_C, [], "C helper did not compile (using find/Python instead)"),
            ("shim.so", SHIM_C, ["-shared", "-fPIC"], "latency shim did not compile (latency "
                                                      "simulation skipped)")):
        src = os.path.join(builddir, name.split(".")[0] + ".c")
        with open(src, "w") as f:
            f.write(source)
        out = os.path.join(builddir, name)
        r = run_proc([gcc] + flags + ["-O2", "-o", out, src, "-ldl"])
        built.append(out if r["rc"] == 0 else None)
        if r["rc"] != 0:
            notes.append(fallback + ": " + tail(r["stderr"], 3))
    return built[0], built[1], notes

# ---------------------------------------------------------------- trees


O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
O_DIRFLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


class Builder(object):
    """Creates files fast (os.open/os.close relative to a directory fd), with progress lines."""

    def __init__(self, label, total):
        self.label = label
        self.total = total
        self.done = 0
        self.t0 = time.time()
        self.next_report = self.t0 + 5

    def files(self, dfd, count, fmt):
        for j in range(count):
            os.close(os.open(fmt % j, O_CREATE, 0o644, dir_fd=dfd))
        self.done += count
        now = time.time()
        if now >= self.next_report:
            self.next_report = now + 5
            log("  %s: %s/%s entries (%s/s)"
                % (self.label, fmt_int(self.done), fmt_int(self.total),
                   fmt_rate(self.done / (now - self.t0))))


def flat_layout(entries):
    """(dirs, files per dir) for a flat tree of about `entries` entries, 2,500 per dir."""
    return max(1, int(round(float(entries) / 2500))), max(1, min(2500, int(entries)))


def build_flat(root, dirs, files, label):
    os.mkdir(root)
    b = Builder(label, dirs * (files + 1))
    rfd = os.open(root, O_DIRFLAGS)
    try:
        for i in range(dirs):
            name = "d%04d" % i
            os.mkdir(name, 0o755, dir_fd=rfd)
            dfd = os.open(name, O_DIRFLAGS, dir_fd=rfd)
            try:
                b.files(dfd, files, "f%05d")
            finally:
                os.close(dfd)
            b.done += 1
    finally:
        os.close(rfd)
    return 1 + dirs * (files + 1)


def build_single(root, files, label):
    os.mkdir(root)
    b = Builder(label, files)
    rfd = os.open(root, O_DIRFLAGS)
    try:
        for start in range(0, files, 2500):
            b.files(rfd, min(2500, files - start), "file-%%08d-%d.dat" % start)
    finally:
        os.close(rfd)
    return 1 + files


def deep_dirs(fanout, levels):
    return sum(fanout ** k for k in range(levels + 1))


def deep_layout(target, levels=6):
    """(fanout, entries per dir) giving about `target` entries over `levels` levels."""
    for fanout in (4, 3, 2):
        if deep_dirs(fanout, levels) * (fanout + 1) <= target:
            return fanout, max(fanout + 1, int(round(float(target) / deep_dirs(fanout, levels))))
    return 2, 3


def build_deep(root, levels, fanout, per_dir, label):
    os.mkdir(root)
    b = Builder(label, deep_dirs(fanout, levels) * per_dir)

    def fill(dfd, level):
        nsub = fanout if level < levels else 0
        b.files(dfd, per_dir - nsub, "f%03d")
        for k in range(nsub):
            name = "d%02d" % k
            os.mkdir(name, 0o755, dir_fd=dfd)
            b.done += 1
            cfd = os.open(name, O_DIRFLAGS, dir_fd=dfd)
            try:
                fill(cfd, level + 1)
            finally:
                os.close(cfd)

    rfd = os.open(root, O_DIRFLAGS)
    try:
        fill(rfd, 0)
    finally:
        os.close(rfd)
    return 1 + deep_dirs(fanout, levels) * per_dir


def build_sparse(root, count=4, size=1 << 40):
    """count sparse files of `size` bytes (1 TiB): the walk must never read a file."""
    os.mkdir(root)
    for i in range(count):
        with open(os.path.join(root, "huge%d.bin" % i), "wb") as f:
            f.truncate(size)
    return 1 + count


def add_specials(root, outside):
    """Entries a careful walker must not follow or open: symlinks out of the tree, a
    dangling one, a FIFO. If the tool followed the directory link it would see the
    outside directory's files too (entries_seen would grow)."""
    os.symlink(outside, os.path.join(root, "zz-link-outside-dir"))
    os.symlink(os.path.join(outside, "f000"), os.path.join(root, "zz-link-outside-file"))
    os.symlink(os.path.join(outside, "no-such-file"), os.path.join(root, "zz-link-dangling"))
    os.mkfifo(os.path.join(root, "zz-fifo"))
    return 4


class Tree(object):
    def __init__(self, key, title, path):
        self.key = key
        self.title = title
        self.path = path
        self.created = None         # entries the builder made (before the tool's sentinel)
        self.entries = None         # entries the stat walk counts after `add`
        self.build_seconds = None

# ---------------------------------------------------------------- the bench


class Bench(object):
    """One benchmark run: its temporary directory, the compiled helpers, the trees, and
    the report each phase adds its figures to."""

    def __init__(self, args):
        self.args = args
        self.gcc = shutil.which("gcc") or shutil.which("cc")
        self.base = self.scratch = self.state = self.outside = self.builddir = None
        self.helper = self.shim = None
        self.notes = []
        self.trees = {}
        self.report = {"version": 1, "targets": TARGETS, "trees": {}, "memory": None,
                       "latency": None, "notes": self.notes}
        self.tool_env = dict((k, v) for k, v in os.environ.items()
                             if not k.startswith("SCRATCH_KEEPALIVE_"))

    def run(self):
        """The phases in order; each one writes its own key of self.report."""
        self.setup()
        self.build_trees()
        for key in ("wide", "deep", "sparse"):
            if key in self.trees:
                log("== timing %s ==" % key)
                self.bench_tree(self.trees[key])
        if "mem1m" in self.trees:
            log("== memory ==")
            self.bench_memory()
        # Later figures plug in here, each as one method writing its own report key and
        # one renderer in SECTIONS (and a target in TARGETS if it gets one): "bytes per
        # entry" from the memory trees' growth (self.report["memory"]), and "status time",
        # `status` over a registry of many datasets.
        if "latency" in self.trees:
            log("== latency ==")
            self.bench_latency()
        elif "latency" in self.args.only:
            self.notes.append("latency simulation skipped (needs gcc and the shim)")

    # -- setup
    def setup(self):
        a = self.args
        os.makedirs(a.workdir, exist_ok=True)
        self.base = tempfile.mkdtemp(prefix="skbench-", dir=a.workdir)
        self.scratch, self.state, self.outside, self.builddir = (
            os.path.join(self.base, d) for d in ("scratch", "state", "outside", "build"))
        for d in (self.scratch, self.outside, self.builddir):
            os.mkdir(d)
        for i in range(100):
            os.close(os.open(os.path.join(self.outside, "f%03d" % i), O_CREATE, 0o644))
        self.helper, self.shim, notes = build_c(self.gcc, self.builddir)
        self.notes.extend(notes)
        self.report["machine"] = machine_info(self.base, self.gcc)
        self.report["config"] = {
            "workdir": self.base, "scale": a.scale, "quick": a.quick, "repeat": a.repeat,
            "latency_ms": a.latency_ms, "latency_entries": a.latency_entries,
            "parallel": list(PARALLEL), "tool": str(a.tool),
            "tool_checkpoint_interval": TOOL_CHECKPOINT_S,
            "stat_floor": ("C walker (fstatat AT_SYMLINK_NOFOLLOW, single thread)"
                           if self.helper else "find DIR -printf ''"),
            "atime_reset": ("C helper (utimensat, UTIME_OMIT mtime, post-order)"
                            if self.helper else "Python os.utime (mtime kept), post-order"),
            "old_days": OLD_DAYS,
            "cache": "warm: one untimed warm-up pass per tree before its timed runs; "
                     "caches are not dropped",
        }
        r = run_proc([sys.executable, str(a.tool), "--version"], env=self.tool_env)
        if r["rc"] != 0:
            raise RuntimeError("%s --version failed (rc %d): %s"
                               % (a.tool, r["rc"], tail(r["stderr"])))
        self.report["tool_version"] = r["stdout"].strip() or r["stderr"].strip()
        self.tool_call(["init", "--profile", "generic", "--scratch-root", self.scratch,
                        "--purge-days", "30"])
        # Start-up costs, part of every tool figure: the small trees' are read by them.
        py = [run_proc([sys.executable, "-c", "pass"])["seconds"] for _ in range(5)]
        tv = [run_proc([sys.executable, str(a.tool), "--version"], env=self.tool_env)["seconds"]
              for _ in range(5)]
        self.report["startup"] = {"python_pass_s": median(py), "tool_version_s": median(tv)}

    def tool_argv(self, args):
        return [sys.executable, str(self.args.tool), "--state-dir", self.state] + list(args)

    def tool_call(self, args):
        r = run_proc(self.tool_argv(args), env=self.tool_env, timeout=self.args.timeout)
        if r["rc"] != 0:
            raise RuntimeError("tool %s failed (rc %d): %s"
                               % (args[0], r["rc"], tail(r["stderr"] + r["stdout"])))
        return r

    # -- trees
    def make_tree(self, key, title, build, specials=False):
        path = os.path.join(self.scratch, key)
        t = Tree(key, title, path)
        log("building %s: %s" % (key, title))
        t0 = time.time()
        t.created = build(path) + (add_specials(path, self.outside) if specials else 0)
        t.build_seconds = time.time() - t0
        log("  %s: %s entries in %.1f s (%s/s)" % (key, fmt_int(t.created), t.build_seconds,
                                                   fmt_rate(t.created / max(t.build_seconds,
                                                                            1e-9))))
        self.tool_call(["add", "--name", key, "--path", path, "--keep-until", "2099-12-31",
                        "--cadence-days", "14"])
        t.entries = self.count_entries(path)
        self.trees[key] = t

    def build_trees(self):
        s, want = self.args.scale, self.args.only
        if "wide" in want:
            dirs, files = flat_layout(500000 * s)
            self.make_tree("wide", "%s dirs x %s files" % (fmt_int(dirs), fmt_int(files)),
                           lambda p: build_flat(p, dirs, files, "wide"), specials=True)
        if "deep" in want:
            fanout, per_dir = deep_layout(273050 * s)
            self.make_tree("deep", "6 levels, %d subdirs and %d entries per dir"
                           % (fanout, per_dir),
                           lambda p: build_deep(p, 6, fanout, per_dir, "deep"), specials=True)
        if "sparse" in want:
            try:
                self.make_tree("sparse", "4 sparse files of 1 TiB apparent size", build_sparse)
            except OSError as e:
                self.notes.append("sparse tree skipped: the filesystem refused 1 TiB files (%s)"
                                  % e.strerror)
        if "memory" in want:
            for key, n in (("mem100k", 100000 * s), ("mem1m", 1000000 * s)):
                dirs, files = flat_layout(n)
                self.make_tree(key, "%s dirs x %s files" % (fmt_int(dirs), fmt_int(files)),
                               lambda p, d=dirs, f=files, k=key: build_flat(p, d, f, k))
            n = max(1, int(SINGLE_DIR_ENTRIES * s))
            self.make_tree("mem1dir", "one directory of %s files" % fmt_int(n),
                           lambda p: build_single(p, n, "mem1dir"))
        if "latency" in want and self.shim:
            files = max(1, (self.args.latency_entries - 11) // 10)
            self.make_tree("latency", "10 dirs x %s files" % fmt_int(files),
                           lambda p: build_flat(p, 10, files, "latency"))

    def count_entries(self, path):
        if not self.helper:
            return 1 + sum(len(d) + len(f) for _, d, f in os.walk(path))
        r = run_proc([self.helper, "walk", path])
        try:
            return int(r["stdout"].split()[0])
        except (ValueError, IndexError):
            raise RuntimeError("stat walk failed on %s: %s" % (path, r["stderr"]))

    # -- commands
    def reset_atimes(self, path):
        old = int(time.time()) - OLD_DAYS * DAY
        if self.helper:
            r = run_proc([self.helper, "reset", path, str(old)])
            if r["rc"] != 0:
                raise RuntimeError("atime reset failed on %s: %s"
                                   % (path, r["stderr"] + r["stdout"]))
            return
        for p in [os.path.join(d, n) for d, ds, fs in os.walk(path, topdown=False)
                  for n in ds + fs] + [path]:
            os.utime(p, ns=(old * 10 ** 9, os.lstat(p).st_mtime_ns), follow_symlinks=False)

    def floor_argv(self, kind, path):
        if kind == "find_touch":
            return ["find", path, "-exec", "touch", "-a", "-c", "-h", "{}", "+"]
        return [self.helper, "walk", path] if self.helper else ["find", path, "-printf", ""]

    def run_floor(self, kind, path):
        r = run_proc(self.floor_argv(kind, path), timeout=self.args.timeout)
        rec = dict((k, r[k]) for k in ("seconds", "rc", "maxrss_kb", "cpu_seconds"))
        if r["rc"] != 0:
            rec["stderr"] = tail(r["stderr"])
            log("  WARNING: %s exited %d: %s"
                % (" ".join(r["argv"][:3]), r["rc"], tail(r["stderr"], 2)))
        return rec

    def refresh_argv(self, name, check=False, extra=()):
        return self.tool_argv(["refresh", "--name", name, "--json"] + list(extra)
                              + (["--check"] if check else []))

    def run_tool(self, name, check=False, env=None, extra=(), sample=False):
        """One timed `refresh`, with the figures of its --json result."""
        r = run_proc(self.refresh_argv(name, check, extra), env=env or self.tool_env,
                     timeout=self.args.timeout, sample=sample)
        rec = dict((k, r[k]) for k in ("seconds", "rc", "maxrss_kb", "cpu_seconds", "timed_out",
                                       "sum_rss_kb", "sum_pss_kb", "max_procs") if k in r)
        res = parse_tool_json(r["stdout"]) or {}
        for k in ("mode", "complete", "resumed", "entries_seen", "entries_touched",
                  "entries_skipped", "entries_at_risk", "bytes_at_risk",
                  "entries_purge_eligible", "bytes_purge_eligible", "errors"):
            rec[k] = res.get(k)
        timing = res.get("timing")
        if isinstance(timing, dict):
            rec["timing"] = timing
            rec["checkpoint_share"] = ratio(timing.get("checkpoint_seconds"),
                                            timing.get("walk_seconds"))
        if r["rc"] != 0 or not res.get("complete") or res.get("resumed"):
            rec["stderr"] = tail(r["stderr"])
            log("  WARNING: tool refresh %s%s: rc %d, complete=%s resumed=%s: %s"
                % (name, " --check" if check else "", r["rc"], res.get("complete"),
                   res.get("resumed"), tail(r["stderr"] + ("" if res else r["stdout"]), 3)))
        return rec

    # -- phase 1: timed trees
    def bench_tree(self, t):
        """Interleaved rounds on one tree: every round resets the atimes and runs the five
        commands in the same order, so drift on the machine falls on all of them alike."""
        runs = dict((k, []) for k, _ in CMD_LABELS)
        log("warm-up (untimed) on %s: stat walk + tool --check" % t.key)
        self.run_floor("stat_walk", t.path)
        self.run_tool(t.key, check=True)
        for i in range(self.args.repeat):
            log("%s: round %d/%d" % (t.key, i + 1, self.args.repeat))
            self.reset_atimes(t.path)
            runs["tool_touch_old"].append(self.run_tool(t.key))
            self.reset_atimes(t.path)
            runs["find_touch"].append(self.run_floor("find_touch", t.path))
            runs["tool_check"].append(self.run_tool(t.key, check=True))
            runs["stat_walk"].append(self.run_floor("stat_walk", t.path))
            runs["tool_touch_recent"].append(self.run_tool(t.key))
        summary = dict((k, summarize(runs[k], t.entries)) for k in runs)
        med = dict((k, s["median_s"]) for k, s in summary.items())
        commands = {
            "tool_touch_old": self.refresh_argv(t.key),
            "find_touch": self.floor_argv("find_touch", t.path),
            "tool_check": self.refresh_argv(t.key, check=True),
            "stat_walk": self.floor_argv("stat_walk", t.path),
            "tool_touch_recent": self.refresh_argv(t.key),
            "atime_reset": ([self.helper, "reset", t.path, "<now - %d days>" % OLD_DAYS]
                            if self.helper else ["<python os.utime walk>", t.path]),
        }
        self.report.setdefault("commands", commands)
        self.report["trees"][t.key] = {
            "title": t.title, "path": t.path, "entries": t.entries, "created": t.created,
            "commands": commands, "build_seconds": t.build_seconds, "summary": summary,
            "ratios": {"touch_vs_find": ratio(med["tool_touch_old"], med["find_touch"]),
                       "check_vs_walk": ratio(med["tool_check"], med["stat_walk"]),
                       "skipped_vs_walk": ratio(med["tool_touch_recent"], med["stat_walk"])},
            "anomalies": tree_anomalies(runs, t.entries), "runs": runs,
        }

    # -- phase 2: memory
    def bench_memory(self):
        """Peak memory of check and touch mode on the memory trees: ru_maxrss of the
        largest process, and the sampled PSS summed over the tool's process tree."""
        order = [self.trees[k] for k in ("mem100k", "mem1m", "mem1dir")]
        log("memory: warm-up (untimed) stat walks")
        for t in order:
            self.run_floor("stat_walk", t.path)
        runs = {"check": {}, "touch": {}}
        for t in order:
            log("memory: %s --check (%s entries)" % (t.key, fmt_int(t.entries)))
            runs["check"][t.key] = [self.run_tool(t.key, check=True, sample=True)]
        for t in order:
            self.reset_atimes(t.path)
            log("memory: %s touch, all old (%s entries)" % (t.key, fmt_int(t.entries)))
            runs["touch"][t.key] = [self.run_tool(t.key, sample=True)]
        self.report["memory"] = {
            "entries": dict((t.key, t.entries) for t in order), "runs": runs,
            "titles": dict((t.key, t.title) for t in order),
            "summary": dict(("%s_%s" % (mode, t.key), memory_summary(runs[mode][t.key]))
                            for mode in runs for t in order)}
        self.probe_checkpoints(self.trees["mem1m"], runs["check"]["mem1m"])

    def probe_checkpoints(self, t, check_runs):
        """Runs this short write no checkpoint at the tool's interval; force ~10 with
        --checkpoint-every to learn what one costs."""
        walk = median([r.get("timing", {}).get("walk_seconds") for r in check_runs])
        if walk is None:
            return
        every = max(0.01, round(walk / 10.0, 3))
        log("checkpoints: %s --check --checkpoint-every %g" % (t.key, every))
        rec = self.run_tool(t.key, check=True, extra=["--checkpoint-every", "%g" % every])
        timing = rec.get("timing") or {}
        probe = {"tree": t.key, "checkpoint_every": every, "rc": rec["rc"], "timing": timing}
        n = timing.get("checkpoints")
        if rec["rc"] == 0 and n:
            per = timing["checkpoint_seconds"] / n
            probe.update({"checkpoints": n, "seconds_per_checkpoint": per,
                          "share_at_forced_interval": rec.get("checkpoint_share"),
                          "share_at_default_interval": per / TOOL_CHECKPOINT_S})
        self.report["checkpoint_probe"] = probe

    # -- phase 3: latency
    def shim_env(self, counts_file, prefix):
        env = dict(self.tool_env)
        env["LD_PRELOAD"] = " ".join(x for x in (self.shim, env.get("LD_PRELOAD")) if x)
        env["BENCH_SHIM_DELAY_US"] = "%g" % (self.args.latency_ms * 1000.0)
        env["BENCH_SHIM_PREFIX"] = prefix
        env["BENCH_SHIM_COUNTS"] = counts_file
        return env

    @staticmethod
    def zero_counts(counts_file):
        with open(counts_file, "wb") as f:
            f.write(b"\0" * (16 * len(SHIM_NAMES)))

    @staticmethod
    def read_counts(counts_file):
        """{symbol: {"delayed": n, "passed": n}} from the shim's shared counters; zeroes them."""
        with open(counts_file, "rb") as f:
            raw = f.read()
        out = {}
        if len(raw) >= 16 * len(SHIM_NAMES):
            vals = struct.unpack("=%dQ" % (2 * len(SHIM_NAMES)), raw[:16 * len(SHIM_NAMES)])
            for i, name in enumerate(SHIM_NAMES):
                if vals[2 * i] or vals[2 * i + 1]:
                    out[name] = {"delayed": vals[2 * i], "passed": vals[2 * i + 1]}
        Bench.zero_counts(counts_file)
        return out

    def probe_shim(self, t, counts_file):
        """Which ways of calling stat/utimensat the shim delays, and by how much."""
        self.zero_counts(counts_file)
        r = run_proc([sys.executable, "-c", SHIM_PROBE, t.path,
                      os.path.join(self.outside, "f001"), "100"],
                     env=self.shim_env(counts_file, os.path.realpath(t.path)), timeout=120)
        counts = self.read_counts(counts_file)
        if r["rc"] != 0:
            raise RuntimeError("shim probe failed: " + tail(r["stderr"]))
        per_call = json.loads(r["stdout"].strip().splitlines()[-1])
        return {"ms_per_call": per_call, "counts": counts,
                "delayed": dict((k, v >= 0.8 * self.args.latency_ms)
                                for k, v in per_call.items())}

    def bench_latency(self):
        """Every variant in check and touch mode under the shim, interleaved round by round;
        speed-ups against the strictly sequential baseline."""
        a, t = self.args, self.trees["latency"]
        counts_file = os.path.join(self.builddir, "shim-counts")
        lat = {"latency_ms": a.latency_ms, "entries": t.entries, "title": t.title}
        self.report["latency"] = lat
        log("latency: probing the shim (+%.2f ms per call)" % a.latency_ms)
        try:
            lat["probe"] = self.probe_shim(t, counts_file)
        except (RuntimeError, OSError, ValueError, IndexError) as e:
            lat["probe"] = {"error": str(e), "ms_per_call": {}, "delayed": {}}
            log("  WARNING: the shim probe failed (going on): %s" % e)
        for k, v in lat["probe"]["ms_per_call"].items():
            log("  %-60s %.3f ms/call" % (k, v))
        lat["effective_ms"] = lat["probe"]["ms_per_call"].get(
            "os.stat(name, dir_fd=fd, follow_symlinks=False)")
        log("latency: warm-up (untimed) tool --check --threads 1 without the shim")
        self.run_tool(t.key, check=True, extra=["--threads", "1"])
        variants = latency_variants()
        lat["variants"] = [label for label, _ in variants]
        env = self.shim_env(counts_file, os.path.realpath(t.path))
        self.zero_counts(counts_file)
        runs = {}
        for i in range(a.repeat):
            for mode in ("check", "touch"):
                for label, extra in variants:
                    if mode == "touch":
                        self.reset_atimes(t.path)
                    log("latency: round %d/%d, %s, %s" % (i + 1, a.repeat, mode, label))
                    rec = self.run_tool(t.key, check=(mode == "check"), env=env, extra=extra)
                    rec["shim_counts"] = self.read_counts(counts_file)
                    runs.setdefault("%s %s" % (mode, label), []).append(rec)
        lat["runs"] = runs
        lat["summary"] = latency_summary(runs, variants, t.entries)

    # -- cleanup
    def cleanup(self):
        if not self.base or not os.path.isdir(self.base):
            return
        if self.args.keep:
            log("kept %s (--keep)" % self.base)
            return
        log("cleaning up %s" % self.base)
        if shutil.which("rm"):
            subprocess.call(["rm", "-rf", "--one-file-system", self.base])
        shutil.rmtree(self.base, ignore_errors=True)


def latency_variants():
    """(label, extra refresh arguments) per latency run; the first one is the baseline."""
    variants = [("--threads 1 --workers 1", ["--threads", "1", "--workers", "1"])]
    for opt in ("--threads", "--workers"):
        variants += [("%s %d" % (opt, n), [opt, str(n)]) for n in PARALLEL]
    return variants


def summarize(runs, entries):
    """Median and spread of one command's timed runs on a tree, with the tool's counts."""
    secs = [r["seconds"] for r in runs if r.get("rc") == 0]
    med = median(secs)
    timings = [r["timing"] for r in runs if r.get("timing")]
    last = runs[-1] if runs else {}
    return {
        "n": len(secs), "median_s": med, "min_s": min(secs) if secs else None,
        "max_s": max(secs) if secs else None, "entries_per_s": ratio(entries, med),
        "peak_rss_kb": max(r["maxrss_kb"] for r in runs) if runs else None,
        "cpu_s": median([r.get("cpu_seconds") for r in runs]),
        "checkpoint_share": median([r.get("checkpoint_share") for r in runs]),
        "checkpoints": max(t.get("checkpoints") or 0 for t in timings) if timings else None,
        "walk_s": median([t.get("walk_seconds") for t in timings]),
        "entries_seen": last.get("entries_seen"),
        "entries_touched": last.get("entries_touched"),
        "bytes_at_risk": last.get("bytes_at_risk"),
        "failed_runs": len([r for r in runs if r.get("rc") != 0]),
    }


def tree_anomalies(runs, entries):
    """What the tool's own counts say went wrong in a tree's timed runs."""
    out = set()
    for k in ("tool_touch_old", "tool_check", "tool_touch_recent"):
        for r in runs[k]:
            seen, touched = r.get("entries_seen"), r.get("entries_touched")
            if r["rc"] != 0:
                out.add("%s: exit %d" % (k, r["rc"]))
            elif seen is not None and seen != entries:
                out.add("%s: entries_seen %s, the stat walk counts %s"
                        % (k, fmt_int(seen), fmt_int(entries)))
            if r.get("errors"):
                out.add("%s: %s errors" % (k, fmt_int(r["errors"])))
            if k == "tool_touch_old" and touched is not None and seen and touched != seen:
                out.add("touch, all old: touched %s of %s entries"
                        % (fmt_int(touched), fmt_int(seen)))
            if k == "tool_touch_recent" and touched:
                out.add("touch, all recent: touched %s entries (expected 0)" % fmt_int(touched))
    return sorted(out)


def memory_summary(rs):
    last = rs[-1]
    return {
        "peak_rss_kb": max(r["maxrss_kb"] for r in rs),
        "sum_rss_kb": max(r.get("sum_rss_kb") or 0 for r in rs),
        "sum_pss_kb": max(r.get("sum_pss_kb") or 0 for r in rs),
        "max_procs": max(r.get("max_procs") or 0 for r in rs),
        "median_s": median([r["seconds"] for r in rs]),
        "entries_seen": last.get("entries_seen"),
        "rc": [r["rc"] for r in rs],
        "checkpoint_share": median([r.get("checkpoint_share") for r in rs]),
        "checkpoints": (last.get("timing") or {}).get("checkpoints"),
    }


def latency_summary(runs, variants, entries):
    """Per mode and variant: median time and the speed-up over the mode's baseline, both
    whole-process and from the tool's own walk_seconds (without start-up)."""
    summary = {}
    for mode in ("check", "touch"):
        base = runs["%s %s" % (mode, variants[0][0])]
        base_s = median([r["seconds"] for r in base if r["rc"] == 0])
        base_w = median([r.get("timing", {}).get("walk_seconds") for r in base])
        for label, extra in variants:
            rs = runs["%s %s" % (mode, label)]
            med = median([r["seconds"] for r in rs if r["rc"] == 0])
            walk = median([r.get("timing", {}).get("walk_seconds") for r in rs])
            summary["%s %s" % (mode, label)] = {
                "mode": mode, "variant": label, "args": extra, "median_s": med,
                "baseline": label == variants[0][0], "entries_per_s": ratio(entries, med),
                "speedup": ratio(base_s, med), "walk_seconds": walk,
                "walk_speedup": ratio(base_w, walk),
                "peak_rss_kb": max(r["maxrss_kb"] for r in rs),
                "cpu_seconds": median([r["cpu_seconds"] for r in rs]),
                "delayed_calls": sum(v["delayed"] for v in rs[-1]["shim_counts"].values()),
                "shim_counts": rs[-1]["shim_counts"], "rc": [r["rc"] for r in rs],
                "entries_touched": rs[-1].get("entries_touched"),
            }
    return summary

# ---------------------------------------------------------------- the report


def table(w, header, rows, left=1):
    """Writes header and rows in columns as wide as their widest cell: the first `left`
    columns (what was run) and the last (notes) left-aligned, the figures right-aligned."""
    rows = [header] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        cells = [c.ljust(n) if i < left or i == len(r) - 1 else c.rjust(n)
                 for i, (c, n) in enumerate(zip(r, widths))]
        w("  ".join(cells).rstrip() + "\n")


def render_header(report, w):
    m, c = report.get("machine", {}), report.get("config", {})
    w("scratch-keepalive benchmark\n" + "=" * 78 + "\n")
    w("machine : %s, %s cores (%s usable), %s MB RAM, %s\n"
      % (m.get("cpu_model"), m.get("cores"), m.get("cores_usable"), m.get("memory_mb"),
         m.get("machine")))
    w("kernel  : %s, %s\n" % (m.get("kernel"), m.get("glibc") or "libc ?"))
    w("workdir : %s on %s (%s, %s)\n" % (m.get("workdir"), m.get("fs_mount"), m.get("fs_type"),
                                         m.get("fs_options")))
    w("python  : %s\n" % m.get("python"))
    w("tools   : %s; %s\n" % (m.get("gcc") or "no gcc", m.get("find")))
    w("tool    : %s (%s), its default --threads/--workers\n"
      % (report.get("tool_version"), c.get("tool")))
    w("run     : %s, host %s, load %s at start%s\n"
      % (m.get("date"), m.get("hostname"), m.get("loadavg_at_start"),
         ", SLURM_JOB_ID set" if m.get("slurm_job_id") else ""))
    w("method  : scale %s%s, medians of %d interleaved runs of whole processes; %s.\n"
      % (c.get("scale"), " (--quick)" if c.get("quick") else "", c.get("repeat"),
         c.get("cache")))
    w("          'old' = every atime reset to %d days ago before the run (untimed, %s);\n"
      "          'recent' = right after a touch run. Stat floor: %s.\n"
      % (c.get("old_days"), c.get("atime_reset"), c.get("stat_floor")))
    st = report.get("startup")
    if st:
        w("start-up: `python -c pass` %.0f ms, `scratch_keepalive.py --version` %.0f ms "
          "(medians of 5; part of every tool figure)\n"
          % (1000 * st["python_pass_s"], 1000 * st["tool_version_s"]))
    for n in report.get("notes", []):
        w("note    : %s\n" % n)
    cmds = report.get("commands") or {}
    if cmds:
        w("timed command lines (first tree; the others differ only in name and path):\n")
    for k, label in CMD_LABELS + [("atime_reset", "untimed, before each 'old' run")]:
        if k in cmds:
            w("  %-31s %s\n" % (label, " ".join(cmds[k])))


def run_notes(k, s):
    notes = []
    if k.startswith("tool") and s.get("entries_seen") is not None:
        notes.append("seen %s" % fmt_int(s["entries_seen"]))
    if k in ("tool_touch_old", "tool_touch_recent") and s.get("entries_touched") is not None:
        notes.append("touched %s" % fmt_int(s["entries_touched"]))
    if k.startswith("tool") and s.get("checkpoints"):
        notes.append("%d checkpoints" % s["checkpoints"])
    if s.get("failed_runs"):
        notes.append("%d FAILED" % s["failed_runs"])
    return ", ".join(notes)


def render_trees(report, w):
    floor = "C stat walk" if report.get("config", {}).get("stat_floor", "").startswith("C") \
        else "find -printf ''"
    for key, tr in report["trees"].items():
        w("\n== %s: %s, %s entries (built in %.1f s) ==\n"
          % (key, tr["title"], fmt_int(tr["entries"]), tr["build_seconds"] or 0))
        rows = []
        for k, label in CMD_LABELS:
            s, tool = tr["summary"][k], k.startswith("tool")
            rows.append([floor if k == "stat_walk" else label, fmt_s(s["median_s"]),
                         fmt_s(s["min_s"]), fmt_rate(s["entries_per_s"]),
                         fmt_mb(s["peak_rss_kb"]) if tool else "",
                         fmt_share(s["checkpoint_share"]) if tool else "", run_notes(k, s)])
        table(w, ["command", "median s", "min s", "entries/s", "peak RSS", "ckpt/walk",
                  "notes"], rows)
        r = tr["ratios"]
        w("ratios: touch / find-touch %s | check / stat walk %s | all-skipped / stat walk %s\n"
          % (fmt_ratio(r["touch_vs_find"]), fmt_ratio(r["check_vs_walk"]),
             fmt_ratio(r["skipped_vs_walk"])))
        if key == "sparse":
            w("sparse: so few entries that process start-up dominates: not used for the "
              "targets\n")
        for a in tr["anomalies"]:
            w("CHECK: %s\n" % a)


def render_memory(report, w):
    mem = report.get("memory")
    if not mem:
        return
    w("\n== memory: tool peak RSS (wait4 ru_maxrss: the largest single process) and "
      "the process tree's sampled peak PSS sum ==\n")
    rows = []
    for key in ("mem100k", "mem1m", "mem1dir"):
        cs, ts = mem["summary"]["check_" + key], mem["summary"]["touch_" + key]
        rows.append([key, fmt_int(mem["entries"][key])]
                    + [x for s in (cs, ts) for x in (fmt_mb(s["peak_rss_kb"]),
                                                   fmt_mb(s["sum_pss_kb"]), str(s["max_procs"]),
                                                   fmt_s(s["median_s"]))]
                    + ["exit codes %s / %s" % (cs["rc"], ts["rc"])
                       if any(cs["rc"] + ts["rc"]) else ""])
    table(w, ["tree", "entries", "check RSS", "check PSS", "procs", "check s", "touch RSS",
              "touch PSS", "procs", "touch s", ""], rows)
    g = [mem["summary"][m + "_mem1m"]["peak_rss_kb"] - mem["summary"][m + "_mem100k"]
         ["peak_rss_kb"] for m in ("check", "touch")]
    w("growth from %s to %s entries: check %+.1f MB, touch %+.1f MB\n"
      % (fmt_int(mem["entries"]["mem100k"]), fmt_int(mem["entries"]["mem1m"]),
         g[0] / 1024.0, g[1] / 1024.0))
    w("mem1dir (%s) is the same walk with every entry in one directory: memory that grows "
      "with a directory's size shows here (not used for the targets)\n"
      % mem["titles"]["mem1dir"])
    cp = report.get("checkpoint_probe") or {}
    if cp.get("checkpoints"):
        w("checkpoints: %s --check --checkpoint-every %g wrote %d checkpoints, %.2f ms each, "
          "%s of the walk; at the tool's %g s interval that is %s\n"
          % (cp["tree"], cp["checkpoint_every"], cp["checkpoints"],
             1000 * cp["seconds_per_checkpoint"], fmt_share(cp["share_at_forced_interval"]),
             TOOL_CHECKPOINT_S, fmt_share(cp["share_at_default_interval"])))
    elif cp:
        w("checkpoints: forced run (%s --checkpoint-every %g) gave no figure (rc %s, "
          "timing %s)\n" % (cp["tree"], cp["checkpoint_every"], cp["rc"], cp["timing"]))


def render_latency(report, w):
    lat = report.get("latency")
    if not lat:
        return
    w("\n== latency: LD_PRELOAD shim, +%.2f ms per stat/utimensat call under the tree "
      "(%s: %s entries) ==\n" % (lat["latency_ms"], lat["title"], fmt_int(lat["entries"])))
    probe = lat["probe"]
    if probe.get("error"):
        w("  probe failed: %s\n" % probe["error"])
    for k, v in probe["ms_per_call"].items():
        w("  probe %-58s %7.3f ms %s\n" % (k, v, "delayed" if probe["delayed"][k]
                                           else "not delayed"))
    rows = [[s["mode"], s["variant"], fmt_s(s["median_s"]), fmt_rate(s["entries_per_s"]),
             fmt_ratio(s["speedup"]), fmt_ratio(s["walk_speedup"]), fmt_mb(s["peak_rss_kb"]),
             fmt_int(s["delayed_calls"]),
             "exit codes %s" % s["rc"] if any(s["rc"]) else ""]
            for s in lat["summary"].values()]
    table(w, ["mode", "tool arguments", "median s", "entries/s", "speed-up", "walk s-up",
              "peak RSS", "delayed calls", ""], rows, left=2)
    w("(speed-up: whole process vs `%s`; walk s-up: the same from the tool's own "
      "walk_seconds, without start-up; peak RSS: the largest single process)\n"
      % lat["variants"][0])
    if lat.get("effective_ms"):
        w("(one delayed call measures %.3f ms here (nanosleep overshoot included): "
          "delayed calls x that / threads is the latency floor)\n" % lat["effective_ms"])


def render_targets(report, w):
    quick = report.get("config", {}).get("quick")
    parts = [("%s (%s)" if quick else "%s %s (%s)") % ((name, text) if quick
                                                         else (name, state, text))
             for name, (state, text) in report["verdicts"].items()]
    if quick:
        w("\nTARGETS not judged: with --quick the trees are so small that start-up "
          "dominates; run without --quick to judge them. Figures: " + " | ".join(parts) + "\n")
    else:
        w("\nTARGETS: " + " | ".join(parts) + "\n")


# The report's sections, in order; each writes what its part of the report holds.
SECTIONS = (render_header, render_trees, render_memory, render_latency, render_targets)


def render(report, out):
    for section in SECTIONS:
        section(report, out.write)

# ---------------------------------------------------------------- the targets


def worst_ratio(trees, key):
    vals = [(t["ratios"][key], k) for k, t in trees if t["ratios"].get(key) is not None]
    if not vals:
        return ("n/a", "no data")
    x, k = max(vals)
    return ("PASS" if x <= TARGETS[key] else "FAIL",
            "%.2fx %s, limit %.1fx" % (x, k, TARGETS[key]))


def threads_verdict(lat):
    best = {}
    for s in (lat or {}).get("summary", {}).values():
        if not s["baseline"] and s["speedup"] is not None \
                and s["speedup"] > best.get(s["mode"], (0,))[0]:
            best[s["mode"]] = (s["speedup"], s["variant"])
    if not best:
        return ("n/a", "not measured")
    text = ", ".join("%s %.1fx with %s" % (m, b[0], b[1]) for m, b in sorted(best.items()))
    return ("PASS" if min(best.values())[0] >= TARGETS["threads_speedup"] else "FAIL",
            "%s at %.2f ms" % (text, lat["latency_ms"]))


def memory_verdict(mem):
    if not mem:
        return ("n/a", "not measured")
    ss = [mem["summary"]["check_mem1m"], mem["summary"]["touch_mem1m"]]
    rss = max(x["peak_rss_kb"] for x in ss) / 1024.0
    pss = max(x["sum_pss_kb"] for x in ss) / 1024.0
    procs = max(x["max_procs"] or 1 for x in ss)
    return ("PASS" if max(rss, pss) <= TARGETS["rss_mb_1m"] else "FAIL",
            "largest process %.1f MB, %d process(es) together %.1f MB PSS, at %s entries"
            % (rss, procs, pss, fmt_int(mem["entries"]["mem1m"])))


def checkpoint_verdict(trees, mem, cp):
    """The largest share a timed run measured; when none lasted a checkpoint interval
    (the usual case), the forced probe's cost of one checkpoint at the tool's interval."""
    shares = [(t["summary"][cmd]["checkpoint_share"], "%s %s" % (k, cmd),
               t["summary"][cmd]["checkpoints"])
              for k, t in trees for cmd in ("tool_touch_old", "tool_check", "tool_touch_recent")]
    shares += [(s["checkpoint_share"], k, s["checkpoints"])
               for k, s in ((mem or {}).get("summary") or {}).items()]
    shares = [x for x in shares if x[0] is not None]
    limit = TARGETS["checkpoint_share"]
    if not shares:
        return ("n/a", "the tool reports no timing")
    if any(n for _, _, n in shares):
        x, where, n = max(x for x in shares if x[2])
        return ("PASS" if x <= limit else "FAIL",
                "max %.3f%% (%s, %s checkpoints)" % (100 * x, where, n))
    if not cp.get("checkpoints"):
        return ("n/a", "no run wrote a checkpoint, and the forced probe gave no figure")
    x = cp["share_at_default_interval"]
    return ("PASS" if x <= limit else "FAIL",
            "no timed run lasted a checkpoint interval; %.2f ms per checkpoint = %.3f%% at "
            "one per %g s" % (1000 * cp["seconds_per_checkpoint"], 100 * x, TOOL_CHECKPOINT_S))


def targets(report):
    """PASS/FAIL/n/a per target, with the figure it was judged on. The sparse tree's
    figures are the interpreter's start-up, so it judges none."""
    trees = [(k, t) for k, t in report["trees"].items() if k != "sparse"]
    return {
        "touch<=1.0x find-touch": worst_ratio(trees, "touch_vs_find"),
        "check<=1.5x stat-walk": worst_ratio(trees, "check_vs_walk"),
        "all-skipped<=1.5x stat-walk": worst_ratio(trees, "skipped_vs_walk"),
        "threads>=10x": threads_verdict(report.get("latency")),
        "RSS<=32MB@1M": memory_verdict(report.get("memory")),
        "checkpoint<=2%": checkpoint_verdict(trees, report.get("memory"),
                                             report.get("checkpoint_probe") or {}),
    }

# ---------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=tempfile.gettempdir(),
                   help="where to build the trees (local disk; default %(default)s)")
    p.add_argument("--scale", type=float, default=None,
                   help="shrink (or grow) every tree by this factor (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="small preset for smoke tests (scale 0.01, 1,000-entry latency tree)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per command (>= 3 for "
                   "a median worth quoting; default 3)")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    p.add_argument("--keep", action="store_true", help="keep the temp trees and state")
    p.add_argument("--latency-ms", type=float, default=0.5,
                   help="delay the shim adds per call (default 0.5)")
    p.add_argument("--only", default=",".join(PHASES),
                   help="comma-separated phases (default: all of %(default)s)")
    p.add_argument("--timeout", type=float, default=1800,
                   help="kill a process after this many seconds (default 1800)")
    p.add_argument("--tool", type=Path, default=TOOL,
                   help="the tool, e.g. an older copy to compare (default %(default)s)")
    a = p.parse_args(argv)
    if a.scale is None:
        a.scale = 0.01 if a.quick else 1.0
    a.latency_entries = 1000 if a.quick else 10000
    if a.repeat < 1:
        p.error("--repeat must be at least 1")
    if a.scale <= 0:
        p.error("--scale must be positive")
    a.only = set(x.strip() for x in a.only.split(",") if x.strip())
    if a.only - set(PHASES):
        p.error("unknown phase(s) in --only: %s" % ", ".join(sorted(a.only - set(PHASES))))
    a.workdir = os.path.abspath(a.workdir)
    return a


def failed_runs(node, where=""):
    """Names of the report's entries whose "rc" (one code or a list) is non-zero."""
    out = []
    if isinstance(node, dict):
        rc = node.get("rc")
        codes = rc if isinstance(rc, list) else [rc]
        if any(isinstance(x, int) and not isinstance(x, bool) and x != 0 for x in codes):
            out.append(where or "?")
        for k, v in node.items():
            if k != "rc":
                out.extend(failed_runs(v, "%s/%s" % (where, k) if where else str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(failed_runs(v, "%s[%d]" % (where, i)))
    return out


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.tool.exists():
        sys.stderr.write("bench: %s does not exist\n" % args.tool)
        return 2
    b = Bench(args)
    crashed = interrupted = False
    try:
        b.run()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted")
    except Exception:
        crashed = True
        traceback.print_exc()
    finally:
        b.cleanup()
    if b.report["trees"] or b.report["memory"] or b.report["latency"]:
        try:
            b.report["verdicts"] = targets(b.report)
            render(b.report, sys.stdout)
        except Exception:
            crashed = True
            traceback.print_exc()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(b.report, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        log("figures written to %s" % args.json)
    if interrupted:
        return 130
    bad = failed_runs(b.report)
    if bad:
        log("a timed command exited non-zero: %s" % ", ".join(bad))
    return 1 if (crashed or bad) else 0


if __name__ == "__main__":
    sys.exit(main())
