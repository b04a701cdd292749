"""Messages: what the tool says to people, with its exit code and text.

Hints in the form the user ran, the `--json` help and the README's JSON section, the
schedule's --max-seconds, the command table, br200's "Next:" hint, `status --json`'s
`schedule`, doctor on a missing state directory, the scratch root as a dataset, and the
words of a refresh that stopped early; help that says what fails a job, status hints,
times with their Z, binary size units, and a mistyped name's suggestion.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import KEEP, REPO, SCRIPT, assert_error, make_dataset, run_command, run_script
import scratch_keepalive as sk
from slurmbed import make_world  # noqa: F401  (the real-Slurm fixture, with its user lock)

README = (REPO / "README.md").read_text()


def tree(path):
    """Every path below `path` (names only), to show that nothing changed."""
    out = []
    for dirpath, dirs, files in os.walk(str(path)):
        out += [os.path.join(dirpath, n) for n in dirs + files]
    return sorted(out)


def run(argv, env=None, cwd=None):
    return run_command(argv, env=env, cwd=None if cwd is None else str(cwd), timeout=120)


def hints(text):
    return re.findall(r"`([^`]*)`", text)


# ---------------------------------------------------------------- hints in the form that was run

def test_hints_show_python3_and_the_script_path_as_run(generic):
    """`python3 scratch_keepalive.py list` (relative, from the checkout) hints the same form."""
    r = run([sys.executable, "scratch_keepalive.py", "list"], cwd=REPO)
    assert r.rc == 0, r
    assert "Add one: `python3 scratch_keepalive.py add --name NAME --path DIR " \
           "--keep-until YYYY-MM-DD`" in r.out, r
    r = run([sys.executable, "scratch_keepalive.py", "refresh", "--name", "nope"], cwd=REPO)
    line = assert_error(r, 2, "no dataset named 'nope'")
    assert "`python3 scratch_keepalive.py list` shows the registered ones" in line, r
    assert "`scratch-keepalive" not in r.out + r.err, r


def test_hints_show_python3_dash_m(generic):
    r = run([sys.executable, "-m", "scratch_keepalive", "refresh", "--name", "nope"], cwd=REPO)
    line = assert_error(r, 2)
    assert "`python3 -m scratch_keepalive list` shows the registered ones" in line, r


def test_a_hint_runs_as_pasted_from_a_path_with_a_space(generic, tmp_path):
    """The path is quoted for the shell, so the hint works when pasted."""
    d = tmp_path / "my tools"
    d.mkdir()
    shutil.copyfile(str(SCRIPT), str(d / "scratch_keepalive.py"))
    r = run([sys.executable, d / "scratch_keepalive.py", "refresh", "--name", "nope"])
    line = assert_error(r, 2)
    hint = [h for h in hints(line) if h.endswith(" list")]
    assert hint == ["python3 %s list" % shlex.quote(str(d / "scratch_keepalive.py"))], line
    p = subprocess.run(["bash", "-c", hint[0].replace("python3", shlex.quote(sys.executable), 1)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.returncode == 0 and b"No datasets registered" in p.stdout, p


def test_hints_of_the_console_script_say_scratch_keepalive(generic, tmp_path):
    """What pip writes for the console script: import main and call it."""
    wrapper = tmp_path / "bin" / "scratch-keepalive"
    wrapper.parent.mkdir()
    wrapper.write_text("#!%s\nimport sys\nfrom scratch_keepalive import main\n"
                       "sys.exit(main())\n" % sys.executable)
    wrapper.chmod(0o755)
    r = run([wrapper, "refresh", "--name", "nope"], env={"PYTHONPATH": str(REPO)})
    line = assert_error(r, 2)
    assert "`scratch-keepalive list` shows the registered ones" in line, r


def test_hints_of_the_install_sh_launcher_say_scratch_keepalive(generic, tmp_path):
    prefix = tmp_path / "prefix"
    p = subprocess.run(["sh", str(REPO / "tools" / "install.sh"), "--prefix", str(prefix),
                        "--python", sys.executable], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=120)
    assert p.returncode == 0, p
    r = run([prefix / "bin" / "scratch-keepalive", "refresh", "--name", "nope"])
    line = assert_error(r, 2)
    assert "`scratch-keepalive list` shows the registered ones" in line, r


def test_the_python_api_keeps_scratch_keepalive(cli, generic):
    """main(argv) from another program: the hints name the command."""
    r = cli("refresh", "--name", "nope")
    line = assert_error(r, 2)
    assert "`scratch-keepalive list` shows the registered ones" in line, r


def test_json_and_install_cron_text_are_not_rewritten(generic):
    """JSON and the job's text stay exact; the crontab keeps absolute paths."""
    d = make_dataset(generic["scratch"])
    assert run_script("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    r = run([sys.executable, "scratch_keepalive.py", "install-cron", "--method", "sbatch",
             "--dry-run"], cwd=REPO)
    assert r.rc == 0, r
    assert "# Managed by `scratch-keepalive install-cron`; `scratch-keepalive uninstall-cron`" \
        in r.out, r
    assert "exec %s -c %s %s --state-dir" % (
        shlex.quote(sys.executable), shlex.quote(sk.LOADER), shlex.quote(str(SCRIPT))) in r.out, r
    r = run([sys.executable, "scratch_keepalive.py", "install-cron", "--method", "sbatch",
             "--dry-run", "--json"], cwd=REPO)
    assert r.rc == 0, r
    assert "Managed by `scratch-keepalive install-cron`" in json.loads(r.out)["text"], r


def test_rewrite_hints_leaves_the_error_prefix_alone():
    text = "scratch-keepalive: error: x; `scratch-keepalive list` or --wrap \"scratch-keepalive " \
           "refresh\""
    assert sk.rewrite_hints(text, "python3 sk.py") == (
        "scratch-keepalive: error: x; `python3 sk.py list` or --wrap \"python3 sk.py refresh\"")
    assert sk.rewrite_hints(text, "scratch-keepalive") == text
    # a quoted path is not put inside "...": the shell would keep the quotes
    assert '--wrap "scratch-keepalive refresh"' in sk.rewrite_hints(text, "python3 'a b/sk.py'")


# ---------------------------------------------------------------- --json help and the README

def readme_json_section():
    m = re.search(r"^### JSON output\n(.*?)(?=^##)", README, re.S | re.M)
    assert m, "README.md has no '### JSON output' section"
    return m.group(1)


def test_json_help_points_at_the_readme_section(cli, generic):
    for command in ("list", "status", "refresh", "doctor", "add", "install-cron", "repair"):
        p = run_script(command, "--help")
        help_text = " ".join(p.out.split())
        assert p.rc == 0, p
        assert "contract" not in help_text, (command, help_text)
        assert 'README.md, "JSON output"' in help_text, (command, help_text)
    readme_json_section()


# The keys the contract promises, and the ones other changes add to the same documents.
CONTRACT_KEYS = {
    "list": ["name", "path", "enabled", "keep_until", "cadence_days", "approval", "mode",
             "last_refresh", "last_mode", "state", "risk"],
    "status": ["sentinel", "checkpoint", "entries_done", "last_run", "finished", "schedule",
               "method", "next_run"],
    "refresh": ["results", "name", "mode", "complete", "resumed", "entries_seen",
                "entries_touched", "entries_skipped", "entries_at_risk", "bytes_at_risk",
                "entries_purge_eligible", "bytes_purge_eligible", "errors",
                "entries_not_owned", "dirs_listed_not_owned"],
    "doctor": ["ok", "checks", "name", "message"],
}


def keys_of(doc):
    """Every key in a JSON document, at any depth (timing's own keys left out)."""
    found = set()
    stack = [doc]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            for k, v in x.items():
                found.add(k)
                if k != "timing":
                    stack.append(v)
        elif isinstance(x, list):
            stack.extend(x)
    return found


def test_readme_json_section_names_every_key_printed_and_promised(cli, generic):
    section = readme_json_section()
    named = set(re.findall(r"`([a-z_]+)`", section) + re.findall(r'"([a-z_]+)"', section))
    for keys in CONTRACT_KEYS.values():
        assert set(keys) <= named, sorted(set(keys) - named)
    d = make_dataset(generic["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    docs = {}
    for argv in (["refresh", "--max-entries", "3"], ["status"], ["status", "--name", "ds"],
                 ["refresh"], ["refresh", "--name", "ds", "--dry-run"], ["list"], ["doctor"],
                 ["add", "--name", "e", "--path", make_dataset(generic["scratch"], "e"),
                  "--keep-until", KEEP], ["repair", "--dry-run"]):
        r = cli(*(argv + ["--json"]))
        assert r.rc in (0, 1, 3), r
        docs[" ".join(map(str, argv))] = r.json()
    r = cli("refresh", "--name", "ds")      # with a last_run whose result is complete
    for name, doc in docs.items():
        missing = keys_of(doc) - named
        assert not missing, (name, sorted(missing))


# ---------------------------------------------------------------- refresh --help: 6900

def test_refresh_help_shows_the_schedules_max_seconds(cli, generic):
    d = make_dataset(generic["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    r = cli("install-cron", "--method", "sbatch", "--dry-run")
    assert r.rc == 0, r
    job = re.findall(r"refresh --due --scheduled sbatch --max-seconds (\d+)$", r.out, re.M)
    assert job == ["6900"], r.out
    p = run_script("refresh", "--help")
    text = p.out
    assert p.rc == 0, p
    assert "6600" not in text
    assert "# what the schedule runs: the job's time limit (2:00:00) less 5 minutes\n" \
           "  scratch-keepalive refresh --due --max-seconds 6900\n" in text, text


# ---------------------------------------------------------------- README's command table

def test_readme_table_pairs_enable_with_resume_and_disable_with_pause():
    row = [l for l in README.splitlines() if l.startswith("| `enable`")]
    assert len(row) == 1, row
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    commands = re.findall(r"`(\w+)", cells[0])
    verbs = [v.strip().split()[0] for v in cells[1].split(",")]
    assert dict(zip(commands, verbs)) == {"enable": "resume", "disable": "pause",
                                          "remove": "unregister"}, row
    # ... as the commands' own help says
    for command, verb in (("enable", "resume"), ("disable", "pause")):
        p = run_script(command, "--help")
        assert "%s refreshing a dataset" % verb in p.out.lower(), p


# ---------------------------------------------------------------- br200: Next hint has --account

def test_br200_next_hint_after_add_names_the_account(cli, env, monkeypatch):
    monkeypatch.setenv("SCRATCH_KEEPALIVE_SCRATCH_ROOT", str(env["scratch"]))
    assert cli("init").rc == 0
    d = make_dataset(env["scratch"])
    r = cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP)
    assert r.rc == 0, r
    assert "Next: `scratch-keepalive refresh --name ds` now, and `scratch-keepalive " \
           "install-cron --account ACCOUNT` to schedule it (ACCOUNT: your Slurm account; " \
           "`sacctmgr show assoc user=$USER format=account` lists yours)." in r.out, r
    # install-cron as hinted, with an account, is accepted (the request itself is Slurm's
    # to judge); without one it is refused, which is why the hint names it
    assert_error(cli("install-cron", "--method", "sbatch", "--dry-run"), 2, "--account")
    assert cli("install-cron", "--method", "sbatch", "--dry-run", "--account", "r00000").rc == 0


def test_generic_next_hint_after_add_has_no_account(cli, generic):
    d = make_dataset(generic["scratch"])
    r = cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP)
    assert r.rc == 0, r
    assert "Next: `scratch-keepalive refresh --name ds` now, and `scratch-keepalive " \
           "install-cron` to schedule it.\n" in r.out, r


# ---------------------------------------------------------------- status --json: schedule

def test_status_json_schedule_is_null_without_a_schedule(cli, generic, monkeypatch):
    """No schedule.json: null, from the state alone (no Slurm command is even found)."""
    d = make_dataset(generic["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    monkeypatch.setenv("PATH", "/nonexistent")
    one = cli("status", "--name", "ds", "--json")
    assert one.rc == 0 and one.json()["schedule"] is None, one
    many = cli("status", "--json")
    assert many.rc == 0 and [e["schedule"] for e in many.json()] == [None], many
    assert sk.status("ds")["schedule"] is None


def test_status_json_schedule_parses_squeue(generic, tmp_path):
    """The pending job's start time, as squeue prints it (local time), in UTC."""
    d = make_dataset(generic["scratch"])
    calls = []

    def runner(argv, input_text=None):
        calls.append(argv)
        return sk.CommandResult(argv, 0, "1234 2030-01-14T03:53:00\n", "")
    ctx = sk.Context(runner=runner)
    sk._add(ctx, "ds", str(d), KEEP, None, None)
    ctx.store.ensure()
    sk.save_schedule(ctx.store, {"method": "sbatch", "cadence_days": 14,
                                 "installed": "2029-12-31T00:00:00Z"})
    e = sk._status(ctx, "ds")
    assert e["schedule"] == {"method": "sbatch", "cadence_days": 14,
                             "installed": "2029-12-31T00:00:00Z",
                             "next_run": "2030-01-14T03:53:00Z", "pending_jobs": ["1234"],
                             "error": None, "mail_user": None}, e
    assert [a[0] for a in calls] == ["squeue"]
    assert sk.slurm_time_utc("N/A") is None


@pytest.mark.slurm
def test_status_json_schedule_matches_the_text_on_real_slurm(make_world):
    w = make_world()
    w.make_dataset()
    first, job = w.install_sbatch()
    text = w.status()
    m = re.search(r"next run: +(\S+) \(job (\d+)\)", text)
    assert m and m.group(2) == job["id"], text
    for doc in (w.status_json(), json.loads(w.tool("status", "--json").out)[0]):
        s = doc["schedule"]
        assert s["method"] == "sbatch" and s["cadence_days"] == 14, s
        assert s["pending_jobs"] == [job["id"]] and s["error"] is None, s
        assert s["next_run"] == m.group(1) + "Z", (s, text)     # the user's TZ is UTC


# ---------------------------------------------------------------- doctor: missing state dir

def test_doctor_does_not_call_a_missing_state_dir_private_and_writable(cli, env):
    state = env["state"]
    assert not state.exists()
    r = cli("doctor", "--json")
    assert r.rc == 1, r
    check = [c for c in r.json()["checks"] if c["name"] == "state-dir"]
    assert len(check) == 1 and not check[0]["ok"], check
    assert check[0]["message"] == "state directory %s does not exist; `scratch-keepalive " \
                                  "init` creates it" % state, check
    r = cli("doctor")
    assert r.rc == 1 and "private and writable" not in r.out, r
    assert "FAIL state-dir" in r.out and "does not exist" in r.out, r
    assert not state.exists()           # doctor changed nothing


def test_doctor_on_a_state_dir_that_is_a_file(cli, env):
    env["state"].write_text("not a directory")
    r = cli("doctor")
    assert r.rc == 1 and "private and writable" not in r.out, r
    assert "state directory %s is not a directory" % env["state"] in r.out, r
    assert env["state"].read_text() == "not a directory"


def test_doctor_says_one_problem_not_problems(cli, generic):
    d = make_dataset(generic["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    assert cli("disable", "--name", "ds").rc == 0       # so no schedule is needed
    os.unlink(str(d / sk.SENTINEL))
    r = cli("doctor")
    assert r.rc == 1, r
    fails = [l for l in r.out.splitlines() if l.startswith("FAIL")]
    assert len(fails) == 1, r.out
    assert r.out.splitlines()[-1] == "1 problem; `scratch-keepalive repair --dry-run` shows " \
                                     "what can be mended", r.out


# ---------------------------------------------------------------- the scratch root itself

def test_adding_the_scratch_root_itself_is_refused_with_its_reason(cli, generic):
    scratch = generic["scratch"]
    before = tree(generic["state"]), tree(scratch)
    for path in (scratch, str(scratch) + "/", scratch / "." ):
        r = cli("add", "--name", "all", "--path", path, "--keep-until", KEEP)
        line = assert_error(r, 2, "is the scratch root itself, which cannot be a dataset; "
                               "register a directory below it")
        assert "not below" not in line and "only datasets on scratch" not in line, line
    assert (tree(generic["state"]), tree(scratch)) == before
    assert not (scratch / sk.SENTINEL).exists()


# ---------------------------------------------------------------- words of a refresh

def test_a_stopped_refresh_says_it_stopped_and_how_far(cli, generic):
    d = make_dataset(generic["scratch"])        # 10 entries
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    r = cli("refresh", "--name", "ds", "--max-entries", "4")
    assert r.rc == 3, r
    assert r.out == "ds: touched 4 of 4 entries before it stopped (0 accessed recently, " \
                    "skipped); NOT complete: stopped at --max-entries with 4 entries of the " \
                    "walk done; run refresh again to resume from the checkpoint\n", r
    r = cli("refresh", "--name", "ds")
    assert r.rc == 0, r
    assert r.out == "ds: touched 6 of 6 entries (0 accessed recently, skipped); complete, " \
                    "resumed\n", r
    r = cli("refresh", "--name", "ds", "--max-entries", "1", "--check")
    assert r.rc == 3, r
    assert r.out.startswith("ds: checked 1 entry before it stopped: 1 at risk ("), r
    assert r.out.endswith("; NOT complete: stopped at --max-entries with 1 entry of the walk "
                          "done; run refresh again to resume from the checkpoint\n"), r


def test_an_interrupted_refresh_says_interrupted(cli, generic):
    """A real walk stopped as Ctrl-C stops it (should_stop says "int")."""
    d = make_dataset(generic["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    out = sk.refresh(name="ds", should_stop=lambda: "int")
    assert out["exit_code"] == 130, out
    line = sk.describe_result(out["results"][0])
    assert "stopped (int)" not in line, line
    assert "NOT complete: interrupted (Ctrl-C) with " in line, line
    assert line.endswith("; run refresh again to resume from the checkpoint"), line


@pytest.mark.parametrize("stopped, words", [
    ("int", "interrupted (Ctrl-C)"), ("term", "stopped by a signal (SIGTERM)"),
    ("max-seconds", "stopped at its time limit"), ("max-entries", "stopped at --max-entries"),
    ("something-new", "stopped (something-new)")])
def test_stop_reasons_in_words(stopped, words):
    r = dict(sk.empty_result("ds", "touch"), entries_seen=2, entries_done=5, stopped=stopped)
    assert sk.describe_result(r) == "ds: touched 0 of 2 entries before it stopped (0 accessed " \
                                    "recently, skipped); NOT complete: %s with 5 entries of " \
                                    "the walk done; run refresh again to resume from the " \
                                    "checkpoint" % words


@pytest.mark.parametrize("errors, words", [(1, "1 error ("), (2, "2 errors ("),
                                           (1234, "1,234 errors (")])
def test_errors_take_the_plural_rule(errors, words):
    r = dict(sk.empty_result("ds", "check"), complete=True, entries_seen=1, errors=errors,
             log="/x.log")
    line = sk.describe_result(r)
    assert "; %svanished or permission denied, listed in /x.log); complete" % words in line, line
    assert "1 errors" not in line and "checked 1 entry:" in line, line


# ---------------------------------------------------------------- README: the set-up commands

def readme_block(marker):
    m = re.search(re.escape(marker) + r"\s*```sh\n(.*?)```", README, re.S)
    assert m, "no ```sh block after %r in README.md" % marker
    return m.group(1)


@pytest.mark.parametrize("python", [sys.executable, "/usr/bin/python3"])
def test_readme_tool_set_up_runs_as_pasted(python, tmp_path):
    """Nothing to install: the system python3 (Debian 12's /usr/bin/python3) or a venv's."""
    if not os.access(python, os.X_OK):
        pytest.skip("%s is not here" % python)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(python, str(bindir / "python3"))
    script = readme_block("<!-- test: tool set-up -->")
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=str(REPO),
                       env=dict(os.environ, PATH="%s:/usr/bin:/bin" % bindir),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert p.returncode == 0, p
    assert p.stdout.decode().strip() == "scratch-keepalive " + sk.__version__, p


def test_readme_test_set_up_uses_a_venv_then_the_ci_command():
    """pip install outside a venv is refused by Debian 12's python3 (PEP 668)."""
    setup = readme_block("<!-- test: test set-up -->").strip()
    assert setup == "python3 -m venv .venv && . .venv/bin/activate && " \
                    "python3 -m pip install pytest", setup
    assert README.index("<!-- test: test set-up -->") < README.index("<!-- ci: test command -->")
    assert readme_block("<!-- ci: test command -->").strip() == "python3 -m pytest -q"


def test_status_text_of_one_dataset_asks_slurm_nothing(cli, generic, tmp_path, monkeypatch):
    """The text of `status --name` shows no schedule, so it must not wait for squeue."""
    d = make_dataset(generic["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    ctx = sk.Context()
    sk.save_schedule(ctx.store, {"method": "sbatch", "cadence_days": 14,
                                 "installed": "2029-12-31T00:00:00Z"})
    bindir = tmp_path / "bin"
    bindir.mkdir()
    called = tmp_path / "squeue-called"
    (bindir / "squeue").write_text("#!/bin/sh\ntouch %s\nexit 1\n" % shlex.quote(str(called)))
    (bindir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", "%s:/usr/bin:/bin" % bindir)
    r = cli("status", "--name", "ds")
    assert r.rc == 0 and r.out.startswith("ds: never (touch mode)"), r
    assert not called.exists()
    r = cli("status", "--name", "ds", "--json")
    assert r.rc == 0 and called.exists(), r
    s = r.json()["schedule"]
    assert s["method"] == "sbatch" and s["next_run"] is None and s["pending_jobs"] is None, s
    assert "squeue" in s["error"], s


# -------------------------------------------------------------- help, hints, times, sizes, names

def test_mail_user_help_says_which_findings_fail_the_job(cli):
    text = "".join(cli("install-cron", "--help").out.split())    # argparse wraps at hyphens
    assert "".join(("purge-eligible entries (check mode) or entries likely purged make it "
                    "fail; entries only at risk (not accessed for the at-risk days, 13 on "
                    "br200) do not").split()) in text, text


def test_status_hint_names_the_account_on_br200_and_add_drops_install_cron_once_scheduled(
        cli, env, monkeypatch):
    monkeypatch.setenv("SCRATCH_KEEPALIVE_SCRATCH_ROOT", str(env["scratch"]))
    assert cli("init").rc == 0
    d = make_dataset(env["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    r = cli("status")
    assert r.rc == 0, r
    assert "schedule: none installed (`scratch-keepalive install-cron --account ACCOUNT`)" \
        in r.out, r
    # Once a schedule exists, `add` does not tell to install one.
    sk.save_schedule(sk.Store(str(env["state"])), {"method": "scrontab", "cadence_days": 14})
    d2 = make_dataset(env["scratch"], name="ds2")
    r = cli("add", "--name", "ds2", "--path", d2, "--keep-until", KEEP)
    assert r.rc == 0, r
    assert "Next: `scratch-keepalive refresh --name ds2` now; the installed schedule walks " \
           "it from its next run on." in r.out, r
    assert "install-cron" not in r.out, r


def test_status_hint_has_no_account_on_generic(cli, generic):
    r = cli("status")
    assert "schedule: none installed (`scratch-keepalive install-cron`)" in r.out, r


TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d[0-9:.]*Z?")


def test_times_shown_to_people_carry_their_z(cli, generic, monkeypatch):
    """Every time of day the text output shows (status, list, refresh, files' header,
    a refresh not due) ends in Z: UTC, said."""
    d = make_dataset(generic["scratch"], files=6)
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    shown = []
    for argv in (["refresh", "--name", "ds", "--check"], ["refresh", "--due", "--name", "ds",
                                                           "--check"],
                 ["refresh", "--name", "ds", "--check", "--max-entries", "2"],
                 ["status"], ["status", "--name", "ds"], ["list"],
                 ["files", "--name", "ds"], ["doctor"]):
        r = cli(*argv)
        shown += TIME_RE.findall(r.out + r.err)
    assert shown, "no time of day shown at all"
    assert [t for t in shown if not t.endswith("Z")] == [], shown


def test_a_busy_refresh_does_not_print_the_login_node_note(cli, env, monkeypatch):
    """On br200's login node a refresh gets a 15-minute budget and says so; a refresh that
    found the dataset busy (exit 4) walked nothing, so it says only that."""
    monkeypatch.setenv("SCRATCH_KEEPALIVE_SCRATCH_ROOT", str(env["scratch"]))
    assert cli("init").rc == 0
    d = make_dataset(env["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    lock = sk.DatasetLock(sk.Store(str(env["state"])), "ds").acquire()
    try:
        r = cli("refresh", "--name", "ds")
    finally:
        lock.release()
    assert r.rc == 4 and "busy" in r.out, r
    assert "login node" not in r.out + r.err, r
    r = cli("refresh", "--name", "ds")          # not busy: the note is still there
    assert r.rc == 0 and "login node" in r.out + r.err, r


def test_rescue_says_which_parent_directories_it_made(cli, generic):
    d = make_dataset(generic["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    to = generic["tmp"] / "safe" / "lab" / "ds"
    r = cli("rescue", "--name", "ds", "--to", to, "--all")
    assert r.rc == 0, r
    assert "made the missing parent directories of %s: %s, %s" % (
        to, generic["tmp"] / "safe", generic["tmp"] / "safe" / "lab") in r.out, r
    r = cli("rescue", "--name", "ds", "--to", to, "--all", "--json")
    assert json.loads(r.out)["parents_made"] == [], r     # nothing made this time


def test_rescue_to_a_read_only_destination_says_why_on_the_summary_line(cli, generic,
                                                                        mounts):
    d = make_dataset(generic["scratch"])
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    assert cli("refresh", "--name", "ds", "--check").rc == 0
    mnt = generic["tmp"] / "ro"
    mnt.mkdir()
    mounts("-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt)
    (mnt / "ds").mkdir()
    mounts("-o", "remount,ro", mnt)
    r = cli("rescue", "--name", "ds", "--to", mnt / "ds", "--all")
    assert r.rc == 1, r
    summary = [ln for ln in r.out.splitlines() if ln.startswith("ds: ")]
    assert len(summary) == 1 and "NOT rescued" in summary[0], r
    assert "Read-only file system" in summary[0], summary


def test_add_before_init_on_br200_gives_br200_advice(cli, env, monkeypatch, tmp_path):
    n = tmp_path / "N" / "scratch"
    n.mkdir(parents=True)
    monkeypatch.setitem(sk.PROFILES["br200"], "scratch_root", str(n / "{user}"))
    r = cli("add", "--name", "ds", "--path", tmp_path, "--keep-until", KEEP)
    line = assert_error(r, 2, "no configuration in", "run `scratch-keepalive init` first",
                     "the br200 profile")
    assert "--profile generic" not in line, line
    monkeypatch.setitem(sk.PROFILES["br200"], "scratch_root", str(tmp_path / "no" / "{user}"))
    r = cli("add", "--name", "ds", "--path", tmp_path, "--keep-until", KEEP)
    assert_error(r, 2, "`scratch-keepalive init --profile generic --scratch-root DIR`")


@pytest.mark.parametrize("bad", ["2030-6-30", "30/06/2030", "2030-02-30", "soon"])
def test_a_malformed_keep_until_says_the_format(cli, generic, bad):
    d = make_dataset(generic["scratch"])
    assert_error(cli("add", "--name", "ds", "--path", d, "--keep-until", bad), 2,
              "is not a real date; use YYYY-MM-DD")
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    assert_error(cli("extend", "--name", "ds", "--keep-until", bad), 2,
              "is not a real date; use YYYY-MM-DD")


def test_sizes_are_binary_units_throughout():
    """human_bytes says KiB, MiB, GiB, TiB: the README and the module's own words too."""
    assert sk.human_bytes(3.4 * 1024 ** 4) == "3.4 TiB"
    decimal = re.compile(r"\d ?[KMGTP]B\b")
    assert decimal.findall(README) == []
    assert decimal.findall(SCRIPT.read_text()) == []


def test_files_help_warns_that_rsync_may_move_atimes(cli):
    text = " ".join(cli("files", "--help").out.split())
    assert "rsync may move them" in text and "README's probe" in text, text
    title = "Copying them somewhere safe without moving their atimes"
    assert title in text and ("### " + title) in README


def test_a_mistyped_name_suggests_the_close_one(cli, generic):
    d = make_dataset(generic["scratch"])
    assert cli("add", "--name", "genomes", "--path", d, "--keep-until", KEEP).rc == 0
    for argv in (["status", "--name", "genome"], ["refresh", "--name", "genomse"],
                 ["files", "--name", "Genomes"]):
        assert_error(cli(*argv), 2, "no dataset named %r (did you mean 'genomes'?)" % argv[2])
    line = assert_error(cli("status", "--name", "zzz"), 2, "no dataset named 'zzz'")
    assert "did you mean" not in line
