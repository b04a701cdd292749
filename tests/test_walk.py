"""Tests of the walk: what a refresh visits, in which order, what it changes and what it must not.

Everything here uses real files and real processes: FIFOs, sockets, devices, symlink loops,
non-UTF-8 names, a directory denied to an unprivileged user, a tmpfs mounted inside a dataset,
a tree deeper than PATH_MAX, 100,000 entries in one directory, walks killed with SIGKILL,
SIGTERM and SIGINT, a lock held by a stopped process, and peak RSS measured with wait4().

Two traps shape the helpers below:
  * Listing a directory moves its atime (relatime moves it when it is older than a day), so
    the tests never list a dataset except through O_NOATIME descriptors (``scan``): os.walk
    or conftest's snapshot() would themselves change what is being checked.
  * utimensat(UTIME_NOW) stamps the coarse kernel clock, which may lag time.time_ns() by a
    tick, so "touched during the run" allows CLOCK_SLACK_NS before the run's start.

The big trees (200k, 20k and 100k-in-one-directory) are built once per module, on tmpfs
(/dev/shm) where it exists because creating files there is several times faster; each test
registers them in its own state directory.

The walk has three engines (serial; --threads N; --workers N forked worker processes) and the
default depends on the CPU count, so the tests that check what a walk does run under each one
explicitly (the `engine` fixture) rather than under whatever this machine defaults to.
"""

import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import (DAY, KEEP, NOW, NOW_EPOCH, SCRIPT, give_to_nobody, go_on,  # noqa: F401
                      pause_env, pause_shim, poll, reaped, run_as_nobody, run_script,
                      set_atime, sk, start_script, tool_env, wait_stopped)

NOW_NS = int(NOW_EPOCH) * 10 ** 9
DAY_NS = DAY * 10 ** 9
OLD_NS = 1577836800 * 10 ** 9          # 2020-01-01: old by policy AND in the real past
CLOCK_SLACK_NS = 50 * 10 ** 6          # coarse kernel clock vs time.time_ns()
O_NOATIME = getattr(os, "O_NOATIME", 0)
GENERIC_CFG = {"profile": "generic", "purge_days": 30}
SENTINEL = (b".scratch-keepalive",)
ENGINES = [("serial", ("--workers", "1")), ("threads", ("--threads", "4")),
           ("processes", ("--workers", "2"))]


@pytest.fixture(params=[e[1] for e in ENGINES], ids=[e[0] for e in ENGINES])
def engine(request):
    """refresh options selecting one walk engine."""
    return list(request.param)


@pytest.fixture(params=[e[1] for e in ENGINES if e[0] != "threads"],
                ids=[e[0] for e in ENGINES if e[0] != "threads"])
def engine_sp(request):
    """refresh options selecting the serial or the multi-process engine."""
    return list(request.param)


def days_ago(days, extra_ns=0):
    """An atime `days` policy days before NOW (minus extra_ns), in ns."""
    return NOW_NS - int(days * DAY_NS) - extra_ns


# --------------------------------------------------------------------------- helpers: files


def fsb(path):
    return path if isinstance(path, bytes) else os.fsencode(str(path))


def join(root, comps):
    return b"/".join([fsb(root)] + list(comps))


def open_dir_quietly(name, dir_fd=None):
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    kw = {} if dir_fd is None else {"dir_fd": dir_fd}
    try:
        return os.open(name, flags | O_NOATIME, **kw)
    except PermissionError:
        return os.open(name, flags, **kw)


def scan(root, cross_devices=True):
    """{components (tuple of bytes): lstat} of every entry, root = (), in the contract's order.

    Depth-first, each directory's names in byte order, symlinks never followed; directories
    are listed through O_NOATIME descriptors (an explicit stack of them, so the depth is
    unbounded and no path ever exceeds PATH_MAX). Unreadable directories are listed as
    entries without children.
    """
    root_b = fsb(root)
    root_st = os.lstat(root_b)
    out = {(): root_st}
    fd = open_dir_quietly(root_b)
    stack = [((), fd, iter(sorted(os.fsencode(n) for n in os.listdir(fd))))]
    try:
        while stack:
            comps, fd, names = stack[-1]
            name = next(names, None)
            if name is None:
                os.close(fd)
                stack.pop()
                continue
            path = comps + (name,)
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            out[path] = st
            if stat.S_ISDIR(st.st_mode) and (cross_devices or st.st_dev == root_st.st_dev):
                try:
                    sub = open_dir_quietly(name, fd)
                except PermissionError:
                    continue
                stack.append((path, sub, iter(sorted(os.fsencode(n)
                                                     for n in os.listdir(sub)))))
    finally:
        for _, fd, _ in stack:
            os.close(fd)
    return out


def quiet_snapshot(root, cross_devices=True):
    """{components: (atime_ns, mtime_ns, size, mode)}, taken without moving any atime."""
    return dict((k, (st.st_atime_ns, st.st_mtime_ns, st.st_size, st.st_mode))
                for k, st in scan(root, cross_devices).items())


def os_walk_count(root):
    """The number of entries (root included) as os.walk sees them: an independent count."""
    n = 1
    for _, dirnames, filenames in os.walk(str(root)):
        n += len(dirnames) + len(filenames)
    return n


def read_quietly(path):
    fd = os.open(path, os.O_RDONLY | O_NOATIME | os.O_NOFOLLOW)
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def make_fifo(path):
    os.mkfifo(path)


def make_socket(path):
    """A unix socket file bound at path (bound from its directory: sun_path is 108 bytes)."""
    path = fsb(path)
    d, name = os.path.split(path)
    old = os.getcwd()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.chdir(d)
        s.bind(name)
    finally:
        os.chdir(old)
        s.close()


def rm_rf(path):
    """Delete a tree of any depth (shutil.rmtree recurses and fails beyond ~1000 levels)."""
    subprocess.run(["rm", "-rf", "--", str(path)], check=True)


def state_digest(state_dir):
    """{relative path: sha256 or 'dir'} of everything in a state directory."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(str(state_dir)):
        for n in dirnames:
            out[os.path.relpath(os.path.join(dirpath, n), str(state_dir))] = "dir"
        for n in filenames:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, str(state_dir))] = hashlib.sha256(f.read()).hexdigest()
    return out


# --------------------------------------------------------------------------- helpers: running


def only_result(r):
    """The single dataset result of `refresh --json`."""
    doc = json.loads(r.out)
    assert len(doc["results"]) == 1, doc
    return doc["results"][0]


def cursor_position(order, cursor):
    """Index in `order` of the last entry a cursor says is done."""
    path = tuple(sk.decode_name(c) if isinstance(c, str) else c for c in cursor["path"])
    i = order.index(path)
    if not cursor["subtree_done"]:
        return i
    j = i
    while j + 1 < len(order) and order[j + 1][:len(path)] == path:
        j += 1
    return j


class State(object):
    """One state directory with one dataset `ds`, driven through real processes."""

    def __init__(self, state, scratch, path):
        self.state = Path(state)
        self.path = Path(path)
        self.env = tool_env(state)
        r = self.run("init", "--profile", "generic", "--scratch-root", scratch)
        assert r.rc == 0, r
        r = self.run("add", "--name", "ds", "--path", path, "--keep-until", KEEP)
        assert r.rc == 0, r

    def run(self, *argv, **kw):
        return run_script(*argv, env=self.env, clean=True, **kw)

    def refresh(self, *argv, **kw):
        r = self.run("refresh", "--name", "ds", "--json", *argv, **kw)
        assert r.rc in (0, 1, 3, 130), r
        return r, only_result(r)

    def popen(self, *argv, held_at=None, shim=None):
        """A refresh in its own process group (so a signal can reach its workers too);
        held_at: held (the pause shim) where its main process opens that directory."""
        env = self.env if held_at is None else pause_env(self.env, shim, "open", held_at)
        return start_script("refresh", "--name", "ds", "--json", *argv, env=env)

    @property
    def checkpoint_path(self):
        return self.state / "checkpoints" / "ds.json"

    def checkpoint(self):
        """The checkpoint document, or None when there is none (a torn file fails the test)."""
        try:
            raw = self.checkpoint_path.read_bytes()
        except FileNotFoundError:
            return None
        return json.loads(raw.decode("ascii"))

    def status(self):
        r = self.run("status", "--name", "ds", "--json")
        assert r.rc == 0, r
        return json.loads(r.out)


def in_process_refresh(cli, *argv):
    r = cli("refresh", "--name", "ds", "--json", *argv)
    assert r.rc in (0, 1, 3), r
    return r, only_result(r)


def register(cli, path, name="ds"):
    r = cli("add", "--name", name, "--path", path, "--keep-until", KEEP)
    assert r.rc == 0, r


# --------------------------------------------------------------------------- 1. order and counts


@pytest.fixture
def zoo(generic):
    """A dataset with every kind of entry and names whose byte order differs from other orders."""
    root = generic["scratch"] / "zoo"
    root.mkdir()
    for d in ("B", "a", "a-", "a0", "a/sub", "a/sub/deeper", "empty", "z\xe9", "10", "9"):
        (root / d).mkdir()
    for f in ("a.b", "a/x", "a/sub/y", "a/sub/deeper/z", "a/Y", "10/f", "9/f", "z\xe9/f",
              "_f", "Zf"):
        (root / f).write_bytes(b"data " + f.encode("utf-8"))
    os.symlink("a/x", str(root / "link"))
    os.symlink("/nonexistent/target", str(root / "a" / "dangling"))
    make_fifo(str(root / "fifo"))
    make_fifo(str(root / "a" / "sub" / "fifo2"))
    make_socket(str(root / "sock"))
    try:
        os.mknod(str(root / "chardev"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        pass                    # not root: the tree simply has no device
    return generic, root


def test_walk_visits_every_kind_of_entry_once_matching_os_walk(zoo, cli, engine):
    env, root = zoo
    register(cli, root)
    kinds = dict((k, stat.S_IFMT(st.st_mode)) for k, st in scan(root).items())
    assert {stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK} <= set(
        kinds.values())
    expected = os_walk_count(root)
    assert expected == len(kinds)
    r, res = in_process_refresh(cli, "--check", *engine)
    assert r.rc == 0, r
    assert res["entries_seen"] == expected
    assert res["errors"] == 0
    assert res["complete"] is True


@pytest.mark.parametrize("workers", [1, 2], ids=["serial", "processes"])
def test_walk_order_is_depth_first_in_byte_order(zoo, cli, workers):
    """At every tick the walker's cursor names exactly the entries_seen-th entry of the order.

    The expected order is computed independently (scan): the root, then each directory's
    names sorted as bytes ("10" < "9" < "B" < "Zf" < "_f" < "a" < "a-" < "a.b" < "a0" <
    "z\\xc3\\xa9"), each subdirectory's subtree right after the subdirectory itself.
    """
    env, root = zoo
    register(cli, root)
    order = list(scan(root))
    assert order[:4] == [(), (b".scratch-keepalive",), (b"10",), (b"10", b"f")]
    w = sk.Walker(str(root), "check", sk.thresholds_ns(GENERIC_CFG, 14, NOW_EPOCH),
                  dry_run=False, threads=1, workers=workers)
    ticks = []

    def on_tick(walker):
        ticks.append((walker.counts.entries_seen, walker.cursor()))

    try:
        assert w.run(on_tick=on_tick, tick_every=1) is True
    finally:
        w.close()
    assert w.counts.entries_seen == len(order)
    for seen, cursor in ticks:
        assert cursor_position(order, cursor) == seen - 1, (seen, cursor, order[seen - 1])
    seen = [s for s, _ in ticks]
    assert seen == sorted(set(seen))
    if workers == 1:
        # A tick between every two entries: every position but the first and last checked.
        assert seen == list(range(2, len(order)))
    else:
        # The parallel walk ticks between batches; a batch ends at every subdirectory.
        assert len(seen) >= sum(1 for p, st in scan(root).items()
                                if p and stat.S_ISDIR(st.st_mode)) - 1


@pytest.mark.parametrize("workers", [1, 2], ids=["serial", "processes"])
def test_walker_stops_after_exactly_n_entries_with_the_cursor_on_the_nth(zoo, cli, workers):
    env, root = zoo
    register(cli, root)
    order = list(scan(root))
    thresholds = sk.thresholds_ns(GENERIC_CFG, 14, NOW_EPOCH)
    for k in range(1, len(order)):
        w = sk.Walker(str(root), "check", thresholds, dry_run=False, threads=1,
                      workers=workers)
        try:
            done = w.run(cursor=None, max_entries=k)
            cursor = w.cursor()
        finally:
            w.close()
        assert (done, w.counts.entries_seen) == (False, k)
        assert cursor_position(order, cursor) == k - 1, (k, cursor)


# --------------------------------------------------------------------------- 2. touch mode


@pytest.fixture
def touch_run(generic, cli, engine):
    """A dataset whose every entry has a chosen atime, refreshed once in touch mode."""
    root = generic["scratch"] / "ds"
    outside = generic["tmp"] / "outside"
    outside.mkdir()
    target = outside / "target"
    target.write_bytes(b"target contents")
    (root / "d").mkdir(parents=True)
    contents = {}
    for rel in ("f_old", "f_12d", "f_11d_exact", "f_11d_plus_1s", "f_10d", "f_1d", "d/inner",
                "d/recent"):
        data = ("contents of %s\n" % rel).encode() * (len(rel) + 1)
        (root / rel).write_bytes(data)
        contents[rel] = data
    os.symlink(str(target), str(root / "link_out"))
    make_fifo(str(root / "fifo"))
    register(cli, root)
    atimes = {
        "": OLD_NS, ".scratch-keepalive": OLD_NS, "f_old": OLD_NS, "d": OLD_NS,
        "d/inner": OLD_NS, "link_out": OLD_NS, "fifo": OLD_NS,
        "f_12d": days_ago(12),
        "f_11d_plus_1s": days_ago(11, 10 ** 9),
        "f_11d_exact": days_ago(11),          # not OLDER than the threshold: skipped
        "f_10d": days_ago(10),
        "f_1d": days_ago(1),
        "d/recent": days_ago(1),
    }
    touched = {"", ".scratch-keepalive", "f_old", "d", "d/inner", "link_out", "fifo", "f_12d",
               "f_11d_plus_1s"}
    set_atime(str(target), ns=OLD_NS)
    for rel, ns in atimes.items():
        set_atime(str(root / rel) if rel else str(root), ns=ns)
    before = quiet_snapshot(root)
    target_before = os.lstat(str(target))
    start = time.time_ns()
    r = run_script("refresh", "--name", "ds", "--json", *engine,
                   env=tool_env(generic["state"]), clean=True)
    end = time.time_ns()
    after = quiet_snapshot(root)

    def key(rel):
        return tuple(fsb(rel).split(b"/")) if rel else ()

    return {"r": r, "root": root, "target": target, "target_before": target_before,
            "before": before, "after": after, "start": start, "end": end, "atimes": atimes,
            "touched": touched, "key": key, "contents": contents}


def test_touch_sets_atime_of_every_old_entry_to_now(touch_run):
    t = touch_run
    assert t["r"].rc == 0, t["r"]
    res = only_result(t["r"])
    assert res["mode"] == "touch" and res["complete"] is True
    assert res["entries_seen"] == len(t["atimes"]) == len(t["before"])
    assert res["entries_touched"] == len(t["touched"])
    for rel in t["touched"]:
        atime = t["after"][t["key"](rel)][0]
        assert t["start"] - CLOCK_SLACK_NS <= atime <= t["end"] + CLOCK_SLACK_NS, rel


def test_touch_skips_recent_entries_and_keeps_their_atime_exactly(touch_run):
    t = touch_run
    skipped = set(t["atimes"]) - t["touched"]
    assert skipped == {"f_11d_exact", "f_10d", "f_1d", "d/recent"}
    assert only_result(t["r"])["entries_skipped"] == len(skipped)
    for rel in skipped:
        assert t["after"][t["key"](rel)][0] == t["atimes"][rel], rel


def test_touch_skip_threshold_is_purge_minus_cadence_minus_5_days(touch_run):
    """Defaults (purge 30, cadence 14): 11 days. 10 days old: skipped; 12 days old: touched."""
    t = touch_run
    key = t["key"]
    assert t["after"][key("f_10d")][0] == days_ago(10)
    assert t["after"][key("f_11d_exact")][0] == days_ago(11)
    assert t["after"][key("f_11d_plus_1s")][0] >= t["start"] - CLOCK_SLACK_NS
    assert t["after"][key("f_12d")][0] >= t["start"] - CLOCK_SLACK_NS


def test_touch_never_changes_mtime_size_or_contents(touch_run):
    t = touch_run
    for k, (atime, mtime, size, mode) in t["before"].items():
        if k == SENTINEL:
            continue            # the tool's own file, rewritten after a complete walk
        assert t["after"][k][1:] == (mtime, size, mode), k
    for rel, data in t["contents"].items():
        assert read_quietly(str(t["root"] / rel)) == data, rel


def test_touch_touches_the_symlink_itself_not_its_target(touch_run):
    t = touch_run
    link = t["after"][(b"link_out",)]
    assert stat.S_ISLNK(link[3])
    assert link[0] >= t["start"] - CLOCK_SLACK_NS
    target_after = os.lstat(str(t["target"]))
    assert target_after.st_atime_ns == t["target_before"].st_atime_ns == OLD_NS
    assert target_after.st_mtime_ns == t["target_before"].st_mtime_ns


# --------------------------------------------------------------------------- 3. check and dry run


@pytest.fixture
def risk_tree(generic, cli):
    """Entries with atimes placed around the at-risk (13 d) and purge (30 d) thresholds.

    Directories get old atimes from the real past, so that an ordinary listing of them
    (relatime) would move their atime: leaving them alone is then a real property.
    """
    root = generic["scratch"] / "ds"
    (root / "sub").mkdir(parents=True)
    (root / "empty").mkdir()
    sizes = {"f_12d": 100, "f_13d_exact": 200, "f_13d_plus_1s": 300, "f_20d": 400,
             "f_30d_exact": 500, "f_31d": 600, "f_old": 700, "sub/g": 50}
    for rel, size in sizes.items():
        (root / rel).write_bytes(b"z" * size)
    os.symlink("f_old", str(root / "link"))
    make_fifo(str(root / "fifo"))
    register(cli, root)
    atimes = {
        "": OLD_NS, "sub": OLD_NS, "empty": OLD_NS,            # dirs: at risk, eligible, 0 B
        ".scratch-keepalive": days_ago(1),                     # recent: not at risk
        "f_12d": days_ago(12),                                 # not at risk
        "f_13d_exact": days_ago(13),                           # not OLDER than 13 d
        "f_13d_plus_1s": days_ago(13, 10 ** 9),                # at risk
        "f_20d": days_ago(20),                                 # at risk
        "f_30d_exact": days_ago(30),                           # at risk, not eligible
        "f_31d": days_ago(31),                                 # eligible
        "f_old": OLD_NS,                                       # eligible
        "sub/g": days_ago(40),                                 # eligible
        "link": days_ago(40),                                  # eligible, no bytes
        "fifo": days_ago(40),                                  # eligible, no bytes
    }
    for rel, ns in atimes.items():
        set_atime(str(root / rel) if rel else str(root), ns=ns)
    return generic, root, atimes


def test_check_counts_at_risk_and_purge_eligible_exactly(risk_tree, cli, engine):
    env, root, atimes = risk_tree
    r, res = in_process_refresh(cli, "--check", *engine)
    assert r.rc == 0, r
    assert res["mode"] == "check"
    assert res["entries_seen"] == len(atimes) == 14
    # at risk: f_13d_plus_1s f_20d f_30d_exact f_31d f_old sub/g link fifo + 3 dirs
    assert res["entries_at_risk"] == 11
    assert res["bytes_at_risk"] == 300 + 400 + 500 + 600 + 700 + 50
    # eligible: f_31d f_old sub/g link fifo + 3 dirs
    assert res["entries_purge_eligible"] == 8
    assert res["bytes_purge_eligible"] == 600 + 700 + 50
    assert res["entries_touched"] == 0
    assert res["errors"] == 0


def test_check_leaves_every_timestamp_alone_directories_included(risk_tree, cli, engine):
    env, root, atimes = risk_tree
    before = quiet_snapshot(root)
    assert quiet_snapshot(root) == before          # the witness itself moves nothing
    r = run_script("refresh", "--name", "ds", "--check", "--json", *engine,
                   env=tool_env(env["state"]), clean=True)
    assert r.rc == 0, r
    assert quiet_snapshot(root) == before
    # Control: on this mount an ordinary listing does move an old directory's atime, so the
    # equality above is a property of the tool, not of the mount.
    os.listdir(str(root / "sub"))
    assert os.lstat(str(root / "sub")).st_atime_ns != OLD_NS


def test_dry_run_in_touch_mode_changes_no_timestamp_and_writes_no_state(risk_tree, cli,
                                                                         engine):
    env, root, atimes = risk_tree
    before = quiet_snapshot(root)
    state_before = state_digest(env["state"])
    r = run_script("refresh", "--name", "ds", "--dry-run", "--json",
                   *engine, env=tool_env(env["state"]), clean=True)
    assert r.rc == 0, r
    res = only_result(r)
    assert res["mode"] == "touch"
    # everything is older than the 11-day skip threshold but the sentinel (1 day)
    assert res["entries_seen"] == 14
    assert res["entries_touched"] == 13
    assert res["entries_skipped"] == 1
    assert quiet_snapshot(root) == before
    assert state_digest(env["state"]) == state_before


def test_dry_run_stopped_by_budget_exits_3_and_writes_no_checkpoint(risk_tree, cli):
    env, root, atimes = risk_tree
    before = quiet_snapshot(root)
    state_before = state_digest(env["state"])
    r = run_script("refresh", "--name", "ds", "--dry-run", "--max-entries",
                   "5", "--json", env=tool_env(env["state"]), clean=True)
    assert r.rc == 3, r
    assert only_result(r)["complete"] is False
    assert quiet_snapshot(root) == before
    assert state_digest(env["state"]) == state_before


# --------------------------------------------------------------------------- 4. odd names


ODD_NAMES = [b"with space", b"tab\there", b"new\nline", b"bad\xff\xfename", b"-rf", b"--help",
             b"\\", "\u00fcn\u00efc\u00f8d\u00e9 \u2603".encode("utf-8"), b" lead", b"trail ",
             b"semi;colon", b"$(echo hi)", b"quote\"'", b"star*"]


@pytest.fixture
def odd_tree(generic, cli):
    root = generic["scratch"] / "ds"
    root.mkdir()
    rb = fsb(root)
    for n in ODD_NAMES:
        with open(rb + b"/" + n, "wb") as f:
            f.write(n)
    odd_dir = rb + b"/dir\nwith \xfe newline"
    os.mkdir(odd_dir)
    for n in (b"--", b"x\xffy", b"\\", b"-"):
        with open(odd_dir + b"/" + n, "wb") as f:
            f.write(b"inner")
    os.symlink(b"bad\xff\xfename", rb + b"/link \xfe-> bad")
    make_fifo(rb + b"/fifo\tname")
    register(cli, root)
    for k in scan(root):
        set_atime(join(root, k), ns=OLD_NS)
    return generic, root


def test_odd_names_are_all_walked_and_touched_with_valid_json(odd_tree, engine):
    env, root = odd_tree
    expected = os_walk_count(root)
    start = time.time_ns()
    r = run_script("refresh", "--name", "ds", "--json", *engine,
                   env=tool_env(env["state"]), clean=True)
    assert r.rc == 0, r
    res = only_result(r)            # run_script() decoded stdout as strict UTF-8; this parses it
    # the odd files, the odd directory and its 4 files, the link, the FIFO, root, sentinel
    assert res["entries_seen"] == expected == len(ODD_NAMES) + 1 + 4 + 1 + 1 + 2
    assert res["entries_touched"] == expected
    assert res["errors"] == 0
    after = scan(root)
    not_touched = [k for k, st in after.items() if st.st_atime_ns < start - CLOCK_SLACK_NS]
    assert not_touched == []
    for n in ODD_NAMES:
        assert read_quietly(join(root, (n,))) == n
    # the text output and status must cope too
    r = run_script("refresh", "--name", "ds", env=tool_env(env["state"]), clean=True)
    assert r.rc == 0, r
    r = run_script("status", "--name", "ds", "--json", env=tool_env(env["state"]), clean=True)
    assert r.rc == 0 and json.loads(r.out)["last_refresh"], r


def test_checkpoint_on_a_non_utf8_name_resumes_exactly(odd_tree, engine):
    env, root = odd_tree
    order = list(scan(root))
    bad = (b"bad\xff\xfename",)
    k = order.index(bad) + 1
    assert all(len(p) <= 1 for p in order[:k]), "no subdirectory before the bad name"
    e = tool_env(env["state"])
    r = run_script("refresh", "--name", "ds", "--json", "--max-entries", k, *engine,
                   env=e, clean=True)
    assert r.rc == 3, r
    assert only_result(r)["entries_seen"] == k
    raw = (env["state"] / "checkpoints" / "ds.json").read_bytes()
    raw.decode("ascii")                        # written as ASCII JSON
    ck = json.loads(raw.decode("ascii"))
    assert [c.encode("utf-8", "surrogateescape") for c in ck["cursor"]["path"]] == [bad[0]]
    assert ck["entries_done"] == k
    assert cursor_position(order, ck["cursor"]) == k - 1
    mid = scan(root)
    for p in order[:k]:
        assert mid[p].st_atime_ns != OLD_NS, p      # everything up to the cursor touched
    r = run_script("status", "--name", "ds", "--json", env=e, clean=True)
    assert r.rc == 0 and json.loads(r.out)["checkpoint"]["entries_done"] == k, r
    r = run_script("refresh", "--name", "ds", "--json", *engine, env=e, clean=True)
    assert r.rc == 0, r
    res = only_result(r)
    assert res["resumed"] is True
    assert res["entries_seen"] == len(order) - k
    assert res["entries_done"] == len(order)
    assert all(st.st_atime_ns != OLD_NS for st in scan(root).values())


# --------------------------------------------------------------------------- 5. symlinks


def test_symlinks_are_never_followed_and_loops_are_single_entries(generic, cli, engine):
    root = generic["scratch"] / "ds"
    (root / "sub").mkdir(parents=True)
    outside = generic["tmp"] / "outside"
    (outside / "osub").mkdir(parents=True)
    for rel in ("o1", "o2", "osub/o3"):
        (outside / rel).write_bytes(b"outside")
    (root / "f").write_bytes(b"inside")
    links = {"link_out": str(outside), "link_file": str(outside / "o1"), "a": "b", "b": "a",
             "dangling": "does/not/exist", "dot": ".", "dotdot": "..", "sub/up": "../..",
             "sub/self": "self"}
    for name, target in links.items():
        os.symlink(target, str(root / name))
    register(cli, root)
    for k in scan(root, cross_devices=False):
        set_atime(join(root, k), ns=OLD_NS)
    for k in scan(outside):
        set_atime(join(outside, k), ns=OLD_NS)
    outside_before = quiet_snapshot(outside)
    parent_before = os.lstat(str(generic["scratch"])).st_atime_ns
    start = time.time_ns()
    r = run_script("refresh", "--name", "ds", "--json", *engine,
                   timeout=60, env=tool_env(generic["state"]), clean=True)
    assert r.rc == 0, r
    res = only_result(r)
    # root, sentinel, f, sub, and the 9 links
    assert res["entries_seen"] == 4 + len(links) == os_walk_count(root)
    assert res["entries_touched"] == res["entries_seen"]
    assert res["errors"] == 0
    assert quiet_snapshot(outside) == outside_before        # nothing beyond a link touched
    assert os.lstat(str(generic["scratch"])).st_atime_ns == parent_before
    for name in links:
        st = os.lstat(str(root / name))
        assert stat.S_ISLNK(st.st_mode) and st.st_atime_ns >= start - CLOCK_SLACK_NS, name


# --------------------------------------------------------------------------- 6. permission denied


def test_permission_denied_subdirectory_is_an_error_and_the_walk_completes(world_tmp,
                                                                           engine):
    state, scratch, home = world_tmp / "state", world_tmp / "scratch", world_tmp / "home"
    run = run_as_nobody(home, state, need_root=False)
    root = scratch / "ds"
    for d in (home, root / "sub", root / "locked_root", root / "locked_nobody"):
        d.mkdir(parents=True)
    for rel in ("ok.txt", "sub/inner.txt", "zz_after.txt", "locked_root/secret.txt",
                "locked_nobody/secret.txt"):
        (root / rel).write_bytes(b"data")
    give_to_nobody(home, scratch,
                   keep=(root / "locked_root", root / "locked_root" / "secret.txt"))
    for rel in ("locked_root/secret.txt", "locked_nobody/secret.txt"):
        set_atime(str(root / rel), ns=OLD_NS)
    os.chmod(str(root / "locked_root"), 0)
    os.chmod(str(root / "locked_nobody"), 0)
    r = run("init", "--profile", "generic", "--scratch-root", scratch)
    assert r.rc == 0, r
    r = run("add", "--name", "ds", "--path", root, "--keep-until", KEEP)
    assert r.rc == 0, r
    r = run("refresh", "--name", "ds", "--json", *engine)
    assert r.rc == 1, r
    res = only_result(r)
    assert res["complete"] is True
    # root, sentinel, ok.txt, sub, sub/inner.txt, zz_after.txt, locked_root, locked_nobody;
    # the two secret.txt inside the denied directories are not counted
    assert res["entries_seen"] == 8
    assert res["errors"] >= 2
    log = Path(res["log"]).read_bytes().decode("utf-8", "replace")
    assert "locked_root" in log and "locked_nobody" in log
    r = run("status", "--name", "ds", "--json")
    assert r.rc == 0, r
    st = json.loads(r.out)
    assert st["last_refresh"] and st["checkpoint"] is None
    assert os.lstat(str(root / "zz_after.txt")).st_atime_ns != OLD_NS   # walk went on
    for rel in ("locked_root/secret.txt", "locked_nobody/secret.txt"):
        assert os.lstat(str(root / rel)).st_atime_ns == OLD_NS


def test_entries_of_another_owner_are_not_attempted_in_touch_mode_and_the_rest_is_touched(
        world_tmp, engine):
    """A labmate's file in a shared dataset: lstat works, but setting its atime needs
    ownership. Such entries are not attempted and are not errors: they are counted in
    entries_not_owned (and at risk, being old); every other entry is touched; the walk
    completes and exits 0 (this test expected errors and exit 1 before)."""
    state, scratch, home = world_tmp / "state", world_tmp / "scratch", world_tmp / "home"
    run = run_as_nobody(home, state)
    root = scratch / "ds"
    for d in (home, root / "sub"):
        d.mkdir(parents=True)
    for rel in ("a_mine.txt", "b_theirs.txt", "sub/c_theirs.txt", "sub/d_mine.txt"):
        (root / rel).write_bytes(b"data")
    theirs = [root / "b_theirs.txt", root / "sub" / "c_theirs.txt"]
    give_to_nobody(home, scratch, keep=theirs)
    for p in theirs:
        os.chmod(str(p), 0o644)
    for p in [root] + [Path(dp) / n for dp, dns, fns in os.walk(str(root)) for n in dns + fns]:
        set_atime(str(p), ns=OLD_NS)

    assert run("init", "--profile", "generic", "--scratch-root", scratch).rc == 0
    assert run("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0
    for rel in ("", "sub"):
        set_atime(str(root / rel), ns=OLD_NS)
    mtimes = dict((rel, os.lstat(str(root / rel)).st_mtime_ns)
                  for rel in ("b_theirs.txt", "sub/c_theirs.txt"))
    r = run("refresh", "--name", "ds", "--json", *engine)
    assert r.rc == 0, r
    res = only_result(r)
    assert res["complete"] is True
    # root, sentinel, a_mine, b_theirs, sub, sub/c_theirs, sub/d_mine
    assert res["entries_seen"] == 7
    assert res["errors"] == 0
    assert res["entries_not_owned"] == 2
    assert res["entries_at_risk_not_owned"] == 2
    assert res["entries_touched"] == 5
    log = Path(res["log"]).read_bytes().decode("utf-8", "replace")
    assert "b_theirs.txt" not in log and "c_theirs.txt" not in log, log
    for rel in ("b_theirs.txt", "sub/c_theirs.txt"):
        st = os.lstat(str(root / rel))
        assert st.st_atime_ns == OLD_NS and st.st_mtime_ns == mtimes[rel]
    for rel in ("a_mine.txt", "sub", "sub/d_mine.txt"):
        assert os.lstat(str(root / rel)).st_atime_ns != OLD_NS, rel


# --------------------------------------------------------------------------- 7. mount points


def test_mount_point_inside_dataset_is_skipped_not_entered_not_touched(generic, cli,
                                                                       engine, mounts):
    root = generic["scratch"] / "ds"
    mnt = root / "mnt"
    mnt.mkdir(parents=True)
    (root / "f").write_bytes(b"x")
    mounts("-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt)
    (mnt / "inside").write_bytes(b"on another filesystem")
    (mnt / "insidedir").mkdir()
    register(cli, root)
    for k in scan(root):
        set_atime(join(root, k), ns=OLD_NS)
    assert os.lstat(str(mnt)).st_dev != os.lstat(str(root)).st_dev
    before = quiet_snapshot(mnt)
    r = run_script("refresh", "--name", "ds", "--json", *engine,
                   env=tool_env(generic["state"]), clean=True)
    assert r.rc == 0, r
    res = only_result(r)
    assert res["entries_seen"] == 4          # root, sentinel, f, mnt
    assert res["entries_skipped"] == 1
    assert res["entries_touched"] == 3
    assert quiet_snapshot(mnt) == before     # mnt itself and what is inside it


# --------------------------------------------------------------------------- 8. deep tree


DEPTH = 1500
LEVEL = "level-%04d"


@pytest.fixture
def deep(generic, cli):
    """A chain of 1,500 directories (a path of ~16,500 bytes, beyond PATH_MAX), a file every
    100 levels and one at the bottom, built through directory descriptors."""
    root = generic["scratch"] / "deep"
    root.mkdir()
    fd = os.open(str(root), os.O_RDONLY | os.O_DIRECTORY)
    files = 0
    try:
        for i in range(DEPTH):
            if i % 100 == 0 or i == DEPTH - 1:
                os.close(os.open("zz-file", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
                files += 1
            os.mkdir(LEVEL % i, dir_fd=fd)
            nfd = os.open(LEVEL % i, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        files += 1
    finally:
        os.close(fd)
    assert len(LEVEL % 0) * DEPTH > 4096
    register(cli, root)
    total = 1 + 1 + DEPTH + files          # root, sentinel, directories, files
    count = subprocess.run(["find", str(root), "-printf", "x"], stdout=subprocess.PIPE,
                           check=True).stdout
    assert len(count) == total             # an independent count
    yield generic, root, total
    rm_rf(root)


def limit_fds():
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_deep_tree_beyond_path_max_is_walked_with_256_fds(deep, engine):
    env, root, total = deep
    start = time.time_ns()
    r = run_script("refresh", "--name", "ds", "--json", *engine,
                   preexec_fn=limit_fds, env=tool_env(env["state"]), clean=True)
    assert r.rc == 0, r
    res = only_result(r)
    assert res["entries_seen"] == total
    assert res["errors"] == 0
    assert res["entries_touched"] == total
    stale = [k for k, st in scan(root).items() if st.st_atime_ns < start - CLOCK_SLACK_NS]
    assert stale == []


def test_deep_tree_stopped_mid_way_resumes_to_the_same_total(deep, engine):
    env, root, total = deep
    e = tool_env(env["state"])
    r = run_script("refresh", "--name", "ds", "--json", "--max-entries", 800, *engine,
                   preexec_fn=limit_fds, env=e, clean=True)
    assert r.rc == 3, r
    first = only_result(r)
    ck = json.loads((env["state"] / "checkpoints" / "ds.json").read_text())
    assert first["entries_seen"] == 800
    assert len(ck["cursor"]["path"]) > 700            # stopped deep inside the chain
    r = run_script("refresh", "--name", "ds", "--json", *engine, preexec_fn=limit_fds,
                   env=e, clean=True)
    assert r.rc == 0, r
    second = only_result(r)
    assert second["errors"] == 0
    assert first["entries_seen"] + second["entries_seen"] == total
    assert second["entries_done"] == total


# --------------------------------------------------------------------------- big trees (module)


@pytest.fixture(scope="module")
def bigbase(tmp_path_factory):
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        base = Path(tempfile.mkdtemp(prefix="sk-test-walk-", dir=shm))
    else:
        base = tmp_path_factory.mktemp("big")
    (base / "scratch").mkdir()
    yield base
    rm_rf(base)


def build_tree(root, dirs, files_per_dir):
    """dirs directories of files_per_dir empty files; returns the entry count with the root
    and the sentinel that `add` will write."""
    os.mkdir(str(root))
    for j in range(dirs):
        d = os.path.join(str(root), "d%04d" % j)
        os.mkdir(d)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(files_per_dir):
                os.close(os.open("f%04d" % i, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644,
                                 dir_fd=fd))
        finally:
            os.close(fd)
    return dirs * (files_per_dir + 1) + 2


@pytest.fixture(scope="module")
def tree200k(bigbase):
    root = bigbase / "scratch" / "tree200k"
    return root, build_tree(root, 400, 500)


@pytest.fixture(scope="module")
def tree20k(bigbase):
    root = bigbase / "scratch" / "tree20k"
    return root, build_tree(root, 40, 500)


@pytest.fixture(scope="module")
def wide(bigbase):
    root = bigbase / "scratch" / "wide"
    root.mkdir()
    fd = os.open(str(root), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(100000):
            os.close(os.open("w%06d" % i, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644,
                             dir_fd=fd))
    finally:
        os.close(fd)
    return root, 100000 + 2


@pytest.fixture
def big_state(bigbase, tmp_path):
    """Register a module-scoped tree as dataset `ds` in a fresh state directory."""
    def make(tree):
        root, total = tree
        return State(tmp_path / "bigstate", bigbase / "scratch", root), total
    return make


def atimes_of_dir(path):
    """{name: lstat} of one directory's entries (listed without moving its atime)."""
    fd = open_dir_quietly(fsb(path))
    try:
        return dict((n, os.stat(n, dir_fd=fd, follow_symlinks=False)) for n in os.listdir(fd))
    finally:
        os.close(fd)


def reset_atimes(path, atime_fn):
    """Set each entry of one directory to atime_fn(name) (mtime kept); returns {name: ns}."""
    out = {}
    fd = open_dir_quietly(fsb(path))
    try:
        for n in os.listdir(fd):
            st = os.stat(n, dir_fd=fd, follow_symlinks=False)
            out[n] = atime_fn(n)
            os.utime(n, ns=(out[n], st.st_mtime_ns), dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)
    return out


# --------------------------------------------------------------------------- 9. wide directory


def test_wide_directory_walked_completely_and_resumed_exactly(big_state, wide):
    ds, total = big_state(wide)
    root = wide[0]
    reset_atimes(root, lambda n: OLD_NS)
    mtimes = dict((n, st.st_mtime_ns) for n, st in atimes_of_dir(root).items())
    start = time.time_ns()
    r, one_shot = ds.refresh()
    assert r.rc == 0, r
    assert one_shot["entries_seen"] == total
    assert one_shot["entries_touched"] == total
    after = atimes_of_dir(root)
    assert [n for n, st in after.items() if st.st_atime_ns < start - CLOCK_SLACK_NS] == []
    assert dict((n, st.st_mtime_ns) for n, st in after.items() if n != ".scratch-keepalive") \
        == dict((n, m) for n, m in mtimes.items() if n != ".scratch-keepalive")

    reset_atimes(root, lambda n: OLD_NS)
    start = time.time_ns()
    runs = []
    for _ in range(10):
        r, res = ds.refresh("--max-entries", 33333)
        runs.append(res)
        if r.rc == 0:
            break
        assert r.rc == 3, r
        assert ds.checkpoint()["entries_done"] == sum(x["entries_seen"] for x in runs)
        assert res["entries_done"] == sum(x["entries_seen"] for x in runs)
    assert [x["entries_seen"] for x in runs] == [33333, 33333, 33333, total - 3 * 33333]
    assert sum(x["entries_touched"] for x in runs) == total
    assert runs[-1]["entries_done"] == total
    assert ds.checkpoint() is None
    after = atimes_of_dir(root)
    assert [n for n, st in after.items() if st.st_atime_ns < start - CLOCK_SLACK_NS] == []


# --------------------------------------------------------------------------- 10. resume in general


@pytest.fixture
def nested(generic, cli):
    """A small tree with nesting at several levels; its order is computed by scan()."""
    root = generic["scratch"] / "ds"
    for d in ("a/sub", "c", "d/e/f", "m"):
        (root / d).mkdir(parents=True)
    for f in ("a/1", "a/2", "a/sub/x", "a/sub/y", "a/z", "b", "d/e/f/g", "d/h", "m/k1", "m/k2",
              "m/k3", "m/k4", "m/k5", "n", "zz"):
        (root / f).write_bytes(b"f")
    register(cli, root)
    return generic, root, list(scan(root))


def test_resume_from_every_stop_point_counts_every_entry_once(nested, cli, engine):
    env, root, order = nested
    n = len(order)
    for k in range(1, n):
        r1, first = in_process_refresh(cli, "--max-entries", k, *engine)
        if r1.rc == 0:                  # the budget did not stop it (see the exactness test)
            assert first["entries_seen"] == n, (k, first)
            continue
        assert r1.rc == 3, (k, r1)
        ck = sk.Store(str(env["state"])).load_checkpoint("ds")
        assert ck["entries_done"] == first["entries_seen"]
        assert cursor_position(order, ck["cursor"]) == first["entries_seen"] - 1, (k, ck)
        r2, second = in_process_refresh(cli, *engine)
        assert r2.rc == 0, (k, r2)
        assert second["resumed"] is True
        assert first["entries_seen"] + second["entries_seen"] == n, (k, first, second)
        assert second["entries_done"] == n
        assert not (env["state"] / "checkpoints" / "ds.json").exists()


def test_max_entries_stops_exactly_after_n_entries(nested, cli, engine):
    """`--max-entries N` stops after N entries: never more, wherever N falls in the tree."""
    env, root, order = nested
    n = len(order)
    overshoots = []
    for k in range(1, n):
        r1, first = in_process_refresh(cli, "--max-entries", k, *engine)
        if first["entries_seen"] != k or r1.rc != 3:
            overshoots.append((k, first["entries_seen"], r1.rc))
        if r1.rc == 3:
            r2, _ = in_process_refresh(cli, *engine)
            assert r2.rc == 0, r2
    assert overshoots == [], ("(max-entries, entries_seen, rc) for a tree of %d entries: %r"
                              % (n, overshoots))


def stop_at(cli, order, path, engine):
    k = order.index(path) + 1
    r, res = in_process_refresh(cli, "--max-entries", k, *engine)
    assert r.rc == 3 and res["entries_seen"] == k, (path, r)
    return k


def test_resume_counts_entries_created_after_the_cursor_not_before(nested, cli, engine):
    env, root, order = nested
    k = stop_at(cli, order, (b"m", b"k3"), engine)
    ck = sk.Store(str(env["state"])).load_checkpoint("ds")
    assert [sk.decode_name(c) for c in ck["cursor"]["path"]] == [b"m", b"k3"]
    for rel in ("a/new", "b0", "m/k0", "m/k2a"):          # before the cursor
        (root / rel).write_bytes(b"new")
    for rel in ("m/k3a", "m/k9", "zz2", "n0"):            # after it
        (root / rel).write_bytes(b"new")
    r, res = in_process_refresh(cli, *engine)
    assert r.rc == 0, r
    assert res["entries_seen"] == len(order) - k + 4
    assert res["entries_done"] == len(order) + 4


def test_resume_survives_deletion_of_the_cursor_file(nested, cli, engine):
    env, root, order = nested
    k = stop_at(cli, order, (b"m", b"k3"), engine)
    os.unlink(str(root / "m" / "k3"))
    r, res = in_process_refresh(cli, *engine)
    assert r.rc == 0, r
    assert res["errors"] == 0
    assert res["entries_seen"] == len(order) - k


def test_resume_survives_deletion_of_the_cursor_directory(nested, cli, engine):
    env, root, order = nested
    k = stop_at(cli, order, (b"d", b"e"), engine)     # just entered d/e
    ck = sk.Store(str(env["state"])).load_checkpoint("ds")
    assert ck["cursor"] == {"path": ["d", "e"], "subtree_done": False}
    shutil.rmtree(str(root / "d" / "e"))              # e/f and e/f/g are gone unseen
    r, res = in_process_refresh(cli, *engine)
    assert r.rc == 0, r
    assert res["errors"] == 0
    assert res["entries_seen"] == len(order) - k - 2
    # and the same when the cursor's whole top-level directory is gone
    k = stop_at(cli, order, (b"a", b"sub", b"x"), engine)
    shutil.rmtree(str(root / "a"))
    r, res = in_process_refresh(cli, *engine)
    assert r.rc == 0, r
    after = order.index((b"b",))
    assert res["entries_seen"] == len(order) - after - 3      # d/e, d/e/f, d/e/f/g gone


# --------------------------------------------------------------------------- 11. crashes, signals


def assert_state_parses(ds):
    for rel in ("config.json", "registry.json", "checkpoints/ds.json"):
        json.loads((ds.state / rel).read_text(encoding="utf-8"))


def test_sigkill_at_several_points_leaves_state_readable_and_resume_completes(
        big_state, tree200k, engine_sp, pause_shim):
    """The tool and its worker processes killed outright (SIGKILL to the process group, as
    a batch system or the OOM killer does) at four points; the walk still ends exact. Each
    run is held (the pause shim) where its main process opens a directory further on, with
    a checkpoint every 256 entries before it, and killed there."""
    ds, total = big_state(tree200k)
    root = tree200k[0]
    start = time.time_ns()
    done = 0
    for at in (40, 80, 200, 320):                   # of 400 directories
        proc = ds.popen("--checkpoint-every", "0.000001", *engine_sp,
                        held_at=root / ("d%04d" % at), shim=pause_shim)
        with reaped(proc):
            wait_stopped(proc, "the walk to stop before d%04d" % at)
            ck = ds.checkpoint()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        assert_state_parses(ds)
        st = ds.status()
        assert st["checkpoint"]["entries_done"] >= ck["entries_done"] > done
        assert st["state"] == "partial"
        done = st["checkpoint"]["entries_done"]
    r, res = ds.refresh(*engine_sp)
    assert r.rc == 0, r
    assert res["resumed"] is True
    assert res["entries_done"] == total
    assert res["entries_seen"] == total - done
    assert ds.checkpoint() is None
    st = ds.status()
    assert st["last_refresh"] and st["checkpoint"] is None
    # every entry was touched by one of the five runs: no stretch was lost to a kill
    stale = [k for k, s in scan(tree200k[0]).items() if s.st_atime_ns < start - CLOCK_SLACK_NS]
    assert stale == []


SIGNAL_TARGETS = [("serial", ("--workers", "1"), "pid"),
                  ("processes", ("--workers", "2"), "pid"),
                  ("processes", ("--workers", "2"), "group")]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 3), (signal.SIGINT, 130)],
                         ids=["SIGTERM-exit-3", "SIGINT-exit-130"])
@pytest.mark.parametrize("engine_args, target", [t[1:] for t in SIGNAL_TARGETS],
                         ids=["%s-to-%s" % (t[0], t[2]) for t in SIGNAL_TARGETS])
def test_signal_mid_walk_checkpoints_and_resumes(big_state, tree200k, sig, code, engine_args,
                                                 target, pause_shim):
    """A signal to the tool's pid (kill PID) or to its whole process group (Ctrl-C at a
    terminal, `kill -TERM -PGID`, Slurm at a time limit or scancel) stops the walk with its
    exit code and a checkpoint, every time (five stops at different points); the next run
    resumes and completes with every entry counted once. Each run is held (the pause shim)
    where its main process opens a directory further on, and signalled there."""
    ds, total = big_state(tree200k)
    root = tree200k[0]
    done = 0
    for attempt in range(5):
        at = 60 * (attempt + 1)                     # of 400 directories
        proc = ds.popen("--checkpoint-every", "0.05", *engine_args,
                        held_at=root / ("d%04d" % at), shim=pause_shim)
        with reaped(proc):
            wait_stopped(proc, "the walk to stop before d%04d" % at)
            if target == "group":
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
            out, err = go_on(proc)
        assert proc.returncode == code, (attempt, out[-500:], err[-1000:])
        res = json.loads(out.decode("utf-8"))["results"][0]
        assert res["complete"] is False and res["resumed"] is (attempt > 0)
        ck = ds.checkpoint()
        assert ck is not None and ck["entries_done"] == done + res["entries_seen"] > done
        done = ck["entries_done"]
    r, res2 = ds.refresh(*engine_args)
    assert r.rc == 0, r
    assert res2["resumed"] is True
    assert done + res2["entries_seen"] == total
    assert ds.checkpoint() is None and ds.status()["last_refresh"]


def children_of(pid):
    """Pids of the live processes whose parent is pid (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d, "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d))
    return out


def process_state(pid):
    with open("/proc/%d/stat" % pid, "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0].decode()


@contextlib.contextmanager
def worker_walk(ds, root, shim):
    """A --workers 2 walk held (the pause shim) where its main process opens d0060, 30,000
    entries and many checkpoints in: (process, worker pids), the main process then let go
    on; reaped after."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc to find the worker processes")
    proc = ds.popen("--checkpoint-every", "0.000001", "--workers", "2",
                    held_at=root / "d0060", shim=shim)
    with reaped(proc):
        wait_stopped(proc, "the walk to stop before d0060")
        assert ds.checkpoint() is not None
        workers = children_of(proc.pid)
        assert workers
        yield proc, workers


def test_sigterm_to_process_group_while_workers_hold_batches_exits_3(big_state, tree200k,
                                                                     pause_shim):
    """Slurm (time limit, scancel) sends SIGCONT and SIGTERM to every process of the job.

    Made deterministic: the worker processes are stopped until the main process has handed
    them batches and waits for the replies; then the group gets SIGTERM and SIGCONT. The walk
    must stop as a SIGTERM stop does (exit 3, a checkpoint that matches the result), and
    the next run must resume and complete with every entry counted once.
    """
    ds, total = big_state(tree200k)
    with worker_walk(ds, tree200k[0], pause_shim) as (proc, workers):
        for w in workers:
            os.kill(w, signal.SIGSTOP)
        os.kill(proc.pid, signal.SIGCONT)
        # The main process fills the workers' queues, then sleeps waiting for replies.
        streak = {"n": 0}

        def parent_waits():
            streak["n"] = streak["n"] + 1 if process_state(proc.pid) == "S" else 0
            return streak["n"] >= 20
        poll(parent_waits, "the main process to wait for its stopped workers",
             interval=0.005)
        os.killpg(proc.pid, signal.SIGTERM)
        os.killpg(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, (out[-500:], err[-1000:])
    res = json.loads(out.decode("utf-8"))["results"][0]
    assert res["complete"] is False
    ck = ds.checkpoint()
    assert ck is not None and ck["entries_done"] == res["entries_seen"] > 0
    r, res2 = ds.refresh("--workers", "2")
    assert r.rc == 0, r
    assert res["entries_seen"] + res2["entries_seen"] == total


def test_a_worker_process_killed_alone_fails_the_run_cleanly_and_resume_is_exact(
        big_state, tree200k, pause_shim):
    """One worker killed (the OOM killer picks a process, not a group): the run ends with
    exit 1 and a result naming the worker and the signal, the checkpoint is the last one
    written before (never past a lost batch), and the next run completes exactly."""
    ds, total = big_state(tree200k)
    with worker_walk(ds, tree200k[0], pause_shim) as (proc, workers):
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        out, err = go_on(proc)
    assert proc.returncode == 1, (out[-500:], err[-1000:])
    res = json.loads(out.decode("utf-8"))["results"][0]
    assert res["complete"] is False
    assert "worker process %d died (killed by signal 9" % victim in res["reason"], res
    ck = ds.checkpoint()
    assert ck is not None and 0 < ck["entries_done"] < total
    r, res2 = ds.refresh("--workers", "2")
    assert r.rc == 0, r
    assert res2["resumed"] is True
    assert ck["entries_done"] + res2["entries_seen"] == total


# --------------------------------------------------------------------------- 12. lock


@pytest.mark.parametrize("engine_args", [e[1] for e in ENGINES if e[0] != "threads"],
                         ids=[e[0] for e in ENGINES if e[0] != "threads"])
def test_second_refresh_and_remove_exit_4_while_a_walk_holds_the_lock(big_state, tree200k,
                                                                      engine_args, pause_shim):
    """A walk stopped mid-way (held by the pause shim before d0060, then SIGSTOP to its
    process group, as Ctrl-Z does) keeps the lock: a second refresh and a remove exit 4 at
    once, naming its pid and host. Once its main process is killed (kill -9 PID), the lock
    is free and a new refresh resumes the walk."""
    ds, total = big_state(tree200k)
    proc = ds.popen("--checkpoint-every", "0.000001", *engine_args,
                    held_at=tree200k[0] / "d0060", shim=pause_shim)
    try:
        wait_stopped(proc, "the walk to stop before d0060")
        assert ds.checkpoint() is not None
        os.killpg(proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        r = ds.run("refresh", "--name", "ds", timeout=60)
        assert r.rc == 4, r
        assert time.monotonic() - t0 < 20              # at once: it does not wait
        msg = r.out + r.err
        assert "pid %d" % proc.pid in msg and socket.gethostname() in msg, r
        r = ds.run("remove", "--name", "ds", timeout=60)
        assert r.rc == 4, r
        assert "pid %d" % proc.pid in r.err and socket.gethostname() in r.err, r
        assert ds.status()["name"] == "ds"             # still registered
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # Its worker processes, if any, are still stopped: they must not hold the lock.
        r, res = ds.refresh(*engine_args)
        assert r.rc == 0, r
        assert res["resumed"] is True and res["entries_done"] == total
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


# --------------------------------------------------------------------------- 13. threads


def pattern_atime(name):
    return days_ago(1) if name.endswith(("3", "7")) else OLD_NS


def reset_tree_atimes(root):
    """Every third-ish file recent, everything else old; returns {components: atime}."""
    expected = {}
    for k in scan(root):
        ns = pattern_atime(k[-1].decode()) if k else OLD_NS
        if k == SENTINEL:
            ns = OLD_NS
        set_atime(join(root, k), ns=ns)
        expected[k] = ns
    return expected


def touched_set(root, expected):
    return set(k for k, st in scan(root).items() if st.st_atime_ns != expected[k])


COUNT_KEYS = ("entries_seen", "entries_touched", "entries_skipped", "entries_at_risk",
              "bytes_at_risk", "entries_purge_eligible", "bytes_purge_eligible", "errors")


def test_every_engine_gives_the_same_counts_and_touched_set(big_state, tree20k):
    """Serial, --threads 4 and --workers 2 walks of the same tree agree exactly."""
    ds, total = big_state(tree20k)
    root = tree20k[0]
    r, _ = ds.refresh()     # the first complete run rewrites the sentinel (and its size) once
    assert r.rc == 0, r
    results, touched = {}, {}
    for name, args in ENGINES:
        expected = reset_tree_atimes(root)
        r, res = ds.refresh(*args)
        assert r.rc == 0, r
        results[name] = dict((k, res[k]) for k in COUNT_KEYS)
        touched[name] = touched_set(root, expected)
    assert results["threads"] == results["serial"]
    assert results["processes"] == results["serial"]
    assert results["serial"]["entries_seen"] == total
    assert 0 < results["serial"]["entries_skipped"] < total
    assert touched["threads"] == touched["serial"]
    assert touched["processes"] == touched["serial"]
    assert len(touched["serial"]) == results["serial"]["entries_touched"]


def test_stop_and_resume_is_exact_in_every_engine(big_state, tree20k, engine):
    ds, total = big_state(tree20k)
    root = tree20k[0]
    expected = reset_tree_atimes(root)
    r, one = ds.refresh("--workers", "1")
    assert r.rc == 0, r
    one_touched = touched_set(root, expected)
    expected = reset_tree_atimes(root)
    runs = []
    for _ in range(20):
        r, res = ds.refresh("--max-entries", 7001, *engine)
        runs.append(res)
        if r.rc == 0:
            break
        assert r.rc == 3, r
        assert res["entries_seen"] == 7001
    assert len(runs) == 3
    assert sum(x["entries_seen"] for x in runs) == total
    assert sum(x["entries_touched"] for x in runs) == one["entries_touched"]
    assert runs[-1]["entries_done"] == total
    assert touched_set(root, expected) == one_touched


# --------------------------------------------------------------------------- 14. memory


# Runs the tool from a small interpreter: ru_maxrss of a child counts the memory of the
# process it was forked from (Linux copies the high-water mark at fork and exec), so a tool
# started straight from pytest would report pytest's own ~50 MB.
RSS_HELPER = r"""
import os, sys
pid = os.posix_spawn(sys.executable, [sys.executable] + sys.argv[1:], os.environ,
                     file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
_, status, usage = os.wait4(pid, 0)
print(os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1, usage.ru_maxrss)
"""


def peak_rss_kib(env, *argv):
    """(exit code, peak RSS in KiB) of `python3 ARGV` started from RSS_HELPER."""
    p = subprocess.run([sys.executable, "-c", RSS_HELPER] + [str(a) for a in argv],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=300)
    assert p.returncode == 0, p
    rc, rss = p.stdout.split()
    return int(rc), int(rss)


def check_walk_rss(ds):
    rc, rss = peak_rss_kib(ds.env, SCRIPT, "refresh", "--name", "ds", "--check", "--json")
    assert rc == 0
    return rss


def test_peak_memory_does_not_grow_with_the_number_of_entries(bigbase, tmp_path, tree20k,
                                                              tree200k):
    small = State(tmp_path / "s1", bigbase / "scratch", tree20k[0])
    large = State(tmp_path / "s2", bigbase / "scratch", tree200k[0])
    rss_bare = peak_rss_kib(small.env, SCRIPT, "--version")[1]
    rss_small = min(check_walk_rss(small) for _ in range(2))
    rss_large = min(check_walk_rss(large) for _ in range(2))
    # 10x the entries (same directory shape): a per-entry cost of even 50 bytes would add 9 MB.
    print("peak RSS KiB: --version %d, 20k entries %d, 200k entries %d"
          % (rss_bare, rss_small, rss_large))
    assert rss_large - rss_small < 3 * 1024, (rss_small, rss_large)
