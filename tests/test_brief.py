"""`status --brief`, the login line: silent when nothing needs attention; what it says of
risk, likely purged entries, errors, keep-until dates, disabled datasets and the schedule;
no Slurm command, no state created, fast with many datasets; on a real Slurm test bed.
"""
import json
import os
import shlex
import shutil
from pathlib import Path

import pytest

from conftest import (KEEP, NOW_EPOCH, DAY, assert_error, make_dataset, run_script, set_atime,
                      snapshot, tree_bytes)
from slurmbed import make_world  # noqa: F401
import scratch_keepalive as sk


# ---------------------------------------------------------------- status --brief

def brief(cli, *extra):
    r = cli("status", "--brief", *extra)
    assert r.rc == 0 and r.err == "", r
    return r


def healthy(cli, generic, name="ds", keep=KEEP):
    """A touch-mode dataset refreshed, a schedule installed, a scheduled run reported."""
    d = make_dataset(generic["scratch"], name)
    assert cli("add", "--name", name, "--path", d, "--keep-until", keep).rc == 0
    assert cli("refresh", "--name", name).rc == 0
    store = sk.Store(str(generic["state"]))
    sk.save_schedule(store, {"method": "sbatch", "cadence_days": 14,
                             "installed": sk.iso(NOW_EPOCH - 20 * DAY),
                             "last_run": {"job_id": "12", "finished": sk.iso(NOW_EPOCH - DAY),
                                          "exit_code": 0, "continuation": None}})
    return d, store


def edit_entry(store, name, **fields):
    with store.update_registry() as reg:
        reg["datasets"][name].update(fields)


def edit_last_run(store, **fields):
    doc = sk.load_schedule(store)
    doc["last_run"].update(fields)
    sk.save_schedule(store, doc)


def test_brief_is_silent_when_nothing_needs_attention(cli, generic):
    assert brief(cli).out == ""                         # nothing registered
    assert brief(cli, "--json").json() == []
    healthy(cli, generic)
    assert brief(cli).out == ""
    assert brief(cli, "--json").json() == []
    assert sk.brief() == []


def test_brief_with_no_state_at_all_says_nothing_and_creates_nothing(tmp_path, monkeypatch,
                                                                    cli, env):
    state = tmp_path / "never-made"
    monkeypatch.setenv("SCRATCH_KEEPALIVE_HOME", str(state))
    assert brief(cli).out == "" and not state.exists()


def _alerts(cli):
    r = brief(cli, "--json")
    text = brief(cli).out.splitlines()
    alerts = r.json()
    assert sk.brief() == alerts
    assert len(text) == len(alerts), (text, alerts)
    for line, a in zip(text, alerts):
        assert set(a) == {"name", "kind", "message", "command", "attention"}, a
        assert a["kind"] == (a["attention"][0] if a["name"] else a["kind"]), a
        assert line == "scratch-keepalive: %s: %s; run `%s`" % (a["name"] or "schedule",
                                                                a["message"], a["command"])
    return alerts


def test_brief_check_mode_risk_purge_eligible_and_at_risk(cli, generic):
    healthy(cli, generic)
    d = make_dataset(generic["scratch"], "old")
    assert cli("add", "--name", "old", "--path", d, "--keep-until", KEEP).rc == 0
    assert cli("refresh", "--name", "old", "--check").rc == 0
    d = make_dataset(generic["scratch"], "aging")
    assert cli("add", "--name", "aging", "--path", d, "--keep-until", KEEP).rc == 0
    for rel in snapshot(d):                   # 20 days: past the at-risk 13, short of 30
        set_atime(d if rel == "." else d / rel, NOW_EPOCH - 20 * DAY)
    assert cli("refresh", "--name", "aging", "--check").rc == 0
    alerts = _alerts(cli)
    assert [(a["name"], a["kind"]) for a in alerts] == [("aging", "at-risk"),
                                                        ("old", "purge-eligible")], alerts
    # 10 entries, all the user's
    assert alerts[0]["message"].startswith("10 entries of yours at risk remain after the check "
                                           "walk of "), alerts
    assert alerts[1]["message"].startswith("10 entries of yours older than the purge age "
                                           "remain after the check walk of "), alerts
    assert alerts[1]["command"] == "scratch-keepalive files --name old --purge-eligible"
    # A touch walk since: they were refreshed, nothing to say.
    assert cli("refresh", "--name", "old").rc == 0
    assert [a["name"] for a in _alerts(cli)] == ["aging"]


def test_brief_likely_purged_and_errors_from_the_last_run(cli, generic):
    _, store = healthy(cli, generic)
    entry = store.load_registry()["datasets"]["ds"]
    run = entry["last_run"]
    # The purge record a walk found (found a day ago: within the 14 days it is named).
    purge = dict(dict.fromkeys(sk.PURGE_COUNTS, 0), entries_vanished=3, bytes_vanished=4096,
                 entries_likely_purged=3, bytes_likely_purged=4096, file="purge-000002.skm",
                 found=sk.iso(NOW_EPOCH - DAY), seen=None, dest=None,
                 walk_started=sk.iso(NOW_EPOCH - DAY), previous_walk_started=None)
    edit_entry(store, "ds", purge=purge)
    alerts = _alerts(cli)
    assert [(a["name"], a["kind"]) for a in alerts] == [("ds", "purged")], alerts
    assert alerts[0]["message"].startswith("3 entries (4.0 KiB) likely purged between the walks")
    assert alerts[0]["command"] == "scratch-keepalive files --name ds --vanished"
    edit_entry(store, "ds", purge=None, last_run=dict(run, errors=2, log="/st/logs/ds/x.log"))
    alerts = _alerts(cli)
    assert [(a["name"], a["kind"]) for a in alerts] == [("ds", "errors")], alerts
    assert "had 2 errors, listed in /st/logs/ds/x.log" in alerts[0]["message"], alerts
    # Both: one line, the most urgent kind first, every finding in the message.
    edit_entry(store, "ds", last_run=dict(run, errors=1), purge=dict(
        purge, entries_likely_purged=1, entries_vanished=1))
    alerts = _alerts(cli)
    assert [a["kind"] for a in alerts] == ["purged"], alerts
    assert alerts[0]["attention"] == ["purged", "errors"], alerts
    assert "had 1 error" in alerts[0]["message"], alerts


def test_brief_keep_until_within_two_weeks_and_past(cli, generic, monkeypatch):
    healthy(cli, generic, keep="2030-01-15")
    alerts = _alerts(cli)
    assert [(a["name"], a["kind"]) for a in alerts] == [("ds", "expiring")], alerts
    assert "kept only until 2030-01-15 (in 14 days)" in alerts[0]["message"], alerts
    assert alerts[0]["command"] == "scratch-keepalive extend --name ds --keep-until YYYY-MM-DD"
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", "2029-12-31T23:00:00Z")     # 15 days before
    assert [a["kind"] for a in _alerts(cli)] == []
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", "2030-01-15T23:00:00Z")
    assert "(today)" in _alerts(cli)[0]["message"]
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", "2030-01-17T00:00:00Z")
    alerts = _alerts(cli)
    assert [(a["name"], a["kind"]) for a in alerts] == [("ds", "expired")], alerts
    assert "has passed" in alerts[0]["message"], alerts
    # Until the user extends or removes it: the registry still names it.
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", "2030-03-01T00:00:00Z")
    assert [a["kind"] for a in _alerts(cli)] == ["expired"]
    assert cli("remove", "--name", "ds").rc == 0
    assert [a["kind"] for a in _alerts(cli)] == []


def test_brief_a_disabled_dataset_only_for_what_else_applies(cli, generic):
    _, store = healthy(cli, generic)
    assert cli("disable", "--name", "ds").rc == 0
    os.unlink(str(store.schedule_path))
    assert _alerts(cli) == []                       # disabled: no schedule needed for it
    assert cli("refresh", "--name", "ds", "--check").rc == 1      # refused: disabled
    edit_entry(store, "ds", last_mode="check",
               last_totals=dict(sk.Counts().as_dict(), entries_at_risk=2, bytes_at_risk=9))
    assert [(a["name"], a["kind"]) for a in _alerts(cli)] == [("ds", "at-risk")]


def test_brief_schedule_missing_failed_and_silent(cli, generic):
    _, store = healthy(cli, generic)
    edit_last_run(store, exit_code=1)
    alerts = _alerts(cli)
    assert [(a["name"], a["kind"]) for a in alerts] == [(None, "failed")], alerts
    assert "its last run (job 12, 2029-12-31) failed (exit 1); its log: %s" % os.path.join(
        str(generic["state"]), "logs", "slurm-12.out") == alerts[0]["message"], alerts
    assert alerts[0]["command"] == "scratch-keepalive doctor"
    edit_last_run(store, exit_code=1, exit_code_before_risk=0, risk=["ds"])
    assert _alerts(cli) == []                   # --fail-on-risk: the datasets say the risk
    edit_last_run(store, exit_code=3, exit_code_before_risk=3,
                  continuation="pending job 13 moved to start in an hour")
    assert _alerts(cli) == []                   # stopped, continued: fine
    edit_last_run(store, exit_code=3, continuation="%s: squeue failed" % sk.CONTINUATION_FAILED)
    assert "stopped before its walk completed, and could not schedule" in \
        _alerts(cli)[0]["message"]
    edit_last_run(store, exit_code=0, exit_code_before_risk=0, continuation=None,
                  finished=sk.iso(NOW_EPOCH - 17 * DAY + 60))
    assert _alerts(cli) == []                   # within cadence + 3 days
    edit_last_run(store, finished=sk.iso(NOW_EPOCH - 17 * DAY - 60))
    alerts = _alerts(cli)
    assert [(a["name"], a["kind"]) for a in alerts] == [(None, "silent")], alerts
    assert "no scheduled run has reported since 2029-12-14 (more than 17 days" in \
        alerts[0]["message"], alerts
    doc = sk.load_schedule(store)
    del doc["last_run"]                         # never reported: counted from the install
    doc["installed"] = sk.iso(NOW_EPOCH - 16 * DAY)
    sk.save_schedule(store, doc)
    assert _alerts(cli) == []
    doc["installed"] = sk.iso(NOW_EPOCH - 18 * DAY)
    sk.save_schedule(store, doc)
    assert [a["kind"] for a in _alerts(cli)] == ["silent"]
    with open(store.schedule_path, "w") as f:
        f.write("{not json")
    alerts = _alerts(cli)
    assert [(a["name"], a["kind"]) for a in alerts] == [(None, "failed")], alerts
    os.unlink(store.schedule_path)
    alerts = _alerts(cli)
    assert [(a["name"], a["kind"], a["command"]) for a in alerts] == [
        (None, "missing", "scratch-keepalive install-cron")], alerts
    assert "so ds is refreshed or checked only when you run refresh" in alerts[0]["message"]


def test_brief_reads_a_registry_and_schedule_of_before_these_fields(cli, generic):
    """Old state: no last_totals, last_touch_start or installed; a schedule without
    last_run. Nothing breaks, nothing is invented."""
    d = make_dataset(generic["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    store = sk.Store(str(generic["state"]))
    edit_entry(store, "ds", last_refresh="2029-12-31T00:00:00Z", last_mode="check")
    sk.save_schedule(store, {"method": "scrontab", "cadence_days": 14})
    assert _alerts(cli) == []
    edit_entry(store, "ds", last_run=dict(sk.empty_result("ds", "check"), complete=True,
                                          entries_at_risk=4))
    assert [a["kind"] for a in _alerts(cli)] == ["at-risk"]


def test_brief_with_name_is_refused(cli, generic):
    healthy(cli, generic)
    before = tree_bytes(generic["state"], skip=("locks",))
    for argv in (["--name", "ds"], ["--name", "ds", "--json"]):
        line = assert_error(cli("status", "--brief", *argv), 2, quiet=True)
        assert "status --brief covers every dataset and the schedule, so it takes no --name; " \
               "`scratch-keepalive status --name ds` shows that one in full" in line, line
    assert tree_bytes(generic["state"], skip=("locks",)) == before


def _fake_slurm_bin(tmp_path):
    """A PATH directory whose sbatch, squeue, scontrol, scrontab and scancel leave a mark."""
    b = tmp_path / "slurm-bin"
    b.mkdir()
    mark = tmp_path / "slurm-called"
    for cmd in ("sbatch", "squeue", "scontrol", "scrontab", "scancel", "sacct", "lfs"):
        p = b / cmd
        p.write_text("#!/bin/sh\necho %s >> %s\nexit 1\n" % (cmd, mark))
        p.chmod(0o755)
    return b, mark


def test_brief_runs_no_slurm_command_and_says_the_same_without_slurm(cli, generic, tmp_path):
    healthy(cli, generic)
    d = make_dataset(generic["scratch"], "old")
    assert cli("add", "--name", "old", "--path", d, "--keep-until", KEEP).rc == 0
    assert cli("refresh", "--name", "old", "--check").rc == 0
    b, mark = _fake_slurm_bin(tmp_path)
    nothing = tmp_path / "empty-bin"
    nothing.mkdir()
    outs = []
    for path in ("%s:%s" % (b, os.environ["PATH"]), str(nothing)):
        for extra in ([], ["--json"]):
            r = run_script("status", "--brief", *extra, env={"PATH": path})
            assert r.rc == 0 and r.err == "", r
            outs.append(r.out)
    assert not mark.exists(), mark.read_text()
    assert outs[0] == outs[2] and outs[1] == outs[3], outs
    lines = outs[0].splitlines()
    assert len(lines) == 1 and lines[0].startswith("scratch-keepalive: old: "), lines
    # As run here (python3 PATH), the hint takes that form; JSON keeps PROG's.
    assert lines[0].endswith("`python3 %s files --name old --purge-eligible`" % shlex.quote(
        str(Path(sk.__file__)))), lines
    assert json.loads(outs[1])[0]["command"] == "scratch-keepalive files --name old --purge-eligible"


def test_brief_reads_state_only_with_50_datasets(cli, generic, tmp_path):
    """What keeps the login line cheap with many datasets: `status --brief` reads the state
    directory and nothing below the scratch root (strace sees no call naming a path
    there). How long it takes is the benchmark's to measure (tools/bench.py, brief)."""
    if not shutil.which("strace"):
        pytest.skip("strace is not installed")
    for i in range(50):
        d = generic["scratch"] / ("d%02d" % i)
        d.mkdir()
        (d / "f").write_bytes(b"x")
        assert cli("add", "--name", d.name, "--path", d, "--keep-until", KEEP).rc == 0
    assert cli("refresh", "--check").rc == 0
    trace = tmp_path / "trace"
    r = run_script("status", "--brief", prefix=["strace", "-f", "-qq", "-e", "trace=%file",
                                               "-o", str(trace)])
    assert r.rc == 0, r
    lines = r.out.splitlines()
    assert len(lines) == 51 and lines[-1].startswith("scratch-keepalive: schedule: "), lines
    calls = trace.read_text().splitlines()
    assert any(str(generic["state"]) in c for c in calls)      # the trace sees the state
    assert [c for c in calls if str(generic["scratch"]) in c] == []


# ---------------------------------------------------------------- real Slurm

@pytest.mark.slurm
def test_brief_is_silent_on_a_healthy_real_setup(make_world):
    w = make_world()
    r = w.tool("status", "--brief")
    assert r.rc == 0 and r.out == "", r
    w.make_dataset()
    r = w.tool("status", "--brief")
    assert r.rc == 0 and "schedule: none is installed" in r.out, r
    w.install_sbatch()                      # its first run refreshes the dataset at once
    s = w.status_json()
    assert s["last_refresh"] and s["last_mode"] == "touch", s
    assert json.loads(w.schedule.read_text())["last_run"]["exit_code"] == 0
    r = w.tool("status", "--brief")
    assert r.rc == 0 and r.out == "" and r.err == "", r
