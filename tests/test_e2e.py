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

import pytest

from conftest import (KEEP, SCRIPT, go_on, make_dataset, pause_env, pause_shim,  # noqa: F401
                      pyenv_pythons, reaped, run_command, run_script, snapshot, start_script,
                      tool_env, wait_stopped)

PYTHONS = pyenv_pythons() or [("current", sys.executable)]
IDS = [v for v, _ in PYTHONS]


@pytest.fixture(params=PYTHONS, ids=IDS)
def python(request):
    return request.param[1]


def setup_env(tmp_path):
    """A scratch root and the whole environment of a tool run (pass it with clean=True)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return scratch, tool_env(tmp_path / "state", LC_ALL="C")


def test_full_cycle_under_each_python(python, tmp_path):
    scratch, env = setup_env(tmp_path)
    d = make_dataset(scratch)
    odd = os.path.join(os.fsencode(str(d)), b"odd \n\xff-name")
    with open(odd, "wb") as f:
        f.write(b"z")

    def run(*a):
        return run_script(*a, python=python, env=env, clean=True)
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
                      python=newest, env=env, clean=True).rc == 0
    assert run_script("add", "--name", "ds", "--path", d, "--keep-until", KEEP,
                      python=newest, env=env, clean=True).rc == 0
    assert run_script("refresh", "--max-entries", "4", python=newest, env=env, clean=True).rc == 3
    r = run_script("refresh", "--json", python=oldest, env=env, clean=True)
    assert r.rc == 0 and json.loads(r.out)["results"][0]["resumed"] is True


def test_python_dash_m(tmp_path):
    scratch, env = setup_env(tmp_path)
    full = dict(env, PYTHONPATH=str(SCRIPT.parent))
    r = run_command([sys.executable, "-m", "scratch_keepalive", "--version"], env=full,
                    clean=True, cwd=str(tmp_path))
    assert r.rc == 0 and r.out.startswith("scratch-keepalive ")
    r = run_command([sys.executable, "-m", "scratch_keepalive", "list", "--json"], env=full,
                    clean=True, cwd=str(tmp_path))
    assert r.rc == 0 and json.loads(r.out) == []


def test_copied_file_runs_anywhere(tmp_path):
    """The single file copied alone to another directory runs on its own: every command of
    a dataset's life, from a directory that is neither the copy's nor the checkout's, with
    nothing of the checkout on the import path; what it says names the copy it ran."""
    target = tmp_path / "bin"
    target.mkdir()
    copy = target / "scratch_keepalive.py"
    shutil.copy(str(SCRIPT), str(copy))
    scratch, env = setup_env(tmp_path)
    env.pop("PYTHONPATH", None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    d = make_dataset(scratch)

    def run(*argv):
        r = run_script(*argv, script=copy, env=env, clean=True, cwd=str(elsewhere))
        assert "Traceback" not in r.err, r
        return r
    assert run("--version").out.strip() == "scratch-keepalive " + sk_version()
    r = run("init", "--profile", "generic", "--scratch-root", scratch)
    assert r.rc == 0, r
    r = run("add", "--name", "ds", "--path", d, "--keep-until", KEEP)
    assert r.rc == 0 and str(copy) in r.out, r         # its Next: hint names the copy
    for argv in (["refresh", "--name", "ds"], ["refresh", "--name", "ds", "--check"],
                 ["status", "--name", "ds"], ["list"], ["files", "--name", "ds"],
                 ["remove", "--name", "ds"]):
        r = run(*argv)
        assert r.rc == 0, (argv, r)
    assert json.loads(run("list", "--json").out) == []
    r = run("refresh", "--name", "ds")
    assert r.rc == 2 and ("`python3 %s list`" % copy) in r.err, r
    assert sorted(os.listdir(str(target))) in (["scratch_keepalive.py"],
                                                ["__pycache__", "scratch_keepalive.py"])


def sk_version():
    import scratch_keepalive
    return scratch_keepalive.__version__


def test_errors_never_show_a_traceback(tmp_path):
    scratch, env = setup_env(tmp_path)
    for argv in (["add"], ["refresh", "--name", "x"], ["init", "--profile", "generic"],
                 ["nonsense"], ["add", "--name", "x", "--path", "/", "--keep-until", "x"]):
        r = run_script(*argv, env=env, clean=True)
        assert r.rc == 2, (argv, r)
        assert "Traceback" not in r.err and r.err.count("\n") == 1, (argv, r)
        assert r.err.startswith("scratch-keepalive: error: "), (argv, r)


def test_sigterm_and_ctrl_c_checkpoint(tmp_path, pause_shim):
    """A real signal to a real process mid-walk: exit 3 for TERM, 130 for INT, and a
    resumable checkpoint. The pause shim stops the walk at a file in the middle of the tree;
    the signal is sent while it is stopped, so how fast the machine walks does not matter."""
    scratch, env = setup_env(tmp_path)
    d = scratch / "big"
    d.mkdir()
    for i in range(60):
        sub = d / ("d%02d" % i)
        sub.mkdir()
        for j in range(50):
            os.close(os.open(str(sub / ("f%d" % j)), os.O_CREAT | os.O_WRONLY, 0o644))
    assert run_script("init", "--profile", "generic", "--scratch-root", scratch, env=env,
                      clean=True).rc == 0
    assert run_script("add", "--name", "big", "--path", d, "--keep-until", KEEP, env=env,
                      clean=True).rc == 0
    ckpt = tmp_path / "state" / "checkpoints" / "big.json"
    # Held in d10, then (the resumed walk, which goes on from where the first stopped) d40.
    # One process: held, the whole walk waits (a second worker would walk on, and might
    # finish the tree first). Signals to each engine's processes: test_walk.py.
    for sig, code, at in ((signal.SIGTERM, 3, "d10"), (signal.SIGINT, 130, "d40")):
        p = start_script("refresh", "--name", "big", "--json", "--workers", "1",
                         env=pause_env(env, pause_shim, "stat", d / at / "f25"))
        with reaped(p):
            wait_stopped(p, "the walk to stop at %s/f25" % at)
            p.send_signal(sig)          # pending while stopped, handled once it goes on
            out, err = go_on(p)
        assert p.returncode == code, (sig, out, err)
        x = json.loads(out.decode())["results"][0]
        assert x["complete"] is False and ckpt.exists(), x
        assert 0 < x["entries_seen"] < 60 * 51, x
    r = run_script("refresh", "--name", "big", "--json", env=env, clean=True)
    x = json.loads(r.out)["results"][0]
    assert r.rc == 0 and x["resumed"] is True and not ckpt.exists()


def test_workers_and_threads_give_the_same_counts_under_each_python(python, tmp_path):
    """--workers 2 and --threads 4 count what a one-process walk counts on every version;
    where worker processes are not available (3.6) the run says so in one note."""
    scratch, env = setup_env(tmp_path)
    d = make_dataset(scratch, files=40)

    def run(*a):
        return run_script(*a, python=python, env=env, clean=True)
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
    # rescue's copies likewise: the same copy from each engine, the same one note on 3.6
    copies = {}
    for args in (("--workers", "1"), ("--workers", "2"), ("--threads", "4")):
        dest = tmp_path / ("copy" + "".join(args))
        r = run("rescue", "--name", "ds", "--all", "--to", dest, "--json", *args)
        assert r.rc == 0, r
        doc = json.loads(r.out)
        said = any("--workers needs Python 3.7" in n for n in doc["notes"])
        assert said == (args == ("--workers", "2") and version < (3, 7)), doc["notes"]
        copies[args] = dict((os.path.relpath(p, str(dest)), open(p, "rb").read())
                            for p in (os.path.join(dp, n) for dp, _, fns in os.walk(str(dest))
                                      for n in fns))
        assert doc["entries_copied"] == len(copies[args]) > 0, doc
    assert copies[("--workers", "2")] == copies[("--workers", "1")] == copies[("--threads", "4")]
