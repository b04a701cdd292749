"""rescue: copy what the last complete walk found at risk to safe storage.

Every test builds a real tree below a real scratch root, walks it in check mode (which
leaves the manifest rescue reads), then rescues it to a real directory and compares both
sides with lstat. Atimes are set old in the real past (2020), so that on a relatime mount
any read of a source would move its atime: each test of "atime unchanged" first shows
that a plain read does move one on the same filesystem.
"""
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import DAY, KEEP, NOW, NOW_EPOCH, give_to_nobody, reaped, run_as_nobody, \
    on_a_terminal, pause_env, pause_shim, run_script, set_atime, sk, snapshot, \
    start_script, wait_stopped  # noqa: F401  (pause_shim: a fixture)
from slurmbed import USER, as_user, make_world, pending, settle, wait_done  # noqa: F401

OLD = 1577836800.0                      # 2020-01-01: old by policy AND in the real past
RECENT = NOW_EPOCH - 2 * DAY            # not at risk (at-risk line: 13 days, generic 30/14)
TWELVE = NOW_EPOCH - 12 * DAY           # past the skip line (11 days), not the at-risk one


def mtime_of(p):
    return os.lstat(str(p)).st_mtime_ns


def build(root):
    """A dataset with old and recent files, a read-only directory, a sparse file, symlinks
    (one dangling) and odd modes. Returns {relative path: atime} as set."""
    (root / "old" / "deep").mkdir(parents=True)
    (root / "recent").mkdir()
    (root / "ro").mkdir()
    files = {
        "old/a.txt": b"alpha\n", "old/deep/b.bin": os.urandom(70000), "old/exec.sh": b"#!x\n",
        "recent/new.txt": b"new\n", "ro/kept.txt": b"read-only dir\n", "twelve.txt": b"12\n",
        "top.txt": b"top\n",
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    with open(str(root / "old" / "sparse.img"), "wb") as f:
        f.truncate(64 << 20)
        f.seek(40 << 20)
        f.write(b"data in the middle")
    os.chmod(str(root / "old" / "exec.sh"), 0o751)
    os.chmod(str(root / "old" / "a.txt"), 0o640)
    os.symlink("a.txt", str(root / "old" / "link"))
    os.symlink("/nowhere/at/all", str(root / "old" / "dangling"))
    os.chmod(str(root / "old" / "deep"), 0o750)
    atimes = {}
    for dp, dns, fns in os.walk(str(root)):
        for n in dns + fns:
            rel = os.path.relpath(os.path.join(dp, n), str(root))
            atimes[rel] = OLD
    for rel in ("recent", "recent/new.txt"):
        atimes[rel] = RECENT
    atimes["twelve.txt"] = TWELVE
    for i, rel in enumerate(sorted(atimes)):
        os.utime(str(root / rel), ns=(int(atimes[rel] * 1e9), int((OLD - 1000 * i) * 1e9)),
                 follow_symlinks=False)
    os.chmod(str(root / "ro"), 0o555)
    atimes["."] = OLD
    os.utime(str(root), ns=(int(OLD * 1e9), int(OLD * 1e9)))
    return atimes


@pytest.fixture
def ds(generic, cli):
    root = generic["scratch"] / "ds"
    root.mkdir()
    atimes = build(root)
    r = cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP)
    assert r.rc == 0, r
    r = cli("refresh", "--name", "ds", "--check", "--json")
    assert r.rc == 0, r
    # the walk itself moved nothing; put back the root's atime, moved by `add`'s sentinel
    os.utime(str(root), ns=(int(OLD * 1e9), os.stat(str(root)).st_mtime_ns))
    generic["root"], generic["atimes"] = root, atimes
    generic["dest"] = generic["tmp"] / "safe" / "ds"
    return generic


def rescue(cli, to, *extra):
    r = cli("rescue", "--name", "ds", "--to", to, "--json", *extra)
    return r, (json.loads(r.out) if r.out.strip() else None)


def listing(root):
    """{relative path: kind} below root (root itself left out)."""
    out = {}
    for dp, dns, fns in os.walk(str(root)):
        for n in dns + fns:
            p = os.path.join(dp, n)
            rel = os.path.relpath(p, str(root))
            mode = os.lstat(p).st_mode
            out[rel] = "dir" if stat.S_ISDIR(mode) else "link" if stat.S_ISLNK(mode) else "file"
    return out


def at_risk_rels(atimes):
    line = NOW_EPOCH - 13 * DAY
    return set(rel for rel, t in atimes.items() if rel != "." and t < line)


def test_a_plain_read_moves_atime_on_this_filesystem(ds):
    """What makes every "atime unchanged" below mean something: on this mount a read of a
    file with an old atime does update it (relatime would too)."""
    control = ds["tmp"] / "control"
    control.write_bytes(b"x" * 10)
    set_atime(control, OLD)
    with open(str(control), "rb") as f:
        f.read()
    assert os.lstat(str(control)).st_atime_ns != int(OLD * 1e9)


def test_rescue_copies_exactly_the_at_risk_entries_and_moves_no_source_atime(ds, cli):
    root, dest = ds["root"], ds["dest"]
    before = snapshot(root)
    r, res = rescue(cli, dest)
    assert r.rc == 0, r
    after = snapshot(root)
    assert after == before          # atime, mtime, size and mode of every source entry
    want = at_risk_rels(ds["atimes"])
    # the parents of rescued entries come along; the sentinel never does
    assert set(listing(dest)) == want
    assert "recent/new.txt" not in listing(dest) and "twelve.txt" not in listing(dest)
    assert not (dest / sk.SENTINEL).exists()
    assert res["complete"] is True and res["exit_code"] == 0 and res["errors"] == 0
    files = [rel for rel in want if listing(root)[rel] != "dir"]
    assert res["entries_copied"] == len(files)
    assert res["selection"] == "at-risk"


def test_rescue_keeps_contents_mtimes_modes_sparseness_and_symlinks(ds, cli):
    root, dest = ds["root"], ds["dest"]
    r, res = rescue(cli, dest, "--all")
    assert r.rc == 0, r
    src, dst = listing(root), listing(dest)
    src.pop(sk.SENTINEL)
    assert dst == src
    for rel, kind in src.items():
        s, d = os.lstat(str(root / rel)), os.lstat(str(dest / rel))
        assert d.st_mtime_ns == s.st_mtime_ns, rel
        assert stat.S_IMODE(d.st_mode) == stat.S_IMODE(s.st_mode), rel
        if kind == "file":
            assert (dest / rel).read_bytes() == (root / rel).read_bytes(), rel
        elif kind == "link":
            assert os.readlink(str(dest / rel)) == os.readlink(str(root / rel))
    sparse = os.lstat(str(dest / "old" / "sparse.img"))
    assert sparse.st_size == 64 << 20
    assert sparse.st_blocks * 512 < 1 << 20         # the holes stayed holes
    assert stat.S_IMODE(os.lstat(str(dest / "ro")).st_mode) == 0o555
    # bytes copied are the data extents, not the holes
    assert res["bytes_copied"] < 1 << 20


def test_second_rescue_skips_what_is_there_and_never_overwrites_a_newer_file(ds, cli):
    root, dest = ds["root"], ds["dest"]
    r, first = rescue(cli, dest, "--all")
    assert r.rc == 0, r
    newer = dest / "old" / "a.txt"
    newer.write_bytes(b"edited at the destination\n")
    os.utime(str(newer), ns=(int(time.time() * 1e9), mtime_of(root / "old" / "a.txt") + 10 ** 9))
    stale = dest / "top.txt"
    stale.write_bytes(b"an older copy, shorter\n"[:5])
    os.utime(str(stale), ns=(int(time.time() * 1e9), mtime_of(root / "top.txt") - 10 ** 9))
    r, res = rescue(cli, dest, "--all")
    assert r.rc == 0, r
    assert newer.read_bytes() == b"edited at the destination\n"
    assert stale.read_bytes() == (root / "top.txt").read_bytes()
    assert res["entries_newer_destination"] == 1 and res["entries_copied"] == 1
    assert res["entries_not_rescued"] == 1 and res["errors"] == 0
    assert {"path": "old/a.txt", "reason": "newer-destination"} in res["not_rescued"]
    assert res["entries_skipped"] == first["entries_copied"] + first["dirs_created"] - 2
    text = cli("rescue", "--name", "ds", "--to", dest, "--all")
    assert text.rc == 0 and "newer at the destination (kept)" in text.out, text


def test_dry_run_writes_nothing_and_counts_what_it_would_copy(ds, cli):
    dest = ds["dest"]
    state_before = sorted(p for p in ds["state"].rglob("*"))
    r, res = rescue(cli, dest, "--dry-run")
    assert r.rc == 0, r
    assert not dest.exists()
    assert sorted(p for p in ds["state"].rglob("*")) == state_before
    files = [rel for rel in at_risk_rels(ds["atimes"]) if listing(ds["root"])[rel] != "dir"]
    assert res["entries_copied"] == len(files) and res["dry_run"] is True


@pytest.mark.parametrize("where", ["scratch", "inside", "dataset", "contains"])
def test_destination_on_scratch_is_refused_with_exit_2_and_nothing_copied(ds, cli, where):
    to = {"scratch": ds["scratch"] / "elsewhere", "inside": ds["root"] / "old" / "copy",
          "dataset": ds["root"], "contains": ds["tmp"]}[where]
    before = snapshot(ds["scratch"])
    r, _ = rescue(cli, to)
    assert r.rc == 2, r
    assert r.err.startswith("scratch-keepalive: error: --to ") and "purged" in r.err, r.err
    assert "Slate-Project" in r.err and r.err.count("\n") == 1
    assert snapshot(ds["scratch"]) == before
    assert not (ds["state"] / "checkpoints" / "rescue").exists()


def test_destination_reached_through_a_symlink_into_scratch_is_refused(ds, cli):
    link = ds["tmp"] / "looks-safe"
    os.symlink(str(ds["scratch"]), str(link))
    r, _ = rescue(cli, link / "copy")
    assert r.rc == 2 and "lies inside the scratch root" in r.err, r


def test_destination_that_is_a_file_is_refused(ds, cli):
    f = ds["tmp"] / "afile"
    f.write_bytes(b"")
    r, _ = rescue(cli, f / "sub")
    assert r.rc == 2 and "is not a directory" in r.err, r


def small_fs(tmp, mounts):
    """A 1 MiB tmpfs at tmp/small."""
    mnt = tmp / "small"
    mnt.mkdir()
    mounts("-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt)
    return mnt


def test_destination_without_room_is_refused_with_exit_2_and_nothing_copied(ds, cli, mounts):
    (ds["root"] / "old" / "big.bin").write_bytes(os.urandom(3 << 20))
    set_atime(ds["root"] / "old" / "big.bin", OLD)
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    mnt = small_fs(ds["tmp"], mounts)
    r, _ = rescue(cli, mnt / "copy")
    assert r.rc == 2, r
    assert "too little for the" in r.err and "nothing was copied" in r.err, r.err
    assert os.listdir(str(mnt)) == []


LFS = """Disk quotas for usr jdoe (uid 1234):
     Filesystem  kbytes   quota   limit   grace   files   quota   limit   grace
/N/project/lab  1000000*  900000  2000000   6d23h   12  0  0  -
"""
LFS_WRAPPED = """Disk quotas for user jdoe (uid 1234):
     Filesystem  kbytes   quota   limit   grace   files   quota   limit   grace
/N/project/a-very-long-project-directory-name
                 500  0  10000  -  3  0  0  -
"""
QUOTA = """Disk quotas for user jdoe (uid 1000):
     Filesystem  blocks   quota   limit   grace   files   quota   limit   grace
      /dev/sdb1     100     0     0            10       0       0
      /dev/sda1    4000  5000  8000             7       0       0
"""


def test_quota_tables_are_parsed_defensively():
    rows = sk.parse_quota_table(LFS)
    assert rows == [("/N/project/lab", 1000000, 900000, 2000000)]
    assert sk.quota_room(rows[0]) == 0                 # over its soft limit: no room
    rows = sk.parse_quota_table(LFS_WRAPPED)
    assert rows == [("/N/project/a-very-long-project-directory-name", 500, 0, 10000)]
    assert sk.quota_room(rows[0]) == 9500 * 1024
    rows = sk.parse_quota_table(QUOTA)
    assert [r[0] for r in rows] == ["/dev/sdb1", "/dev/sda1"]
    assert sk.quota_room(rows[0]) is None              # no limit
    assert sk.quota_room(rows[1]) == 1000 * 1024
    for junk in ("", "quota: no user quotas\n", "Filesystem\n x y z\n", "\x00\xff garbage"):
        assert sk.parse_quota_table(junk) == []


def test_quota_of_the_destination_mount_is_what_counts(tmp_path, monkeypatch):
    """A fake runner (the quota command's output is the only thing faked): the row of the
    destination's own mount decides; a missing command or another mount's row does not."""
    mount = sk.mount_of(str(tmp_path))
    ctx = sk.Context(state_dir=str(tmp_path / "state"), env={"USER": "jdoe"})
    table = ("Disk quotas for user jdoe (uid 1):\n     Filesystem  blocks quota limit grace "
             "files quota limit grace\n  %s  900  0  1000  0  0  0\n  /other  1  0  9 0 0 0\n"
             % mount[0])
    seen = []

    def runner(argv, input_text=None):
        seen.append(argv)
        return sk.CommandResult(argv, 1, table, "")
    assert sk.user_quota_room(ctx, str(tmp_path), runner)[0] == 100 * 1024
    with pytest.raises(sk.UsageError) as e:
        sk.check_rescue_room(ctx, str(tmp_path), 100 * 1024, runner)
    assert "your quota" in str(e.value) and "quota -w -u jdoe" in str(e.value)
    sk.check_rescue_room(ctx, str(tmp_path), 90 * 1024, runner)
    assert sk.user_quota_room(ctx, str(tmp_path), lambda argv, input_text=None: None) is None
    assert seen[0][:2] == ["quota", "-w"]


def test_quota_runs_with_its_own_runner_time_limit_and_words(tmp_path, monkeypatch):
    """`quota` (and `lfs quota`) run through quota_runner, not the Slurm runner: one that
    does not answer says the quota service may be down, never "is the Slurm controller
    up?"; one not installed is said as such. Doctor's quota line and the rescue's room
    check read the same probe."""
    ctx = sk.Context(state_dir=str(tmp_path / "state"), env={"USER": "jdoe"})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    hung = bin_dir / "quota"
    hung.write_text("#!/bin/sh\nexec %s 60\n" % shutil.which("sleep"))
    hung.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(sk, "QUOTA_TIMEOUT", 1)
    with pytest.raises(sk.Failure) as e:
        sk.check_rescue_room(ctx, str(tmp_path), 1024)
    assert str(e.value) == ("`quota -w` did not answer within 1 s; the filesystem's quota "
                            "service may be down or slow; try again later"), e.value
    c = sk._check_quota(ctx, str(tmp_path))[0]
    assert (c.name, c.level) == ("quota", "warn") and "quota service" in c.message, c.message
    assert "Slurm" not in c.message
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    reading = sk.read_quota(str(tmp_path), "jdoe")
    assert reading.row is None and reading.why == "`quota` is not installed here"
    c = sk._check_quota(ctx, str(tmp_path))[0]
    assert (c.level, c.message) == ("info", "scratch quota: not checked: `quota` is not "
                                            "installed here")
    sk.check_rescue_room(ctx, str(tmp_path), 1024)       # no quota known: room is enough


def test_doctor_reads_lustre_quota_files_and_bytes_through_the_same_probe(tmp_path,
                                                                          monkeypatch):
    ctx = sk.Context(state_dir=str(tmp_path / "state"), env={"USER": "jdoe"})
    monkeypatch.setattr(sk, "mount_of", lambda path: ("/N/scratch", "mds@o2ib:/s", "lustre"))
    table = ("Disk quotas for usr jdoe (uid 1234):\n     Filesystem  kbytes   quota   limit   "
             "grace   files   quota   limit   grace\n/N/scratch  100  0  1000  -  "
             "950*  0  1000  -\n")
    seen = []

    def runner(argv, input_text=None):
        seen.append(argv)
        return sk.CommandResult(argv, 0, table, "")
    c = sk._check_quota(ctx, "/N/scratch/jdoe", runner)[0]
    assert seen == [["lfs", "quota", "-u", "jdoe", "/N/scratch/jdoe"]]
    assert (c.level, c.message) == ("warn", "scratch quota: 95% of the file limit (`lfs quota "
                                            "-u jdoe /N/scratch/jdoe`)")
    assert sk.user_quota_room(ctx, "/N/scratch/jdoe", runner) == (900 * 1024, " ".join(seen[0]))
    failed = lambda argv, input_text=None: sk.CommandResult(argv, 2, "", "lfs: quotactl failed\n")
    assert sk.read_quota("/N/scratch/jdoe", "jdoe", failed).why == \
        "`lfs quota -u jdoe /N/scratch/jdoe` failed: lfs: quotactl failed"


def test_a_symlink_in_the_destination_is_never_written_through(ds, cli):
    dest, outside = ds["dest"], ds["tmp"] / "outside"
    dest.mkdir(parents=True)
    outside.mkdir()
    os.symlink(str(outside), str(dest / "old"))
    r, res = rescue(cli, dest)
    assert r.rc == 1, r
    assert os.listdir(str(outside)) == []
    assert os.path.islink(str(dest / "old"))
    assert res["errors"] >= 1 and res["complete"] is True
    assert any(x["reason"] == "error" and x["path"].startswith("old/")
               for x in res["not_rescued"])
    assert (dest / "top.txt").exists()          # the rest was rescued


def test_files_of_another_owner_are_listed_not_rescued_and_not_read(world_tmp):
    """As the user nobody: a labmate's (root's) files cannot be opened with O_NOATIME, so
    they are listed as not rescued (not errors), never read; the rest is copied; exit 0."""
    state, scratch, home, safe = (world_tmp / n for n in ("state", "scratch", "home", "safe"))
    run = run_as_nobody(home, state)
    root = scratch / "ds"
    for d in (home, root / "sub", safe):
        d.mkdir(parents=True)
    for rel in ("a_mine.txt", "b_theirs.txt", "sub/c_theirs.txt", "sub/d_mine.txt"):
        (root / rel).write_bytes(b"data of " + rel.encode())
    os.symlink("a_mine.txt", str(root / "e_their_link"))
    theirs = [root / rel for rel in ("b_theirs.txt", "sub/c_theirs.txt", "e_their_link")]
    give_to_nobody(home, scratch, safe, keep=theirs)
    for rel in ("b_theirs.txt", "sub/c_theirs.txt"):
        os.chmod(str(root / rel), 0o644)

    assert run("init", "--profile", "generic", "--scratch-root", scratch).rc == 0
    assert run("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0
    for p in [root] + [Path(dp) / n for dp, dns, fns in os.walk(str(root)) for n in dns + fns]:
        set_atime(p, OLD)
    assert run("refresh", "--name", "ds", "--check").rc == 0
    before = snapshot(root)
    r = run("rescue", "--name", "ds", "--to", safe / "copy", "--json")
    assert r.rc == 0, r
    res = json.loads(r.out)
    assert snapshot(root) == before
    assert res["entries_not_owned"] == 3 and res["errors"] == 0
    assert sorted(x["path"] for x in res["not_rescued"]) == [
        "b_theirs.txt", "e_their_link", "sub/c_theirs.txt"]
    assert set(x["reason"] for x in res["not_rescued"]) == {"other-owner"}
    assert sorted(listing(safe / "copy")) == ["a_mine.txt", "sub", "sub/d_mine.txt"]
    log = Path(res["log"]).read_text()
    assert "not-rescued other-owner b_theirs.txt" in log
    text = run("rescue", "--name", "ds", "--to", safe / "copy")
    assert text.rc == 0 and "3 of another owner" in text.out, text


def test_budget_stop_exits_3_checkpoints_and_the_next_run_resumes(ds, cli):
    dest = ds["dest"]
    r, first = rescue(cli, dest, "--all", "--max-entries", "4")
    assert r.rc == 3, r
    assert first["complete"] is False and first["stopped"] == "max-entries"
    assert first["entries_done"] == 4
    ck = json.loads((ds["state"] / "checkpoints" / "rescue" / "ds.json").read_text())
    assert ck["entries_done"] == 4 and ck["cursor"]["subtree_done"] is False     # a walk's
    assert len(ck["cursor"]["path"]) >= 1
    r, second = rescue(cli, dest, "--all")
    assert r.rc == 0, r
    assert second["resumed"] is True
    assert second["entries_done"] == second["entries_total"]
    assert first["entries_done"] + second["entries_done"] == len(listing(dest))
    assert second["entries_skipped"] == 0        # nothing done before the cursor was redone
    assert not (ds["state"] / "checkpoints" / "rescue" / "ds.json").exists()
    src = listing(ds["root"])
    src.pop(sk.SENTINEL)
    assert listing(dest) == src


def test_stop_request_exits_130_through_the_api(ds):
    calls = []

    def should_stop():
        calls.append(1)
        return "int" if len(calls) > 3 else None
    res = sk.rescue("ds", str(ds["dest"]), all=True, should_stop=should_stop,
                    state_dir=str(ds["state"]))
    assert res["exit_code"] == 130 and res["stopped"] == "int"
    res = sk.rescue("ds", str(ds["dest"]), all=True, state_dir=str(ds["state"]))
    assert res["exit_code"] == 0 and res["resumed"] is True


def test_rescue_while_the_dataset_is_locked_exits_4_and_copies_nothing(ds, cli):
    with sk.DatasetLock(sk.Store(str(ds["state"])), "ds"):
        r, _ = rescue(cli, ds["dest"])
    assert r.rc == 4 and "is busy" in r.err, r
    assert not ds["dest"].exists()


def test_rescue_needs_a_complete_walk_and_a_known_dataset(generic, cli):
    root = generic["scratch"] / "fresh"
    root.mkdir()
    (root / "f").write_bytes(b"x")
    assert cli("add", "--name", "fresh", "--path", root, "--keep-until", KEEP).rc == 0
    r = cli("rescue", "--name", "fresh", "--to", generic["tmp"] / "safe")
    assert r.rc == 1 and "no complete walk" in r.err and "refresh --name fresh" in r.err, r
    assert not (generic["tmp"] / "safe").exists()
    r = cli("rescue", "--name", "nope", "--to", generic["tmp"] / "safe")
    assert r.rc == 2 and "no dataset named 'nope'" in r.err, r


def test_a_damaged_rescue_checkpoint_is_not_trusted(ds, cli):
    d = ds["state"] / "checkpoints" / "rescue"
    d.mkdir(parents=True)
    (d / "ds.json").write_text(json.dumps({"format": 1, "dataset": "ds", "cursor": "zz"}))
    r, res = rescue(cli, ds["dest"])
    assert r.rc == 0, r
    assert res["resumed"] is False and res["errors"] == 0
    r = cli("doctor", "--json")
    assert "checkpoint:ds" not in r.out


def test_sigkill_mid_copy_then_rerun_copies_no_byte_twice_before_the_checkpoint(
        generic, cli, tmp_path, pause_shim):
    """SIGKILL while a big file is half copied (the pause shim stops the copy there): the
    destination holds only finished files and the rescue's own temporary file; the rerun
    removes that, skips what the killed run finished, copies the rest, and the destination
    equals the at-risk set exactly."""
    root = generic["scratch"] / "ds"
    (root / "a").mkdir(parents=True)
    (root / "z").mkdir()
    sizes = {}
    for i in range(20):
        rel = "a/f%02d" % i
        (root / rel).write_bytes(os.urandom(50000))
        sizes[rel] = 50000
    (root / "m_big.bin").write_bytes(os.urandom(40 << 20))
    sizes["m_big.bin"] = 40 << 20
    for i in range(10):
        rel = "z/g%02d" % i
        (root / rel).write_bytes(os.urandom(30000))
        sizes[rel] = 30000
    (root / "z" / "recent").write_bytes(b"not at risk")
    for p in [Path(dp) / n for dp, dns, fns in os.walk(str(root)) for n in dns + fns]:
        set_atime(p, OLD)
    set_atime(root / "z" / "recent", RECENT)
    assert cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    dest = tmp_path / "safe"
    env = pause_env(dict(os.environ), pause_shim, "copy", root / "m_big.bin")
    proc = start_script("rescue", "--name", "ds", "--to", dest, "--checkpoint-every",
                        "0.000001", "--json", env=env)
    with reaped(proc):
        # the shim stops the run with the big file half copied (one copy call done)
        wait_stopped(proc, "the big file's copy to pause")
        big_seen = [n for n in os.listdir(str(dest))
                    if n.startswith(".scratch-keepalive-rescue.")]
        assert len(big_seen) == 1
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    ck = json.loads((generic["state"] / "checkpoints" / "rescue" / "ds.json").read_text())
    finished = set(rel for rel in listing(dest) if listing(dest)[rel] == "file"
                   and not os.path.basename(rel).startswith(".scratch-keepalive-rescue."))
    assert finished == set("a/f%02d" % i for i in range(20))
    assert ck["bytes_copied"] == 20 * 50000         # checkpointed after every file
    temp = dest / big_seen[0]
    assert 0 < temp.stat().st_size <= 40 << 20
    r = cli("rescue", "--name", "ds", "--to", dest, "--json")
    assert r.rc == 0, r
    res = json.loads(r.out)
    total = sum(sizes.values())
    # only the stretch since the checkpoint (the big file in flight) was copied again
    assert res["resumed"] is True
    assert res["bytes_copied"] == total - ck["bytes_copied"]
    assert res["temps_removed"] == 1 and not temp.exists()
    want = set(sizes) | {"a", "z"}
    assert set(listing(dest)) == want
    for rel in sizes:
        assert (dest / rel).read_bytes() == (root / rel).read_bytes(), rel


def test_add_and_extend_rescue_to_are_validated_stored_and_cleared(generic, cli):
    root = generic["scratch"] / "ds"
    root.mkdir()
    reg = generic["state"] / "registry.json"
    bad = cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP, "--rescue-to",
              generic["scratch"] / "x")
    assert bad.rc == 2 and "--rescue-to" in bad.err and "purged" in bad.err, bad
    assert not reg.exists() or "ds" not in json.loads(reg.read_text())["datasets"]
    assert not (root / sk.SENTINEL).exists()
    safe = generic["tmp"] / "safe"
    r = cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP, "--rescue-to", safe,
            "--json")
    assert r.rc == 0, r
    assert json.loads(r.out)["rescue_to"] == str(safe)
    before = reg.read_bytes()
    bad = cli("extend", "--name", "ds", "--rescue-to", root / "inside")
    assert bad.rc == 2 and "inside the dataset" in bad.err, bad
    assert reg.read_bytes() == before
    assert cli("extend", "--name", "ds", "--rescue-to", "none").rc == 0
    assert json.loads(cli("list", "--json").out)[0]["rescue_to"] is None
    doc = json.loads(reg.read_text())
    doc["datasets"]["ds"]["rescue_to"] = "relative/path"
    reg.write_text(json.dumps(doc))
    r = cli("list")
    assert r.rc == 1 and "'rescue_to' should be null or an absolute path" in r.err, r


def test_only_the_scheduled_run_rescues_not_a_manual_refresh_due(ds, cli, monkeypatch):
    """--rescue-to is for "every scheduled walk": `refresh --due` run by hand walks what is
    due and copies nothing; the schedule's own command (`--due --scheduled METHOD`, what the
    scrontab line and the batch job pass) rescues after its walk."""
    safe = ds["tmp"] / "sched"
    assert cli("extend", "--name", "ds", "--rescue-to", safe).rc == 0
    r = cli("refresh", "--due", "--check", "--json")
    assert r.rc == 0, r
    res = json.loads(r.out)["results"][0]
    assert res["complete"] is True and "rescue" not in res, res
    assert not safe.exists()
    monkeypatch.setenv("SLURM_JOB_ID", "1")         # --scheduled runs inside a Slurm job only
    r = cli("refresh", "--due", "--check", "--json", "--scheduled", "scrontab")
    assert r.rc == 0, r
    res = json.loads(r.out)["results"][0]
    assert res["rescue"]["complete"] is True and res["rescue"]["selection"] == "skip", res
    assert "twelve.txt" in listing(safe)


def test_scheduled_walk_rescues_what_could_age_out_and_finishes_a_stopped_rescue(ds, cli,
                                                                                  monkeypatch):
    """A scheduled run (refresh --due --scheduled) with --rescue-to: after the complete walk,
    the entries past the skip line (11 days here, not the 13-day at-risk line) are rescued
    in the same run; a budget that stops the rescue exits 3 (a scheduled job then books its
    continuation), and the next scheduled run finishes it although the walk is not due."""
    safe = ds["tmp"] / "sched"
    assert cli("extend", "--name", "ds", "--rescue-to", safe).rc == 0
    registry = ds["state"] / "registry.json"
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    sched = ("--scheduled", "scrontab")     # no schedule installed: no chain to keep going

    def not_due():
        # walks record real start times, years before the tests' policy clock: make the
        # last one look as recent as NOW, so that only the stopped rescue is left to do
        doc = json.loads(registry.read_text())
        doc["datasets"]["ds"]["last_check_start"] = NOW
        registry.write_text(json.dumps(doc))
    walked = json.loads(cli("refresh", "--name", "ds", "--json", "--check").out)
    total = walked["results"][0]["entries_seen"]
    # check mode, as on BR200 without an approval (generic would touch, leaving no risk)
    r = cli("refresh", "--due", "--check", "--json", "--max-entries", total + 3, *sched)
    assert r.rc == 3, r
    res = json.loads(r.out)["results"][0]
    assert res["complete"] is True and res["rescue"]["stopped"] == "max-entries"
    assert res["rescue"]["selection"] == "skip"
    not_due()
    r = cli("refresh", "--due", "--check", "--json", *sched)
    assert r.rc == 0, r
    res = json.loads(r.out)["results"][0]
    assert res["entries_seen"] == 0 and "scheduled rescue" in res["reason"]
    assert res["rescue"]["complete"] is True and res["rescue"]["resumed"] is True
    got = listing(safe)
    assert "twelve.txt" in got and "recent/new.txt" not in got
    assert set(got) == at_risk_rels(ds["atimes"]) | {"twelve.txt"}
    text = cli("refresh", "--due", "--check", *sched)
    assert text.rc == 0 and "nothing to refresh" in text.out + text.err, text


def test_remove_deletes_the_rescue_checkpoint_and_no_copy(ds, cli):
    r, _ = rescue(cli, ds["dest"], "--all", "--max-entries", "3")
    assert r.rc == 3
    ck = ds["state"] / "checkpoints" / "rescue" / "ds.json"
    assert ck.exists()
    assert cli("remove", "--name", "ds").rc == 0
    assert not ck.exists()
    assert (ds["dest"]).exists()


def test_the_sentinel_records_rescue_to_and_a_rebuilt_registry_keeps_it(generic, cli):
    root = generic["scratch"] / "ds"
    root.mkdir()
    safe = generic["tmp"] / "safe"
    assert cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP, "--rescue-to",
               safe).rc == 0
    assert json.loads((root / sk.SENTINEL).read_text())["rescue_to"] == str(safe)
    state = generic["state"]
    (state / "registry.json").write_bytes(b'{"format": 1, "datas')
    assert not (state / "registry.json.bak").exists()      # one save only: no backup yet
    r = cli("repair")
    assert r.rc == 0, r
    assert json.loads(cli("list", "--json").out)[0]["rescue_to"] == str(safe)
    assert cli("extend", "--name", "ds", "--rescue-to", "none").rc == 0
    assert json.loads((root / sk.SENTINEL).read_text())["rescue_to"] is None
    assert [line for line in cli("doctor").out.splitlines() if "sentinel:" in line
            and not line.startswith("ok")] == []
    assert "in its sentinel" not in cli("repair", "--dry-run").out    # it is up to date


def test_rescue_to_another_filesystem_and_by_read_and_write_alone(ds, cli, shm_tmp,
                                                                  monkeypatch):
    """Onto tmpfs from the test's disk (copy_file_range may refuse across filesystems), and
    with neither copy_file_range nor sendfile: the same exact, sparse copy."""
    root = ds["root"]
    src = listing(root)
    src.pop(sk.SENTINEL)
    r, res = rescue(cli, shm_tmp / "copy", "--all")
    assert r.rc == 0, r
    assert listing(shm_tmp / "copy") == src
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    monkeypatch.delattr(os, "sendfile", raising=False)
    r, res = rescue(cli, ds["tmp"] / "plain", "--all")
    assert r.rc == 0, r
    for dest in (shm_tmp / "copy", ds["tmp"] / "plain"):
        for rel, kind in src.items():
            if kind == "file":
                assert (dest / rel).read_bytes() == (root / rel).read_bytes(), rel
        assert os.lstat(str(dest / "old" / "sparse.img")).st_blocks * 512 < 1 << 20


def test_progress_line_on_a_terminal_and_a_status_line(ds, cli, monkeypatch):
    monkeypatch.setattr(sk, "PROGRESS_SECONDS", 0.0)
    rc, text = on_a_terminal(["rescue", "--name", "ds", "--to", str(ds["dest"]), "--all"])
    assert rc == 0
    assert "\rds: rescued " in text.replace("\r\x1b[K", "\r") and " entries, " in text, text
    assert text.endswith("\r\x1b[K"), text[-40:]
    r = cli("rescue", "--name", "ds", "--to", ds["dest"])
    assert r.rc == 0 and r.err == ""                    # not a terminal: no progress
    assert cli("extend", "--name", "ds", "--rescue-to", ds["dest"]).rc == 0
    assert "rescue to:     %s" % ds["dest"] in cli("status", "--name", "ds").out


def test_br200_login_node_rescue_gets_a_budget_and_a_hint(cli, env, monkeypatch):
    monkeypatch.setenv("SCRATCH_KEEPALIVE_SCRATCH_ROOT", str(env["scratch"]))
    assert cli("init").rc == 0
    d = env["scratch"] / "ds"
    d.mkdir()
    (d / "f").write_bytes(b"x")
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    assert cli("refresh", "--name", "ds").rc == 0
    r = cli("rescue", "--name", "ds", "--to", env["tmp"] / "slate")
    assert r.rc == 0 and "login node" in r.out and "15 minutes" in r.out, r
    assert "sbatch" in r.out and (env["tmp"] / "slate" / "f").exists()
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    r = cli("rescue", "--name", "ds", "--to", env["tmp"] / "slate")
    assert r.rc == 0 and "login node" not in r.out, r


@pytest.mark.slurm
def test_real_slurm_stopped_scheduled_rescue_books_a_continuation_that_finishes_it(
        make_world):
    """Against the real Slurm test bed, as an ordinary user: a scheduled run (sbatch chain)
    whose walk completes but whose rescue the budget stops exits 3 and moves the pending
    job to an hour from now; that job, fired, finishes the rescue although no walk is due,
    and the destination holds every entry the walk found old."""
    w = make_world("br200")                # no approval: every walk is a check walk
    _, p = w.install_sbatch("--account", "r12345")     # its first run finds nothing to walk
    d = w.make_dataset(files=20)
    safe = w.root / "slate"
    safe.mkdir()
    shutil.chown(str(safe), USER, USER)
    r = w.tool("extend", "--name", "ds", "--rescue-to", safe)
    assert r.rc == 0, r
    entries = len(snapshot(d))
    cmd = "cd %s && %s refresh --due --scheduled sbatch --max-entries %d" % (
        w.state, w.command_prefix(), entries + 2)
    out = w.root / "manual"
    out.mkdir()
    shutil.chown(str(out), USER, USER)
    r = as_user(["sbatch", "--parsable", "--job-name=sk-manual",
                 "--output=%s/manual-%%j.out" % out, "--wrap", cmd])
    assert r.rc == 0, r
    f = wait_done(r.out.strip().split(";")[0])
    log = "".join(x.read_text() for x in out.glob("*.out"))
    assert f["ExitCode"] == "3:0", (f, log)
    assert "rescue: ds: copied" in log and "NOT complete" in log, log
    settle()
    assert [j["id"] for j in pending()] == [p["id"]]
    st = w.status()
    assert "pending job %s moved to start in an hour" % p["id"] in st, st
    assert len(listing(safe)) < entries - 2
    w.fire(p["id"])
    g = wait_done(p["id"])
    assert g["JobState"] == "COMPLETED", g
    want = listing(d)
    want.pop(sk.SENTINEL)
    assert listing(safe) == want
    assert not (w.state / "checkpoints" / "rescue" / "ds.json").exists()
    assert w.status_json()["last_run"]["entries_seen"] == entries      # not walked again


def test_odd_names_are_rescued_and_a_cursor_on_one_resumes_exactly(generic, cli):
    root = generic["scratch"] / "ds"
    root.mkdir()
    names = [b"caf\xe9", b"new\nline", b"sp ace", "\u00e9t\u00e9".encode(), b"-dash"]
    broot = os.fsencode(str(root))
    for n in names:
        os.mkdir(os.path.join(broot, n + b".d"))
        with open(os.path.join(broot, n + b".d", n), "wb") as f:
            f.write(n)
    for p in [Path(dp) / n for dp, dns, fns in os.walk(str(root)) for n in dns + fns]:
        set_atime(p, OLD)
    assert cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    dest = generic["tmp"] / "safe"
    codes = []
    for _ in range(20):
        r = cli("rescue", "--name", "ds", "--to", dest, "--max-entries", "1", "--json")
        codes.append(r.rc)
        if r.rc == 0:
            break
        assert r.rc == 3, r
    assert codes[-1] == 0 and len(codes) == 2 * len(names), codes    # one entry a run
    bdest = os.fsencode(str(dest))
    for n in names:
        with open(os.path.join(bdest, n + b".d", n), "rb") as f:
            assert f.read() == n
    os.chmod(os.path.join(broot, b"caf\xe9.d", b"caf\xe9"), 0o644)
    os.utime(os.path.join(bdest, b"caf\xe9.d", b"caf\xe9"), (time.time(), time.time() + 99))
    r = cli("rescue", "--name", "ds", "--to", dest, "--json")
    item = json.loads(r.out)["not_rescued"][0]
    assert item["reason"] == "newer-destination"
    assert item["path_b64"] == "Y2Fm6S5kL2NhZuk="          # caf\xe9.d/caf\xe9


def test_readme_json_section_names_every_key_rescue_prints(ds, cli):
    import re
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = re.search(r"^### JSON output\n(.*?)(?=^##)", readme, re.S | re.M).group(1)
    named = set(re.findall(r"`([a-z_0-9]+)`", section))
    docs = []
    for extra in (["--all", "--max-entries", "3"], ["--all"], ["--dry-run"]):
        r, res = rescue(cli, ds["dest"], *extra)
        docs.append(res)
    assert cli("extend", "--name", "ds", "--rescue-to", ds["dest"]).rc == 0
    docs.append(json.loads(cli("list", "--json").out))
    for doc in docs:
        stack, keys = [doc], set()
        while stack:
            x = stack.pop()
            if isinstance(x, dict):
                keys.update(x)
                stack.extend(x.values())
            elif isinstance(x, list):
                stack.extend(x)
        assert keys <= named, sorted(keys - named)


def test_a_destination_that_cannot_be_made_is_one_error_line_and_leaves_no_state(ds, cli):
    if os.geteuid() == 0:
        pytest.skip("root may create directories anywhere")
    locked = ds["tmp"] / "locked"
    locked.mkdir(mode=0o555)
    r, _ = rescue(cli, locked / "copy")
    assert r.rc == 1 and r.err.count("\n") == 1 and "cannot create" in r.err, r
    assert not (ds["state"] / "checkpoints" / "rescue").exists()


def test_a_destination_on_a_read_only_mount_is_one_error_line_and_leaves_no_state(ds, cli,
                                                                                  mounts):
    # the room check counts a sparse file at its size: leave the 64 MiB one out
    os.unlink(str(ds["root"] / "old" / "sparse.img"))
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    mnt = small_fs(ds["tmp"], mounts)
    mounts("-o", "remount,ro", mnt)
    r, _ = rescue(cli, mnt / "copy")
    assert r.rc == 1 and r.err.count("\n") == 1 and "cannot create" in r.err, r
    assert "Read-only file system" in r.err
    assert not (ds["state"] / "checkpoints" / "rescue").exists()


def _limit_fds():
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_a_tree_deeper_than_path_max_is_rescued_with_256_fds(generic, cli, tmp_path):
    """1,200 nested directories (a path beyond PATH_MAX) with a file every 100 levels: the
    rescue keeps only so many directories open, and comes back up through "..", so the
    copy is complete, every directory with its mode, with 256 fds allowed."""
    depth = 1200
    root = generic["scratch"] / "ds"
    root.mkdir()
    fd = os.open(str(root), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(depth):
            if i % 100 == 0:
                os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
            os.mkdir("level-%04d" % i, 0o750 if i % 2 else 0o700, dir_fd=fd)
            nfd = os.open("level-%04d" % i, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    dest = tmp_path / "safe"
    try:
        deep_rescue(cli, root, dest, depth)
    finally:    # shutil.rmtree (pytest's cleanup) recurses, and fails beyond ~1000 levels
        subprocess.run(["rm", "-rf", "--", str(root), str(dest)], check=True)


def deep_rescue(cli, root, dest, depth):
    assert cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    r = run_script("rescue", "--name", "ds", "--to", dest, "--all", "--json",
                   preexec_fn=_limit_fds)
    assert r.rc == 0, r
    res = json.loads(r.out)
    assert res["errors"] == 0 and res["dirs_created"] == depth
    assert res["entries_copied"] == depth // 100 + 1

    def kinds(top):
        out = subprocess.run(["find", str(top), "-mindepth", "1", "-not", "-name", sk.SENTINEL,
                              "-printf", "%d %y %m\\n"], stdout=subprocess.PIPE,
                             check=True).stdout.decode().splitlines()
        return sorted(out)
    assert kinds(dest) == kinds(root)


def test_a_local_rescue_reads_ahead_opening_sources_only_without_moving_atimes(generic, cli,
                                                                               tmp_path):
    """On a local disk the copy asks for the next files' data ahead (posix_fadvise
    WILLNEED) while it writes one: every source file it opens, for that or for the copy, is
    opened O_NOATIME|O_NOFOLLOW, each hint is on such a file, and no access time moves."""
    if not shutil.which("strace"):
        pytest.skip("strace is not installed")
    root = generic["scratch"] / "ds"
    for d in range(3):
        (root / ("d%d" % d)).mkdir(parents=True)
        for f in range(40):
            (root / ("d%d" % d) / ("f%02d" % f)).write_bytes(os.urandom(4096 + f))
    for dp, dns, fns in os.walk(str(root)):
        for n in dns + fns:
            set_atime(os.path.join(dp, n), OLD)
    assert cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    before = snapshot(root)
    trace = tmp_path / "trace"
    r = run_script("rescue", "--name", "ds", "--to", tmp_path / "safe", "--all",
                   prefix=["strace", "-f", "-qq", "-e", "trace=openat,fadvise64", "-o",
                           str(trace)])
    assert r.rc == 0, r
    opened, hinted = {}, []
    for line in trace.read_text().splitlines():
        call = line.split(None, 1)[1]
        if call.startswith("openat(") and '"f' in call and " = " in call:
            assert "O_NOATIME" in call and "O_NOFOLLOW" in call and "O_RDONLY" in call, call
            opened[call.rsplit(" = ", 1)[1]] = call
        elif call.startswith("fadvise64("):
            fd = call[len("fadvise64("):].split(",", 1)[0]
            assert fd in opened and "POSIX_FADV_WILLNEED" in call, call
            hinted.append(call)
    assert len(hinted) >= 3 * 39, len(hinted)        # all but each directory's first file
    assert snapshot(root) == before
    assert sorted(os.listdir(str(tmp_path / "safe" / "d1"))) == ["f%02d" % f for f in range(40)]


def test_a_checkpoint_with_the_older_cursor_a_list_of_names_is_resumed(ds, cli):
    """A rescue checkpoint written before a copy's cursor was a walk's position holds the
    last entry's names as a list: it is taken up where it says."""
    dest = ds["dest"]
    r, first = rescue(cli, dest, "--all", "--max-entries", "4")
    assert r.rc == 3, r
    path = ds["state"] / "checkpoints" / "rescue" / "ds.json"
    ck = json.loads(path.read_text())
    ck["cursor"] = ck["cursor"]["path"]
    path.write_text(json.dumps(ck))
    r, second = rescue(cli, dest, "--all")
    assert r.rc == 0 and second["resumed"] is True, r
    assert first["entries_done"] + second["entries_done"] == len(listing(dest))
    assert second["entries_skipped"] == 0
