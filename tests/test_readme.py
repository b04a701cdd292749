"""The README tells the truth: its quick start runs as pasted, and CI runs its test command."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
import scratch_keepalive as sk

README = (REPO / "README.md").read_text()


def block_after(marker):
    m = re.search(re.escape(marker) + r"\s*```sh\n(.*?)```", README, re.S)
    assert m, "no ```sh block after %r in README.md" % marker
    return m.group(1)


def test_quickstart_runs_as_pasted(tmp_path):
    script = block_after("<!-- test: quickstart -->")
    # Same commands; only the demo directory moves into this test's temp dir.
    script = script.replace("/tmp/sk-demo", str(tmp_path / "sk-demo"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCRATCH_KEEPALIVE")}
    env.update(HOME=str(tmp_path), TMPDIR=str(tmp_path))
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=str(REPO), env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    out = p.stdout.decode()
    assert p.returncode == 0, (out, p.stderr.decode())
    assert "results: touched 0 of 4 entries (4 accessed recently, skipped); complete" in out
    assert "results: ok (touch mode)" in out


def test_ci_runs_the_readme_test_command():
    cmd = block_after("<!-- ci: test command -->").strip()
    assert cmd == "python3 -m pytest -q"
    ci = (REPO / ".ci" / "run").read_text()
    assert "<!-- ci: test command -->" in ci


def _newest_and_36():
    from conftest import pyenv_pythons
    found = pyenv_pythons()
    picks = [vx for vx in found if vx[0].startswith("3.6.")][-1:] + found[-1:]
    return [pytest.param(exe, id=v) for v, exe in dict(picks).items()] or [
        pytest.param(None, marks=pytest.mark.skip(reason="no pyenv CPythons here"))]


def run_block_as_user(marker, home, python, timeout=120, **extra):
    """A README block run as printed by a user whose HOME is home and whose python3 is
    python (first on PATH), in a checkout (the blocks copy files from it)."""
    pybin = home / "pybin"
    pybin.mkdir(parents=True, exist_ok=True)
    if not (pybin / "python3").exists():
        (pybin / "python3").symlink_to(python)
    env = {"HOME": str(home), "PATH": "%s:/usr/bin:/bin" % pybin, "LANG": "C.UTF-8"}
    env.update(extra)
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block_after(marker)],
                          cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)


@pytest.mark.parametrize("python", _newest_and_36())
def test_the_copy_the_file_launcher_loads_the_module_from_its_bytecode(tmp_path, python):
    """The README's copy-the-file block, run as printed (on 3.6 and the newest CPython),
    writes a launcher that imports the module: Python loads it from ~/bin/__pycache__,
    even where PYTHONDONTWRITEBYTECODE keeps it from writing bytecode, and the login
    line (`status --brief`) never compiles the file."""
    home = tmp_path / "home"
    r = run_block_as_user("<!-- test: copy the file -->", home, python,
                          PYTHONDONTWRITEBYTECODE="1")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout.strip().startswith("scratch-keepalive "), r.stdout
    launcher = home / "bin" / "scratch-keepalive"
    pyc = subprocess.run([python, "-c", "import importlib.util, sys; print(importlib.util."
                          "cache_from_source(sys.argv[1]))", str(home / "bin" /
                                                              "scratch_keepalive.py")],
                         stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
    assert os.path.isfile(pyc), pyc
    env = {"HOME": str(home), "PATH": "%s:/usr/bin:/bin" % (home / "pybin"),
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONVERBOSE": "1",
           "SCRATCH_KEEPALIVE_HOME": str(tmp_path / "state")}
    for argv in (["status", "--brief"], ["list"]):
        p = subprocess.run([str(launcher)] + argv, env=env, cwd=str(tmp_path),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
        assert p.returncode == 0, p.stderr[-2000:]
        assert "# code object from '%s'" % pyc in p.stderr or \
            "# code object from %s" % pyc in p.stderr, p.stderr[-2000:]
    # The README says, in one line, what a bare `python3 FILE` costs.
    assert re.search(r"A bare\s+`python3 ~/bin/scratch_keepalive.py ARGS` works too, but may "
                     r"be slower to start[^.]*parse tree", README), README[:3000]


def test_the_install_sh_block_says_how_local_bin_gets_on_path(tmp_path):
    """The install.sh block runs as printed (its second line names the launcher by its
    full path, not assuming ~/.local/bin on PATH) and says how to put it there."""
    block = block_after("<!-- test: install.sh -->")
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert lines[1].startswith("~/.local/bin/scratch-keepalive "), lines
    assert "export PATH=\"$HOME/.local/bin:$PATH\"" in block and "~/.bashrc" in block, block
    home = tmp_path / "home"
    r = run_block_as_user("<!-- test: install.sh -->", home, sys.executable)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "is not on your PATH" in r.stderr, r.stderr
    assert r.stdout.strip().endswith("scratch-keepalive " + sk.__version__), r.stdout


@pytest.mark.parametrize("python", [vx for vx in _newest_and_36()
                                    if "3.6" in str(vx.values[0])] or _newest_and_36()[:1])
def test_the_pip_block_works_as_pasted_on_python_36(tmp_path, python):
    """The README's pip block, pasted as printed into a shell whose python3 is 3.6: its
    venv comes with pip 18.1, which cannot build from pyproject.toml; the block upgrades
    pip itself before installing."""
    home = tmp_path / "home"
    src = tmp_path / "src"
    shutil.copytree(str(REPO), str(src), ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".venv",
        ".benchmarks"))
    pip_env = {k: v for k, v in os.environ.items()       # how this machine reaches PyPI
               if k.startswith("PIP_") or k.lower().endswith("_proxy")
               or k in ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE")}
    block = block_after("<!-- test: pip -->")
    pybin = home / "pybin"
    pybin.mkdir(parents=True)
    (pybin / "python3").symlink_to(python)
    env = dict(pip_env, HOME=str(home), PATH="%s:/usr/bin:/bin" % pybin, LANG="C.UTF-8",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=str(src), env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert r.stdout.strip().splitlines()[-1] == "scratch-keepalive " + sk.__version__, r.stdout
