"""rescue under attack: what a hostile or careless change to the tree, the destination or
the state while a rescue runs can make it do.

A rescue copies the dataset's files, and only those, into the destination, and only
there. Each test below makes one change at the worst moment and then looks at both
sides. The moment is made exact by running the rescue in a forked child of the test,
whose own code (not the module's) makes the change when the rescue reaches the point:
no timing, no test seam in the tool.
"""
import ctypes
import json
import os
import signal
import socket
import subprocess
import traceback

import pytest

from conftest import KEEP, set_atime, sk

OLD = 1577836800.0          # 2020-01-01: at risk under the generic profile


def old_tree(root, files):
    """Files {relative path: bytes} below root, every entry's atime old."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for dp, dns, fns in os.walk(str(root)):
        for n in dns + fns:
            set_atime(os.path.join(dp, n), OLD)


def registered(cli, root):
    assert cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0
    assert cli("refresh", "--name", "ds", "--check").rc == 0


def in_child(body):
    """Run body() in a forked child; its exit status (-signal when killed)."""
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            code = body()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code if isinstance(code, int) else 0)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def at_checkpoint(when, then):
    """In a child of in_child(): call then() right after the rescue saves a checkpoint
    whose cursor's path (the names of the last entry done) when() accepts."""
    real = sk.Store.save_checkpoint

    def save(store, name, doc, kind="walk"):
        real(store, name, doc, kind)
        if kind == "rescue" and when((doc.get("cursor") or {}).get("path")):
            then()
    sk.Store.save_checkpoint = save


def files_below(top):
    out = {}
    for dp, dns, fns in os.walk(str(top)):
        for n in fns:
            p = os.path.join(dp, n)
            out[os.path.relpath(p, str(top))] = open(p, "rb").read()
    return out


def test_a_bind_mount_made_after_the_walk_is_not_copied(generic, cli, tmp_path, mounts):
    """`mount --bind OUTSIDE DATASET/sub` after the walk: the rescue does not enter the
    mount, copies nothing of OUTSIDE, copies the rest, and says so (exit 1)."""
    root = generic["scratch"] / "ds"
    old_tree(root, {"sub/data.txt": b"the dataset's", "top.txt": b"top"})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.txt").write_bytes(b"OUTSIDE")
    registered(cli, root)
    mounts("--bind", outside, root / "sub")
    dest = tmp_path / "safe"
    r = cli("rescue", "--name", "ds", "--to", dest, "--all", "--json")
    assert r.rc == 1, r
    res = json.loads(r.out)
    got = files_below(dest)
    assert b"OUTSIDE" not in got.values()
    assert got == {"top.txt": b"top"}
    assert res["errors"] >= 1
    assert any("mount" in (e.get("why") or "") for e in res["not_rescued"]), res


def test_the_destination_is_opened_once_and_a_swapped_parent_is_seen(generic, cli, tmp_path,
                                                                     monkeypatch):
    """The destination's parent is swapped for a symlink into scratch between the checks
    and the first write: the rescue writes nothing into scratch and says why (exit 2)."""
    root = generic["scratch"] / "ds"
    old_tree(root, {"a.bin": b"a" * 4096, "b/c.bin": b"c" * 4096})
    registered(cli, root)
    safe = tmp_path / "safe"
    safe.mkdir()
    decoy = generic["scratch"] / "decoy"
    decoy.mkdir()
    real = sk.check_rescue_dest

    def check_then_swap(*args, **kw):
        out = real(*args, **kw)
        os.rename(str(safe), str(tmp_path / "safe.moved"))
        os.symlink(str(decoy), str(safe))
        return out
    monkeypatch.setattr(sk, "check_rescue_dest", check_then_swap)
    r = cli("rescue", "--name", "ds", "--to", safe / "ds", "--all")
    assert r.rc == 2, r
    assert "changed" in r.err and r.err.count("\n") == 1, r.err
    assert os.listdir(str(decoy)) == []
    assert not (tmp_path / "safe.moved" / "ds").exists()


def _exchange(dirfd, a, b):
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.syscall(316, dirfd, a.encode(), dirfd, b.encode(), 2)    # renameat2, EXCHANGE
    if rc:
        raise OSError(ctypes.get_errno(), "renameat2")


def test_a_symlink_swapped_for_a_file_while_its_atime_is_put_back(generic, cli, tmp_path,
                                                                  monkeypatch):
    """The symlink and a regular file are exchanged right after the link is read: no time
    of the regular file changes (a time is never set on a source by name)."""
    if os.uname().machine != "x86_64":
        pytest.skip("the renameat2 syscall number is x86_64's")
    root = generic["scratch"] / "ds"
    old_tree(root, {"plain.txt": b"plain"})
    os.symlink("plain.txt", str(root / "link"))
    set_atime(root / "link", OLD)
    registered(cli, root)
    os.utime(str(root / "plain.txt"), ns=(int(OLD * 1e9), 1234567890123456789))
    before = os.lstat(str(root / "plain.txt"))
    real = os.readlink

    def readlink_then_swap(path, *a, **kw):
        out = real(path, *a, **kw)
        # rescue's reading of the source link (in whichever process copies), once
        if "dir_fd" in kw and os.path.islink(str(root / "link")):
            fd = os.open(str(root), os.O_RDONLY | os.O_DIRECTORY)
            try:
                _exchange(fd, "link", "plain.txt")
            finally:
                os.close(fd)
        return out
    monkeypatch.setattr(sk.os, "readlink", readlink_then_swap)
    r = cli("rescue", "--name", "ds", "--to", tmp_path / "safe", "--all", "--json")
    monkeypatch.setattr(sk.os, "readlink", real)
    swapped = not os.path.islink(str(root / "link"))
    assert swapped and r.rc in (0, 1), r
    now_file = os.lstat(str(root / "link"))         # the regular file, under its new name
    assert (now_file.st_mtime_ns, now_file.st_atime_ns) == (before.st_mtime_ns,
                                                            before.st_atime_ns)


def test_a_file_named_like_a_temp_file_is_the_users_and_is_kept(generic, cli, tmp_path):
    """Only temporary files this rescue (or the checkpointed one it resumes) made are ever
    deleted: a file of the user's with such a name stays."""
    root = generic["scratch"] / "ds"
    old_tree(root, {"a.txt": b"a", "d/b.txt": b"b"})
    registered(cli, root)
    dest = tmp_path / "safe"
    (dest / "d").mkdir(parents=True)
    host = sk.re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:32]
    names = [".scratch-keepalive-rescue.%s.%d.abcdefgh.tmp" % (host, 2 ** 22 + 1),
             ".scratch-keepalive-rescue.otherhost.1.abcdefgh.tmp"]
    for n in names:
        (dest / n).write_bytes(b"mine")
        (dest / "d" / n).write_bytes(b"mine")
        os.utime(str(dest / n), (OLD, OLD))
    r = cli("rescue", "--name", "ds", "--to", dest, "--all", "--json")
    assert r.rc == 0, r
    assert json.loads(r.out)["temps_removed"] == 0
    for n in names:
        assert (dest / n).read_bytes() == b"mine"
        assert (dest / "d" / n).read_bytes() == b"mine"


def test_killed_right_after_a_checkpoint_directories_still_get_their_mode_and_mtime(
        generic, cli, tmp_path, monkeypatch):
    """SIGKILL right after the checkpoint that records the last entry of directory d: the
    resumed rescue gives d its source's mode and mtime (not 0700 and the copy's time)."""
    root = generic["scratch"] / "ds"
    old_tree(root, {"d/a.txt": b"a", "d/b.txt": b"b", "e.txt": b"e", "f/g.txt": b"g"})
    os.chmod(str(root / "d"), 0o751)
    os.utime(str(root / "d"), ns=(int(OLD * 1e9), 1111111111000000000))
    registered(cli, root)
    dest = tmp_path / "safe"
    def first():
        at_checkpoint(lambda c: c == ["d", "b.txt"], lambda: os.kill(os.getpid(), signal.SIGKILL))
        sk.rescue("ds", str(dest), all=True, checkpoint_every=0)
    assert in_child(first) == -signal.SIGKILL
    assert (dest / "d" / "b.txt").exists()
    r = cli("rescue", "--name", "ds", "--to", dest, "--all", "--json")
    assert r.rc == 0, r
    res = json.loads(r.out)
    assert res["resumed"] and res["complete"]
    st = os.stat(str(dest / "d"))
    assert (oct(st.st_mode & 0o7777), st.st_mtime_ns) == (oct(0o751), 1111111111000000000)
    assert files_below(dest) == {"d/a.txt": b"a", "d/b.txt": b"b", "e.txt": b"e",
                                 "f/g.txt": b"g"}


def test_a_directory_moved_out_during_a_deep_rescue_is_not_followed(generic, cli, tmp_path,
                                                                    monkeypatch):
    """A chain deeper than the fd cap, with a file "f" at every level. While the rescue is
    at the bottom, a directory halfway up is moved out of the dataset, into a place whose
    every level also holds an "f" (a decoy). Climbing back through "..", the first level
    that is not the directory it left fails its identity check: its subtree is an error
    (counted, logged, not copied further), nothing of the decoy is copied, the rest of the
    rescue goes on, and it exits 1."""
    depth = sk.MAX_OPEN_DIRS * 3
    root = generic["scratch"] / "ds"
    outside = tmp_path / "outside"
    path, decoy = root / "chain", outside
    for i in range(depth):
        path, decoy = path / ("L%03d" % i), decoy / ("L%03d" % i)
        path.mkdir(parents=True)
        decoy.mkdir(parents=True)
        (path / "f").write_bytes(b"level %d" % i)
        (decoy / "f").write_bytes(b"DECOY")
    (root / "zz.txt").write_bytes(b"after the chain")
    (outside / "f").write_bytes(b"DECOY")
    old_tree(root, {})
    registered(cli, root)
    bottom = ["chain"] + ["L%03d" % i for i in range(depth)] + ["f"]
    cut = depth // 2
    moved = root.joinpath(*bottom[:cut + 1])     # chain/L000/.../L(cut-1)
    hide = outside.joinpath(*["L%03d" % i for i in range(cut - 1)])
    dest = tmp_path / "safe"

    def move():
        os.rename(str(moved), str(hide / (moved.name + ".moved")))
    def run():
        at_checkpoint(lambda c: c == bottom, move)
        r = sk.rescue("ds", str(dest), all=True, checkpoint_every=0)
        with open(str(tmp_path / "result.json"), "w") as f:
            json.dump(r, f)
        return 0
    assert in_child(run) == 0
    res = json.loads((tmp_path / "result.json").read_text())
    got = files_below(dest)
    try:
        assert b"DECOY" not in got.values()
        assert got["zz.txt"] == b"after the chain"
        assert res["exit_code"] == 1 and res["errors"] >= 1 and res["complete"], res
        assert any("moved" in (e.get("why") or "") for e in res["not_rescued"]), res
    finally:
        subprocess.run(["rm", "-rf", "--", str(root), str(outside), str(dest)])


@pytest.mark.parametrize("threads", [1, 4])
def test_a_file_that_became_a_directory_since_the_walk_is_an_error(generic, cli, tmp_path,
                                                                   threads):
    """Its contents are not in the manifest: it is not copied as an empty directory, nor
    entered; the rest is copied and the rescue exits 1."""
    root = generic["scratch"] / "ds"
    old_tree(root, {"was-a-file": b"x", "z.txt": b"z"})
    registered(cli, root)
    (root / "was-a-file").unlink()
    (root / "was-a-file").mkdir()
    (root / "was-a-file" / "inner").write_bytes(b"new")
    r = cli("rescue", "--name", "ds", "--to", tmp_path / "safe", "--all", "--threads",
            threads, "--json")
    assert r.rc == 1, r
    res = json.loads(r.out)
    assert files_below(tmp_path / "safe") == {"z.txt": b"z"}
    assert not (tmp_path / "safe" / "was-a-file").exists()
    assert [(e["path"], e["reason"]) for e in res["not_rescued"]] == [("was-a-file", "error")]
    assert "became a directory" in res["not_rescued"][0]["why"]


def test_a_destination_that_is_not_where_it_was_checked_is_refused(generic, cli, tmp_path,
                                                                   monkeypatch):
    """The kernel says the opened DIR is somewhere else than the path checked (a rename
    while it was opened): exit 2, one line, nothing copied."""
    root = generic["scratch"] / "ds"
    old_tree(root, {"a.txt": b"a"})
    registered(cli, root)
    real = os.readlink

    def elsewhere(path, *a, **kw):
        if isinstance(path, str) and path.startswith("/proc/self/fd/"):
            return str(generic["scratch"] / "elsewhere")
        return real(path, *a, **kw)
    monkeypatch.setattr(sk.os, "readlink", elsewhere)
    r = cli("rescue", "--name", "ds", "--to", tmp_path / "safe", "--all")
    monkeypatch.setattr(sk.os, "readlink", real)
    assert r.rc == 2 and r.err.count("\n") == 1, r
    assert "changed after it was checked: it is now" in r.err and "elsewhere" in r.err, r
    assert os.listdir(str(tmp_path / "safe")) == []
