"""Slurm's messages as the tool reads them: slurm_reason, SLURM_HINTS and the Slurm class's
error handling, driven by a fake runner that answers with the texts the real test bed gave
(tools/slurm-testbed.sh; /work/shared/reference/slurm-testbed.md lists them).

Only the parsing is faked here: tests/test_slurm.py runs the same paths against the real
Slurm. The runner is handed in the way the API hands it in (`runner=`, kept by Context).
"""
import json
import os
import re

import pytest

from conftest import KEEP
import scratch_keepalive as sk

UNREACHABLE = ("sbatch: error: Batch job submission failed: Unable to contact slurm "
               "controller (connect failure)\n")
BAD_PARTITION = ("sbatch: error: invalid partition specified: nosuch\n"
                 "sbatch: error: Batch job submission failed: Invalid partition name "
                 "specified\n")
NO_MEMORY = ("sbatch: error: Memory specification can not be satisfied\n"
             "sbatch: error: Batch job submission failed: Requested node configuration is "
             "not available\n")
DISABLED = "scrontab: fatal: scrontab is disabled on this cluster\n"


def res(rc=0, out="", err="", argv=("x",)):
    return sk.CommandResult(list(argv), rc, out, err)


class FakeRunner(object):
    """Answers by the command's first words; records every call. None: not installed."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def __call__(self, argv, input_text=None, timeout=120):
        self.calls.append((list(argv), input_text))
        for key in sorted(self.answers, key=len, reverse=True):
            if tuple(argv[:len(key)]) == key:
                answer = self.answers[key]
                return answer(argv) if callable(answer) else answer
        return None

    def ran(self, *words):
        return [argv for argv, _ in self.calls if tuple(argv[:len(words)]) == words]


# ---------------------------------------------------------------- slurm_reason

def test_reason_strips_each_commands_prefix_and_joins_lines_once():
    assert sk.slurm_reason(res(1, err=BAD_PARTITION)) == (
        "invalid partition specified: nosuch; Batch job submission failed: Invalid partition "
        "name specified")
    assert sk.slurm_reason(res(1, err=DISABLED)) == "scrontab is disabled on this cluster"
    same = "squeue: error: Invalid user\nsqueue: error: Invalid user\n"
    assert sk.slurm_reason(res(1, err=same)) == "Invalid user"
    for prefix in ("scancel: error: ", "scontrol: error: ", "scrontab: error: ", "error: "):
        assert sk.slurm_reason(res(1, err=prefix + "it broke\n")) == "it broke"


def test_reason_reads_stdout_too_and_never_is_empty():
    # scrontab puts its explanation on stdout and a terse line on stderr
    r = res(1, out="There are errors in your crontab.\n",
            err="scrontab: error: something is broken\n")
    assert sk.slurm_reason(r) == "something is broken; There are errors in your crontab."
    assert sk.slurm_reason(res(7, out="\n  \n", err="")) == "exit status 7"


# ---------------------------------------------------------------- SLURM_HINTS

@pytest.mark.parametrize("text, hint", [
    (UNREACHABLE, "scontrol ping"),
    (BAD_PARTITION, "sinfo -s"),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition "
     "combination specified\n", "sacctmgr"),
    (NO_MEMORY, "lower --mem"),
    ("sbatch: error: Batch job submission failed: Requested node configuration is not "
     "available\n", "lower --mem, --cpus or --time"),
    ("sbatch: error: Batch job submission failed: Requested time limit is invalid (missing "
     "or exceeds some limit)\n", "lower --time"),
    ("There are errors in your crontab.\n", "install-cron --dry-run"),
])
def test_each_hint_follows_slurms_own_words(text, hint):
    msg = str(sk.slurm_failure("submitting the job (`sbatch`)", res(1, err=text)))
    assert msg.startswith("submitting the job (`sbatch`) failed: " + sk.slurm_reason(
        res(1, err=text))), msg
    assert msg.endswith(next(h for k, h in sk.SLURM_HINTS if k in sk.slurm_reason(
        res(1, err=text)))), msg
    assert hint in msg, msg


def test_every_hint_key_is_reachable_and_unknown_text_says_so():
    for key, hint in sk.SLURM_HINTS:
        first = next(h for k, h in sk.SLURM_HINTS if k in key)
        assert str(sk.slurm_failure("x", res(1, err=key))).endswith(first)
    assert str(sk.slurm_failure("x", res(1, err="sbatch: error: novel\n"))) == \
        "x failed: novel; see Slurm's message"


# ---------------------------------------------------------------- the Slurm class

def test_missing_command_is_one_clear_failure():
    slurm = sk.Slurm(FakeRunner({}))
    with pytest.raises(sk.Failure) as e:
        slurm.submit(["job.sh"])
    assert str(e.value).startswith("`sbatch` is not installed here: Slurm is needed"), e.value
    assert slurm.crontab() == ("missing", None)
    with pytest.raises(sk.Failure, match="`sbatch` is not installed"):
        slurm.test_only(["--wrap", "true"])


def test_crontab_kinds():
    assert sk.Slurm(FakeRunner({("scrontab",): res(0, out="0 0 1 1 * x\n")})).crontab() == \
        ("ok", "0 0 1 1 * x\n")
    assert sk.Slurm(FakeRunner({("scrontab",): res(1, out="no crontab for alice\n")})).crontab() \
        == ("empty", "")
    assert sk.Slurm(FakeRunner({("scrontab",): res(1, err=DISABLED)})).crontab() == \
        ("disabled", "scrontab is disabled on this cluster")


def test_unreadable_crontab_asks_the_controller_first():
    """scrontab alone says only `Unspecified error` when the controller is away."""
    failed = res(1, err="scrontab: fatal: slurm_request_crontab failed: Unspecified error\n")
    down = FakeRunner({("scrontab",): failed, ("scontrol", "ping"): res(
        1, out="Slurmctld(primary) at vm is DOWN\n")})
    with pytest.raises(sk.Failure) as e:
        sk.Slurm(down).crontab()
    assert "controller is unreachable" in str(e.value) and "DOWN" in str(e.value), e.value
    up = FakeRunner({("scrontab",): failed, ("scontrol", "ping"): res(
        0, out="Slurmctld(primary) at vm is UP\n")})
    with pytest.raises(sk.Failure) as e:
        sk.Slurm(up).crontab()
    assert str(e.value) == ("reading your scrontab (`scrontab -l`) failed: "
                            "slurm_request_crontab failed: Unspecified error; see Slurm's "
                            "message"), e.value


def test_pending_parses_ids_and_start_times_in_job_order():
    out = "12 2026-12-17T01:05:00\n9 N/A\n\n  100 2027-01-01T00:00:00\nbogus line\n3\n"
    slurm = sk.Slurm(FakeRunner({("squeue",): res(0, out=out)}))
    assert slurm.pending() == [("3", "N/A"), ("9", "N/A"), ("12", "2026-12-17T01:05:00"),
                               ("100", "2027-01-01T00:00:00")]
    argv = slurm.runner.ran("squeue")[0]
    assert "--me" in argv and "--name=scratch-keepalive" in argv and "--states=PENDING" in argv


def test_pending_failure_names_the_command_and_the_hint():
    slurm = sk.Slurm(FakeRunner({("squeue",): res(1, err="slurm_load_jobs error: Unable to "
                                                          "contact slurm controller (connect "
                                                          "failure)\n")}))
    with pytest.raises(sk.Failure) as e:
        slurm.pending()
    assert str(e.value).startswith("listing your pending jobs (`squeue`) failed: "
                                   "slurm_load_jobs error: Unable to contact"), e.value
    assert "scontrol ping" in str(e.value), e.value


def test_submit_returns_the_id_and_refuses_anything_else():
    ok = sk.Slurm(FakeRunner({("sbatch",): res(0, out="4711;testbed\n")}))
    assert ok.submit(["--begin=now", "job.sh"]) == "4711"
    assert ok.runner.ran("sbatch")[0] == ["sbatch", "--parsable", "--begin=now", "job.sh"]
    odd = sk.Slurm(FakeRunner({("sbatch",): res(0, out="Submitted batch job\n")}))
    with pytest.raises(sk.Failure, match="not a job id"):
        odd.submit(["job.sh"])
    bad = sk.Slurm(FakeRunner({("sbatch",): res(1, err=NO_MEMORY)}))
    with pytest.raises(sk.Failure) as e:
        bad.submit(["job.sh"])
    assert "Memory specification can not be satisfied" in str(e.value) and \
        str(e.value).endswith("lower --mem"), e.value


def test_test_only_gives_slurms_reason_or_none():
    assert sk.Slurm(FakeRunner({("sbatch",): res(0)})).test_only(["--wrap", "true"]) is None
    assert sk.Slurm(FakeRunner({("sbatch",): res(1, err=UNREACHABLE)})).test_only([]) == \
        "Batch job submission failed: Unable to contact slurm controller (connect failure)"


# ---------------------------------------------------------------- the real runner

def test_default_runner_missing_and_not_runnable_are_none(tmp_path):
    """Not installed, and found but not runnable (no execute bit: EACCES, even for root)."""
    assert sk.default_runner([str(tmp_path / "no-such-command")]) is None
    plain = tmp_path / "lfs"
    plain.write_text("#!/bin/sh\necho never\n")
    os.chmod(str(plain), 0o644)
    assert sk.default_runner([str(plain), "quota"]) is None
    r = sk.default_runner(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.rc, r.out, r.err) == (3, "out\n", "err\n")


def test_default_runner_timeout_is_a_failure():
    with pytest.raises(sk.Failure, match=r"`sleep 5` did not answer within 0 s"):
        sk.default_runner(["sleep", "5"], timeout=0.2)


# ---------------------------------------------------------------- Context keeps the runner

def _generic(env):
    sk.init(profile="generic", scratch_root=str(env["scratch"]))
    d = env["scratch"] / "ds"
    d.mkdir()
    sk.add_dataset("ds", str(d), KEEP)


def test_the_apis_runner_reaches_every_slurm_command(env):
    _generic(env)
    fake = FakeRunner({("scrontab", "-l"): res(1, out="no crontab for alice\n")})
    info = sk.install_cron(dry_run=True, runner=fake)
    assert info["schedule"]["method"] == "scrontab" and info["dry_run"] is True, info
    assert fake.ran("scrontab", "-l"), fake.calls
    ctx = sk.Context(runner=fake)
    assert ctx.slurm is ctx.slurm and ctx.slurm.runner is fake


def test_doctor_reads_the_environment_it_is_given(env):
    """Inside a chain job (SLURM_JOB_ID in the env handed to doctor) the running job is the
    chain, so no pending job is no fault; outside one it is."""
    _generic(env)
    store = sk.Store(str(env["state"]))
    sched = sk.Schedule(store, sk.Context().config(), dict(os.environ), "sbatch", None, None,
                        1, "2G", "2:00:00", 14)
    sk.save_schedule(store, dict(sched.as_dict(), installed=sk.iso(0), job_id="5",
                                 last_run=None))
    fake = FakeRunner({("squeue",): res(0, out=""), ("sbatch",): res(0)})
    outside = sk.doctor(runner=fake)
    names = dict((c["name"], c) for c in outside["checks"])
    assert names["schedule-jobs"]["ok"] is False, outside
    inside = sk.doctor(env=dict(os.environ, SLURM_JOB_ID="5"), runner=fake)
    assert "schedule-jobs" not in [c["name"] for c in inside["checks"]], inside
