"""Hostile state: no file in the state directory can hang the tool, be written through, or
pass for another.

The generator puts each special kind (a FIFO, a symlink to a state file, a symlink out of the
state directory, a directory, a symlink to /dev/zero, another dataset's file of the same kind,
another user's file) at each path the state directory holds, runs the commands that read that
path as subprocesses under a timeout, on the oldest and the newest CPython, and checks: no
hang, no traceback, no internal error, a documented exit code, nothing written outside the
state directory and the destination, and `repair` afterwards leaves a regular file (or
nothing) at the path and keeps what it set aside. The focused tests below it each cover one
part of the hardening.
"""
import collections
import concurrent.futures
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (KEEP, NOW, SCRIPT, make_dataset, pyenv_pythons, run_script, set_atime, sk,
                      tool_argv)

NOBODY = 65534
TIMEOUT = 6             # seconds any one command may take ("a few seconds")
DOCUMENTED = {0, 1, 2, 3, 4, 130, 141}
KINDS = ("fifo", "link-in", "link-out", "dir", "dev-zero", "other-dataset", "foreign")

# Each state path the state directory holds (relative to it), what stands in for "another
# dataset's file of the same kind" there, and the commands that read it (repair runs last).
STATUS_BRIEF = ("status", "--brief")
REFRESH = ("refresh", "--name", "ds")
RESCUE = ("rescue", "--name", "ds", "--to", "{dest}", "--all")
EXTEND = ("extend", "--name", "ds", "--keep-until", KEEP)
STATE_PATHS = {
    "registry.json": ("other-registry", [STATUS_BRIEF, ("list",), REFRESH, ("doctor",)]),
    "registry.json.bak": ("other-registry", [STATUS_BRIEF, EXTEND, ("doctor",)]),
    "config.json": ("other-config", [STATUS_BRIEF, ("status",), REFRESH, ("doctor",)]),
    "schedule.json": ("other-schedule", [STATUS_BRIEF, ("status",), ("doctor",)]),
    "checkpoints/ds.json": ("checkpoints/other.json", [STATUS_BRIEF, REFRESH, ("doctor",)]),
    "checkpoints/rescue/ds.json": ("checkpoints/rescue/other.json",
                                   [STATUS_BRIEF, RESCUE, ("doctor",)]),
    "locks/ds.lock": ("locks/other.lock", [REFRESH, RESCUE, ("doctor",)]),
    "locks/.registry.lock": ("locks/other.lock", [EXTEND, REFRESH]),
    "manifests/ds/manifest-000002.skm": ("manifests/other/manifest-000002.skm",
                                         [STATUS_BRIEF, ("files", "--name", "ds"), REFRESH,
                                          RESCUE, ("doctor",)]),
    "manifests/ds/partial.skm": ("manifests/other/partial.skm",
                                 [REFRESH, ("status",), ("doctor",)]),
    "manifests/ds/purge-000002.skm": ("manifests/other/purge-000002.skm",
                                      [("files", "--name", "ds", "--vanished"), REFRESH,
                                       ("doctor",)]),
}
REPAIR = ("repair",)


def interpreters():
    """The oldest and the newest CPython under pyenv (this one where there is no pyenv)."""
    found = pyenv_pythons()
    if not found:
        return [("current", sys.executable)]
    return [found[0]] if len(found) == 1 else [found[0], found[-1]]


def base_env(state, scratch, empty_bin):
    # No Slurm command is found (PATH holds nothing): a schedule record makes status and
    # doctor ask squeue, which must fail quietly here, not reach a real cluster.
    return {"SCRATCH_KEEPALIVE_HOME": str(state), "SCRATCH_KEEPALIVE_NOW": NOW, "TZ": "UTC",
            "HOME": str(state.parent), "PATH": str(empty_bin), "LC_ALL": "C.UTF-8"}


def run(python, argv, env):
    """(exit code or "timeout", stdout, stderr, seconds) of the tool run by python (from its
    bytecode: tool_argv)."""
    t0 = time.monotonic()
    try:
        p = subprocess.run(tool_argv(python) + list(argv), stdout=subprocess.PIPE,
                           cwd=str(SCRIPT.parent), stderr=subprocess.PIPE, env=env,
                           timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "timeout", b"", b"", time.monotonic() - t0
    return p.returncode, p.stdout, p.stderr, time.monotonic() - t0


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One state directory holding every state path: two datasets (ds, other) with two
    complete manifests each, a walk stopped midway (checkpoint and partial.skm), a rescue
    stopped midway (rescue checkpoint), their locks and a schedule record."""
    top = tmp_path_factory.mktemp("hostile")
    scratch = top / "scratch"
    scratch.mkdir()
    for name in ("ds", "other"):
        make_dataset(scratch, name, files=6)
    empty_bin = top / "bin"
    empty_bin.mkdir()
    state = top / "template" / "state"
    state.parent.mkdir()
    env = base_env(state, scratch, empty_bin)

    def ok(*argv, codes=(0,)):
        rc, out, err, _ = run(sys.executable, [str(a) for a in argv], env)
        assert rc in codes, (argv, rc, out, err)

    ok("init", "--profile", "generic", "--scratch-root", scratch)
    for name in ("ds", "other"):
        ok("add", "--name", name, "--path", scratch / name, "--keep-until", KEEP)
        ok("refresh", "--name", name, "--check")   # saw f5 years old, and left it so
        os.unlink(str(scratch / name / "f5"))      # a purge on record: purge-000002.skm
        ok("refresh", "--name", name)
        ok("rescue", "--name", name, "--to", top / "template" / "dest", "--all",
           "--max-entries", "3", codes=(3,))
        ok("refresh", "--name", name, "--max-entries", "3", codes=(3,))
    sched = {"format": 1, "method": "sbatch", "cadence_days": 14, "account": "lab",
             "partition": "general", "python": sys.executable, "script": str(SCRIPT),
             "job_script": str(state / "job.sh"), "installed": NOW, "job_id": "1"}
    (state / "schedule.json").write_text(json.dumps(sched))
    os.chmod(str(state / "schedule.json"), 0o600)
    for rel in STATE_PATHS:
        assert stat.S_ISREG(os.lstat(str(state / rel)).st_mode), rel
    # "Another dataset's" singletons: a registry of the other dataset alone, a config with
    # another scratch root, another schedule.
    reg = json.loads((state / "registry.json").read_text())
    del reg["datasets"]["ds"]
    others = top / "others"
    others.mkdir()
    (others / "other-registry").write_text(json.dumps(reg))
    cfg = json.loads((state / "config.json").read_text())
    cfg["scratch_root"] = str(top / "elsewhere")
    (others / "other-config").write_text(json.dumps(cfg))
    (others / "other-schedule").write_text(json.dumps(dict(sched, method="scrontab",
                                                           cadence_days=7)))
    return {"top": top, "state": state, "scratch": scratch, "bin": empty_bin,
            "others": others, "tdest": top / "template" / "dest"}


def place(state, rel, kind, tpl, outside):
    """Put a thing of this kind at state/rel; returns what to check afterwards."""
    path = state / rel
    original = path.read_bytes()
    os.unlink(str(path))
    inside_target = state / ("registry.json" if rel == "config.json" else "config.json")
    if kind == "fifo":
        os.mkfifo(str(path), 0o600)
    elif kind == "link-in":
        os.symlink(str(inside_target), str(path))
    elif kind == "link-out":
        os.symlink(str(outside), str(path))
    elif kind == "dir":
        path.mkdir(mode=0o700)
        (path / "keep").write_bytes(b"keep")
    elif kind == "dev-zero":
        os.symlink("/dev/zero", str(path))
    elif kind == "other-dataset":
        source, _ = STATE_PATHS[rel]
        src = tpl["others"] / source if source.startswith("other-") else state / source
        path.write_bytes(src.read_bytes())
        os.chmod(str(path), 0o600)
    elif kind == "foreign":
        path.write_bytes(original)
        os.chmod(str(path), 0o600)
        os.chown(str(path), NOBODY, NOBODY)
    return inside_target


def fingerprint(path):
    st = os.lstat(str(path))
    return Path(path).read_bytes(), st.st_mtime_ns, st.st_size


def one_case(python, tpl, runs, rel, kind):
    """Set up one (path, kind), run its commands and repair; [(command, outcome, seconds)]
    and the problems found."""
    case = runs / ("%s--%s" % (rel.replace("/", "_"), kind))
    state = case / "state"
    shutil.copytree(str(tpl["state"]), str(state), symlinks=True)
    dest = case / "dest"
    for name in ("ds", "other"):    # the rescue checkpoints name this case's destination
        p = state / "checkpoints" / "rescue" / (name + ".json")
        doc = json.loads(p.read_text())
        doc["to"] = str(dest)
        p.write_text(json.dumps(doc))
    if (tpl["tdest"]).exists():
        shutil.copytree(str(tpl["tdest"]), str(dest), symlinks=True)
    outside = case / "outside.txt"
    outside.write_bytes(b"not the tool's\n")
    os.chmod(str(outside), 0o600)
    before = fingerprint(outside)
    inside_target = place(state, rel, kind, tpl, outside)
    inside_before = fingerprint(inside_target)
    env = base_env(state, tpl["scratch"], tpl["bin"])
    results, problems = [], []
    path = state / rel
    odd_before_repair = None
    for cmd in STATE_PATHS[rel][1] + [REPAIR]:
        if cmd == REPAIR and os.path.lexists(str(path)):
            st = os.lstat(str(path))
            if not stat.S_ISREG(st.st_mode):
                odd_before_repair = (stat.S_IFMT(st.st_mode), os.path.islink(str(path))
                                     and os.readlink(str(path)))
        argv = [a.format(dest=dest) for a in cmd]
        rc, out, err, took = run(python, argv, env)
        results.append((" ".join(cmd[:2] if cmd[:2] == STATUS_BRIEF else cmd[:1]), rc, took))
        text = err.decode("utf-8", "replace")
        where = "%s at %s: %s" % (kind, rel, " ".join(argv))
        if rc == "timeout":
            problems.append("%s: no end within %d s" % (where, TIMEOUT))
            continue
        if rc not in DOCUMENTED:
            problems.append("%s: exit %s: %s" % (where, rc, text[-300:]))
        for bad in ("Traceback", "internal error", "Exception ignored"):
            if bad in text:
                problems.append("%s: %r in stderr: %s" % (where, bad, text[-500:]))
        errors = [l for l in text.splitlines() if l.startswith("scratch-keepalive: error:")]
        if len(errors) > 1:
            problems.append("%s: %d error lines" % (where, len(errors)))
        if fingerprint(outside) != before:
            problems.append("%s: wrote the file outside the state directory" % where)
    if os.path.lexists(str(inside_target)) and fingerprint(inside_target) != inside_before \
            and inside_target.name == "config.json":
        problems.append("%s at %s: the config a link pointed at changed" % (kind, rel))
    if os.path.lexists(str(path)) and not stat.S_ISREG(os.lstat(str(path)).st_mode):
        problems.append("%s at %s: still not a regular file after repair" % (kind, rel))
    if odd_before_repair is not None:   # what repair set aside is there, as it was
        kept = [p for p in path.parent.iterdir() if p.name.startswith(path.name + ".corrupt-")
                and (stat.S_IFMT(os.lstat(str(p)).st_mode), os.path.islink(str(p))
                     and os.readlink(str(p))) == odd_before_repair]
        if not kept:
            problems.append("%s at %s: repair did not keep what it set aside" % (kind, rel))
    if kind == "dir":           # set aside, never deleted: the directory and its file
        kept = [p for p in path.parent.iterdir()
                if p.name.startswith(path.name + ".corrupt-") and (p / "keep").exists()]
        if not kept:
            problems.append("dir at %s: what repair set aside is gone" % rel)
    return results, problems


@pytest.mark.parametrize("version,python", interpreters(),
                         ids=[v for v, _ in interpreters()])
def test_every_kind_at_every_state_path(template, tmp_path, version, python):
    runs = tmp_path / "runs"
    runs.mkdir()
    cases = [(rel, kind) for rel in STATE_PATHS for kind in KINDS]
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        done = list(pool.map(lambda rk: one_case(python, template, runs, *rk), cases))
    seconds = time.monotonic() - t0
    outcomes = collections.Counter()
    by_kind, by_path = collections.Counter(), collections.Counter()
    slowest = (0.0, None)
    problems = []
    for (rel, kind), (results, found) in zip(cases, done):
        problems += found
        for cmd, rc, took in results:
            outcomes[(cmd, rc)] += 1
            by_kind[(kind, rc)] += 1
            by_path[(rel, rc)] += 1
            slowest = max(slowest, (took, "%s %s at %s" % (cmd, kind, rel)))
    total = sum(outcomes.values())
    lines = ["Python %s: %d paths x %d kinds = %d cases, %d command runs in %.1f s; slowest "
             "run %.2f s (%s)" % (version, len(STATE_PATHS), len(KINDS), len(cases), total,
                                  seconds, slowest[0], slowest[1])]
    for table in (outcomes, by_kind, by_path):
        for key in sorted(set(k for k, _ in table)):
            lines.append("  %-34s %s" % (key, ", ".join(
                "exit %s: %d" % (rc, n) for (k, rc), n in sorted(table.items(), key=str)
                if k == key)))
    print("\n".join(lines))
    assert not problems, "\n".join(problems[:40])


# ------------------------------------------------------------------ 1. one way to open


@pytest.fixture
def walked(cli, generic):
    """A dataset with two complete walks (two manifests)."""
    env = generic
    make_dataset(env["scratch"], "ds")
    assert cli("add", "--name", "ds", "--path", env["scratch"] / "ds",
               "--keep-until", KEEP).rc == 0
    for _ in range(2):
        assert cli("refresh", "--name", "ds").rc == 0
    return env


@pytest.mark.parametrize("rel", ["registry.json", "config.json",
                                 "manifests/ds/manifest-000002.skm"])
def test_a_fifo_or_dev_zero_never_hangs_status_brief(walked, rel):
    path = walked["state"] / rel
    for kind in ("fifo", "dev-zero"):
        if os.path.lexists(str(path)):
            os.unlink(str(path))
        if kind == "fifo":
            os.mkfifo(str(path), 0o600)
        else:
            os.symlink("/dev/zero", str(path))
        r = run_script("status", "--brief", timeout=TIMEOUT)
        assert r.rc in (0, 1), r
        assert "Traceback" not in r.err and "internal error" not in r.err, r
        if rel != "manifests/ds/manifest-000002.skm":
            assert r.rc == 1 and "repair" in r.err and r.err.count("\n") == 1, r


def test_a_lock_file_fifo_does_not_block_and_repair_sets_it_aside(walked):
    lock = walked["state"] / "locks" / "ds.lock"
    os.unlink(str(lock))
    os.mkfifo(str(lock), 0o600)
    r = run_script("refresh", "--name", "ds", timeout=TIMEOUT)
    said = r.out + r.err
    assert r.rc == 1 and "is a FIFO, not a regular file" in said and "repair" in said, r
    r = run_script("repair", timeout=TIMEOUT)
    assert r.rc == 0, r
    aside = [p for p in lock.parent.iterdir() if p.name.startswith("ds.lock.corrupt-")]
    assert len(aside) == 1 and stat.S_ISFIFO(os.lstat(str(aside[0])).st_mode)
    assert run_script("refresh", "--name", "ds", timeout=TIMEOUT).rc == 0


def test_partial_manifest_symlink_out_is_never_written_through(walked, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious\n")
    partial = walked["state"] / "manifests" / "ds" / "partial.skm"
    os.symlink(str(outside), str(partial))
    r = run_script("refresh", "--name", "ds", timeout=TIMEOUT)
    assert r.rc == 0, r
    assert outside.read_bytes() == b"precious\n"
    d = walked["state"] / "manifests" / "ds"
    for p in d.iterdir():
        if p.name.startswith("manifest-"):
            assert stat.S_ISREG(os.lstat(str(p)).st_mode), p
    aside = [p for p in d.iterdir() if p.name.startswith("partial.skm.corrupt-")]
    assert len(aside) == 1 and os.path.islink(str(aside[0]))


def test_partial_manifest_directory_is_set_aside(walked):
    partial = walked["state"] / "manifests" / "ds" / "partial.skm"
    partial.mkdir()
    (partial / "keep").write_bytes(b"keep")
    assert run_script("repair", timeout=TIMEOUT).rc == 0
    assert not os.path.lexists(str(partial))
    kept = [p for p in partial.parent.iterdir() if p.name.startswith("partial.skm.corrupt-")]
    assert len(kept) == 1 and (kept[0] / "keep").read_bytes() == b"keep"
    assert run_script("refresh", "--name", "ds", timeout=TIMEOUT).rc == 0


def test_repair_restores_a_deleted_or_emptied_registry_from_its_backup(cli, walked):
    state = walked["state"]
    for damage in ("delete", "no datasets", "zero bytes"):
        reg = state / "registry.json"
        if damage == "delete":
            os.unlink(str(reg))
        elif damage == "no datasets":
            reg.write_text(json.dumps({"format": 1, "datasets": {}}))
        else:
            reg.write_bytes(b"")
        r = cli("doctor")
        assert r.rc == 1 and "repair" in r.out, r
        r = cli("repair")
        assert r.rc == 0, r
        assert "restore" in r.out, r
        assert "ds" in json.loads(reg.read_text())["datasets"]


def test_repair_never_brings_back_a_removed_dataset(cli, walked):
    make_dataset(walked["scratch"], "two")
    assert cli("add", "--name", "two", "--path", walked["scratch"] / "two",
               "--keep-until", KEEP).rc == 0
    assert cli("remove", "--name", "two").rc == 0
    assert cli("remove", "--name", "ds").rc == 0        # the registry lists none now
    assert "ds" in (walked["state"] / "registry.json.bak").read_text()
    r = cli("repair")
    assert r.rc == 0 and "restore" not in r.out, r
    assert json.loads((walked["state"] / "registry.json").read_text())["datasets"] == {}


def test_atomic_write_replaces_a_link_and_writes_nothing_through_it(tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    d = tmp_path / "state"
    d.mkdir()
    os.symlink(str(outside), str(d / "doc.json"))
    sk.atomic_write(str(d / "doc.json"), b"new")
    assert outside.read_bytes() == b"precious"
    assert not os.path.islink(str(d / "doc.json")) and (d / "doc.json").read_bytes() == b"new"


def test_atomic_write_creates_its_temp_exclusively_in_the_held_directory(tmp_path,
                                                                         monkeypatch):
    opened = []
    real_open = os.open

    def spy(path, flags, mode=0o777, **kw):
        opened.append((path, flags, kw.get("dir_fd")))
        return real_open(path, flags, mode, **kw)
    monkeypatch.setattr(sk.os, "open", spy)
    sk.atomic_write(str(tmp_path / "doc.json"), b"{}")
    temps = [(p, f, d) for p, f, d in opened if str(p).endswith(".tmp")]
    assert len(temps) == 1, opened
    name, flags, dir_fd = temps[0]
    assert "/" not in name and dir_fd is not None
    want = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    assert flags & want == want


def test_state_file_limits_pass_a_ten_million_entry_dataset(cli, generic):
    """The size limits leave a wide margin over what 10 million entries take."""
    env = generic
    d = env["scratch"] / "big"
    d.mkdir()
    n = 3000
    rng = random.Random(21)
    for i in range(n):      # names, sizes and atimes that vary as real ones do
        sub = d / ("run-%02d" % (i % 30))
        sub.mkdir(exist_ok=True)
        f = sub / ("%x_%s.dat" % (rng.getrandbits(40), i))
        f.write_bytes(b"x" * rng.randrange(0, 5000))
        set_atime(f, 1.6e9 + rng.randrange(0, 10 ** 8))
    n += 30
    assert cli("add", "--name", "big", "--path", d, "--keep-until", KEEP).rc == 0
    assert cli("refresh", "--name", "big").rc == 0
    size = (env["state"] / "manifests" / "big" / "manifest-000001.skm").stat().st_size
    per_entry = size / float(n + 1)
    assert per_entry < 40, per_entry
    print("manifest: %.1f bytes an entry" % per_entry)
    assert sk.STATE_LIMITS["manifest"] >= 10 * 10 ** 7 * per_entry    # a 10-fold margin
    assert sk.STATE_LIMITS["checkpoint"] >= 16 * 2 ** 20


def test_a_state_file_larger_than_its_kind_is_refused_unread(cli, walked):
    reg = walked["state"] / "registry.json"
    os.truncate(str(reg), sk.STATE_LIMITS["registry"] + 1)      # sparse: nothing to read
    r = run_script("status", "--brief", timeout=TIMEOUT)
    assert r.rc == 1 and "more than a registry can be" in r.err and "repair" in r.err, r


def test_another_users_state_file_is_refused_with_what_to_do(cli, walked):
    cfg = walked["state"] / "config.json"
    os.chown(str(cfg), NOBODY, NOBODY)
    r = cli("list")
    assert r.rc == 1 and "uid %d" % NOBODY in r.err and "chown" in r.err, r
    assert cli("repair").rc == 0
    assert os.stat(str(cfg)).st_uid == NOBODY      # it may be intact: left to chown
    os.chown(str(cfg), 0, 0)
    lock = walked["state"] / "locks" / "ds.lock"   # a lock is ours to set aside
    os.chown(str(lock), NOBODY, NOBODY)
    r = cli("refresh", "--name", "ds")
    assert r.rc == 1 and "uid %d" % NOBODY in r.out + r.err, r
    r = cli("repair")
    assert r.rc == 0 and "another user's file" in r.out, r
    assert cli("refresh", "--name", "ds").rc == 0


# ------------------------------------------------------------------ 3. registry on load


@pytest.fixture
def moved_out(cli, walked, tmp_path):
    """The registry edited: dataset ds now names a directory outside the scratch root."""
    out = tmp_path / "outside-dir"
    out.mkdir()
    (out / "old.dat").write_bytes(b"x")
    set_atime(out / "old.dat", 1000000000)
    reg_path = walked["state"] / "registry.json"
    reg = json.loads(reg_path.read_text())
    reg["datasets"]["ds"]["path"] = str(out)
    reg_path.write_text(json.dumps(reg))
    return out


def test_a_registry_path_outside_the_scratch_root_is_never_walked(cli, moved_out):
    before = os.lstat(str(moved_out / "old.dat")).st_atime_ns
    r = cli("refresh", "--name", "ds")
    assert r.rc == 1 and "not strictly below the scratch root" in r.out + r.err, r
    assert os.lstat(str(moved_out / "old.dat")).st_atime_ns == before


def test_extend_and_repair_never_write_outside_the_scratch_root(cli, moved_out):
    r = cli("extend", "--name", "ds", "--keep-until", KEEP)
    assert r.rc == 1 and "remove --name ds" in r.err, r
    r = cli("repair")
    assert not (moved_out / ".scratch-keepalive").exists()
    assert sorted(os.listdir(str(moved_out))) == ["old.dat"]
    r = cli("doctor")
    assert r.rc == 1 and "remove --name ds" in r.out, r


def test_rescue_refuses_a_dataset_outside_the_scratch_root(cli, moved_out, tmp_path):
    r = cli("rescue", "--name", "ds", "--to", tmp_path / "dest")
    assert r.rc == 1 and "scratch root" in r.err, r
    assert not (tmp_path / "dest").exists() or not os.listdir(str(tmp_path / "dest"))


def test_a_dot_dot_path_is_refused(cli, walked):
    reg_path = walked["state"] / "registry.json"
    reg = json.loads(reg_path.read_text())
    reg["datasets"]["ds"]["path"] = str(walked["scratch"] / ".." / "state")
    reg_path.write_text(json.dumps(reg))
    r = cli("refresh", "--name", "ds")
    assert r.rc == 1 and "plain absolute path" in r.out + r.err, r


# ------------------------------------------------------------------ 4. output


def shell(cmd, env):
    return subprocess.run(["sh", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env, timeout=60)


@pytest.mark.parametrize("version,python", interpreters(), ids=[v for v, _ in interpreters()])
def test_closed_or_full_output_ends_with_one_line(walked, version, python):
    env = dict(os.environ)
    script = "%s %s" % (python, SCRIPT)
    for redirect in (">&-", ">/dev/full"):
        for cmd in ("status --brief", "list", "status --json"):
            p = shell("%s %s %s" % (script, cmd, redirect), env)
            err = p.stderr.decode()
            assert p.returncode == 1, (cmd, redirect, p)
            assert err.count("\n") == 1 and err.startswith("scratch-keepalive: error:"), err
            assert "internal error" not in err and "Exception ignored" not in err, err
        p = shell("%s list %s 2>&-" % (script, redirect), env)
        assert p.returncode == 1 and p.stderr == b"", p
        p = shell("%s list %s 2>/dev/full" % (script, redirect), env)
        assert p.returncode == 1 and p.stderr == b"", p
    for cmd in ("--version", "--help", "list --help"):   # argparse writes these
        for redirect in (">&-", ">/dev/full"):
            p = shell("%s %s %s" % (script, cmd, redirect), env)
            err = p.stderr.decode()
            assert p.returncode == 1 and err.count("\n") == 1, (cmd, redirect, p)
            assert err.startswith("scratch-keepalive: error: cannot write"), (cmd, err)
    p = shell("%s list | head -c0" % script, env)       # a closed pipe: quiet, as before
    assert p.stderr == b"", p


def test_main_in_process_with_no_stdout_returns_1(walked, capsys):
    old = sys.stdout
    sys.stdout = None
    try:
        rc = sk.main(["list"])
    finally:
        sys.stdout = old
    assert rc == 1
    assert "cannot write to standard output" in capsys.readouterr().err


# ------------------------------------------------------------------ 5. words


def test_doctor_calls_a_mode_000_file_unreadable(cli, walked):
    m = walked["state"] / "manifests" / "ds" / "manifest-000001.skm"
    os.chmod(str(m), 0)
    r = cli("doctor")
    assert r.rc == 1
    line = next(l for l in r.out.splitlines() if "manifest-000001.skm" in l)
    assert "unreadable" in line and "group/other" not in line, r.out


@pytest.mark.parametrize("rel", ["checkpoints", "checkpoints/rescue", "locks", "manifests",
                                 "manifests/ds", "logs"])
def test_a_state_directory_made_a_symlink_is_never_written_through(walked, tmp_path, rel):
    state = walked["state"]
    d = state / rel
    if not d.exists():
        d.mkdir(mode=0o700)
    outside = tmp_path / "outside-dir"
    shutil.copytree(str(d), str(outside), symlinks=True)
    shutil.rmtree(str(d))
    os.symlink(str(outside), str(d))

    def listing():
        return sorted((str(p.relative_to(outside)), p.is_file() and p.read_bytes(),
                       p.lstat().st_mtime_ns) for p in outside.rglob("*"))
    before = listing()
    for argv in (("refresh", "--name", "ds", "--max-entries", "2"), ("refresh", "--name", "ds"),
                 ("rescue", "--name", "ds", "--to", tmp_path / "dest", "--all",
                  "--max-entries", "2"), ("remove", "--name", "nosuch")):
        r = run_script(*argv, timeout=TIMEOUT)
        assert r.rc in DOCUMENTED and "Traceback" not in r.err, r
        assert listing() == before, argv
    r = run_script("repair", timeout=TIMEOUT)
    assert r.rc == 0, r
    assert not os.path.islink(str(d))
    assert [p for p in d.parent.iterdir() if p.name.startswith(d.name + ".corrupt-")]
    assert listing() == before
    r = run_script("refresh", "--name", "ds", timeout=TIMEOUT)
    assert r.rc == 0, r


# ------------------------------------------------------------------ more ways in


def test_a_hard_link_at_a_state_path_is_never_written_through(walked, tmp_path):
    """A lock file or partial.skm that is another name of a file outside: refused, and
    repair sets it aside, its other name (and its mode) as they were."""
    state = walked["state"]
    for rel in ("locks/ds.lock", "manifests/ds/partial.skm"):
        outside = tmp_path / (rel.replace("/", "_") + ".outside")
        outside.write_bytes(b"precious\n")
        os.chmod(str(outside), 0o644)
        path = state / rel
        if os.path.lexists(str(path)):
            os.unlink(str(path))
        os.link(str(outside), str(path))
        r = run_script("refresh", "--name", "ds", timeout=TIMEOUT)
        said = r.out + r.err
        if rel == "locks/ds.lock":      # refused; repair sets it aside
            assert r.rc == 1 and "hard links" in said and "repair" in said, r
            r = run_script("repair", timeout=TIMEOUT)
            assert r.rc == 0 and "hard links" in r.out, r
        else:                           # a new walk sets it aside itself, and goes on
            assert r.rc == 0, r
            assert any(p.name.startswith("partial.skm.corrupt-") for p in path.parent.iterdir())
        assert outside.read_bytes() == b"precious\n"
        assert outside.read_bytes() == b"precious\n" and \
            stat.S_IMODE(os.stat(str(outside)).st_mode) == 0o644
        assert os.stat(str(outside)).st_nlink == 2        # kept aside, not deleted
        assert run_script("refresh", "--name", "ds", timeout=TIMEOUT).rc == 0
        assert outside.read_bytes() == b"precious\n"


def test_a_small_file_that_inflates_without_end_is_damaged_not_a_hang(walked):
    import struct
    import zlib
    (_, path), _ = sk.Store(str(walked["state"])).manifests("ds")
    raw = open(path, "rb").read()
    head = raw[:raw.index(b"\n", len(sk.MANIFEST_MAGIC)) + 1]
    off = struct.unpack("<Q", raw[-8:])[0]
    co = zlib.compressobj(9)
    bomb = co.compress(struct.pack("<III", 0, 5, 0)) + b"".join(
        co.compress(b"\0" * (1 << 20)) for _ in range(256)) + co.flush()     # 256 MiB
    body = head + b"C" + struct.pack("<II", len(bomb), 5) + bomb
    body += raw[off:-8] + struct.pack("<Q", len(body))
    with open(path, "wb") as f:
        f.write(body)
    t0 = time.monotonic()
    r = run_script("files", "--name", "ds", timeout=TIMEOUT)
    assert r.rc == 1 and "inflates past" in r.err and time.monotonic() - t0 < TIMEOUT, r


@pytest.mark.parametrize("inflated", [b"", b"\0" * 5, b"\1" * 11])
def test_a_chunk_that_inflates_shorter_than_its_own_header_is_damaged(walked, inflated):
    """A chunk record whose data inflates to fewer bytes than a chunk's header: the
    manifest is damaged, one line and exit 1, never an internal error."""
    import struct
    import zlib
    (_, path), _ = sk.Store(str(walked["state"])).manifests("ds")
    raw = open(path, "rb").read()
    head = raw[:raw.index(b"\n", len(sk.MANIFEST_MAGIC)) + 1]
    off = struct.unpack("<Q", raw[-8:])[0]
    data = zlib.compress(inflated)
    body = head + b"C" + struct.pack("<II", len(data), 5) + data
    body += raw[off:-8] + struct.pack("<Q", len(body))
    with open(path, "wb") as f:
        f.write(body)
    r = run_script("files", "--name", "ds", timeout=TIMEOUT)
    assert r.rc == 1 and "is damaged" in r.err and "internal error" not in r.err, r
    assert r.err.count("\n") == 1, r


@pytest.mark.parametrize("value", ['"2"', "[2]", "null", "true", "0"])
def test_a_manifest_format_that_is_not_a_number_is_damaged(walked, value):
    (_, path), _ = sk.Store(str(walked["state"])).manifests("ds")
    raw = open(path, "rb").read()
    new = raw.replace(b'"format": 2', b'"format": ' + value.encode(), 1)
    assert new != raw
    import struct
    delta = len(new) - len(raw)
    off = struct.unpack("<Q", new[-8:])[0] + delta
    with open(path, "wb") as f:
        f.write(new[:-8] + struct.pack("<Q", off))
    for argv in (["status", "--name", "ds"], ["files", "--name", "ds"]):
        r = run_script(*argv, timeout=TIMEOUT)
        assert "internal error" not in r.err and "Traceback" not in r.err, (argv, r)
    r = run_script("refresh", "--name", "ds", "--json", timeout=TIMEOUT)
    assert r.rc == 0 and r.json()["results"][0]["entries_vanished"] is None, r
    assert "is damaged (format" in r.json()["results"][0]["manifest_note"], r


def test_an_incomplete_previous_manifest_is_not_compared(walked):
    (_, path), _ = sk.Store(str(walked["state"])).manifests("ds")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 9)
    os.unlink(str(walked["scratch"] / "ds" / "f1"))
    r = run_script("refresh", "--name", "ds", "--json", timeout=TIMEOUT)
    res = r.json()["results"][0]
    assert res["entries_vanished"] is None and "not complete" in res["manifest_note"], res


def test_a_manifest_of_an_earlier_registration_is_not_used(walked, tmp_path):
    store = sk.Store(str(walked["state"]))
    (_, path), _ = store.manifests("ds")
    keep = tmp_path / "old.skm"
    shutil.copyfile(path, str(keep))
    d = walked["scratch"] / "ds"
    assert run_script("remove", "--name", "ds").rc == 0
    os.unlink(str(d / "f1"))
    assert run_script("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    store.ensure()
    os.close(store.make_dir("manifests", "ds"))
    shutil.copyfile(str(keep), os.path.join(store.manifest_dir("ds"), "manifest-000002.skm"))
    os.chmod(os.path.join(store.manifest_dir("ds"), "manifest-000002.skm"), 0o600)
    r = run_script("refresh", "--name", "ds", "--json", timeout=TIMEOUT)
    res = r.json()["results"][0]
    assert res["entries_vanished"] is None and "earlier registration" in \
        res["manifest_note"], res


def test_a_manifest_of_another_directory_at_the_path_is_listed_by_nothing(walked):
    d = walked["scratch"] / "ds"
    os.rename(str(d), str(d) + ".old")
    d.mkdir()
    shutil.copyfile(str(d) + ".old/" + sk.SENTINEL, str(d / sk.SENTINEL))
    r = run_script("files", "--name", "ds", timeout=TIMEOUT)
    assert r.rc == 1 and "another directory" in r.err and r.out == "", r
    st = run_script("status", "--name", "ds", "--json", timeout=TIMEOUT).json()
    assert st["manifest"] is None, st


def test_symlinked_state_directories_are_not_read_through(walked, tmp_path):
    state = walked["state"]
    assert run_script("refresh", "--name", "ds", "--max-entries", "2").rc == 3
    for rel in ("checkpoints", "manifests/ds"):
        shutil.move(str(state / rel), str(tmp_path / rel.replace("/", "_")))
        os.symlink(str(tmp_path / rel.replace("/", "_")), str(state / rel))
    moved = list((tmp_path / "checkpoints").rglob("*")) + list(
        (tmp_path / "manifests_ds").rglob("*"))
    before = dict((p, os.stat(str(p)).st_atime_ns) for p in moved if p.is_file())
    assert before
    for argv in (["status", "--name", "ds"], ["files", "--name", "ds"],
                 ["files", "--name", "ds", "--vanished"]):
        r = run_script(*argv, timeout=TIMEOUT)
        assert r.rc == 1 and "repair" in r.err and "symlink" in r.err, (argv, r)
    assert run_script("status", "--brief", timeout=TIMEOUT).rc == 0     # reads nothing there
    assert dict((p, os.stat(str(p)).st_atime_ns) for p in before) == before
    assert run_script("repair", timeout=TIMEOUT).rc == 0
    assert not any(os.path.islink(str(state / rel)) for rel in ("checkpoints", "manifests/ds"))
    assert run_script("refresh", "--name", "ds", timeout=TIMEOUT).rc == 0


def test_a_log_directory_that_is_not_one_is_set_aside_by_repair(walked):
    logs = walked["state"] / "logs" / "ds"
    shutil.rmtree(str(logs))
    os.mkfifo(str(logs))
    r = run_script("refresh", "--name", "ds", timeout=TIMEOUT)
    assert r.rc == 1 and "repair" in r.out + r.err, r
    assert run_script("repair", timeout=TIMEOUT).rc == 0
    assert run_script("refresh", "--name", "ds", timeout=TIMEOUT).rc == 0


def test_a_state_file_larger_than_its_kind_is_set_aside_by_repair(walked):
    lock = walked["state"] / "locks" / "ds.lock"
    with open(str(lock), "ab") as f:
        f.truncate(100 * 1024)
    r = run_script("refresh", "--name", "ds", timeout=TIMEOUT)
    assert r.rc == 1 and "more than a lock can be" in r.out + r.err, r
    r = run_script("repair", timeout=TIMEOUT)
    assert r.rc == 0 and "more than a lock can be" in r.out, r
    assert run_script("refresh", "--name", "ds", timeout=TIMEOUT).rc == 0


def test_a_registry_path_edited_to_another_datasets_is_refused(walked):
    d = walked["scratch"] / "two"
    make_dataset(walked["scratch"], "two")
    assert run_script("add", "--name", "two", "--path", d, "--keep-until", KEEP).rc == 0
    reg = walked["state"] / "registry.json"
    doc = json.loads(reg.read_text())
    doc["datasets"]["ds"]["path"] = str(d)
    reg.write_text(json.dumps(doc))
    before = (d / sk.SENTINEL).read_bytes()
    for argv in (["refresh", "--name", "ds"], ["extend", "--name", "ds", "--keep-until",
                                                "2030-07-01"]):
        r = run_script(*argv, timeout=TIMEOUT)
        said = r.out + r.err
        assert r.rc == 1 and "dataset 'two'" in said and "remove --name ds" in said, r
    assert (d / sk.SENTINEL).read_bytes() == before
    r = run_script("doctor", timeout=TIMEOUT)
    assert r.rc == 1 and "remove --name ds" in r.out, r


def test_a_registry_path_that_is_a_symlink_is_named_as_one(walked):
    d = walked["scratch"] / "ds"
    link = walked["scratch"] / "via"
    os.symlink(str(d), str(link))
    reg = walked["state"] / "registry.json"
    doc = json.loads(reg.read_text())
    doc["datasets"]["ds"]["path"] = str(link)
    reg.write_text(json.dumps(doc))
    os.utime(str(link), (0, 0), follow_symlinks=False)
    r = run_script("doctor", "--json", timeout=TIMEOUT)
    c = [c for c in r.json()["checks"] if c["name"] == "root:ds"][0]
    assert "is a symlink" in c["message"] and "remove --name ds" in c["message"], c
    assert run_script("status", "--name", "ds", timeout=TIMEOUT).rc == 0
    assert os.lstat(str(link)).st_atime == 0          # status did not go through it


@pytest.mark.parametrize("redirect", [">&-", ">/dev/full"])
def test_files_to_a_closed_or_full_output_says_one_line(walked, redirect):
    """files' header line goes to stderr only once stdout took the first lines."""
    p = subprocess.run(["sh", "-c", '"$@" %s' % redirect, "sh", sys.executable, str(SCRIPT),
                        "files", "--name", "ds"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=TIMEOUT)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1, (redirect, err)
    assert err.startswith("scratch-keepalive: error: cannot write to standard output"), err
