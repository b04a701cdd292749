"""The state directory when it is full (a small tmpfs) or holds a symlink where the tool
writes (a log, a lock file): one line naming the file, nothing written through a link.
"""
import contextlib
import os
import re
from pathlib import Path

import pytest

from conftest import KEEP, atimes, run_in, setup_dataset, sk, small_dataset


# --------------------------------------------------------------------------- a full state dir


@pytest.fixture
def small_tmpfs(tmp_path, mounts):
    """A 1 MiB tmpfs mounted at tmp_path/state (root only), unmounted afterwards."""
    mnt = tmp_path / "state"
    mnt.mkdir()
    mounts("-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", mnt)
    return mnt


def fill(directory):
    """Fill the filesystem of directory; returns the filler file."""
    filler = Path(directory) / "filler"
    fd = os.open(str(filler), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def test_full_state_dir_add_names_the_file_and_leaves_no_sentinel(tmp_path, small_tmpfs):
    """The registry save of `add` fails on a full state directory: exit 1 with one line that
    names the file and says the disk or quota is full (not "permissions"); the sentinel the
    add wrote is deleted again, the registry is as it was, no temp file stays; once there
    is room, adding the directory (under any name) works."""
    scratch, state = tmp_path / "scratch", small_tmpfs
    scratch.mkdir()
    root = small_dataset(scratch)
    r = run_in(state, "init", "--profile", "generic", "--scratch-root", scratch)
    assert r.rc == 0, r
    filler = fill(state)
    before = sorted(os.listdir(str(state)))
    r = run_in(state, "add", "--name", "ds", "--path", root, "--keep-until", KEEP)
    assert r.rc == 1, r
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("scratch-keepalive: error: cannot write %s"
                                                   % state), r
    assert "the disk or quota is full (No space left on device)" in lines[0], r
    assert "permissions" not in lines[0], r
    assert not (root / ".scratch-keepalive").exists()
    assert sorted(os.listdir(str(state))) == before        # no registry, no temp file
    filler.unlink()
    r = run_in(state, "add", "--name", "other", "--path", root, "--keep-until", KEEP)
    assert r.rc == 0, r
    assert [e["name"] for e in run_in(state, "list", "--json").json()] == ["other"]


def test_full_state_dir_during_refresh_says_full_and_names_the_file(tmp_path, small_tmpfs):
    """A refresh whose record cannot be written (state directory full) says so, naming the
    file, in one line, and exits 1."""
    scratch, state = tmp_path / "scratch", small_tmpfs
    scratch.mkdir()
    root = small_dataset(scratch)
    setup_dataset(state, scratch, root)
    fill(state)
    r = run_in(state, "refresh", "--name", "ds")
    assert r.rc == 1, r
    assert "Traceback" not in r.err, r
    text = r.out + r.err
    assert "the disk or quota is full (No space left on device)" in text, r
    assert re.search(r"cannot write %s/\S+" % re.escape(str(state)), text), r


# --------------------------------------------------------------------------- symlinks in the state dir


def tree_contents(root):
    return {p.name: p.read_bytes() for p in Path(root).iterdir()}


def test_symlink_at_logs_name_is_never_followed(tmp_path):
    """A symlink at logs/NAME pointing at a directory of files: log pruning deleted 11 of 30
    of them. The refresh now refuses to log through it (exit 1, naming it), nothing in the
    target changes, pruning leaves it alone, and doctor names the link."""
    scratch, state = tmp_path / "scratch", tmp_path / "state"
    scratch.mkdir()
    root = small_dataset(scratch)
    setup_dataset(state, scratch, root)
    target = tmp_path / "precious"
    target.mkdir()
    for i in range(30):
        (target / ("20200101T0000%02d.000000-touch-1.log" % i)).write_text("keep %d\n" % i)
    (target / "notes.txt").write_text("mine\n")
    before = tree_contents(target)
    link = state / "logs" / "ds"
    os.symlink(str(target), str(link))
    for _ in range(2):
        r = run_in(state, "refresh", "--name", "ds")
        assert r.rc == 1, r
        assert "%s is a symlink" % link in r.out, r
        assert "Traceback" not in r.err, r
    assert tree_contents(target) == before
    sk.Store(str(state)).prune_logs("ds", keep=0)
    assert tree_contents(target) == before
    assert os.path.islink(str(link))

    d = run_in(state, "doctor", "--json")
    assert d.rc == 1, d
    found = [c for c in d.json()["checks"] if c["name"] == "state-links"]
    assert len(found) == 1 and not found[0]["ok"], d.json()
    assert str(link) in found[0]["message"] and "rm" in found[0]["message"], found
    assert tree_contents(target) == before

    os.unlink(str(link))        # what the message says to do
    r = run_in(state, "refresh", "--name", "ds")
    assert r.rc == 0, r
    assert len(os.listdir(str(state / "logs" / "ds"))) == 1
    assert tree_contents(target) == before


def test_symlink_at_a_lock_file_is_never_followed(tmp_path):
    """A symlink at locks/NAME.lock: taking the lock truncated and overwrote its target.
    Now the refresh refuses (exit 1, naming it) and the target keeps its bytes."""
    scratch, state = tmp_path / "scratch", tmp_path / "state"
    scratch.mkdir()
    root = small_dataset(scratch)
    setup_dataset(state, scratch, root)
    target = tmp_path / "precious.txt"
    target.write_bytes(b"do not truncate me\n")
    link = state / "locks" / "ds.lock"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    os.symlink(str(target), str(link))
    before = atimes(root)
    r = run_in(state, "refresh", "--name", "ds")
    assert r.rc == 1, r
    assert "%s is a symlink" % link in r.out + r.err, r
    assert target.read_bytes() == b"do not truncate me\n"
    assert atimes(root) == before
    d = run_in(state, "doctor", "--json")
    assert d.rc == 1 and any(c["name"] == "state-links" and str(link) in c["message"]
                             for c in d.json()["checks"]), d
    assert target.read_bytes() == b"do not truncate me\n"
