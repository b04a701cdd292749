"""The Slurm test-bed harness shared by every test that runs against the real Slurm.

The single-node test bed (`bash tools/slurm-testbed.sh start`, as root) has one ordinary
user, `slurmtest`. A test copies scratch_keepalive.py into a fresh world-readable directory
and runs it as that user with a clean environment (conftest's run_script with user=), so
sbatch, squeue, scancel and scrontab see an ordinary user, exactly as on a cluster. Without
the test bed (or without root, runuser or the user) the tests skip with one reason, unless
SCRATCH_KEEPALIVE_REQUIRE_SLURM=1 (CI), where they fail instead.

Every test file that uses the test user takes turns through one flock (USER_LOCK): two
files' jobs, crontabs and scancels must never mix. A test starts and ends with nothing of
the user's in Slurm (no crontab, no job); every wait polls with a deadline.

Use: `from slurmbed import make_world` (the fixture), then `w = make_world()`.
"""
import calendar
import contextlib
import datetime
import fcntl
import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, SCRIPT, run_command, run_script, set_atime, snapshot
import scratch_keepalive as sk

USER = "slurmtest"
PY = "/usr/bin/python3"         # readable by the test user (pyenv's under /root are not)
TESTBED = REPO / "tools" / "slurm-testbed.sh"
JOB = sk.JOB_NAME
DAY = 86400
USER_LOCK = "/tmp/scratch-keepalive-slurmtest.lock"
LOCK_WAIT = 600
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


# ---------------------------------------------------------------- can the Slurm tests run?

def _slurm_missing():
    """Why the Slurm tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "the Slurm tests run as root (they switch to %s with runuser)" % USER
    if not shutil.which("runuser"):
        return "runuser is not installed"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return "user %s does not exist (bash tools/slurm-testbed.sh start creates it)" % USER
    if not os.access(PY, os.X_OK):
        return "%s is missing" % PY
    if not shutil.which("scontrol"):
        return "Slurm is not installed (bash tools/slurm-testbed.sh start)"
    try:
        p = subprocess.run(["scontrol", "ping"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=20)
        answer = p.stdout.decode("utf-8", "replace").strip()
    except subprocess.TimeoutExpired:
        answer = "no answer within 20 s"
    if "UP" not in answer:
        return "the Slurm controller is not up (`scontrol ping`: %s); run bash " \
               "tools/slurm-testbed.sh start" % (answer or "nothing")
    return None


SLURM_MISSING = _slurm_missing()


def _unusable(why):
    if os.environ.get("SCRATCH_KEEPALIVE_REQUIRE_SLURM") == "1":
        pytest.fail("SCRATCH_KEEPALIVE_REQUIRE_SLURM=1 but " + why, pytrace=False)
    pytest.skip(why)


def need_slurm():
    """Skip (or, with SCRATCH_KEEPALIVE_REQUIRE_SLURM=1, fail) when the test bed is not usable.

    Called from the test's own call (through make_world), not from a fixture, so that pytest
    reports every such skip at this one line: one folded reason line for each module.
    """
    if SLURM_MISSING:
        _unusable("the Slurm test bed is not usable: " + SLURM_MISSING)


def need_scrontab():
    r = as_user(["scrontab", "-l"])
    if "scrontab is disabled" in r.out + r.err:
        _unusable("scrontab is disabled on the test bed (SLURM_TESTBED_SCRON=0)")


# ---------------------------------------------------------------- running things as the user

def user_env(extra=None):
    """The test user's whole environment: nothing leaks in from root's (pyenv, SLURM_*, NOW)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": pwd.getpwnam(USER).pw_dir,
           "USER": USER, "LOGNAME": USER, "LANG": "C.UTF-8", "TZ": "UTC"}
    env.update(extra or {})
    return env


def as_user(argv, env=None, input_text=None, timeout=60):
    """Run argv as the test user with a clean environment; Result(rc, out, err)."""
    return run_command(argv, env=user_env(env), user=USER, input_text=input_text,
                       timeout=timeout)


def crontab():
    """The test user's crontab text ('' when there is none)."""
    r = as_user(["scrontab", "-l"])
    if r.rc == 0:
        return r.out
    assert "no crontab for" in r.out + r.err, r
    return ""


def set_crontab(text):
    r = as_user(["scrontab", "-"], input_text=text)
    assert r.rc == 0, r
    assert crontab() == text


def jobs():
    """[{id, name, state, reason, start, command}] of every job of the test user in squeue."""
    r = as_user(["squeue", "--me", "--noheader", "--format=%i|%j|%T|%r|%S|%o"])
    assert r.rc == 0, r
    rows = []
    for line in r.out.splitlines():
        if line.strip():
            i, n, st, reason, start, command = line.strip().split("|", 5)
            rows.append({"id": i, "name": n, "state": st, "reason": reason, "start": start,
                         "command": command})
    return rows


def pending(name=JOB):
    return [j for j in jobs() if j["name"] == name and j["state"] == "PENDING"]


def show_job(job_id):
    """`scontrol show job` as a dict of its Key=Value fields."""
    r = as_user(["scontrol", "-o", "show", "job", str(job_id)])
    assert r.rc == 0, r
    fields = {}
    for token in r.out.split():
        if "=" in token:
            k, v = token.split("=", 1)
            fields.setdefault(k, v)
    return fields


def wait_done(job_id, timeout=90):
    """Poll until the job has ended; its final `scontrol show job` fields."""
    deadline = time.monotonic() + timeout
    while True:
        f = show_job(job_id)
        if f.get("JobState") in TERMINAL:
            return f
        assert time.monotonic() < deadline, "job %s did not end within %d s: %r" % (
            job_id, timeout, f)
        time.sleep(0.2)


def settle(name=None, timeout=90):
    """Wait until none of the user's jobs runs or is about to start (only future ones left);
    returns the jobs left (those named `name` when it is given).

    A just-submitted job may be PENDING with Reason=None for 1-2 s before it starts.
    """
    deadline = time.monotonic() + timeout
    while True:
        rows = jobs()
        busy = [j for j in rows if j["state"] != "PENDING" or j["reason"] != "BeginTime"]
        if not busy:
            return [j for j in rows if name is None or j["name"] == name]
        assert time.monotonic() < deadline, "jobs still busy after %d s: %r" % (timeout, busy)
        time.sleep(0.2)


def slurm_epoch(text):
    """A Slurm time (the user's TZ is UTC) as epoch seconds."""
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


def clean_user():
    """Leave nothing of the test user's in Slurm: crontab first (scancel disables its lines)."""
    as_user(["scrontab", "-r"])
    as_user(["scancel", "--user", USER])
    deadline = time.monotonic() + 30
    while jobs() and time.monotonic() < deadline:
        time.sleep(0.2)


_held = {"fd": None, "depth": 0}


@contextlib.contextmanager
def user_lock():
    """Hold the test user's lock (re-entrant in this process: flock is per open file)."""
    if _held["depth"] == 0:
        fd = os.open(USER_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    pytest.fail("%s stayed locked for %d s by another test run" % (
                        USER_LOCK, LOCK_WAIT), pytrace=False)
                time.sleep(0.2)
        _held["fd"] = fd
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1
        if _held["depth"] == 0:
            os.close(_held["fd"])       # closing the only descriptor releases the flock
            _held["fd"] = None


def restart_testbed(scron):
    """(Re)start the test bed with scrontab enabled ("1") or disabled ("0")."""
    env = dict(os.environ, SLURM_TESTBED_SCRON=scron)
    p = subprocess.run(["bash", str(TESTBED), "start"], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=240)
    assert p.returncode == 0, p.stdout.decode("utf-8", "replace")[-3000:]


# ---------------------------------------------------------------- a world of the test user's

class World(object):
    """A copy of the tool (in a/, so that a test can move it), a state dir and a scratch
    root, all usable by the test user, initialised with `profile`."""

    def __init__(self, root, profile="generic", state="state"):
        self.root = root
        self.script = root / "a" / "scratch_keepalive.py"
        self.state = root / state
        self.scratch = root / "scratch"
        self.job_sh = self.state / "job.sh"
        self.schedule = self.state / "schedule.json"
        self.logs = self.state / "logs"
        self.script.parent.mkdir()
        os.chmod(str(self.script.parent), 0o755)
        shutil.copyfile(str(SCRIPT), str(self.script))
        os.chmod(str(self.script), 0o644)
        for d in (self.state, self.scratch):
            d.mkdir()
            shutil.chown(str(d), USER, USER)
        if profile == "br200":
            r = self.tool("init", env={"SCRATCH_KEEPALIVE_SCRATCH_ROOT": str(self.scratch)})
        else:
            r = self.tool("init", "--profile", "generic", "--scratch-root", self.scratch)
        assert r.rc == 0, r

    def tool(self, *args, env=None, timeout=120, script=None):
        """The tool run as the test user, its state dir given by SCRATCH_KEEPALIVE_HOME."""
        e = {"SCRATCH_KEEPALIVE_HOME": str(self.state)}
        e.update(env or {})
        return run_script(*args, python=PY, script=script or self.script, env=user_env(e),
                          user=USER, timeout=timeout)

    def command_prefix(self):
        return "%s %s --state-dir %s" % (PY, self.script, self.state)

    def make_dataset(self, name="ds", files=12, age_days=60):
        """A dataset (files, a subdirectory, a symlink) owned by the user, atimes aged; added."""
        d = self.scratch / name
        (d / "sub").mkdir(parents=True)
        for i in range(files):
            (d / ("f%02d" % i)).write_bytes(b"x" * (i + 1))
            (d / "sub" / ("g%02d" % i)).write_bytes(b"y")
        os.symlink("f00", str(d / "link"))
        subprocess.run(["chown", "-R", "-h", "%s:%s" % (USER, USER), str(d)], check=True)
        keep = (datetime.date.today() + datetime.timedelta(days=365)).isoformat()
        r = self.tool("add", "--name", name, "--path", d, "--keep-until", keep)
        assert r.rc == 0, r
        self.age(d, age_days)
        return d

    @staticmethod
    def age(d, days):
        old = time.time() - days * DAY
        for rel in snapshot(d):
            set_atime(d if rel == "." else d / rel, old)

    def status(self):
        r = self.tool("status")
        assert r.rc == 0, r
        return r.out

    def status_json(self, name="ds"):
        r = self.tool("status", "--name", name, "--json")
        assert r.rc == 0, r
        return json.loads(r.out)

    def install_sbatch(self, *extra):
        """install-cron --method sbatch and its first run; returns (first job, pending job)."""
        r = self.tool("install-cron", "--method", "sbatch", *extra)
        assert r.rc == 0, r
        m = re.search(r"Submitted job (\d+) ", r.out)
        assert m, r
        first = wait_done(m.group(1))
        assert first["JobState"] == "COMPLETED", first
        settle()
        p = pending()
        assert len(p) == 1, p
        return m.group(1), p[0]

    def fire(self, job_id):
        """Start a pending chain job now, as its owner may."""
        r = as_user(["scontrol", "update", "JobId=%s" % job_id, "StartTime=now"])
        assert r.rc == 0, r

    def uninstall(self):
        """uninstall-cron with whichever copy of the script is still there."""
        scripts = sorted(self.root.glob("*/scratch_keepalive.py"))
        if self.state.exists() and scripts:
            self.tool("uninstall-cron", script=scripts[0])


@pytest.fixture
def make_world():
    """make_world(profile, state=...) -> World. The first call checks the test bed and takes
    the test user's lock; at the end everything of the user's is removed from Slurm and disk."""
    roots, worlds = [], []
    with contextlib.ExitStack() as stack:

        def make(profile="generic", state="state"):
            if not roots:
                need_slurm()
                stack.enter_context(user_lock())
                clean_user()
            root = Path(tempfile.mkdtemp(prefix="sk-slurm-", dir="/tmp"))
            os.chmod(str(root), 0o755)
            roots.append(root)
            worlds.append(World(root, profile, state))
            return worlds[-1]

        try:
            yield make
        finally:
            if roots:
                try:
                    for world in worlds:
                        world.uninstall()
                finally:
                    clean_user()
                    for root in roots:
                        shutil.rmtree(str(root), ignore_errors=True)


@pytest.fixture
def slurm_turn():
    """The test user's turn at Slurm for a test that runs the tool in-process (as root)."""
    need_slurm()
    with user_lock():
        yield
