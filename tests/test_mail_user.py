"""`install-cron --mail-user`: the mail options in both schedule forms, kept by continuations
and reinstalls, shown by --dry-run and --json, bad addresses refused; on the real test bed
(tests/slurmbed.py) the queued jobs' mail fields read from `scontrol show job`.
"""
import json
import shlex

import pytest

from conftest import KEEP, assert_error, make_dataset, tree_bytes
from slurmbed import crontab, make_world, pending, settle, show_job, wait_done  # noqa: F401
import scratch_keepalive as sk

BAD_ADDRESSES = ["a b@c.org", "a@@b.org", "ab.org", "a@b.org;rm", "a@b#x", "-a@b.org",
                 "a@b.org\n", "", "a@", "@b.org", "a@b..org", "a@b.org'", "a@$(id)"]


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
    before = tree_bytes(generic["state"], skip=("locks",))
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
    assert tree_bytes(generic["state"], skip=("locks",)) == before


def test_a_schedule_document_with_a_bad_address_is_invalid_state(generic):
    store = sk.Store(str(generic["state"]))
    sk.save_schedule(store, {"method": "sbatch", "cadence_days": 14, "mail_user": "a b@c"})
    with pytest.raises(sk.InvalidState) as e:
        sk.load_schedule(store)
    assert "'mail_user'" in str(e.value) and "repair" in str(e.value)
    # A document of an older version, without the field, still reads.
    sk.save_schedule(store, {"method": "sbatch", "cadence_days": 14})
    assert sk.load_schedule(store).get("mail_user") is None


def assert_mail(fields):
    assert fields.get("MailUser") == "a@b.org" and fields.get("MailType") == "FAIL", fields


# ---------------------------------------------------------------- real Slurm

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
