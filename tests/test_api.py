"""The Python API for onboarding scripts, driven from a separate process as a lab script would."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import KEEP, NOW, REPO, SCRIPT, run_script
import scratch_keepalive as sk

DRIVER = textwrap.dedent(r'''
    import io, json, os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import scratch_keepalive as sk
    scratch, state = sys.argv[2], sys.argv[3]
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), dict(os.environ))
    real_out, real_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
    log = {}
    log["init"] = sk.init(profile="generic", scratch_root=scratch, state_dir=state)
    os.makedirs(os.path.join(scratch, "ds", "sub"))
    open(os.path.join(scratch, "ds", "sub", "f"), "w").close()
    log["add"] = sk.add_dataset("ds", os.path.join(scratch, "ds"), "%(keep)s", state_dir=state)
    log["refresh"] = sk.refresh(name="ds", state_dir=state)
    log["status"] = sk.status("ds", state_dir=state)
    log["list"] = sk.list_datasets(state_dir=state)
    log["extend"] = sk.extend("ds", approval="INC42", state_dir=state)
    log["disable"] = sk.set_enabled("ds", False, state_dir=state)
    try:
        sk.add_dataset("bad/name", scratch, "%(keep)s", state_dir=state)
    except sk.UsageError as e:
        log["usage_error"] = [e.exit_code, str(e), isinstance(e, sk.Failure)]
    try:
        sk.refresh(name="nope", state_dir=state)
    except sk.Failure as e:
        log["unknown"] = e.exit_code
    log["remove"] = sk.remove_dataset("ds", state_dir=state)
    printed = sys.stdout.getvalue() + sys.stderr.getvalue()
    sys.stdout, sys.stderr = real_out, real_err
    after = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), dict(os.environ))
    log["printed"] = printed
    log["globals_unchanged"] = before == after
    print(json.dumps(log))
''') % {"keep": KEEP}


def test_api_end_to_end_from_a_separate_script(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    driver = tmp_path / "lab_onboarding.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, SCRATCH_KEEPALIVE_NOW=NOW, TZ="UTC")
    p = subprocess.run([sys.executable, str(driver), str(REPO), str(scratch),
                        str(tmp_path / "state")], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, env=env, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr.decode()
    log = json.loads(p.stdout.decode())
    assert log["printed"] == "" and log["globals_unchanged"] is True
    assert log["init"]["config"]["profile"] == "generic"
    assert log["add"]["name"] == "ds" and log["add"]["mode"] == "touch"
    res = log["refresh"]
    assert res["exit_code"] == 0 and res["results"][0]["complete"] is True
    assert res["results"][0]["entries_seen"] == 4      # root, sentinel, sub, sub/f
    assert log["status"]["last_mode"] == "touch" and log["status"]["checkpoint"] is None
    assert [d["name"] for d in log["list"]] == ["ds"]
    assert log["extend"]["approval"] == "INC42" and log["disable"]["enabled"] is False
    assert log["usage_error"][0] == 2 and log["usage_error"][2] is True
    assert "invalid dataset name" in log["usage_error"][1]
    assert log["unknown"] == 2
    assert log["remove"]["sentinel_deleted"] is True


def test_api_returns_what_json_prints(cli, generic):
    d = generic["scratch"] / "ds"
    d.mkdir()
    assert cli("add", "--name", "ds", "--path", d, "--keep-until", KEEP).rc == 0
    assert sk.list_datasets() == cli("list", "--json").json()
    assert sk.status("ds") == cli("status", "--name", "ds", "--json").json()


def test_api_surface():
    for name in sk.__all__:
        assert hasattr(sk, name), name
    for cls in (sk.UsageError, sk.BusyError, sk.StateError):
        assert issubclass(cls, sk.Failure)
    assert (sk.UsageError("x").exit_code, sk.BusyError("x").exit_code,
            sk.StateError("x").exit_code) == (2, 4, 1)


def test_versions_agree():
    out = run_script("--version").out.strip()
    assert out == "scratch-keepalive " + sk.__version__
    pyproject = (REPO / "pyproject.toml").read_text()
    # flit_core takes the version from the module's __version__ (the built metadata is
    # checked against it by tests/test_install.py::test_pip_install_in_venv).
    assert 'build-backend = "flit_core.buildapi"' in pyproject
    assert re.search(r'^\[tool\.flit\.module\]\nname = "scratch_keepalive"', pyproject, re.M)
    assert 'dynamic = ["version"]' in pyproject


def onboard(tmp_path, *args):
    env = dict(os.environ, SCRATCH_KEEPALIVE_NOW=NOW, TZ="UTC",
               SCRATCH_KEEPALIVE_HOME=str(tmp_path / "state"),
               SCRATCH_KEEPALIVE_SCRATCH_ROOT=str(tmp_path / "scratch"), USER="alice")
    p = subprocess.run([sys.executable, str(REPO / "tools" / "onboard-example.py")] +
                       [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env=env, cwd=str(tmp_path))
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def test_onboarding_example(tmp_path):
    scratch = tmp_path / "scratch"
    for n in ("genomes", "simulations"):
        (scratch / n).mkdir(parents=True)
    rc, out, err = onboard(tmp_path, "--account", "r00000", "--keep-until", KEEP,
                           "--schedule-dry-run", scratch / "genomes", scratch / "simulations")
    assert rc == 0, err
    assert "registered genomes" in out and "registered simulations" in out
    assert "check" in out                   # br200 without an approval: check mode
    assert "refresh --due" in out and "--account=r00000" in out and "not installed" in out
    rc, out, err = onboard(tmp_path, "--account", "r00000", "--keep-until", KEEP,
                           "--schedule-dry-run", "--approval", "INC1", scratch / "genomes")
    assert rc == 0 and "already registered: genomes" in out
    rc, out, err = onboard(tmp_path, "--keep-until", "2020-01-01", scratch / "simulations")
    assert rc == 2 and err.startswith("onboard: error:")


def test_onboarding_requires_account_on_br200(tmp_path):
    (tmp_path / "scratch" / "x").mkdir(parents=True)
    rc, out, err = onboard(tmp_path, "--keep-until", KEEP, "--schedule-dry-run",
                           tmp_path / "scratch" / "x")
    assert rc == 2 and "--account" in err
