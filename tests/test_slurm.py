"""install-cron, uninstall-cron and the scheduled runs against a REAL Slurm, as an ordinary user.

The Slurm tests need the single-node test bed (`bash tools/slurm-testbed.sh start`, as root):
they copy scratch_keepalive.py into a fresh world-readable directory and run it as the test
user (`runuser -u slurmtest -- env -i ... /usr/bin/python3 COPY ...`), so sbatch, squeue,
scancel and scrontab see an ordinary user, exactly as on a cluster. Without the test bed (or
without root, runuser or the user) they are skipped with one reason, unless
SCRATCH_KEEPALIVE_REQUIRE_SLURM=1 (CI), where they fail instead.

Each Slurm test starts and ends with nothing of the test user's in Slurm: no crontab, no job.
Every wait polls with a deadline. The tests that need scrontab disabled restart the test bed
once to disable it and once to restore it (a class-scoped fixture, restored in `finally`).

The golden-file and cadence tests are pure and run everywhere. Regenerate the golden files
with SCRATCH_KEEPALIVE_UPDATE_GOLDEN=1, then read them before committing.
"""
import datetime
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import assert_error, snapshot
from slurmbed import (JOB, PY, SLURM_MISSING, USER, as_user, clean_user, crontab,  # noqa: F401
                      jobs, make_world, pending, set_crontab, settle, show_job, slurm_epoch,
                      restart_testbed, user_lock, wait_done)
import scratch_keepalive as sk

GOLDEN = Path(__file__).resolve().parent / "golden"
RESUME = sk.RESUME_JOB_NAME
DAY = 86400
# Other people's lines in a crontab: a comment, an entry with its #SCRON line (it never runs
# during a test: 1 January) and a line Slurm disabled after a scancel. Kept byte for byte.
OTHER_CRONTAB = ("# my own crontab: keep these lines exactly\n"
                 "#SCRON --job-name=other-job --time=00:05:00\n"
                 "0 0 1 1 * /bin/true other entry\n"
                 "#DISABLED: 30 3 * * 0 /bin/echo was-cancelled\n")


def our_block(text):
    """The lines from our BEGIN marker to our END marker (inclusive), as text."""
    lines = text.splitlines(True)
    begin = [i for i, l in enumerate(lines) if l.rstrip("\n") == sk.SCRON_BEGIN]
    end = [i for i, l in enumerate(lines) if l.rstrip("\n") == sk.SCRON_END]
    assert len(begin) == 1 and len(end) == 1 and begin[0] < end[0], text
    return "".join(lines[begin[0]:end[0] + 1])


# ---------------------------------------------------------------- 1. scrontab

@pytest.mark.slurm
def test_scrontab_block_merged_replaced_and_removed_byte_for_byte(make_world):
    w = make_world()
    set_crontab(OTHER_CRONTAB)
    others = [j["id"] for j in pending("other-job")]
    assert len(others) == 1

    r = w.tool("install-cron", "--method", "scrontab")
    assert r.rc == 0, r
    text = crontab()
    assert text.startswith(OTHER_CRONTAB), text         # every other line, byte for byte
    block = text[len(OTHER_CRONTAB):]
    assert our_block(text) == block
    lines = block.splitlines()
    assert lines[0] == sk.SCRON_BEGIN and lines[-1] == sk.SCRON_END
    scron = [l for l in lines if l.startswith("#SCRON ")]
    assert len(scron) == 1, block
    opts = scron[0].split()[1:]
    for o in ("--job-name=scratch-keepalive", "--cpus-per-task=1", "--mem=2G",
              "--time=2:00:00", "--output=%s/slurm-%%j.out" % w.logs):
        assert o in opts, scron
    entries = [l for l in lines if not l.startswith("#")]
    assert len(entries) == 1, block
    fields = entries[0].split(None, 5)
    assert fields[2] == "1,15" and fields[3:5] == ["*", "*"], entries     # cadence 14
    cmd = shlex.split(fields[5])
    assert PY in cmd and str(w.script) in cmd
    assert cmd[cmd.index("--state-dir") + 1] == str(w.state)
    assert "refresh" in cmd and "--due" in cmd[cmd.index("refresh"):]
    mine = pending()
    assert len(mine) == 1, jobs()
    assert show_job(mine[0]["id"]).get("CronJob") == "Yes"

    st = w.status()
    assert "schedule: scrontab, every 14 days" in st, st
    assert "next run:      %s (job %s)" % (mine[0]["start"], mine[0]["id"]) in st, st

    # Again with another --time: the block is replaced, never duplicated.
    r = w.tool("install-cron", "--method", "scrontab", "--time", "3:00:00")
    assert r.rc == 0, r
    text = crontab()
    assert text.startswith(OTHER_CRONTAB) and text.count(sk.SCRON_BEGIN) == 1, text
    assert "--time=3:00:00" in our_block(text) and "--time=2:00:00" not in text
    assert len(pending()) == 1 and len(pending("other-job")) == 1, jobs()

    # An admin's scancel on our cron job comments our lines out (#DISABLED:); installing again
    # brings back one live block.
    assert as_user(["scancel", pending()[0]["id"]]).rc == 0
    assert "#DISABLED: #SCRON --job-name=scratch-keepalive" in crontab()
    r = w.tool("install-cron", "--method", "scrontab")
    assert r.rc == 0, r
    text = crontab()
    assert text.startswith(OTHER_CRONTAB) and text.count(sk.SCRON_BEGIN) == 1, text
    assert "#DISABLED: #SCRON --job-name=scratch-keepalive" not in text, text
    assert len(pending()) == 1, jobs()

    r = w.tool("uninstall-cron")
    assert r.rc == 0, r
    assert crontab() == OTHER_CRONTAB                   # only our block went
    assert pending() == [] and len(pending("other-job")) == 1, jobs()
    assert not w.schedule.exists()
    r = w.tool("uninstall-cron")
    assert r.rc == 0 and "Nothing was installed" in r.out, r
    assert crontab() == OTHER_CRONTAB


# ---------------------------------------------------------------- 2. sbatch chain, br200

@pytest.mark.slurm
def test_sbatch_chain_br200_request_and_one_pending_job(make_world):
    w = make_world("br200")
    # The test bed has no accounting database: Slurm accepts any --account string.
    first, p = w.install_sbatch("--account", "r12345")
    assert w.job_sh.is_file()
    assert (w.logs / ("slurm-%s.out" % first)).is_file()      # the first run ran at once
    assert "successor job %s submitted" % p["id"] in (w.logs / ("slurm-%s.out" % first)).read_text()
    assert abs(slurm_epoch(p["start"]) - (time.time() + 14 * DAY)) < 600, p
    f = show_job(p["id"])
    assert f["JobName"] == JOB and f["Partition"] == "general", f
    assert f["TimeLimit"] == "02:00:00" and f["NumCPUs"] == "1", f
    assert f.get("MinMemoryNode") == "2G" or "mem=2G" in f.get("TRES", ""), f
    assert f["Account"] == "r12345" and f["Requeue"] == "0", f
    assert f["Command"] == str(w.job_sh), f
    assert f["StdOut"] == str(w.logs / ("slurm-%s.out" % p["id"])), f

    for _ in range(3):                                  # again and again: still one
        r = w.tool("install-cron", "--method", "sbatch", "--account", "r12345")
        assert r.rc == 0, r
    settle()
    assert len(pending()) == 1, jobs()
    assert json.loads(w.schedule.read_text())["method"] == "sbatch"


# ---------------------------------------------------------------- 3. the chain fires

@pytest.mark.slurm
def test_fired_chain_job_refreshes_and_submits_one_successor(make_world):
    w = make_world()
    _, p = w.install_sbatch()
    # Registered after the install's immediate first run, so that the fired run has it to do.
    d = w.make_dataset()
    before = snapshot(d)
    assert all(a < (time.time() - 50 * DAY) * 1e9 for a, _, _, _ in before.values())
    t0 = time.time()
    w.fire(p["id"])
    f = wait_done(p["id"])
    assert f["JobState"] == "COMPLETED" and f["ExitCode"] == "0:0", f
    settle()

    s = w.status_json()
    assert s["last_refresh"] and s["last_mode"] == "touch", s
    assert s["checkpoint"] is None and s["last_run"]["complete"], s
    after = snapshot(d)
    for rel, (atime, mtime, size, mode) in before.items():
        if rel != sk.SENTINEL:
            assert after[rel][0] >= (t0 - 2) * 1e9, rel           # atime moved to now
            if rel != ".":
                assert after[rel][1] == mtime, rel               # mtime never written

    nxt = pending()
    assert len(nxt) == 1 and nxt[0]["id"] != p["id"], jobs()
    assert abs(slurm_epoch(nxt[0]["start"]) - (time.time() + 14 * DAY)) < 600, nxt
    log = w.logs / ("slurm-%s.out" % p["id"])
    assert log.is_file()
    assert "successor job %s submitted" % nxt[0]["id"] in log.read_text()
    st = w.status()
    assert "last run:      job %s finished" % p["id"] in st and ", exit 0" in st, st


@pytest.mark.slurm
def test_chain_job_does_not_inherit_the_installers_environment(make_world):
    """Contract: scheduled jobs never rely on the installer's environment. sbatch exports the
    submitter's whole environment by default, so a preview clock (SCRATCH_KEEPALIVE_NOW) set
    while installing must not become the clock of every run of the chain."""
    w = make_world()
    w.make_dataset()
    r = w.tool("install-cron", "--method", "sbatch",
               env={"SCRATCH_KEEPALIVE_NOW": "2036-01-01T00:00:00Z"})
    assert r.rc == 0, r
    first = re.search(r"Submitted job (\d+) ", r.out).group(1)
    assert wait_done(first)["JobState"] == "COMPLETED"
    log = (w.logs / ("slurm-%s.out" % first)).read_text()
    s = w.status_json()
    assert s["last_refresh"] and s["last_mode"] == "touch", (log, s)


# ---------------------------------------------------------------- 4. the chain ends

@pytest.mark.slurm
def test_uninstall_with_a_pending_chain_job_leaves_none(make_world):
    w = make_world()
    w.install_sbatch()
    r = w.tool("uninstall-cron")
    assert r.rc == 0 and "job script" in r.out, r
    assert pending() == [] and jobs() == []
    assert not w.job_sh.exists() and not w.schedule.exists()
    r = w.tool("uninstall-cron")
    assert r.rc == 0 and "Nothing was installed" in r.out, r


@pytest.mark.slurm
def test_chain_job_without_its_script_does_not_resubmit(make_world):
    w = make_world()
    _, p = w.install_sbatch()
    w.job_sh.unlink()
    w.fire(p["id"])
    f = wait_done(p["id"])        # Slurm runs its own copy of the script, taken at submit
    assert f["JobState"] == "COMPLETED", f
    settle()
    assert pending() == [] and jobs() == [], jobs()
    assert "job script is gone" in (w.logs / ("slurm-%s.out" % p["id"])).read_text()



@pytest.mark.slurm
def test_two_chain_jobs_running_at_once_leave_one_successor(make_world):
    """A duplicate chain job (queued by hand) released together with the real one: both
    run at once on the two CPUs, each checks squeue and would submit a successor. The
    schedule lock makes the second see the first's: exactly one job is left pending."""
    w = make_world()
    _, p = w.install_sbatch()
    r = as_user(["sbatch", "--parsable", "--begin=now+1hour", str(w.job_sh)])
    assert r.rc == 0, r
    dup = r.out.strip().split(";")[0]
    for job in (p["id"], dup):
        w.fire(job)
    done = [wait_done(job) for job in (p["id"], dup)]
    assert all(f["JobState"] == "COMPLETED" for f in done), done
    settle()
    left = pending()
    assert len(left) == 1, jobs()
    logs = [(w.logs / ("slurm-%s.out" % job)).read_text() for job in (p["id"], dup)]
    said = sorted("submitted" if ("successor job %s submitted" % left[0]["id"]) in text
                  else "pending" if "a successor is already pending" in text else text
                  for text in logs)
    assert said == ["pending", "submitted"], logs


# ---------------------------------------------------------------- 5. continuation

def manual_run(w, method, extra="--max-entries 5"):
    """Run the scheduled command by hand inside a job (as the schedule would); its fields."""
    cmd = "cd %s && %s refresh --due --scheduled %s %s" % (w.state, w.command_prefix(), method,
                                                            extra)
    out = w.root / "manual"
    if not out.exists():
        out.mkdir()
        shutil.chown(str(out), USER, USER)
    r = as_user(["sbatch", "--parsable", "--job-name=sk-manual",
                 "--output=%s/manual-%%j.out" % out, "--wrap", cmd])
    assert r.rc == 0, r
    return wait_done(r.out.strip().split(";")[0])


@pytest.mark.slurm
def test_stopped_sbatch_run_moves_the_pending_job_to_an_hour(make_world):
    w = make_world()
    _, p = w.install_sbatch()
    w.make_dataset(files=20)
    f = manual_run(w, "sbatch")
    t_end = time.time()
    assert f["JobState"] == "FAILED" and f["ExitCode"] == "3:0", f     # stopped: exit 3
    settle()
    now_pending = pending()
    assert [j["id"] for j in now_pending] == [p["id"]], jobs()
    start = slurm_epoch(show_job(p["id"])["StartTime"])
    assert abs(start - (t_end + 3600)) < 180, show_job(p["id"])
    assert w.status_json()["checkpoint"]["entries_done"] == 5
    st = w.status()
    assert "pending job %s moved to start in an hour" % p["id"] in st, st


@pytest.mark.slurm
def test_a_stopped_walk_gets_its_continuation_when_another_dataset_had_errors(make_world):
    """Dataset a-err has an entry the job's user may not stat (exit 1 for it); b is stopped
    by the budget (exit 3). The run ends 1, and b's walk must still be continued within
    the hour, not a whole cadence later."""
    w = make_world()
    _, p = w.install_sbatch()
    d = w.scratch / "a-err" / "locked"
    d.mkdir(parents=True)
    (d / "x").write_bytes(b"x")
    subprocess.run(["chown", "-R", "%s:%s" % (USER, USER), str(w.scratch / "a-err")], check=True)
    os.chmod(str(d), 0o600)         # listable by its owner, but no entry in it can be stat'ed
    keep = (datetime.date.today() + datetime.timedelta(days=365)).isoformat()
    assert w.tool("add", "--name", "a-err", "--path", w.scratch / "a-err",
                  "--keep-until", keep).rc == 0
    w.make_dataset(name="b", files=20)
    f = manual_run(w, "sbatch", extra="--max-entries 8")
    assert f["ExitCode"] == "1:0", f
    settle()
    assert [j["id"] for j in pending()] == [p["id"]], jobs()
    start = slurm_epoch(show_job(p["id"])["StartTime"])
    assert abs(start - (time.time() + 3600)) < 240, show_job(p["id"])
    assert "moved to start in an hour" in w.status(), w.status()


@pytest.mark.slurm
def test_stopped_scrontab_run_submits_one_resume_job(make_world):
    w = make_world()
    r = w.tool("install-cron", "--method", "scrontab")
    assert r.rc == 0, r
    block = our_block(crontab())
    w.make_dataset(files=20)
    for _ in range(2):                       # the second stopped run finds the first's job
        f = manual_run(w, "scrontab")
        assert f["ExitCode"] == "3:0", f
        settle()
        resume = pending(RESUME)
        assert len(resume) == 1, jobs()
        assert abs(slurm_epoch(resume[0]["start"]) - (time.time() + 3600)) < 180, resume
    assert our_block(crontab()) == block and len(pending()) == 1, crontab()
    r = w.tool("uninstall-cron")
    assert r.rc == 0, r
    assert jobs() == [] and crontab() == "", jobs()


# ---------------------------------------------------------------- 6. scrontab disabled

@pytest.fixture(scope="class")
def scrontab_disabled():
    """The test bed restarted without ScronParameters=enable; restored afterwards, always."""
    if SLURM_MISSING:
        yield               # each test skips (or fails) by itself, in make_world
        return
    with user_lock():
        try:
            clean_user()
            restart_testbed("0")
            r = as_user(["scrontab", "-l"])
            assert r.rc == 1 and "scrontab is disabled" in r.err, r
            yield
        finally:
            clean_user()
            restart_testbed("1")


@pytest.mark.slurm
@pytest.mark.usefixtures("scrontab_disabled")
class TestScrontabDisabled(object):

    def test_auto_falls_back_to_the_sbatch_chain(self, make_world):
        w = make_world()
        r = w.tool("install-cron")
        assert r.rc == 0 and "Submitted job" in r.out, r
        m = re.search(r"Submitted job (\d+) ", r.out)
        assert wait_done(m.group(1))["JobState"] == "COMPLETED"
        settle()
        assert w.job_sh.is_file() and len(pending()) == 1, jobs()
        assert json.loads(w.schedule.read_text())["method"] == "sbatch"
        r = w.tool("uninstall-cron")
        assert r.rc == 0, r
        assert jobs() == [] and not w.job_sh.exists()

    def test_method_scrontab_refused_and_nothing_installed(self, make_world):
        w = make_world()
        line = assert_error(w.tool("install-cron", "--method", "scrontab"), 1)
        assert "scrontab is disabled" in line, line
        assert not w.job_sh.exists() and not w.schedule.exists()
        assert jobs() == []


# ---------------------------------------------------------------- 7. errors

def _unreachable_conf(w):
    """A copy of slurm.conf whose controller port nobody listens on (the real one stays up)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    text = Path("/etc/slurm/slurm.conf").read_text()
    text = re.sub(r"(?m)^SlurmctldPort=.*$", "SlurmctldPort=%d" % port, text)
    # WARNING: without a short MessageTimeout each client retries for about 10 s.
    text += "\nMessageTimeout=1\n"
    conf = w.root / "slurm-unreachable.conf"
    conf.write_text(text)
    os.chmod(str(conf), 0o644)
    return {"SLURM_CONF": str(conf)}


def _no_slurm_path(w):
    """A PATH with python and env only: no sbatch, squeue, scancel or scrontab."""
    b = w.root / "bin"
    b.mkdir()
    os.symlink(PY, str(b / "python3"))
    os.symlink("/usr/bin/env", str(b / "env"))
    os.chmod(str(b), 0o755)
    return {"PATH": str(b)}


ERROR_CASES = [
    # id, profile, args, environment maker, exit code, regex the error line must match
    ("partition-scrontab", "generic", ["--partition", "nosuch"], None, 1,
     r"invalid partition specified: nosuch"),
    ("partition-sbatch", "generic", ["--method", "sbatch", "--partition", "nosuch"], None, 1,
     r"(?i)invalid partition.*nosuch|nosuch.*invalid partition"),
    ("mem-scrontab", "generic", ["--mem", "100000G"], None, 1,
     r"Memory specification can not be satisfied|node configuration is not available"),
    ("mem-sbatch", "generic", ["--method", "sbatch", "--mem", "100000G"], None, 1,
     r"Memory specification can not be satisfied|node configuration is not available"),
    ("unreachable-sbatch", "generic", ["--method", "sbatch"], _unreachable_conf, 1,
     r"Unable to contact slurm controller"),
    # scrontab itself only says "slurm_request_crontab failed: Unspecified error" here; the
    # tool must still tell the user that the controller does not answer.
    ("unreachable-auto", "generic", [], _unreachable_conf, 1,
     r"(?i)Unable to contact slurm controller|controller (is )?unreachable"),
    ("no-slurm-auto", "generic", [], _no_slurm_path, 1, r"Slurm is needed"),
    ("no-slurm-sbatch", "generic", ["--method", "sbatch"], _no_slurm_path, 1,
     r"Slurm is needed"),
    ("br200-no-account", "br200", ["--method", "sbatch"], None, 2, r"--account.*sacctmgr"),
    ("br200-cadence-7", "br200", ["--account", "r1", "--cadence-days", "7"], None, 2,
     r"--cadence-days 7"),
    ("time-too-short", "generic", ["--time", "0:05:00"], None, 2, r"--time"),
    ("mem-not-a-size", "generic", ["--mem", "lots"], None, 2, r"--mem 'lots'"),
]


@pytest.mark.slurm
@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_install_errors_are_one_line_and_install_nothing(make_world, case):
    _, profile, args, make_env, code, pattern = case
    w = make_world(profile)
    set_crontab(OTHER_CRONTAB)
    before = sorted(j["id"] for j in jobs())
    env = make_env(w) if make_env else None
    line = assert_error(w.tool("install-cron", *args, env=env), code)
    assert re.search(pattern, line), line
    assert crontab() == OTHER_CRONTAB
    assert not w.job_sh.exists() and not w.schedule.exists()
    assert sorted(j["id"] for j in jobs()) == before, jobs()


# ---------------------------------------------------------------- 7b. odd state directories

@pytest.mark.slurm
def test_state_dir_with_a_space_and_a_percent_runs_and_logs_there(make_world):
    """sbatch reads quotes in #SBATCH lines, and `%` in --output is a Slurm filename pattern
    (`%x` is the job name): the chain's first run must write its log in this very directory."""
    w = make_world(state="state dir %x")
    w.make_dataset()
    first, p = w.install_sbatch()
    assert '#SBATCH --output="%s/slurm-%%j.out"' % str(w.logs).replace("%", "%%") in \
        w.job_sh.read_text().splitlines()
    log = w.logs / ("slurm-%s.out" % first)
    assert log.is_file(), sorted(os.listdir(str(w.logs)))
    assert "successor job %s submitted" % p["id"] in log.read_text()
    s = w.status_json()
    assert s["last_refresh"] and s["last_run"]["complete"], s
    r = w.tool("uninstall-cron")
    assert r.rc == 0 and pending() == [] and not w.job_sh.exists(), (r, jobs())


REFUSED_STATE_DIRS = [
    # id, state dir name, install-cron args, regex the error line must match
    ("space-scrontab", "state dir", ["--method", "scrontab"],
     r"holds a space, which an #SCRON line cannot hold.*--method sbatch"),
    ("space-auto", "state dir", [], r"holds a space"),
    ("newline-sbatch", "state\ndir", ["--method", "sbatch"],
     r"state\\ndir holds a line break, which no #SBATCH or #SCRON line can hold"),
    ("newline-scrontab", "state\ndir", ["--method", "scrontab"], r"holds a line break"),
    ("newline-dry-run", "state\ndir", ["--method", "sbatch", "--dry-run"],
     r"holds a line break"),
]


@pytest.mark.slurm
@pytest.mark.parametrize("case", REFUSED_STATE_DIRS, ids=[c[0] for c in REFUSED_STATE_DIRS])
def test_state_dir_the_lines_cannot_hold_is_refused_and_nothing_installed(make_world, case):
    _, state, args, pattern = case
    w = make_world(state=state)
    set_crontab(OTHER_CRONTAB)
    before = sorted(j["id"] for j in jobs())
    line = assert_error(w.tool("install-cron", *args), 2)
    assert re.search(pattern, line), line
    assert crontab() == OTHER_CRONTAB
    assert not w.job_sh.exists() and not w.schedule.exists()
    assert sorted(j["id"] for j in jobs()) == before, jobs()


# ---------------------------------------------------------------- 8. --dry-run

@pytest.mark.slurm
@pytest.mark.parametrize("method", ["scrontab", "sbatch"])
def test_dry_run_prints_exactly_what_is_installed_and_changes_nothing(make_world, method):
    w = make_world()
    set_crontab(OTHER_CRONTAB)
    before = jobs()
    r = w.tool("install-cron", "--method", method, "--dry-run")
    assert r.rc == 0, r
    head, text = r.out.split("\n", 1)
    assert head.startswith("Would install ("), r
    assert crontab() == OTHER_CRONTAB and jobs() == before
    assert not w.schedule.exists() and not w.job_sh.exists()

    r = w.tool("install-cron", "--method", method)
    assert r.rc == 0, r
    if method == "scrontab":
        assert crontab() == OTHER_CRONTAB + text
        assert our_block(crontab()) == text
    else:
        assert w.job_sh.read_text() == text


# ---------------------------------------------------------------- 9. golden files (no Slurm)

def _golden_schedule(method):
    store = sk.Store("/N/u/alice/BigRed200/.local/state/scratch-keepalive")
    cfg = {"profile": "br200", "scratch_root": "/N/scratch/alice", "purge_days": 30}
    return sk.Schedule(store, cfg, {"USER": "alice"}, method, "r00000", "general", 1, "2G",
                       "2:00:00", 14, python="/usr/bin/python3",
                       script="/opt/sk/scratch_keepalive.py")


def _check_golden(name, text):
    path = GOLDEN / name
    if os.environ.get("SCRATCH_KEEPALIVE_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), "%s differs from the rendering:\n%s" % (path, text)


def test_job_script_quotes_an_odd_state_dir_and_escapes_percent():
    store = sk.Store("/N/u/al ice/st%te \"q\" #x")
    cfg = {"profile": "generic", "scratch_root": "/N/scratch/al ice", "purge_days": 30}
    sched = sk.Schedule(store, cfg, {"USER": "alice"}, "sbatch", None, None, 1, "2G",
                        "2:00:00", 14, python="/usr/bin/python3", script="/opt/s k/sk.py")
    lines = sched.job_text().splitlines()
    assert '#SBATCH --output="/N/u/al ice/st%%te \\"q\\" #x/logs/slurm-%j.out"' in lines, lines
    assert "--output=/N/u/al ice/st%%te \"q\" #x/logs/slurm-%j.out" in sched.request_options()
    cmd = shlex.split(lines[-1])
    assert cmd[1] == store.dir and cmd[cmd.index("--state-dir") + 1] == store.dir, cmd
    assert "SCRATCH_KEEPALIVE_SCRATCH_ROOT=/N/scratch/al ice" in cmd and "/opt/s k/sk.py" in cmd


def _check_command(line, method):
    cmd = shlex.split(line)
    assert cmd[0] == "cd" and cmd[1].startswith("/"), cmd
    i = cmd.index("exec")
    assert cmd[i + 1:i + 5] == ["/usr/bin/python3", "-c", sk.LOADER,
                                "/opt/sk/scratch_keepalive.py"], cmd
    assert cmd[cmd.index("--state-dir") + 1] == "/N/u/alice/BigRed200/.local/state/" \
                                                "scratch-keepalive"
    assert "SCRATCH_KEEPALIVE_SCRATCH_ROOT=/N/scratch/alice" in cmd
    tail = cmd[cmd.index("refresh"):]
    assert "--due" in tail and tail[tail.index("--scheduled") + 1] == method
    max_seconds = int(tail[tail.index("--max-seconds") + 1])
    assert 0 < max_seconds < 2 * 3600 - 120        # stops before the TERM 120 s before the limit


def test_golden_scrontab_block_br200():
    text = _golden_schedule("scrontab").cron_block()
    _check_golden("scrontab-br200.txt", text)
    lines = text.splitlines()
    assert lines[0] == sk.SCRON_BEGIN and lines[-1] == sk.SCRON_END
    assert "*/" not in text
    assert "--output=/N/u/alice/BigRed200/.local/state/scratch-keepalive/logs/slurm-%j.out" in text
    assert "--account=r00000" in text and "--partition=general" in text
    entry = [l for l in lines if not l.startswith("#")]
    assert len(entry) == 1
    minute, hour, dom, month, dow, command = entry[0].split(None, 5)
    assert (dom, month, dow) == ("1,15", "*", "*")
    _check_command(command, "scrontab")


def test_golden_job_script_br200():
    text = _golden_schedule("sbatch").job_text()
    _check_golden("job-br200.sh", text)
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for o in ("--job-name=scratch-keepalive", "--partition=general", "--account=r00000",
              "--cpus-per-task=1", "--mem=2G", "--time=2:00:00", "--no-requeue",
              "--signal=B:TERM@120",
              "--output=/N/u/alice/BigRed200/.local/state/scratch-keepalive/logs/slurm-%j.out"):
        assert "#SBATCH " + o in lines, o
    assert "*/" not in text
    _check_command([l for l in lines if not l.startswith("#")][-1], "sbatch")


# ---------------------------------------------------------------- 10. cadence spacing (pure)

def _cron_field(field, lo, hi):
    """The values a cron field matches ('*', 'a', 'a-b', '*/n', 'a-b/n', comma lists)."""
    values = set()
    for part in field.split(","):
        rng, _, step = part.partition("/")
        if rng == "*":
            a, b = lo, hi
        elif "-" in rng:
            a, b = (int(x) for x in rng.split("-"))
        else:
            a = b = int(rng)
            if step:
                b = hi
        values.update(range(a, b + 1, int(step or 1)))
    return values


def cron_days(dom, dow, start, end):
    """The dates from start to end (inclusive) on which a cron entry with these fields runs."""
    doms = _cron_field(dom, 1, 31)
    dows = set(d % 7 for d in _cron_field(dow, 0, 7))
    days, day = [], start
    while day <= end:
        in_dom = day.day in doms
        in_dow = (day.weekday() + 1) % 7 in dows       # cron: 0 (or 7) is Sunday
        if dom != "*" and dow != "*":
            hit = in_dom or in_dow                     # cron ORs two restricted fields
        else:
            hit = in_dom and in_dow
        if hit:
            days.append(day)
        day += datetime.timedelta(days=1)
    return days


def test_cron_field_evaluation_knows_the_star_slash_14_trap():
    days = cron_days("*/14", "*", datetime.date(2027, 1, 1), datetime.date(2027, 3, 31))
    assert [d.day for d in days][:4] == [1, 15, 29, 1]


@pytest.mark.parametrize("cadence", range(1, 26))
def test_cron_schedule_gaps_stay_within_cadence_plus_3(cadence):
    (cad, dom, dow, lo, hi, desc), effective = sk.cron_schedule(cadence)
    days = cron_days(dom, dow, datetime.date(2027, 1, 1), datetime.date(2028, 12, 31))
    gaps = [(b - a).days for a, b in zip(days, days[1:])]
    assert len(days) >= 2 * 365 // (effective + 3)
    assert min(gaps) >= effective and max(gaps) <= effective + 3, (dom, dow, sorted(set(gaps)))
    assert max(gaps) <= cadence + 3, "a run would come too late for cadence %d" % cadence
    if effective == cadence:
        assert all(cadence <= g <= cadence + 3 for g in gaps), sorted(set(gaps))
    assert (min(gaps), max(gaps)) == (lo, hi), "the table's gaps for %r are wrong" % desc
    if cadence == 14:
        assert sorted(set(d.day for d in days)) == [1, 15]
        assert not any(d.day == 29 for d in days)


# ---------------------------------------------------------------- 11. status

@pytest.mark.slurm
def test_status_shows_method_and_next_run_from_squeue(make_world):
    w = make_world()
    st = w.status()
    assert "schedule: none installed" in st, st
    _, p = w.install_sbatch()
    st = w.status()
    assert "schedule: sbatch, every 14 days" in st, st
    assert "next run:      %s (job %s)" % (p["start"], p["id"]) in st, st


# ---------------------------------------------------------------- switching methods

@pytest.mark.slurm
def test_switch_from_sbatch_to_scrontab_leaves_a_live_block(make_world):
    """The chain's cleanup must not scancel the new scrontab job (that disables its lines)."""
    w = make_world()
    w.install_sbatch()
    r = w.tool("install-cron", "--method", "scrontab")
    assert r.rc == 0, r
    assert not w.job_sh.exists()
    block = our_block(crontab())
    assert "#DISABLED:" not in block, block
    mine = pending()
    assert len(mine) == 1 and show_job(mine[0]["id"]).get("CronJob") == "Yes", jobs()


@pytest.mark.slurm
def test_switch_from_scrontab_to_sbatch_never_scancels_the_cron_job(make_world):
    """Contract: never `scancel` a scrontab job. The controller's log shows every kill request."""
    w = make_world()
    set_crontab(OTHER_CRONTAB)
    assert w.tool("install-cron", "--method", "scrontab").rc == 0
    cron_job = pending()[0]["id"]
    log = re.search(r"SlurmctldLogFile\s*=\s*(\S+)",
                    subprocess.run(["scontrol", "show", "config"], stdout=subprocess.PIPE,
                                   timeout=30).stdout.decode()).group(1)
    offset = os.path.getsize(log)
    first, p = w.install_sbatch()
    assert crontab() == OTHER_CRONTAB
    assert w.job_sh.is_file() and len(pending()) == 1, jobs()
    with open(log, "rb") as f:
        f.seek(offset)
        new = f.read().decode("utf-8", "replace")
    killed = re.findall(r"REQUEST_KILL_JOB JobId=%s\b.*" % cron_job, new)
    assert not killed, "scancel on the scrontab job %s: %s" % (cron_job, killed)


# ---------------------------------------------------------------- warnings

def test_cadence_warning_suggests_a_command_that_works(cli, generic):
    """The warning's suggested command must itself be accepted."""
    d = generic["scratch"] / "ds"
    d.mkdir()
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", "2030-06-30",
               "--cadence-days", "10").rc == 0
    r = cli("install-cron", "--method", "sbatch", "--cadence-days", "7", "--dry-run")
    assert r.rc == 0, r
    m = re.search(r"`scratch-keepalive ([^`]*)`", r.err)
    assert m, r
    r2 = cli(*shlex.split(m.group(1)))
    assert r2.rc == 0, (m.group(1), r2)
