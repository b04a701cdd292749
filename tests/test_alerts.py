"""Telling the user without being asked (issue 11, part 5): `status --brief`,
`install-cron --mail-user` and `refresh --fail-on-risk`.

The rendering, validation, exit-code and alert tests run everywhere; the ones marked
slurm run against the real test bed (tests/slurmbed.py) and read the queued jobs' mail
fields from `scontrol show job`.
"""
import json
import os
import shlex
import shutil
import statistics
import time
from pathlib import Path

import pytest

from conftest import KEEP, NOW_EPOCH, DAY, assert_error, make_dataset, run_script, set_atime, snapshot
from slurmbed import (as_user, crontab, make_world, pending, settle,  # noqa: F401
                      show_job, wait_done)
import scratch_keepalive as sk

BAD_ADDRESSES = ["a b@c.org", "a@@b.org", "ab.org", "a@b.org;rm", "a@b#x", "-a@b.org",
                 "a@b.org\n", "", "a@", "@b.org", "a@b..org", "a@b.org'", "a@$(id)"]


def tree_bytes(path):
    """{relative path: bytes} of every regular file under path but the (empty) lock files."""
    out = {}
    for dirpath, _, files in os.walk(str(path)):
        if os.path.basename(dirpath) == "locks":
            continue
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, str(path))] = fh.read()
    return out


def _schedule(method, mail_user=None, store=None):
    store = store or sk.Store("/N/u/alice/BigRed200/.local/state/scratch-keepalive")
    cfg = {"profile": "br200", "scratch_root": "/N/scratch/alice", "purge_days": 30}
    return sk.Schedule(store, cfg, {"USER": "alice"}, method, "r00000", "general", 1, "2G",
                       "2:00:00", 14, python="/usr/bin/python3",
                       script="/opt/sk/scratch_keepalive.py", mail_user=mail_user)


# ---------------------------------------------------------------- install-cron --mail-user

def test_mail_user_adds_the_mail_options_and_fail_on_risk_to_both_forms():
    cron = _schedule("scrontab", "a@b.org").cron_block()
    scron = [l for l in cron.splitlines() if l.startswith("#SCRON ")]
    assert len(scron) == 1
    opts = scron[0].split()[1:]
    assert opts[-2:] == ["--mail-type=FAIL", "--mail-user=a@b.org"], scron
    entry = [l for l in cron.splitlines() if not l.startswith("#")]
    cmd = shlex.split(entry[0].split(None, 5)[5])
    tail = cmd[cmd.index("refresh"):]
    assert tail[:3] == ["refresh", "--due", "--fail-on-risk"], tail
    assert tail[tail.index("--scheduled") + 1] == "scrontab"

    job = _schedule("sbatch", "a@b.org").job_text().splitlines()
    assert "#SBATCH --mail-type=FAIL" in job and "#SBATCH --mail-user=a@b.org" in job, job
    cmd = shlex.split(job[-1])
    assert "--fail-on-risk" in cmd[cmd.index("refresh"):], cmd

    # Without an address: not a word of it (the golden files in test_slurm pin the rest).
    for method in ("scrontab", "sbatch"):
        text = _schedule(method).text()
        assert "mail" not in text and "--fail-on-risk" not in text, text
        assert "mail_user" not in _schedule(method).as_dict()


def test_a_continuation_and_a_reinstall_keep_the_address(generic):
    """Successors run the job script (its #SBATCH lines); a scrontab run's continuation is
    rendered from the schedule document, and so is a --reinstall (repair's too)."""
    ctx = sk.Context()
    cfg = ctx.config()
    doc = dict(_schedule("scrontab", "a@b.org", ctx.store).as_dict(),
               installed="2029-12-31T00:00:00Z")
    sched = sk.Schedule.from_doc(ctx.store, cfg, ctx.env, doc, method="resume")
    assert sched.request_options()[-2:] == ["--mail-type=FAIL", "--mail-user=a@b.org"]
    assert " --due --fail-on-risk --scheduled resume " in sched.command()
    fields, _ = sk._schedule_request(ctx, cfg, doc, sk.CronRequest(reinstall=True))
    assert fields["mail_user"] == "a@b.org"
    fields, _ = sk._schedule_request(ctx, cfg, None, sk.CronRequest())
    assert fields["mail_user"] is None


def test_install_cron_dry_run_shows_the_address_and_json_has_it_only_when_given(cli, generic):
    d = make_dataset(generic["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    r = cli("install-cron", "--method", "sbatch", "--dry-run", "--mail-user", "a@b.org")
    assert r.rc == 0, r
    assert "#SBATCH --mail-user=a@b.org\n" in r.out and "--fail-on-risk" in r.out, r
    r = cli("install-cron", "--method", "sbatch", "--dry-run", "--json", "--mail-user",
            "a@b.org")
    assert r.json()["schedule"]["mail_user"] == "a@b.org", r
    r = cli("install-cron", "--method", "sbatch", "--dry-run", "--json")
    assert "mail_user" not in r.json()["schedule"] and "mail" not in r.json()["text"], r
    assert not (generic["state"] / "schedule.json").exists()


@pytest.mark.parametrize("addr", BAD_ADDRESSES, ids=[repr(a) for a in BAD_ADDRESSES])
@pytest.mark.parametrize("method", ["scrontab", "sbatch"])
def test_install_cron_refuses_a_bad_address_and_changes_nothing(cli, generic, addr, method):
    d = make_dataset(generic["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    store = sk.Store(str(generic["state"]))
    sk.save_schedule(store, {"method": "sbatch", "cadence_days": 14, "mail_user": "old@b.org",
                             "installed": "2029-12-31T00:00:00Z"})
    before = tree_bytes(generic["state"])
    calls = []

    def runner(argv, input_text=None):
        calls.append(argv)
        return sk.CommandResult(argv, 0, "", "")
    for extra in ([], ["--dry-run"], ["--reinstall"]):
        with pytest.raises(sk.UsageError) as exc:
            sk._install_cron(sk.Context(runner=runner),
                             sk.CronRequest(method, mail_user=addr,
                                            dry_run="--dry-run" in extra,
                                            reinstall="--reinstall" in extra))
        assert "--mail-user" in str(exc.value) and "jdoe@iu.edu" in str(exc.value)
        line = assert_error(cli("install-cron", "--method", method, "--mail-user=" + addr,
                                  *extra), 2, quiet=True)
        assert "--mail-user %r is not an address" % addr in line, line
    assert calls == [], calls                   # Slurm was not even asked
    assert tree_bytes(generic["state"]) == before


def test_a_schedule_document_with_a_bad_address_is_invalid_state(generic):
    store = sk.Store(str(generic["state"]))
    sk.save_schedule(store, {"method": "sbatch", "cadence_days": 14, "mail_user": "a b@c"})
    with pytest.raises(sk.InvalidState) as e:
        sk.load_schedule(store)
    assert "'mail_user'" in str(e.value) and "repair" in str(e.value)
    # A document of an older version, without the field, still reads.
    sk.save_schedule(store, {"method": "sbatch", "cadence_days": 14})
    assert sk.load_schedule(store).get("mail_user") is None


# ---------------------------------------------------------------- refresh --fail-on-risk

def _check_dataset(cli, generic, files=3, age=None):
    d = make_dataset(generic["scratch"], files=files)
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    if age is not None:
        for rel in snapshot(d):
            set_atime(d if rel == "." else d / rel, NOW_EPOCH - age * DAY)
    return d


def test_fail_on_risk_fails_a_complete_check_walk_with_purge_eligible_entries(cli, generic):
    _check_dataset(cli, generic)            # real files: years older than NOW
    r = cli("refresh", "--check")
    assert r.rc == 0, r
    r = cli("refresh", "--check", "--fail-on-risk")
    assert r.rc == 1, r
    assert "purge-eligible" in r.out and "note: --fail-on-risk: exit 1, because of ds " \
        "(10 entries purge-eligible)" in r.out, r
    r = cli("refresh", "--check", "--fail-on-risk", "--json")
    assert r.rc == 1 and r.json()["results"][0]["complete"], r
    assert "--fail-on-risk: exit 1" in r.err, r
    out = sk.refresh(check=True, fail_on_risk=True)
    assert out["exit_code"] == 1 and [n for n, _ in out["risk"]] == ["ds"], out


def test_fail_on_risk_judges_a_resumed_walk_by_the_whole_walk(cli, generic):
    """The run that completes a walk may see none of the old entries itself: its result
    counts one invocation; the walk's totals decide."""
    d = _check_dataset(cli, generic, files=3)
    for rel in snapshot(d):                 # only f0 (the walk's 3rd entry) is old
        set_atime(d if rel == "." else d / rel, NOW_EPOCH - (1 if rel != "f0" else 40) * DAY)
    r = cli("refresh", "--check", "--fail-on-risk", "--max-entries", "3")
    assert r.rc == 3, r                     # stopped: not judged, not a scheduled run
    r = cli("refresh", "--check", "--fail-on-risk", "--json")
    res = r.json()["results"][0]
    assert res["complete"] and res["resumed"] and res["entries_purge_eligible"] == 0, res
    assert r.rc == 1, r


@pytest.mark.parametrize("age, check, rc", [(20, True, 0),     # at risk only: not a failure
                                            (40, False, 0)])   # touch mode: they were touched
def test_fail_on_risk_passes_what_is_not_purge_eligible_in_check_mode(cli, generic, age,
                                                                      check, rc):
    _check_dataset(cli, generic, age=age)
    r = cli(*(["refresh", "--fail-on-risk"] + (["--check"] if check else [])))
    assert r.rc == rc and "--fail-on-risk" not in r.out, r


@pytest.mark.parametrize("codes, risk, continued, want", [
    ([0], False, False, 0), ([0], True, False, 1), ([3], True, False, 1), ([4], True, False, 1),
    ([130], True, False, 130), ([3], False, False, 3), ([3], False, True, 0),
    ([3, 4], False, True, 4), ([3, 1], False, True, 1), ([3], True, True, 1),
    ([0, 3, 130], True, True, 130)])
def test_fail_on_risk_exit_code_precedence(codes, risk, continued, want):
    assert sk.risk_exit_code(codes, [("ds", "x")] if risk else [], continued) == want


class FakeSlurm(object):
    """squeue lists one pending chain job; scontrol update and sbatch succeed (or fail)."""

    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def __call__(self, argv, input_text=None):
        self.calls.append(argv)
        if self.fail:
            return sk.CommandResult(argv, 1, "", "squeue: error: Unable to contact slurm "
                                                 "controller")
        if argv[0] == "squeue":
            return sk.CommandResult(argv, 0, "77 2030-01-14T03:53:00\n", "")
        return sk.CommandResult(argv, 0, "78\n", "")


@pytest.mark.parametrize("fail, risk, want, before", [
    (False, None, 3, None),        # without --fail-on-risk: as ever
    (False, [], 0, 3),             # a stop whose continuation is booked: no failure
    (False, [("ds", "1 entry purge-eligible")], 1, 3),
    (True, [], 3, 3)])             # no continuation booked: still exit 3
def test_a_scheduled_stop_that_booked_its_continuation_ends_0(generic, fail, risk, want,
                                                               before):
    ctx = sk.Context(env=dict(os.environ, SLURM_JOB_ID="76"), runner=FakeSlurm(fail))
    sk.save_schedule(ctx.store, {"method": "sbatch", "cadence_days": 14,
                                 "installed": "2029-12-31T00:00:00Z"})
    results = [sk.empty_result("ds", "check")]
    said, code = sk._scheduled_after(ctx, "sbatch", sk.load_schedule(ctx.store), 3, results,
                                     risk, None if risk is None else [3])
    assert code == want, said
    last = sk.load_schedule(ctx.store)["last_run"]
    assert last["exit_code"] == want and last.get("exit_code_before_risk") == before, last
    if risk:
        assert last["risk"] == ["ds"]
    assert ("moved to start in an hour" in said) == (not fail), said


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
    before = tree_bytes(generic["state"])
    for argv in (["--name", "ds"], ["--name", "ds", "--json"]):
        line = assert_error(cli("status", "--brief", *argv), 2, quiet=True)
        assert "status --brief covers every dataset and the schedule, so it takes no --name; " \
               "`scratch-keepalive status --name ds` shows that one in full" in line, line
    assert tree_bytes(generic["state"]) == before


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


def test_brief_is_fast_with_50_datasets(cli, generic):
    """State only: 50 checked datasets cost about what the interpreter's start-up does."""
    for i in range(50):
        d = generic["scratch"] / ("d%02d" % i)
        d.mkdir()
        (d / "f").write_bytes(b"x")
        assert cli("add", "--name", d.name, "--path", d, "--keep-until", KEEP).rc == 0
    assert cli("refresh", "--check").rc == 0
    times, version = [], []
    for _ in range(3):
        t0 = time.monotonic()
        r = run_script("status", "--brief")
        times.append(time.monotonic() - t0)
        t0 = time.monotonic()
        run_script("--version")
        version.append(time.monotonic() - t0)
        assert r.rc == 0, r
    lines = r.out.splitlines()
    assert len(lines) == 51 and lines[-1].startswith("scratch-keepalive: schedule: "), lines
    assert statistics.median(times) < statistics.median(version) + 0.5, (times, version)


# ---------------------------------------------------------------- real Slurm

def manual_run(w, method, extra):
    """The scheduled command run by hand inside a job, as the schedule would; its fields."""
    cmd = "cd %s && %s refresh --due --scheduled %s %s" % (w.state, w.command_prefix(), method,
                                                            extra)
    out = w.root / "manual"
    if not out.exists():
        out.mkdir()
        shutil.chown(str(out), "slurmtest", "slurmtest")
    r = as_user(["sbatch", "--parsable", "--job-name=sk-manual",
                 "--output=%s/manual-%%j.out" % out, "--wrap", cmd])
    assert r.rc == 0, r
    job = r.out.strip().split(";")[0]
    return wait_done(job), (out / ("manual-%s.out" % job))


def assert_mail(fields):
    assert fields.get("MailUser") == "a@b.org" and fields.get("MailType") == "FAIL", fields


@pytest.mark.slurm
def test_scrontab_job_with_mail_user_has_the_mail_fields_and_runs_fail_on_risk(make_world):
    w = make_world()
    r = w.tool("install-cron", "--method", "scrontab", "--mail-user", "a@b.org")
    assert r.rc == 0 and "Slurm mails a@b.org when a run fails" in r.out, r
    mine = pending()
    assert len(mine) == 1
    f = show_job(mine[0]["id"])
    assert f.get("CronJob") == "Yes", f
    assert_mail(f)
    block = crontab()
    assert "--mail-type=FAIL --mail-user=a@b.org" in block, block
    entry = [l for l in block.splitlines() if l and not l.startswith("#")]
    cmd = shlex.split(entry[0].split(None, 5)[5])
    assert cmd[cmd.index("refresh"):][:3] == ["refresh", "--due", "--fail-on-risk"], cmd
    assert json.loads(w.schedule.read_text())["mail_user"] == "a@b.org"
    st = w.status()
    assert "mail:          to a@b.org when a run fails" in st, st


@pytest.mark.slurm
def test_sbatch_chain_with_mail_user_keeps_it_in_every_successor(make_world):
    w = make_world()
    first, p = w.install_sbatch("--mail-user", "a@b.org")
    assert_mail(show_job(first))
    assert_mail(show_job(p["id"]))
    text = w.job_sh.read_text()
    assert "#SBATCH --mail-type=FAIL\n#SBATCH --mail-user=a@b.org\n" in text, text
    cmd = shlex.split(text.splitlines()[-1])
    assert "--fail-on-risk" in cmd[cmd.index("refresh"):], cmd
    w.fire(p["id"])
    assert wait_done(p["id"])["JobState"] == "COMPLETED"
    settle()
    nxt = pending()
    assert len(nxt) == 1 and nxt[0]["id"] != p["id"], nxt
    assert_mail(show_job(nxt[0]["id"]))


@pytest.mark.slurm
def test_fail_on_risk_in_a_job_a_stop_ends_0_and_purge_eligible_ends_1(make_world):
    """br200: no approval, so check mode; the dataset's entries are 60 days old."""
    w = make_world("br200")
    _, p = w.install_sbatch("--account", "r12345", "--mail-user", "a@b.org")
    w.make_dataset(files=20)
    f, log = manual_run(w, "sbatch", "--fail-on-risk --max-entries 5")
    assert f["JobState"] == "COMPLETED" and f["ExitCode"] == "0:0", (f, log.read_text())
    settle()
    assert [j["id"] for j in pending()] == [p["id"]]        # the continuation: in an hour
    assert "pending job %s moved to start in an hour" % p["id"] in log.read_text()
    assert w.status_json()["checkpoint"]["entries_done"] == 5
    f, log = manual_run(w, "sbatch", "--fail-on-risk")
    assert f["JobState"] == "FAILED" and f["ExitCode"] == "1:0", (f, log.read_text())
    assert "--fail-on-risk: exit 1, because of ds (" in log.read_text()
    last = json.loads(w.schedule.read_text())["last_run"]
    assert last["exit_code"] == 1 and last["exit_code_before_risk"] == 0, last
    assert last["risk"] == ["ds"]
    r = w.tool("status", "--brief", "--json")
    assert r.rc == 0 and [(a["name"], a["kind"]) for a in json.loads(r.out)] == [
        ("ds", "purge-eligible")], r                        # the schedule did not fail


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
