"""The manifest engine: what a walk writes, how it survives a chunk boundary, a stop, a
lost partial file and a damaged predecessor, and what `remove` takes with it.

(The user-facing lists, `files`, and the purge simulations are in test_manifest.py.)
"""
import os
from pathlib import Path

import pytest

from conftest import KEEP, NOW_EPOCH, sk

DAY = 86400


def walk_order(root):
    """Every entry below root (root first), in the walk's order, as manifest keys: sorted by
    components, a directory's subtree right after it."""
    out = [b""]

    def visit(rel):
        names = sorted(os.listdir(os.path.join(os.fsencode(root), rel) if rel else
                                  os.fsencode(root)))
        for n in names:
            key = rel + b"\0" + n if rel else n
            out.append(key)
            p = os.path.join(os.fsencode(root), key.replace(b"\0", b"/"))
            if os.path.isdir(p) and not os.path.islink(p):
                visit(key)
    visit(b"")
    return out


def manifest_keys(state, name="ds", index=0):
    path = sk.Store(str(state)).manifests(name)[index][1]
    with sk.Manifest(path) as m:
        assert m.trailer is not None, path
        entries = list(m.entries())
        assert m.trailer["entries"] == len(entries)
        return m.header, [e[0] for e in entries], entries


def setup(cli, env, root):
    assert cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0


@pytest.fixture(scope="session")
def big_tree(tmp_path_factory):
    """A tree of about 40,000 entries: more than two manifest chunks, odd names included.
    Built once per session; see `big` for how tests share it."""
    root = tmp_path_factory.mktemp("big-scratch") / "ds"
    root.mkdir()
    for d in range(8):
        sub = root / ("d%d" % d)
        sub.mkdir()
        for i in range(5000):
            (sub / ("f%05d" % i)).touch()
    for odd in (b"run", b"run-2.txt", b"-dash", b"new\nline", b"\xff\xfe", b"sp ace"):
        os.mkdir(os.path.join(os.fsencode(str(root)), odd))
    (root / "run" / "x").touch()
    assert sk.MANIFEST_CHUNK * 2 < 40100
    return root


@pytest.fixture
def big(big_tree, cli, env):
    """The session's big tree as this test's dataset root: this test's own state dir, whose
    scratch root is the tree's parent. Check walks change no entry of it; afterwards the
    dataset is removed (its sentinel with it) and a file a test deleted is put back, so the
    next test finds the tree as built."""
    order = walk_order(str(big_tree))
    r = cli("init", "--profile", "generic", "--scratch-root", big_tree.parent)
    assert r.rc == 0, r
    yield big_tree
    cli("remove", "--name", "ds")
    for key in set(order) - set(walk_order(str(big_tree))):     # files a test deleted
        big_tree.joinpath(*[os.fsdecode(c) for c in key.split(b"\0")]).touch()
    assert walk_order(str(big_tree)) == order


def test_a_walk_records_every_entry_once_in_walk_order_across_chunks(cli, env, big):
    setup(cli, None, big)
    r = cli("refresh", "--name", "ds", "--check", "--json")
    assert r.rc == 0, r
    res = r.json()["results"][0]
    header, keys, entries = manifest_keys(env["state"])
    assert keys == walk_order(str(big)), "the manifest is not the walk, entry for entry"
    assert len(keys) == res["entries_seen"]
    assert keys.index(b"run\0x") < keys.index(b"run-2.txt")
    assert header["mode"] == "check" and header["dataset"] == "ds"
    with sk.Manifest(res["manifest"]) as m:
        chunks = sum(1 for _ in m.chunks())
    assert chunks >= 3, chunks


def test_a_walk_stopped_twice_and_resumed_records_every_entry_once(cli, env, big):
    setup(cli, None, big)
    for budget in ("7000", "20000"):
        r = cli("refresh", "--name", "ds", "--check", "--max-entries", budget, "--json")
        assert r.rc == 3, r
        assert r.json()["results"][0]["manifest"] is None
    state = env["state"]
    assert sk.Store(str(state)).manifests("ds") == []
    r = cli("refresh", "--name", "ds", "--check", "--json")
    assert r.rc == 0 and r.json()["results"][0]["resumed"], r
    _, keys, _ = manifest_keys(state)
    assert keys == walk_order(str(big))


def test_a_resumed_walk_without_its_partial_manifest_completes_and_says_so(cli, generic):
    root = generic["scratch"] / "ds"
    root.mkdir()
    for i in range(600):
        (root / ("f%03d" % i)).touch()
    setup(cli, generic, root)
    assert cli("refresh", "--name", "ds", "--check", "--max-entries", "300").rc == 3
    os.unlink(str(generic["state"] / "manifests" / "ds" / "partial.skm"))
    r = cli("refresh", "--name", "ds", "--check", "--json")
    assert r.rc == 0, r
    res = r.json()["results"][0]
    assert res["complete"] and res["resumed"] and res["manifest"] is None
    assert "resumed without the start of its manifest" in res["manifest_note"]
    r = cli("refresh", "--name", "ds", "--check", "--json")     # the next walk writes one
    assert r.json()["results"][0]["manifest"], r


def test_a_damaged_previous_manifest_never_fails_the_walk(cli, generic):
    """The walk is what matters: a damaged predecessor makes what vanished unknown, said in
    the result, and the new manifest is kept; the walk after that compares again."""
    root = generic["scratch"] / "ds"
    root.mkdir()
    for i in range(50):
        (root / ("f%02d" % i)).touch()
    setup(cli, generic, root)
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    store = sk.Store(str(generic["state"]))
    first = store.manifests("ds")[0][1]
    data = bytearray(Path(first).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(first).write_bytes(bytes(data))
    os.unlink(str(root / "f07"))
    r = cli("refresh", "--name", "ds", "--check", "--json")
    assert r.rc == 0, r
    res = r.json()["results"][0]
    assert res["complete"] and "what vanished is not known" in res["manifest_note"], res
    assert "is damaged" in res["manifest_note"] and res["entries_vanished"] is None
    assert len(store.manifests("ds")) == 2
    os.unlink(str(root / "f08"))
    res = cli("refresh", "--name", "ds", "--check", "--json").json()["results"][0]
    assert res["entries_vanished"] == 1 and "manifest_note" not in res, res
    text = cli("refresh", "--name", "ds", "--check")
    assert text.rc == 0


def test_vanished_counts_and_likely_purged_from_the_atimes_the_walk_before_found(cli, generic):
    root = generic["scratch"] / "ds"
    (root / "old").mkdir(parents=True)
    for i in range(10):
        (root / "old" / ("o%d" % i)).write_bytes(b"x" * 100)
        os.utime(str(root / "old" / ("o%d" % i)), (NOW_EPOCH - 40 * DAY, NOW_EPOCH - 40 * DAY))
        (root / ("n%d" % i)).write_bytes(b"y" * 10)
        os.utime(str(root / ("n%d" % i)), (NOW_EPOCH - 2 * DAY, NOW_EPOCH - 2 * DAY))
    setup(cli, generic, root)
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    for i in range(4):
        os.unlink(str(root / "old" / ("o%d" % i)))
    for i in range(3):
        os.unlink(str(root / ("n%d" % i)))
    res = cli("refresh", "--name", "ds", "--check", "--json").json()["results"][0]
    assert (res["entries_vanished"], res["bytes_vanished"]) == (7, 430), res
    assert (res["entries_likely_purged"], res["bytes_likely_purged"]) == (4, 400), res
    status = cli("status", "--name", "ds", "--json").json()
    assert status["vanished"]["entries_likely_purged"] == 4
    assert status["manifest"]["entries"] == res["entries_seen"]
    text = cli("status", "--name", "ds").out
    assert "last purge:    found %s: 4 entries (400 B) likely purged between the walks of" \
        % status["last_purge"]["found"] in text, text
    assert "; 3 more deleted or moved; `scratch-keepalive files --name ds --vanished` lists " \
        "them" in text, text


def test_no_manifest_settings_and_remove(cli, generic):
    root = generic["scratch"] / "ds"
    root.mkdir()
    (root / "f").touch()
    setup(cli, generic, root)
    mdir = generic["state"] / "manifests" / "ds"
    r = cli("refresh", "--name", "ds", "--check", "--no-manifest", "--json")
    assert r.rc == 0 and r.json()["results"][0]["manifest"] is None
    assert not mdir.exists() or not list(mdir.iterdir())
    assert cli("extend", "--name", "ds", "--no-manifest").rc == 0
    assert cli("list", "--json").json()[0]["keep_manifests"] is False
    assert cli("refresh", "--name", "ds", "--check", "--json").json()["results"][0][
        "manifest"] is None
    r = cli("extend", "--name", "ds", "--manifest", "--no-manifest")
    assert r.rc == 2 and "not allowed with" in r.err
    assert cli("list", "--json").json()[0]["keep_manifests"] is False
    assert cli("extend", "--name", "ds", "--manifest").rc == 0
    for _ in range(3):
        assert cli("refresh", "--name", "ds", "--check").rc == 0
    assert sorted(p.name for p in mdir.iterdir()) == ["manifest-000002.skm",
                                                        "manifest-000003.skm"]
    assert cli("remove", "--name", "ds").rc == 0
    assert not mdir.exists()


def test_doctor_warns_when_manifests_crowd_the_state_directory(tmp_path, mounts):
    """A real small filesystem (tmpfs) for the state directory, filled up after a walk so
    that the manifests hold more than a tenth of what is left."""
    import json
    from conftest import run_script
    fs = tmp_path / "statefs"
    fs.mkdir()
    mounts("-t", "tmpfs", "-o", "size=4m", "tmpfs", fs)
    scratch = tmp_path / "scratch"
    (scratch / "ds").mkdir(parents=True)
    for i in range(2000):
        (scratch / "ds" / ("file-%06d-%d" % (i, i * 7919))).touch()
    state = fs / "state"
    env = {"SCRATCH_KEEPALIVE_HOME": str(state), "SCRATCH_KEEPALIVE_NOW": "2030-01-01"}
    for argv in (["init", "--profile", "generic", "--scratch-root", str(scratch)],
                 ["add", "--name", "ds", "--path", str(scratch / "ds"), "--keep-until",
                  KEEP], ["refresh", "--name", "ds", "--check"]):
        assert run_script(*argv, env=env).rc == 0
    checks = dict((c["name"], c) for c in json.loads(
        run_script("doctor", "--json", env=env).out)["checks"])
    assert checks["manifests"]["level"] == "ok", checks["manifests"]
    st = os.statvfs(str(fs))
    with open(str(fs / "filler"), "wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize - 8192))
    checks = dict((c["name"], c) for c in json.loads(
        run_script("doctor", "--json", env=env).out)["checks"])
    assert checks["manifests"]["level"] == "warn", checks["manifests"]
    assert "--no-manifest" in checks["manifests"]["message"]


def test_fail_on_risk_exits_1_for_entries_likely_purged_in_touch_mode(cli, generic,
                                                                     monkeypatch):
    """A touch-mode dataset: what its walk touched and the user then deleted is not likely
    purged (the touch was its last access); what vanishes once purge days have passed
    since that touch is, and only --fail-on-risk turns that into exit 1."""
    root = generic["scratch"] / "ds"
    root.mkdir()
    for i in range(6):
        (root / ("f%d" % i)).write_bytes(b"z" * 5)
        os.utime(str(root / ("f%d" % i)), (NOW_EPOCH - 45 * DAY, NOW_EPOCH - 45 * DAY))
    setup(cli, generic, root)
    r = cli("refresh", "--name", "ds", "--fail-on-risk", "--json")
    assert r.rc == 0, r         # touched: purge-eligible as found, but in touch mode
    assert r.json()["results"][0]["entries_touched"] == 8      # root, sentinel, 6 files
    os.unlink(str(root / "f1"))
    os.unlink(str(root / "f2"))
    plain = cli("refresh", "--name", "ds", "--json")
    assert plain.rc == 0, plain
    res = plain.json()["results"][0]
    assert (res["entries_vanished"], res["entries_likely_purged"]) == (2, 0), res
    # the user's own deletions: reported by the walk, not recorded as a purge
    assert cli("status", "--name", "ds", "--json").json()["last_purge"] is None
    assert [a for a in cli("status", "--brief", "--json").json() if a["name"]] == []
    # A month without a walk: f3 vanishes 31 days after the walk that touched it.
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(NOW_EPOCH + 31 * DAY))
    os.unlink(str(root / "f3"))
    r = cli("refresh", "--name", "ds", "--fail-on-risk", "--json")
    assert r.rc == 1, r
    assert r.json()["results"][0]["entries_likely_purged"] == 1, r
    assert r.json()["results"][0]["entries_vanished"] == 1


def test_the_keys_digest_does_not_depend_on_how_batches_were_cut(cli, env, big):
    """Walks of the same tree inline, with worker processes and with threads cut their
    batches differently (256, 256 with the inline fallback, 32 entries), yet their digests
    agree; one file less, and they differ (and the merge then runs and finds it)."""
    setup(cli, None, big)
    digests = []
    for argv in (["--workers", "1", "--threads", "1"], ["--workers", "2"], ["--threads", "4"]):
        r = cli("refresh", "--name", "ds", "--check", "--json", *argv)
        assert r.rc == 0, r
        with sk.Manifest(r.json()["results"][0]["manifest"]) as m:
            digests.append(m.trailer["keys_digest"])
        assert r.json()["results"][0]["entries_vanished"] in (None, 0)    # None: the first
    assert digests[0] and len(set(digests)) == 1, digests
    os.unlink(str(big / "d3" / "f01234"))
    r = cli("refresh", "--name", "ds", "--check", "--json")
    res = r.json()["results"][0]
    with sk.Manifest(res["manifest"]) as m:
        assert m.trailer["keys_digest"] != digests[0]
    assert res["entries_vanished"] == 1, res
