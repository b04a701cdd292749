"""One walk loop under every engine and every Python: a budget stops the work, not just the count.

The walk's main process cuts the batches; whichever runner does them (inline, threads, worker
processes) touches exactly the entries the batches hold. Python 3.6 has no scandir on a file
descriptor and no worker processes, and runs the same loop.
"""
import json
import os
import sys

import pytest

from conftest import KEEP, NOW, pyenv_pythons, run_script, sk

PYTHONS = pyenv_pythons() or [("current", sys.executable)]
ENGINES = [("--workers", "1"), ("--threads", "4"), ("--workers", "2")]
OLD_NS = 1577836800 * 10 ** 9          # 2020-01-01: old by policy and in the real past


def build(root):
    """The root, its sentinel, a small directory, then 20 files: the walk's order."""
    order = [b"", os.fsencode(sk.SENTINEL)]
    os.makedirs(os.path.join(root, b"a"))
    order.append(b"a")
    for n in (b"x1", b"x2", b"x3"):
        open(os.path.join(root, b"a", n), "wb").close()
        order.append(b"a/" + n)
    for i in range(20):
        name = b"b%02d" % i
        with open(os.path.join(root, name), "wb") as f:
            f.write(b"z" * i)
        order.append(name)
    return order


def age(root, order):
    for rel in order:
        path = os.path.join(root, rel) if rel else root
        st = os.lstat(path)
        os.utime(path, ns=(OLD_NS, st.st_mtime_ns), follow_symlinks=False)


@pytest.mark.parametrize("python", [p for _, p in PYTHONS], ids=[v for v, _ in PYTHONS])
def test_max_entries_touches_exactly_the_first_n_entries_on_every_engine(python, tmp_path):
    """--max-entries N touches the first N entries of the walk's order and no other, even
    where a directory early in a batch has its subtree walked before the batch's rest."""
    scratch = tmp_path / "scratch"
    root = os.fsencode(str(scratch / "ds"))
    os.makedirs(root)
    order = build(root)
    env = {"SCRATCH_KEEPALIVE_HOME": str(tmp_path / "state"), "SCRATCH_KEEPALIVE_NOW": NOW,
           "TZ": "UTC", "LC_ALL": "C"}
    assert run_script("init", "--profile", "generic", "--scratch-root", scratch, python=python,
                      env=env).rc == 0
    assert run_script("add", "--name", "ds", "--path", os.fsdecode(root), "--keep-until", KEEP,
                      python=python, env=env).rc == 0
    ckpt = tmp_path / "state" / "checkpoints" / "ds.json"
    for engine in ENGINES:
        for k in (10, 17):
            age(root, order)
            if ckpt.exists():
                ckpt.unlink()
            r = run_script("refresh", "--name", "ds", "--json", "--max-entries", k, *engine,
                           python=python, env=env)
            assert r.rc == 3, (engine, k, r)
            res = json.loads(r.out)["results"][0]
            assert (res["entries_seen"], res["entries_touched"]) == (k, k), (engine, k, res)
            touched = [rel for rel in order
                       if os.lstat(os.path.join(root, rel) if rel else root).st_atime_ns != OLD_NS]
            assert touched == order[:k], (engine, k)


@pytest.mark.skipif(not hasattr(__import__("gc"), "get_freeze_count"), reason="Python 3.7+")
def test_worker_processes_leave_the_collector_as_they_found_it(cli, env):
    """The process runner freezes the collector while its workers share this process's
    pages; main() returns with nothing frozen (the API leaves no global change behind)."""
    import gc
    root = env["scratch"] / "ds"
    root.mkdir()
    for i in range(50):
        (root / ("f%d" % i)).write_bytes(b"x")
    assert cli("init", "--profile", "generic", "--scratch-root", env["scratch"]).rc == 0
    assert cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0
    gc.collect()
    assert gc.get_freeze_count() == 0
    r = cli("refresh", "--name", "ds", "--workers", "2", "--json")
    assert r.rc == 0 and r.json()["results"][0]["entries_seen"] == 52, r
    assert gc.get_freeze_count() == 0
    assert gc.isenabled()


def test_one_stop_vocabulary_for_walks_and_budgets(monkeypatch):
    """stop_reason() is the one test: a signal first, then --max-entries, then
    --max-seconds; a Budget asks it with what is left of the command's budgets, and every
    code has its words."""
    clock = [100.0]
    monkeypatch.setattr(sk.time, "monotonic", lambda: clock[0])
    assert sk.stop_reason() is None
    assert sk.stop_reason(lambda: None, 101.0, 5, 4) is None
    assert sk.stop_reason(lambda: sk.STOP_TERM, 100.0, 5, 5) == sk.STOP_TERM
    assert sk.stop_reason(None, 100.0, 5, 5) == sk.STOP_MAX_ENTRIES
    assert sk.stop_reason(None, 100.0, 5, 4) == sk.STOP_MAX_SECONDS
    budget = sk.Budget(10, 3)
    assert budget.stop_reason() is None and budget.stop_reason(entries_done=3) == "max-entries"
    budget.entries_left = 0
    assert budget.stop_reason() == "max-entries"
    clock[0] += 10
    assert sk.Budget(10, None).stop_reason() is None
    assert sk.Budget(0, None).stop_reason(lambda: "int") == "int"
    assert set(sk.STOP_WORDS) == {"int", "term", "hup", "max-seconds", "max-entries"}
