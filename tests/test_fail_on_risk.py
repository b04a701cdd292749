"""`refresh --fail-on-risk`: which walks fail for purge-eligible entries, its exit-code
precedence, a scheduled stop that booked its continuation, and a real scheduled job.
"""
import json
import os
import shutil

import pytest

from conftest import KEEP, NOW_EPOCH, DAY, make_dataset, set_atime, snapshot
from slurmbed import as_user, make_world, pending, settle, wait_done  # noqa: F401
import scratch_keepalive as sk


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
