"""Interruptions, races and smaller defects (issue 9 items 6 and 8), each through real
processes and real files: a refresh stopped by SIGHUP, `remove` racing a starting refresh,
a full state directory (a small tmpfs), a symlink inside the state directory, a closed
output pipe, non-UTF-8 names on a strict UTF-8 stdout, and .ci/run's test-bed condition.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import (KEEP, NOW, NOW_EPOCH, REPO, SCRIPT, go_on, pause_env, pause_shim,  # noqa: F401
                      poll, reaped, run_script, set_atime, sk, start_script, tool_env,
                      wait_stopped)

OLD_ATIME = NOW_EPOCH - 400 * 86400     # older than any threshold: a walk would touch it


def run(state, *argv, **extra):
    return run_script(*argv, env=tool_env(state, **extra), clean=True)


def setup_dataset(state, scratch, path, name="ds"):
    r = run(state, "init", "--profile", "generic", "--scratch-root", scratch)
    assert r.rc == 0, r
    r = run(state, "add", "--name", name, "--path", path, "--keep-until", KEEP)
    assert r.rc == 0, r


def read_doc(path):
    try:
        with open(str(path), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


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


def popen_refresh(state, *argv, env=None):
    """`refresh --json ARGS` in its own process group (a signal can reach its workers too)."""
    return start_script("refresh", "--json", *argv, env=env or tool_env(state))


# --------------------------------------------------------------------------- SIGHUP


@pytest.fixture(scope="module")
def shm_tree():
    """100,000 empty files in 200 directories, on tmpfs where there is one (fast to build)."""
    shm = "/dev/shm"
    base = tempfile.mkdtemp(prefix="sk-test-small-", dir=shm if os.access(
        shm, os.W_OK | os.X_OK) else None)
    scratch = os.path.join(base, "scratch")
    root = os.path.join(scratch, "tree")
    os.makedirs(root)
    for j in range(200):
        d = os.path.join(root, "d%03d" % j)
        os.mkdir(d)
        for i in range(500):
            os.close(os.open(os.path.join(d, "f%03d" % i), os.O_WRONLY | os.O_CREAT, 0o644))
    yield Path(scratch), Path(root), 200 * 501 + 2     # + the root and the sentinel
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("engine, target", [(("--workers", "1"), "pid"),
                                            (("--workers", "2"), "group")],
                         ids=["serial-to-pid", "workers-to-group"])
def test_sighup_mid_walk_checkpoints_exits_3_and_resume_completes(tmp_path, shm_tree, engine,
                                                                 target):
    """A dropped SSH session (SIGHUP to the tool, or to its whole process group with its
    worker processes) stops the walk as SIGTERM does: exit 3, a checkpoint, a last-run record,
    the lock released (doctor finds no stale lock); the next run resumes and completes."""
    scratch, root, total = shm_tree
    state = tmp_path / "state"
    setup_dataset(state, scratch, root)
    checkpoint = state / "checkpoints" / "ds.json"
    proc = popen_refresh(state, "--name", "ds", "--checkpoint-every", "0.05", *engine)
    with reaped(proc):
        def started():
            if proc.poll() is not None:
                raise AssertionError("refresh ended before its first checkpoint: %r"
                                     % (proc.communicate(),))
            doc = read_doc(checkpoint)
            return doc and doc["entries_done"] > 0
        poll(started, "the first checkpoint")
        if target == "group":
            os.killpg(proc.pid, signal.SIGHUP)
        else:
            os.kill(proc.pid, signal.SIGHUP)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, (proc.returncode, out[-500:], err[-1000:])
    assert b"Traceback" not in err, err
    res = json.loads(out.decode("utf-8"))["results"][0]
    assert res["complete"] is False and res["stopped"] == "hup", res
    ck = read_doc(checkpoint)
    assert ck is not None and ck["entries_done"] == res["entries_seen"] > 0

    st = run(state, "status", "--name", "ds", "--json")
    assert st.rc == 0, st
    last = st.json()["last_run"]
    assert last is not None and last["finished"] and last["stopped"] == "hup", last
    assert st.json()["checkpoint"]["entries_done"] == ck["entries_done"]

    doc = run(state, "doctor", "--json")
    locks = [c for c in doc.json()["checks"] if c["name"].startswith("lock:")]
    assert locks == [], locks

    r = run(state, "refresh", "--name", "ds", "--json", *engine)
    assert r.rc == 0, r
    res2 = r.json()["results"][0]
    assert res2["complete"] is True and res2["resumed"] is True, res2
    assert res2["entries_done"] == total
    assert res["entries_seen"] + res2["entries_seen"] == total
    assert not checkpoint.exists()


def test_main_restores_the_sighup_handler(cli, generic, env):
    """main() installs its SIGHUP handler only while it walks, and puts back whatever was
    there before (here a handler of the caller's own)."""
    root = env["scratch"] / "ds"
    root.mkdir()
    (root / "f").write_text("x")
    assert cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0

    def mine(signum, frame):
        pass
    old = signal.signal(signal.SIGHUP, mine)
    try:
        r = cli("refresh", "--name", "ds")
        assert r.rc == 0, r
        assert signal.getsignal(signal.SIGHUP) is mine
    finally:
        signal.signal(signal.SIGHUP, old)


# --------------------------------------------------------------------------- remove racing refresh


def small_dataset(scratch, name="ds", files=40):
    root = Path(scratch) / name
    (root / "sub").mkdir(parents=True)
    for i in range(files):
        (root / "sub" / ("f%02d" % i)).write_bytes(b"x")
    for p in (root / "sub").iterdir():
        set_atime(p, OLD_ATIME)
    return root


def held_before_the_lock(state, root, shim, *argv):
    """`refresh --json ARGV` started and held (stopped) where it has read the registry but
    not yet taken the dataset's lock: at its first lstat of the dataset root, which comes
    after that read (the pause shim)."""
    proc = popen_refresh(state, *argv, env=pause_env(tool_env(state), shim, "stat", root))
    try:
        wait_stopped(proc, "the refresh to stop before the dataset's lock")
    except BaseException:
        with reaped(proc):
            raise
    return proc


@pytest.mark.parametrize("named", [True, False], ids=["refresh-name", "refresh-all"])
def test_remove_while_a_refresh_starts_walks_nothing(tmp_path, named, pause_shim):
    """The refresh has read the registry but not yet taken the dataset's lock when `remove`
    runs (held there by the pause shim). It must then walk nothing of the removed dataset,
    leave no checkpoint or log, and say why: exit 1 when the dataset was named, 0 when it
    was one of all the datasets."""
    scratch, state = tmp_path / "scratch", tmp_path / "state"
    scratch.mkdir()
    root = small_dataset(scratch)
    setup_dataset(state, scratch, root)
    before = atimes(root)
    argv = ["--name", "ds"] if named else []
    proc = held_before_the_lock(state, root, pause_shim, *argv)
    with reaped(proc):
        r = run(state, "remove", "--name", "ds")
        assert r.rc == 0, r
        out, err = go_on(proc)
    assert proc.returncode == (1 if named else 0), (out, err)
    res = json.loads(out.decode("utf-8"))["results"][0]
    assert res["entries_seen"] == 0 and res["entries_touched"] == 0, res
    assert "removed while this refresh was starting; nothing was walked" in res["reason"]
    assert atimes(root) == before
    assert not (state / "checkpoints" / "ds.json").exists()
    assert not (state / "logs" / "ds").exists() or not os.listdir(str(state / "logs" / "ds"))
    assert run(state, "list", "--json").json() == []


def test_remove_and_readd_elsewhere_while_a_refresh_starts_walks_neither(tmp_path, pause_shim):
    """Removed and added again under the same name at another path: the starting refresh
    walks neither the old path nor (unasked) the new one, and says the path changed."""
    scratch, state = tmp_path / "scratch", tmp_path / "state"
    scratch.mkdir()
    old, new = small_dataset(scratch, "old"), small_dataset(scratch, "new")
    setup_dataset(state, scratch, old)
    before = (atimes(old), atimes(new))
    proc = held_before_the_lock(state, old, pause_shim, "--name", "ds")
    with reaped(proc):
        assert run(state, "remove", "--name", "ds").rc == 0
        assert run(state, "add", "--name", "ds", "--path", new, "--keep-until", KEEP).rc == 0
        out, err = go_on(proc)
    assert proc.returncode == 1, (out, err)
    res = json.loads(out.decode("utf-8"))["results"][0]
    assert res["entries_seen"] == 0, res
    assert "path changed to %s" % new in res["reason"], res
    assert (atimes(old), atimes(new)) == before
    assert not (state / "checkpoints" / "ds.json").exists()


# --------------------------------------------------------------------------- names


def test_name_with_a_trailing_newline_is_refused(tmp_path):
    """`$` in the name pattern matched before a trailing newline: `add --name $'evil\\n'` exited 0 and
    made logs/evil<newline>/. Now it is invalid input (exit 2) and nothing is written."""
    scratch, state = tmp_path / "scratch", tmp_path / "state"
    scratch.mkdir()
    root = small_dataset(scratch)
    r = run(state, "init", "--profile", "generic", "--scratch-root", scratch)
    assert r.rc == 0, r
    before = sorted(os.listdir(str(state)))
    r = run(state, "add", "--name", "evil\n", "--path", root, "--keep-until", KEEP)
    assert r.rc == 2, r
    assert r.err.startswith("scratch-keepalive: error: invalid dataset name 'evil\\n'"), r
    assert len(r.err.splitlines()) == 1, r
    assert sorted(os.listdir(str(state))) == before
    assert os.listdir(str(state / "logs")) == []
    assert not (root / ".scratch-keepalive").exists()
    assert run(state, "list", "--json").json() == []
    for bad in ("evil\n", "ok\r\n", "a" * 64 + "\n"):
        with pytest.raises(sk.UsageError):
            sk.check_name(bad)
    assert sk.check_name("a" * 64) == "a" * 64


# --------------------------------------------------------------------------- a full state dir


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs mounted at tmp_path/state (root only), unmounted afterwards."""
    mnt = tmp_path / "state"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % p.stderr.decode(errors="replace").strip())
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def fill(directory):
    """Fill the filesystem of directory; returns the filler file."""
    filler = Path(directory) / "filler"
    fd = os.open(str(filler), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def test_full_state_dir_add_names_the_file_and_leaves_no_sentinel(tmp_path, small_tmpfs):
    """The registry save of `add` fails on a full state directory: exit 1 with one line that
    names the file and says the disk or quota is full (not "permissions"); the sentinel the
    add wrote is deleted again, the registry is as it was, no temp file stays; once there
    is room, adding the directory (under any name) works."""
    scratch, state = tmp_path / "scratch", small_tmpfs
    scratch.mkdir()
    root = small_dataset(scratch)
    r = run(state, "init", "--profile", "generic", "--scratch-root", scratch)
    assert r.rc == 0, r
    filler = fill(state)
    before = sorted(os.listdir(str(state)))
    r = run(state, "add", "--name", "ds", "--path", root, "--keep-until", KEEP)
    assert r.rc == 1, r
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("scratch-keepalive: error: cannot write %s"
                                                   % state), r
    assert "the disk or quota is full (No space left on device)" in lines[0], r
    assert "permissions" not in lines[0], r
    assert not (root / ".scratch-keepalive").exists()
    assert sorted(os.listdir(str(state))) == before        # no registry, no temp file
    filler.unlink()
    r = run(state, "add", "--name", "other", "--path", root, "--keep-until", KEEP)
    assert r.rc == 0, r
    assert [e["name"] for e in run(state, "list", "--json").json()] == ["other"]


def test_full_state_dir_during_refresh_says_full_and_names_the_file(tmp_path, small_tmpfs):
    """A refresh whose record cannot be written (state directory full) says so, naming the
    file, in one line, and exits 1."""
    scratch, state = tmp_path / "scratch", small_tmpfs
    scratch.mkdir()
    root = small_dataset(scratch)
    setup_dataset(state, scratch, root)
    fill(state)
    r = run(state, "refresh", "--name", "ds")
    assert r.rc == 1, r
    assert "Traceback" not in r.err, r
    text = r.out + r.err
    assert "the disk or quota is full (No space left on device)" in text, r
    assert re.search(r"cannot write %s/\S+" % re.escape(str(state)), text), r


# --------------------------------------------------------------------------- symlinks in the state dir


def tree_contents(root):
    return {p.name: p.read_bytes() for p in Path(root).iterdir()}


def test_symlink_at_logs_name_is_never_followed(tmp_path):
    """A symlink at logs/NAME pointing at a directory of files: log pruning deleted 11 of 30
    of them. The refresh now refuses to log through it (exit 1, naming it), nothing in the
    target changes, pruning leaves it alone, and doctor names the link."""
    scratch, state = tmp_path / "scratch", tmp_path / "state"
    scratch.mkdir()
    root = small_dataset(scratch)
    setup_dataset(state, scratch, root)
    target = tmp_path / "precious"
    target.mkdir()
    for i in range(30):
        (target / ("20200101T0000%02d.000000-touch-1.log" % i)).write_text("keep %d\n" % i)
    (target / "notes.txt").write_text("mine\n")
    before = tree_contents(target)
    link = state / "logs" / "ds"
    os.symlink(str(target), str(link))
    for _ in range(2):
        r = run(state, "refresh", "--name", "ds")
        assert r.rc == 1, r
        assert "%s is a symlink" % link in r.out, r
        assert "Traceback" not in r.err, r
    assert tree_contents(target) == before
    sk.Store(str(state)).prune_logs("ds", keep=0)
    assert tree_contents(target) == before
    assert os.path.islink(str(link))

    d = run(state, "doctor", "--json")
    assert d.rc == 1, d
    found = [c for c in d.json()["checks"] if c["name"] == "state-links"]
    assert len(found) == 1 and not found[0]["ok"], d.json()
    assert str(link) in found[0]["message"] and "rm" in found[0]["message"], found
    assert tree_contents(target) == before

    os.unlink(str(link))        # what the message says to do
    r = run(state, "refresh", "--name", "ds")
    assert r.rc == 0, r
    assert len(os.listdir(str(state / "logs" / "ds"))) == 1
    assert tree_contents(target) == before


def test_symlink_at_a_lock_file_is_never_followed(tmp_path):
    """A symlink at locks/NAME.lock: taking the lock truncated and overwrote its target.
    Now the refresh refuses (exit 1, naming it) and the target keeps its bytes."""
    scratch, state = tmp_path / "scratch", tmp_path / "state"
    scratch.mkdir()
    root = small_dataset(scratch)
    setup_dataset(state, scratch, root)
    target = tmp_path / "precious.txt"
    target.write_bytes(b"do not truncate me\n")
    link = state / "locks" / "ds.lock"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    os.symlink(str(target), str(link))
    before = atimes(root)
    r = run(state, "refresh", "--name", "ds")
    assert r.rc == 1, r
    assert "%s is a symlink" % link in r.out + r.err, r
    assert target.read_bytes() == b"do not truncate me\n"
    assert atimes(root) == before
    d = run(state, "doctor", "--json")
    assert d.rc == 1 and any(c["name"] == "state-links" and str(link) in c["message"]
                             for c in d.json()["checks"]), d
    assert target.read_bytes() == b"do not truncate me\n"


# --------------------------------------------------------------------------- closed output pipe


def run_into_closed_pipe(*argv):
    """Run the tool with stdout a pipe nobody reads any more (as after `| head -0` exited)."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, str(SCRIPT)] + [str(a) for a in argv], stdout=w,
                           stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=120)
    finally:
        os.close(w)
    return p.returncode, p.stderr.decode("utf-8", "replace")


@pytest.mark.parametrize("argv", [["list"], ["list", "--json"], ["status"],
                                  ["status", "--json"], ["status", "--name", "ds00"],
                                  ["refresh", "--json"], ["refresh"], ["doctor"], ["--help"]],
                         ids=lambda a: " ".join(a))
def test_closed_output_pipe_ends_quietly(cli, generic, env, argv):
    """`list | head -0` printed "error: [Errno 32] Broken pipe; check the path and its
    permissions" and exited 1. Now: no text at all on stderr, exit 141 (128 + SIGPIPE, what
    the shell reports for git), and the work is done (a refresh records its run). 25
    datasets make the text of `status` larger than the output buffer, so the pipe breaks
    in the middle of the output as well as at its end."""
    for i in range(25):
        root = env["scratch"] / ("ds%02d" % i)
        root.mkdir()
        (root / "f").write_text("x")
        assert cli("add", "--name", "ds%02d" % i, "--path", root, "--keep-until", KEEP).rc == 0
    rc, err = run_into_closed_pipe(*argv)
    assert (rc, err) == (141, ""), (rc, err)
    if argv[0] == "refresh":
        assert all(e["last_refresh"] for e in cli("list", "--json").json())


def test_broken_pipe_of_something_else_is_still_an_error(cli, generic, env, monkeypatch):
    """Only the closing of the tool's own output is quiet: a broken pipe elsewhere (here
    raised by the command while its output is fine) is still reported."""
    def broken(args, ctx):
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(sk, "cmd_list", broken)     # build_parser() looks it up per call
    r = cli("list")
    assert r.rc == 1 and "Broken pipe" in r.err, r


# --------------------------------------------------------------------------- non-UTF-8 names


def test_non_utf8_dataset_path_on_a_strict_utf8_stdout(tmp_path):
    """A directory whose name is not valid UTF-8, with PYTHONIOENCODING=utf-8:strict: `add`
    registered it and then exited 1 with "internal error (UnicodeEncodeError)". Now every
    command prints the path escaped and exits 0, and the registry holds the exact bytes."""
    scratch, state = tmp_path / "scratch", tmp_path / "state"
    scratch.mkdir()
    raw = os.path.join(os.fsencode(str(scratch)), b"caf\xe9 \xff")
    os.mkdir(raw)
    with open(os.path.join(raw, b"f"), "wb") as f:
        f.write(b"x")
    path = os.fsdecode(raw)         # surrogateescape: subprocess passes the bytes back
    strict = {"PYTHONIOENCODING": "utf-8:strict"}
    r = run(state, "init", "--profile", "generic", "--scratch-root", scratch, **strict)
    assert r.rc == 0, r
    r = run(state, "add", "--name", "cafe", "--path", path, "--keep-until", KEEP, **strict)
    assert r.rc == 0, r
    assert r.err == "", r
    assert "caf\\udce9 \\udcff" in r.out or "caf\\xe9 \\xff" in r.out, r
    assert os.path.exists(os.path.join(raw, b".scratch-keepalive"))
    entries = run(state, "list", "--json", **strict).json()
    assert os.fsencode(entries[0]["path"]) == raw
    for argv in (["list"], ["status"], ["status", "--name", "cafe"], ["refresh"],
                 ["refresh", "--name", "cafe", "--json"], ["remove", "--name", "cafe"]):
        r = run(state, *argv, **strict)
        assert r.rc == 0 and "error" not in r.err, (argv, r)
    assert run(state, "list", "--json").json() == []


# --------------------------------------------------------------------------- .ci/run


def ci_testbed_condition():
    """The condition of .ci/run's `if ...; then` that starts the Slurm test bed."""
    text = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    found = [m.group(1) for m in re.finditer(r"^if (.*); then$", text, re.M)
             if "slurm-testbed.sh" in m.group(1)]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("uid, has_script, starts", [("0", True, True), ("1000", True, False),
                                                     ("0", False, False),
                                                     ("1000", False, False)])
def test_ci_starts_the_testbed_only_as_root_where_the_script_is(tmp_path, uid, has_script,
                                                               starts):
    """`[ "$(id -u)" = 0 ] && [ -x S ] || [ -f S ]` started the test bed whenever the
    script existed, root or not. The condition is run by bash as .ci/run runs it, with an
    `id` that reports the uid under test."""
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "id").write_text('#!/bin/sh\n[ "$1" = -u ] && echo %s\n' % uid)
    (fakebin / "id").chmod(0o755)
    work = tmp_path / "checkout"
    (work / "tools").mkdir(parents=True)
    if has_script:
        shutil.copy2(str(REPO / "tools" / "slurm-testbed.sh"), str(work / "tools"))
    script = "if %s; then echo start; else echo skip; fi" % ci_testbed_condition()
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=str(work),
                       env=dict(os.environ, PATH="%s:%s" % (fakebin, os.environ["PATH"])),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert p.returncode == 0, p
    assert p.stdout.strip() == ("start" if starts else "skip"), p


def test_a_script_walk_runs_as_it_was_started(tmp_path, pause_shim):
    """`python3 scratch_keepalive.py refresh` runs the walk in the process and with the
    command line it was started with: no re-execution. Every documented way to run the
    tool loads it from its bytecode (install.sh's launcher and the README's: see
    tests/test_install.py and tests/test_words.py; the scheduled job: the loader test
    below), so a bare script only starts slower and keeps its parse tree, as the README
    says. Hints still name the script as it was run."""
    scratch, state = tmp_path / "scratch", tmp_path / "state"
    scratch.mkdir()
    root = small_dataset(scratch)
    setup_dataset(state, scratch, root)
    env = tool_env(state)
    argv = [sys.executable, "-B", str(SCRIPT), "refresh", "--name", "ds"]
    proc = subprocess.Popen(argv, env=pause_env(env, pause_shim, "stat", root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    with reaped(proc):
        wait_stopped(proc, "the refresh to stop before its walk")
        with open("/proc/%d/cmdline" % proc.pid, "rb") as f:
            cmdline = f.read().split(b"\0")
        out, err = go_on(proc)
    assert cmdline[:-1] == [os.fsencode(a) for a in argv], cmdline
    assert proc.returncode == 0, (out, err)
    assert b"ds: refreshed" in out or b"ds: touched" in out or b"complete" in out, out
    r = subprocess.run([sys.executable, str(SCRIPT), "refresh", "--name", "nope"], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert r.returncode == 2, r
    assert ("`python3 %s list`" % SCRIPT).encode() in r.stderr, r.stderr
    assert not hasattr(sk, "reexec_by_compile")


def test_the_loader_runs_the_script_from_its_bytecode_with_a_smaller_peak(tmp_path):
    """The scheduled job's `python3 -c LOADER SCRIPT ARGS` (LOADER: see the module) runs the
    script as `python3 SCRIPT ARGS` does (output, exit code, hints) but from __pycache__,
    so its peak memory stays clear of the compile's (about 18 MB for this file)."""
    copy = tmp_path / "bin" / "scratch_keepalive.py"
    copy.parent.mkdir()
    shutil.copy(str(SCRIPT), str(copy))

    def peak(*argv):
        code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], "
                "stdout=subprocess.PIPE, stderr=subprocess.PIPE); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode); "
                "sys.stdout.flush(); sys.stdout.buffer.write(r.stdout + b'|' + r.stderr)")
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)    # as on a user's shell
        out = subprocess.run([sys.executable, "-c", code] + list(argv), env=env,
                             stdout=subprocess.PIPE).stdout
        head, _, rest = out.partition(b"\n")
        kb, rc = map(int, head.split())
        return kb, rc, rest
    loader = [sys.executable, "-c", sk.LOADER, str(copy)]
    assert peak(*(loader + ["--version"]))[1] == 0      # writes the bytecode
    assert list((copy.parent / "__pycache__").glob("scratch_keepalive.*.pyc"))
    script_kb, rc1, out1 = peak(sys.executable, str(copy), "list", "--state-dir",
                                str(tmp_path / "none"))
    loader_kb, rc2, out2 = peak(*(loader + ["list", "--state-dir", str(tmp_path / "none")]))
    assert (rc1, out1) == (rc2, out2), (out1, out2)
    assert ("`python3 %s init`" % copy).encode() in out2 or rc2 == 0, out2
    assert loader_kb < script_kb - 5 * 1024, (loader_kb, script_kb)


def test_the_login_line_parses_as_the_parser_does():
    """`status --brief` (the login line) skips building the parser; what it gets is what
    the parser gives, and any other command line goes through the parser."""
    fast = sk.login_line_args(["status", "--brief"])
    assert vars(fast) == vars(sk.build_parser().parse_args(["status", "--brief"]))
    for argv in (["status"], ["status", "--brief", "--json"], ["--brief", "status"],
                 ["--state-dir", "x", "status", "--brief"], []):
        assert sk.login_line_args(argv) is None, argv


def test_the_login_line_imports_only_what_it_needs(tmp_path):
    """`status --brief` imports none of the modules it does not use (argparse, subprocess,
    socket, ...): they are imported where first used. Each is still what its name says
    once used, and a test's monkeypatching through the module reaches the real one."""
    code = ("import sys; sys.path[0] = sys.argv.pop(1); import scratch_keepalive as m; "
            "rc = m.main(['status', '--brief']); "
            "print(' '.join(sorted(set(sys.modules) & set(sys.argv[1:])))); sys.exit(rc)")
    lazy = ["argparse", "subprocess", "socket", "tempfile", "threading", "textwrap",
            "signal", "select", "calendar", "_strptime", "json", "re", "enum", "contextlib",
            "collections", "functools", "_socket"]
    env = dict(os.environ, SCRATCH_KEEPALIVE_HOME=str(tmp_path / "state"))
    r = subprocess.run([sys.executable, "-S", "-c", code, str(REPO)] + lazy, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert r.returncode == 0, r
    assert r.stdout.strip() == "", r.stdout
    # With state to read: datasets that need attention, a checkpoint, a purge on record.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env.update(SCRATCH_KEEPALIVE_NOW="2030-01-01T00:00:00Z")
    for argv in (["init", "--profile", "generic", "--scratch-root", scratch],
                 ["add", "--name", "a", "--path", scratch / "a", "--keep-until", "2030-01-05"],
                 ["add", "--name", "b", "--path", scratch / "b", "--keep-until", "2030-06-30"],
                 ["refresh", "--name", "a", "--check"], ["refresh", "--name", "b", "--check"],
                 ["refresh", "--name", "a", "--check", "--max-entries", "1"]):
        if argv[0] == "add":
            (argv[4] / "sub").mkdir(parents=True)
            (argv[4] / "sub" / "f").write_text("x")
        if argv[:3] == ["refresh", "--name", "b"]:
            os.unlink(str(scratch / "b" / "sub" / "f"))
        subprocess.run([sys.executable, str(SCRIPT)] + [str(a) for a in argv], env=env,
                       stdout=subprocess.PIPE, check=argv[-1] != "1")
    r = subprocess.run([sys.executable, "-S", "-c", code, str(REPO)] + lazy, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    lines = r.stdout.splitlines()
    assert "scratch-keepalive: a: " in r.stdout and "scratch-keepalive: b: " in r.stdout, r
    assert lines[-1] == "", r.stdout          # none of them was imported
    import socket as real_socket
    assert sk.socket.gethostname() == real_socket.gethostname()
    assert sk.subprocess.PIPE == subprocess.PIPE
    assert sk.MAIL_RE.match("a@b.c") and not sk.MAIL_RE.match("a b@c")


# ---------------------------------------------------------------- times and names without re

_ISO_REFERENCE = r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?" \
                 r"(Z|[+-]\d{2}:?\d{2})?)?\Z"


def test_parse_iso_and_names_read_as_their_patterns_do():
    """The login line imports no re: parse_iso, parse_date and valid_name check by hand what
    these patterns say (ASCII digits), on every form and near-miss generated here."""
    import itertools
    import random
    import re
    ref = re.compile(_ISO_REFERENCE)
    rng = random.Random(7)
    pieces = ["2026-08-01", "2026-8-01", "20260801", "2026-02-30", "0000-01-01", "T", " ",
              "t", "03:00", "3:00", "03:00:07", "03:00:7", ":07", ".5", ".", ".123456", "Z",
              "z", "+02:00", "-0530", "+2", "+02:0", "\n", "x", ""]
    seen = 0
    for n in (1, 2, 3, 4, 5):
        for combo in itertools.islice(itertools.product(pieces, repeat=n), 4000):
            text = "".join(combo)
            m = ref.match(text)
            assert (sk._iso_parts(text) is not None) == bool(m), repr(text)
            if m:
                assert sk._iso_parts(text) == m.groups(), repr(text)
            seen += 1
    assert seen > 10000
    for text in ("2026-08-01T03:00:00Z", "2026-08-01", "2026-08-01 03:00+02:00"):
        assert sk.parse_iso(text) is not None
    assert sk.parse_date("2026-02-29") is None and sk.parse_date("2028-02-29") is not None
    assert sk.parse_date("2026-08-01T00") is None and sk.parse_date(None) is None
    name = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
    alphabet = "aZ09._-é \n/"
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.choice((0, 1, 2, 5, 64, 65))))
        assert sk.valid_name(text) == bool(name.match(text)), repr(text)


def test_the_state_reader_reads_as_json_loads_does():
    """_json_loads uses json's C scanner (no json package, no re at login): the same
    documents, the same refusals."""
    import json
    good = ['{"a": [1, 2.5, -3e2, "x\\u00e9\\n", null, true, false, {}]}', '  [ ]  \n',
            '"s"', '{"n": NaN, "i": -Infinity}', '{"k": {"k": {"k": []}}}', "0", "1.0"]
    bad = ["", "  ", "{", "[1,]", "{'a': 1}", "[1] [2]", "nul", "{\"a\" 1}", "\ufeff{}",
           "[1]\x00"]
    for text in good:
        assert repr(sk._json_loads(text.encode())) == repr(json.loads(text)), text
    for text in bad:
        with pytest.raises(ValueError):
            json.loads(text)
        with pytest.raises(ValueError):
            sk._json_loads(text.encode())
    with pytest.raises(ValueError):
        sk._json_loads(b"[" * 100000)
