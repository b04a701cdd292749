"""Containment: the walk and the sentinel stay inside the dataset.

  * a symlinked parent: a symlink between the scratch root and the dataset root is refused
    by refresh, repair, remove and doctor (a project moved away, a link to /dev/shm left);
  * bind mounts: a bind mount inside a dataset (same filesystem: st_dev cannot see it) is
    neither entered nor touched, in every engine;
  * the sentinel: a FIFO at its path never blocks a command; it is rewritten by one pwrite
    of a fixed length, never truncated, and a failure (RLIMIT_FSIZE, a full filesystem) or
    a kill -9 at any point leaves a file the tool still recognises;
  * other owners: entries of another owner (a real other user, `nobody`) are not attempted
    in touch mode, but counted; directories of another owner listed in check mode are
    counted, and their stat comes from before the listing, in every engine.

Real files, real mounts (root only; skipped elsewhere) and real processes throughout.
"""

import json
import os
import random
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import (KEEP, NOW, SCRIPT, give_to_nobody, poll, run_as_nobody, run_script,
                      set_atime, sk, tool_env)

OLD_NS = 1577836800 * 10 ** 9          # 2020-01-01
ENGINES = [("serial", ("--workers", "1")), ("threads", ("--threads", "4")),
           ("processes", ("--workers", "2"))]
TIMEOUT = 30                            # a command that blocks on a FIFO fails the test


@pytest.fixture(params=[e[1] for e in ENGINES], ids=[e[0] for e in ENGINES])
def engine(request):
    return list(request.param)


def tool(env, *argv, **kw):
    """The tool in a subprocess with env (tool_env) as its whole environment."""
    return run_script(*argv, env=env, clean=True, **dict({"timeout": TIMEOUT}, **kw))


def age_all(root):
    """Every entry below and including root gets the 2020 atime. Bottom-up, so that no
    directory is listed (which would move its atime again) after its atime was set."""
    for dirpath, dirnames, filenames in os.walk(str(root), topdown=False):
        for n in dirnames + filenames:
            set_atime(os.path.join(dirpath, n), ns=OLD_NS)
    set_atime(root, ns=OLD_NS)


def only_result(r):
    doc = json.loads(r.out)
    assert len(doc["results"]) == 1, doc
    return doc["results"][0]


def check_of(r, name):
    doc = json.loads(r.out)
    return [c for c in doc["checks"] if c["name"] == name]


class World(object):
    """A state dir and a scratch root with one dataset `ds` at scratch/proj/ds."""

    def __init__(self, base, dataset="proj/ds"):
        self.base = Path(base)
        self.state = self.base / "state"
        self.scratch = self.base / "scratch"
        self.ds = self.scratch / dataset
        self.ds.mkdir(parents=True)
        self.env = tool_env(self.state)
        assert self.run("init", "--profile", "generic", "--scratch-root", self.scratch).rc == 0

    def run(self, *argv, **kw):
        return tool(self.env, *argv, **kw)

    def add(self, name="ds", path=None):
        r = self.run("add", "--name", name, "--path", path or self.ds, "--keep-until", KEEP)
        assert r.rc == 0, r
        return r

    def registry(self):
        return json.loads((self.state / "registry.json").read_text())

    @property
    def sentinel(self):
        return self.ds / ".scratch-keepalive"


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


@pytest.fixture
def shm():
    """A directory on another filesystem (tmpfs), where a moved project's link may point."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = tempfile.mkdtemp(prefix="sk-contain-", dir=base)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- a symlinked parent


def symlinked_parent(world, shm):
    """The project moved away, a symlink to /dev/shm left behind."""
    world.add()
    secret = shm / "v" / "ds" / "secret"
    secret.mkdir(parents=True)
    (secret / "file").write_bytes(b"s\n")
    set_atime(secret / "file", ns=OLD_NS)
    set_atime(secret, ns=OLD_NS)
    set_atime(shm / "v" / "ds", ns=OLD_NS)
    os.rename(str(world.scratch / "proj"), str(world.scratch / "proj.moved"))
    os.symlink(str(shm / "v"), str(world.scratch / "proj"))
    return shm / "v" / "ds"


def test_refresh_refuses_a_dataset_behind_a_symlinked_parent(world, shm):
    outside = symlinked_parent(world, shm)
    before = dict((p, os.lstat(str(p))) for p in (outside, outside / "secret",
                                                  outside / "secret" / "file"))
    reg = world.registry()
    env = dict(world.env, SCRATCH_KEEPALIVE_NOW="2027-06-01T00:00:00Z")
    for argv in (("--name", "ds"), ()):
        r = tool(env, "refresh", *argv)
        assert r.rc == 1, r
        assert "symlink" in r.out and str(world.scratch / "proj") in r.out, r
        assert "Traceback" not in r.err
    for p, st in before.items():
        now = os.lstat(str(p))
        assert (now.st_atime_ns, now.st_mtime_ns) == (st.st_atime_ns, st.st_mtime_ns), p
    assert not os.path.lexists(str(outside / ".scratch-keepalive"))
    assert world.registry() == reg                  # nothing recorded
    assert not (world.state / "checkpoints" / "ds.json").exists()


def test_doctor_names_the_symlink_and_repair_writes_no_sentinel_through_it(world, shm):
    outside = symlinked_parent(world, shm)
    r = world.run("doctor", "--json")
    assert r.rc == 1, r
    (c,) = check_of(r, "root:ds")
    assert not c["ok"] and "symlink" in c["message"], c
    assert str(world.scratch / "proj") in c["message"], c
    r = world.run("repair")
    assert r.rc == 0, r
    assert "symlink" in r.out and "no sentinel is written" in r.out, r
    assert not os.path.lexists(str(outside / ".scratch-keepalive"))


def test_remove_never_deletes_a_file_through_a_symlinked_parent(world, shm):
    outside = symlinked_parent(world, shm)
    # A sentinel of ours on the far side of the symlink (a copy of the real one).
    shutil.copy(str(world.scratch / "proj.moved" / "ds" / ".scratch-keepalive"),
                str(outside / ".scratch-keepalive"))
    r = world.run("remove", "--name", "ds")
    assert r.rc == 0, r
    assert "sentinel deleted" not in r.out, r
    assert os.path.exists(str(outside / ".scratch-keepalive"))
    assert "ds" not in world.registry()["datasets"]


def test_scratch_root_itself_may_be_reached_through_a_symlink(tmp_path):
    real = tmp_path / "real"
    (real / "ds" / "sub").mkdir(parents=True)
    (real / "ds" / "sub" / "f").write_bytes(b"x")
    os.symlink(str(real), str(tmp_path / "scratch"))
    env = tool_env(tmp_path / "state")
    assert tool(env, "init", "--profile", "generic", "--scratch-root",
                tmp_path / "scratch").rc == 0
    r = tool(env, "add", "--name", "ds", "--path", tmp_path / "scratch" / "ds", "--keep-until",
             KEEP)
    assert r.rc == 0, r
    r = tool(env, "refresh", "--name", "ds", "--json")
    assert r.rc == 0, r
    assert only_result(r)["entries_seen"] == 4      # root, sentinel, sub, sub/f
    r = tool(env, "doctor", "--json")
    named = dict((c["name"], c) for c in json.loads(r.out)["checks"])
    for name in ("root:ds", "location:ds", "sentinel:ds"):
        assert named.get(name, {"ok": True})["ok"], r
    assert named["root:ds"]["level"] == "ok", r
    # open_dataset_root also takes a path recorded against the symlink (a rebuilt registry)
    fd = sk.open_dataset_root(str(tmp_path / "scratch" / "ds"), str(tmp_path / "scratch"))
    os.close(fd)


def test_the_walk_keeps_to_the_root_it_opened_when_a_parent_is_swapped(world, shm):
    """A symlink swapped in after the root was opened: the walk goes on from the fd, into
    the directory it opened, never into the symlink's target."""
    world.add()
    (world.ds / "mine").write_bytes(b"m")
    (shm / "ds").mkdir()
    (shm / "ds" / "mine").write_bytes(b"elsewhere")
    age_all(world.ds)
    age_all(shm / "ds")
    fd = sk.open_dataset_root(str(world.ds), str(world.scratch))
    try:
        os.rename(str(world.scratch / "proj"), str(world.scratch / "proj.moved"))
        os.symlink(str(shm), str(world.scratch / "proj"))
        now = time.time()
        w = sk.Walker(str(world.ds), "touch", (int(now * 1e9),) * 3, root_fd=fd)
        try:
            assert w.run() is True
        finally:
            w.close()
    finally:
        os.close(fd)
    assert w.counts.entries_touched == 3            # root, sentinel, mine: the moved ones
    assert os.lstat(str(shm / "ds" / "mine")).st_atime_ns == OLD_NS
    assert os.lstat(str(shm / "ds")).st_atime_ns == OLD_NS
    assert os.lstat(str(world.scratch / "proj.moved" / "ds" / "mine")).st_atime_ns != OLD_NS


# --------------------------------------------------------------------------- bind mounts


def test_mountinfo_octal_escapes_are_decoded():
    assert sk.decode_mountinfo_path(b"/a\\040b\\011c\\012d\\134e") == b"/a b\tc\nd\\e"
    assert sk.decode_mountinfo_path(b"/plain") == b"/plain"


MOUNTINFO = (
    b"22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    b"30 22 0:25 / /mnt/a\\040b\\011c\\012d\\134e rw shared:5 master:2 - tmpfs my\\040src rw\n"
    b"31 22 0:26 / /lus rw - lustre 10.0.0.1@o2ib:/scratch rw,flock\n"
    b"32 31 0:26 /sub /lus/inner rw - lustre 10.0.0.1@o2ib:/scratch rw\n"
    b"garbage line\n")


def test_one_mountinfo_reader_decodes_every_field_and_finds_the_innermost_mount(tmp_path):
    """read_mountinfo (mount_of, fs_type and the walker's mount_tree all read through it):
    optional fields of any number, every octal escape of the mount point and source."""
    info = tmp_path / "mountinfo"
    info.write_bytes(MOUNTINFO)
    mounts = sk.read_mountinfo(str(info))
    assert mounts[1] == (b"/mnt/a b\tc\nd\\e", b"my src", b"tmpfs")
    assert len(mounts) == 4
    odd = "/mnt/a b\tc\nd\\e"
    assert sk.mount_of(odd + "/x", str(info)) == (odd, "my src", "tmpfs")
    assert sk.mount_of(odd + "x", str(info))[0] == "/"       # a sibling's name, not below
    assert sk.mount_of("/lus/inner/f", str(info))[0] == "/lus/inner"
    assert sk.mount_of("/lus/innerf", str(info))[0] == "/lus"
    assert sk.read_mountinfo(str(tmp_path / "absent")) == []
    assert sk.mount_of("/x", str(tmp_path / "absent")) is None


def test_a_real_mount_point_with_a_space_tab_backslash_and_newline(tmp_path, mounts):
    odd = tmp_path / "sp ace\ttab\\back\nline"
    odd.mkdir()
    mounts("-t", "tmpfs", "-o", "size=1m", "tmpfs", odd)
    assert sk.mount_of(str(odd / "f")) == (str(odd), "tmpfs", "tmpfs")
    assert sk.fs_type(str(odd)) == "tmpfs"
    fd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert sk.mount_tree(fd) == {(): {os.fsencode(odd.name)}}
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", ["touch", "check"])
def test_bind_mounts_inside_a_dataset_are_skipped_in_every_engine(world, mounts, engine, mode):
    """Bind mounts of the same filesystem (st_dev is the root's): a directory from outside
    the dataset, a directory from inside it, and a file, under names mountinfo escapes."""
    outside = world.scratch / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "file").write_bytes(b"outside the dataset")
    (outside / "lone").write_bytes(b"a file bind-mounted onto another")
    ds = world.ds
    (ds / "src").mkdir()
    (ds / "src" / "x").write_bytes(b"x")
    (ds / "f").write_bytes(b"f")
    odd = "bind me\there"
    (ds / odd).mkdir()
    (ds / "again").mkdir()
    (ds / "fmnt").write_bytes(b"under the file mount")
    world.add()
    mounts("--bind", outside, ds / odd)
    mounts("--bind", ds / "src", ds / "again")
    mounts("--bind", outside / "lone", ds / "fmnt")
    assert os.lstat(str(ds / odd)).st_dev == os.lstat(str(ds)).st_dev
    age_all(outside)
    age_all(ds)                     # through the mounts too: all 2020
    watched = [outside, outside / "deep", outside / "deep" / "file", outside / "lone"]
    r = world.run("refresh", "--name", "ds", "--json", *(["--check"] if mode == "check"
                                                         else []), *engine)
    assert r.rc == 0, r
    res = only_result(r)
    # root, sentinel, again, bind me\there, f, fmnt, src, src/x: the three mounts skipped
    assert res["entries_seen"] == 8, res
    if mode == "touch":
        assert res["entries_skipped"] == 3 and res["entries_touched"] == 5, res
    else:
        assert res["entries_at_risk"] == 5, res
    for p in watched:
        assert os.lstat(str(p)).st_atime_ns == OLD_NS, p
    # src itself is walked (only the mount of it is not)
    if mode == "touch":
        assert os.lstat(str(ds / "src" / "x")).st_atime_ns != OLD_NS


# --------------------------------------------------------------------------- the sentinel


def make_fifo_sentinel(world):
    world.sentinel.unlink()
    os.mkfifo(str(world.sentinel))


@pytest.mark.parametrize("command", ["refresh", "doctor", "repair", "remove"])
def test_a_fifo_at_the_sentinel_path_never_blocks(world, command):
    world.add()
    (world.ds / "f").write_bytes(b"f")
    make_fifo_sentinel(world)
    argv = {"refresh": ("refresh", "--name", "ds"), "doctor": ("doctor",),
            "repair": ("repair",), "remove": ("remove", "--name", "ds")}[command]
    r = world.run(*argv)            # TimeoutExpired (the old behaviour) fails the test
    assert "Traceback" not in r.err, r
    if command == "refresh":
        assert r.rc == 0, r
    elif command == "doctor":
        assert r.rc == 1 and "FIFO" in r.out, r
    elif command == "repair":
        assert r.rc == 0 and "not ours" in r.out and "FIFO" in r.out, r
    else:
        assert r.rc == 0 and "sentinel deleted" not in r.out, r
    assert stat.S_ISFIFO(os.lstat(str(world.sentinel)).st_mode)


def test_add_refuses_a_fifo_at_the_sentinel_path_without_blocking(world):
    os.mkfifo(str(world.sentinel))
    r = world.run("add", "--name", "ds", "--path", world.ds, "--keep-until", KEEP)
    assert r.rc == 2, r
    assert r.err.startswith("scratch-keepalive: error: ") and "not a regular file" in r.err, r
    assert not (world.state / "registry.json").exists() or not world.registry()["datasets"]
    assert stat.S_ISFIFO(os.lstat(str(world.sentinel)).st_mode)


def test_the_sentinel_is_fixed_size_and_rewritten_in_place(world):
    world.add()
    (world.ds / "f").write_bytes(b"f")
    st0 = os.lstat(str(world.sentinel))
    assert st0.st_size == sk.SENTINEL_SIZE
    raw0 = world.sentinel.read_bytes()
    root0 = os.lstat(str(world.ds))
    r = world.run("refresh", "--name", "ds")        # a complete touch walk rewrites it
    assert r.rc == 0, r
    st1, root1 = os.lstat(str(world.sentinel)), os.lstat(str(world.ds))
    raw1 = world.sentinel.read_bytes()
    assert raw1 != raw0 and json.loads(raw1.decode())["last_refresh"]
    assert (st1.st_ino, st1.st_size) == (st0.st_ino, sk.SENTINEL_SIZE)
    assert root1.st_mtime_ns == root0.st_mtime_ns   # no temp file, no rename in the root
    assert raw1.endswith(b" \n") and raw1.startswith(b'{"tool": "scratch-keepalive", ')


def old_sentinel(world, name="ds"):
    """A sentinel as version 1.0.0 wrote it: indented JSON of its own length."""
    doc = {"tool": "scratch-keepalive", "format": 1, "name": name, "added": NOW,
           "last_refresh": None, "about": "written by 1.0.0"}
    world.sentinel.write_bytes((json.dumps(doc, sort_keys=True, indent=2) + "\n").encode())
    return doc


def test_an_old_variable_size_sentinel_is_read_and_padded_on_rewrite(world):
    world.add()
    old_sentinel(world)
    assert sk.read_sentinel(str(world.ds))["about"] == "written by 1.0.0"
    r = world.run("doctor", "--json")
    assert all(c["ok"] for c in check_of(r, "sentinel:ds")), r
    assert world.run("refresh", "--name", "ds").rc == 0
    assert os.lstat(str(world.sentinel)).st_size == sk.SENTINEL_SIZE
    assert sk.read_sentinel(str(world.ds))["name"] == "ds"


def rewrite_under_fsize_limit(world, limit):
    """update_sentinel in a process whose RLIMIT_FSIZE is `limit` bytes."""
    code = ("import sys, resource; sys.path.insert(0, %r); import scratch_keepalive as sk; "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (%d, %d)); "
            "ds = {'name': 'ds', 'added': 'x', 'last_refresh': '2031-01-01T00:00:00Z'}; "
            "print(sk.update_sentinel(%r, ds))" % (str(SCRIPT.parent), limit, limit,
                                                    str(world.ds)))
    p = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    return p.stdout.decode().strip()


@pytest.mark.parametrize("layout", ["old", "fixed"])
@pytest.mark.parametrize("limit", [0, 50, 700])
def test_a_rewrite_cut_short_by_rlimit_fsize_leaves_a_sentinel_of_ours(world, layout, limit):
    world.add()
    if layout == "old":
        old_sentinel(world)
    rewrite_under_fsize_limit(world, limit)
    doc = sk.read_sentinel(str(world.ds))
    assert doc is not None and doc["name"] == "ds", world.sentinel.read_bytes()[:200]
    r = world.run("doctor", "--json")
    assert all(c["ok"] for c in check_of(r, "sentinel:ds")), r
    # and the next rewrite without a limit restores the whole document
    assert rewrite_under_fsize_limit(world, resource.RLIM_INFINITY) == "True"
    assert sk.read_sentinel(str(world.ds))["last_refresh"] == "2031-01-01T00:00:00Z"


def test_a_rewrite_on_a_full_filesystem_keeps_the_sentinel(tmp_path, mounts):
    small = tmp_path / "small"
    small.mkdir()
    mounts("-t", "tmpfs", "-o", "size=256k", "tmpfs", small)
    ds = small / "ds"
    ds.mkdir()
    env = tool_env(tmp_path / "state")
    assert tool(env, "init", "--profile", "generic", "--scratch-root", small).rc == 0
    assert tool(env, "add", "--name", "ds", "--path", ds, "--keep-until", KEEP).rc == 0
    fd = os.open(str(small / "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:                                            # fill it up
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        (small / "more").write_bytes(b"x" * 8192)
    r = tool(env, "refresh", "--name", "ds", "--json")
    assert r.rc == 0, r
    doc = sk.read_sentinel(str(ds))
    assert doc is not None and doc["last_refresh"], doc
    assert os.lstat(str(ds / ".scratch-keepalive")).st_size == sk.SENTINEL_SIZE


def test_kill_9_during_repeated_rewrites_always_leaves_a_sentinel_of_ours(world):
    world.add()
    code = ("import sys; sys.path.insert(0, %r); import scratch_keepalive as sk\n"
            "sys.stdout.write('go\\n'); sys.stdout.flush()\n"
            "import os; done = os.open(sys.argv[1], os.O_WRONLY)\n"
            "i = 0\n"
            "while True:\n"
            "    i += 1\n"
            "    sk.update_sentinel(%r, {'name': 'ds', 'added': 'x' * (i %% 300),\n"
            "                            'last_refresh': str(i)})\n"
            "    os.pwrite(done, b'%%12d' %% i, 0)\n"
            % (str(SCRIPT.parent), str(world.ds)))
    # Killed once it has done a (seeded) number of rewrites: where in a rewrite the kill
    # lands is up to the scheduler, and no sleep guesses how long a rewrite takes.
    rng = random.Random(9)
    done = world.base / "rewrites-done"
    for _ in range(40):
        done.write_bytes(b"%12d" % 0)
        at_least = rng.randint(1, 40)
        p = subprocess.Popen([sys.executable, "-c", code, str(done)], stdout=subprocess.PIPE)
        assert p.stdout.readline() == b"go\n"
        poll(lambda: int(done.read_bytes() or b"0") >= at_least or p.poll() is not None,
             "%d rewrites" % at_least)
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        doc = sk.read_sentinel(str(world.ds))
        assert doc is not None and doc["name"] == "ds", world.sentinel.read_bytes()[:100]
        assert os.lstat(str(world.sentinel)).st_size == sk.SENTINEL_SIZE
    r = world.run("doctor", "--json")
    assert all(c["ok"] for c in check_of(r, "sentinel:ds")), r


def test_the_largest_sentinel_document_fits(world):
    """Name of 64 characters, and what lane `state` adds: keep-until, cadence, an approval
    of 500 printable characters (the worst: astral ones, 4 bytes of UTF-8 each)."""
    name = "n" * 64
    doc = sk.sentinel_doc({"name": name, "added": NOW, "last_refresh": NOW})
    doc.update({"keep_until": "2099-12-31", "cadence_days": 99999,
                "approval": "\U0001F600" * 500, "last_refresh_start": NOW})
    data = sk.encode_sentinel(doc)
    assert len(data) == sk.SENTINEL_SIZE
    assert sk.decode_sentinel(data) == doc


def test_a_document_that_would_not_fit_fails_clearly_and_writes_nothing(world, monkeypatch):
    big = {"name": "ds", "approval": "x" * sk.SENTINEL_SIZE}
    with pytest.raises(sk.Failure) as e:
        sk.encode_sentinel(dict(big, tool=sk.PROG))
    assert "more than the" in str(e.value) and "ds" in str(e.value)
    monkeypatch.setattr(sk, "sentinel_doc", lambda ds: dict(big, tool=sk.PROG))
    with pytest.raises(sk.Failure):
        sk.create_sentinel(str(world.ds), {"name": "ds"})
    assert not os.path.lexists(str(world.sentinel))


# --------------------------------------------------------------------------- other owners


class Shared(object):
    """A dataset owned by `nobody` (who runs the tool), holding entries owned by root."""

    def __init__(self, base):
        self.state, self.scratch, home = base / "state", base / "scratch", base / "home"
        self.as_nobody = run_as_nobody(home, self.state)
        self.env = self.as_nobody.env
        self.root = self.scratch / "ds"
        for d in (home, self.root / "mine", self.root / "theirs"):
            d.mkdir(parents=True)
        for rel in ("mine/a", "theirs/b", "theirs/c", "t_file"):
            (self.root / rel).write_bytes(b"data")
        give_to_nobody(base, keep=[self.root / rel
                                   for rel in ("theirs", "theirs/b", "theirs/c", "t_file")])
        os.chmod(str(self.root / "theirs"), 0o755)
        assert self.run("init", "--profile", "generic", "--scratch-root", self.scratch).rc == 0
        assert self.run("add", "--name", "ds", "--path", self.root, "--keep-until",
                        KEEP).rc == 0
        age_all(self.root)

    def run(self, *argv):
        return self.as_nobody(*argv, timeout=TIMEOUT)


def test_touch_mode_does_not_attempt_entries_of_another_owner(world_tmp, engine):
    sh = Shared(world_tmp)
    r = sh.run("refresh", "--name", "ds", "--json", *engine)
    assert r.rc == 0, r
    res = only_result(r)
    # root, sentinel, mine, mine/a, t_file, theirs, theirs/b, theirs/c
    assert res["entries_seen"] == 8, res
    assert res["errors"] == 0 and res["entries_touched"] == 4, res
    assert res["entries_not_owned"] == 4 and res["entries_at_risk_not_owned"] == 4, res
    for rel in ("theirs/b", "theirs/c", "t_file"):
        assert os.lstat(str(sh.root / rel)).st_atime_ns == OLD_NS, rel
    for rel in ("mine", "mine/a"):
        assert os.lstat(str(sh.root / rel)).st_atime_ns != OLD_NS, rel
    age_all(sh.root)
    r = sh.run("refresh", "--name", "ds", *engine)
    assert r.rc == 0, r
    assert "4 entries of other users not refreshed" in r.out and "4 of them at risk" in r.out, r


def test_check_mode_counts_directories_of_another_owner_stat_before_listing(world_tmp,
                                                                           engine):
    """`theirs` (root's, old) must be listed without O_NOATIME, which moves its atime: it is
    counted, and it is still at risk, its stat taken before the listing."""
    sh = Shared(world_tmp)
    # The policy clock at the real time, so that an atime moved by the listing (to now)
    # would no longer count as at risk.
    sh.env["SCRATCH_KEEPALIVE_NOW"] = sk.iso(time.time())
    mine_before = dict((rel, os.lstat(str(sh.root / rel)).st_atime_ns)
                       for rel in ("", "mine", "mine/a"))
    r = sh.run("refresh", "--name", "ds", "--check", "--json", *engine)
    assert r.rc == 0, r
    res = only_result(r)
    assert res["dirs_listed_not_owned"] == 1, res
    assert res["entries_seen"] == 8 and res["entries_at_risk"] == 8, res
    assert res["entries_not_owned"] == 0, res
    for rel, atime in mine_before.items():
        assert os.lstat(str(sh.root / rel)).st_atime_ns == atime, rel
    r = sh.run("refresh", "--name", "ds", "--check", *engine)
    assert "1 directory of other users had to be listed" in r.out, r
