"""The one test harness: an isolated state dir and scratch root, the environment of a tool
run, in-process and subprocess runners, the error assertion, file and atime helpers, and a
way to hold a running tool at a chosen point (the pause shim).

Every test runs with a fixed policy clock (SCRATCH_KEEPALIVE_NOW), TZ=UTC and
its own state directory; nothing reads or writes the real ~/.local/state.
"""
import contextlib
import io
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scratch_keepalive.py"
sys.path.insert(0, str(REPO))

import scratch_keepalive as sk  # noqa: E402

# The policy clock used by every test. Real files created now are ~3 years
# older than this, so they count as old (touched, at risk, purge-eligible).
NOW = "2030-01-01T00:00:00Z"
NOW_EPOCH = sk.parse_iso(NOW)
DAY = 86400
KEEP = "2030-06-30"         # a keep-until date after NOW
ERROR = "scratch-keepalive: error: "
# Variables that would point a tool run at another scratch root, state dir or Slurm job.
CLEARED_ENV = ("SCRATCH_KEEPALIVE_SCRATCH_ROOT", "XDG_STATE_HOME", "SLURM_JOB_ID", "SCRATCH")


class Result(object):
    def __init__(self, rc, out, err):
        self.rc, self.out, self.err = rc, out, err

    def json(self):
        import json
        return json.loads(self.out)

    def __repr__(self):
        return "Result(rc=%r, out=%r, err=%r)" % (self.rc, self.out[-2000:], self.err[-2000:])


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An isolated environment: state dir, scratch root, fixed clock, UTC."""
    state = tmp_path / "state"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    values = {
        "SCRATCH_KEEPALIVE_HOME": str(state),
        "SCRATCH_KEEPALIVE_NOW": NOW,
        "TZ": "UTC",
        "HOME": str(tmp_path / "home"),
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    for k in CLEARED_ENV:
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "home").mkdir()
    return {"state": state, "scratch": scratch, "tmp": tmp_path}


@pytest.fixture
def cli(env):
    """Run main(argv) in-process; returns Result(rc, out, err)."""
    def run(*argv):
        out, err = io.StringIO(), io.StringIO()
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            rc = sk.main([str(a) for a in argv])
        finally:
            sys.stdout, sys.stderr = old
        return Result(rc, out.getvalue(), err.getvalue())
    return run


def tool_env(state, **extra):
    """The whole environment of a tool run in a subprocess (pass it with clean=True): this
    process's without CLEARED_ENV, with state as its state dir, the fixed clock and UTC;
    extra on top."""
    env = dict((k, v) for k, v in os.environ.items() if k not in CLEARED_ENV)
    env.update({"SCRATCH_KEEPALIVE_HOME": str(state), "SCRATCH_KEEPALIVE_NOW": NOW, "TZ": "UTC"})
    env.update(extra)
    return env


def assert_error(r, code, *words, quiet=False):
    """r failed with exit code `code` (None: any) and exactly one `scratch-keepalive: error:`
    line on stderr that says every one of words, no traceback (and no internal error unless
    words ask for one); quiet: and nothing on stdout. Returns the line."""
    if code is not None:
        assert r.rc == code, r
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), r
    for w in words:
        assert w in lines[0], (w, r)
    assert "Traceback" not in r.err, r
    if "internal error" not in words:
        assert "internal error" not in r.err, r
    if quiet:
        assert r.out == "", r
    return lines[0]


def run_command(argv, env=None, clean=False, user=None, prefix=(), input_text=None, cwd=None,
                timeout=300, preexec_fn=None):
    """The one way the tests start a process; Result(rc, out, err).

    env adds to this process's environment, or with clean=True is the whole of it. user runs
    argv as that user (`runuser -u USER -- env -i ENV...`: nothing of root's leaks in, as for
    the Slurm tests). prefix goes in front (e.g. setpriv for an unprivileged user). stdout
    must be strict UTF-8 (the tool never prints anything else); stderr is decoded leniently.
    """
    full_env = dict(env or {}) if clean or user else dict(os.environ, **(env or {}))
    cmd = list(prefix) + [str(a) for a in argv]
    if user:
        cmd = ["runuser", "-u", user, "--", "env", "-i"] + [
            "%s=%s" % kv for kv in sorted(full_env.items())] + cmd
        full_env = None         # runuser itself runs with root's environment
    p = subprocess.run(cmd, input=None if input_text is None else input_text.encode(),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=cwd,
                       timeout=timeout, preexec_fn=preexec_fn)
    return Result(p.returncode, p.stdout.decode("utf-8"), p.stderr.decode("utf-8", "replace"))


def tool_argv(python=None, script=None):
    """The command that starts the tool in a subprocess: `python3 -c LOADER FILE`, as its
    scheduled job and the launchers start it, from its bytecode (compiled once per session
    and Python, see _COMPILED), not compiled anew by every run. It behaves as `python3 FILE`
    does; the tests of that bare form (the README's quick start, a copied file) start it so."""
    python = python or sys.executable
    if script is None and python not in _COMPILED:
        # Written where LOADER looks for it, also when PYTHONDONTWRITEBYTECODE keeps every
        # run from writing it (as in CI).
        subprocess.run([python, "-c", "import py_compile, sys; py_compile.compile("
                        "sys.argv[1], doraise=True)", str(SCRIPT)], check=True)
        _COMPILED.add(python)
    return [python, "-c", sk.LOADER, str(script or SCRIPT)]


_COMPILED = set()       # the Pythons that have the tool's bytecode (tool_argv)


def run_script(*argv, python=None, script=None, **kw):
    """Run the tool as users do, in a subprocess (tool_argv); Result(rc, out, err).

    Keyword arguments as run_command's (env, clean, user, prefix, cwd, timeout, ...)."""
    return run_command(tool_argv(python, script) + list(argv), **kw)


def start_script(*argv, env, python=None, script=None, **kw):
    """The tool started as run_script runs it, but not waited for: a Popen in a session of
    its own (so that `reaped` and a signal to its group reach its workers too), output piped;
    env is its whole environment (tool_env)."""
    cmd = tool_argv(python, script) + [str(a) for a in argv]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, **kw)


def run_in(state, *argv, **extra):
    """The tool in a subprocess with state as its state dir (tool_env, extra added)."""
    return run_script(*argv, env=tool_env(state, **extra), clean=True)


def setup_dataset(state, scratch, path, name="ds"):
    """init (generic profile, scratch root scratch) and add path as name, in subprocesses."""
    r = run_in(state, "init", "--profile", "generic", "--scratch-root", scratch)
    assert r.rc == 0, r
    r = run_in(state, "add", "--name", name, "--path", path, "--keep-until", KEEP)
    assert r.rc == 0, r


OLD_ATIME = NOW_EPOCH - 400 * DAY       # older than any threshold: a walk would touch it


def small_dataset(scratch, name="ds", files=40):
    """scratch/name/sub with `files` one-byte files, every one at OLD_ATIME."""
    root = Path(scratch) / name
    (root / "sub").mkdir(parents=True)
    for i in range(files):
        (root / "sub" / ("f%02d" % i)).write_bytes(b"x")
    for p in (root / "sub").iterdir():
        set_atime(p, OLD_ATIME)
    return root


def atimes(root):
    """{relative path: atime_ns} of the files below root but the sentinel (lstat; listing moves
    no atime that matters here: only files' atimes are compared)."""
    out = {}
    for dirpath, dirs, files in os.walk(str(root)):
        for n in files:
            if n == ".scratch-keepalive":
                continue
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, str(root))] = os.lstat(p).st_atime_ns
    return out


@pytest.fixture
def generic(cli, env):
    """A generic-profile setup (purge 30 days) with an initialised state dir."""
    r = cli("init", "--profile", "generic", "--scratch-root", env["scratch"])
    assert r.rc == 0, r
    return env


def make_dataset(root, name="ds", files=3):
    """A small dataset directory with files, a subdirectory and a symlink."""
    d = Path(root) / name
    (d / "sub").mkdir(parents=True)
    for i in range(files):
        (d / ("f%d" % i)).write_bytes(b"x" * (i + 1))
        (d / "sub" / ("g%d" % i)).write_bytes(b"y")
    os.symlink("f0", str(d / "link"))
    return d


def set_atime(path, epoch=None, ns=None):
    """Set atime to epoch seconds (or ns nanoseconds), keeping mtime exactly, without
    following a symlink. path may be str, bytes or a Path."""
    path = path if isinstance(path, bytes) else str(path)
    st = os.lstat(path)
    ns = int(epoch * 1e9) if ns is None else ns
    os.utime(path, ns=(ns, st.st_mtime_ns), follow_symlinks=False)


def write_private(path, data):
    """Write a state file the way the tool does (0600), so that only an injected fault shows."""
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def snapshot(root):
    """{relative path: (atime_ns, mtime_ns, size, mode)} of every entry, symlinks not followed.

    Directories are listed with O_NOATIME so that taking a snapshot does not
    itself move their access times.
    """
    out = {}
    root = os.fsencode(str(root))

    def listdir(path):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOATIME", 0))
        except PermissionError:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return [os.fsencode(n) for n in os.listdir(fd)]
        finally:
            os.close(fd)

    stack = [b""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else root
        st = os.lstat(path)
        key = os.fsdecode(rel) if rel else "."
        out[key] = (st.st_atime_ns, st.st_mtime_ns, st.st_size, st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            try:
                names = listdir(path)
            except PermissionError:
                continue
            stack.extend(os.path.join(rel, n) if rel else n for n in names)
    return out


def tree_bytes(*roots, skip=()):
    """Everything under roots, symlinks not followed, to show that nothing changed:
    {relative path: ("dir", mode) | ("link", target) | (mode, bytes)}, a directory's key
    ending in "/"; with several roots each key starts with its root's name. Directories
    named in skip (e.g. "locks", whose empty lock files a refused command may create) are
    left out."""
    out = {}
    for root in roots:
        root = str(root)
        tag = os.path.basename(root) if len(roots) > 1 else ""
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in skip]
            rel = os.path.join(tag, os.path.relpath(dirpath, root))
            out[rel + "/"] = ("dir", stat.S_IMODE(os.lstat(dirpath).st_mode))
            for f in files:
                p = os.path.join(dirpath, f)
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    out[os.path.normpath(os.path.join(rel, f))] = ("link", os.readlink(p))
                else:
                    with open(p, "rb") as fh:
                        out[os.path.normpath(os.path.join(rel, f))] = (
                            stat.S_IMODE(st.st_mode), fh.read())
    return out


def pyenv_pythons():
    """Every CPython 3.6-3.13 under pyenv, oldest first (empty where pyenv is absent)."""
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = []
    for v in sorted(os.listdir(os.path.join(root, "versions"))) if os.path.isdir(
            os.path.join(root, "versions")) else []:
        exe = os.path.join(root, "versions", v, "bin", "python3")
        parts = v.split(".")
        if (os.access(exe, os.X_OK) and len(parts) >= 2 and parts[0] == "3"
                and parts[1].isdigit() and 6 <= int(parts[1]) <= 13):
            found.append((v, exe))
    found.sort(key=lambda vx: tuple(int(x) for x in vx[0].split(".")[:3] if x.isdigit()))
    return found


def nonroot_runner():
    """A way to run a command as an unprivileged user, or None.

    Returns (prefix argv, python path usable by that user). Used for
    permission-denied tests, which mean nothing when run as root.
    """
    if os.geteuid() != 0:
        return [], sys.executable
    setpriv = shutil.which("setpriv")
    py = "/usr/bin/python3"
    if not setpriv or not os.access(py, os.X_OK):
        return None
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"], py


NOBODY = 65534


def run_as_nobody(home, state, now=NOW, need_root=True, **extra):
    """A function that runs the tool (as run_script, keyword arguments passed on) as the
    unprivileged user nobody, through setpriv, with nothing of this process's environment:
    HOME home, state as its state directory, the fixed clock (or now), UTC; extra on top.
    It carries env, prefix and python for a caller that starts the process itself. Skips
    where that cannot be: no setpriv, or (need_root) not root, so that no file of another
    owner could be made. Not root and need_root False: the tool runs as this user."""
    runner = nonroot_runner()
    if runner is None or (need_root and os.geteuid() != 0):
        pytest.skip("needs root, and setpriv, to run the tool as the user nobody")
    prefix, python = runner
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "USER": "nobody", "TZ": "UTC",
           "LANG": "C.UTF-8", "SCRATCH_KEEPALIVE_HOME": str(state),
           "SCRATCH_KEEPALIVE_NOW": now}
    env.update(extra)

    def run(*argv, **kw):
        return run_script(*[str(a) for a in argv], prefix=prefix, python=python, env=env,
                          clean=True, **kw)
    run.env, run.prefix, run.python = env, prefix, python
    return run


def give_to_nobody(*tops, keep=()):
    """chown to nobody, without following a symlink, each of tops and everything below
    it, but the paths in keep (as root only: elsewhere nothing changes)."""
    if os.geteuid() != 0:
        return
    keep = set(str(k) for k in keep)
    for top in tops:
        paths = [str(top)] + [os.path.join(dp, n) for dp, dns, fns in os.walk(str(top))
                              for n in dns + fns]
        for p in paths:
            if p not in keep:
                os.lchown(p, NOBODY, NOBODY)


@pytest.fixture
def mounts():
    """mount(8) as root: mount(*argv) mounts (skipping the test where that is not
    permitted); every mount point is unmounted afterwards, innermost first."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting needs root and mount(8)")
    made = []

    def mount(*argv):
        p = subprocess.run(["mount"] + [str(a) for a in argv], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        if p.returncode != 0:
            pytest.skip("mount is not permitted here: %s" % p.stderr.decode(errors="replace"))
        if str(argv[-1]) not in made:       # a remount is the same mount
            made.append(str(argv[-1]))
    yield mount
    for target in reversed(made):
        if subprocess.run(["umount", target]).returncode != 0:
            subprocess.run(["umount", "-l", target])


@pytest.fixture
def shm_tmp(tmp_path):
    """A temp dir on tmpfs (/dev/shm) where there is one, else tmp_path: a big tree is built
    there several times faster than on disk."""
    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK)):
        yield tmp_path
        return
    d = tempfile.mkdtemp(prefix="sk-test-", dir=shm)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def world_tmp():
    """A temp dir any user can enter (for tests that run as an unprivileged user)."""
    d = tempfile.mkdtemp(prefix="sk-test-")
    os.chmod(d, 0o777)
    yield Path(d)
    subprocess.run(["chmod", "-R", "u+rwx", d])
    shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def reaped(proc):
    """Whatever fails inside, the process group of proc (started with its own session) is
    not left running."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def poll(condition, what, timeout=60.0, interval=0.002):
    """Call condition() until it returns something true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


def on_a_terminal(argv):
    """main(argv) in-process with stderr on a pseudo-terminal (stdout to /dev/null), as a
    person at a shell sees it: (exit code, what the terminal got)."""
    import pty
    master, slave = pty.openpty()
    tty = os.fdopen(slave, "w")
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = open(os.devnull, "w"), tty
    try:
        rc = sk.main(argv)
    finally:
        sys.stdout.close()
        sys.stdout, sys.stderr = old
        tty.close()
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    return rc, seen.decode("utf-8", "replace")


# ---------------------------------------------------------------- holding a run at a point

@pytest.fixture(scope="session")
def pause_shim(tmp_path_factory):
    """The path of tests/pause_shim.c built as a shared object (skips without a C compiler).
    See pause_env and wait_stopped."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler for the pause shim")
    out = tmp_path_factory.mktemp("shim") / "pause_shim.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out),
                    str(Path(__file__).resolve().parent / "pause_shim.c"), "-ldl"], check=True)
    return str(out)


def pause_env(env, shim, on, path):
    """env with the pause shim preloaded: the run (or a worker process of it) stops itself
    (SIGSTOP) once, before its first stat of exactly path (on="stat"), before its first open
    of it (on="open"), or with path half copied (on="copy")."""
    return dict(env, LD_PRELOAD=" ".join(x for x in (shim, env.get("LD_PRELOAD")) if x),
                PAUSE_SHIM_ON=on, PAUSE_SHIM_PATH=os.fsdecode(os.path.abspath(str(path))))


def process_state(pid):
    """The one-letter state of pid from /proc (R, S, T, Z, ...), or None once it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return None


def process_group(pgid):
    """The pids of process group pgid."""
    pids = []
    for n in os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % n) as f:
                fields = f.read().rpartition(")")[2].split()
        except (OSError, ValueError):
            continue
        if n.isdigit() and int(fields[2]) == pgid:
            pids.append(int(n))
    return pids


def wait_stopped(proc, what):
    """Wait (polling, with poll's deadline) until proc, or a process of its group (a worker;
    proc started in a session of its own), has stopped itself; fails if proc ends first."""
    def stopped():
        if proc.poll() is not None:
            raise AssertionError("the run ended before %s: %r" % (what, proc.communicate()))
        return any(process_state(pid) == "T" for pid in process_group(proc.pid))
    poll(stopped, what)


def go_on(proc, timeout=60):
    """Let every process of proc's group go on (SIGCONT); its (out, err) when it ends."""
    os.killpg(proc.pid, signal.SIGCONT)
    return proc.communicate(timeout=timeout)
