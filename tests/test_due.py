"""The schedule's promise: no entry of a touch-mode dataset ever goes purge days without
an access, whatever manual refreshes, check walks, dry runs or interrupted walks happen
between the scheduled runs, and the `risk` key of `list`/`status`.

Three layers: the issue's reproduction through the CLI on real files; unit tests of the
due rule, the threshold cadence and what a walk records; and a year-long simulation of
the installed schedule that drives the tool's own selection (`_select`), thresholds
(`threshold_cadence`, `thresholds_ns`) and record (`record_walk`) over a model of the
files, because atimes are written by the kernel's clock and a year cannot be waited out.
"""
import json
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from conftest import KEEP, NOW_EPOCH, DAY, make_dataset, run_script, set_atime
import scratch_keepalive as sk

PURGE = 30


def registry(env):
    return json.loads((env["state"] / "registry.json").read_text())


def edit_entry(env, name, **fields):
    path = env["state"] / "registry.json"
    reg = json.loads(path.read_text())
    reg["datasets"][name].update(fields)
    path.write_text(json.dumps(reg))


def install_schedule_record(env, cadence, method="scrontab"):
    """What install-cron records; the rules read only this (no Slurm needed)."""
    sk.save_schedule(sk.Store(str(env["state"])), {"method": method, "cadence_days": cadence})


# ------------------------------------------------------------------ the issue's reproduction

def test_issue_reproduction_one_manual_refresh_no_longer_skips_a_run(tmp_path):
    """A manual refresh that skips files read 10 days ago must not make the schedule skip
    its next run: 12 days later `refresh --due` walks the dataset, so 29 days later
    nothing is purge-eligible."""
    home, root = tmp_path / "home", tmp_path / "scratch"
    gap = root / "gap"
    gap.mkdir(parents=True)
    t0 = time.time()
    for i in range(1, 21):
        (gap / ("f%d" % i)).write_text("%d\n" % i)
        set_atime(gap / ("f%d" % i), t0 - 10 * DAY)
    env = {"SCRATCH_KEEPALIVE_HOME": str(home), "TZ": "UTC", "SCRATCH_KEEPALIVE_NOW": ""}

    def run(*argv, now=None):
        e = dict(env, SCRATCH_KEEPALIVE_NOW=sk.iso(now) if now else "")
        r = run_script(*argv, env=e)
        assert "Traceback" not in r.err, r
        return r
    assert run("init", "--profile", "generic", "--scratch-root", root).rc == 0
    assert run("add", "--name", "gap", "--path", gap, "--keep-until", "2099-06-30").rc == 0
    r = run("refresh", "--name", "gap", "--json")
    first = r.json()["results"][0]
    assert r.rc == 0 and first["complete"] and first["entries_touched"] == 0, r
    r = run("refresh", "--due", "--json", now=t0 + 12 * DAY)
    assert r.rc == 0, r
    results = r.json()["results"]
    assert [x["name"] for x in results] == ["gap"], (results, r.err)
    assert results[0]["entries_touched"] >= 20
    r = run("refresh", "--name", "gap", "--check", "--dry-run", "--json", now=t0 + 29 * DAY)
    assert r.rc == 0 and r.json()["results"][0]["entries_purge_eligible"] == 0, r


@pytest.fixture
def ds(cli, generic):
    d = make_dataset(generic["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    return d


def test_a_check_walk_does_not_make_a_touch_dataset_look_refreshed(cli, ds, env, monkeypatch):
    """Its last touch walk 13.5 days ago; a complete `--check` walk now; `--due` still
    takes it (before: the check walk moved its due date by two weeks)."""
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(time.time()))
    assert cli("refresh", "--name", "ds").rc == 0
    old = sk.iso(time.time() - 13.5 * DAY)
    edit_entry(env, "ds", last_refresh_start=old, last_touch_start=old)
    r = cli("refresh", "--name", "ds", "--check", "--json")
    assert r.rc == 0 and r.json()["results"][0]["mode"] == "check", r
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(time.time() + 60))
    r = cli("refresh", "--due", "--dry-run", "--json")
    assert [x["name"] for x in r.json()["results"]] == ["ds"], r
    assert r.json()["results"][0]["mode"] == "touch"
    entry = registry(env)["datasets"]["ds"]
    assert entry["last_touch_start"] == old and entry["last_mode"] == "check"
    assert entry["last_check_start"] and entry["last_check_start"] != old


def test_dry_runs_and_stopped_walks_record_nothing(cli, ds, env):
    assert cli("refresh", "--name", "ds").rc == 0
    before = registry(env)["datasets"]["ds"]
    assert before["last_touch_start"] == before["last_refresh_start"]
    assert before["last_check_start"] is None
    keys = ("last_touch_start", "last_check_start", "last_refresh", "last_refresh_start",
            "last_mode")
    for argv in (["--dry-run"], ["--check", "--dry-run"], ["--max-entries", "2"],
                 ["--check", "--max-entries", "2"]):
        r = cli("refresh", "--name", "ds", *argv)
        assert r.rc in (0, 3), (argv, r)
        after = registry(env)["datasets"]["ds"]
        assert [after[k] for k in keys] == [before[k] for k in keys], argv


def test_due_selection_follows_the_rule_with_the_schedule_cadence(cli, ds, env, monkeypatch):
    """A 14-day dataset on a 7-day schedule is due 8 days after its last touch walk
    started; with no schedule (or an equal one) 24 hours after."""
    assert cli("extend", "--name", "ds", "--cadence-days", "14").rc == 0
    assert cli("refresh", "--name", "ds").rc == 0
    start = sk.parse_iso(registry(env)["datasets"]["ds"]["last_touch_start"])

    def due_at(offset):
        monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(start + offset))
        r = cli("refresh", "--due", "--dry-run", "--json")
        assert r.rc == 0, r
        return [x["name"] for x in r.json()["results"]] == ["ds"]
    assert not due_at(DAY - 60) and due_at(DAY)
    install_schedule_record(env, 7)
    assert not due_at(8 * DAY - 60) and due_at(8 * DAY)
    install_schedule_record(env, 14)
    assert not due_at(DAY - 60) and due_at(DAY)
    # `state` keeps its meaning for people: due after cadence - 1 days.
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(start + 12 * DAY))
    s = cli("status", "--name", "ds", "--json").json()
    assert s["state"] == "ok" and s["next_due"] == sk.iso(start + 13 * DAY)
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(start + 13 * DAY))
    assert cli("status", "--name", "ds", "--json").json()["state"] == "due"


def test_state_counts_from_the_last_walk_of_the_datasets_mode(cli, ds, env, monkeypatch):
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    entry = registry(env)["datasets"]["ds"]
    start = sk.parse_iso(entry["last_check_start"])
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(start + 60))
    s = cli("status", "--name", "ds", "--json").json()
    # a touch-mode dataset that was only ever checked is due, not ok
    assert s["mode"] == "touch" and s["state"] == "due" and s["next_due"] is None
    assert s["last_touch_start"] is None and s["last_check_start"] == entry["last_check_start"]
    assert "next due now" in cli("status", "--name", "ds").out


def test_thresholds_use_the_larger_of_dataset_and_schedule_cadence(cli, ds, env):
    """A 7-day dataset under a 14-day schedule: files 15 days old are touched (skip
    threshold 11 days, not 18), and status shows the thresholds used."""
    assert cli("extend", "--name", "ds", "--cadence-days", "7").rc == 0
    for p in sorted(Path(ds).rglob("*")) + [Path(ds)]:
        set_atime(p, NOW_EPOCH - 15 * DAY)
    install_schedule_record(env, 14)
    s = cli("status", "--name", "ds", "--json").json()
    assert s["thresholds_days"] == {"skip": 11, "at_risk": 13, "purge": 30}
    r = cli("refresh", "--name", "ds", "--check", "--json").json()["results"][0]
    assert r["entries_at_risk"] == r["entries_seen"]     # 15 days > 13
    r = cli("refresh", "--name", "ds", "--json").json()["results"][0]
    assert r["entries_skipped"] == 0 and r["entries_touched"] == r["entries_seen"], r
    os.unlink(str(env["state"] / "schedule.json"))
    s = cli("status", "--name", "ds", "--json").json()
    assert s["thresholds_days"] == {"skip": 18, "at_risk": 20, "purge": 30}


def test_a_damaged_schedule_record_falls_back_to_the_datasets_cadence(cli, ds, env):
    (env["state"] / "schedule.json").write_text("{not json")
    assert sk.schedule_cadence(sk.Store(str(env["state"]))) is None
    r = cli("refresh", "--due", "--json")
    assert r.rc == 0 and [x["name"] for x in r.json()["results"]] == ["ds"], r
    s = cli("status", "--name", "ds", "--json").json()
    assert s["thresholds_days"]["skip"] == 11


def test_an_older_registry_keeps_its_last_walk_for_its_mode(cli, ds, env, monkeypatch):
    """Entries written before last_touch_start/last_check_start: the last walk counts for
    the mode it was in, and the next walk of the other mode keeps it."""
    assert cli("refresh", "--name", "ds").rc == 0
    path = env["state"] / "registry.json"
    reg = json.loads(path.read_text())
    entry = reg["datasets"]["ds"]
    del entry["last_touch_start"], entry["last_check_start"]
    start = sk.parse_iso(entry["last_refresh_start"]) - 3600
    entry["last_refresh_start"] = sk.iso(start)
    path.write_text(json.dumps(reg))
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(start + 60))
    r = cli("refresh", "--due", "--json")
    assert r.rc == 0 and r.json()["results"] == [], r
    s = cli("status", "--name", "ds", "--json").json()
    assert s["state"] == "ok" and s["last_touch_start"] == entry["last_refresh_start"]
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    after = registry(env)["datasets"]["ds"]
    assert after["last_touch_start"] == entry["last_refresh_start"]
    assert after["last_check_start"] == after["last_refresh_start"] != entry["last_refresh_start"]


# ------------------------------------------------------------------ unit tests of the rules

@pytest.mark.parametrize("cadence, sched, need_days", [
    (14, 14, 1), (14, None, 1), (7, 7, 1), (14, 7, 8), (21, 7, 15), (25, 14, 12),
    (7, 14, -6), (1, 1, 1)])
def test_is_due_boundary(cadence, sched, need_days):
    start = NOW_EPOCH
    assert not sk.is_due(start, cadence, sched, start + need_days * DAY - 1) or need_days <= 0
    assert sk.is_due(start, cadence, sched, start + need_days * DAY)
    assert sk.is_due(start, cadence, sched, start + max(need_days, 0) * DAY + 1)
    assert sk.is_due(None, cadence, sched, start)


def test_the_three_due_rules_side_by_side():
    """One 14-day dataset on a 14-day schedule whose touch walk ran from t to t + 1 hour:
    the schedule takes it again after a day, people see it due after 13 days, and doctor
    calls it overdue 18 days after the walk ended (the end of a walk of either mode)."""
    t = NOW_EPOCH
    end = t + 3600
    ds = {"cadence_days": 14, "last_touch_start": sk.iso(t), "last_refresh": sk.iso(end),
          "added": sk.iso(t - 90 * DAY)}
    start = sk.walk_start(ds, "touch")
    assert sk.schedule_due_at(start, 14, 14) == t + DAY
    assert sk.state_due_at(start, 14) == t + 13 * DAY
    assert sk.overdue_at(ds) == end + 18 * DAY
    assert sk.overdue_at(dict(ds, last_refresh=None)) == t - 72 * DAY     # never walked
    assert sk.overdue_at({"cadence_days": 14}) is None


def test_threshold_cadence_is_the_larger():
    assert sk.threshold_cadence({"cadence_days": 7}, 14) == 14
    assert sk.threshold_cadence({"cadence_days": 21}, 7) == 21
    assert sk.threshold_cadence({"cadence_days": 10}, None) == 10


def test_record_walk_moves_only_its_modes_record():
    ds = {"last_refresh": None, "last_refresh_start": None, "last_mode": None,
          "last_touch_start": None, "last_check_start": None}
    sk.record_walk(ds, "touch", "2030-01-01T00:00:00Z", "2030-01-01T01:00:00Z")
    sk.record_walk(ds, "check", "2030-01-05T00:00:00Z", "2030-01-05T01:00:00Z")
    assert ds == {"last_refresh": "2030-01-05T01:00:00Z",
                  "last_refresh_start": "2030-01-05T00:00:00Z", "last_mode": "check",
                  "last_touch_start": "2030-01-01T00:00:00Z",
                  "last_check_start": "2030-01-05T00:00:00Z"}
    assert sk.walk_start(ds, "touch") == sk.parse_iso("2030-01-01T00:00:00Z")
    old = {"last_refresh": "2030-01-01T01:00:00Z", "last_refresh_start": "2030-01-01T00:00:00Z",
           "last_mode": "check"}
    assert sk.walk_start(old, "touch") is None
    assert sk.walk_start(old, "check") == sk.parse_iso("2030-01-01T00:00:00Z")


def test_risk_of():
    assert sk.risk_of({"last_refresh": None}) is None
    walked = {"last_refresh": "2030-01-01T00:00:00Z"}
    assert sk.risk_of(walked) is None       # a registry that does not say
    for totals, risk in (({"entries_at_risk": 0, "entries_purge_eligible": 0}, "none"),
                         ({"entries_at_risk": 3, "entries_purge_eligible": 0}, "at-risk"),
                         ({"entries_at_risk": 3, "entries_purge_eligible": 1}, "purge-eligible")):
        assert sk.risk_of(dict(walked, last_totals=totals)) == risk
        assert sk.risk_of(dict(walked, last_run=dict(totals, complete=True))) == risk
    assert sk.risk_of(dict(walked, last_run={"complete": True, "resumed": True,
                                             "entries_at_risk": 0})) is None


# ------------------------------------------------------------------ the risk key

def test_risk_in_list_and_status(cli, ds, env):
    files = sorted(Path(ds).rglob("*")) + [Path(ds)]

    def risk():
        listed = cli("list", "--json").json()[0]
        assert cli("status", "--name", "ds", "--json").json()["risk"] == listed["risk"]
        return listed["risk"]
    assert risk() is None
    assert cli("list").out.splitlines()[1].split()[1:5] == ["never", "-", "-", "touch"]
    for p in files:
        set_atime(p, NOW_EPOCH - 40 * DAY)
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    assert risk() == "purge-eligible"
    out = cli("list").out
    assert out.splitlines()[0].split() == ["NAME", "STATE", "ATTENTION", "RISK", "MODE",
                                           "KEEP-UNTIL", "LAST-REFRESH", "PATH"]
    assert out.splitlines()[1].split()[2:4] == ["purge-eligible", "purge-eligible"]
    assert "risk:          purge-eligible" in cli("status", "--name", "ds").out
    # A touch walk refreshes them all: nothing remains at risk, whatever it found.
    assert cli("refresh", "--name", "ds").rc == 0
    assert risk() == "none" and cli("list", "--json").json()[0]["attention"] == []
    for p in files:
        set_atime(p, NOW_EPOCH - 40 * DAY)
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    for p in files:
        set_atime(p, NOW_EPOCH - 20 * DAY)
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    assert risk() == "at-risk"
    assert cli("refresh", "--name", "ds", "--check", "--max-entries", "2").rc == 3
    assert risk() == "at-risk"              # a stopped walk does not change it
    assert cli("refresh", "--name", "ds", "--check").rc == 0        # finishes that walk
    for p in files:
        set_atime(p, NOW_EPOCH - DAY)
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    assert risk() == "none"


def test_risk_of_a_resumed_walk_covers_the_whole_walk(cli, ds, env):
    for p in sorted(Path(ds).rglob("*")):
        set_atime(p, NOW_EPOCH - 40 * DAY)
    assert cli("refresh", "--name", "ds", "--check", "--max-entries", "3").rc == 3
    r = cli("refresh", "--name", "ds", "--check", "--json").json()["results"][0]
    assert r["resumed"] and r["complete"]
    assert cli("list", "--json").json()[0]["risk"] == "purge-eligible"


# ------------------------------------------------------------------ the year-long simulation

START = sk.parse_iso("2027-01-04T00:00:00Z")
YEAR = 365 * DAY
ENTRIES = 24


class FakeSlurm(object):
    """Records the sbatch command lines the chain code would run (no Slurm involved)."""

    def __init__(self):
        self.calls = []

    def __call__(self, argv, input_text=None):
        self.calls.append(list(argv))
        if argv[0] == "sbatch":
            return sk.CommandResult(argv, 0, "4242\n", "")
        return sk.CommandResult(argv, 0, "", "")


def begin_offset(calls):
    """The --begin=now+N(days|hour) of the last sbatch call, in seconds."""
    begins = [a for c in calls if c[0] == "sbatch" for a in c if a.startswith("--begin=")]
    m = re.match(r"^--begin=now\+(\d+)(days?|hours?)$", begins[-1])
    assert m, begins
    return int(m.group(1)) * (DAY if m.group(2).startswith("day") else 3600)


def chain_offsets(store, env):
    """What the chain does: (its successor's delay, a stopped run's continuation delay),
    read from the sbatch calls of the tool's own _scheduled_before and _continue_soon."""
    fake = FakeSlurm()
    ctx = sk.Context(state_dir=store.dir, env=dict(env, SLURM_JOB_ID="1"), runner=fake)
    doc, said = sk._scheduled_before(ctx, "sbatch")
    assert "submitted" in said, said
    successor = begin_offset(fake.calls)
    sk._continue_soon(ctx, "sbatch", doc)
    return successor, begin_offset(fake.calls)


def cron_days(store, cfg, env, cadence):
    """The instants in the simulated year at which the installed scrontab line fires."""
    sched = sk.Schedule(store, cfg, env, "scrontab", None, None, 1, "2G", "2:00:00", cadence)
    line = [x for x in sched.cron_block().splitlines() if x and not x.startswith("#")][0]
    minute, hour, dom, month, dow = line.split()[:5]
    assert month == "*"

    def matches(field, value):
        return field == "*" or value in [int(v) for v in field.split(",")]
    times = []
    for day in range(366 + 1):
        t = START + day * DAY
        d = time.gmtime(t)
        wday = (d.tm_wday + 1) % 7             # cron: 0 is Sunday
        if dom != "*" and dow != "*":
            hit = matches(dom, d.tm_mday) or matches(dow, wday)
        else:
            hit = matches(dom, d.tm_mday) and matches(dow, wday)
        if hit:
            times.append(int(t) + int(hour) * 3600 + int(minute) * 60)
    return [t for t in times if t < START + YEAR]


class Year(object):
    """One schedule, several datasets, a year of scheduled runs and manual activity.

    The model of each dataset is a list of entry atimes (ns). The tool's own code decides
    everything the walk would: `_select` what `refresh --due` takes, `threshold_cadence` and
    `thresholds_ns` which entries a touch walk touches, `record_walk` what a complete walk
    records; checkpoints are real files in the real store, shaped as the walk writes them.
    """

    def __init__(self, tmp, method, sched_cadence, cadences, seed):
        self.rng = random.Random(seed)
        self.method, self.S = method, sched_cadence
        self.env = {"SCRATCH_KEEPALIVE_NOW": sk.iso(START), "TZ": "UTC"}
        state, scratch = str(tmp / "state"), tmp / "scratch"
        scratch.mkdir()
        sk.init(profile="generic", scratch_root=str(scratch), state_dir=state, env=self.env)
        self.store = sk.Store(state)
        self.cfg = self.store.require_config()
        self.names = []
        for i, c in enumerate(cadences):
            name = "d%d-c%d" % (i, c)
            (scratch / name).mkdir()
            sk.add_dataset(name, str(scratch / name), "2099-12-31", cadence_days=c,
                           state_dir=state, env=self.env)
            self.names.append(name)
        self.reg = self.store.load_registry()
        job_script = os.path.join(state, "job.sh")
        with open(job_script, "w") as f:
            f.write("#!/bin/sh\n")
        sk.save_schedule(self.store, {"method": method, "cadence_days": sched_cadence,
                                      "job_script": job_script})
        self.successor, self.continuation = chain_offsets(self.store, self.env)
        if method == "scrontab":
            self.runs = cron_days(self.store, self.cfg, self.env, sched_cadence)
        else:
            self.runs = None
        t0 = int(START) * 10 ** 9
        self.atimes = dict((n, [t0 - self.rng.randrange(0, 10 * DAY) * 10 ** 9
                                for _ in range(ENTRIES)]) for n in self.names)
        self.violations, self.overwalked = [], []
        self.touch_starts = dict((n, []) for n in self.names)   # the test's own history
        self.scheduled_walks = dict((n, 0) for n in self.names)

    # -- the model of the files
    def access(self, name, i, t):
        """Entry i is accessed at t (a read, or a touch): was it ever purge days old?"""
        t_ns = int(t) * 10 ** 9
        age = t_ns - self.atimes[name][i]
        if age >= PURGE * DAY * 10 ** 9:
            self.violations.append((name, i, sk.iso(t), age / 1e9 / DAY))
        self.atimes[name][i] = max(self.atimes[name][i], t_ns)

    def walk(self, name, mode, t, stop_after=None, due_run=False):
        """One `refresh` of one dataset at t, as _refresh_one does it. True when complete."""
        ds = self.reg["datasets"][name]
        sched_cadence = sk.schedule_cadence(self.store)
        ckpt = self.store.load_checkpoint_quiet(name)
        if not sk.resumable(ckpt, ds, mode, due_run, sched_cadence, t):
            ckpt = None
        first = int(ckpt["cursor"]["path"][0][1:]) + 1 if ckpt else 0
        walk_started = ckpt["walk_started"] if ckpt else sk.iso(t)
        due_run = ckpt.get("due_run", True) is not False if ckpt else due_run
        cadence = sk.threshold_cadence(ds, sched_cadence)
        skip_ns, _, _ = sk.thresholds_ns(self.cfg, cadence, t)
        last = ENTRIES if stop_after is None else min(ENTRIES, first + stop_after)
        for i in range(first, last):
            if mode == "touch" and self.atimes[name][i] < skip_ns:
                self.access(name, i, t)
        if last < ENTRIES:
            self.store.save_checkpoint(name, {
                "dataset": name, "path": ds["path"], "mode": mode,
                "cursor": {"path": ["e%03d" % (last - 1)], "subtree_done": True},
                "entries_done": last, "totals": sk.Counts().as_dict(),
                "walk_started": walk_started, "updated": sk.iso(t), "due_run": due_run,
                "pid": 1, "host": "sim"})
            return False
        self.store.delete_checkpoint(name)
        if mode == "touch":
            self.touch_starts[name].append(sk.parse_iso(walk_started))
        sk.record_walk(ds, mode, walk_started, sk.iso(t))
        return True

    # -- what happens
    def scheduled_run(self, t):
        """`refresh --due` as the job runs it. Returns True when a walk was stopped."""
        ctx = sk.Context(state_dir=self.store.dir, env=dict(self.env, SCRATCH_KEEPALIVE_NOW=sk.iso(t)))
        chosen, refused = sk._select(ctx, self.cfg, self.reg, sk.RefreshOptions(due=True))
        assert not refused
        stopped = False
        for ds in chosen:
            name = ds["name"]
            if not self.store.checkpoint_exists(name):
                self.check_needed(name, t)
            self.scheduled_walks[name] += 1
            stop = self.rng.randrange(1, ENTRIES) if self.rng.random() < 0.15 else None
            stopped |= not self.walk(name, sk.dataset_mode(self.cfg, ds), t, stop, True)
        return stopped

    def check_needed(self, name, t):
        """A fresh scheduled walk must be one the rule asks for (computed here, from the
        test's own history): never sooner than cadence - schedule cadence + 1 days."""
        starts = self.touch_starts[name]
        need = int(self.reg["datasets"][name]["cadence_days"]) - self.S + 1
        if starts and t - starts[-1] < need * DAY:
            self.overwalked.append((name, sk.iso(t), (t - starts[-1]) / DAY))

    def manual(self, t):
        rng = self.rng
        name = rng.choice(self.names)
        kind = rng.choice(("refresh", "refresh", "refresh-all", "check", "check", "dry-run",
                           "read", "read", "read"))
        stop = rng.randrange(1, ENTRIES) if rng.random() < 0.3 else None
        if kind == "refresh":
            self.walk(name, "touch", t, stop)
        elif kind == "refresh-all":
            for n in self.names:
                self.walk(n, "touch", t, stop)
        elif kind == "check":
            self.walk(name, "check", t, stop)
        elif kind == "read":
            for i in rng.sample(range(ENTRIES), rng.randrange(1, 4)):
                self.access(name, i, t)
        # a dry run walks and reports, and changes nothing: no atime, checkpoint or record

    def events(self):
        """Manual activity at random instants, about every 1.5 days, all year."""
        t, out = START, []
        while t < START + YEAR:
            t += self.rng.randrange(3600, 3 * DAY)
            out.append(int(t))
        return out

    def run(self):
        """The year: scheduled runs, continuations after stopped runs, manual activity.

        scrontab: the cron instants; a stopped run gets one resume job (none if one is
        pending). The chain: one pending job; each run first submits its successor (the
        tool's delay), a stopped run moves that successor to the tool's continuation
        delay; every job then waits in the queue for up to a day.
        """
        rng, end = self.rng, START + YEAR
        queue = [(t, "manual") for t in self.events()]
        if self.runs:
            queue += [(t, "cron") for t in self.runs]
        chain = int(START) if not self.runs else None     # the pending chain job's start
        resume = None                                       # the pending resume job's
        queue.sort()
        while True:
            t, kind = queue[0] if queue else (end, "end")
            if chain is not None and chain <= t:
                t, kind = chain, "chain"
            if resume is not None and resume <= t:
                t, kind = resume, "resume"
            if t >= end:
                break
            if kind in ("manual", "cron"):
                queue.pop(0)
            if kind == "manual":
                self.manual(t)
                continue
            if kind == "chain":
                chain = t + self.successor + rng.randrange(0, DAY)
            if kind == "resume":
                resume = None
            if self.scheduled_run(t):
                later = t + self.continuation + rng.randrange(0, DAY)
                if chain is not None:
                    chain = later
                elif resume is None:
                    resume = later
        for name in self.names:
            for i, a in enumerate(self.atimes[name]):
                if int(end) * 10 ** 9 - a >= PURGE * DAY * 10 ** 9:
                    self.violations.append((name, i, "end", (end * 1e9 - a) / 1e9 / DAY))
        return self


SCENARIOS = [
    ("scrontab", 14, (14, 20, 25, 7)),      # days 1 and 15; a 7-day dataset under it
    ("scrontab", 7, (7, 10, 14, 21)),       # every Monday
    ("sbatch", 14, (14, 18, 25, 7)),        # the chain, queue delays up to a day
    ("sbatch", 7, (7, 9, 14, 25)),
]


@pytest.fixture
def fast_tmp(tmp_path):
    """A directory on tmpfs when there is one: the state files are fsync'ed thousands of
    times a simulated year, which tmpfs makes free."""
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    d = tempfile.mkdtemp(prefix="sk-due-", dir="/dev/shm")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def simulate(tmp, seeds=(1, 2, 3, 4, 5)):
    years = []
    for k, (method, sched, cadences) in enumerate(SCENARIOS):
        for seed in seeds:
            d = tmp / ("%s-%d-%d" % (method, sched, seed))
            d.mkdir()
            years.append(Year(d, method, sched, cadences, seed * 100 + k).run())
    return years


def test_a_year_of_the_schedule_never_lets_an_entry_reach_the_purge(fast_tmp):
    years = simulate(fast_tmp)
    for y in years:
        assert y.violations == [], (y.method, y.S, y.violations[:5])
        assert y.overwalked == [], (y.method, y.S, y.overwalked[:5])
        assert all(y.scheduled_walks[n] > 0 for n in y.names), y.scheduled_walks
    assert sum(len(y.runs or ()) for y in years) >= 5 * (24 + 52)


def test_the_simulation_fails_on_the_old_rule(fast_tmp, monkeypatch):
    """The same year, with the selection before this change (due after cadence - 1 days
    from the last complete walk of either mode): entries reach the purge."""
    def old_is_due(last_start, cadence, sched_cadence, now):
        return last_start is None or now - last_start >= (int(cadence) - 1) * DAY

    def old_walk_start(ds, mode):
        text = ds.get("last_refresh_start") or ds.get("last_refresh")
        return sk.parse_iso(text) if text else None
    monkeypatch.setattr(sk, "is_due", old_is_due)
    monkeypatch.setattr(sk, "walk_start", old_walk_start)
    years = simulate(fast_tmp)
    assert sum(len(y.violations) for y in years) > 0
    worst = max(v[3] for y in years for v in y.violations)
    assert worst >= PURGE


def test_the_simulation_fails_when_a_due_run_resumes_a_stale_manual_walk(fast_tmp, monkeypatch):
    """The same year, with the due rule but with every checkpoint of the same mode
    resumed: a manual walk stopped days before a run is completed by that run with its
    old start recorded, and the next run comes too late for the entries it reached."""
    def old_resumable(ckpt, ds, mode, due_run, sched_cadence, now):
        return ckpt is not None and ckpt.get("mode") == mode and ckpt.get("path") == ds["path"]
    monkeypatch.setattr(sk, "resumable", old_resumable)
    years = simulate(fast_tmp)
    assert sum(len(y.violations) for y in years) > 0


def test_resumable():
    ds = {"path": "/s/ds", "cadence_days": 14}
    t = NOW_EPOCH
    manual = {"mode": "touch", "path": "/s/ds", "walk_started": sk.iso(t), "due_run": False}
    assert sk.resumable(manual, ds, "touch", False, 14, t + 30 * DAY)   # a manual run goes on
    assert sk.resumable(manual, ds, "touch", True, 14, t + DAY - 1)
    assert not sk.resumable(manual, ds, "touch", True, 14, t + DAY)     # due again: restart
    assert sk.resumable(manual, ds, "touch", True, 7, t + 8 * DAY - 1)
    assert not sk.resumable(manual, ds, "touch", True, 7, t + 8 * DAY)
    scheduled = dict(manual, due_run=True)
    assert sk.resumable(scheduled, ds, "touch", True, 14, t + 30 * DAY)
    older = dict(manual)
    del older["due_run"]                    # written before due_run existed: resumed
    assert sk.resumable(older, ds, "touch", True, 14, t + 30 * DAY)
    assert not sk.resumable(scheduled, ds, "check", True, 14, t)
    assert not sk.resumable(dict(scheduled, path="/s/other"), ds, "touch", True, 14, t)
    assert not sk.resumable(None, ds, "touch", True, 14, t)


def test_resumable_restarts_a_manual_walk_exactly_when_the_due_rule_would_walk_it():
    """One rule: a `--due` run restarts a stopped manual walk when that walk's start would
    make the dataset due (what _select asks of is_due), for every pair of cadences, a
    dataset's shorter than the schedule's included."""
    t = NOW_EPOCH
    manual = {"mode": "touch", "path": "/s/ds", "walk_started": sk.iso(t), "due_run": False}
    for cadence in (1, 7, 14, 21):
        ds = {"path": "/s/ds", "cadence_days": cadence}
        for sched in (None, 1, 7, 14, 21):
            for hours in (0, 1, 12, 23, 24, 25, 48, 24 * 6, 24 * 8, 24 * 14, 24 * 30):
                now = t + hours * 3600
                walked = sk.is_due(t, ds["cadence_days"], sched, now)
                assert sk.resumable(manual, ds, "touch", True, sched, now) is not walked, (
                    cadence, sched, hours)


def test_a_due_run_restarts_a_manual_walk_stopped_a_day_ago(cli, ds, env, monkeypatch):
    now = time.time()
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(now))
    assert cli("refresh", "--name", "ds", "--max-entries", "3").rc == 3
    ckpt_path = env["state"] / "checkpoints" / "ds.json"
    ckpt = json.loads(ckpt_path.read_text())
    assert ckpt["due_run"] is False
    r = cli("refresh", "--due", "--max-entries", "2", "--json")      # minutes later: goes on
    x = r.json()["results"][0]
    assert r.rc == 3 and x["resumed"] is True and x["entries_done"] == 5, r
    assert json.loads(ckpt_path.read_text())["due_run"] is False     # still a manual walk
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(sk.parse_iso(ckpt["walk_started"]) + DAY))
    r = cli("refresh", "--due", "--max-entries", "2", "--json")
    x = r.json()["results"][0]
    assert r.rc == 3 and x["resumed"] is False and x["entries_done"] == 2, r
    assert json.loads(ckpt_path.read_text())["due_run"] is True      # now the schedule's
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(now + 30 * DAY))
    r = cli("refresh", "--due", "--json")
    x = r.json()["results"][0]
    assert r.rc == 0 and x["resumed"] is True and x["complete"] is True, r


def test_help_and_readme_say_the_rule(cli):
    r = cli("refresh", "--help")
    assert r.rc == 0
    text = " ".join(r.out.split())
    assert "(cadence - schedule cadence + 1) days ago (24 hours when the two are equal)" in text
    assert "a check walk or dry run never counts for a touch-mode dataset" in text
    text = " ".join(cli("list", "--help").out.split())
    assert "due (cadence - 1 days since the last complete walk of its mode)" in text
    assert "purge-eligible, at-risk or none" in text
    readme = " ".join((Path(sk.__file__).parent / "README.md").read_text().split())
    assert "started less than C − S + 1 days ago" in readme
    assert "larger of the dataset's cadence and the installed schedule's" in readme


def test_due_with_name_walks_the_dataset_only_when_due(cli, ds, env, monkeypatch):
    """`refresh --due --name NAME` keeps --due's meaning (before, --name overrode it and
    walked a dataset refreshed the day before): not due, it says until when, walks
    nothing and exits 0; with a checkpoint, or once due, it walks."""
    assert cli("refresh", "--name", "ds").rc == 0
    start = sk.parse_iso(registry(env)["datasets"]["ds"]["last_touch_start"])
    assert cli("extend", "--name", "ds", "--cadence-days", "14").rc == 0
    install_schedule_record(env, 7)          # due 14 - 7 + 1 = 8 days after the walk
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(start + DAY))   # "refreshed yesterday"
    before = registry(env)["datasets"]["ds"]
    r = cli("refresh", "--due", "--name", "ds")
    assert r.rc == 0, r
    assert r.out.strip() == (
        "ds: not refreshed: not due until %s (its last complete touch walk started %s); "
        "without --due, `scratch-keepalive refresh --name ds` walks it now"
        % (sk.iso(start + 8 * DAY), sk.iso(start))), r
    assert registry(env)["datasets"]["ds"] == before           # nothing walked, nothing moved
    x = cli("refresh", "--due", "--name", "ds", "--json").json()["results"]
    assert [(e["name"], e["state"], e["entries_seen"]) for e in x] == [("ds", "not-due", 0)]
    # With a checkpoint: walked (it resumes).
    assert cli("refresh", "--name", "ds", "--max-entries", "2").rc == 3
    r = cli("refresh", "--due", "--name", "ds", "--json")
    x = r.json()["results"][0]
    assert r.rc == 0 and x["complete"] is True and x["entries_seen"] > 0, r
    # Due: walked.
    start = sk.parse_iso(registry(env)["datasets"]["ds"]["last_touch_start"])
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(start + 8 * DAY))
    r = cli("refresh", "--due", "--name", "ds", "--json")
    assert r.rc == 0 and r.json()["results"][0]["complete"] is True, r
    # Disabled, expired or missing: refused as before, exit 1.
    assert cli("disable", "--name", "ds").rc == 0
    r = cli("refresh", "--due", "--name", "ds")
    assert r.rc == 1 and "it is disabled" in r.out, r


def test_help_and_readme_say_due_with_name(cli):
    text = " ".join(cli("refresh", "--help").out.split())
    assert ("With --name, the same rule: NAME is walked only when due (or with a checkpoint); "
            "otherwise it says when it will be, and exits 0") in text
    readme = " ".join((Path(sk.__file__).parent / "README.md").read_text().split())
    assert ("`refresh --due --name NAME` follows the same rule for NAME: when it is not due, "
            "it says when it will be and exits 0 without walking") in readme
