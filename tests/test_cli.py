"""In-process CLI tests through main(argv): every command, every error path, the JSON contract."""
import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from conftest import (KEEP, NOW_EPOCH, DAY, SCRIPT, assert_error, make_dataset, on_a_terminal,
                      run_script, set_atime, snapshot)
import scratch_keepalive as sk

LIST_KEYS = {"name", "path", "enabled", "keep_until", "cadence_days", "approval", "mode",
             "last_refresh", "last_mode", "state"}
RESULT_KEYS = {"name", "mode", "complete", "resumed", "entries_seen", "entries_touched",
               "entries_skipped", "entries_at_risk", "bytes_at_risk", "entries_purge_eligible",
               "bytes_purge_eligible", "errors"}


def state_files(state):
    """{relative path: bytes} of every file in the state dir except logs and lock files."""
    out = {}
    for dirpath, _, files in os.walk(str(state)):
        for f in files:
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, str(state))
            if rel.startswith("logs") or rel.startswith("locks"):
                continue
            with open(p, "rb") as fh:
                out[rel] = fh.read()
    return out


def pin_last_start(env, name, epoch):
    """Recorded times are real; pin the last run's start to the policy clock for due tests."""
    path = env["state"] / "registry.json"
    reg = json.loads(path.read_text())
    ds = reg["datasets"][name]
    ds["last_refresh_start"] = sk.iso(epoch)
    ds["last_%s_start" % ds["last_mode"]] = sk.iso(epoch)      # what the due rules read
    path.write_text(json.dumps(reg))


@pytest.fixture
def ds(cli, generic):
    d = make_dataset(generic["scratch"])
    r = cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP)
    assert r.rc == 0, r
    return d


# ------------------------------------------------------------------ init

def test_init_generic_records_root_and_is_idempotent(cli, env):
    r = cli("init", "--profile", "generic", "--scratch-root", env["scratch"])
    assert r.rc == 0, r
    assert "Initialised" in r.out
    cfg = json.loads((env["state"] / "config.json").read_text())
    assert cfg["profile"] == "generic" and cfg["scratch_root"] == str(env["scratch"])
    assert cfg["purge_days"] == 30 and cfg["format"] == 1
    before = (env["state"] / "config.json").read_bytes()
    r = cli("init", "--profile", "generic", "--scratch-root", env["scratch"])
    assert r.rc == 0 and "nothing changed" in r.out
    assert (env["state"] / "config.json").read_bytes() == before
    r = cli("init", "--purge-days", "60")
    assert r.rc == 0 and "Initialised" in r.out
    assert json.loads((env["state"] / "config.json").read_text())["purge_days"] == 60


def test_init_state_dir_permissions(cli, env):
    assert cli("init", "--profile", "generic", "--scratch-root", env["scratch"]).rc == 0
    for d in ("", "checkpoints", "logs", "locks"):
        assert stat.S_IMODE(os.stat(str(env["state"] / d)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(str(env["state"] / "config.json")).st_mode) == 0o600


def test_init_generic_uses_SCRATCH(cli, env, monkeypatch):
    monkeypatch.setenv("SCRATCH", str(env["scratch"]))
    r = cli("init", "--profile", "generic")
    assert r.rc == 0, r
    assert str(env["scratch"]) in r.out


def test_init_generic_without_root_is_refused(cli, env):
    assert_error(cli("init", "--profile", "generic"), 2, "--scratch-root")
    assert not (env["state"] / "config.json").exists()


def test_init_missing_root_is_refused(cli, env):
    assert_error(cli("init", "--profile", "generic", "--scratch-root", env["tmp"] / "nope"), 2,
                 "does not exist")
    assert not (env["state"] / "config.json").exists()


def test_init_br200_default_root_absent_says_not_on_br200(cli, env, monkeypatch):
    monkeypatch.setenv("USER", "nobody-here")
    assert_error(cli("init"), 2, "/N/scratch/nobody-here", "not on BR200?")


def test_init_br200_with_root_override(cli, env, monkeypatch):
    monkeypatch.setenv("SCRATCH_KEEPALIVE_SCRATCH_ROOT", str(env["scratch"]))
    r = cli("init", "--scratch-root", env["tmp"])      # the variable wins over the flag
    assert r.rc == 0, r
    cfg = json.loads((env["state"] / "config.json").read_text())
    assert cfg["profile"] == "br200" and cfg["scratch_root"] == str(env["scratch"])
    assert "forbid" in r.out and "approval" in r.out


def test_init_br200_purge_days_refused(cli, env, monkeypatch):
    monkeypatch.setenv("SCRATCH_KEEPALIVE_SCRATCH_ROOT", str(env["scratch"]))
    assert_error(cli("init", "--purge-days", "60"), 2, "fixed at 30")


def test_init_br200_state_inside_scratch_refused(cli, env, monkeypatch):
    monkeypatch.setenv("SCRATCH_KEEPALIVE_SCRATCH_ROOT", str(env["scratch"]))
    inside = env["scratch"] / "state"
    assert_error(cli("--state-dir", inside, "init"), 2, "inside the scratch root")
    assert not (inside / "config.json").exists()


def test_init_profile_change_with_datasets_refused(cli, ds, env, monkeypatch):
    before = state_files(env["state"])
    monkeypatch.setenv("SCRATCH_KEEPALIVE_SCRATCH_ROOT", str(env["scratch"]))
    assert_error(cli("init", "--profile", "br200"), 2, "remove them")
    assert state_files(env["state"]) == before


def test_init_bad_options(cli, env):
    assert_error(cli("init", "--profile", "nersc"), 2, "invalid choice")
    assert_error(cli("init", "--profile", "generic", "--scratch-root", env["scratch"],
                     "--purge-days", "abc"), 2, "--purge-days")
    assert_error(cli("init", "--profile", "generic", "--scratch-root", env["scratch"],
                     "--purge-days", "3"), 2, "out of range")


def test_init_purge_change_too_short_for_a_cadence_refused(cli, ds, env):
    assert_error(cli("init", "--purge-days", "18"), 2, "cadence")


# ------------------------------------------------------------------ add

def test_add_writes_sentinel_and_registry(cli, generic):
    d = make_dataset(generic["scratch"], "proj")
    r = cli("add", "--name", "proj", "--path", d, "--keep-until", KEEP, "--json")
    assert r.rc == 0, r
    entry = r.json()
    assert LIST_KEYS <= set(entry)
    assert entry["path"] == str(d) and entry["mode"] == "touch" and entry["cadence_days"] == 14
    sentinel = d / ".scratch-keepalive"
    assert stat.S_ISREG(os.lstat(str(sentinel)).st_mode)
    doc = json.loads(sentinel.read_text())
    assert doc["tool"] == "scratch-keepalive" and doc["name"] == "proj"
    reg = json.loads((generic["state"] / "registry.json").read_text())
    assert reg["format"] == 1 and "proj" in reg["datasets"]
    assert stat.S_IMODE(os.stat(str(generic["state"] / "registry.json")).st_mode) == 0o600


def test_add_keep_until_today_is_allowed(cli, generic):
    d = make_dataset(generic["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", "2030-01-01").rc == 0


def test_add_through_symlink_records_real_path(cli, generic):
    d = make_dataset(generic["scratch"], "real")
    os.symlink(str(d), str(generic["scratch"] / "alias"))
    r = cli("add", "--name", "x", "--path", generic["scratch"] / "alias", "--keep-until", KEEP,
            "--json")
    assert r.rc == 0 and r.json()["path"] == str(d)


@pytest.mark.parametrize("args,words", [
    (["--name", "-bad"], "expected one argument"),
    (["--name", "bad/name"], "invalid dataset name"),
    (["--name", "a" * 65], "invalid dataset name"),
    (["--name", ".hidden"], "invalid dataset name"),
    (["--name", "sp ace"], "invalid dataset name"),
])
def test_add_bad_names(cli, generic, args, words):
    d = make_dataset(generic["scratch"])
    before = state_files(generic["state"])
    r = cli("add", *(args + ["--path", str(d), "--keep-until", KEEP]))
    assert_error(r, 2, words)
    assert state_files(generic["state"]) == before
    assert not (d / ".scratch-keepalive").exists()


@pytest.mark.parametrize("keep,words", [
    ("2030-02-30", "not a real date"), ("tomorrow", "not a real date"),
    ("2030/06/30", "not a real date"), ("2029-12-31", "in the past"),
])
def test_add_bad_keep_until(cli, generic, keep, words):
    d = make_dataset(generic["scratch"])
    before = state_files(generic["state"])
    assert_error(cli("add", "--name", "ds", "--path", d, "--keep-until", keep), 2, words)
    assert state_files(generic["state"]) == before
    assert not (d / ".scratch-keepalive").exists()


def test_add_bad_paths(cli, generic, tmp_path):
    scratch = generic["scratch"]
    (scratch / "file").write_text("x")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), str(scratch / "escape"))
    before = state_files(generic["state"])
    cases = [(scratch / "nope", "does not exist"), (scratch / "file", "not a directory"),
             (outside, "not below the scratch root"),
             (scratch, "the scratch root itself, which cannot be a dataset"),
             (scratch / "escape", "not below the scratch root")]
    for path, words in cases:
        assert_error(cli("add", "--name", "x", "--path", path, "--keep-until", KEEP), 2, words)
    assert state_files(generic["state"]) == before
    assert not (outside / ".scratch-keepalive").exists()


def test_add_overlaps_and_taken_names(cli, ds, generic):
    scratch = generic["scratch"]
    (scratch / "other").mkdir()
    before = state_files(generic["state"])
    assert_error(cli("add", "--name", "ds", "--path", scratch / "other", "--keep-until", KEEP),
                 2, "already registered")
    for path in (ds, ds / "sub"):
        assert_error(cli("add", "--name", "y", "--path", path, "--keep-until", KEEP), 2,
                     "overlaps")
    assert state_files(generic["state"]) == before
    # a dataset containing another is refused too
    d2 = make_dataset(scratch / "outer", "inner")
    assert cli("add", "--name", "inner", "--path", d2, "--keep-until", KEEP).rc == 0
    assert_error(cli("add", "--name", "outer", "--path", scratch / "outer", "--keep-until", KEEP),
                 2, "overlaps")


def test_add_cadence_limits(cli, generic):
    d = make_dataset(generic["scratch"])
    assert_error(cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP,
                     "--cadence-days", "26"), 2, "too long")
    assert_error(cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP,
                     "--cadence-days", "0"), 2, "out of range")
    r = cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP, "--cadence-days", "25",
            "--json")
    assert r.rc == 0 and r.json()["cadence_days"] == 25


def test_add_before_init_refused(cli, env):
    d = make_dataset(env["scratch"])
    assert_error(cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP), 2, "init")


def test_add_refuses_foreign_sentinel_and_symlinked_sentinel(cli, generic, tmp_path):
    d = make_dataset(generic["scratch"], "a")
    (d / ".scratch-keepalive").write_text("someone else's file\n")
    assert_error(cli("add", "--name", "a", "--path", d, "--keep-until", KEEP), 2,
                 "not written by scratch-keepalive")
    assert (d / ".scratch-keepalive").read_text() == "someone else's file\n"
    e = make_dataset(generic["scratch"], "b")
    target = tmp_path / "target"
    target.write_text("precious\n")
    os.symlink(str(target), str(e / ".scratch-keepalive"))
    assert_error(cli("add", "--name", "b", "--path", e, "--keep-until", KEEP), 2, "symlink")
    assert target.read_text() == "precious\n"
    assert cli("list", "--json").json() == []


def test_add_br200_without_approval_is_check_mode(cli, env, monkeypatch):
    monkeypatch.setenv("SCRATCH_KEEPALIVE_SCRATCH_ROOT", str(env["scratch"]))
    assert cli("init").rc == 0
    d = make_dataset(env["scratch"])
    assert_error(cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP,
                     "--cadence-days", "13"), 2, "minimum of 14")
    r = cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP)
    assert r.rc == 0 and "check mode" in r.out and "--approval" in r.out
    e = make_dataset(env["scratch"], "ok")
    r = cli("add", "--name", "ok", "--path", e, "--keep-until", KEEP, "--approval", "INC01",
            "--json")
    assert r.json()["mode"] == "touch" and r.json()["approval"] == "INC01"


# ------------------------------------------------------------------ list and status

def test_list_and_status_json_keys(cli, ds):
    entries = cli("list", "--json").json()
    assert len(entries) == 1 and set(entries[0]) >= LIST_KEYS
    e = entries[0]
    assert e["state"] == "never" and e["last_refresh"] is None and e["approval"] is None
    s = cli("status", "--name", "ds", "--json").json()
    assert set(s) >= LIST_KEYS | {"sentinel", "checkpoint", "last_run"}
    assert s["sentinel"] is True and s["checkpoint"] is None and s["last_run"] is None
    assert isinstance(cli("status", "--json").json(), list)
    r = cli("status")
    assert r.rc == 0 and "ds: never" in r.out
    assert cli("list").out.startswith("NAME")


def test_list_empty(cli, env):
    assert cli("list", "--json").json() == []
    assert "No datasets" in cli("list").out
    assert cli("status", "--json").json() == []


def test_status_unknown_name(cli, ds):
    assert_error(cli("status", "--name", "nope"), 2, "no dataset named")


def test_states_in_order(cli, ds, env, monkeypatch):
    def state():
        return cli("list", "--json").json()[0]["state"]
    assert state() == "never"
    assert cli("refresh", "--name", "ds", "--max-entries", "2").rc == 3
    assert state() == "partial"
    assert cli("refresh", "--name", "ds").rc == 0
    assert state() == "due"         # the run really started in the policy clock's past
    pin_last_start(env, "ds", NOW_EPOCH)
    assert state() == "ok"
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(NOW_EPOCH + 12 * DAY))
    assert state() == "ok"
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(NOW_EPOCH + 13 * DAY + 3600))
    assert state() == "due"
    assert cli("disable", "--name", "ds").rc == 0
    assert state() == "disabled"
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", "2030-07-01T00:00:00Z")
    assert state() == "expired"
    os.rename(str(ds), str(ds) + ".moved")
    assert state() == "missing"


# ------------------------------------------------------------------ refresh

def test_refresh_json_result_keys_and_touch(cli, ds):
    before = snapshot(ds)
    r = cli("refresh", "--name", "ds", "--json")
    assert r.rc == 0, r
    res = r.json()["results"]
    assert len(res) == 1 and set(res[0]) >= RESULT_KEYS
    x = res[0]
    n = len(before)
    assert x["complete"] is True and x["resumed"] is False and x["mode"] == "touch"
    assert x["entries_seen"] == n           # root, sentinel and every entry, the link itself
    assert x["entries_touched"] == n and x["errors"] == 0
    after = snapshot(ds)
    for k, v in before.items():
        if k not in (".", ".scratch-keepalive"):    # the sentinel records the refresh
            assert after[k][1] == v[1], k           # mtime exact
            assert after[k][0] > v[0] or k == ".", k  # atime moved
    listed = cli("list", "--json").json()[0]
    assert listed["last_refresh"] and listed["last_mode"] == "touch"
    s = cli("status", "--name", "ds", "--json").json()
    assert s["last_run"]["finished"] and s["last_run"]["complete"] is True


def test_refresh_human_output(cli, ds):
    r = cli("refresh", "--name", "ds")
    assert r.rc == 0 and r.out.startswith("ds: touched ") and "complete" in r.out


def test_refresh_unknown_and_bad_options(cli, ds, env):
    before = state_files(env["state"])
    assert_error(cli("refresh", "--name", "nope"), 2, "no dataset named")
    assert_error(cli("refresh", "--max-entries", "-1"), 2, "out of range")
    assert_error(cli("refresh", "--max-seconds", "0"), 2, "positive")
    assert_error(cli("refresh", "--max-seconds", "nan"), 2, "positive")
    assert_error(cli("refresh", "--threads", "0"), 2, "out of range")
    assert_error(cli("refresh", "--bogus"), 2, "unrecognized")
    assert state_files(env["state"]) == before


@pytest.mark.parametrize("how", ["disabled", "expired", "missing"])
def test_refresh_named_unwalkable_exits_1(cli, ds, how, monkeypatch):
    if how == "disabled":
        cli("disable", "--name", "ds")
    elif how == "expired":
        monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", "2030-07-01T00:00:00Z")
    else:
        os.rename(str(ds), str(ds) + ".gone")
    r = cli("refresh", "--name", "ds", "--json")
    assert r.rc == 1, r
    x = r.json()["results"][0]
    assert x["complete"] is False and how in x["state"] and x["entries_seen"] == 0
    assert cli("list", "--json").json()[0]["last_refresh"] is None
    r = cli("refresh", "--name", "ds")
    assert r.rc == 1 and "not refreshed" in r.out


def test_refresh_all_skips_disabled_and_expired(cli, generic):
    for name, keep in (("a", KEEP), ("b", KEEP), ("c", "2030-01-02")):
        d = make_dataset(generic["scratch"], name)
        assert cli("add", "--name", name, "--path", d, "--keep-until", keep).rc == 0
    cli("disable", "--name", "b")
    r = cli("refresh", "--json")
    assert r.rc == 0
    assert [x["name"] for x in r.json()["results"]] == ["a", "c"]


def test_refresh_due_selects_only_due(cli, ds, env, monkeypatch):
    assert [x["name"] for x in cli("refresh", "--due", "--json").json()["results"]] == ["ds"]
    pin_last_start(env, "ds", NOW_EPOCH)
    r = cli("refresh", "--due", "--json")
    assert r.rc == 0 and r.json()["results"] == [] and "nothing to refresh" in r.err
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(NOW_EPOCH + 13 * DAY + 60))
    assert [x["name"] for x in cli("refresh", "--due", "--json").json()["results"]] == ["ds"]


def test_refresh_due_takes_partial(cli, ds, env, monkeypatch):
    assert cli("refresh", "--name", "ds").rc == 0
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(NOW_EPOCH + 14 * DAY))
    assert cli("refresh", "--name", "ds", "--max-entries", "3").rc == 3
    # Recorded times are real: pin the stopped walk's start to the policy clock (a --due
    # run starts over a manual walk that is already due again by the rule).
    ckpt = env["state"] / "checkpoints" / "ds.json"
    doc = json.loads(ckpt.read_text())
    ckpt.write_text(json.dumps(dict(doc, walk_started=sk.iso(NOW_EPOCH + 14 * DAY))))
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(NOW_EPOCH + 14 * DAY + 60))
    r = cli("refresh", "--due", "--json")
    assert r.json()["results"][0]["resumed"] is True


def test_refresh_max_entries_checkpoint_and_resume(cli, ds, env):
    total = cli("refresh", "--name", "ds", "--dry-run", "--json").json()["results"][0]
    n = total["entries_seen"]
    r = cli("refresh", "--name", "ds", "--max-entries", "4", "--json")
    assert r.rc == 3
    x = r.json()["results"][0]
    assert x["entries_seen"] == 4 and x["complete"] is False
    ck = json.loads((env["state"] / "checkpoints" / "ds.json").read_text())
    assert ck["entries_done"] == 4 and ck["format"] == 1
    assert cli("status", "--name", "ds", "--json").json()["checkpoint"]["entries_done"] == 4
    assert cli("list", "--json").json()[0]["last_refresh"] is None
    r = cli("refresh", "--name", "ds", "--json")
    x = r.json()["results"][0]
    assert r.rc == 0 and x["resumed"] is True and x["entries_seen"] == n - 4
    assert not (env["state"] / "checkpoints" / "ds.json").exists()


def test_refresh_checkpoint_of_other_mode_restarts(cli, ds):
    assert cli("refresh", "--name", "ds", "--check", "--max-entries", "3").rc == 3
    x = cli("refresh", "--name", "ds", "--json").json()["results"][0]
    assert x["resumed"] is False and x["mode"] == "touch"


def test_refresh_max_entries_zero_stops_at_once(cli, ds):
    r = cli("refresh", "--name", "ds", "--max-entries", "0", "--json")
    assert r.rc == 3 and r.json()["results"][0]["entries_seen"] == 0


def test_budget_covers_whole_command(cli, generic):
    for name in ("a", "b"):
        d = make_dataset(generic["scratch"], name)
        assert cli("add", "--name", name, "--path", d, "--keep-until", KEEP).rc == 0
    r = cli("refresh", "--max-entries", "5", "--json")
    assert r.rc == 3
    res = r.json()["results"]
    assert sum(x["entries_seen"] for x in res) == 5
    assert res[1]["entries_seen"] == 0 and "not started" in res[1]["reason"]


def test_dry_run_writes_nothing(cli, ds, env):
    before_state = state_files(env["state"])
    before_logs = sorted(os.listdir(str(env["state"] / "logs")))
    before = snapshot(ds)
    r = cli("refresh", "--name", "ds", "--dry-run", "--json")
    assert r.rc == 0
    x = r.json()["results"][0]
    assert x["entries_touched"] == x["entries_seen"] == len(before)
    r = cli("refresh", "--name", "ds", "--dry-run", "--max-entries", "2")
    assert r.rc == 3 and "dry run" in r.out
    assert snapshot(ds) == before
    assert state_files(env["state"]) == before_state
    assert sorted(os.listdir(str(env["state"] / "logs"))) == before_logs


def test_check_mode_counts_and_changes_nothing(cli, ds):
    for p, age in ((ds / "f0", 40), (ds / "f1", 20), (ds / "f2", 5)):
        set_atime(p, NOW_EPOCH - age * DAY)
    before = snapshot(ds)
    x = cli("refresh", "--name", "ds", "--check", "--json").json()["results"][0]
    assert snapshot(ds) == before
    assert x["mode"] == "check" and x["entries_touched"] == 0
    # every other entry was created now, ~3 years before NOW: at risk and purge-eligible.
    n = x["entries_seen"]
    assert x["entries_at_risk"] == n - 1                   # all but f2 (5 days)
    assert x["entries_purge_eligible"] == n - 2            # all but f1 (20 d) and f2


def test_br200_refresh_without_approval_checks_and_says_so(cli, env, monkeypatch):
    monkeypatch.setenv("SCRATCH_KEEPALIVE_SCRATCH_ROOT", str(env["scratch"]))
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    assert cli("init").rc == 0
    d = make_dataset(env["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    before = snapshot(d)
    r = cli("refresh", "--name", "ds")
    assert r.rc == 0 and "checked" in r.out
    notes = [line for line in r.out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "no site approval" in notes[0] and "--approval" in notes[0]
    assert snapshot(d) == before
    r = cli("refresh", "--name", "ds", "--json")
    assert json.loads(r.out)["results"][0]["mode"] == "check" and "no site approval" in r.err
    assert cli("extend", "--name", "ds", "--approval", "INC0012345").rc == 0
    r = cli("refresh", "--name", "ds", "--json")
    assert r.json()["results"][0]["mode"] == "touch"
    assert r.json()["results"][0]["entries_touched"] > 0


def test_br200_login_node_gets_a_budget_and_a_hint(cli, env, monkeypatch):
    monkeypatch.setenv("SCRATCH_KEEPALIVE_SCRATCH_ROOT", str(env["scratch"]))
    assert cli("init").rc == 0
    d = make_dataset(env["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    r = cli("refresh", "--name", "ds")
    assert r.rc == 0 and "login node" in r.out and "15 minutes" in r.out and "sbatch" in r.out


def test_combine_exit_codes():
    assert sk.combine_exit_codes([]) == 0
    assert sk.combine_exit_codes([0, 4, 3]) == 3
    assert sk.combine_exit_codes([4, 0]) == 4
    assert sk.combine_exit_codes([3, 1, 4]) == 1
    assert sk.combine_exit_codes([1, 130]) == 130


# ------------------------------------------------------------------ extend, enable, disable, remove

def test_extend(cli, ds, env):
    before = state_files(env["state"])
    assert_error(cli("extend", "--name", "ds"), 2, "--cadence-days")
    assert_error(cli("extend", "--name", "ds", "--cadence-days", "26"), 2, "too long")
    assert_error(cli("extend", "--name", "ds", "--keep-until", "2029-01-01"), 2, "in the past")
    assert_error(cli("extend", "--name", "ds", "--keep-until", "2031-13-01"), 2, "real date")
    assert_error(cli("extend", "--name", "nope", "--keep-until", "2031-01-01"), 2, "no dataset")
    assert_error(cli("extend", "--name", "ds", "--approval", " "), 2, "--approval")
    assert state_files(env["state"]) == before
    r = cli("extend", "--name", "ds", "--keep-until", "2031-01-01")
    assert r.rc == 0 and "2031-01-01" in r.out
    assert cli("list", "--json").json()[0]["keep_until"] == "2031-01-01"


def test_enable_disable(cli, ds):
    assert cli("disable", "--name", "ds").rc == 0
    assert cli("list", "--json").json()[0]["enabled"] is False
    assert cli("enable", "--name", "ds").rc == 0
    assert cli("list", "--json").json()[0]["enabled"] is True
    assert_error(cli("enable", "--name", "nope"), 2, "no dataset")
    assert_error(cli("disable"), 2, "--name")


def test_remove_keeps_data(cli, ds, env):
    assert cli("refresh", "--name", "ds", "--max-entries", "2").rc == 3
    data_before = {k: v[1:] for k, v in snapshot(ds).items()
                   if k not in (".", ".scratch-keepalive")}
    r = cli("remove", "--name", "ds")
    assert r.rc == 0 and "no data" in r.out
    assert not (ds / ".scratch-keepalive").exists()
    assert not (env["state"] / "checkpoints" / "ds.json").exists()
    assert {k: v[1:] for k, v in snapshot(ds).items() if k != "."} == data_before
    assert cli("list", "--json").json() == []
    assert_error(cli("remove", "--name", "ds"), 2, "no dataset")


def test_remove_busy_exits_4(cli, ds, env):
    lock = sk.DatasetLock(sk.Store(str(env["state"])), "ds").acquire()
    try:
        assert_error(cli("remove", "--name", "ds"), 4, "busy", "pid %d" % os.getpid())
        r = cli("refresh", "--name", "ds", "--json")
        assert r.rc == 4 and "busy" in r.json()["results"][0]["reason"]
    finally:
        lock.release()
    assert cli("list", "--json").json()[0]["name"] == "ds"



def test_datasets_named_like_the_stores_own_locks_refresh(cli, generic):
    """A dataset's lock and the store's locks never share a file: a dataset called
    "registry" refreshes, and the registry update at its end does not wait on its own lock."""
    for name in ("registry", "schedule"):
        d = make_dataset(generic["scratch"], name)
        assert cli("add", "--name", name, "--path", d, "--keep-until", KEEP).rc == 0
        r = run_script("refresh", "--name", name, timeout=60)
        assert r.rc == 0, r
        assert cli("status", "--name", name, "--json").json()["last_refresh"]


HOLD_SCHEDULE_LOCK = r"""
import sys
sys.path.insert(0, sys.argv[1])
import scratch_keepalive as sk
lock = sk.Store(sys.argv[2]).schedule_lock()
lock.__enter__()
print("locked", flush=True)
sys.stdin.read()
"""


def test_schedule_change_while_another_holds_the_schedule_lock_exits_4(cli, generic,
                                                                        monkeypatch):
    """One schedule change at a time: uninstall-cron waits for the lock, then gives up with
    exit 4 naming the holder, and changes nothing; the lock dies with its holder."""
    state = generic["state"]
    job_sh = state / "job.sh"
    job_sh.write_text("#!/bin/sh\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SCHEDULE_LOCK, str(SCRIPT.parent),
                               str(state)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        monkeypatch.setattr(sk, "SCHEDULE_LOCK_WAIT", 0.5)
        assert_error(cli("uninstall-cron"), 4, "changing the schedule", "pid %d" % holder.pid)
        assert job_sh.exists()
    finally:
        holder.kill()
        holder.wait()
    with sk.Store(str(state)).schedule_lock(wait=0):
        pass


# ------------------------------------------------------------------ state files

def test_damaged_registry_is_never_overwritten(cli, ds, env):
    reg = env["state"] / "registry.json"
    reg.write_bytes(b'{"format": 1, "datasets": {')
    for argv in (["list"], ["status"], ["refresh"], ["disable", "--name", "ds"],
                 ["add", "--name", "z", "--path", str(ds), "--keep-until", KEEP]):
        r = cli(*argv)
        assert r.rc in (1, 2), (argv, r)
        assert str(reg) in r.err and "repair" in r.err, (argv, r)
    assert reg.read_bytes() == b'{"format": 1, "datasets": {'


def test_registry_from_newer_version_is_refused(cli, ds, env):
    reg = env["state"] / "registry.json"
    doc = json.loads(reg.read_text())
    doc["format"] = 99
    reg.write_text(json.dumps(doc))
    assert_error(cli("list"), 1, "newer scratch-keepalive")


def test_registry_backup_is_previous_good_version(cli, ds, env):
    first = (env["state"] / "registry.json").read_bytes()
    assert cli("disable", "--name", "ds").rc == 0
    assert (env["state"] / "registry.json.bak").read_bytes() == first


def test_atomic_write_failure_leaves_old_file(tmp_path, monkeypatch):
    p = tmp_path / "doc.json"
    sk.atomic_write(str(p), b"old\n")

    def boom(src, dst, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(sk.os, "replace", boom)
    with pytest.raises(OSError):
        sk.atomic_write(str(p), b"new\n")
    assert p.read_bytes() == b"old\n"
    assert os.listdir(str(tmp_path)) == ["doc.json"]


def test_bad_now_is_usage_error(cli, ds, monkeypatch):
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", "next tuesday")
    assert_error(cli("list"), 2, "SCRATCH_KEEPALIVE_NOW")


def test_logs_are_bounded(cli, ds, env):
    for _ in range(23):
        assert cli("refresh", "--name", "ds").rc == 0
    assert len(os.listdir(str(env["state"] / "logs" / "ds"))) == 20


def test_log_content(cli, ds):
    x = cli("refresh", "--name", "ds", "--json").json()["results"][0]
    text = open(x["log"]).read()
    for word in ("start dataset=ds", "mode=touch", "skip_days=11", "counts ", "end complete"):
        assert word in text


# ------------------------------------------------------------------ main() and parser

def test_main_returns_codes_and_restores_signals(cli, ds):
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    env_before = dict(os.environ)
    assert cli("refresh", "--name", "ds").rc == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert dict(os.environ) == env_before


def test_version_and_help(cli):
    r = cli("--version")
    assert r.rc == 0 and r.out.strip() == "scratch-keepalive " + sk.__version__
    r = cli("--help")
    assert r.rc == 0 and "examples:" in r.out and "exit codes:" in r.out and "state:" in r.out
    for cmd in ("init", "add", "list", "status", "refresh", "extend", "enable", "disable",
                "remove", "install-cron", "uninstall-cron", "doctor", "repair"):
        r = cli(cmd, "--help")
        assert r.rc == 0 and "examples:" in r.out, cmd


def test_usage_errors_are_one_line(cli, env):
    assert_error(cli(), 2, "required")
    assert_error(cli("frobnicate"), 2, "invalid choice")
    assert_error(cli("add", "--name", "x"), 2, "required")


def test_state_dir_option_both_places(cli, env, tmp_path):
    other = tmp_path / "other-state"
    assert cli("--state-dir", other, "init", "--profile", "generic", "--scratch-root",
               env["scratch"]).rc == 0
    assert (other / "config.json").exists()
    other2 = tmp_path / "other2"
    assert cli("init", "--state-dir", other2, "--profile", "generic", "--scratch-root",
               env["scratch"]).rc == 0
    assert (other2 / "config.json").exists()
    assert not (env["state"] / "config.json").exists()


def test_import_has_no_side_effects(tmp_path):
    code = ("import signal, os, sys; before=(signal.getsignal(2), signal.getsignal(15), "
            "dict(os.environ), list(sys.path)); sys.path.insert(0, %r); p=list(sys.path); "
            "import scratch_keepalive as m; "
            "assert (signal.getsignal(2), signal.getsignal(15), dict(os.environ)) == before[:3]; "
            "assert sys.path == p; print(m.__version__)" % str(SCRIPT.parent))
    p = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().strip() == sk.__version__


def test_internal_error_is_one_line(cli, ds, monkeypatch):
    def broken(*a, **k):
        raise ZeroDivisionError("boom")
    monkeypatch.setattr(sk, "_list", broken)
    monkeypatch.delenv("SCRATCH_KEEPALIVE_DEBUG", raising=False)
    assert_error(cli("list"), 1, "internal error", "ZeroDivisionError")


def test_progress_line_on_a_terminal_only(cli, generic, monkeypatch):
    """On a terminal, stderr shows a live progress line with the share done; in a pipe, nothing."""
    d = generic["scratch"] / "ds"
    for i in range(10):
        (d / ("d%d" % i)).mkdir(parents=True)
        for j in range(300):
            (d / ("d%d" % i) / str(j)).write_bytes(b"")
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    assert cli("refresh", "--name", "ds", "--check").rc == 0      # gives a total for the share
    monkeypatch.setattr(sk, "PROGRESS_SECONDS", 0.0)
    r = cli("refresh", "--name", "ds", "--check")
    assert r.rc == 0 and r.err == ""                              # StringIO: not a terminal
    rc, text = on_a_terminal(["refresh", "--name", "ds", "--check", "--workers", "1"])
    assert rc == 0
    assert "\rds: " in text.replace("\r\x1b[K", "\r") and " entries, " in text and "/s" in text
    assert "%" in text, text
    assert text.endswith("\r\x1b[K"), text[-40:]                   # the line is cleared at the end
