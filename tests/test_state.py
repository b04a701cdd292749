"""State files: unreadable is not corrupt, every document is checked on read, repair never
loses a valid entry, newer formats are refused, killed writes leave no temp files behind.

The last part is the generator: every state document, derived into malformed variants
(each field deleted, null, of each wrong type, out of range; the file cut short, nested too
deeply, not UTF-8, empty, a directory), run through every command that reads state.
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from conftest import (KEEP, NOBODY, SCRIPT, assert_error, make_dataset, run_as_nobody, sk,
                      tree_bytes, write_private)

SENTINEL = ".scratch-keepalive"


def reg_doc(state):
    return json.loads((Path(state) / "registry.json").read_text())


def sentinel(root):
    return json.loads((Path(root) / SENTINEL).read_text())


@pytest.fixture
def no_slurm(tmp_path, monkeypatch):
    """Slurm out of PATH: doctor and repair do not wait on a controller."""
    empty = tmp_path / "nobin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.fixture
def shm(env, monkeypatch):
    """State and scratch on tmpfs (no fsync waits on a shared disk): the generator runs
    thousands of commands."""
    base = Path(tempfile.mkdtemp(prefix="sk-gen-", dir="/dev/shm" if os.path.isdir("/dev/shm")
                                 else None))
    (base / "scratch").mkdir()
    env.update(state=base / "state", scratch=base / "scratch")
    monkeypatch.setenv("SCRATCH_KEEPALIVE_HOME", str(base / "state"))
    yield env
    shutil.rmtree(str(base), ignore_errors=True)


@pytest.fixture
def shm_generic(shm, cli):
    assert cli("init", "--profile", "generic", "--scratch-root", shm["scratch"]).rc == 0
    return shm


@pytest.fixture
def two(cli, generic, no_slurm, monkeypatch):
    return make_two(cli, generic, monkeypatch)


@pytest.fixture
def shm_two(cli, shm_generic, no_slurm, monkeypatch):
    return make_two(cli, shm_generic, monkeypatch)


def make_two(cli, generic, monkeypatch):
    """Datasets `ds` (kept until KEEP, defaults) and `keep` (2031-01-01, every 7 days, with
    an approval), both refreshed once, with a registry backup equal to the registry."""
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(time.time()))
    scratch = generic["scratch"]
    ds = make_dataset(scratch, "ds")
    keep = make_dataset(scratch / "deep", "keep")
    assert cli("add", "--name", "ds", "--path", ds, "--keep-until", KEEP).rc == 0
    assert cli("add", "--name", "keep", "--path", keep, "--keep-until", "2031-01-01",
               "--cadence-days", "7", "--approval", "RT-1234").rc == 0
    assert cli("refresh", "--threads", "1").rc == 0
    for _ in range(2):      # the backup becomes equal to the registry
        assert cli("enable", "--name", "keep").rc == 0
    assert (generic["state"] / "registry.json.bak").read_bytes() == \
        (generic["state"] / "registry.json").read_bytes()
    return dict(generic, ds=ds, keep=keep)


# ------------------------------------------------------------------ 1. unreadable, not corrupt

@pytest.fixture
def shared_base():
    """A directory the user `nobody` can reach (pytest's own tmp dir is root's, 0700)."""
    if os.getuid() != 0:
        pytest.skip("needs root, to run the tool as another user")
    base = tempfile.mkdtemp(prefix="sk-state-", dir="/tmp")
    os.chmod(base, 0o755)
    try:
        yield Path(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_nobody(base, *argv):
    """The tool (base's copy of it) as the user `nobody`, in a real process, with its own
    state dir and the real clock."""
    run = run_as_nobody(base / "home", base / "state", now=sk.iso(time.time()))
    return run(*argv, script=base / "scratch_keepalive.py", cwd=str(base), timeout=120)


def test_registry_of_another_owner_is_named_and_never_rebuilt(shared_base):
    """After one `sudo scratch-keepalive extend` the registry is root's, 0600: every command
    says whose file it is and what to run; repair neither sets it aside nor rebuilds it."""
    base = shared_base
    shutil.copy(str(SCRIPT), str(base / "scratch_keepalive.py"))
    for d in ("home", "state", "scratch"):
        (base / d).mkdir()
        os.chown(str(base / d), NOBODY, NOBODY)
    ds = base / "scratch" / "ds"
    ds.mkdir()
    os.chown(str(ds), NOBODY, NOBODY)
    assert as_nobody(base, "init", "--profile", "generic", "--scratch-root",
                     base / "scratch").rc == 0
    r = as_nobody(base, "add", "--name", "ds", "--path", ds, "--keep-until", "2099-08-31",
                  "--cadence-days", "7", "--approval", "RT-1")
    assert r.rc == 0, r
    reg = base / "state" / "registry.json"
    os.chown(str(reg), 0, 0)          # what `sudo scratch-keepalive extend` leaves
    os.chmod(str(reg), 0o600)
    before = tree_bytes(base / "state", base / "scratch")
    for argv in (["list"], ["status", "--name", "ds"], ["refresh", "--name", "ds"],
                 ["extend", "--name", "ds", "--keep-until", "2099-09-30"]):
        r = as_nobody(base, *argv)
        assert r.rc == 1, (argv, r)
        assert_error(r, None, str(reg), "root (uid 0)", "sudo chown $USER %s" % reg)
    r = as_nobody(base, "doctor")
    assert r.rc == 1 and "sudo chown $USER" in r.out and str(reg) in r.out, r
    assert "python" in r.out and "state-dir" in r.out, r       # its other checks still print
    for argv in (["repair", "--dry-run"], ["repair"]):
        r = as_nobody(base, *argv)
        assert r.rc == 0, r
        assert "registry aside" not in r.out and "rebuild" not in r.out, r
        assert "sudo chown $USER %s" % reg in r.out, r
    assert tree_bytes(base / "state", base / "scratch") == before
    # After the fix it says, everything is as it was: nothing was lost.
    os.chown(str(reg), NOBODY, NOBODY)
    r = as_nobody(base, "list", "--json")
    assert r.rc == 0, r
    (e,) = r.json()
    assert (e["keep_until"], e["cadence_days"], e["approval"]) == ("2099-08-31", 7, "RT-1")


def test_unreadable_checkpoint_is_refused_not_replaced(shared_base):
    base = shared_base
    shutil.copy(str(SCRIPT), str(base / "scratch_keepalive.py"))
    for d in ("home", "state", "scratch", "scratch/ds", "scratch/ds/sub"):
        (base / d).mkdir()
        os.chown(str(base / d), NOBODY, NOBODY)
    assert as_nobody(base, "init", "--profile", "generic", "--scratch-root",
                     base / "scratch").rc == 0
    assert as_nobody(base, "add", "--name", "ds", "--path", base / "scratch" / "ds",
                     "--keep-until", "2099-08-31").rc == 0
    ck = base / "state" / "checkpoints" / "ds.json"
    write_private(ck, b'{"format": 1}')
    before = tree_bytes(base / "state")
    r = as_nobody(base, "refresh", "--name", "ds", "--threads", "1")
    assert r.rc == 1 and "sudo chown $USER %s" % ck in r.out + r.err, r
    r = as_nobody(base, "repair")
    assert r.rc == 0 and "checkpoint ds aside" not in r.out, r
    assert "sudo chown $USER %s" % ck in r.out, r
    after = tree_bytes(base / "state")
    after.pop(os.path.join("locks", "ds.lock"))    # the refresh's lock, released
    assert after == before


# ------------------------------------------------------------------ 2. the sentinel's settings

def test_sentinel_records_the_settings_and_extend_keeps_them_current(cli, two):
    s = sentinel(two["keep"])
    assert (s["keep_until"], s["cadence_days"], s["approval"]) == ("2031-01-01", 7, "RT-1234")
    assert cli("extend", "--name", "keep", "--keep-until", "2032-02-29",
               "--approval", "RT-99").rc == 0
    s = sentinel(two["keep"])
    assert (s["keep_until"], s["cadence_days"], s["approval"]) == ("2032-02-29", 7, "RT-99")
    assert cli("doctor").rc == 0


def test_rebuild_from_old_sentinels_falls_back_and_says_so(cli, two):
    """A sentinel written before it recorded the settings: the rebuild uses today's defaults
    and names each one it had to guess."""
    state = two["state"]
    for root in (two["ds"], two["keep"]):
        doc = sentinel(root)
        for k in ("keep_until", "cadence_days", "approval"):
            del doc[k]
        (Path(root) / SENTINEL).write_text(json.dumps(doc))
    write_private(state / "registry.json", b"{\"format\": 1, \"datas")
    os.unlink(str(state / "registry.json.bak"))
    r = cli("repair", "--json")
    assert r.rc == 0, r
    out = r.json()
    for name in ("ds", "keep"):
        said = [t for t in out["left"] if repr(name) in t]
        assert len(said) == 1, out
        for w in ("older sentinel", "keep-until", "cadence", "approval", "extend --name"):
            assert w in said[0], (w, said)
    got = dict((e["name"], e) for e in cli("list", "--json").json())
    assert got["keep"]["approval"] is None and got["keep"]["cadence_days"] == 14
    # repair also records the settings in the old sentinels, so the next rebuild keeps them
    assert sentinel(two["keep"])["cadence_days"] == 14
    assert cli("doctor").rc == 0


# ------------------------------------------------------------------ 3. checked on read

def test_bad_profile_names_the_field_and_its_hint_is_no_dead_end(cli, two):
    cfg = two["state"] / "config.json"
    doc = json.loads(cfg.read_text())
    doc["profile"] = "Generic"
    write_private(cfg, json.dumps(doc).encode())
    before = tree_bytes(two["state"], two["scratch"])
    for argv in (["list"], ["status"], ["refresh", "--due"], ["add", "--name", "x", "--path",
                                                               two["scratch"], "--keep-until",
                                                               KEEP]):
        r = cli(*argv)
        assert r.rc == 1, (argv, r)
        assert_error(r, None, str(cfg), "'profile'", "br200, generic", "repair")
    assert tree_bytes(two["state"], two["scratch"]) == before
    # Follow the hint: repair sets the config aside and says to init; init then works.
    r = cli("repair")
    assert r.rc == 0 and "init" in r.out, r
    r = cli("init", "--profile", "generic", "--scratch-root", two["scratch"])
    assert r.rc == 0, r
    assert [e["name"] for e in cli("list", "--json").json()] == ["ds", "keep"]
    assert cli("doctor").rc == 0


def test_checkpoint_with_null_entries_done(cli, two):
    assert cli("refresh", "--name", "ds", "--max-entries", "2", "--threads", "1").rc == 3
    ck = two["state"] / "checkpoints" / "ds.json"
    doc = json.loads(ck.read_text())
    doc["entries_done"] = None
    write_private(ck, json.dumps(doc).encode())
    r = cli("status", "--name", "ds", "--json")
    assert r.rc == 0 and r.json()["checkpoint"] is None, r
    r = cli("doctor")
    assert r.rc == 1 and "checkpoint:ds" in r.out and "'entries_done'" in r.out, r
    assert "root:ds" in r.out and "root:keep" in r.out, r     # the other checks still print
    assert cli("repair").rc == 0
    assert cli("doctor").rc == 0
    r = cli("refresh", "--name", "ds", "--json", "--threads", "1")
    assert r.rc == 0 and r.json()["results"][0]["resumed"] is False, r


def test_deeply_nested_registry(cli, two):
    reg = two["state"] / "registry.json"
    write_private(reg, b"[" * 100000)
    for argv in (["list"], ["status"], ["refresh"], ["remove", "--name", "ds"]):
        r = cli(*argv)
        assert r.rc == 1, r
        assert_error(r, None, str(reg), "nested too deeply", "repair")
    r = cli("doctor")
    assert r.rc == 1 and "nested too deeply" in r.out, r
    assert cli("repair").rc == 0
    assert [e["name"] for e in cli("list", "--json").json()] == ["ds", "keep"]


@pytest.mark.parametrize("now", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
                                 "9999-12-31", "9000-01-01T00:00:00Z", "1969-12-31T23:59:59Z"])
def test_policy_clock_out_of_range_is_a_usage_error(cli, two, monkeypatch, now):
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", now)
    before = tree_bytes(two["state"], two["scratch"])
    for argv in (["list"], ["status"], ["refresh", "--name", "ds"], ["doctor"],
                 ["extend", "--name", "ds", "--keep-until", KEEP]):
        r = cli(*argv)
        assert r.rc == 2, (argv, r)
        assert_error(r, None, "SCRATCH_KEEPALIVE_NOW", "1970 to 8999")
    assert tree_bytes(two["state"], two["scratch"]) == before


def test_invalid_entry_doctor_names_it_repair_keeps_the_valid_one(cli, two):
    """No backup: the valid entry stays exactly as it was, the invalid one is rebuilt from its
    sentinel with its settings."""
    state = two["state"]
    doc = reg_doc(state)
    keep_before = doc["datasets"]["keep"]
    doc["datasets"]["ds"]["cadence_days"] = "fourteen"
    doc["datasets"]["ds"]["enabled"] = None
    write_private(state / "registry.json", json.dumps(doc).encode())
    os.unlink(str(state / "registry.json.bak"))
    r = cli("list")
    assert r.rc == 1, r
    assert_error(r, None, str(state / "registry.json"), "dataset 'ds'", "'cadence_days'",
              "a whole number", "repair")
    r = cli("doctor", "--json")
    checks = dict((c["name"], c) for c in r.json()["checks"])
    assert r.rc == 1 and not checks["entry:ds"]["ok"], checks
    assert checks["root:keep"]["ok"] and "entry:keep" not in checks, checks
    r = cli("repair", "--json")
    assert r.rc == 0, r
    assert any("rebuild the invalid dataset 'ds' from its sentinel" in a
               for a in r.json()["actions"]), r
    after = reg_doc(state)["datasets"]
    assert after["keep"] == keep_before
    assert (after["ds"]["keep_until"], after["ds"]["cadence_days"]) == (KEEP, 14)
    aside = [f for f in os.listdir(str(state)) if f.startswith("registry.json.corrupt-")]
    assert len(aside) == 1 and json.loads((state / aside[0]).read_text()) == doc
    assert cli("doctor").rc == 0


def test_invalid_entry_restored_from_the_backup(cli, two):
    state = two["state"]
    doc = reg_doc(state)
    good = json.loads(json.dumps(doc))
    doc["datasets"]["ds"]["last_run"]["entries_seen"] = -5
    write_private(state / "registry.json", json.dumps(doc).encode())
    r = cli("repair", "--json")
    assert any("restore dataset 'ds' from the backup" in a for a in r.json()["actions"]), r
    assert reg_doc(state)["datasets"] == good["datasets"]
    assert cli("doctor").rc == 0


def test_unknown_keys_are_ignored_and_kept_by_every_rewrite(cli, two):
    state = two["state"]
    doc = reg_doc(state)
    doc["datasets"]["ds"]["last_touch_start"] = None
    doc["datasets"]["ds"]["last_check_start"] = "2026-01-01T00:00:00Z"
    doc["datasets"]["ds"]["some_later_field"] = {"any": ["thing"]}
    doc["something_new"] = 1
    write_private(state / "registry.json", json.dumps(doc).encode())
    for argv in (["list"], ["status"], ["doctor"]):
        assert cli(*argv).rc == 0, argv
    # A later version's fields survive this version's rewrites of the registry, field for
    # field, wherever they are: a refresh of that dataset, and changes to it and to another.
    for argv in (["refresh", "--name", "ds", "--threads", "1"], ["disable", "--name", "ds"],
                 ["enable", "--name", "ds"], ["extend", "--name", "keep", "--keep-until",
                                                  "2031-02-01"],
                 ["add", "--name", "third", "--path", make_dataset(two["scratch"], "third"),
                  "--keep-until", KEEP]):
        before = os.stat(str(state / "registry.json")).st_ino
        r = cli(*argv)
        assert r.rc == 0, (argv, r)
        assert os.stat(str(state / "registry.json")).st_ino != before, argv    # rewritten
        now = reg_doc(state)
        assert now["something_new"] == 1, (argv, now)
        assert now["datasets"]["ds"]["some_later_field"] == {"any": ["thing"]}, (argv, now)


# ------------------------------------------------------------------ 4. newer formats

def test_newer_checkpoint_is_refused_never_deleted(cli, two):
    ck = two["state"] / "checkpoints" / "ds.json"
    data = json.dumps({"format": sk.FORMAT + 1, "what": "a later version's"}).encode()
    write_private(ck, data)
    for argv in (["refresh", "--name", "ds", "--threads", "1"], ["refresh", "--threads", "1"],
                 ["refresh", "--due", "--threads", "1"], ["status", "--name", "ds"],
                 ["remove", "--name", "ds"], ["doctor"], ["repair"]):
        r = cli(*argv)
        assert "newer scratch-keepalive" in r.out + r.err, (argv, r)
        assert "internal error" not in r.err, r
        assert ck.read_bytes() == data, argv
    assert "ds" in [e["name"] for e in cli("list", "--json").json()]


@pytest.mark.parametrize("doc", ["config.json", "registry.json", "schedule.json"])
def test_newer_documents_are_refused_never_overwritten(cli, two, doc):
    path = two["state"] / doc
    data = json.dumps({"format": sk.FORMAT + 1}).encode()
    write_private(path, data)
    for argv in (["list"], ["status"], ["install-cron", "--dry-run"], ["uninstall-cron"],
                 ["repair"], ["extend", "--name", "ds", "--keep-until", KEEP]):
        r = cli(*argv)
        assert path.read_bytes() == data, argv
        assert "internal error" not in r.err, r
    assert "newer" in cli("doctor").out


# ------------------------------------------------------------------ 5. temp files

KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, sys.argv[1])
    import scratch_keepalive as sk
    def stop(*a, **kw):
        if sys.argv[3] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        print("ready", flush=True)
        time.sleep(600)
    sk.os.replace = stop
    sk.atomic_write(sys.argv[2], b'{"format": 1, "datasets": {}}')
""")


def test_temp_files_of_killed_writes_are_cleaned_but_not_a_live_ones(cli, two):
    state = two["state"]
    reg = state / "registry.json"
    dead = []
    for _ in range(3):       # three writes killed with SIGKILL between write and rename
        p = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(SCRIPT.parent), str(reg),
                            "kill"])
        assert p.returncode == -signal.SIGKILL
    live = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(SCRIPT.parent), str(reg),
                             "live"], stdout=subprocess.PIPE)
    try:
        assert live.stdout.readline() == b"ready\n"
        temps = sorted(f for f in os.listdir(str(state)) if f.endswith(".tmp"))
        assert len(temps) == 4, temps
        old = time.time() - 120
        for f in temps:                          # all of them a few minutes old
            os.utime(str(state / f), (old, old))
        dead = [f for f in temps if ".%d." % live.pid not in f]
        assert len(dead) == 3
        r = cli("doctor")
        assert "temp-files" in r.out and "repair removes them" in r.out, r
        r = cli("repair", "--dry-run", "--json")
        assert sorted(os.path.basename(a.split()[4]) for a in r.json()["actions"]
                      if a.startswith("remove ")) == dead, r
        # A later successful write of the same file removes them too, never the live one.
        assert cli("enable", "--name", "ds").rc == 0
        assert sorted(f for f in os.listdir(str(state)) if f.endswith(".tmp")) == \
            sorted(set(temps) - set(dead))
        # A fresh temp file of a writer that is gone is still left for a minute.
        subprocess.run([sys.executable, "-c", KILLED_WRITER, str(SCRIPT.parent),
                        str(state / "schedule.json"), "kill"])
        r = cli("repair", "--json")
        assert not [a for a in r.json()["actions"] if a.startswith("remove ")], r
        assert len([f for f in os.listdir(str(state)) if f.endswith(".tmp")]) == 2
    finally:
        live.kill()
        live.wait()
    for f in os.listdir(str(state)):
        if f.endswith(".tmp"):
            os.utime(str(state / f), (old, old))
    r = cli("repair", "--json")
    assert len([a for a in r.json()["actions"] if a.startswith("remove ")]) == 2, r
    assert not [f for f in os.listdir(str(state)) if f.endswith(".tmp")]
    assert cli("doctor").rc == 0


# ------------------------------------------------------------------ 6. the generator
#
# Each state document of a small real setup is derived into malformed variants: every field
# (nested ones too) deleted, null, of a wrong type, out of range; and the whole file cut
# short, empty, nested too deeply, not UTF-8, not an object, of a newer format, a directory.
# Each variant runs in-process, from a fresh copy, through commands that read state: a
# damaged file through all of them, a damaged field through a slice of four (consecutive
# fields take consecutive slices, so every command meets every document's damage), then
# repair and doctor.

COMMANDS = [["list"], ["status"], ["status", "--name", "ds"], ["refresh"], ["refresh", "--due"],
            ["extend", "--name", "ds", "--keep-until", KEEP], ["enable", "--name", "ds"],
            ["disable", "--name", "ds"], ["remove", "--name", "ds"],
            ["add", "--name", "new", "--path", "{scratch}/new", "--keep-until", KEEP],
            ["install-cron", "--dry-run"], ["uninstall-cron"], ["doctor"], ["repair"],
            ["repair", "--dry-run"]]
DELETE = object()


def wrong_values(value):
    """Values of other types than value, and out-of-range ones of its own."""
    out = [DELETE, None]
    if isinstance(value, bool):
        out += [1]
    elif isinstance(value, int):
        out += [-1, "7"]
    elif isinstance(value, str):
        out += [7, "2030-02-30" if value[:2] in ("19", "20") else ""]
    elif isinstance(value, list):
        out += [[None]]
    elif isinstance(value, dict):
        out += [[value]]
    else:
        out += [{}]
    return out


def field_variants(root, path=()):
    """(label, document) for each field of root (recursively) set to each wrong value."""
    doc = root
    for p in path:
        doc = doc[p]
    for key in sorted(doc):
        if (path == () and key == "format") or path + (key,) == ("datasets", "keep"):
            continue    # the format has its own variants below; `keep` is the valid entry
        for bad in wrong_values(doc[key]):
            new = json.loads(json.dumps(root))
            target = new
            for p in path:
                target = target[p]
            if bad is DELETE:
                del target[key]
            else:
                target[key] = bad
            yield ("%s=%s" % (".".join(path + (key,)), "deleted" if bad is DELETE
                              else json.dumps(bad)), json.dumps(new).encode())
        counts = isinstance(doc[key], dict) and all(type(v) is int for v in doc[key].values())
        if isinstance(doc[key], dict) and len(path) < 3 and not counts:
            for v in field_variants(root, path + (key,)):
                yield v


def file_variants(data):
    doc = json.loads(data.decode())
    newer = dict(doc, format=sk.FORMAT + 1)
    return [("truncated", data[:len(data) // 2]), ("empty", b""),
            ("deep nesting", b"[" * 100000), ("not UTF-8", b"\xff\xfe" + data[2:]),
            ("a list", b"[]"), ("null", b"null"), ("a string", b'"x"'),
            ("no format", json.dumps(dict((k, v) for k, v in doc.items() if k != "format"))
             .encode()), ("format '1'", json.dumps(dict(doc, format="1")).encode()),
            ("format 0", json.dumps(dict(doc, format=0)).encode()),
            ("newer", json.dumps(newer).encode()), ("directory", None)]


@pytest.fixture
def template(cli, shm_two, tmp_path):
    """The setup of `two` plus a checkpoint, a schedule record and a dead holder's lock
    record: every kind of state document, each valid. Returns (setup, saved copies)."""
    two = shm_two
    state, scratch = two["state"], two["scratch"]
    assert cli("refresh", "--name", "ds", "--max-entries", "2", "--threads", "1").rc == 3
    for _ in range(2):      # the backup becomes equal to the registry again
        assert cli("enable", "--name", "keep").rc == 0
    (scratch / "new").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    write_private(state / "locks" / "ds.lock", json.dumps(
        {"pid": dead.pid, "host": sk.socket.gethostname(), "since": sk.iso(time.time())})
        .encode())
    now = sk.iso(time.time())
    write_private(state / "schedule.json", sk.dump_json({
        "format": 1, "method": "sbatch", "cadence_days": 7, "account": None,
        "partition": "general", "cpus": 1, "mem": "2G", "time": "2:00:00",
        "python": sys.executable, "script": str(SCRIPT), "job_script": str(state / "job.sh"),
        "installed": now, "job_id": "17", "state_dir": str(state), "scratch_root": str(scratch),
        "last_run": {"job_id": "17", "finished": now, "exit_code": 0, "continuation": None,
                     "datasets": ["ds", "keep"]}}))
    saved = two["state"].parent / "saved"
    shutil.copytree(str(state), str(saved / "state"), symlinks=True)
    shutil.copytree(str(scratch), str(saved / "scratch"), symlinks=True)
    assert cli("doctor").rc == 1        # only the dead holder's lock: repair removes it
    return two, saved


def restore(setup, saved):
    for name in ("state", "scratch"):
        shutil.rmtree(str(setup[name]))
        shutil.copytree(str(saved / name), str(setup[name]), symlinks=True)


def plant(path, data):
    if data is None:
        if os.path.lexists(str(path)):
            os.unlink(str(path))
        os.mkdir(str(path), 0o700)
    else:
        write_private(path, data)


@contextlib.contextmanager
def one_cpu():
    """Walks on one CPU run in this process (no worker processes): the generator stays fast."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(old)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


DOCUMENTS = {"config": "config.json", "registry": "registry.json",
             "checkpoint": "checkpoints/ds.json", "schedule": "schedule.json",
             "lock": "locks/ds.lock"}
# What doctor may still name after repair: what only the user can mend.
LEFT_FOR_USER = {"config": {"config"}, "registry": set(), "checkpoint": set(),
                 "schedule": set(), "lock": set()}
NEWER = {"config": {"config"}, "registry": {"registry"}, "checkpoint": {"checkpoint:ds"},
         "schedule": {"schedule"}, "lock": set()}


def run_variant(cli, setup, saved, doc, label, data, argv):
    path = setup["state"] / DOCUMENTS[doc]
    restore(setup, saved)
    plant(path, data)
    argv = [a.format(scratch=setup["scratch"]) for a in argv]
    r = cli(*argv)
    what = (doc, label, argv, r)
    assert r.rc in (0, 1, 2, 3, 4), what
    assert "internal error" not in r.err + r.out and "Traceback" not in r.err, what
    errors = [line for line in r.err.splitlines() if "error:" in line]
    assert len(errors) <= 1, what
    if errors:
        assert errors[0].startswith("scratch-keepalive: error: "), what
        assert str(path) in errors[0], what
    if label == "newer":
        assert path.read_bytes() == data, ("newer file changed", what)
    return r


def after_repair(cli, setup, saved, doc, label, data):
    """repair leaves the valid entries as they were and doctor names only what is the user's."""
    path = setup["state"] / DOCUMENTS[doc]
    restore(setup, saved)
    plant(path, data)
    r = cli("repair")
    assert r.rc == 0, (doc, label, r)
    if not (doc == "registry" and label == "newer"):
        good = json.loads((saved / "state" / "registry.json").read_text())["datasets"]
        if doc == "registry" and "registry" not in r.out:
            good = json.loads(data.decode())["datasets"]    # valid as it is: left alone
        assert reg_doc(setup["state"])["datasets"] == good, (doc, label, r)
    r = cli("doctor", "--json")
    failed = set(c["name"] for c in r.json()["checks"] if not c["ok"])
    allowed = NEWER[doc] if label == "newer" else LEFT_FOR_USER[doc]
    assert failed <= allowed, (doc, label, r.out)


def variants(saved, doc):
    data = (saved / "state" / DOCUMENTS[doc]).read_bytes()
    out = list(field_variants(json.loads(data.decode())))
    if doc != "lock":
        out += file_variants(data)
    else:       # a lock record has no format: only damage; its file stays a file (flock)
        out += [v for v in file_variants(data) if v[0] in ("truncated", "empty", "deep nesting",
                                                            "not UTF-8", "a list", "null")]
    return out


@pytest.mark.parametrize("doc", sorted(DOCUMENTS))
def test_generated_malformed_state(cli, template, doc, monkeypatch):
    setup, saved = template
    cases = variants(saved, doc)
    assert len(cases) >= 15, cases
    monkeypatch.setenv("LANGUAGE", "C")     # argparse's gettext then looks up no catalogue
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("LINES", "24")
    fields = len(cases) - len(file_variants(b"{}")) if doc != "lock" else len(cases) - 6
    with one_cpu():
        for i, (label, data) in enumerate(cases):
            argvs = COMMANDS if i >= fields else \
                [COMMANDS[(4 * i + j) % len(COMMANDS)] for j in range(4)]
            for argv in argvs:
                run_variant(cli, setup, saved, doc, label, data, argv)
            after_repair(cli, setup, saved, doc, label, data)
