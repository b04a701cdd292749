#!/usr/bin/env python3
"""Benchmark scratch_keepalive.py against the floors the project measures it by.

    python3 tools/bench.py                  # default sizes: a few minutes
    python3 tools/bench.py --quick          # small preset, a smoke test
    python3 tools/bench.py --before OLD/scratch_keepalive.py --json /tmp/bench.json

Standard library only (Python 3.6+), and gcc for the C stat walk (the floor), the atime
reset (bench_walk.c) and the LD_PRELOAD latency shim (bench_shim.c) it compiles. It times whole processes in
interleaved rounds: touch and check mode against `find -exec touch` and the stat floor
on a wide and a deep tree; peak memory at 100k and 1M entries and in one directory; a
checkpoint's cost; --threads and --workers with the shim's delay on every stat and
utimensat; a rescue phase: `rescue --all --to` of ~20,200 files and ~200 MiB against
`tar --atime-preserve=system -cf - . | tar -xf -` and `cp -a --sparse=always`, the page
cache dropped before each copy (as root), and rescue's --threads (when it has them) under
the shim, its delay then on the opens, creates and renames a copy makes too;
`status --brief` with 50 datasets; and the login line, `status --brief`
through each documented install (install.sh's launcher, pip's console script in a venv,
the README's copy-the-file launcher) against a bare `python3 -c pass`, on CPython 3.6
and the newest pyenv has (--quick: this Python, no pip). --before OLD runs an earlier copy in
the same rounds. It prints a report, writes every figure to --json FILE, ends with
PASS/FAIL per target, and exits non-zero when it or a timed command failed.
"""

import argparse
import contextlib
import json
import os
import platform
import random
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
import types
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "scratch_keepalive.py"
OLD_DAYS = 60                   # "old": atime 60 days ago (the tool's skip threshold is 11)
TOOL_CHECKPOINT_S = 30.0        # the tool's default --checkpoint-every
SINGLE_DIR_ENTRIES = 200000     # the one-directory memory tree, before --scale
PARALLEL = (8, 16, 32)          # --threads N and --workers N in the latency runs
LATENCY_MS = 0.5                # what the shim adds to each call under the latency tree
TIMEOUT_S = 1800                # a process running longer is killed
PHASES = ("wide", "deep", "memory", "latency", "rescue", "brief", "login")
# The rescue tree, before --scale: small files and 1 MiB files, all at risk (their atimes
# OLD_DAYS ago, the walk's purge window 30 days); its latency tree, before --scale.
RESCUE_DIRS, RESCUE_SMALL, RESCUE_BIG = 20, 20000, 200     # 20,200 files, ~200 MiB
RESCUE_SMALL_BYTES, RESCUE_BIG_BYTES = 512, 1 << 20
RESCUE_LATENCY_FILES = 2000
RESCUE_ROUNDS = 5               # at least, whatever --repeat says (--quick: --repeat)
RESCUE_PARALLEL = (8, 32)       # --threads N in the rescue latency runs, when it has them
LOGIN_ROUNDS = 51               # interleaved rounds of the login line's forms (--quick: 5)
LOGIN_DATASETS = 5              # registered (and checked once) for the login line
PYENV_VERSIONS = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
README = TOOL.parent / "README.md"
# The login line's forms: (key, label, judged against the target).
LOGIN_FORMS = [("pass", "python3 -c pass", False),
               ("install_sh", "install.sh launcher", True),
               ("pip", "pip console script", True),
               ("readme", "README launcher", True),
               ("script", "python3 FILE", False)]
BRIEF_DATASETS = 50             # registered for the `status --brief` timing
# (label, extra refresh arguments) per latency run; the first one is the baseline.
LATENCY_VARIANTS = [("--threads 1 --workers 1", ["--threads", "1", "--workers", "1"])] + [
    ("%s %d" % (opt, n), [opt, str(n)]) for opt in ("--threads", "--workers") for n in PARALLEL]

# The six targets' limits; targets() judges each, under the names the report shows.
TARGETS = {"touch_vs_find": 1.0, "check_vs_walk": 1.5, "skipped_vs_walk": 1.5,
           "threads_speedup": 10.0, "rss_mb_1m": 32.0, "checkpoint_share": 0.02,
           # 20, not 16 since manifests record mtimes too (what vanished has a safe copy):
           # the wide tree's are random over 300 days, 7 bytes an entry of their own.
           "manifest_bytes": 20.0, "login_vs_pass": 2.0,
           # rescue of the local tree against tar's pipeline, caches dropped; and its
           # threads' speed-up at LATENCY_MS on every open, create, stat and utimensat
           "rescue_vs_tar": 1.0, "rescue_threads_speedup": 5.0}

# The timed commands of a tree round, in their order: (key, label).
CMD_LABELS = [("tool_touch_old", "tool touch, all old"),
              ("find_touch", "find -exec touch -a -c -h {} +"), ("tool_check", "tool --check"),
              ("stat_walk", "stat floor"), ("tool_touch_recent", "tool touch, all recent"),
              ("tool_touch_old_nomf", "tool touch, all old, --no-manifest"),
              ("tool_check_nomf", "tool --check --no-manifest")]
# With --before OLD, OLD's commands join each round; VS_BEFORE pairs a command of this
# version with OLD's. OLD writes no manifest: the fair pairs are --no-manifest's.
BEFORE_LABELS = [("before_touch_old", "before: touch, all old"),
                 ("before_check", "before: --check"),
                 ("before_touch_recent", "before: touch, all recent")]
VS_BEFORE = [("touch", "tool_touch_old_nomf", "before_touch_old"),
             ("check", "tool_check_nomf", "before_check"),
             ("touch, manifests on", "tool_touch_old", "before_touch_old"),
             ("check, manifests on", "tool_check", "before_check"),
             ("all recent, manifests on", "tool_touch_recent", "before_touch_recent")]
BEFORE_LATENCY = ("before: --threads 32", ["--threads", "32"])
# The rescue phase's copies, each into a directory of its own: (key, label).
RESCUE_LABELS = [("tool_rescue", "tool rescue --all --to DEST"),
                 ("tar", "tar --atime-preserve=system -cf - . | tar -xf -"),
                 ("cp", "cp -a --sparse=always"),
                 ("before_rescue", "before: rescue --all --to DEST")]
# What a rescue's --json result says, kept with its timing.
RESCUE_KEYS = ("complete", "entries_done", "entries_copied", "bytes_copied", "dirs_created",
               "entries_skipped", "entries_not_rescued", "errors", "exit_code")

# ---------------------------------------------------------------- C sources

# Beside this file: the stat floor and atime reset, and the LD_PRELOAD latency shim.
HELPER_SRC, SHIM_SRC = (Path(__file__).resolve().parent / n
                        for n in ("bench_walk.c", "bench_shim.c"))
# The shim's wrappers, in the order of its shared counters: (symbol, signature); build_c
# writes them into its shim_table.h.
SHIM_FUNCS = [("fstatat", "AT"), ("fstatat64", "AT"), ("__fxstatat", "XAT"),
              ("__fxstatat64", "XAT"), ("lstat", "PATH"), ("lstat64", "PATH"),
              ("__lxstat", "XPATH"), ("__lxstat64", "XPATH"), ("stat", "PATH"),
              ("stat64", "PATH"), ("__xstat", "XPATH"), ("__xstat64", "XPATH"),
              ("statx", "STATX"), ("utimensat", "UTIMENSAT"),
              # from here on a copy's calls, delayed only with BENCH_SHIM_OPENS=1
              ("open", "OPEN"), ("open64", "OPEN"), ("__open_2", "OPEN"),
              ("__open64_2", "OPEN"), ("openat", "OPENAT"), ("openat64", "OPENAT"),
              ("__openat_2", "OPENAT"), ("__openat64_2", "OPENAT"), ("mkdir", "MKDIR"),
              ("mkdirat", "MKDIRAT"), ("rename", "RENAME"), ("renameat", "RENAMEAT"),
              ("renameat2", "RENAMEAT2")]
SHIM_NAMES = [name for name, _ in SHIM_FUNCS]
SHIM_FIRST_OPEN = SHIM_NAMES.index("open")

# ---------------------------------------------------------------- small helpers

T0 = time.time()


def log(msg):
    sys.stderr.write("[%7.1fs] %s\n" % (time.time() - T0, msg))
    sys.stderr.flush()


def fmt(pattern, x, scale=1.0):
    """x * scale formatted by pattern, or "n/a" when there is no figure."""
    return "n/a" if x is None else pattern % (x * scale)


def fmt_int(n):
    return "n/a" if n is None else "{:,}".format(int(n))


def fmt_rate(n):
    return "n/a" if n is None else "{:,.0f}".format(n) if n >= 100 else "{:.1f}".format(n)


def fmt_mb(kb):
    return fmt("%.1f MiB", kb, 1 / 1024.0)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def peak(xs):
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


def ratio(a, b):
    return None if a is None or b is None or b <= 0 else a / b


def tail(text, lines=8):
    return "\n".join(text.strip().splitlines()[-lines:])


def proc_value(path, key):
    """The rest of the first line of a /proc file that starts with `key`, or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line[len(key):].strip(" \t:\n")
    except OSError:
        pass
    return None


def proc_kb(path, key):
    value = proc_value(path, key)
    return int(value.split()[0]) if value else None

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


def sample_tree(pid, peaks, done, interval=0.02):
    """Until `done` is set, samples the summed RSS and PSS of process pid and its
    descendants (worker processes included) every `interval` seconds, keeping the peaks
    in `peaks`. A lower bound of the peak: a spike between two samples is missed;
    ru_maxrss is exact but per process."""
    while not done.is_set():
        pids, todo = [], [pid]
        while todo:
            pids.append(todo.pop())
            todo.extend(_proc_children(pids[-1]))
        rss = pss = n = 0
        for p in pids:
            r = proc_kb("/proc/%d/status" % p, "VmRSS:")
            if r is not None:
                q = proc_kb("/proc/%d/smaps_rollup" % p, "Pss:")
                n, rss, pss = n + 1, rss + r, pss + (r if q is None else q)
        for key, now in (("sum_rss_kb", rss), ("sum_pss_kb", pss), ("max_procs", n)):
            peaks[key] = max(peaks[key], now)
        done.wait(interval)


def run_proc(argv, env=None, timeout=None, sample=False, cwd=None):
    """Run one process; time it as a whole. Returns a dict with seconds, rc (-N: killed by
    signal N), maxrss_kb, cpu_seconds, stdout and stderr. A timeout kills it (timed_out).
    With sample, also the peak summed RSS/PSS of the process tree (sum_rss_kb, sum_pss_kb,
    max_procs)."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    peaks, done = dict.fromkeys(("sum_rss_kb", "sum_pss_kb", "max_procs"), 0), threading.Event()
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                         cwd=cwd)
    sampler = threading.Thread(target=sample_tree, args=(p.pid, peaks, done)) if sample else None
    timer = threading.Timer(timeout, os.kill, (p.pid, signal.SIGKILL)) if timeout else None
    for thread in (sampler, timer):
        if thread:
            thread.daemon = True
            thread.start()
    _, status, ru = os.wait4(p.pid, 0)      # wait4: the child's own ru_maxrss
    seconds = time.perf_counter() - t0
    done.set()
    if timer:
        timer.cancel()
    p.returncode = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
    res = {"argv": [str(a) for a in argv], "seconds": seconds, "rc": p.returncode,
           "maxrss_kb": ru.ru_maxrss, "cpu_seconds": ru.ru_utime + ru.ru_stime,
           "timed_out": bool(timeout) and p.returncode == -signal.SIGKILL
           and seconds >= timeout}
    for key, f in (("stdout", out), ("stderr", err)):
        f.seek(0)
        res[key] = f.read().decode("utf-8", "replace")
        f.close()
    if sampler:
        sampler.join()
        res.update(peaks)
    return res


def time_quick(argv, env, what):
    """Seconds a short process takes, timed with less around it than run_proc (no
    threads, no files): its output to /dev/null, its stderr kept for an error."""
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError("%s failed (rc %d): %s" % (what, p.returncode, tail(
            p.stderr.decode("utf-8", "replace"))))
    return seconds


def check_rc(r, what):
    """r, a run_proc result, unless its process failed: then RuntimeError naming `what`."""
    if r["rc"] != 0:
        raise RuntimeError("%s failed (rc %d): %s"
                           % (what, r["rc"], tail(r["stderr"] + r["stdout"])))
    return r


def parse_tool_json(stdout):
    """The first result of the tool's --json output, or an empty dict."""
    try:
        results = json.loads(stdout[max(0, stdout.find("{")):]).get("results")
    except (ValueError, AttributeError):
        return {}
    return results[0] if results else {}

def parse_rescue_json(stdout):
    """A rescue's --json result (one object, or the first of its "results"), or {}."""
    try:
        doc = json.loads(stdout[max(0, stdout.find("{")):])
    except ValueError:
        return {}
    if isinstance(doc, dict) and isinstance(doc.get("results"), list):
        doc = doc["results"][0] if doc["results"] else {}
    return doc if isinstance(doc, dict) else {}

# ---------------------------------------------------------------- the machine


def mount_of(path):
    """(mount point, fs type, options) of the mount holding path."""
    path, best = os.path.realpath(path), (None, None, None)
    with open("/proc/self/mounts") as f:
        for _, mnt, fs_type, options in (line.split()[:4] for line in f):
            mnt = mnt.replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) \
                    and len(mnt) >= len(best[0] or ""):     # the last mount there wins
                best = (mnt, fs_type, options)
    return best


def machine_info(workdir, gcc):
    """What a reader needs to compare figures from two runs."""
    mnt, fs_type, fs_options = mount_of(workdir)
    mem_kb = proc_kb("/proc/meminfo", "MemTotal:")
    return {
        "hostname": platform.node(),
        "cpu_model": proc_value("/proc/cpuinfo", "model name") or platform.machine(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "kernel": "%s %s" % (platform.system(), platform.release()),
        "machine": platform.machine(),
        "workdir": os.path.realpath(workdir),
        "fs_type": fs_type, "fs_mount": mnt, "fs_options": fs_options,
        "python": "%s (%s)" % (platform.python_version(), sys.executable),
        "glibc": os.confstr("CS_GNU_LIBC_VERSION")
        if "CS_GNU_LIBC_VERSION" in os.confstr_names else None,
        "gcc": run_proc([gcc, "--version"])["stdout"].partition("\n")[0],
        "find": run_proc(["find", "--version"])["stdout"].partition("\n")[0],
        "memory_mb": mem_kb // 1024 if mem_kb else None,
        "loadavg_at_start": " ".join("%.2f" % x for x in os.getloadavg()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def build_c(gcc, builddir):
    """Compiles the stat/atime helper and the latency shim; returns their paths."""
    with open(os.path.join(builddir, "shim_table.h"), "w") as f:
        f.write("#define I_N %d\n#define I_FIRST_OPEN %d\n#define SHIM_NAMES %s\n"
                "#define SHIM_WRAPPERS %s\n" % (len(SHIM_FUNCS), SHIM_FIRST_OPEN, ", ".join('"%s"' % name for name in SHIM_NAMES),
            " ".join("%s(%d, %s)" % (sig, i, name) for i, (name, sig) in enumerate(SHIM_FUNCS))))
    paths = []
    for name, src, flags in (("benchhelper", HELPER_SRC, []),
                             ("shim.so", SHIM_SRC, ["-shared", "-fPIC"])):
        paths.append(os.path.join(builddir, name))
        check_rc(run_proc([gcc] + flags + ["-O2", "-I", builddir, "-o", paths[-1], str(src),
                                           "-ldl"]), "compiling %s" % src)
    return paths

def tool_loader(path):
    """The tool's LOADER (the `python3 -c` text its scheduled job runs it with), or None.
    Read without parsing the whole file: a child inherits this process's peak RSS (fork),
    and ru_maxrss of every tool run would show it."""
    import ast
    import re
    with open(str(path)) as f:
        m = re.search(r"^LOADER = (\(.*?\))\n", f.read(), re.S | re.M)
    return ast.literal_eval(m.group(1)) if m else None

# ---------------------------------------------------------------- trees


O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def make_files(dfd, count, pattern, varied=None):
    """count empty files; with varied (a random.Random), each of a random apparent size
    (a hole: no data written) and atime, as a manifest of real data would see them."""
    for j in range(count):
        fd = os.open(pattern % j, O_CREATE, 0o644, dir_fd=dfd)
        if varied is not None:
            os.ftruncate(fd, int(varied.lognormvariate(10, 3)) % (1 << 40))
            at = time.time() - varied.uniform(0, 60 * 86400)
            os.utime(fd, (at, at - varied.uniform(0, 86400 * 300)))
        os.close(fd)


@contextlib.contextmanager
def new_dir(name, dfd=None):
    """Creates directory `name` (in dfd) and yields an fd on it."""
    os.mkdir(name, 0o755, dir_fd=dfd)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
    try:
        yield fd
    finally:
        os.close(fd)


def flat_layout(entries):
    """(dirs, files per dir) for a flat tree of about `entries` entries, 2,500 per dir."""
    return max(1, int(round(float(entries) / 2500))), max(1, min(2500, int(entries)))


def build_flat(root, dirs, files, varied=False):
    rng = random.Random(7) if varied else None
    with new_dir(root) as rfd:
        for i in range(dirs):
            with new_dir("d%04d" % i, rfd) as dfd:
                make_files(dfd, files, "f%05d", rng)
    return 1 + dirs * (files + 1)


def deep_dirs(fanout, levels):
    return sum(fanout ** k for k in range(levels + 1))


def deep_layout(target, levels=6):
    """(fanout, entries per dir) giving about `target` entries over `levels` levels."""
    for fanout in (4, 3, 2):
        if deep_dirs(fanout, levels) * (fanout + 1) <= target:
            return fanout, max(fanout + 1, int(round(float(target) / deep_dirs(fanout, levels))))
    return 2, 3


def build_deep(root, levels, fanout, per_dir):
    def fill(dfd, level):
        nsub = fanout if level < levels else 0
        make_files(dfd, per_dir - nsub, "f%03d")
        for k in range(nsub):
            with new_dir("d%02d" % k, dfd) as cfd:
                fill(cfd, level + 1)

    with new_dir(root) as rfd:
        fill(rfd, 0)
    return 1 + deep_dirs(fanout, levels) * per_dir


def build_rescue(root, dirs, small, big):
    """dirs directories holding `small` files of RESCUE_SMALL_BYTES and `big` of
    RESCUE_BIG_BYTES between them (random data: nothing for a sparse copy to skip)."""
    rng = random.Random(11)
    block = bytes(bytearray(rng.getrandbits(8) for _ in range(4096)))
    big_data = block * (RESCUE_BIG_BYTES // len(block))
    with new_dir(root) as rfd:
        for i in range(dirs):
            with new_dir("d%03d" % i, rfd) as dfd:
                for pattern, n, data in (("s%05d", small, block[:RESCUE_SMALL_BYTES]),
                                         ("b%04d", big, big_data)):
                    for j in range(i, n, dirs):
                        fd = os.open(pattern % j, O_CREATE, 0o644, dir_fd=dfd)
                        try:
                            os.write(fd, data)
                        finally:
                            os.close(fd)
    return 1 + dirs + small + big


def drop_caches():
    """sync, then drop the page cache, dentries and inodes: whether it could (root only)."""
    subprocess.call(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def add_specials(root, outside):
    """Entries a careful walker must not follow or open: symlinks out of the tree, a
    dangling one, a FIFO. If the tool followed the directory link it would see the
    outside directory's files too (entries_seen would grow)."""
    os.symlink(outside, os.path.join(root, "zz-link-outside-dir"))
    os.symlink(os.path.join(outside, "f000"), os.path.join(root, "zz-link-outside-file"))
    os.symlink(os.path.join(outside, "no-such-file"), os.path.join(root, "zz-link-dangling"))
    os.mkfifo(os.path.join(root, "zz-fifo"))
    return 4

# ---------------------------------------------------------------- the bench


class Bench(object):
    """One benchmark run: its temporary directory, the compiled helpers, the trees, and
    the report each phase adds its figures to."""

    def __init__(self, args, gcc):
        self.args = args
        self.gcc = gcc
        self.base = self.scratch = self.state = self.outside = self.builddir = None
        self.helper = self.shim = None
        self.notes = []
        self.trees = {}
        self.report = {"version": 1, "targets": TARGETS, "trees": {}, "memory": None,
                       "latency": None, "rescue": None, "brief": None, "login": None,
                       "notes": self.notes}
        # As on a user's shell: bytecode may be cached (the scheduled job's form needs it).
        self.tool_env = dict((k, v) for k, v in os.environ.items()
                             if not k.startswith("SCRATCH_KEEPALIVE_")
                             and k != "PYTHONDONTWRITEBYTECODE")
        self.loader = tool_loader(args.tool)
        # Who runs a tool command: this version ("tool") and, with --before, the old one.
        self.who = ["tool"] + (["before"] if args.before else [])
        self.labels = CMD_LABELS + (BEFORE_LABELS if args.before else [])

    def run(self):
        """The phases in order; each one writes its own key of self.report. A later figure
        plugs in as one more method here and one renderer in SECTIONS."""
        self.setup()
        self.build_trees()
        for key in ("wide", "deep"):
            if key in self.trees:
                log("== timing %s ==" % key)
                self.bench_tree(self.trees[key])
        if "mem1m" in self.trees:
            log("== memory ==")
            self.bench_memory()
        if "latency" in self.trees:
            log("== latency ==")
            self.bench_latency()
        if "rescue" in self.trees:
            log("== rescue ==")
            self.bench_rescue()
        if "brief" in self.args.only:
            log("== status --brief ==")
            self.bench_brief()
        if "login" in self.args.only:
            log("== the login line ==")
            self.bench_login()

    # -- setup
    def setup(self):
        a = self.args
        os.makedirs(a.workdir, exist_ok=True)
        self.base = tempfile.mkdtemp(prefix="skbench-", dir=a.workdir)
        self.scratch, self.outside, self.builddir = (
            os.path.join(self.base, d) for d in ("scratch", "outside", "build"))
        self.state = dict((who, os.path.join(self.base, "state-" + who)) for who in self.who)
        for d in (self.scratch, self.builddir):
            os.mkdir(d)
        with new_dir(self.outside) as fd:
            make_files(fd, 100, "f%03d")
        self.helper, self.shim = build_c(self.gcc, self.builddir)
        self.report["machine"] = machine_info(self.base, self.gcc)
        self.report["config"] = {
            "workdir": self.base, "scale": a.scale, "quick": a.quick, "repeat": a.repeat,
            "latency_ms": LATENCY_MS, "latency_entries": a.latency_entries,
            "parallel": list(PARALLEL), "tool": str(a.tool), "old_days": OLD_DAYS,
            "before": str(a.before) if a.before else None,
            "tool_checkpoint_interval": TOOL_CHECKPOINT_S}
        # Start-up costs, part of every tool figure (the small trees' are read by them):
        # medians of 5 after an untimed first run.
        version = [check_rc(run_proc(self.tool_base() + ["--version"],
                                     env=self.tool_env), "%s --version" % a.tool)
                   for _ in range(6)]
        script = run_proc([sys.executable, str(a.tool), "--version"], env=self.tool_env)
        self.report["tool_version"] = version[0]["stdout"].strip() or version[0]["stderr"].strip()
        py = [run_proc([sys.executable, "-c", "pass"])["seconds"] for _ in range(5)]
        self.report["startup"] = {"python_pass_s": median(py),
                                  "tool_version_s": median([r["seconds"] for r in version[1:]]),
                                  "form": "job" if self.loader else "script",
                                  "peak_rss_kb": version[-1]["maxrss_kb"],
                                  "script_peak_rss_kb": script["maxrss_kb"]}
        if a.before:
            self.report["before_version"] = check_rc(run_proc(
                self.tool_base("before") + ["--version"], env=self.tool_env),
                "%s --version" % a.before)["stdout"].strip()
        for who in self.who:
            self.tool_call(["init", "--profile", "generic", "--scratch-root", self.scratch,
                            "--purge-days", "30"], who)

    def tool_base(self, who="tool"):
        """The tool as its scheduled job runs it (`python3 -c LOADER TOOL`: from its cached
        bytecode), or as `python3 TOOL` for a version without LOADER. The --before copy is
        loaded by this version's LOADER too, so that both start alike."""
        tool = self.args.before if who == "before" else self.args.tool
        return [sys.executable] + (["-c", self.loader] if self.loader else []) + [str(tool)]

    def tool_argv(self, args, who="tool"):
        return self.tool_base(who) + ["--state-dir", self.state[who]] + list(args)

    def tool_call(self, args, who="tool"):
        check_rc(run_proc(self.tool_argv(args, who), env=self.tool_env,
                          timeout=TIMEOUT_S), "%s %s" % (who, args[0]))

    # -- trees
    def make_tree(self, key, title, build, specials=False):
        """Builds a tree, adds it as a dataset; `created` counts the entries the builder
        made, `entries` those the stat walk counts after `add`."""
        t = types.SimpleNamespace(key=key, title=title, path=os.path.join(self.scratch, key))
        log("building %s: %s" % (key, title))
        t0 = time.time()
        t.created = build(t.path) + (add_specials(t.path, self.outside) if specials else 0)
        t.build_seconds = time.time() - t0
        log("  %s: %s entries in %.1f s" % (key, fmt_int(t.created), t.build_seconds))
        for who in self.who:
            self.tool_call(["add", "--name", key, "--path", t.path, "--keep-until",
                            "2099-12-31", "--cadence-days", "14"], who)
        r = check_rc(run_proc([self.helper, "walk", t.path]), "stat walk on " + t.path)
        t.entries = int(r["stdout"].split()[0])
        self.trees[key] = t

    def make_flat(self, key, dirs, files, specials=False, varied=False):
        self.make_tree(key, "%s dirs x %s files%s" % (
            fmt_int(dirs), fmt_int(files), ", random sizes and atimes" if varied else ""),
            lambda p: build_flat(p, dirs, files, varied), specials)

    def build_trees(self):
        s, want = self.args.scale, self.args.only
        if "wide" in want:
            self.make_flat("wide", *flat_layout(500000 * s), specials=True, varied=True)
        if "deep" in want:
            fanout, per_dir = deep_layout(273050 * s)
            self.make_tree("deep", "6 levels, %d subdirs and %d entries per dir"
                           % (fanout, per_dir),
                           lambda p: build_deep(p, 6, fanout, per_dir), specials=True)
        if "memory" in want:
            self.make_flat("mem100k", *flat_layout(100000 * s))
            self.make_flat("mem1m", *flat_layout(1000000 * s))
            n = max(1, int(SINGLE_DIR_ENTRIES * s))
            self.make_tree("mem1dir", "one directory of %s files" % fmt_int(n),
                           lambda p: build_flat(p, 1, n))
        if "latency" in want:
            self.make_flat("latency", 10, max(1, (self.args.latency_entries - 11) // 10))
        if "rescue" in want:
            dirs = max(1, int(round(RESCUE_DIRS * min(1.0, s))))
            small, big = (max(dirs, int(round(n * s))) for n in (RESCUE_SMALL, RESCUE_BIG))
            self.make_tree("rescue", "%d dirs, %s files of %d bytes and %s of %d MiB"
                           % (dirs, fmt_int(small), RESCUE_SMALL_BYTES, fmt_int(big),
                              RESCUE_BIG_BYTES >> 20),
                           lambda p: build_rescue(p, dirs, small, big))
            n = max(10, int(RESCUE_LATENCY_FILES * (0.05 if self.args.quick else 1.0)))
            self.make_tree("rescuelat", "10 dirs, %s files of %d bytes"
                           % (fmt_int(n), RESCUE_SMALL_BYTES),
                           lambda p: build_rescue(p, 10, n, 0))

    # -- commands
    def reset_atimes(self, t):
        old = int(time.time()) - OLD_DAYS * 86400
        check_rc(run_proc([self.helper, "reset", t.path, str(old)]), "atime reset on " + t.path)

    def command_argv(self, kind, t):
        """The command line of a command of self.labels on tree t."""
        if tool_kind(kind):
            return self.refresh_argv(t.key, **tool_kind(kind))
        if kind == "find_touch":
            return ["find", t.path, "-exec", "touch", "-a", "-c", "-h", "{}", "+"]
        return [self.helper, "walk", t.path]

    def refresh_argv(self, name, check=False, extra=(), who="tool"):
        return self.tool_argv(["refresh", "--name", name, "--json"] + list(extra)
                              + (["--check"] if check else []), who)

    def timed(self, kind, t):
        """One run of a command of self.labels on tree t; the 'old' ones after an atime
        reset."""
        if "touch_old" in kind or kind == "find_touch":
            self.reset_atimes(t)
        if tool_kind(kind):
            return self.run_tool(t.key, **tool_kind(kind))
        return self.run_floor(kind, t)

    def run_mode(self, t, mode, **kw):
        """One tool run on tree t in `mode`: "check", or "touch" after an atime reset."""
        if mode == "touch":
            self.reset_atimes(t)
        return self.run_tool(t.key, check=mode == "check", **kw)

    def run_floor(self, kind, t):
        r = run_proc(self.command_argv(kind, t), timeout=TIMEOUT_S)
        rec = dict((k, r[k]) for k in ("seconds", "rc", "maxrss_kb", "cpu_seconds"))
        if r["rc"] != 0:
            rec["stderr"] = tail(r["stderr"])
            log("  WARNING: %s exited %d: %s" % (r["argv"][0], r["rc"], tail(r["stderr"], 2)))
        return rec

    def run_tool(self, name, check=False, env=None, extra=(), sample=False, who="tool"):
        """One timed `refresh`, with the figures of its --json result."""
        r = run_proc(self.refresh_argv(name, check, extra, who), env=env or self.tool_env,
                     timeout=TIMEOUT_S, sample=sample)
        res = parse_tool_json(r["stdout"])
        rec = dict((k, r[k]) for k in ("seconds", "rc", "maxrss_kb", "cpu_seconds", "timed_out",
                                       "sum_rss_kb", "sum_pss_kb", "max_procs") if k in r)
        rec.update((k, res.get(k)) for k in (
            "mode", "complete", "resumed", "entries_seen", "entries_touched", "entries_skipped",
            "entries_at_risk", "bytes_at_risk", "entries_purge_eligible",
            "bytes_purge_eligible", "errors"))
        if res.get("manifest"):
            with contextlib.suppress(OSError):
                rec["manifest"] = {"bytes": os.path.getsize(res["manifest"]),
                                   "entries": res.get("entries_seen")}
        if isinstance(res.get("timing"), dict):
            rec["timing"] = res["timing"]
            rec["checkpoint_share"] = ratio(res["timing"].get("checkpoint_seconds"),
                                            res["timing"].get("walk_seconds"))
        if r["rc"] != 0 or not res.get("complete") or res.get("resumed"):
            rec["stderr"] = tail(r["stderr"])
            log("  WARNING: %s refresh %s%s: rc %d, complete=%s resumed=%s: %s"
                % (who, name, " --check" if check else "", r["rc"], res.get("complete"),
                   res.get("resumed"), tail(r["stderr"] + ("" if res else r["stdout"]), 3)))
        return rec

    # -- phase 1: timed trees
    def bench_tree(self, t):
        """Interleaved rounds on one tree: every round runs the five commands in the same
        order, so drift on the machine falls on all of them alike."""
        runs = dict((k, []) for k, _ in self.labels)
        log("warm-up (untimed) on %s: stat walk + tool --check" % t.key)
        self.run_floor("stat_walk", t)
        first = self.run_tool(t.key, check=True)    # the tree's own sizes and atimes
        if self.args.before:
            self.run_tool(t.key, check=True, who="before")
        mf = first.get("manifest") or {}
        for i in range(self.args.repeat):
            log("%s: round %d/%d" % (t.key, i + 1, self.args.repeat))
            for k, _ in self.labels:
                runs[k].append(self.timed(k, t))
        summary = dict((k, summarize(runs[k], t.entries)) for k in runs)
        med = dict((k, s["median_s"]) for k, s in summary.items())
        commands = dict((k, self.command_argv(k, t)) for k, _ in self.labels)
        commands["atime_reset"] = [self.helper, "reset", t.path, "<now - %d days>" % OLD_DAYS]
        self.report.setdefault("commands", commands)
        self.report["trees"][t.key] = {
            "title": t.title, "path": t.path, "entries": t.entries, "created": t.created,
            "commands": commands, "build_seconds": t.build_seconds, "summary": summary,
            "ratios": {"touch_vs_find": ratio(med["tool_touch_old"], med["find_touch"]),
                       "check_vs_walk": ratio(med["tool_check"], med["stat_walk"]),
                       "skipped_vs_walk": ratio(med["tool_touch_recent"], med["stat_walk"]),
                       "touch_manifest_cost": ratio(med["tool_touch_old"],
                                                    med["tool_touch_old_nomf"]),
                       "check_manifest_cost": ratio(med["tool_check"], med["tool_check_nomf"])},
            "vs_before": vs_before(summary) if self.args.before else None,
            "manifest": dict(mf, bytes_per_entry=ratio(mf.get("bytes"), mf.get("entries"))),
            "anomalies": tree_anomalies(runs, t.entries), "runs": runs,
        }

    # -- phase 2: memory
    def bench_memory(self):
        """Peak memory of check and touch mode on the memory trees: ru_maxrss of the
        largest process, and the sampled PSS summed over the tool's process tree."""
        order = [self.trees[k] for k in ("mem100k", "mem1m", "mem1dir")]
        log("memory: warm-up (untimed) stat walks")
        for t in order:
            self.run_floor("stat_walk", t)
        runs = dict((("before " if who == "before" else "") + mode, {})
                    for who in self.who for mode in ("check", "touch"))
        for label in runs:
            for t in order:
                log("memory: %s %s (%s entries)" % (t.key, label, fmt_int(t.entries)))
                who = "before" if label.startswith("before") else "tool"
                runs[label][t.key] = [self.run_mode(t, label.split()[-1], sample=True,
                                                    who=who)]
        self.report["memory"] = {
            "entries": dict((t.key, t.entries) for t in order), "runs": runs,
            "titles": dict((t.key, t.title) for t in order),
            "summary": dict(("%s_%s" % (mode, t.key), summarize(runs[mode][t.key], t.entries))
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
        if rec["rc"] == 0 and timing.get("checkpoints"):
            per = timing["checkpoint_seconds"] / timing["checkpoints"]
            probe.update({"checkpoints": timing["checkpoints"], "seconds_per_checkpoint": per,
                          "share_at_forced_interval": rec.get("checkpoint_share"),
                          "share_at_default_interval": per / TOOL_CHECKPOINT_S})
        self.report["checkpoint_probe"] = probe

    # -- phase 3: latency
    @staticmethod
    def read_counts(counts_file):
        """{symbol: {"delayed": n, "passed": n}} from the shim's shared counters (none
        before the first run); leaves the file zeroed for the next run."""
        size = 16 * len(SHIM_NAMES)
        with open(counts_file, "a+b") as f:     # created here: the shim only maps it
            f.seek(0)
            vals = struct.unpack("=%dQ" % (size // 8), f.read(size).ljust(size, b"\0"))
            f.truncate(0)
            f.write(b"\0" * size)
        return dict((name, {"delayed": vals[2 * i], "passed": vals[2 * i + 1]})
                    for i, name in enumerate(SHIM_NAMES) if vals[2 * i] or vals[2 * i + 1])

    def bench_latency(self):
        """Every variant in check and touch mode under the shim, interleaved round by round;
        speed-ups against the strictly sequential baseline."""
        a, t = self.args, self.trees["latency"]
        counts_file = os.path.join(self.builddir, "shim-counts")
        log("latency: warm-up (untimed) tool --check --threads 1 without the shim")
        self.run_tool(t.key, check=True, extra=["--threads", "1"])
        env = dict(self.tool_env, BENCH_SHIM_DELAY_US="%g" % (LATENCY_MS * 1000.0),
                   BENCH_SHIM_PREFIX=os.path.realpath(t.path), BENCH_SHIM_COUNTS=counts_file,
                   LD_PRELOAD=" ".join(x for x in (self.shim, os.environ.get("LD_PRELOAD")) if x))
        self.read_counts(counts_file)
        variants = LATENCY_VARIANTS + ([BEFORE_LATENCY] if a.before else [])
        runs = dict(("%s %s" % (mode, label), []) for mode in ("check", "touch")
                    for label, _ in variants)
        for i in range(a.repeat):
            for mode in ("check", "touch"):
                for label, extra in variants:
                    log("latency: round %d/%d, %s, %s" % (i + 1, a.repeat, mode, label))
                    rec = self.run_mode(t, mode, env=env, extra=extra,
                                        who="before" if label.startswith("before") else "tool")
                    rec["shim_counts"] = self.read_counts(counts_file)
                    runs["%s %s" % (mode, label)].append(rec)
        summary = latency_summary(runs, variants, t.entries)
        # Every entry is stat'ed once under the tree: fewer delayed calls means the shim
        # missed a call the tool makes, and the figures would not show the latency.
        self.report["latency"] = {
            "latency_ms": LATENCY_MS, "entries": t.entries, "title": t.title,
            "variants": [label for label, _ in variants], "runs": runs,
            "summary": summary,
            "anomalies": ["%s: the shim delayed %s calls for %s entries"
                          % (k, fmt_int(s["delayed_calls"]), fmt_int(t.entries))
                          for k, s in summary.items() if s["delayed_calls"] < t.entries]}

    # -- phase 4: rescue
    def rescue_threads(self, who):
        """Whether `rescue --help` of who offers --threads."""
        r = run_proc(self.tool_base(who) + ["rescue", "--help"], env=self.tool_env)
        return "--threads" in r["stdout"]

    def rescue_argv(self, t, dest, who="tool", extra=()):
        return self.tool_argv(["rescue", "--name", t.key, "--all", "--to", dest, "--json"]
                              + list(extra), who)

    def rescue_command(self, kind, t, dest):
        """The command line of kind (RESCUE_LABELS) copying tree t to dest."""
        if kind in ("tool_rescue", "before_rescue"):
            return self.rescue_argv(t, dest, kind.partition("_")[0])
        if kind == "tar":
            return ["bash", "-o", "pipefail", "-c", 'cd "$1" && tar --atime-preserve=system '
                    '-cf - . | (cd "$2" && tar -xf -)', "tar", t.path, dest]
        return ["cp", "-a", "--sparse=always", t.path, dest]

    def prepare_rescue(self, t):
        """Every entry of t at risk (atimes OLD_DAYS ago), and each version's check walk
        of it: the manifest its rescue copies from."""
        self.reset_atimes(t)
        for who in self.who:
            self.tool_call(["refresh", "--name", t.key, "--check"], who)

    def run_rescue(self, argv, dest, env=None, cold=True):
        """One timed copy to dest (removed first, made first for tar), after an atime reset
        of its source (cp's reads move them) and, with cold, the page cache dropped."""
        subprocess.call(["rm", "-rf", "--one-file-system", dest])
        if argv[0] == "bash":
            os.mkdir(dest)
        self.reset_atimes(self.trees["rescue" if cold else "rescuelat"])
        if cold and not drop_caches() and not self.rescue_uncached:
            self.rescue_uncached = True
            self.notes.append("rescue: the page cache could not be dropped (not root?); "
                              "its copies ran with warm caches")
        r = run_proc(argv, env=env or self.tool_env, timeout=TIMEOUT_S)
        rec = dict((k, r[k]) for k in ("seconds", "rc", "maxrss_kb", "cpu_seconds"))
        res = parse_rescue_json(r["stdout"]) if "--json" in argv else {}
        rec.update((k, res[k]) for k in RESCUE_KEYS if k in res)
        if r["rc"] != 0 or (res and not res.get("complete")):
            rec["stderr"] = tail(r["stderr"] + r["stdout"])
            log("  WARNING: %s exited %d: %s" % (" ".join(argv[:4]), r["rc"], tail(rec["stderr"], 3)))
        return rec

    def bench_rescue(self):
        """The rescue tree copied by the tool's rescue --all, tar's pipeline and cp -a,
        caches dropped before each, in interleaved rounds; then rescue under the latency
        shim (every open, create, rename, stat and utimensat under the source and the
        destination delayed), each version's --threads against its single thread."""
        a, t = self.args, self.trees["rescue"]
        self.rescue_uncached = False
        rounds = a.repeat if a.quick else max(RESCUE_ROUNDS, a.repeat)
        out = os.path.join(self.base, "rescue-out")
        os.mkdir(out)
        self.prepare_rescue(t)
        kinds = [k for k, _ in RESCUE_LABELS if not k.startswith("before") or a.before]
        runs = dict((k, []) for k in kinds)
        copied = {}
        for i in range(rounds):
            for k in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
                log("rescue: round %d/%d, %s" % (i + 1, rounds, k))
                dest = os.path.join(out, k)
                runs[k].append(self.run_rescue(self.rescue_command(k, t, dest), dest))
                if i == 0:      # what each copied, counted as the stat floor counts
                    r = run_proc([self.helper, "walk", dest])
                    copied[k] = int(r["stdout"].split()[0]) if r["rc"] == 0 else None
        subprocess.call(["rm", "-rf", "--one-file-system", out])
        summary = dict((k, summarize(runs[k], t.entries)) for k in kinds)
        med = dict((k, s["median_s"]) for k, s in summary.items())
        self.report["rescue"] = {
            "title": t.title, "entries": t.entries, "bytes": tree_bytes(t.path),
            "rounds": rounds, "caches_dropped": not self.rescue_uncached,
            "commands": dict((k, self.rescue_command(k, t, os.path.join(out, k)))
                             for k in kinds),
            "summary": summary, "copied_entries": copied, "runs": runs,
            "ratios": dict(("%s_vs_tar" % k, ratio(med[k], med["tar"])) for k in kinds
                           if k != "tar"),
            "latency": self.bench_rescue_latency(),
        }

    def bench_rescue_latency(self):
        """Each version's rescue of the rescuelat tree under the shim: with --threads N
        against --threads 1 when its rescue has them, else only as it is."""
        a, t = self.args, self.trees["rescuelat"]
        counts_file = os.path.join(self.builddir, "shim-counts-rescue")
        out = os.path.join(self.base, "rescuelat-out")
        os.mkdir(out)
        self.prepare_rescue(t)
        env = dict(self.tool_env, BENCH_SHIM_DELAY_US="%g" % (LATENCY_MS * 1000.0),
                   BENCH_SHIM_PREFIX="%s:%s" % (os.path.realpath(t.path), os.path.realpath(out)),
                   BENCH_SHIM_OPENS="1", BENCH_SHIM_COUNTS=counts_file,
                   LD_PRELOAD=" ".join(x for x in (self.shim, os.environ.get("LD_PRELOAD")) if x))
        self.read_counts(counts_file)
        variants, threads = [], {}
        for who in self.who:
            threads[who] = self.rescue_threads(who)
            prefix = "before: " if who == "before" else ""
            if not threads[who]:
                variants.append((who, prefix + "no --threads", []))
                continue
            for n in (1,) + (RESCUE_PARALLEL if who == "tool" else RESCUE_PARALLEL[-1:]):
                variants.append((who, "%s--threads %d" % (prefix, n), ["--threads", str(n)]))
        runs = dict((label, []) for _, label, _ in variants)
        rounds = a.repeat if a.quick else max(RESCUE_ROUNDS, a.repeat)
        dest = os.path.join(out, "copy")
        for i in range(rounds):
            for who, label, extra in variants:
                log("rescue latency: round %d/%d, %s" % (i + 1, rounds, label))
                rec = self.run_rescue(self.rescue_argv(t, dest, who, extra), dest, env=env,
                                      cold=False)
                rec["shim_counts"] = self.read_counts(counts_file)
                runs[label].append(rec)
        subprocess.call(["rm", "-rf", "--one-file-system", out])
        summary = dict((label, summarize(runs[label], t.entries)) for _, label, _ in variants)
        for who, label, extra in variants:
            s = summary[label]
            base = [summary[x] for w, x, _ in variants if w == who][0]
            s.update({"who": who, "args": extra, "baseline": s is base,
                      "speedup": ratio(base["median_s"], s["median_s"]) if threads[who]
                      else None,
                      "delayed_calls": sum(v["delayed"]
                                           for v in runs[label][-1]["shim_counts"].values())})
        return {"latency_ms": LATENCY_MS, "entries": t.entries, "title": t.title,
                "rounds": rounds, "threads": threads, "variants": [v[1] for v in variants],
                "summary": summary, "runs": runs,
                "anomalies": ["%s: the shim delayed %s calls for %s entries"
                              % (k, fmt_int(s["delayed_calls"]), fmt_int(t.entries))
                              for k, s in summary.items() if s["delayed_calls"] < t.entries]}

    def checked_datasets(self, name, count):
        """A state directory of its own with count tiny datasets, each walked once in check
        mode, so that the registry holds what a real one does: (the tool's environment for
        it, a function that runs the tool there)."""
        root = os.path.join(self.scratch, name)
        os.mkdir(root)
        env = dict(self.tool_env, SCRATCH_KEEPALIVE_HOME=os.path.join(self.base, name + "-state"))

        def tool(*args):
            return check_rc(run_proc([sys.executable, str(self.args.tool)] + list(args),
                                     env=env, timeout=TIMEOUT_S), "tool " + " ".join(args[:2]))
        tool("init", "--profile", "generic", "--scratch-root", root, "--purge-days", "30")
        for i in range(count):
            path = os.path.join(root, "d%02d" % i)
            with new_dir(path) as fd:
                make_files(fd, 3, "f%d")
            tool("add", "--name", "d%02d" % i, "--path", path, "--keep-until", "2099-12-31")
        tool("refresh", "--check")
        return env, tool

    # -- phase 5: status --brief
    def bench_brief(self):
        """`status --brief` (what ~/.bashrc runs at each login) with BRIEF_DATASETS tiny
        datasets in a state directory of their own, each walked once in check mode so that
        the registry holds what a real one does: the median of --repeat whole processes."""
        tool = self.checked_datasets("brief", BRIEF_DATASETS)[1]
        tool("status", "--brief")           # untimed warm-up
        runs = [tool("status", "--brief") for _ in range(self.args.repeat)]
        self.report["brief"] = {
            "datasets": BRIEF_DATASETS, "median_s": median([r["seconds"] for r in runs]),
            "lines": len(runs[-1]["stdout"].splitlines()),
            "runs": [dict((k, r[k]) for k in ("seconds", "rc", "maxrss_kb")) for r in runs]}

    # -- phase 6: the login line
    def bench_login(self):
        """`status --brief` (what ~/.bashrc runs at each login) through each documented
        install, each installed as its instructions say, against a bare `python3 -c pass`:
        interleaved rounds (the order turning each round), medians, on each Python of
        login_pythons(). The state holds LOGIN_DATASETS datasets, each checked once."""
        a = self.args
        env = self.checked_datasets("login", LOGIN_DATASETS)[0]
        rounds = 5 if a.quick else LOGIN_ROUNDS
        result = {"rounds": rounds, "datasets": LOGIN_DATASETS, "pythons": {}}
        for py in login_pythons(a.quick):
            version = check_rc(run_proc([py, "-c", "import platform; print("
                                         "platform.python_version())"]), py)["stdout"].strip()
            log("login line on Python %s" % version)
            home = os.path.join(self.base, "login-" + version)
            os.mkdir(home)
            forms, notes = self.login_forms(py, home, env, skip_pip=a.quick)
            home_env = dict(env, HOME=home)     # the README's launcher names ~/bin
            times = dict((k, []) for k in forms)
            keys = list(forms)
            for i in range(rounds + 1):     # the first round untimed: caches warm
                for k in keys[i % len(keys):] + keys[:i % len(keys)]:
                    seconds = time_quick(forms[k], home_env, "login line: %s" % k)
                    if i:
                        times[k].append(seconds)
            med = dict((k, median(v)) for k, v in times.items())
            result["pythons"][version] = {
                "python": py, "median_s": med, "notes": notes,
                "ratios": dict((k, ratio(med[k], med["pass"])) for k in med if k != "pass")}
        self.report["login"] = result

    def login_forms(self, py, home, env, skip_pip=False):
        """The commands of the login line on Python py, each form installed under home as
        documented, and notes on a form that could not be installed."""
        a = self.args
        brief = ["status", "--brief"]
        forms, notes = {"pass": [py, "-c", "pass"]}, {}
        prefix = os.path.join(home, "prefix")
        check_rc(run_proc(["sh", str(a.tool.parent / "tools" / "install.sh"), "--prefix",
                           prefix, "--python", py, "--source", str(a.tool)],
                          env=dict(env, SCRATCH_KEEPALIVE_HOME=os.path.join(home, "none"))),
                 "install.sh")
        forms["install_sh"] = [os.path.join(prefix, "bin", "scratch-keepalive")] + brief
        if skip_pip:
            notes["pip"] = "not run with --quick"
        else:
            command, why = pip_install(py, home, a.tool, env)
            if command:
                forms["pip"] = [command] + brief
            else:
                notes["pip"] = why
        launcher = readme_launcher(home, py, a.tool)
        if launcher:
            forms["readme"] = [launcher] + brief
        else:
            notes["readme"] = "no copy-the-file launcher in %s" % README
        forms["script"] = [py, str(a.tool)] + brief
        return forms, notes

    # -- cleanup
    def cleanup(self):
        if not self.base or not os.path.isdir(self.base):
            return
        log("cleaning up %s" % self.base)
        subprocess.call(["rm", "-rf", "--one-file-system", self.base])
        shutil.rmtree(self.base, ignore_errors=True)


def login_pythons(quick):
    """The Pythons the login line is timed on: CPython 3.6 and the newest that pyenv has
    (else this one); with quick, this one only."""
    if quick:
        return [sys.executable]
    found = []
    for exe in PYENV_VERSIONS.glob("3.*/bin/python3"):
        parts = exe.parent.parent.name.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            found.append((tuple(int(p) for p in parts), str(exe)))
    found.sort()
    old = [exe for v, exe in found if v[:2] == (3, 6)]
    chosen = ([old[-1]] if old else []) + ([found[-1][1]] if found else [])
    return sorted(set(chosen), key=chosen.index) or [sys.executable]


def readme_launcher(home, py, tool):
    """The README's copy-the-file block run as printed, with home for ~ and py for python3:
    the launcher it writes (home/bin/scratch-keepalive), or None without that block."""
    import re
    try:
        text = README.read_text()
    except OSError:
        return None
    m = re.search(r"<!-- test: copy the file -->\s*```sh\n(.*?)```", text, re.S)
    if not m:
        return None
    pybin = os.path.join(home, "pybin")
    os.mkdir(pybin)
    os.symlink(py, os.path.join(pybin, "python3"))
    env = dict(os.environ, HOME=home, PATH="%s:%s" % (pybin, os.environ.get("PATH", "")))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    check_rc(run_proc(["bash", "-euo", "pipefail", "-c", m.group(1)], env=env,
                      cwd=str(tool.parent)), "the README's copy-the-file block")
    # The launcher names python3: bind it to py, as PATH would at login.
    launcher = os.path.join(home, "bin", "scratch-keepalive")
    with open(launcher) as f:
        text = f.read()
    with open(launcher, "w") as f:
        f.write(text.replace("exec python3 ", "exec %s " % py, 1))
    return launcher


def pip_install(py, home, tool, env):
    """`pip install` of the project (tool's directory) into a fresh venv of py, as the
    README's pip block does: (the console script, None), or (None, why not)."""
    src = os.path.join(home, "src")
    os.mkdir(src)
    for name in ("pyproject.toml", "README.md", "LICENSE", tool.name):
        if not (tool.parent / name).exists():
            return None, "no %s beside %s" % (name, tool)
        shutil.copy(str(tool.parent / name), src)
    venv = os.path.join(home, "venv")
    vpy = os.path.join(venv, "bin", "python")
    for argv in ([py, "-m", "venv", venv], [vpy, "-m", "pip", "install", "-q", "--upgrade", "pip"],
                 [vpy, "-m", "pip", "install", "-q", src]):
        # HOME: a fresh user's, as the README's block is pasted by one (no pip.conf of ours)
        r = run_proc(argv, env=dict(env, HOME=home), timeout=900)
        if r["rc"] != 0:
            return None, "%s failed: %s" % (" ".join(argv[1:4]), tail(r["stderr"], 1))
    return os.path.join(venv, "bin", "scratch-keepalive"), None


def tree_bytes(path):
    """The apparent size of the regular files under path."""
    total = 0
    for d, _, names in os.walk(path):
        for n in names:
            st = os.lstat(os.path.join(d, n))
            total += st.st_size if (st.st_mode & 0o170000) == 0o100000 else 0
    return total


def tool_kind(kind):
    """run_tool's arguments for a tool command of CMD_LABELS or BEFORE_LABELS (who runs
    it, check or touch mode, extra arguments); None for a floor."""
    who = kind.partition("_")[0]
    if who not in ("tool", "before"):
        return None
    return {"who": who, "check": "_check" in kind,
            "extra": ["--no-manifest"] if kind.endswith("_nomf") else []}


def vs_before(summary):
    """Per VS_BEFORE pair: this version's median over the --before copy's, and the noise
    it is judged against: the larger spread ((max - min) / median) of the two commands'
    runs in this same session."""
    out = {}
    for name, now, then in VS_BEFORE:
        a, b = summary[now], summary[then]
        spread = [ratio(s["max_s"] - s["min_s"], s["median_s"]) for s in (a, b)
                  if s["median_s"] is not None]
        out[name] = {"ratio": ratio(a["median_s"], b["median_s"]),
                     "noise": max(spread) if len(spread) == 2 else None}
    return out


def summarize(runs, entries):
    """Median and spread of one command's runs, peak memory, and the tool's counts."""
    secs = [r["seconds"] for r in runs if r["rc"] == 0]
    timings = [r.get("timing") or {} for r in runs]
    last = runs[-1]
    return {
        "n": len(secs), "median_s": median(secs), "min_s": min(secs) if secs else None,
        "max_s": peak(secs), "entries_per_s": ratio(entries, median(secs)),
        "peak_rss_kb": peak([r["maxrss_kb"] for r in runs]),
        "sum_pss_kb": peak([r.get("sum_pss_kb") for r in runs]),
        "max_procs": peak([r.get("max_procs") for r in runs]),
        "cpu_s": median([r["cpu_seconds"] for r in runs]),
        "checkpoint_share": median([r.get("checkpoint_share") for r in runs]),
        "checkpoints": peak([t.get("checkpoints") for t in timings]),
        "walk_s": median([t.get("walk_seconds") for t in timings]),
        "entries_seen": last.get("entries_seen"), "entries_touched": last.get("entries_touched"),
        "bytes_at_risk": last.get("bytes_at_risk"),
        "rc": [r["rc"] for r in runs], "failed_runs": len(runs) - len(secs),
    }


def tree_anomalies(runs, entries):
    """What the tool's own counts say went wrong in a tree's timed runs (exits: FAILED)."""
    out = set()
    for k in [k for k in runs if k.endswith(("_touch_old", "_check", "_touch_recent"))]:
        for r in runs[k]:
            seen, touched = r.get("entries_seen"), r.get("entries_touched")
            if seen is not None and seen != entries:
                out.add("%s: entries_seen %s, the stat walk counts %s"
                        % (k, fmt_int(seen), fmt_int(entries)))
            if r.get("errors"):
                out.add("%s: %s errors" % (k, fmt_int(r["errors"])))
            if k.endswith("_touch_old") and touched is not None and seen and touched != seen:
                out.add("%s: touched %s of %s entries" % (k, fmt_int(touched), fmt_int(seen)))
            if k.endswith("_touch_recent") and touched:
                out.add("%s: touched %s entries (expected 0)" % (k, fmt_int(touched)))
    return sorted(out)


def latency_summary(runs, variants, entries):
    """Per mode and variant: the summary of its runs and its speed-up over the mode's
    baseline, whole-process and from the tool's own walk_seconds (without start-up)."""
    summary = {}
    for mode in ("check", "touch"):
        for label, extra in variants:
            rs = runs["%s %s" % (mode, label)]
            s = summary["%s %s" % (mode, label)] = summarize(rs, entries)
            base = summary["%s %s" % (mode, variants[0][0])]   # the first variant's
            s.update({"mode": mode, "variant": label, "args": extra,
                      "who": "before" if label.startswith("before") else "tool",
                      "baseline": label == variants[0][0],
                      "speedup": ratio(base["median_s"], s["median_s"]),
                      "walk_speedup": ratio(base["walk_s"], s["walk_s"]),
                      "shim_counts": rs[-1]["shim_counts"],
                      "delayed_calls": sum(v["delayed"] for v in rs[-1]["shim_counts"].values())})
    return summary

# ---------------------------------------------------------------- the report


def table(w, header, rows, left=1):
    """Writes header and rows in columns as wide as their widest cell: the first `left`
    columns (what was run) and the last (notes) left-aligned, the figures right-aligned."""
    rows = [header] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        w("  ".join(c.ljust(n) if i < left or i == len(r) - 1 else c.rjust(n)
                    for i, (c, n) in enumerate(zip(r, widths))).rstrip() + "\n")


def render_header(report, w):
    m, c, st = report["machine"], report["config"], report["startup"]
    w("scratch-keepalive benchmark\n" + "=" * 78 + "\n")
    for label, text in [
            ("machine", "%(cpu_model)s, %(cores)s cores (%(cores_usable)s usable), "
                        "%(memory_mb)s MiB RAM, %(machine)s" % m),
            ("kernel", "%s, %s" % (m["kernel"], m["glibc"] or "libc ?")),
            ("workdir", "%(workdir)s on %(fs_mount)s (%(fs_type)s, %(fs_options)s)" % m),
            ("python", m["python"]), ("tools", "%(gcc)s; %(find)s" % m),
            ("tool", "%s (%s), its default --threads/--workers, run %s"
                     % (report["tool_version"], c["tool"],
                        "as its scheduled job runs it: `python3 -c LOADER TOOL` (bytecode "
                        "from __pycache__)" if st.get("form") == "job" else "as `python3 TOOL`")),
            ("before", "%s (%s), timed in the same rounds, loaded the same way; its own state"
                       " directory" % (report.get("before_version"), c["before"])),
            ("run", "%s, host %s, load %s at start%s"
                    % (m["date"], m["hostname"], m["loadavg_at_start"],
                       ", SLURM_JOB_ID set" if m["slurm_job_id"] else "")),
            ("method", "scale %s%s, medians of %d interleaved runs of whole processes, warm "
                       "caches (an untimed warm-up per tree); 'old' = every atime reset to %d "
                       "days ago first (C helper, untimed); 'recent' = right after a touch "
                       "run; stat floor: C walker, fstatat AT_SYMLINK_NOFOLLOW, one thread"
                       % (c["scale"], " (--quick)" if c["quick"] else "", c["repeat"],
                          c["old_days"])),
            ("start-up", "`python -c pass` %.0f ms, the tool's `--version` %.0f ms "
                         "(medians of 5; part of every tool figure); peak RSS of `--version`: "
                         "%s, and %s as `python3 TOOL` (compiling the file)"
                         % (1000 * st["python_pass_s"], 1000 * st["tool_version_s"],
                            fmt_mb(st.get("peak_rss_kb")), fmt_mb(st.get("script_peak_rss_kb"))))] \
            + [("note", n) for n in report["notes"]]:
        if label != "before" or c["before"]:
            w("%-8s: %s\n" % (label, text))
    cmds = report.get("commands")
    if cmds:
        w("timed command lines (first tree; the others differ only in name and path):\n")
        for k, label in CMD_LABELS + BEFORE_LABELS + [
                ("atime_reset", "untimed, before each 'old' run")]:
            if k in cmds:
                w("  %-31s %s\n" % (label, " ".join(cmds[k])))


def run_notes(k, s):
    tool, touch = bool(tool_kind(k)), k.endswith(("_touch_old", "_touch_recent"))
    return ", ".join(text for show, text in (
        (tool, "seen %s" % fmt_int(s["entries_seen"])),
        (touch, "touched %s" % fmt_int(s["entries_touched"])),
        (tool and s["checkpoints"], "%s checkpoints" % s["checkpoints"]),
        (s["failed_runs"], "%d FAILED" % s["failed_runs"])) if show)


def render_trees(report, w):
    for key, tr in report["trees"].items():
        w("\n== %s: %s, %s entries (built in %.1f s) ==\n"
          % (key, tr["title"], fmt_int(tr["entries"]), tr["build_seconds"]))
        rows = [["C stat walk" if k == "stat_walk" else label, fmt("%.3f", s["median_s"]),
                 fmt("%.3f", s["min_s"]), fmt_rate(s["entries_per_s"]),
                 fmt_mb(s["peak_rss_kb"]) if tool_kind(k) else "", run_notes(k, s)]
                for k, label in CMD_LABELS + BEFORE_LABELS if k in tr["summary"]
                for s in [tr["summary"][k]]]
        table(w, ["command", "median s", "min s", "entries/s", "peak RSS", "notes"], rows)
        w("ratios: touch / find-touch %s | check / stat walk %s | all-skipped / stat walk %s\n"
          % tuple(fmt("%.2fx", tr["ratios"][k])
                  for k in ("touch_vs_find", "check_vs_walk", "skipped_vs_walk")))
        mf = tr.get("manifest") or {}
        w("manifest: %s bytes for %s entries = %s bytes per entry (first walk: the tree's own "
          "sizes and atimes); walk with / without it: touch %s, check %s\n"
          % (fmt_int(mf.get("bytes")), fmt_int(mf.get("entries")),
             fmt("%.2f", mf.get("bytes_per_entry")),
             fmt("%.2fx", tr["ratios"].get("touch_manifest_cost")),
             fmt("%.2fx", tr["ratios"].get("check_manifest_cost"))))
        if tr.get("vs_before"):
            w("this version / before: %s (noise: the larger spread of the two commands' runs)\n"
              % " | ".join("%s %s (noise %s)" % (name, fmt("%.2fx", v["ratio"]),
                                                   fmt("%.0f%%", v["noise"], 100))
                           for name, _, _ in VS_BEFORE for v in [tr["vs_before"][name]]))
        for a in tr["anomalies"]:
            w("CHECK: %s\n" % a)


def render_memory(report, w):
    mem = report["memory"]
    if not mem:
        return
    w("\n== memory: tool peak RSS (wait4 ru_maxrss: the largest single process) and "
      "the process tree's sampled peak PSS sum ==\n")
    ms = mem["summary"]
    table(w, ["tree", "mode", "entries", "peak RSS", "PSS sum", "procs", "median s", ""],
          [[key, mode, fmt_int(mem["entries"][key]), fmt_mb(s["peak_rss_kb"]),
            fmt_mb(s["sum_pss_kb"]), str(s["max_procs"]), fmt("%.3f", s["median_s"]),
            "FAILED (exit %s)" % s["rc"] if any(s["rc"]) else ""]
           for mode in mem["runs"] for key in ("mem100k", "mem1m", "mem1dir")
           for s in [ms[mode + "_" + key]]], left=2)
    w("growth from %s to %s entries: check %+.1f MiB, touch %+.1f MiB\n"
      % ((fmt_int(mem["entries"]["mem100k"]), fmt_int(mem["entries"]["mem1m"]))
         + tuple((ms[m + "_mem1m"]["peak_rss_kb"] - ms[m + "_mem100k"]["peak_rss_kb"]) / 1024.0
                 for m in ("check", "touch"))))
    w("mem1dir (%s) is the same walk with every entry in one directory: memory that grows "
      "with a directory's size shows here (not used for the targets)\n"
      % mem["titles"]["mem1dir"])
    cp = report.get("checkpoint_probe") or {}
    if cp.get("checkpoints"):
        w("checkpoints: %s --check --checkpoint-every %g wrote %d checkpoints, %.2f ms each, "
          "%.3f%% of the walk; at the tool's %g s interval that is %.3f%%\n"
          % (cp["tree"], cp["checkpoint_every"], cp["checkpoints"],
             1000 * cp["seconds_per_checkpoint"], 100 * cp["share_at_forced_interval"],
             TOOL_CHECKPOINT_S, 100 * cp["share_at_default_interval"]))


def render_latency(report, w):
    lat = report["latency"]
    if not lat:
        return
    w("\n== latency: LD_PRELOAD shim, +%.2f ms per stat/utimensat call under the tree "
      "(%s: %s entries) ==\n" % (lat["latency_ms"], lat["title"], fmt_int(lat["entries"])))
    table(w, ["mode", "tool arguments", "median s", "entries/s", "speed-up", "walk s-up",
              "peak RSS", "delayed calls", ""],
          [[s["mode"], s["variant"], fmt("%.3f", s["median_s"]), fmt_rate(s["entries_per_s"]),
            fmt("%.2fx", s["speedup"]), fmt("%.2fx", s["walk_speedup"]),
            fmt_mb(s["peak_rss_kb"]), fmt_int(s["delayed_calls"]),
            "%d FAILED" % s["failed_runs"] if s["failed_runs"] else ""]
           for s in lat["summary"].values()], left=2)
    w("(speed-up: whole process vs `%s`; walk s-up: the same from the tool's own "
      "walk_seconds, without start-up; peak RSS: the largest single process)\n"
      % lat["variants"][0])
    base = lat["summary"]["check " + lat["variants"][0]]
    if base["walk_s"] and base["delayed_calls"]:
        w("(the sequential check walk took %.3f ms per delayed call: the delay, nanosleep's "
          "overshoot and the tool's own work)\n" % (1000 * base["walk_s"] / base["delayed_calls"]))
    for a in lat["anomalies"]:
        w("CHECK: %s\n" % a)


def render_rescue(report, w):
    rs = report.get("rescue")
    if not rs:
        return
    w("\n== rescue: %s (%s entries, %s), %s, medians of %d interleaved rounds ==\n"
      % (rs["title"], fmt_int(rs["entries"]), fmt_mb(rs["bytes"] / 1024.0),
         "page cache dropped before each copy" if rs["caches_dropped"]
         else "caches NOT dropped", rs["rounds"]))
    table(w, ["command", "median s", "min s", "max s", "MiB/s", "vs tar", "copied", "notes"],
          [[label, fmt("%.3f", s["median_s"]), fmt("%.3f", s["min_s"]), fmt("%.3f", s["max_s"]),
            fmt("%.1f", ratio(rs["bytes"] / 1048576.0, s["median_s"])),
            "" if k == "tar" else fmt("%.2fx", rs["ratios"]["%s_vs_tar" % k]),
            fmt_int(rs["copied_entries"].get(k)),
            "%d FAILED" % s["failed_runs"] if s["failed_runs"] else ""]
           for k, label in RESCUE_LABELS if k in rs["summary"] for s in [rs["summary"][k]]])
    w("(copied: the entries the stat floor counts in the copy after the first round; the "
      "tool leaves its sentinel behind)\n")
    lat = rs.get("latency")
    if not lat:
        return
    w("rescue under the shim, +%.2f ms per open/create/rename/stat/utimensat under the source "
      "and the destination (%s: %s entries, warm caches, medians of %d rounds):\n"
      % (lat["latency_ms"], lat["title"], fmt_int(lat["entries"]), lat["rounds"]))
    table(w, ["tool arguments", "median s", "min s", "max s", "speed-up", "delayed calls", ""],
          [[label, fmt("%.3f", s["median_s"]), fmt("%.3f", s["min_s"]), fmt("%.3f", s["max_s"]),
            fmt("%.2fx", s["speedup"]), fmt_int(s["delayed_calls"]),
            "%d FAILED" % s["failed_runs"] if s["failed_runs"] else ""]
           for label in lat["variants"] for s in [lat["summary"][label]]], left=1)
    for who, has in sorted(lat["threads"].items()):
        if not has:
            w("(%s: its rescue has no --threads option; timed as it is, one copy at a time)\n"
              % ("this version" if who == "tool" else "the --before copy"))
    for x in lat["anomalies"]:
        w("CHECK: %s\n" % x)


def render_targets(report, w):
    quick = report["config"]["quick"]
    w("\nTARGETS" + (" not judged: with --quick the trees are so small that start-up "
                     "dominates; run without --quick to judge them. Figures" if quick else "")
      + ": " + " | ".join("%s%s (%s)" % (name, "" if quick else " " + state, text)
                          for name, (state, text) in report["verdicts"].items()) + "\n")


def render_login(report, w):
    lg = report.get("login")
    if not lg:
        return
    w("\n== the login line: `status --brief` (%d datasets) through each documented install, "
      "medians of %d interleaved rounds ==\n" % (lg["datasets"], lg["rounds"]))
    rows = []
    for version, p in sorted(lg["pythons"].items()):
        row = [version]
        for key, _, _ in LOGIN_FORMS:
            s = p["median_s"].get(key)
            row.append("n/a" if s is None else "%.1f ms%s" % (1000 * s, "" if key == "pass"
                                                              else " (%.2fx)" % p["ratios"][key]))
        rows.append(row + ["; ".join("%s: %s" % kv for kv in sorted(p["notes"].items()))])
    table(w, ["Python"] + [label for _, label, _ in LOGIN_FORMS] + [""], rows)
    w("(the ratios: against `python3 -c pass` on the same Python; the target, %.1fx, is "
      "judged on the documented forms, not on a bare `python3 FILE`)\n" % TARGETS["login_vs_pass"])


def render_brief(report, w):
    b = report["brief"]
    if b:
        w("\n== status --brief with %d datasets (each checked once): %.0f ms (median of %d "
          "whole processes, start-up included), %d line(s) printed ==\n"
          % (b["datasets"], 1000 * b["median_s"], len(b["runs"]), b["lines"]))


# The report's sections, in order; each writes what its part of the report holds.
SECTIONS = (render_header, render_trees, render_memory, render_latency, render_rescue,
            render_brief, render_login, render_targets)

# ---------------------------------------------------------------- the targets


def worst_ratio(trees, key):
    vals = [(t["ratios"][key], k) for k, t in trees if t["ratios"][key] is not None]
    if not vals:
        return ("n/a", "no data")
    x, k = max(vals)
    return ("PASS" if x <= TARGETS[key] else "FAIL",
            "%.2fx %s, limit %.1fx" % (x, k, TARGETS[key]))


def threads_verdict(lat):
    best = {}
    for s in (lat or {}).get("summary", {}).values():
        if not s["baseline"] and s["speedup"] is not None and s["who"] == "tool":
            best[s["mode"]] = max(best.get(s["mode"], (0, "")), (s["speedup"], s["variant"]))
    if not best:
        return ("n/a", "not measured")
    return ("PASS" if min(best.values())[0] >= TARGETS["threads_speedup"] else "FAIL",
            "%s at %.2f ms" % (", ".join("%s %.1fx with %s" % (m, b[0], b[1])
                                         for m, b in sorted(best.items())), lat["latency_ms"]))


def memory_verdict(mem):
    if not mem:
        return ("n/a", "not measured")
    ss = [mem["summary"]["check_mem1m"], mem["summary"]["touch_mem1m"]]
    rss = max(x["peak_rss_kb"] for x in ss) / 1024.0
    pss = max(x["sum_pss_kb"] for x in ss) / 1024.0
    return ("PASS" if max(rss, pss) <= TARGETS["rss_mb_1m"] else "FAIL",
            "largest process %.1f MiB, %d process(es) together %.1f MiB PSS, at %s entries"
            % (rss, max(x["max_procs"] for x in ss), pss, fmt_int(mem["entries"]["mem1m"])))


def checkpoint_verdict(cp):
    """No timed run lasts the tool's checkpoint interval, so the target is judged on the
    forced probe: the cost of one checkpoint against one interval of walking."""
    if not cp.get("checkpoints"):
        return ("n/a", "not measured" if not cp else "the forced probe wrote no checkpoint")
    x = cp["share_at_default_interval"]
    return ("PASS" if x <= TARGETS["checkpoint_share"] else "FAIL",
            "%.2f ms per checkpoint = %.3f%% at one per %g s"
            % (1000 * cp["seconds_per_checkpoint"], 100 * x, TOOL_CHECKPOINT_S))


def targets(report):
    """PASS/FAIL/n/a per target, with the figure it was judged on."""
    trees = list(report["trees"].items())
    return {
        "touch<=1.0x find-touch": worst_ratio(trees, "touch_vs_find"),
        "check<=1.5x stat-walk": worst_ratio(trees, "check_vs_walk"),
        "all-skipped<=1.5x stat-walk": worst_ratio(trees, "skipped_vs_walk"),
        "threads>=10x": threads_verdict(report["latency"]),
        "RSS<=32MiB@1M": memory_verdict(report["memory"]),
        "checkpoint<=2%": checkpoint_verdict(report.get("checkpoint_probe") or {}),
        "manifest<=20B/entry": manifest_verdict(report["trees"].get("wide")),
        "no-slower-than-before": before_verdict(trees),
        "login<=2.0x python-c-pass": login_verdict(report.get("login")),
        "rescue<=1.0x tar": rescue_verdict(report.get("rescue")),
        "rescue-threads>=5x": rescue_threads_verdict(report.get("rescue")),
    }


def rescue_verdict(rs):
    x = ((rs or {}).get("ratios") or {}).get("tool_rescue_vs_tar")
    if x is None:
        return ("n/a", "not measured")
    return ("PASS" if x <= TARGETS["rescue_vs_tar"] else "FAIL",
            "%.2fx tar's pipeline, limit %.1fx" % (x, TARGETS["rescue_vs_tar"]))


def rescue_threads_verdict(rs):
    lat = (rs or {}).get("latency")
    if not lat:
        return ("n/a", "not measured")
    if not lat["threads"].get("tool"):
        return ("FAIL", "rescue has no --threads option (1.0x)")
    x, label = max((s["speedup"], k) for k, s in lat["summary"].items()
                   if s["who"] == "tool" and s["speedup"] is not None)
    return ("PASS" if x >= TARGETS["rescue_threads_speedup"] else "FAIL",
            "%.1fx with %s at %.2f ms" % (x, label, lat["latency_ms"]))


def login_verdict(lg):
    """The slowest documented form of the login line, on any of the Pythons."""
    vals = [(p["ratios"][key], "%s on %s" % (label, version))
            for version, p in (lg or {}).get("pythons", {}).items()
            for key, label, judged in LOGIN_FORMS if judged and key in p["ratios"]]
    if not vals:
        return ("n/a", "not measured")
    x, where = max(vals)
    return ("PASS" if x <= TARGETS["login_vs_pass"] else "FAIL",
            "%.2fx %s, limit %.1fx" % (x, where, TARGETS["login_vs_pass"]))


def manifest_verdict(tree):
    x = ((tree or {}).get("manifest") or {}).get("bytes_per_entry")
    if x is None:
        return ("n/a", "not measured")
    return ("PASS" if x <= TARGETS["manifest_bytes"] else "FAIL",
            "%.2f bytes per entry on the wide tree" % x)


def before_verdict(trees):
    """With --before: this version's --no-manifest walks (the engines the two versions
    share; the old one writes no manifest) against the old copy's, within the noise."""
    pairs = [(v["ratio"], v["noise"], "%s %s" % (name, k)) for k, t in trees
             for name, v in (t.get("vs_before") or {}).items()
             if "manifest" not in name and v["ratio"] is not None and v["noise"] is not None]
    if not pairs:
        return ("n/a", "not measured (--before OLD)")
    bad = [p for p in pairs if p[0] > 1 + p[1]]
    x, noise, where = max(bad or pairs, key=lambda p: p[0] - p[1])
    return ("FAIL" if bad else "PASS", "%.2fx %s, noise %.0f%%" % (x, where, 100 * noise))

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
    p.add_argument("--only", default=",".join(PHASES),
                   help="comma-separated phases (default: all of %(default)s)")
    p.add_argument("--tool", type=Path, default=TOOL,
                   help="the tool (default %(default)s)")
    p.add_argument("--before", type=Path, metavar="OLD",
                   help="an earlier copy of the tool, timed in the same rounds to compare")
    a = p.parse_args(argv)
    a.scale = (0.01 if a.quick else 1.0) if a.scale is None else a.scale
    a.latency_entries = 1000 if a.quick else 10000
    a.only = set(x.strip() for x in a.only.split(",") if x.strip())
    a.workdir = os.path.abspath(a.workdir)
    for bad, why in ((a.repeat < 1, "--repeat must be at least 1"),
                     (a.scale <= 0, "--scale must be positive"),
                     (a.only - set(PHASES), "unknown phase(s) in --only: %s"
                      % ", ".join(sorted(a.only - set(PHASES))))):
        if bad:
            p.error(why)
    return a


def failed_runs(node, where="report"):
    """Where in the report a run's exit code ("rc") is not 0."""
    if isinstance(node, list):
        node = dict(("%d" % i, v) for i, v in enumerate(node))
    if not isinstance(node, dict):
        return []
    bad = [where] if isinstance(node.get("rc"), int) and node["rc"] != 0 else []
    return bad + [x for k, v in node.items() for x in failed_runs(v, where + "/" + k)]


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    gcc = shutil.which("gcc") or shutil.which("cc")
    for bad, why in ((not args.tool.exists(), "%s does not exist" % args.tool),
                     (args.before and not args.before.exists(),
                      "%s does not exist" % args.before),
                     (not gcc, "no gcc or cc on PATH (the stat floor and the latency shim are C)")):
        if bad:
            sys.stderr.write("bench: %s\n" % why)
            return 2
    b = Bench(args, gcc)
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
    if (b.report["trees"] or b.report["memory"] or b.report["latency"] or b.report["rescue"]
            or b.report["brief"] or b.report["login"]):
        try:
            b.report["verdicts"] = targets(b.report)
            for section in SECTIONS:
                section(b.report, sys.stdout.write)
        except Exception:
            crashed = True
            traceback.print_exc()
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(b.report, indent=2, sort_keys=True, default=str) + "\n")
        log("figures written to %s" % args.json)
    bad = failed_runs(b.report)
    if bad:
        log("a timed command exited non-zero: %s" % ", ".join(bad))
    return 130 if interrupted else 1 if (crashed or bad) else 0


if __name__ == "__main__":
    sys.exit(main())
