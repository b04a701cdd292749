"""What the tool tells its user: one attention rule behind every view, the purge record
and what of it is safe, `--due --name`, and doctor's exit code.

One test drives every view (list, status, status --brief, doctor, refresh --fail-on-risk)
over the same table of dataset states and checks that they agree.
"""
import json
import os
import sys
import shutil

import pytest

from conftest import KEEP, NOW_EPOCH, DAY, make_dataset, set_atime, snapshot
import scratch_keepalive as sk


def age_all(root, days):
    for rel in snapshot(root):
        set_atime(root if rel == "." else root / rel, NOW_EPOCH - days * DAY)


def registry(env):
    return sk.Store(str(env["state"])).load_registry()["datasets"]


def edit_entry(env, name, **fields):
    with sk.Store(str(env["state"])).update_registry() as reg:
        reg["datasets"][name].update(fields)


def add(cli, env, name, keep=KEEP, files=3, check=False, age=None, rescue_to=None):
    d = make_dataset(env["scratch"], name, files=files)
    argv = ["add", "--name", name, "--path", d, "--keep-until", keep]
    if rescue_to:
        argv += ["--rescue-to", rescue_to]
    assert cli(*argv).rc == 0
    if age is not None:
        age_all(d, age)
    if check is not None:
        r = cli("refresh", "--name", name, *(["--check"] if check else []))
        assert r.rc in (0, 1), r
    return d


# ---------------------------------------------------------------- one table, every view

def build_states(cli, env, tmp_path):
    """{name: the attention codes it must have}, each a dataset in one state directory."""
    want = {}
    add(cli, env, "quiet")                                  # touch walk: all refreshed
    want["quiet"] = []
    add(cli, env, "refreshed", age=40, check=False)         # old entries, touched: none left
    want["refreshed"] = []
    add(cli, env, "eligible", check=True)                   # check walk, years old
    want["eligible"] = ["purge-eligible"]
    add(cli, env, "aging", age=20, check=True)              # check walk, 20 days old
    want["aging"] = ["at-risk"]
    add(cli, env, "copied", check=True)                     # check walk, then rescued
    r = cli("rescue", "--name", "copied", "--to", str(tmp_path / "safe" / "copied"), "--all")
    assert r.rc == 0, r
    want["copied"] = []
    add(cli, env, "errors")
    edit_entry(env, "errors", last_run=dict(registry(env)["errors"]["last_run"], errors=2))
    want["errors"] = ["errors"]
    add(cli, env, "expiring", keep="2030-01-10")
    want["expiring"] = ["expiring"]
    d = add(cli, env, "expired", check=True)                # old data, but let go:
    edit_entry(env, "expired", keep_until="2029-12-01")    # only "expired" is asked
    want["expired"] = ["expired"]
    d = add(cli, env, "missing")
    shutil.rmtree(str(d))
    assert cli("refresh", "--name", "missing").rc == 1     # the refresh records it
    want["missing"] = ["missing"]
    add(cli, env, "stalled", age=40, check=None)
    r = cli("refresh", "--name", "stalled", "--max-entries", "2")
    assert r.rc == 3, r
    store = sk.Store(str(env["state"]))
    ck = store.load_checkpoint("stalled")
    store.save_checkpoint("stalled", dict(ck, updated=sk.iso(NOW_EPOCH - 20 * DAY)))
    want["stalled"] = ["stalled"]
    d = add(cli, env, "purged", check=True)
    shutil.rmtree(str(d / "sub"))
    assert cli("refresh", "--name", "purged", "--check").rc == 0
    want["purged"] = ["purged", "purge-eligible"]
    return want


def test_every_view_agrees_on_a_table_of_states(cli, generic, tmp_path):
    want = build_states(cli, generic, tmp_path)
    # list --json and status --json: the same codes, as the table says
    listed = dict((e["name"], e) for e in cli("list", "--json").json())
    status = dict((e["name"], e) for e in cli("status", "--json").json())
    assert dict((n, e["attention"]) for n, e in listed.items()) == want
    assert dict((n, e["attention"]) for n, e in status.items()) == want
    # status --brief: a line exactly for the datasets that need their user
    alerts = [a for a in cli("status", "--brief", "--json").json() if a["name"]]
    assert dict((a["name"], a["attention"]) for a in alerts) == dict(
        (n, c) for n, c in want.items() if c)
    text = cli("status", "--brief").out.splitlines()
    for n, codes in want.items():
        assert any(l.startswith("scratch-keepalive: %s: " % n) for l in text) == bool(codes)
    # text never shows one as fine while it needs its user
    out = cli("status").out
    for n, codes in want.items():
        head = [l for l in out.splitlines() if l.startswith(n + ": ")][0]
        assert (" ok (" in head or head.startswith(n + ": ok")) <= (not codes), head
        assert ("needs attention: " + ", ".join(codes) in head) == bool(codes), head
    rows = cli("list").out.splitlines()[1:]
    for n, codes in want.items():
        row = [r.split() for r in rows if r.split() and r.split()[0] == n][0]
        assert (row[1] == "ok") <= (not codes) and row[2] == (",".join(codes) or "-"), row
    # doctor: the data is information (level info, ok), one line per code
    rep = cli("doctor", "--json").json()
    info = sorted(c["name"] for c in rep["checks"] if c["level"] == "info"
                  and c["name"].split(":")[0] in sk.ATTENTION_CODES)
    assert info == sorted("%s:%s" % (c, n) for n, codes in want.items() for c in codes
                          if n != "missing")    # a missing root is a FAIL of its own
    assert all(c["ok"] for c in rep["checks"] if c["level"] == "info")
    # --fail-on-risk, judging each dataset's last run by the same codes: it fails for
    # purge-eligible or a purge that run found, never for a keep-until, errors or copies
    ctx = sk.Context()
    fails = dict((n, sk.risk_exit_code([0], sk.risk_found(ctx, [registry(generic)[n][
        "last_run"]]))) for n in want)
    assert fails == dict((n, int("purge-eligible" in c or "purged" in c)) for n, c in
                         want.items()), fails
    # the risk field: what remains, every owner's (the refreshed one has none left)
    assert listed["refreshed"]["risk"] == "none" and listed["eligible"]["risk"] == \
        "purge-eligible" and listed["copied"]["risk"] == "purge-eligible"


def test_fail_on_risk_reads_the_same_codes(cli, generic, tmp_path, monkeypatch):
    """A scheduled job fails for purge-eligible (check mode) or a purge its walk found; not
    for a keep-until, a copied dataset, or a purge an earlier walk found."""
    add(cli, generic, "soon", keep="2030-01-05")
    r = cli("refresh", "--name", "soon", "--fail-on-risk")
    assert r.rc == 0 and registry(generic)["soon"]["keep_until"] == "2030-01-05", r
    add(cli, generic, "plain", check=None)
    r = cli("refresh", "--name", "plain", "--check", "--fail-on-risk")
    assert r.rc == 1 and "plain (10 entries purge-eligible)" in r.out, r
    # With --rescue-to, the scheduled run copies what is at risk after its walk: quiet.
    add(cli, generic, "copied", check=None, rescue_to=str(tmp_path / "safe"))
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    r = cli("refresh", "--name", "copied", "--due", "--check", "--fail-on-risk", "--scheduled",
            "scrontab")
    assert r.rc == 0, r
    monkeypatch.delenv("SLURM_JOB_ID")
    assert cli("status", "--name", "copied", "--json").json()["attention"] == []
    d = add(cli, generic, "gone", age=40, check=True)     # the walk saw them 40 days old
    os.unlink(str(d / "f1"))
    r = cli("refresh", "--name", "gone", "--fail-on-risk")    # touch mode: found the purge
    assert r.rc == 1 and "gone (1 entry likely purged)" in r.out, r
    r = cli("refresh", "--name", "gone", "--fail-on-risk")    # nothing new vanished
    assert r.rc == 0, r
    assert cli("status", "--name", "gone", "--json").json()["attention"] == ["purged"]


# ---------------------------------------------------------------- the purge record

def purge_setup(cli, env, touch=False):
    d = add(cli, env, "ds", files=4, check=None)
    age_all(d, 40)
    assert cli("refresh", "--name", "ds", *([] if touch else ["--check"])).rc == 0
    return d


def test_a_purge_stays_on_record_through_later_walks_until_listed(cli, generic):
    d = purge_setup(cli, generic)       # the check walk saw every entry 40 days old
    os.unlink(str(d / "f1"))
    os.unlink(str(d / "f2"))
    r = cli("refresh", "--name", "ds", "--check", "--json").json()["results"][0]
    assert (r["entries_vanished"], r["entries_likely_purged"]) == (2, 2), r
    first = cli("status", "--name", "ds", "--json").json()["last_purge"]
    assert first["entries_vanished"] == 2 and first["bytes_vanished"] == 2 + 3 and \
        first["entries_likely_purged"] == 2 and first["entries_without_copy"] == 2, first
    for _ in range(2):                      # two later walks that find nothing new
        r = cli("refresh", "--name", "ds", "--check", "--json").json()["results"][0]
        assert r["entries_vanished"] == 0, r
        assert cli("status", "--name", "ds", "--json").json()["last_purge"] == first
        kinds = [a["attention"] for a in cli("status", "--brief", "--json").json()]
        assert kinds and "purged" in kinds[0], kinds
        r = cli("files", "--name", "ds", "--vanished", "--json")
        assert sorted(json.loads(l)["path"] for l in r.out.splitlines()) == ["f1", "f2"]
        # (--json listed it to the end: seen; put it back to unseen for the next round)
        edit_entry(generic, "ds", purge=dict(registry(generic)["ds"]["purge"], seen=None))
    text = cli("status", "--name", "ds").out
    assert "last purge:    found %s: 2 entries (5 B) likely purged between the walks of" \
        % first["found"] in text, text
    # listed to the end (any form): no longer named at login
    r = cli("files", "--name", "ds", "--vanished", "-0")
    assert r.rc == 0 and sorted(r.out.split("\0")[:-1]) == ["f1", "f2"], r
    assert registry(generic)["ds"]["purge"]["seen"]
    assert cli("status", "--brief", "--json").json() == [] or all(
        "purged" not in a["attention"] for a in cli("status", "--brief", "--json").json())
    assert cli("files", "--name", "ds", "--vanished").rc == 0      # still listed
    # a newer purge replaces it; remove deletes it
    os.unlink(str(d / "f3"))
    cli("refresh", "--name", "ds", "--check")
    newer = cli("status", "--name", "ds", "--json").json()["last_purge"]
    assert newer["entries_vanished"] == 1 and newer["seen"] is None, newer
    files = os.listdir(str(generic["state"] / "manifests" / "ds"))
    assert [f for f in files if f.startswith("purge-")] == [
        registry(generic)["ds"]["purge"]["file"]], files
    assert cli("remove", "--name", "ds").rc == 0
    assert not (generic["state"] / "manifests" / "ds").exists()


def test_a_purge_is_named_for_14_days_then_not(cli, generic, monkeypatch):
    d = purge_setup(cli, generic)
    os.unlink(str(d / "f1"))
    cli("refresh", "--name", "ds", "--check")
    assert "purged" in cli("status", "--name", "ds", "--json").json()["attention"]
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(NOW_EPOCH + 13 * DAY))
    assert "purged" in cli("status", "--name", "ds", "--json").json()["attention"]
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(NOW_EPOCH + 14 * DAY + 60))
    st = cli("status", "--name", "ds", "--json").json()
    assert "purged" not in st["attention"] and st["last_purge"]["entries_vanished"] == 1


def test_likely_purged_counts_a_touch_as_the_last_access(cli, generic):
    """A touch walk refreshed f1; the user deleted it; the next walk must not call it likely
    purged (its atime as found was old, its atime as the walk left it was new)."""
    d = purge_setup(cli, generic, touch=False)
    age_all(d, 40)
    assert cli("refresh", "--name", "ds").rc == 0           # generic: touch mode
    os.unlink(str(d / "f1"))
    r = cli("refresh", "--name", "ds", "--json").json()["results"][0]
    assert (r["entries_vanished"], r["entries_likely_purged"]) == (1, 0), r
    r = cli("files", "--name", "ds", "--vanished")
    assert r.out == "f1\tdeleted or moved\tno copy\n", r


def test_what_is_safe_is_a_copy_of_the_same_size_and_mtime(cli, generic, tmp_path):
    dest = tmp_path / "safe"
    d = purge_setup(cli, generic)
    age_all(d, 40)
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    assert cli("rescue", "--name", "ds", "--to", str(dest), "--all").rc == 0
    # f1 changes in place after the copy (same size, a new mtime); f2 does not
    with open(str(d / "f1"), "r+b") as f:
        f.write(b"Z")
    os.utime(str(d / "f1"), ns=(int((NOW_EPOCH - 40 * DAY) * 1e9),
                                 os.stat(str(dest / "f1")).st_mtime_ns + 10 ** 9))
    assert os.path.getsize(str(d / "f1")) == os.path.getsize(str(dest / "f1"))
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    age_all(d, 40)
    os.unlink(str(d / "f1"))
    os.unlink(str(d / "f2"))
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    p = cli("status", "--name", "ds", "--json").json()["last_purge"]
    assert (p["entries_with_copy"], p["entries_without_copy"]) == (1, 1), p
    assert (p["likely_purged_with_copy"], p["likely_purged_without_copy"]) == (1, 1), p
    assert "2 entries (5 B) likely purged between the walks of" in \
        cli("status", "--name", "ds").out
    assert ": 1 have a copy in %s, 1 lost" % dest in cli("status", "--name", "ds").out
    docs = dict((json.loads(l)["path"], json.loads(l)) for l in
                cli("files", "--name", "ds", "--vanished", "--json").out.splitlines())
    assert docs["f2"]["copy"] == str(dest / "f2") and docs["f1"]["copy"] is None, docs
    text = cli("files", "--name", "ds", "--vanished").out.splitlines()
    assert "f2\tlikely purged\tcopy: %s" % (dest / "f2") in text, text
    # the copy, changed since (by size): no longer a copy, when listed
    with open(str(dest / "f2"), "ab") as f:
        f.write(b"more")
    docs = dict((json.loads(l)["path"], json.loads(l)) for l in
                cli("files", "--name", "ds", "--vanished", "--json").out.splitlines())
    assert docs["f2"]["copy"] is None, docs


# ---------------------------------------------------------------- doctor

def test_doctor_exits_1_on_a_warn_and_never_says_healthy_beside_one(cli, generic):
    add(cli, generic, "ds", age=20, check=True)         # at risk: information only
    store = sk.Store(str(generic["state"]))
    rep = cli("doctor", "--json").json()
    levels = dict((c["name"], c["level"]) for c in rep["checks"])
    assert levels.get("at-risk:ds") == "info" and levels.get("approval:ds") is None
    machinery = [c for c in rep["checks"] if c["level"] in ("warn", "fail")]
    r = cli("doctor")
    assert r.rc == (1 if machinery else 0), (r, machinery)
    assert ("healthy" in r.out.splitlines()[-1]) == (not machinery) or not machinery
    # a temp file left by an interrupted write: a WARN, so exit 1 and no "healthy"
    with open(os.path.join(store.dir, ".registry.json.x.tmp"), "w") as f:
        f.write("{}")
    os.utime(os.path.join(store.dir, ".registry.json.x.tmp"), (0, 0))
    r = cli("doctor")
    warns = [l for l in r.out.splitlines() if l.startswith(("WARN", "FAIL"))]
    if warns:
        assert r.rc == 1 and "healthy" not in r.out, r
        assert not cli("doctor", "--json").json()["ok"]


def test_doctor_is_0_for_a_working_setup_with_a_check_mode_dataset(cli, generic):
    add(cli, generic, "ds", age=40, check=True)
    rep = cli("doctor", "--json").json()
    bad = [c for c in rep["checks"] if c["level"] in ("warn", "fail")]
    r = cli("doctor")
    assert r.rc == (1 if bad else 0), (r.out, bad)
    assert [c["name"] for c in rep["checks"] if c["level"] == "info"][:1] == \
        ["purge-eligible:ds"]
    if not bad:
        assert r.out.splitlines()[-1] == "the tool can do its job; ds needs you (the info " \
            "lines above)", r.out


# ---------------------------------------------------------------- manifests say whose

def two_datasets(cli, env):
    a = add(cli, env, "a", check=True)
    b = add(cli, env, "b", files=5, check=True)
    return a, b


def newest(env, name):
    return sk.Store(str(env["state"])).manifests(name)[0]


def test_another_datasets_manifest_is_not_used(cli, generic):
    two_datasets(cli, generic)
    _, other = newest(generic, "b")
    number, mine = newest(generic, "a")
    shutil.copyfile(other, mine)
    r = cli("refresh", "--name", "a", "--check", "--json").json()["results"][0]
    assert r["entries_vanished"] is None and r["entries_likely_purged"] is None, r
    assert "not this dataset's" in r["manifest_note"], r
    assert cli("status", "--name", "a", "--json").json()["last_purge"] is None


def test_swapped_manifests_are_out_of_sequence(cli, generic):
    d = add(cli, generic, "a", check=True)
    os.unlink(str(d / "f1"))
    assert cli("refresh", "--name", "a", "--check").rc == 0
    edit_entry(generic, "a", purge=None)        # the fallback: the two newest manifests
    (n1, p1), (n0, p0) = sk.Store(str(generic["state"])).manifests("a")[:2]
    tmp = p1 + ".x"
    os.rename(p1, tmp)
    os.rename(p0, p1)
    os.rename(tmp, p0)
    r = cli("files", "--name", "a", "--vanished")
    assert r.rc == 1 and "is not used" in r.err and r.out == "", r
    r = cli("refresh", "--name", "a", "--check", "--json").json()["results"][0]
    assert r["entries_vanished"] is None and "sequence" in r["manifest_note"], r


@pytest.mark.parametrize("field, value", [("now", float("nan")), ("now", -1e18),
                                          ("now", 1e300), ("now", NOW_EPOCH + 400 * DAY),
                                          ("purge_days", -5), ("walk_started", "2001-01-01T00:00:00Z")])
def test_a_manifest_header_with_values_no_walk_wrote_is_not_used(cli, generic, field, value):
    add(cli, generic, "a", check=True)
    number, path = newest(generic, "a")
    with open(path, "rb") as f:
        data = f.read()
    magic = sk.MANIFEST_MAGIC
    head_end = data.index(b"\n", len(magic))
    header = json.loads(data[len(magic):head_end].decode())
    header[field] = value
    new_head = json.dumps(header).encode()
    body = data[head_end:]
    # keep the trailer's offset right: it counts from the file's start
    import struct
    off = struct.unpack("<Q", body[-8:])[0] + len(new_head) - (head_end - len(magic))
    with open(path, "wb") as f:
        f.write(magic + new_head + body[:-8] + struct.pack("<Q", off))
    with sk.Manifest(path) as m:
        assert m.trailer is not None            # still a complete manifest
    r = cli("refresh", "--name", "a", "--check", "--json").json()["results"][0]
    assert r["entries_vanished"] is None and "is not used" in r["manifest_note"], r


def test_files_and_rescue_refuse_another_datasets_manifest(cli, generic, tmp_path):
    """Passing for another: copied in as this dataset's newest, another dataset's manifest
    is listed by no `files` and copied from by no `rescue` (its names would be looked up
    under this root)."""
    two_datasets(cli, generic)
    _, other = newest(generic, "b")
    _, mine = newest(generic, "a")
    shutil.copyfile(other, mine)
    for argv in (["files", "--name", "a"], ["files", "--name", "a", "--at-risk"],
                 ["rescue", "--name", "a", "--to", str(tmp_path / "safe"), "--all"]):
        r = cli(*argv)
        assert r.rc == 1 and "is not used: it is not this dataset's" in r.err, (argv, r)
        assert r.out == "" and not (tmp_path / "safe" / "f4").exists(), r
    assert cli("refresh", "--name", "a", "--check").rc == 0       # a new walk: usable again
    assert cli("files", "--name", "a").rc == 0


def test_a_copy_reached_through_a_symlink_in_the_destination_is_no_copy(cli, generic,
                                                                          tmp_path):
    """dest/sub made a symlink to a directory that holds a file of the same size and mtime
    (say, back into scratch, where the purge took it): not a copy."""
    dest = tmp_path / "safe"
    d = purge_setup(cli, generic)
    assert cli("rescue", "--name", "ds", "--to", str(dest), "--all").rc == 0
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(str(dest / "sub"), str(elsewhere), copy_function=shutil.copy2)
    for f in os.listdir(str(dest / "sub")):         # the same mtimes, to the nanosecond
        st = os.stat(str(dest / "sub" / f))
        os.utime(str(elsewhere / f), ns=(st.st_atime_ns, st.st_mtime_ns))
    shutil.rmtree(str(d / "sub"))
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    docs = [json.loads(l) for l in
            cli("files", "--name", "ds", "--vanished", "--json").out.splitlines()]
    assert docs and all(doc["copy"] == str(dest / doc["path"]) for doc in docs), docs
    shutil.rmtree(str(dest / "sub"))
    os.symlink(str(elsewhere), str(dest / "sub"))
    docs = [json.loads(l) for l in
            cli("files", "--name", "ds", "--vanished", "--json").out.splitlines()]
    assert docs and all(doc["copy"] is None for doc in docs), docs


def as_nobody(world_tmp, d, keep_root_owned=()):
    """A runner of the tool as user nobody on dataset d (its scratch root and a home made
    nobody's, but keep_root_owned), with init and add done; skips where that cannot be."""
    from conftest import give_to_nobody, run_as_nobody
    scratch, home = d.parent, world_tmp / "home"
    run = run_as_nobody(home, world_tmp / "state")
    home.mkdir()
    give_to_nobody(home, scratch, keep=keep_root_owned)
    assert run("init", "--profile", "generic", "--scratch-root", scratch).rc == 0
    assert run("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    return run


def test_others_entries_are_shown_but_are_not_attention(world_tmp):
    """Run as an unprivileged user: another owner's old file cannot be refreshed (touch
    mode) nor copied by its user; status shows it, attention does not ask for it."""
    d = make_dataset(world_tmp / "scratch", "ds")
    (d / "theirs.dat").write_bytes(b"someone else's")
    run = as_nobody(world_tmp, d, keep_root_owned=[d / "theirs.dat"])
    age_all(d, 40)
    r = run("refresh", "--name", "ds", "--json")              # touch mode
    assert r.rc == 0 and r.json()["results"][0]["entries_not_owned"] == 1, r
    st = run("status", "--name", "ds", "--json").json()
    assert st["risk"] == "purge-eligible" and st["attention"] == [], st
    assert st["remaining"]["others_at_risk"] == 1 and st["remaining"]["own_at_risk"] == 0
    text = run("status", "--name", "ds").out
    assert "needs attention" not in text and "1 entry of other owners" in text, text
    assert run("status", "--brief").out == "" or "ds:" not in run("status", "--brief").out
    r = run("refresh", "--name", "ds", "--check", "--json")   # check mode: the same
    assert r.rc == 0 and r.json()["results"][0]["entries_at_risk"] > 1, r
    st = run("status", "--name", "ds", "--json").json()
    assert st["attention"] == ["purge-eligible"], st          # the user's own old entries
    assert st["remaining"]["own_purge_eligible"] == st["remaining"]["purge_eligible"] - 1


# ---------------------------------------------------------------- what a purge is, exactly

def at_day(monkeypatch, n):
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(NOW_EPOCH + n * DAY))


def test_the_users_own_deletion_or_the_sentinel_replaces_no_purge(cli, generic):
    d = purge_setup(cli, generic)                   # a check walk saw them 40 days old
    os.unlink(str(d / "f1"))
    os.unlink(str(d / "f2"))
    cli("refresh", "--name", "ds", "--check")
    first = cli("status", "--name", "ds", "--json").json()["last_purge"]
    assert first["entries_likely_purged"] == 2
    (d / "fresh.txt").write_text("new")             # written and read now: not old
    set_atime(d / "fresh.txt", NOW_EPOCH)
    cli("refresh", "--name", "ds", "--check")
    os.unlink(str(d / "fresh.txt"))
    os.unlink(str(d / sk.SENTINEL))                 # the tool's own file
    r = cli("refresh", "--name", "ds", "--check", "--fail-on-risk", "--json")
    res = r.json()["results"][0]
    assert res["entries_vanished"] == 1 and res["entries_likely_purged"] == 0, res
    assert "likely purged" not in r.err, r
    assert cli("status", "--name", "ds", "--json").json()["last_purge"] == first
    listed = cli("files", "--name", "ds", "--vanished", "--json").out.splitlines()
    assert sorted(json.loads(l)["path"] for l in listed) == ["f1", "f2"]


def test_likely_purged_counts_touches_of_every_run_of_a_resumed_walk(cli, generic,
                                                                     monkeypatch):
    """A touch walk stopped on day 0 and resumed on day 10 touched sub/g0 on day 10; deleted
    by its user, it is gone on day 31, 21 days after that touch: not likely purged."""
    d = add(cli, generic, "ds", check=None)
    age_all(d, 40)
    assert cli("refresh", "--name", "ds", "--max-entries", "3").rc == 3
    at_day(monkeypatch, 10)
    assert cli("refresh", "--name", "ds").rc == 0
    os.unlink(str(d / "sub" / "g0"))
    at_day(monkeypatch, 31)
    res = cli("refresh", "--name", "ds", "--json").json()["results"][0]
    assert (res["entries_vanished"], res["entries_likely_purged"]) == (1, 0), res


def test_a_purge_found_by_a_resumed_walk_is_counted_when_it_completes(cli, generic,
                                                                      monkeypatch):
    d = add(cli, generic, "ds", check=None)
    age_all(d, 5)
    assert cli("refresh", "--name", "ds", "--check").rc == 0      # last access: day -5
    at_day(monkeypatch, 20)
    assert cli("refresh", "--name", "ds", "--check", "--max-entries", "3").rc == 3
    shutil.rmtree(str(d / "sub"))
    at_day(monkeypatch, 28)                                      # 33 days since: purged
    res = cli("refresh", "--name", "ds", "--check", "--json").json()["results"][0]
    assert res["resumed"] and (res["entries_vanished"], res["entries_likely_purged"]) == \
        (4, 4), res
    assert "purged" in cli("status", "--name", "ds", "--json").json()["attention"]


def test_a_walk_without_a_manifest_since_leaves_what_vanished_unknown(cli, generic,
                                                                      monkeypatch):
    d = add(cli, generic, "ds", check=None)
    age_all(d, 40)
    assert cli("refresh", "--name", "ds").rc == 0               # touches, manifest M1
    at_day(monkeypatch, 20)
    age_all(d, 40)
    assert cli("refresh", "--name", "ds", "--no-manifest").rc == 0   # touches on day 20
    os.unlink(str(d / "sub" / "g0"))
    at_day(monkeypatch, 31)
    res = cli("refresh", "--name", "ds", "--json").json()["results"][0]
    assert res["entries_vanished"] is None and "left no manifest" in res["manifest_note"], res


def test_a_symlink_or_directory_copy_must_match_too(cli, generic, tmp_path):
    dest = tmp_path / "safe"
    d = purge_setup(cli, generic)
    assert cli("rescue", "--name", "ds", "--to", str(dest), "--all").rc == 0
    os.unlink(str(dest / "link"))
    os.symlink("/nowhere/some/other/target", str(dest / "link"))   # another target
    os.utime(str(dest / "sub"), (0, 0))                            # another mtime
    os.unlink(str(d / "link"))
    shutil.rmtree(str(d / "sub"))
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    docs = dict((json.loads(l)["path"], json.loads(l)) for l in
                cli("files", "--name", "ds", "--vanished", "--json").out.splitlines())
    assert docs["link"]["copy"] is None and docs["sub"]["copy"] is None, docs
    assert docs["sub/g0"]["copy"] == str(dest / "sub" / "g0"), docs
    assert docs["link"]["size"] == 2, docs       # the link's own size, as files lists it


def test_copies_elsewhere_than_the_dataset_says_cover_nothing(cli, generic, tmp_path):
    add(cli, generic, "ds", check=True)
    assert cli("rescue", "--name", "ds", "--to", str(tmp_path / "one"), "--all").rc == 0
    assert cli("status", "--name", "ds", "--json").json()["attention"] == []
    assert cli("extend", "--name", "ds", "--rescue-to", str(tmp_path / "two")).rc == 0
    assert cli("status", "--name", "ds", "--json").json()["attention"] == ["purge-eligible"]


def test_a_destination_in_scratch_holds_no_safe_copy(cli, generic):
    d = purge_setup(cli, generic)
    inside = generic["scratch"] / "backup"
    shutil.copytree(str(d), str(inside), symlinks=True, copy_function=shutil.copy2)
    for f in ("f1", "f2"):
        st = os.stat(str(d / f))
        os.utime(str(inside / f), ns=(st.st_atime_ns, st.st_mtime_ns))
    edit_entry(generic, "ds", rescue_to=str(inside))          # a hand edit: add refuses it
    os.unlink(str(d / "f1"))
    os.unlink(str(d / "f2"))
    cli("refresh", "--name", "ds", "--check")
    p = cli("status", "--name", "ds", "--json").json()["last_purge"]
    assert p["entries_with_copy"] == 0 and p["dest"] is None, p
    docs = [json.loads(l) for l in
            cli("files", "--name", "ds", "--vanished", "--json").out.splitlines()]
    assert docs and all(doc["copy"] is None for doc in docs), docs


def test_a_filtered_list_does_not_mark_the_purge_seen(cli, generic):
    d = purge_setup(cli, generic)
    os.unlink(str(d / "f1"))
    cli("refresh", "--name", "ds", "--check")
    r = cli("files", "--name", "ds", "--vanished", "--older-than", "100000")
    assert r.rc == 0 and r.out == "", r
    assert registry(generic)["ds"]["purge"]["seen"] is None
    assert "purged" in cli("status", "--name", "ds", "--json").json()["attention"]


def test_a_missing_root_is_what_the_last_refresh_found_in_every_view(cli, generic):
    d = add(cli, generic, "ds")
    os.rename(str(d), str(d) + ".moved")
    views = lambda: (cli("list", "--json").json()[0]["attention"],            # noqa: E731
                     cli("status", "--name", "ds", "--json").json()["attention"],
                     [a["attention"] for a in cli("status", "--brief", "--json").json()
                      if a["name"] == "ds"])
    assert views() == ([], [], [])                  # nothing recorded yet: all agree
    assert cli("list", "--json").json()[0]["state"] == "missing"    # the schedule's view
    assert cli("refresh", "--name", "ds").rc == 1
    assert views() == (["missing"], ["missing"], [["missing"]])
    os.rename(str(d) + ".moved", str(d))
    assert cli("refresh", "--name", "ds").rc == 0   # found it: cleared everywhere
    assert views() == ([], [], [])


def test_enable_never_says_ok_beside_attention(cli, generic):
    add(cli, generic, "ds", keep="2030-01-04")
    assert cli("disable", "--name", "ds").rc == 0
    r = cli("enable", "--name", "ds")
    assert r.rc == 0 and "(ok)" not in r.out and "needs attention: expiring" in r.out, r


@pytest.mark.parametrize("text", [b'{"datasets": {"a', b"{", b"{x}", b'{"a":1,}', b""])
def test_a_truncated_registry_is_one_line_on_every_python(generic, text):
    """The login line reads state through json's C scanner: on 3.10 and 3.11 its error path
    needs json.decoder, which the login line never imports."""
    from conftest import pyenv_pythons, run_command
    (generic["state"] / "registry.json").write_bytes(text)
    os.chmod(str(generic["state"] / "registry.json"), 0o600)
    pythons = [p for _, p in pyenv_pythons()] or [sys.executable]
    for python in pythons:
        code = "import sys; sys.path[0] = sys.argv.pop(1); import scratch_keepalive as m; " \
               "sys.exit(m.main(sys.argv[1:]))"
        r = run_command([python, "-S", "-c", code, str(sk.__file__).rsplit("/", 1)[0],
                         "status", "--brief"])
        assert r.rc == 1 and r.err.count("\n") == 1, (python, r)
        assert "internal error" not in r.err and "repair" in r.err, (python, r)


def test_errors_of_an_earlier_run_of_a_resumed_walk_are_kept(world_tmp):
    """Run as an unprivileged user: a directory it may not list is an entry error in the
    walk's first run; the run that resumes and completes the walk exits 1 and the dataset's
    attention says `errors`."""
    d = make_dataset(world_tmp / "scratch", "ds")
    (d / "a-locked").mkdir()
    (d / "a-locked" / "x").write_text("x")
    run = as_nobody(world_tmp, d)
    os.chmod(str(d / "a-locked"), 0)
    r = run("refresh", "--name", "ds", "--check", "--max-entries", "4", "--json")
    assert r.rc == 3 and r.json()["results"][0]["errors"] == 1, r
    r = run("refresh", "--name", "ds", "--check", "--json")
    res = r.json()["results"][0]
    assert res["complete"] and res["resumed"] and res["errors"] == 0, res
    assert r.rc == 1, r                       # the walk completed with an entry error
    st = run("status", "--name", "ds", "--json").json()
    assert "errors" in st["attention"], st
    os.chmod(str(d / "a-locked"), 0o700)


def test_a_purge_record_whose_file_is_gone_is_one_line(cli, generic):
    d = purge_setup(cli, generic)
    os.unlink(str(d / "f1"))
    cli("refresh", "--name", "ds", "--check")
    rec = registry(generic)["ds"]["purge"]
    os.unlink(str(generic["state"] / "manifests" / "ds" / rec["file"]))
    r = cli("files", "--name", "ds", "--vanished")
    assert r.rc == 1 and r.out == "" and r.err.count("\n") == 1, r
    assert "the purge record" in r.err and "is missing" in r.err, r
    assert registry(generic)["ds"]["purge"]["seen"] is None
