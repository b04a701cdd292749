"""End-to-end: the file run exactly as users run it, under every CPython 3.6-3.13 found.

`python3 scratch_keepalive.py ...` and `python3 -m scratch_keepalive ...` in
subprocesses, with their own state dir and scratch root. The installed console
script is covered in test_install.py.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import (KEEP, NOW, SCRIPT, make_dataset, pyenv_pythons, run_command, run_script,
                      snapshot)

PYTHONS = pyenv_pythons() or [("current", sys.executable)]
IDS = [v for v, _ in PYTHONS]


@pytest.fixture(params=PYTHONS, ids=IDS)
def python(request):
    return request.param[1]


def setup_env(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return scratch, {"SCRATCH_KEEPALIVE_HOME": str(tmp_path / "state"),
                     "SCRATCH_KEEPALIVE_NOW": NOW, "TZ": "UTC", "LC_ALL": "C"}


def test_full_cycle_under_each_python(python, tmp_path):
    scratch, env = setup_env(tmp_path)
    d = make_dataset(scratch)
    odd = os.path.join(os.fsencode(str(d)), b"odd \n\xff-name")
    with open(odd, "wb") as f:
        f.write(b"z")

    def run(*a):
        return run_script(*a, python=python, env=env)
    assert run("--version").out.strip().startswith("scratch-keepalive ")
    assert run("init", "--profile", "generic", "--scratch-root", scratch).rc == 0
    assert run("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    r = run("refresh", "--name", "ds", "--max-entries", "5", "--json")
    assert r.rc == 3, r
    assert json.loads(r.out)["results"][0]["entries_seen"] == 5
    r = run("refresh", "--json")
    assert r.rc == 0, r
    x = json.loads(r.out)["results"][0]
    assert x["resumed"] and x["complete"] and x["errors"] == 0
    assert 5 + x["entries_seen"] == len(snapshot(d))
    s = json.loads(run("status", "--name", "ds", "--json").out)
    assert s["checkpoint"] is None and s["last_mode"] == "touch" and s["sentinel"] is True
    assert json.loads(run("list", "--json").out)[0]["name"] == "ds"
    r = run("refresh", "--name", "nope")
    assert r.rc == 2 and r.err.startswith("scratch-keepalive: error:")
    assert run("remove", "--name", "ds").rc == 0
    assert not (d / ".scratch-keepalive").exists()


def test_state_written_by_one_python_is_read_by_another(tmp_path):
    if len(PYTHONS) < 2:
        pytest.skip("needs two interpreters under pyenv; found %d" % len(PYTHONS))
    scratch, env = setup_env(tmp_path)
    d = make_dataset(scratch)
    oldest, newest = PYTHONS[0][1], PYTHONS[-1][1]
    assert run_script("init", "--profile", "generic", "--scratch-root", scratch,
                      python=newest, env=env).rc == 0
    assert run_script("add", "--name", "ds", "--path", d, "--keep-until", KEEP,
                      python=newest, env=env).rc == 0
    assert run_script("refresh", "--max-entries", "4", python=newest, env=env).rc == 3
    r = run_script("refresh", "--json", python=oldest, env=env)
    assert r.rc == 0 and json.loads(r.out)["results"][0]["resumed"] is True


def test_python_dash_m(tmp_path):
    scratch, env = setup_env(tmp_path)
    full = dict(os.environ, PYTHONPATH=str(SCRIPT.parent), **env)
    r = run_command([sys.executable, "-m", "scratch_keepalive", "--version"], env=full,
                    clean=True, cwd=str(tmp_path))
    assert r.rc == 0 and r.out.startswith("scratch-keepalive ")
    r = run_command([sys.executable, "-m", "scratch_keepalive", "list", "--json"], env=full,
                    clean=True, cwd=str(tmp_path))
    assert r.rc == 0 and json.loads(r.out) == []


def test_copied_file_runs_anywhere(tmp_path):
    """The single file copied to another directory runs on its own."""
    target = tmp_path / "bin"
    target.mkdir()
    shutil.copy(str(SCRIPT), str(target / "scratch_keepalive.py"))
    scratch, env = setup_env(tmp_path)
    r = run_script("init", "--profile", "generic", "--scratch-root", scratch,
                   script=target / "scratch_keepalive.py", env=env, cwd=str(tmp_path))
    assert r.rc == 0, r


def test_errors_never_show_a_traceback(tmp_path):
    scratch, env = setup_env(tmp_path)
    for argv in (["add"], ["refresh", "--name", "x"], ["init", "--profile", "generic"],
                 ["nonsense"], ["add", "--name", "x", "--path", "/", "--keep-until", "x"]):
        r = run_script(*argv, env=env)
        assert r.rc == 2, (argv, r)
        assert "Traceback" not in r.err and r.err.count("\n") == 1, (argv, r)
        assert r.err.startswith("scratch-keepalive: error: "), (argv, r)


def test_sigterm_and_ctrl_c_checkpoint(shm_tmp):
    """A real signal to a real process: exit 3 for TERM, 130 for INT, and a resumable checkpoint.

    The 60,000-file tree is built on tmpfs (conftest's shm_tmp), where that takes a fraction
    of the time it takes on disk."""
    scratch, env = setup_env(shm_tmp)
    d = scratch / "big"
    d.mkdir()
    for i in range(60):
        sub = d / ("d%02d" % i)
        sub.mkdir()
        for j in range(1000):
            os.close(os.open(str(sub / ("f%d" % j)), os.O_CREAT | os.O_WRONLY, 0o644))
    assert run_script("init", "--profile", "generic", "--scratch-root", scratch, env=env).rc == 0
    assert run_script("add", "--name", "big", "--path", d, "--keep-until", KEEP, env=env).rc == 0
    ckpt = shm_tmp / "state" / "checkpoints" / "big.json"
    for sig, code in ((signal.SIGTERM, 3), (signal.SIGINT, 130)):
        p = subprocess.Popen([sys.executable, str(SCRIPT), "refresh", "--name", "big", "--json",
                              "--checkpoint-every", "0.01"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=dict(os.environ, **env))
        for _ in range(4000):       # poll until this process has checkpointed once
            if p.poll() is not None:
                break
            try:
                if json.loads(ckpt.read_text()).get("pid") == p.pid:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.005)
        if p.poll() is not None:
            pytest.fail("the walk finished before it could be signalled")
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
        assert p.returncode == code, (sig, out, err)
        x = json.loads(out.decode())["results"][0]
        assert x["complete"] is False and ckpt.exists()
    r = run_script("refresh", "--name", "big", "--json", env=env)
    x = json.loads(r.out)["results"][0]
    assert r.rc == 0 and x["resumed"] is True and not ckpt.exists()



def test_workers_and_threads_give_the_same_counts_under_each_python(python, tmp_path):
    """--workers 2 and --threads 4 count what a one-process walk counts on every version;
    where worker processes are not available (3.6) the run says so in one note."""
    scratch, env = setup_env(tmp_path)
    d = make_dataset(scratch, files=40)

    def run(*a):
        return run_script(*a, python=python, env=env)
    assert run("init", "--profile", "generic", "--scratch-root", scratch).rc == 0
    assert run("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    version = tuple(int(x) for x in subprocess.check_output(
        [python, "-c", "import sys; print('%d %d' % sys.version_info[:2])"]).split())
    keys = ("entries_seen", "entries_at_risk", "bytes_at_risk", "errors")
    counts = {}
    for args in (("--workers", "1"), ("--workers", "2"), ("--threads", "4")):
        r = run("refresh", "--name", "ds", "--check", "--json", *args)
        assert r.rc == 0, r
        doc = json.loads(r.out)
        counts[args] = [doc["results"][0][k] for k in keys]
        said = any("--workers needs Python 3.7" in n for n in doc["notes"])
        assert said == (args == ("--workers", "2") and version < (3, 7)), doc["notes"]
    assert counts[("--workers", "2")] == counts[("--workers", "1")] == counts[("--threads", "4")]
    assert counts[("--workers", "1")][0] == len(snapshot(d))
