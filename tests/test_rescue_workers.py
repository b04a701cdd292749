"""rescue with a worker process (the default on a local disk with two CPUs): the copy runs
in another process, and every way a rescue is stopped reaches it there: a signal to the
main process alone, a stop the API's caller asks for, the main process killed outright.
Each test holds the worker with a large file half copied (the pause shim) while the stop
is made, so none depends on how fast the copy goes."""
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import (KEEP, REPO, go_on, pause_env, poll, process_group, process_state,
                      reaped, set_atime, sk, start_script, tool_env, wait_stopped)

OLD = 1577836800.0

if not sk.parallel_ok():
    pytest.skip("worker processes need Python 3.7+ with fork and SCM_RIGHTS",
                allow_module_level=True)


@pytest.fixture
def big(generic, cli):
    """a.txt, big.bin (40 MiB), c.txt, all old, walked in check mode."""
    root = generic["scratch"] / "ds"
    root.mkdir()
    (root / "a.txt").write_bytes(b"first")
    (root / "big.bin").write_bytes(os.urandom(40 << 20))
    (root / "c.txt").write_bytes(b"last")
    for n in ("a.txt", "big.bin", "c.txt"):
        set_atime(root / n, OLD)
    assert cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    generic["root"] = root
    return generic


def held_rescue(big, dest, pause_shim, workers="2", on="copy"):
    """`rescue --to dest --workers N --json` started with the pause shim: the process that
    copies holds itself with big.bin half copied (on="open": at the first open of it)."""
    env = pause_env(dict(os.environ), pause_shim, on, big["root"] / "big.bin")
    return start_script("rescue", "--name", "ds", "--to", dest, "--workers", workers, "--json",
                        env=env)


def stopped_worker(proc, workers="2"):
    """The pid of the process of proc's group that the pause shim stopped: a worker, not
    proc, with --workers 2; proc itself with --workers 1."""
    wait_stopped(proc, "the copy to pause with big.bin half copied")
    pids = [p for p in process_group(proc.pid) if process_state(p) == "T"]
    assert pids and (proc.pid not in pids) == (workers == "2"), (proc.pid, pids)
    return pids[0]


def temps(dest):
    return sorted(n for n in os.listdir(str(dest)) if n.endswith(".tmp"))


def resumes_exactly(cli, big, dest):
    r = cli("rescue", "--name", "ds", "--to", dest, "--workers", "2", "--json")
    assert r.rc == 0, r
    assert json.loads(r.out)["resumed"] is True
    assert sorted(os.listdir(str(dest))) == ["a.txt", "big.bin", "c.txt"]
    for n in ("a.txt", "big.bin", "c.txt"):
        assert (dest / n).read_bytes() == (big["root"] / n).read_bytes(), n


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_to_the_main_process_alone_stops_the_copy(big, cli, tmp_path, pause_shim,
                                                          workers):
    """SIGTERM to the main process alone, with big.bin half copied (by the main process, or
    by its worker): exit 3, its temporary file removed, and the resume is exact."""
    dest = tmp_path / "safe"
    proc = held_rescue(big, dest, pause_shim, workers)
    with reaped(proc):
        copier = stopped_worker(proc, workers)
        [tmp] = temps(dest)         # the copying process's temporary file: its pid in the name
        assert ".%d." % copier in tmp, (copier, tmp)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = go_on(proc, timeout=120)
    assert proc.returncode == 3, (out, err)
    res = json.loads(out.decode())
    assert res["stopped"] == "term" and res["complete"] is False, res
    assert sorted(os.listdir(str(dest))) == ["a.txt"]       # the temporary file removed
    resumes_exactly(cli, big, dest)


def test_a_stop_asked_through_the_api_stops_the_workers_copy(big, tmp_path, pause_shim):
    """should_stop() is the caller's, and what it reads is in the main process's memory
    alone (set there by a thread of the caller's): once it says stop, the copy the worker
    is in the middle of stops at its next chunk."""
    dest, stop, seen = tmp_path / "safe", tmp_path / "stop", tmp_path / "seen"
    code = ("import json, os, sys, threading, time; sys.path.insert(0, sys.argv[1])\n"
            "import scratch_keepalive as sk\n"
            "asked = []\n"
            "def watch():\n"
            "    while not os.path.exists(sys.argv[3]):\n"
            "        time.sleep(0.01)\n"
            "    asked.append('term')\n"
            "def should_stop():\n"
            "    if asked:\n"
            "        open(sys.argv[4], 'w').close()\n"
            "        return asked[0]\n"
            "threading.Thread(target=watch, daemon=True).start()\n"
            "r = sk.rescue('ds', sys.argv[2], workers=2, should_stop=should_stop)\n"
            "print(json.dumps(r))\n")
    env = pause_env(tool_env(big["state"]), pause_shim, "copy", big["root"] / "big.bin")
    proc = subprocess.Popen([sys.executable, "-c", code, str(REPO), str(dest), str(stop),
                             str(seen)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    with reaped(proc):
        stopped_worker(proc)
        open(str(stop), "w").close()
        poll(seen.exists, "the main process to see the stop while the worker is held")
        out, err = go_on(proc, timeout=120)
    assert proc.returncode == 0, (out, err)
    res = json.loads(out.decode())
    assert res["complete"] is False and res["stopped"] == "term", res
    assert res["exit_code"] == 3, res
    assert sorted(os.listdir(str(dest))) == ["a.txt"]


def test_the_worker_dies_with_the_main_process(big, cli, tmp_path, pause_shim):
    """The main process killed outright (SIGKILL to it alone): its worker does not go on
    copying on its own; the next rescue removes what it left and completes."""
    dest = tmp_path / "safe"
    proc = held_rescue(big, dest, pause_shim)
    with reaped(proc):
        worker = stopped_worker(proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        poll(lambda: process_state(worker) in (None, "Z"), "the worker to be killed with it")
    assert "big.bin" not in os.listdir(str(dest))
    assert len(temps(dest)) == 1
    resumes_exactly(cli, big, dest)
    assert temps(dest) == []


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_destination_that_fills_during_the_copy_says_so_and_resumes(big, cli, tmp_path,
                                                                      pause_shim, mounts,
                                                                      workers):
    """The destination (a 64 MiB tmpfs: room enough when checked) is filled by someone else
    once the copy has begun (held at the first open of big.bin, the read-ahead's): exit 1
    with one line saying the disk or quota is full and what to do, no temporary file left;
    with the space freed, the rescue resumes and the copy is exact. With --workers 2 the
    copies that fail run in the worker, and the main process says so."""
    dest = tmp_path / "dest"
    dest.mkdir()
    mounts("-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", dest)
    proc = held_rescue(big, dest, pause_shim, workers, on="open")
    with reaped(proc):
        wait_stopped(proc, "the rescue to pause at its first open of big.bin")
        filler = dest / "filler"
        with open(str(filler), "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass

        def ended():
            # (the worker holds itself once too, at its own first open of big.bin)
            os.killpg(proc.pid, signal.SIGCONT)
            return proc.poll() is not None
        poll(ended, "the rescue to end", timeout=120)
        out, err = proc.communicate()
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, (out, err)
    assert "full" in lines[0] and "run rescue again" in lines[0], lines
    assert temps(dest) == []
    filler.unlink()
    resumes_exactly(cli, big, dest)
    assert temps(dest) == []
