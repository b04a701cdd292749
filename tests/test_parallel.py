"""Worker processes and threads change speed, never the result: counts, touches, cursor, resume."""
import os

import pytest

from conftest import NOW_EPOCH, DAY, set_atime, snapshot
import scratch_keepalive as sk

CFG = {"profile": "generic", "purge_days": 30}
MODES = [{"workers": 1}, {"workers": 2}, {"workers": 3}, {"threads": 4}]


def build(root):
    """Nested dirs, odd names, symlinks, empty dirs, mixed ages: ~1,200 entries."""
    root.mkdir()
    rb = os.fsencode(str(root))
    for i in range(6):
        d = os.path.join(rb, b"d%d" % i)
        os.mkdir(d)
        os.mkdir(os.path.join(d, b"empty"))
        for j in range(150):
            name = [b"f%03d" % j, b"-x%03d" % j, b"sp %03d" % j, b"\xff%03d" % j][j % 4]
            with open(os.path.join(d, name), "wb") as f:
                f.write(b"x" * j)
        sub = os.path.join(d, b"sub")
        os.mkdir(sub)
        for j in range(40):
            os.close(os.open(os.path.join(sub, b"g%02d" % j), os.O_CREAT | os.O_WRONLY, 0o644))
        os.symlink(b"../d0", os.path.join(d, b"link"))
    for k, p in enumerate(sorted(snapshot(root))):
        if k % 3 == 0:
            set_atime(os.path.join(str(root), p) if p != "." else str(root),
                      NOW_EPOCH - (k % 40) * DAY)


def walk(root, mode, kind, **kw):
    w = sk.Walker(str(root), mode, sk.thresholds_ns(CFG, 14, NOW_EPOCH), **kind)
    try:
        done = w.run(**kw)
        return done, w.counts.as_dict(), w.cursor() if not done else None
    finally:
        w.close()


@pytest.mark.parametrize("mode", ["check", "touch"])
def test_same_counts_and_touches_in_every_configuration(tmp_path, mode):
    results = []
    for i, kind in enumerate(MODES):
        root = tmp_path / ("t%d" % i)
        build(root)
        before = snapshot(root)
        done, counts, _ = walk(root, mode, kind)
        after = snapshot(root)
        touched = sorted(k for k in before if after[k][0] != before[k][0])
        assert all(after[k][1] == before[k][1] for k in before)      # mtime exact
        results.append((done, counts, touched, sorted(before)))
    first = results[0]
    assert first[0] is True and first[1]["entries_seen"] == len(first[3])
    for kind, r in zip(MODES[1:], results[1:]):
        assert r[1] == first[1], kind
        assert r[2] == first[2], kind
    if mode == "check":
        assert first[2] == []


def test_stop_points_and_resume_agree(tmp_path):
    root = tmp_path / "t"
    build(root)
    total = walk(root, "check", {"workers": 1})[1]["entries_seen"]
    for k in (1, 2, 7, 151, 152, 400, total - 1):
        positions = []
        for kind in MODES:
            done, counts, cursor = walk(root, "check", kind, max_entries=k)
            assert done is False and counts["entries_seen"] == k, kind
            positions.append(cursor)
            done2, counts2, _ = walk(root, "check", kind, cursor=cursor)
            assert done2 is True and counts2["entries_seen"] == total - k, (kind, k)
        assert all(p == positions[0] for p in positions), (k, positions)


def test_refresh_cli_workers_option(cli, generic):
    root = generic["scratch"] / "ds"
    build(root)
    from conftest import KEEP
    assert cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0
    a = cli("refresh", "--name", "ds", "--check", "--workers", "1", "--json").json()
    b = cli("refresh", "--name", "ds", "--check", "--workers", "2", "--json").json()
    keys = sk.Counts.FIELDS
    assert [a["results"][0][k] for k in keys] == [b["results"][0][k] for k in keys]
    r = cli("refresh", "--name", "ds", "--workers", "0")
    assert r.rc == 2 and "out of range" in r.err


def test_a_worker_batch_of_the_longest_names_fits_its_message(tmp_path):
    """A directory of names of 255 bytes (NAME_MAX): full worker batches are the largest
    messages a walk sends; every name arrives and is counted, touched and recorded."""
    root = tmp_path / "ds"
    root.mkdir()
    n = 3 * sk.BATCH + 7
    paths = [str(root / (("%05d" % i) + "n" * 250)) for i in range(n)]
    for p in paths:
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
    for kind in ({"workers": 1}, {"workers": 2}):
        for p in paths:
            set_atime(p, NOW_EPOCH - 20 * DAY)
        set_atime(str(root), NOW_EPOCH)     # recent: skipped
        done, counts, _ = walk(root, "touch", kind)
        assert done and counts["entries_seen"] == n + 1, counts
        assert counts["entries_touched"] == n and counts["errors"] == 0, counts


NOOPTS = type("Opts", (), {"threads": None, "workers": None})()


def test_default_parallelism_follows_the_filesystem(tmp_path, monkeypatch):
    kind = sk.fs_type(str(tmp_path))
    assert kind and kind not in sk.NETWORK_FS
    assert sk.parallelism(NOOPTS, str(tmp_path)) == (1, sk.default_workers())
    monkeypatch.setattr(sk, "fs_type", lambda path: "lustre" if path.startswith("/N/") else kind)
    assert sk.parallelism(NOOPTS, "/N/scratch/alice/x") == (16, 1)
    # a copy: either side on a network filesystem is enough
    assert sk.parallelism(NOOPTS, str(tmp_path), "/N/project/lab/x") == (16, 1)
    assert sk.parallelism(NOOPTS, str(tmp_path), str(tmp_path)) == (1, sk.default_workers())


def test_fs_type_follows_a_symlink_onto_another_mount(tmp_path):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("needs /dev/shm")
    here, there = sk.fs_type(str(tmp_path)), sk.fs_type("/dev/shm")
    if here == there:
        pytest.skip("the temp dir and /dev/shm are the same kind of filesystem (%s)" % here)
    link = tmp_path / "link"
    os.symlink("/dev/shm", str(link))
    assert sk.fs_type(str(link)) == there
    assert sk.fs_type(str(link / "x")) == there
