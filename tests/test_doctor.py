"""doctor and repair: every fault injected for real, named, mended, and the data left alone.

Each test breaks something the way it breaks in life (a registry cut short by
a full disk, a refresh killed with SIGKILL, a sentinel deleted by hand, a
script moved after install-cron, an scancel on a scrontab job), then checks:
doctor names it (exit 1, the check in --json with ok=false), repair mends it,
doctor then passes for that check, and no entry of the dataset changed:
atime, mtime, size and mode of every entry, taken with snapshot() before and
after. Dataset atimes are aged to 2020 first, so that any read of a file or
listing of a directory would move them even on a relatime mount.

Slurm is installed on this machine, so a setup without a schedule has doctor
fail on "schedule". Tests that are not about the schedule run with PATH set to
an empty directory: the Slurm commands are then not found, "schedule" is only
a warning, and doctor's exit code says exactly whether the injected fault is
seen. The schedule faults run against the real Slurm test bed as the ordinary
user `slurmtest` (tools/slurm-testbed.sh start), through tests/slurmbed.py.
"""
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from conftest import (KEEP, make_dataset, pause_env, run_as_nobody,  # noqa: F401
                      pause_shim, poll, reaped, run_script, snapshot, start_script, tree_bytes,
                      wait_stopped, write_private)
from slurmbed import (JOB, USER, as_user, crontab, jobs, make_world,  # noqa: F401
                      need_scrontab, settle, slurm_turn, wait_done)
import scratch_keepalive as sk

OLD = 1600000000            # 2020-09-13: the atime every dataset entry starts with
SENTINEL = ".scratch-keepalive"
CHECK_KEYS = {"name", "ok", "level", "message"}
PLAIN_CHECKS = {"python", "config", "registry", "scratch-root", "state-dir", "schedule",
                "schedule-paths", "schedule-cadence", "schedule-jobs", "schedule-block",
                "schedule-account", "quota"}
DATASET_CHECKS = {"checkpoint", "lock", "root", "sentinel", "location", "overdue",
                  "approval"} | set(sk.ATTENTION_CODES)


# ------------------------------------------------------------------ helpers

def age(root):
    """Set the atime of every entry below root (root included) to OLD, keeping mtime."""
    for key in snapshot(root):
        p = os.path.join(str(root), key) if key != "." else str(root)
        st = os.lstat(p)
        os.utime(p, ns=(OLD * 10 ** 9, st.st_mtime_ns), follow_symlinks=False)


def doctor(cli):
    """(exit code, report, {check name: check}) of `doctor --json`."""
    r = cli("doctor", "--json")
    assert r.rc in (0, 1), r
    report = r.json()
    return r.rc, report, {c["name"]: c for c in report["checks"]}


def repair(cli, *extra):
    r = cli("repair", "--json", *extra)
    assert r.rc == 0, r
    return r.json()


def assert_named(cli, name, level="fail", *words):
    """doctor exits 1 (for a fail) and names the check with that level; returns the check."""
    rc, report, checks = doctor(cli)
    assert name in checks, (name, report)
    c = checks[name]
    assert c["level"] == level and c["ok"] is (level in ("ok", "info")), c
    for w in words:
        assert w in c["message"], (w, c)
    if level in ("warn", "fail"):
        assert rc == 1 and report["ok"] is False, report
    return c


def assert_passes(cli, name):
    """doctor exits 0 and the check is absent or ok."""
    rc, report, checks = doctor(cli)
    assert name not in checks or checks[name]["level"] == "ok", checks.get(name)
    assert rc == 0 and report["ok"] is True, [c for c in report["checks"] if not c["ok"]]


def plain(actions):
    """Actions with the set-aside time stamps blanked, for comparing two runs."""
    return sorted(re.sub(r"corrupt-\d{8}T\d{6}Z", "corrupt-T", a) for a in actions)


def mend(cli, setup):
    """`repair --dry-run`, which must change nothing, then `repair`, which must do just what
    the dry run listed. Returns the real run's {"actions", "left"}."""
    files, data = tree_bytes(setup["state"]), snapshot(setup["scratch"])
    dry = repair(cli, "--dry-run")
    assert dry["dry_run"] is True, dry
    assert tree_bytes(setup["state"]) == files, "repair --dry-run changed the state dir"
    assert snapshot(setup["scratch"]) == data, "repair --dry-run changed the data"
    out = repair(cli)
    assert out["dry_run"] is False
    assert plain(dry["actions"]) == plain(out["actions"]), (dry, out)
    return out


def set_aside_copies(path):
    """Files named PATH.corrupt-<UTC time>[-N] next to path."""
    d, base = os.path.split(str(path))
    pat = re.compile(re.escape(base) + r"\.corrupt-\d{8}T\d{6}Z([-.]\w+)?$")
    return sorted(os.path.join(d, f) for f in os.listdir(d) if pat.match(f))


def without(snap, *keys):
    return dict((k, v) for k, v in snap.items() if k not in keys)


# ------------------------------------------------------------------ fixtures

@pytest.fixture
def no_slurm(tmp_path, monkeypatch):
    """PATH holds nothing: Slurm's commands (and lfs) are not found by the tool."""
    empty = tmp_path / "emptybin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("squeue") is None and shutil.which("scontrol") is None
    return empty


@pytest.fixture
def real_clock(monkeypatch):
    """The policy clock at the real time: `added` and `last_refresh` are real times, so on the
    fixed 2030 clock every dataset would be overdue."""
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(time.time()))


@pytest.fixture
def healthy(cli, generic, no_slurm, real_clock):
    """A generic setup with dataset `ds` (registry backup present), aged, and doctor exit 0."""
    d = make_dataset(generic["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    assert cli("extend", "--name", "ds", "--keep-until", KEEP).rc == 0   # leaves a backup
    assert (generic["state"] / "registry.json.bak").is_file()
    age(generic["scratch"])
    rc, report, checks = doctor(cli)
    assert rc == 0 and report["ok"] is True, report
    assert checks["schedule"]["level"] == "info", checks["schedule"]   # Slurm hidden
    return dict(generic, ds=d)


# ------------------------------------------------------------------ 13. JSON shape

def test_json_shape_and_exit_code(cli, healthy):
    def shape(rc, report):
        assert set(report) >= {"ok", "checks"} and isinstance(report["ok"], bool)
        assert report["checks"], report
        for c in report["checks"]:
            assert set(c) == CHECK_KEYS, c
            assert isinstance(c["name"], str) and isinstance(c["message"], str) and c["message"]
            assert c["level"] in ("ok", "info", "warn", "fail"), c
            assert c["ok"] is (c["level"] in ("ok", "info")), c
            base, _, name = c["name"].partition(":")
            assert (c["name"] in PLAIN_CHECKS if not name else
                    base in DATASET_CHECKS and sk.valid_name(name)), c
        assert report["ok"] is all(c["ok"] for c in report["checks"])
        assert rc == (0 if report["ok"] else 1)

    rc, report, checks = doctor(cli)
    shape(rc, report)
    assert report["ok"] is True
    for name in ("python", "config", "registry", "scratch-root", "state-dir", "root:ds",
                 "schedule"):
        assert name in checks, report
    os.unlink(str(healthy["ds"] / SENTINEL))
    rc, report, checks = doctor(cli)
    shape(rc, report)
    assert report["ok"] is False and rc == 1
    # As users run it: a real process, text and JSON, same exit codes.
    r = run_script("doctor", "--json")
    assert r.rc == 1 and r.json()["ok"] is False, r
    shape(r.rc, r.json())
    r = run_script("doctor")
    assert r.rc == 1 and "sentinel:ds" in r.out and "FAIL" in r.out, r


# ------------------------------------------------------------------ 1. damaged registry

@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_damaged_registry_restored_from_backup(cli, healthy, damage):
    reg = healthy["state"] / "registry.json"
    good = reg.read_bytes()
    bad = good[:len(good) // 2] if damage == "truncated" else \
        bytes(random.Random(7).getrandbits(8) for _ in range(len(good)))
    write_private(reg, bad)
    before = snapshot(healthy["scratch"])
    assert cli("list").rc != 0
    assert_named(cli, "registry", "fail", str(reg))
    out = mend(cli, healthy)
    assert any("registry aside" in a for a in out["actions"]), out
    assert any("backup" in a for a in out["actions"]), out
    aside = set_aside_copies(reg)
    assert len(aside) == 1 and open(aside[0], "rb").read() == bad, aside
    assert_passes(cli, "registry")
    r = cli("list", "--json")
    assert r.rc == 0, r
    assert [(d["name"], d["path"]) for d in r.json()] == [("ds", str(healthy["ds"]))]
    assert snapshot(healthy["scratch"]) == before


# ------------------------------------------------------------------ 2. no backup: rebuild

def test_damaged_registry_without_backup_rebuilt_from_sentinels(cli, healthy):
    scratch, state = healthy["scratch"], healthy["state"]
    other = make_dataset(scratch / "deep" / "er", "two")
    assert cli("add", "--name", "two", "--path", other, "--keep-until", "2031-01-01",
               "--cadence-days", "7", "--approval", "RT-1234").rc == 0
    age(scratch)
    reg = state / "registry.json"
    write_private(reg, reg.read_bytes()[:40])
    os.unlink(str(state / "registry.json.bak"))
    before = snapshot(scratch)
    assert_named(cli, "registry", "fail")
    out = mend(cli, healthy)
    assert any("rebuild the registry from 2 sentinel" in a for a in out["actions"]), out
    # The sentinels record keep-until, cadence and approval: nothing is guessed, nothing lost
    # (older sentinels without them: tests/test_state.py).
    assert not [t for t in out["left"] if "'ds'" in t or "'two'" in t], out
    r = cli("list", "--json")
    assert r.rc == 0, r
    got = dict((d["name"], d) for d in r.json())
    assert sorted(got) == ["ds", "two"]
    assert got["ds"]["path"] == str(healthy["ds"]) and got["two"]["path"] == str(other)
    assert (got["two"]["keep_until"], got["two"]["cadence_days"], got["two"]["approval"]) == \
        ("2031-01-01", 7, "RT-1234")
    assert (got["ds"]["keep_until"], got["ds"]["approval"]) == (KEEP, None)
    assert_passes(cli, "registry")
    assert snapshot(scratch) == before


# ------------------------------------------------------------------ 3. kill -9 a lock holder

def children(pid):
    """Pids whose parent is pid (the walk's forked workers)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d))
    return out


def gone(pid):
    """True when pid has exited (a zombie has exited: its descriptors, locks included, are
    closed)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_stale_lock_of_killed_refresh(cli, healthy, pause_shim):
    """A refresh held mid-walk (the pause shim stops it at one file; then its whole process
    group is stopped) holds its lock: no fault. Killed with -9, its lock is stale: named,
    removed by repair, and the walk after that is whole."""
    state, scratch = healthy["state"], healthy["scratch"]
    big = scratch / "big"
    big.mkdir()
    for i in range(10):
        sub = big / ("d%03d" % i)
        sub.mkdir()
        for j in range(20):
            (sub / ("f%04d" % j)).write_bytes(b"")
    assert cli("add", "--name", "big", "--path", big, "--keep-until", KEEP).rc == 0
    lock = state / "locks" / "big.lock"
    p = start_script("refresh", "--name", "big",
                     env=pause_env(dict(os.environ), pause_shim, "stat",
                                   big / "d005" / "f0010"))
    with reaped(p):
        wait_stopped(p, "the walk to stop at d005/f0010")
        os.killpg(p.pid, signal.SIGSTOP)    # alive, holding the lock, going nowhere
        assert json.loads(lock.read_text())["pid"] == p.pid     # taken before the walk
        rc, report, checks = doctor(cli)
        assert "lock:big" not in checks, checks["lock:big"]     # a live holder is no fault
        out = mend(cli, healthy)
        assert lock.exists() and not any("lock" in a for a in out["actions"]), out
        workers = children(p.pid)
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(30) == -signal.SIGKILL
        # The walk's worker processes share the lock's open file; they exit on their own when
        # the killed parent's end of their socket closes, once they may run again. Wait for
        # that (no orphans left).
        if workers:
            os.killpg(p.pid, signal.SIGCONT)
        poll(lambda: all(gone(w) for w in workers), "the workers of the killed walk to exit",
             timeout=30)
    before = snapshot(scratch)
    assert_named(cli, "lock:big", "fail", "gone", str(p.pid))
    out = mend(cli, healthy)
    assert any("stale lock" in a and "'big'" in a for a in out["actions"]), out
    assert not lock.exists()
    assert_passes(cli, "lock:big")
    assert snapshot(scratch) == before
    r = cli("refresh", "--name", "big", "--json")
    assert r.rc == 0, r
    res = r.json()["results"][0]
    assert res["complete"] is True and res["entries_done"] == 10 * 21 + 2, res  # + root, sentinel


# ------------------------------------------------------------------ 4. sentinel

HOLD_AFTER_DEATH = r"""
import os, sys, time
import scratch_keepalive as sk
sk.DatasetLock(sk.Store(sys.argv[1]), "ds").acquire()
child = os.fork()
if child == 0:          # shares the lock's open file: the lock stays held
    os.close(1)
    time.sleep(300)
    os._exit(0)
print(child, flush=True)
"""


def test_lock_of_a_gone_pid_still_held_is_not_promised_away(cli, healthy):
    """The process a lock names is gone, but one it started still holds the lock: doctor
    says what to do (end that process) instead of promising that repair removes it, and
    repair leaves it; once the holder ends, repair removes it."""
    lock = healthy["state"] / "locks" / "ds.lock"
    p = subprocess.run([sys.executable, "-c", HOLD_AFTER_DEATH, str(healthy["state"])],
                       stdout=subprocess.PIPE, check=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=os.path.dirname(sk.__file__)))
    holder = int(p.stdout)
    try:
        dead = json.loads(lock.read_text())["pid"]
        assert dead != holder and not os.path.exists("/proc/%d" % dead)
        c = assert_named(cli, "lock:ds", "fail", str(dead), "still holds the lock",
                         "end that process")
        assert "repair removes it" not in c["message"], c
        out = mend(cli, healthy)
        assert lock.exists() and not any("lock" in a for a in out["actions"]), out
        assert any("still holds the lock" in x and str(lock) in x for x in out["left"]), out
    finally:
        os.kill(holder, signal.SIGKILL)
    poll(lambda: gone(holder), "the lock's holder to exit", timeout=30)
    assert_named(cli, "lock:ds", "fail", str(dead), "repair removes it")
    out = mend(cli, healthy)
    assert any("stale lock" in a and "'ds'" in a for a in out["actions"]), out
    assert not lock.exists()
    assert_passes(cli, "lock:ds")


def test_deleted_sentinel_is_rewritten(cli, healthy):
    ds = healthy["ds"]
    os.unlink(str(ds / SENTINEL))
    before = snapshot(healthy["scratch"])
    assert_named(cli, "sentinel:ds", "fail", "missing")
    out = mend(cli, healthy)
    assert any("sentinel" in a and "'ds'" in a for a in out["actions"]), out
    st = os.lstat(str(ds / SENTINEL))
    assert stat.S_ISREG(st.st_mode)
    doc = json.loads((ds / SENTINEL).read_text())
    assert doc["name"] == "ds" and doc["tool"] == "scratch-keepalive", doc
    assert_passes(cli, "sentinel:ds")
    after = snapshot(healthy["scratch"])
    # Creating a file in the dataset root moves that directory's mtime (the kernel does it);
    # its atime, and every other entry, must be as they were.
    key = os.path.join("ds", SENTINEL)
    root_before, root_after = before.pop("ds"), after.pop("ds")
    assert root_after[0] == root_before[0] and root_after[2:] == root_before[2:]
    assert without(after, key) == before


@pytest.mark.parametrize("foreign", ["file", "symlink"])
def test_foreign_file_in_sentinel_place_is_left_alone(cli, healthy, tmp_path, foreign):
    ds = healthy["ds"]
    path = ds / SENTINEL
    os.unlink(str(path))
    target = tmp_path / "elsewhere"
    if foreign == "file":
        path.write_bytes(b"somebody else's notes\n")
    else:
        os.symlink(str(target), str(path))
    age(healthy["scratch"])
    before = snapshot(healthy["scratch"])
    assert_named(cli, "sentinel:ds", "fail")
    out = mend(cli, healthy)
    assert not any("sentinel" in a for a in out["actions"]), out
    assert any(str(path) in t and "not ours" in t for t in out["left"]), out
    assert snapshot(healthy["scratch"]) == before       # its atime too: repair never read it
    if foreign == "file":
        assert path.read_bytes() == b"somebody else's notes\n"
    else:
        assert os.readlink(str(path)) == str(target) and not os.path.lexists(str(target))
    assert_named(cli, "sentinel:ds", "fail")        # still there: it is the user's to move


def test_doctor_does_not_promise_to_rewrite_a_foreign_sentinel(cli, healthy):
    """A file that is not ours is not "missing", and repair will not rewrite it."""
    (healthy["ds"] / SENTINEL).write_bytes(b"somebody else's notes\n")
    c = assert_named(cli, "sentinel:ds", "fail")
    assert "missing" not in c["message"] and "repair rewrites it" not in c["message"], c


def test_sentinel_naming_another_dataset_is_not_left_unsaid(cli, healthy):
    """doctor says repair rewrites it: repair must then rewrite it, or say why it did not."""
    path = healthy["ds"] / SENTINEL
    doc = json.loads(path.read_text())
    doc["name"] = "other"
    path.write_text(json.dumps(doc))
    age(healthy["scratch"])
    before = snapshot(healthy["scratch"])
    assert_named(cli, "sentinel:ds", "fail", "naming 'other'")
    out = mend(cli, healthy)
    assert any(str(path) in t or "'ds'" in t for t in out["actions"] + out["left"]), out
    assert without(snapshot(healthy["scratch"]), os.path.join("ds", SENTINEL)) == \
        without(before, os.path.join("ds", SENTINEL))


# ------------------------------------------------------------------ 5. permissions

def test_loose_state_permissions_restored(cli, healthy):
    state = healthy["state"]
    os.chmod(str(state), 0o755)
    os.chmod(str(state / "registry.json"), 0o644)
    before = snapshot(healthy["scratch"])
    assert_named(cli, "state-dir", "fail", "registry.json")
    out = mend(cli, healthy)
    assert any("permissions" in a for a in out["actions"]), out
    assert stat.S_IMODE(os.stat(str(state)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(str(state / "registry.json")).st_mode) == 0o600
    assert_passes(cli, "state-dir")
    assert snapshot(healthy["scratch"]) == before


# ------------------------------------------------------------------ 6. checkpoints

def test_orphaned_and_unreadable_checkpoints_set_aside(cli, healthy):
    ck = healthy["state"] / "checkpoints"
    ghost_bytes = json.dumps({"format": 1, "dataset": "ghost", "path": "/nowhere",
                              "mode": "touch", "entries_done": 5}).encode()
    garbage = bytes(random.Random(3).getrandbits(8) for _ in range(300))
    write_private(ck / "ghost.json", ghost_bytes)
    write_private(ck / "ds.json", garbage)
    before = snapshot(healthy["scratch"])
    assert_named(cli, "checkpoint:ghost", "fail", "no registered dataset")
    assert_named(cli, "checkpoint:ds", "fail", "damaged")
    out = mend(cli, healthy)
    for name in ("ghost", "ds"):
        assert any("checkpoint %s aside" % name in a for a in out["actions"]), out
    for name, data in (("ghost", ghost_bytes), ("ds", garbage)):
        assert not (ck / (name + ".json")).exists()
        aside = set_aside_copies(ck / (name + ".json"))
        assert len(aside) == 1 and open(aside[0], "rb").read() == data, aside
    assert_passes(cli, "checkpoint:ghost")
    assert_passes(cli, "checkpoint:ds")
    assert snapshot(healthy["scratch"]) == before
    r = cli("refresh", "--name", "ds", "--json")
    assert r.rc == 0, r
    res = r.json()["results"][0]
    assert res["resumed"] is False and res["complete"] is True, res


class OneSecond(object):
    """The time module as the tool sees it, but for the UTC time of day (gmtime()), which
    stays at one second: every set-aside made meanwhile is named in the same second."""

    def __init__(self, at):
        self.at = at

    def __getattr__(self, name):
        return getattr(time, name)

    def gmtime(self, secs=None):
        return time.gmtime(self.at if secs is None else secs)


def test_set_aside_never_overwrites_an_earlier_copy(cli, healthy, monkeypatch):
    """Damaged state is set aside, not deleted: a second set-aside within the same second
    must not replace the first copy (the name has one-second resolution). The tool's clock
    of day is held at one second, so the two repairs always share it, however long they
    take."""
    ck = healthy["state"] / "checkpoints" / "ds.json"
    monkeypatch.setattr(sk, "time", OneSecond(int(time.time())))
    for data in (b"first damaged copy", b"second damaged copy"):
        write_private(ck, data)
        repair(cli)
    copies = set_aside_copies(ck)
    stamps = set(re.search(r"\.corrupt-(\d{8}T\d{6}Z)", f).group(1) for f in copies)
    assert len(copies) == 2 and len(stamps) == 1, copies     # the case under test
    kept = sorted(open(f, "rb").read() for f in copies)
    assert kept == [b"first damaged copy", b"second damaged copy"], kept


def test_checkpoint_of_another_path_set_aside_and_walk_starts_over(cli, healthy):
    """A real partial walk's checkpoint, left behind when the dataset is re-added elsewhere."""
    assert cli("refresh", "--name", "ds", "--max-entries", "2").rc == 3
    ck = healthy["state"] / "checkpoints" / "ds.json"
    doc = json.loads(ck.read_text())
    doc["path"] = doc["path"] + "-old"
    write_private(ck, json.dumps(doc).encode())
    assert_named(cli, "checkpoint:ds", "fail", "not its current path")
    mend(cli, healthy)
    assert not ck.exists() and len(set_aside_copies(ck)) == 1
    assert_passes(cli, "checkpoint:ds")
    res = cli("refresh", "--name", "ds", "--json").json()["results"][0]
    assert res["resumed"] is False and res["complete"] is True, res


# ------------------------------------------------------------------ 7. missing root

def test_missing_root_is_named_and_never_recreated(cli, healthy):
    ds = healthy["ds"]
    moved = healthy["scratch"] / "ds-moved-away"
    os.rename(str(ds), str(moved))
    before = snapshot(healthy["scratch"])
    assert_named(cli, "root:ds", "fail", "missing", str(ds))
    out = mend(cli, healthy)
    assert not any("sentinel" in a for a in out["actions"]), out
    assert not os.path.lexists(str(ds))             # no root, no sentinel: data never created
    assert snapshot(healthy["scratch"]) == before
    assert_named(cli, "root:ds", "fail", "missing")


# ------------------------------------------------------------------ 8. keep-until

def test_keep_until_soon_and_expired_are_information(cli, healthy, monkeypatch):
    """The dataset's keep-until is the user's to act on: info lines, doctor still exits 0."""
    today = sk.utc_date(time.time())
    soon = (today + sk.datetime.timedelta(days=10)).isoformat()
    assert cli("extend", "--name", "ds", "--keep-until", soon).rc == 0
    rc, report, checks = doctor(cli)
    c = checks["expiring:ds"]
    assert c["level"] == "info" and c["ok"] is True and soon in c["message"], c
    assert "in 10 days" in c["message"], c
    assert rc == 0 and report["ok"] is True, report
    later = sk.datetime.datetime.combine(today + sk.datetime.timedelta(days=11),
                                         sk.datetime.time(12))
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", later.strftime("%Y-%m-%dT%H:%M:%SZ"))
    rc, report, checks = doctor(cli)
    c = checks["expired:ds"]
    assert c["level"] == "info" and "has passed" in c["message"], c
    assert "overdue:ds" not in checks and "approval:ds" not in checks   # no longer protected
    assert rc == 0 and report["ok"] is True, report


# ------------------------------------------------------------------ 9. overdue

def test_overdue_after_cadence_plus_four_days(cli, healthy, monkeypatch):
    """A working 14-day schedule can leave 17 days between runs (days 1 and 15 of a 31-day
    month), and the run then needs time to walk: doctor calls a dataset overdue only 18
    days after its last walk ended."""
    r = cli("refresh", "--name", "ds", "--json")
    assert r.rc == 0, r
    last = sk.parse_iso(cli("list", "--json").json()[0]["last_refresh"])
    age(healthy["scratch"])
    before = snapshot(healthy["scratch"])

    def at(seconds_after):
        monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(last + seconds_after))

    for t in (17 * sk.DAY + 12 * 3600, 18 * sk.DAY - 60):  # the longest gap, a walk: not yet
        at(t)
        rc, report, checks = doctor(cli)
        assert "overdue:ds" not in checks and rc == 0, report
    at(18 * sk.DAY + 60)
    assert_named(cli, "overdue:ds", "fail", "18 days")
    at(19 * sk.DAY)
    assert_named(cli, "overdue:ds", "fail")
    out = mend(cli, healthy)           # nothing repair may do: it never refreshes
    assert out["actions"] == [], out
    assert snapshot(healthy["scratch"]) == before


# ------------------------------------------------------------------ 10. approval (br200)

def test_br200_without_approval_is_information_with_what_remains(cli, env, no_slurm, real_clock,
                                                          monkeypatch):
    monkeypatch.setenv("SCRATCH_KEEPALIVE_SCRATCH_ROOT", str(env["scratch"]))
    r = cli("init")
    assert r.rc == 0, r
    assert json.loads((env["state"] / "config.json").read_text())["profile"] == "br200"
    d = make_dataset(env["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    age(env["scratch"])
    c = assert_named(cli, "approval:ds", "info", "no site approval")
    r = cli("refresh", "--name", "ds", "--json")
    assert r.rc == 0, r
    res = r.json()["results"][0]
    assert res["mode"] == "check" and res["complete"] and res["entries_at_risk"] > 0, res
    before = snapshot(env["scratch"])
    rc, report, checks = doctor(cli)
    c = checks["approval:ds"]
    assert c["level"] == "info" and c["ok"] is True, c
    c = checks["purge-eligible:ds"]         # what the check walk left, as information
    assert c["level"] == "info" and "%d entries of yours older than the purge age" % (
        res["entries_purge_eligible"]) in c["message"], c
    assert rc == 0 and report["ok"] is True, report
    assert "healthy" not in cli("doctor").out
    assert snapshot(env["scratch"]) == before
    assert cli("extend", "--name", "ds", "--approval", "RT 123456").rc == 0
    assert_passes(cli, "approval:ds")


# ------------------------------------------------------------------ 12. dry run, several faults

def test_repair_dry_run_lists_every_action_and_changes_nothing(cli, healthy):
    state, ds = healthy["state"], healthy["ds"]
    write_private(state / "registry.json", b'{"format": 1, "datasets": {"ds": {"na')
    write_private(state / "checkpoints" / "ghost.json",
                  json.dumps({"format": 1, "dataset": "ghost", "path": "/gone"}).encode())
    os.unlink(str(ds / SENTINEL))
    rc, report, checks = doctor(cli)
    assert rc == 1 and checks["registry"]["ok"] is False, report
    files = tree_bytes(state)
    data = snapshot(healthy["scratch"])
    dry = repair(cli, "--dry-run")
    assert dry["dry_run"] is True
    r = cli("repair", "--dry-run")
    assert r.rc == 0 and "would set the damaged registry aside" in r.out, r
    assert tree_bytes(state) == files
    assert snapshot(healthy["scratch"]) == data
    done = repair(cli)
    for words in ("registry aside", "restore the registry", "checkpoint ghost aside",
                  "sentinel of 'ds'"):
        assert any(words in a for a in done["actions"]), (words, done)
        assert any(words in a for a in dry["actions"]), (words, dry)
    assert plain(dry["actions"]) == plain(done["actions"])
    rc, report, checks = doctor(cli)
    assert rc == 0, [c for c in report["checks"] if not c["ok"]]


# ------------------------------------------------------------------ 11. the schedule, real Slurm

def chain_jobs():
    """The test user's jobs named scratch-keepalive, as settle() leaves them."""
    return settle(JOB)


def first_run(u):
    """The chain job that install-cron (or repair) submitted with --begin=now: wait for it to
    run, then return the pending jobs (its successor)."""
    job = json.loads((u.state / "schedule.json").read_text())["job_id"]
    assert job, "no job id recorded"
    assert wait_done(job)["JobState"] == "COMPLETED", job
    return chain_jobs()


def u_doctor(u, **kw):
    r = u.tool("doctor", "--json", **kw)
    assert r.rc in (0, 1), r
    report = r.json()
    return r.rc, report, {c["name"]: c for c in report["checks"]}


def u_repair(u, *extra, **kw):
    r = u.tool("repair", "--json", *extra, **kw)
    assert r.rc == 0, r
    return r.json()


def u_mend(u, **kw):
    """repair --dry-run changes nothing (state, jobs, crontab); repair does what it listed."""
    before = tree_bytes(u.state), jobs(), crontab()
    dry = u_repair(u, "--dry-run", **kw)
    assert dry["dry_run"] is True and (tree_bytes(u.state), jobs(), crontab()) == before
    out = u_repair(u, **kw)
    assert plain(dry["actions"]) == plain(out["actions"]), (dry, out)
    return out


@pytest.fixture
def slurm_user(make_world):
    """A World of the test user's with dataset `ds` registered."""
    u = make_world()
    make_dataset(u.scratch)
    subprocess.run(["chown", "-R", "%s:%s" % (USER, USER), str(u.scratch)], check=True)
    r = u.tool("add", "--name", "ds", "--path", u.scratch / "ds", "--keep-until", KEEP)
    assert r.rc == 0, r
    return u


def install(u, method):
    if method == "scrontab":
        need_scrontab()
    r = u.tool("install-cron", "--method", method, "--json")
    assert r.rc == 0, r
    return r.json()


@pytest.mark.slurm
def test_slurm_chain_after_its_first_run_is_healthy(slurm_user):
    """install-cron, the first job runs: doctor must then find nothing wrong at all."""
    u = slurm_user
    install(u, "sbatch")
    assert len(first_run(u)) == 1
    logs = sorted(os.listdir(str(u.state / "logs")))
    modes = dict((f, oct(stat.S_IMODE(os.lstat(str(u.state / "logs" / f)).st_mode)))
                 for f in logs)
    rc, report, checks = u_doctor(u)
    assert rc == 0, ([c for c in report["checks"] if not c["ok"]], modes)


@pytest.mark.slurm
def test_slurm_duplicate_pending_job_cancelled(slurm_user):
    u = slurm_user
    install(u, "sbatch")
    jobs = first_run(u)        # the first chain job runs at once and queues its successor
    assert len(jobs) == 1, jobs
    chain = jobs[0]["id"]
    rc, report, checks = u_doctor(u)
    assert "schedule-jobs" not in checks and checks["schedule"]["ok"], report
    r = as_user(["sbatch", "--parsable", "--job-name=scratch-keepalive",
                 "--begin=now+10days", "--wrap", "true"])
    assert r.rc == 0, r
    extra = r.out.strip().split(";")[0]
    rc, report, checks = u_doctor(u)
    c = checks.get("schedule-jobs")
    assert rc == 1 and c and c["ok"] is False, report
    assert "2 pending" in c["message"] and chain in c["message"] and extra in c["message"], c
    out = u_mend(u)
    assert any("cancel duplicate pending job %s" % extra in a for a in out["actions"]), out
    jobs = chain_jobs()
    assert [j["id"] for j in jobs] == [chain], jobs
    assert jobs[0]["command"].endswith("job.sh"), jobs       # the chain's own job survives
    rc, report, checks = u_doctor(u)
    assert "schedule-jobs" not in checks and checks["schedule"]["ok"], report


@pytest.mark.slurm
@pytest.mark.parametrize("method", ["sbatch", "scrontab"])
def test_slurm_script_moved_after_install(slurm_user, method):
    u = slurm_user
    old = u.script
    install(u, method)
    first_run(u) if method == "sbatch" else chain_jobs()
    new_dir = u.root / "b"
    new_dir.mkdir()
    os.chmod(str(new_dir), 0o755)
    new = new_dir / "scratch_keepalive.py"
    os.rename(str(old), str(new))
    rc, report, checks = u_doctor(u, script=new)
    c = checks.get("schedule-paths")
    assert rc == 1 and c and c["ok"] is False and str(old) in c["message"], report
    out = u_mend(u, script=new)
    assert any("reinstall the schedule" in a and str(new) in a for a in out["actions"]), out
    jobs = first_run(u) if method == "sbatch" else chain_jobs()
    assert len(jobs) == 1, jobs
    if method == "sbatch":
        text = (u.state / "job.sh").read_text()
    else:
        text = crontab()
    assert str(new) in text and str(old) not in text, text
    assert json.loads((u.state / "schedule.json").read_text())["script"] == str(new)
    rc, report, checks = u_doctor(u, script=new)
    assert "schedule-paths" not in checks and checks["schedule"]["ok"], report
    assert "schedule-jobs" not in checks and "schedule-block" not in checks, report


@pytest.mark.slurm
def test_slurm_disabled_scrontab_block_reinstalled(slurm_user):
    u = slurm_user
    install(u, "scrontab")
    jobs = chain_jobs()
    assert len(jobs) == 1, jobs
    assert as_user(["scancel", jobs[0]["id"]]).rc == 0
    poll(lambda: "#DISABLED:" in crontab(), "scrontab to disable the cancelled job's line",
         timeout=30, interval=0.2)
    rc, report, checks = u_doctor(u)
    c = checks.get("schedule-block")
    assert rc == 1 and c and c["ok"] is False and "DISABLED" in c["message"], report
    out = u_mend(u)
    assert any("reinstall the schedule" in a for a in out["actions"]), out
    text = crontab()
    assert "#DISABLED" not in text and text.count(sk.SCRON_BEGIN) == 1, text
    jobs = chain_jobs()
    assert len(jobs) == 1 and jobs[0]["state"] == "PENDING", jobs
    rc, report, checks = u_doctor(u)
    assert "schedule-block" not in checks and checks["schedule"]["ok"], report
    assert "schedule-jobs" not in checks, report


@pytest.mark.slurm
def test_slurm_nothing_installed_while_datasets_enabled(cli, generic, real_clock, slurm_turn):
    d = make_dataset(generic["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    c = assert_named(cli, "schedule", "fail", "no schedule is installed", "install-cron")
    out = mend(cli, generic)
    assert any(c["message"] in t for t in out["left"]), out     # repair cannot pick an account
    assert_named(cli, "schedule", "fail")
    assert cli("disable", "--name", "ds").rc == 0
    rc, report, checks = doctor(cli)
    assert checks["schedule"]["level"] == "ok", checks["schedule"]


# ------------------------------------------------------------------ 14. an unreadable PATH entry

def test_unreadable_path_directory_means_not_installed_and_doctor_prints_every_check(world_tmp):
    """A directory in PATH that the user may not search makes the lookup of a missing command
    fail with EACCES, not ENOENT: `lfs`, `squeue` and `scrontab` are then simply not there."""
    locked, bin_dir, state = world_tmp / "locked", world_tmp / "bin", world_tmp / "state"
    run = run_as_nobody(world_tmp / "home", state, PATH="%s:%s" % (locked, bin_dir))
    ds = world_tmp / "scratch" / "ds"
    for d in (locked, bin_dir, world_tmp / "home", world_tmp / "scratch", ds):
        d.mkdir()
        os.chown(str(d), 65534, 65534)
    os.symlink(run.python, str(bin_dir / "python3"))
    os.chmod(str(locked), 0)

    assert run("init", "--profile", "generic", "--scratch-root", world_tmp / "scratch").rc == 0
    assert run("add", "--name", "ds", "--path", ds, "--keep-until", KEEP).rc == 0
    r = run("doctor", "--json")
    assert r.rc in (0, 1) and "Permission denied" not in r.out + r.err, r
    checks = dict((c["name"], c) for c in r.json()["checks"])
    for name in ("python", "config", "registry", "scratch-root", "state-dir", "root:ds",
                 "schedule"):
        assert name in checks, (name, checks)
    assert checks["schedule"]["level"] == "info" and "not installed" in checks["schedule"][
        "message"], checks["schedule"]
    text = run("doctor")
    assert text.rc == r.rc and "Permission denied" not in text.out + text.err, text
    for name in ("python", "config", "registry", "state-dir", "root:ds", "schedule"):
        assert re.search(r"(?m)^(ok  |info|WARN|FAIL) %s\b" % re.escape(name), text.out), text
    before = tree_bytes(state)
    r = run("install-cron", "--method", "sbatch")
    assert r.rc == 1 and r.err.count("\n") == 1, r
    assert r.err.startswith("scratch-keepalive: error: `sbatch` is not installed here"), r
    assert "Permission denied" not in r.err, r
    r = run("install-cron")
    assert r.rc == 1 and "Permission denied" not in r.err and "Slurm is needed" in r.err, r
    # Nothing installed: no job script, no schedule record (the schedule lock may be made).
    assert not (state / "job.sh").exists() and not (state / "schedule.json").exists()
    assert without(tree_bytes(state), os.path.join("locks", ".schedule.lock")) == before
