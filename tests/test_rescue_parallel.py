"""rescue's parallel copies, on threads (--threads N) and on a worker process (--workers 2,
the default on a local disk): copies of different files overlap, and what each engine
leaves is what one copy at a time leaves, stopped and resumed or not. (How a stop reaches
a worker's copy: test_rescue_workers.py.)"""
import json
import os
import stat
import threading
import time

import pytest

from conftest import KEEP, set_atime, sk

OLD = 1577836800.0
# The copy's engines: one copy at a time, 8 threads, a worker process (Python 3.7+).
ENGINES = [pytest.param({"threads": 1}, id="one"), pytest.param({"threads": 8}, id="threads"),
           pytest.param({"workers": 2}, id="workers", marks=pytest.mark.skipif(
               not sk.parallel_ok(), reason="worker processes need Python 3.7+"))]


@pytest.fixture
def tree(generic, cli):
    """60 files of assorted sizes (one sparse) in 6 directories with their own modes, and
    symlinks; every atime old; walked in check mode."""
    root = generic["scratch"] / "ds"
    for d in range(6):
        sub = root / ("d%d" % d)
        sub.mkdir(parents=True)
        for f in range(10):
            (sub / ("f%02d" % f)).write_bytes(os.urandom(1000 * f + d))
        os.symlink("f00", str(sub / "link"))
        os.chmod(str(sub), 0o750 + d % 2)
    os.chmod(str(root / "d1" / "f01"), 0o666)      # more than the umask lets open() give
    os.chmod(str(root / "d1" / "f02"), 0o1600)
    with open(str(root / "d0" / "sparse"), "wb") as f:
        f.truncate(8 << 20)
        f.write(b"head")
    for dp, dns, fns in os.walk(str(root)):
        for n in dns + fns:
            set_atime(os.path.join(dp, n), OLD)
    assert cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    generic["root"] = root
    return generic


def picture(top):
    """{relative path: (kind, mode, mtime_ns, contents or link target)}."""
    out = {}
    for dp, dns, fns in os.walk(str(top)):
        for n in dns + fns:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                body = open(p, "rb").read()
            else:
                body = None
            out[os.path.relpath(p, str(top))] = (stat.S_IFMT(st.st_mode),
                                                 stat.S_IMODE(st.st_mode),
                                                 None if stat.S_ISLNK(st.st_mode)
                                                 else st.st_mtime_ns, body)
    out.pop(sk.SENTINEL, None)
    return out


def rescue_until_complete(dest, every, engine):
    """Rescue on engine, a stop request (Ctrl-C) at every `every`-th look, again and again
    until a run completes: (every run's exit code, the last result). The request is the
    main process's (its count, in its memory): a copy on a worker process is stopped by
    it there, as by a stop the API's caller asks for."""
    calls, main = [0], os.getpid()

    def stop_soon():
        if os.getpid() != main:
            return None
        calls[0] += 1
        return "int" if calls[0] % every == 0 else None
    codes = []
    for _ in range(200):
        r = sk.rescue("ds", str(dest), all=True, should_stop=stop_soon, **engine)
        codes.append(r["exit_code"])
        if r["complete"]:
            break
    return codes, r


def test_copies_of_different_files_overlap(tree, monkeypatch, tmp_path):
    """Four copies must be in flight at once to get past a barrier of four: a rescue that
    copied one file at a time would time out at it."""
    barrier = threading.Barrier(4, timeout=30)
    real = sk.RescueRun.copy_file
    met = []

    def copy_file(self, level, name):
        if not met:
            barrier.wait()
            met.append(True)
        return real(self, level, name)
    monkeypatch.setattr(sk.RescueRun, "copy_file", copy_file)
    r = sk.rescue("ds", str(tmp_path / "safe"), all=True, threads=4)
    assert r["exit_code"] == 0 and r["errors"] == 0, r
    assert met


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_leaves_an_exact_copy(tree, tmp_path, engine):
    old = os.umask(0o022)
    try:
        r = sk.rescue("ds", str(tmp_path / "safe"), all=True, **engine)
    finally:
        os.umask(old)
    assert r["exit_code"] == 0 and r["entries_copied"] == 6 * 11 + 1, r
    assert picture(tmp_path / "safe") == picture(tree["root"])


@pytest.mark.parametrize("engine", ENGINES)
def test_stopped_in_the_middle_of_copies_it_resumes_to_the_same_copy(tree, tmp_path, engine):
    """A stop request arrives while copies are in flight; each resumed run is stopped
    again, until one completes: the copy is exact, and the checkpoint never skipped a
    file left half copied."""
    dest = tmp_path / "safe"
    codes, _ = rescue_until_complete(dest, 7, engine)
    assert codes[-1] == 0 and len(codes) > 2 and set(codes[:-1]) == {130}, codes
    assert picture(dest) == picture(tree["root"])
    leftovers = [n for dp, dns, fns in os.walk(str(dest)) for n in fns
                 if n.startswith(".scratch-keepalive-rescue.")]
    assert leftovers == []


@pytest.mark.parametrize("option", ["--threads", "--workers"])
def test_threads_and_workers_on_the_command_line(tree, cli, tmp_path, option):
    r = cli("rescue", "--name", "ds", "--to", tmp_path / "safe", "--all", option, "4",
            "--json")
    assert r.rc == 0 and json.loads(r.out)["errors"] == 0, r
    assert picture(tmp_path / "safe") == picture(tree["root"])
    for bad in ("0", "65", "many"):
        r = cli("rescue", "--name", "ds", "--to", tmp_path / "other", option, bad)
        assert r.rc == 2 and option in r.err and r.err.count("\n") == 1, r
        assert not (tmp_path / "other").exists()


def test_holes_stay_holes_whatever_the_file_size(generic, cli, tmp_path):
    """A small file that is all hole, a file that ends in one, and a dense file: the copies
    have the same sizes and contents, and no blocks where the source has none."""
    root = generic["scratch"] / "ds"
    root.mkdir()
    with open(str(root / "all-hole"), "wb") as f:
        f.truncate(100)
    with open(str(root / "tail-hole"), "wb") as f:
        f.write(os.urandom(5000))
        f.truncate(64 << 20)
    (root / "dense").write_bytes(os.urandom(10000))
    for p in root.iterdir():
        set_atime(p, OLD)
    assert cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    r = sk.rescue("ds", str(tmp_path / "safe"), all=True)
    assert r["exit_code"] == 0, r
    for n in ("all-hole", "tail-hole", "dense"):
        a, b = os.stat(str(root / n)), os.stat(str(tmp_path / "safe" / n))
        assert (b.st_size, open(str(tmp_path / "safe" / n), "rb").read()) == \
            (a.st_size, open(str(root / n), "rb").read()), n
        assert b.st_blocks <= a.st_blocks + 8, n         # at most a block more
    assert os.stat(str(tmp_path / "safe" / "all-hole")).st_blocks == 0


@pytest.mark.parametrize("engine", ENGINES[1:])
def test_a_deep_tree_copied_in_parallel_and_stopped_again_and_again_is_exact(
        generic, tmp_path, monkeypatch, engine):
    """Three times deeper than the cap on open directories, so levels close their fds on
    both sides, and reopen them through "..", while copies into them may still run (on
    threads, or on a worker process; ten files in a level, then a chain of directories
    with none, and each copy slowed a little); stopped every few entries and resumed, some levels read-only: the
    copy is exact."""
    real = sk.RescueRun.copy_file

    def copy_file(self, frame, name):
        time.sleep(0.05)
        return real(self, frame, name)
    monkeypatch.setattr(sk.RescueRun, "copy_file", copy_file)
    root = generic["scratch"] / "ds"
    d, dirs = root, []
    for i in range(3 * sk.MAX_OPEN_DIRS):
        d = d / ("l%03d" % i)
        d.mkdir(parents=True)
        dirs.append(d)
        for f in range(10 if i % sk.MAX_OPEN_DIRS == 0 else 0):
            (d / ("f%d" % f)).write_bytes(os.urandom(100 * f + i))
    for i, d in enumerate(dirs):
        os.chmod(str(d), (0o555, 0o750, 0o700)[i % 3])
    for dp, dns, fns in os.walk(str(root)):
        for n in dns + fns:
            set_atime(os.path.join(dp, n), OLD)
    assert sk.add_dataset("ds", str(root), KEEP)["name"] == "ds"
    assert sk.refresh(name="ds", check=True)["exit_code"] == 0
    dest = tmp_path / "safe"
    codes, r = rescue_until_complete(dest, 80, engine)
    assert codes[-1] == 0 and len(codes) >= 3 and set(codes[:-1]) == {130}, codes
    assert r["errors"] == 0, r
    assert picture(dest) == picture(root)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_link_that_changes_while_it_is_compared_is_an_error_not_a_crash(tree, tmp_path,
                                                                         monkeypatch, engine):
    """A source symlink found changed while the quick check reads it (as when it is
    replaced between its lstat and its O_PATH open): that entry is an error, counted and
    named; the rest is copied (exit 1), whichever engine copies it."""
    dest = tmp_path / "safe"
    assert sk.rescue("ds", str(dest), all=True, **engine)["exit_code"] == 0
    (tree["root"] / "d3" / "f05").write_bytes(b"changed")      # one file to copy again
    set_atime(tree["root"] / "d3" / "f05", OLD)
    assert sk.refresh(name="ds", check=True)["exit_code"] == 0
    real = sk.RescueRun.read_link
    d2 = os.stat(str(tree["root"] / "d2"))

    def read_link(self, frame, name, st):       # in whichever process copies
        if name == b"link" and os.path.samestat(os.fstat(frame.fd), d2):
            raise sk._Changed("changed since it was looked at")
        return real(self, frame, name, st)
    monkeypatch.setattr(sk.RescueRun, "read_link", read_link)
    r = sk.rescue("ds", str(dest), all=True, **engine)
    assert r["exit_code"] == 1 and r["errors"] == 1, r
    assert [e["path"] for e in r["not_rescued"]] == ["d2/link"], r["not_rescued"]
    assert (dest / "d3" / "f05").read_bytes() == b"changed"
