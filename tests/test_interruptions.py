"""A refresh interrupted, or raced, through real processes: SIGHUP (a dropped SSH session)
stops a walk as SIGTERM does; main() restores the SIGHUP handler it found; a `remove` (or
a remove and re-add elsewhere) while a refresh is starting walks nothing of it.
"""
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from conftest import (KEEP, atimes, go_on, pause_env, pause_shim, reaped, run_in,  # noqa: F401
                      setup_dataset, small_dataset, start_script, tool_env, wait_stopped)


def read_doc(path):
    try:
        with open(str(path), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def popen_refresh(state, *argv, env=None):
    """`refresh --json ARGS` in its own process group (a signal can reach its workers too)."""
    return start_script("refresh", "--json", *argv, env=env or tool_env(state))


# --------------------------------------------------------------------------- SIGHUP


@pytest.fixture(scope="module")
def shm_tree():
    """2,000 empty files in 40 directories, on tmpfs where there is one (fast to build)."""
    shm = "/dev/shm"
    base = tempfile.mkdtemp(prefix="sk-test-small-", dir=shm if os.access(
        shm, os.W_OK | os.X_OK) else None)
    scratch = os.path.join(base, "scratch")
    root = os.path.join(scratch, "tree")
    os.makedirs(root)
    for j in range(40):
        d = os.path.join(root, "d%03d" % j)
        os.mkdir(d)
        for i in range(50):
            os.close(os.open(os.path.join(d, "f%03d" % i), os.O_WRONLY | os.O_CREAT, 0o644))
    yield Path(scratch), Path(root), 40 * 51 + 2     # + the root and the sentinel
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("engine, target", [(("--workers", "1"), "pid"),
                                            (("--workers", "2"), "group")],
                         ids=["serial-to-pid", "workers-to-group"])
def test_sighup_mid_walk_checkpoints_exits_3_and_resume_completes(tmp_path, shm_tree, engine,
                                                                 target, pause_shim):
    """A dropped SSH session (SIGHUP to the tool, or to its whole process group with its
    worker processes) stops the walk as SIGTERM does: exit 3, a checkpoint, a last-run record,
    the lock released (doctor finds no stale lock); the next run resumes and completes."""
    scratch, root, total = shm_tree
    state = tmp_path / "state"
    setup_dataset(state, scratch, root)
    checkpoint = state / "checkpoints" / "ds.json"
    # Held (the pause shim) where the walk's main process opens d020 to list it: half the
    # tree walked, the rest not yet handed to any worker, however fast the machine is.
    proc = popen_refresh(state, "--name", "ds", *engine,
                         env=pause_env(tool_env(state), pause_shim, "open", root / "d020"))
    with reaped(proc):
        wait_stopped(proc, "the walk to stop before listing d020")
        if target == "group":
            os.killpg(proc.pid, signal.SIGHUP)
        else:
            os.kill(proc.pid, signal.SIGHUP)
        out, err = go_on(proc)
    assert proc.returncode == 3, (proc.returncode, out[-500:], err[-1000:])
    assert b"Traceback" not in err, err
    res = json.loads(out.decode("utf-8"))["results"][0]
    assert res["complete"] is False and res["stopped"] == "hup", res
    ck = read_doc(checkpoint)
    assert ck is not None and ck["entries_done"] == res["entries_seen"] > 0

    st = run_in(state, "status", "--name", "ds", "--json")
    assert st.rc == 0, st
    last = st.json()["last_run"]
    assert last is not None and last["finished"] and last["stopped"] == "hup", last
    assert st.json()["checkpoint"]["entries_done"] == ck["entries_done"]

    doc = run_in(state, "doctor", "--json")
    locks = [c for c in doc.json()["checks"] if c["name"].startswith("lock:")]
    assert locks == [], locks

    r = run_in(state, "refresh", "--name", "ds", "--json", *engine)
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
        r = run_in(state, "remove", "--name", "ds")
        assert r.rc == 0, r
        out, err = go_on(proc)
    assert proc.returncode == (1 if named else 0), (out, err)
    res = json.loads(out.decode("utf-8"))["results"][0]
    assert res["entries_seen"] == 0 and res["entries_touched"] == 0, res
    assert "removed while this refresh was starting; nothing was walked" in res["reason"]
    assert atimes(root) == before
    assert not (state / "checkpoints" / "ds.json").exists()
    assert not (state / "logs" / "ds").exists() or not os.listdir(str(state / "logs" / "ds"))
    assert run_in(state, "list", "--json").json() == []


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
        assert run_in(state, "remove", "--name", "ds").rc == 0
        assert run_in(state, "add", "--name", "ds", "--path", new, "--keep-until", KEEP).rc == 0
        out, err = go_on(proc)
    assert proc.returncode == 1, (out, err)
    res = json.loads(out.decode("utf-8"))["results"][0]
    assert res["entries_seen"] == 0, res
    assert "path changed to %s" % new in res["reason"], res
    assert (atimes(old), atimes(new)) == before
    assert not (state / "checkpoints" / "ds.json").exists()
