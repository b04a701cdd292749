"""Tests for tools/install.sh (the vendored, pip-free installer) and for a
plain pip install of the project into a fresh venv.

Everything runs as real processes with a temporary HOME (and a small,
explicit environment), never the real ~.  The interpreters under test are
the pyenv CPythons; a parameter whose interpreter is absent is skipped.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL_SH = ROOT / "tools" / "install.sh"
MODULE = ROOT / "scratch_keepalive.py"
PYENV_VERSIONS = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"

# Enough for sh, coreutils, sed, grep and sort; has no python3.X of pyenv.
BASE_PATH = "/usr/bin:/bin"
SH = "/bin/sh"
VERSION_LINE = re.compile(r'^__version__ = "([^"]+)"$', re.M)
# The launcher: a Python script that imports the module from DIR, or (where its "#!" line
# could not name the interpreter) a sh script doing the same with PYTHON -S -c CODE DIR.
PY_LAUNCHER = re.compile(r"""\A#!(\S+) -S\n(?:#.*\n)*import sys; sys\.path\[0\] = '([^']*)'; """
                         r"""from scratch_keepalive import main; sys\.exit\(main\(\)\)\n\Z""")
EXEC_LINE = re.compile(r"""^exec '([^']*)' -S -c '([^']*)' '([^']*)' "\$@"$""", re.M)
INSTALL_TIMEOUT = 120


# --- helpers ----------------------------------------------------------------


def module_version(path=MODULE):
    match = VERSION_LINE.search(Path(path).read_text(encoding="utf-8"))
    assert match, "%s has no line of the form __version__ = \"X.Y.Z\"" % path
    return match.group(1)


def pyenv_python(minor):
    """The newest pyenv CPython <minor>.N's python3, or None."""
    found = []
    for bindir in PYENV_VERSIONS.glob(minor + ".*"):
        patch = bindir.name[len(minor) + 1:]
        exe = bindir / "bin" / "python3"
        if patch.isdigit() and exe.is_file() and os.access(str(exe), os.X_OK):
            found.append((int(patch), exe))
    return max(found)[1] if found else None


def require_pyenv_python(minor):
    exe = pyenv_python(minor)
    if exe is None:
        pytest.skip("CPython %s is not installed (looked for %s/%s.*/bin/python3)"
                    % (minor, PYENV_VERSIONS, minor))
    return exe


def any_python():
    """An interpreter >= 3.6 for tests that don't care which."""
    for minor in ("3.13", "3.9", "3.6"):
        exe = pyenv_python(minor)
        if exe is not None:
            return exe
    return Path(sys.executable)


def make_env(home, path=BASE_PATH, **extra):
    env = {"HOME": str(home), "PATH": path, "LANG": "C.UTF-8"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd, env, cwd=None, timeout=INSTALL_TIMEOUT):
    return subprocess.run([str(c) for c in cmd], env=env, cwd=str(cwd) if cwd else None,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=timeout)


def install(*args, env, cwd=None, script=INSTALL_SH, shell=SH):
    cmd = ([shell] if shell else []) + [script] + list(args)
    return run(cmd, env=env, cwd=cwd)


def show(result):
    return "exit %s\n--- stdout\n%s--- stderr\n%s" % (
        result.returncode, result.stdout, result.stderr)


def files_under(path):
    """Every non-directory entry under path, relative (empty if absent)."""
    path = Path(path)
    if not path.exists():
        return set()
    return {str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir()}


def exec_line(launcher):
    """(the Python, the module file) a launcher runs."""
    text = Path(launcher).read_text(encoding="utf-8")
    match = PY_LAUNCHER.match(text)
    if match:
        return match.group(1), os.path.join(match.group(2), "scratch_keepalive.py")
    assert text.startswith("#!/bin/sh\n"), text
    match = EXEC_LINE.search(text)
    assert match, "no exec line in launcher:\n" + text
    assert "from scratch_keepalive import main" in match.group(2), text
    return match.group(1), os.path.join(match.group(3), "scratch_keepalive.py")


def write_script(path, text, mode=0o755):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


class Layout:
    """Where install.sh puts things for a prefix, and where the state is."""

    def __init__(self, home, prefix=None):
        self.home = Path(home)
        self.prefix = Path(prefix) if prefix else self.home / ".local"
        self.launcher = self.prefix / "bin" / "scratch-keepalive"
        self.share = self.prefix / "share" / "scratch-keepalive"
        self.installed = self.share / "scratch_keepalive.py"
        self.state = self.home / ".local" / "state" / "scratch-keepalive"

    def program_files(self):
        """Files under the prefix, but not the state dir (~/.local/state) nor the
        program's bytecode (see bytecode_files)."""
        state = str(self.state) + os.sep
        return {f for f in files_under(self.prefix)
                if not str(self.prefix / f).startswith(state) and "__pycache__" not in f}

    def bytecode_files(self):
        return {p.name for p in (self.share / "__pycache__").glob("*")}


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    return home


def launcher_version(layout, env):
    r = run([layout.launcher, "--version"], env=env)
    assert r.returncode == 0, show(r)
    return r.stdout.strip()


def assert_refused(result, layout):
    """A clean refusal: non-zero, one 'install.sh: error:' line, nothing left."""
    assert result.returncode != 0, show(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("install.sh: error:"), show(result)
    assert not layout.launcher.exists(), show(result)
    assert layout.program_files() == set(), show(result)


# Fake modules (test fixtures written to tmp_path, installed with --source)
# to drive the schedule refresh without the real program or a crontab.
FAKE_MODULE = '''\
import os
import sys

__version__ = "5.0.0"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--version"]:
        print("scratch-keepalive " + __version__)
        return 0
    with open(os.environ["FAKE_RECORD"], "a") as f:
        f.write(" ".join(argv) + "\\n")
    if "install-cron" in argv and not SUPPORTS_INSTALL_CRON:
        sys.stderr.write("scratch-keepalive: error: invalid choice: 'install-cron'\\n")
        return 2
    return 0


SUPPORTS_INSTALL_CRON = %s

if __name__ == "__main__":
    sys.exit(main())
'''


# --- install / reinstall / upgrade / uninstall per interpreter ---------------


@pytest.mark.parametrize("minor", ["3.6", "3.9", "3.13"])
def test_install_reinstall_upgrade_uninstall(tmp_path, home, minor):
    py = require_pyenv_python(minor)
    version = module_version()
    layout = Layout(home)
    env = make_env(home)

    # A state dir with user data that nothing here may touch.
    layout.state.mkdir(parents=True)
    kept = layout.state / "datasets.json"
    kept.write_text('{"keep": ["/N/scratch/someone/data"]}\n', encoding="utf-8")
    os.utime(str(kept), (1000000000, 1000000000))

    def state_untouched():
        assert files_under(layout.state) == {"datasets.json"}
        assert kept.read_text(encoding="utf-8") == '{"keep": ["/N/scratch/someone/data"]}\n'
        assert kept.stat().st_mtime == 1000000000

    # Fresh install.
    r = install("--python", py, env=env)
    assert r.returncode == 0, show(r)
    assert "scratch-keepalive %s installed" % version in r.stdout, show(r)
    assert str(layout.launcher) in r.stdout and str(layout.installed) in r.stdout, show(r)
    assert "Python %s." % minor in r.stdout, show(r)
    assert layout.installed.read_bytes() == MODULE.read_bytes()
    assert os.access(str(layout.launcher), os.X_OK)
    assert exec_line(layout.launcher) == (str(py), str(layout.installed))
    assert launcher_version(layout, env) == "scratch-keepalive " + version
    assert layout.program_files() == {"bin/scratch-keepalive",
                                          "share/scratch-keepalive/scratch_keepalive.py"}
    assert layout.bytecode_files() == {Path(cached_path(py, layout.installed)).name}
    state_untouched()

    # Again: idempotent, same result, no leftovers.
    r = install("--python", py, env=env)
    assert r.returncode == 0, show(r)
    assert "scratch-keepalive %s installed" % version in r.stdout, show(r)
    assert exec_line(layout.launcher) == (str(py), str(layout.installed))
    assert launcher_version(layout, env) == "scratch-keepalive " + version
    assert layout.program_files() == {"bin/scratch-keepalive",
                                          "share/scratch-keepalive/scratch_keepalive.py"}
    state_untouched()

    # Upgrade from a modified copy given with --source.
    new_version = version + ".1"
    new_src = tmp_path / "newer" / "scratch_keepalive.py"
    new_src.parent.mkdir()
    text = MODULE.read_text(encoding="utf-8")
    new_src.write_text(VERSION_LINE.sub('__version__ = "%s"' % new_version, text, count=1),
                       encoding="utf-8")
    r = install("--python", py, "--source", new_src, env=env)
    assert r.returncode == 0, show(r)
    assert "scratch-keepalive %s installed (upgraded from %s)" % (new_version, version) \
        in r.stdout, show(r)
    assert launcher_version(layout, env) == "scratch-keepalive " + new_version
    assert layout.installed.read_bytes() == new_src.read_bytes()
    assert layout.program_files() == {"bin/scratch-keepalive",
                                          "share/scratch-keepalive/scratch_keepalive.py"}
    state_untouched()

    # Uninstall: command and program gone, state kept and said so.
    r = install("--uninstall", env=env)
    assert r.returncode == 0, show(r)
    assert not layout.launcher.exists()
    assert not layout.installed.exists()
    assert not layout.share.exists()
    assert layout.program_files() == set()
    assert "state directory not touched: %s" % layout.state in r.stdout, show(r)
    state_untouched()

    # Uninstalling twice is fine too.
    r = install("--uninstall", env=env)
    assert r.returncode == 0, show(r)
    assert "nothing to remove" in r.stdout, show(r)
    state_untouched()


def cached_path(py, source):
    """Where Python py caches the bytecode of source (its __pycache__ .pyc)."""
    r = run([py, "-c", "import importlib.util, sys; "
             "print(importlib.util.cache_from_source(sys.argv[1]))", source], env=make_env("/"))
    assert r.returncode == 0, show(r)
    return r.stdout.strip()


def loaded_from(result):
    """The .pyc files a run with PYTHONVERBOSE=1 loaded its code objects from."""
    return set(re.findall(r"^# code object from '?([^'\n]*\.pyc)'?$", result.stderr, re.M))


def peak_rss_kb(argv, env):
    """The peak RSS of a command (its process alone), and its result."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], "
            "stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")
    r = run([sys.executable, "-c", code] + [str(a) for a in argv], env=env)
    assert r.returncode == 0, show(r)
    kb, rc = map(int, r.stdout.split())
    return kb, rc


@pytest.mark.parametrize("minor", ["3.6", "3.13"])
def test_launcher_loads_the_program_from_its_bytecode(tmp_path, home, minor):
    """The launcher imports the program, so every start (the login line's `status --brief`
    above all) loads the bytecode install.sh compiled, even where PYTHONDONTWRITEBYTECODE
    keeps Python from writing any; it never compiles the file, as `python3 FILE` does at
    every start, and so it does not carry the compile's parse tree either (about 15 MB at
    its peak, which a walk started that way kept)."""
    py = require_pyenv_python(minor)
    layout = Layout(home)
    env = make_env(home, PYTHONDONTWRITEBYTECODE="1",
                   SCRATCH_KEEPALIVE_HOME=tmp_path / "state")
    r = install("--python", py, env=env)
    assert r.returncode == 0, show(r)
    pyc = cached_path(py, layout.installed)
    assert Path(pyc).is_file(), sorted(files_under(layout.prefix))
    for argv in (["status", "--brief"], ["list"], ["--version"]):
        r = run([layout.launcher] + argv, env=dict(env, PYTHONVERBOSE="1"), cwd=tmp_path)
        assert r.returncode == 0, show(r)
        assert pyc in loaded_from(r), show(r)
    # The contrast: `python3 FILE` compiles the file; no bytecode of it is loaded.
    r = run([py, layout.installed, "list"], env=dict(env, PYTHONVERBOSE="1"), cwd=tmp_path)
    assert r.returncode == 0 and pyc not in loaded_from(r), show(r)
    # And what that compile costs in memory, which the launcher never pays.
    launcher_kb, rc1 = peak_rss_kb([layout.launcher, "list"], env)
    script_kb, rc2 = peak_rss_kb([py, layout.installed, "list"], env)
    assert rc1 == rc2 == 0
    assert launcher_kb < script_kb - 5 * 1024, (launcher_kb, script_kb)


def test_a_python_the_first_line_cannot_name_gets_a_sh_launcher(tmp_path, home):
    """A Python at a path with a space cannot be named by a "#!" line: the launcher is
    then a sh script, which imports the module the same way."""
    spaced = tmp_path / "my python" / "python3"
    spaced.parent.mkdir()
    spaced.symlink_to(any_python())
    layout = Layout(home)
    env = make_env(home)
    r = install("--python", spaced, env=env)
    assert r.returncode == 0, show(r)
    assert layout.launcher.read_text().startswith("#!/bin/sh\n")
    assert exec_line(layout.launcher) == (str(spaced), str(layout.installed))
    r = run([layout.launcher, "--version"], env=dict(env, PYTHONVERBOSE="1"), cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "scratch-keepalive " + module_version()
    assert cached_path(spaced, layout.installed) in loaded_from(r), show(r)


def test_launcher_ignores_a_module_of_the_same_name_in_the_current_directory(tmp_path, home):
    """`python3 -c` puts the current directory first on sys.path; the launcher puts the
    program's directory there instead, so that a scratch_keepalive.py (or json.py) where
    the user happens to stand is not what runs."""
    layout = Layout(home)
    env = make_env(home)
    r = install("--python", any_python(), env=env)
    assert r.returncode == 0, show(r)
    here = tmp_path / "here"
    here.mkdir()
    (here / "scratch_keepalive.py").write_text("raise SystemExit('the wrong one')\n")
    (here / "json.py").write_text("raise SystemExit('the wrong json')\n")
    r = run([layout.launcher, "--version"], env=env, cwd=here)
    assert r.returncode == 0, show(r)
    assert r.stdout.strip() == "scratch-keepalive " + module_version(), show(r)


# --- where the source comes from ---------------------------------------------


def test_from_checkout_without_source(tmp_path, home):
    """tools/install.sh finds ../scratch_keepalive.py, from any cwd."""
    layout = Layout(home)
    env = make_env(home)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = install("--python", any_python(), env=env, cwd=elsewhere)
    assert r.returncode == 0, show(r)
    assert layout.installed.read_bytes() == MODULE.read_bytes()
    assert launcher_version(layout, env) == "scratch-keepalive " + module_version()


@pytest.mark.parametrize("how", ["absolute", "relative", "executed"])
def test_from_single_file_next_to_it(tmp_path, home, how):
    """install.sh and scratch_keepalive.py copied alone into one directory."""
    dist = tmp_path / "dist"
    dist.mkdir()
    shutil.copy2(str(INSTALL_SH), str(dist / "install.sh"))
    shutil.copy2(str(MODULE), str(dist / "scratch_keepalive.py"))
    layout = Layout(home)
    env = make_env(home)
    if how == "absolute":
        r = install("--python", any_python(), env=env, cwd=tmp_path, script=dist / "install.sh")
    elif how == "relative":
        r = install("--python", any_python(), env=env, cwd=dist, script="./install.sh")
    else:  # through its #! line, as a user would run it
        r = install("--python", any_python(), env=env, cwd=dist, script="./install.sh",
                    shell=None)
    assert r.returncode == 0, show(r)
    assert layout.installed.read_bytes() == MODULE.read_bytes()
    assert launcher_version(layout, env) == "scratch-keepalive " + module_version()


def test_install_sh_is_executable_posix_sh():
    assert os.access(str(INSTALL_SH), os.X_OK), "tools/install.sh must be executable"
    assert INSTALL_SH.read_text(encoding="utf-8").startswith("#!/bin/sh\n")


@pytest.mark.parametrize("shell", ["dash", "bash", "bash --posix"])
def test_runs_under_debian_and_sles_shells(home, shell):
    """dash is Debian's /bin/sh, bash is SLES's."""
    argv = shell.split()
    exe = shutil.which(argv[0])
    if exe is None:
        pytest.skip("%s is not installed" % argv[0])
    layout = Layout(home)
    env = make_env(home)
    cmd = [exe] + argv[1:] + [INSTALL_SH, "--python", any_python()]
    r = run(cmd, env=env)
    assert r.returncode == 0, show(r)
    assert launcher_version(layout, env) == "scratch-keepalive " + module_version()
    r = run([exe] + argv[1:] + [INSTALL_SH, "--uninstall"], env=env)
    assert r.returncode == 0, show(r)
    assert layout.program_files() == set()


def test_help(home):
    layout = Layout(home)
    for flag in ("-h", "--help"):
        r = install(flag, env=make_env(home))
        assert r.returncode == 0, show(r)
        for word in ("--prefix", "--python", "--source", "--uninstall"):
            assert word in r.stdout
        assert r.stderr == ""
    assert not layout.prefix.exists()


# --- choosing the interpreter ------------------------------------------------


FAKE_OLD_PYTHON = """#!/bin/sh
# Pretends to be Python 2.7: answers --version, fails the >= 3.6 check
# (exit status 1, as a real 2.7 does for sys.exit(True)).
case "$*" in --version|-V) echo "Python 2.7.18" >&2; exit 0 ;; esac
exit 1
"""


def test_python3_preferred_when_new_enough(tmp_path, home):
    py = require_pyenv_python("3.9")
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    (fakebin / "python3").symlink_to(py)
    newer = pyenv_python("3.13")
    if newer is not None:
        (fakebin / "python3.13").symlink_to(newer)
    layout = Layout(home)
    env = make_env(home, path="%s:%s" % (fakebin, BASE_PATH))
    r = install(env=env)
    assert r.returncode == 0, show(r)
    assert "(Python 3.9." in r.stdout, show(r)
    assert launcher_version(layout, env) == "scratch-keepalive " + module_version()


def test_newest_python3_x_when_python3_too_old(tmp_path, home):
    newest = require_pyenv_python("3.13")
    fakebin = tmp_path / "fakebin"
    write_script(fakebin / "python3", FAKE_OLD_PYTHON)
    (fakebin / "python3.13").symlink_to(newest)
    older = pyenv_python("3.9")
    if older is not None:
        (fakebin / "python3.9").symlink_to(older)
    write_script(fakebin / "python3.13-config", "#!/bin/sh\nexit 1\n")  # not an interpreter
    layout = Layout(home)
    env = make_env(home, path="%s:%s" % (fakebin, BASE_PATH))
    r = install(env=env)
    assert r.returncode == 0, show(r)
    assert "(Python 3.13." in r.stdout, show(r)
    interpreter, _ = exec_line(layout.launcher)
    assert interpreter in (str(fakebin / "python3.13"), str(newest)), interpreter
    assert launcher_version(layout, env) == "scratch-keepalive " + module_version()


def test_wrapper_python3_resolved_to_real_interpreter(tmp_path, home):
    """A python3 that is a wrapper (like a pyenv shim) is bound by its real path."""
    real = require_pyenv_python("3.9")
    fakebin = tmp_path / "fakebin"
    write_script(fakebin / "python3", '#!/bin/sh\nexec "%s" "$@"\n' % real)
    layout = Layout(home)
    env = make_env(home, path="%s:%s" % (fakebin, BASE_PATH))
    r = install(env=env)
    assert r.returncode == 0, show(r)
    assert exec_line(layout.launcher)[0] == str(real)


# --- refusals: one error line, nothing installed ------------------------------


def test_refuses_nonexistent_python(home):
    layout = Layout(home)
    r = install("--python", "/nonexistent", env=make_env(home))
    assert_refused(r, layout)
    assert not layout.prefix.exists()


def test_refuses_too_old_python(tmp_path, home):
    fake = write_script(tmp_path / "old" / "python3", FAKE_OLD_PYTHON)
    layout = Layout(home)
    r = install("--python", fake, env=make_env(home))
    assert_refused(r, layout)
    assert "3.6" in r.stderr
    assert not layout.prefix.exists()


def test_refuses_when_no_python_on_path(tmp_path, home):
    """Only a too-old python3 on PATH, and the tools install.sh needs."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("sh", "sed", "grep", "sort", "head", "tail", "dirname", "mkdir", "mktemp",
                 "cp", "mv", "rm", "rmdir", "chmod", "cat"):
        exe = shutil.which(name, path=BASE_PATH)
        assert exe, name
        (tools / name).symlink_to(exe)
    write_script(tmp_path / "old" / "python3", FAKE_OLD_PYTHON)
    layout = Layout(home)
    r = install(env=make_env(home, path="%s:%s" % (tmp_path / "old", tools)))
    assert_refused(r, layout)
    assert "no Python >= 3.6" in r.stderr
    assert not layout.prefix.exists()


def test_refuses_missing_source(tmp_path, home):
    layout = Layout(home)
    r = install("--python", any_python(), "--source", tmp_path / "nope.py", env=make_env(home))
    assert_refused(r, layout)
    assert "nope.py" in r.stderr
    assert not layout.prefix.exists()


def test_refuses_when_no_source_next_to_script(tmp_path, home):
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy2(str(INSTALL_SH), str(lonely / "install.sh"))
    layout = Layout(home)
    r = install("--python", any_python(), env=make_env(home), script=lonely / "install.sh")
    assert_refused(r, layout)
    assert "scratch_keepalive.py not found" in r.stderr
    assert not layout.prefix.exists()


@pytest.mark.parametrize("args", [["--frobnicate"], ["extra-arg"], ["--prefix"],
                                  ["--python"], ["--source"]])
def test_refuses_bad_usage(home, args):
    layout = Layout(home)
    r = install(*args, env=make_env(home))
    assert_refused(r, layout)
    assert not layout.prefix.exists()


def test_refuses_broken_source_and_leaves_nothing(tmp_path, home):
    broken = tmp_path / "scratch_keepalive.py"
    broken.write_text('__version__ = "6.6.6"\nthis is not python\n', encoding="utf-8")
    layout = Layout(home)
    r = install("--python", any_python(), "--source", broken, env=make_env(home))
    assert_refused(r, layout)
    assert not layout.prefix.exists(), layout.program_files()


def test_failed_upgrade_keeps_previous_install(tmp_path, home):
    layout = Layout(home)
    env = make_env(home)
    r = install("--python", any_python(), env=env)
    assert r.returncode == 0, show(r)
    before = (layout.launcher.read_bytes(), layout.installed.read_bytes())

    wrong = tmp_path / "scratch_keepalive.py"   # runs, but reports another version
    wrong.write_text('__version__ = "7.0.0"\nprint("scratch-keepalive 0.0.0")\n',
                     encoding="utf-8")
    r = install("--python", any_python(), "--source", wrong, env=env)
    assert r.returncode != 0, show(r)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("install.sh: error:"), show(r)
    assert (layout.launcher.read_bytes(), layout.installed.read_bytes()) == before
    assert layout.program_files() == {"bin/scratch-keepalive",
                                          "share/scratch-keepalive/scratch_keepalive.py"}
    assert launcher_version(layout, env) == "scratch-keepalive " + module_version()


# --- PATH warning -----------------------------------------------------------


def test_path_warning_when_bin_not_on_path(home):
    layout = Layout(home)
    r = install("--python", any_python(), env=make_env(home))
    assert r.returncode == 0, show(r)
    assert "%s is not on your PATH" % (layout.prefix / "bin") in r.stderr, show(r)
    assert "~/.bashrc" in r.stderr, show(r)
    assert 'export PATH="%s:$PATH"' % (layout.prefix / "bin") in r.stderr.splitlines()[-1]


@pytest.mark.parametrize("suffix", ["", "/"])
def test_no_path_warning_when_bin_on_path(home, suffix):
    layout = Layout(home)
    env = make_env(home, path="%s%s:%s" % (layout.prefix / "bin", suffix, BASE_PATH))
    r = install("--python", any_python(), env=env)
    assert r.returncode == 0, show(r)
    assert "PATH" not in r.stdout + r.stderr, show(r)
    assert r.stderr == "", show(r)


def test_custom_prefix_relative(tmp_path, home):
    layout = Layout(home, prefix=tmp_path / "opt" / "sk")
    env = make_env(home, path="%s:%s" % (layout.prefix / "bin", BASE_PATH))
    r = install("--prefix", "opt/sk", "--python", any_python(), env=env, cwd=tmp_path)
    assert r.returncode == 0, show(r)
    assert r.stderr == "", show(r)
    assert run(["scratch-keepalive", "--version"], env=env).stdout.strip() == \
        "scratch-keepalive " + module_version()
    assert not (home / ".local").exists()
    r = install("--uninstall", "--prefix=%s" % layout.prefix, env=env)
    assert r.returncode == 0, show(r)
    assert layout.program_files() == set()


def test_uninstall_leaves_a_foreign_command_alone(home):
    layout = Layout(home)
    write_script(layout.launcher, "#!/bin/sh\n# written by pip\nexit 0\n")
    r = install("--uninstall", env=make_env(home))
    assert r.returncode == 0, show(r)
    assert layout.launcher.exists()
    assert "not written by install.sh" in r.stderr, show(r)


# --- refreshing an installed schedule ----------------------------------------


@pytest.mark.parametrize("where", ["default", "XDG_STATE_HOME", "SCRATCH_KEEPALIVE_HOME"])
def test_upgrade_reinstalls_schedule(tmp_path, home, where):
    fake = tmp_path / "fake" / "scratch_keepalive.py"
    fake.parent.mkdir()
    fake.write_text(FAKE_MODULE % "True", encoding="utf-8")
    record = tmp_path / "record.txt"
    layout = Layout(home)
    extra = {"FAKE_RECORD": record}
    if where == "default":
        state = layout.state
    elif where == "XDG_STATE_HOME":
        extra["XDG_STATE_HOME"] = tmp_path / "xdg"
        state = tmp_path / "xdg" / "scratch-keepalive"
    else:
        extra["SCRATCH_KEEPALIVE_HOME"] = tmp_path / "sk-home"
        state = tmp_path / "sk-home"
    state.mkdir(parents=True)
    (state / "schedule.json").write_text('{"every": "weekly"}\n', encoding="utf-8")
    env = make_env(home, path="%s:%s" % (layout.prefix / "bin", BASE_PATH), **extra)

    r = install("--python", any_python(), "--source", fake, env=env)
    assert r.returncode == 0, show(r)
    assert record.read_text(encoding="utf-8").splitlines() == [
        "--state-dir %s install-cron --reinstall" % state]
    assert "schedule refreshed" in r.stdout, show(r)
    assert (state / "schedule.json").read_text(encoding="utf-8") == '{"every": "weekly"}\n'
    assert files_under(state) == {"schedule.json"}


def test_schedule_refresh_failure_tells_the_command(tmp_path, home):
    fake = tmp_path / "fake" / "scratch_keepalive.py"
    fake.parent.mkdir()
    fake.write_text(FAKE_MODULE % "False", encoding="utf-8")
    record = tmp_path / "record.txt"
    layout = Layout(home)
    layout.state.mkdir(parents=True)
    (layout.state / "schedule.json").write_text("{}\n", encoding="utf-8")
    env = make_env(home, path="%s:%s" % (layout.prefix / "bin", BASE_PATH),
                   FAKE_RECORD=record)

    r = install("--python", any_python(), "--source", fake, env=env)
    assert r.returncode == 0, show(r)   # the install itself succeeded
    assert launcher_version(layout, env) == "scratch-keepalive 5.0.0"
    assert "old program paths" in r.stderr, show(r)
    assert "    scratch-keepalive install-cron" in r.stderr.splitlines(), show(r)
    assert files_under(layout.state) == {"schedule.json"}


def test_no_schedule_no_install_cron(tmp_path, home):
    fake = tmp_path / "fake" / "scratch_keepalive.py"
    fake.parent.mkdir()
    fake.write_text(FAKE_MODULE % "True", encoding="utf-8")
    record = tmp_path / "record.txt"
    r = install("--python", any_python(), "--source", fake,
                env=make_env(home, FAKE_RECORD=record))
    assert r.returncode == 0, show(r)
    assert not record.exists()
    assert "install-cron" not in r.stdout + r.stderr


# --- pip install into a fresh venv -------------------------------------------


def _pip_env(home, venv):
    env = make_env(home, path="%s:%s" % (venv / "bin", BASE_PATH),
                   PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    for key, value in os.environ.items():   # how this machine reaches PyPI
        if key.startswith("PIP_") or key.lower().endswith("_proxy") or key in (
                "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE"):
            env.setdefault(key, value)
    return env


def _pip_version(vpy, env):
    r = run([vpy, "-m", "pip", "--version"], env=env)
    assert r.returncode == 0, show(r)
    return tuple(int(x) for x in r.stdout.split()[1].split(".")[:2])


@pytest.mark.parametrize("minor", ["3.6", "3.9", "3.13"])
def test_pip_install_in_venv(tmp_path, home, minor):
    """`pip install .` in a fresh venv of each supported end (3.6 with its last pip, 21.3.1),
    with build isolation: the build backend comes from PyPI and must install there too
    (setuptools>=61, the old backend, has no release for 3.6)."""
    py = require_pyenv_python(minor)
    venv = tmp_path / "venv"
    env = _pip_env(home, venv)
    r = run([py, "-m", "venv", venv], env=env, timeout=300)
    vpy = venv / "bin" / "python"
    if r.returncode != 0 or not vpy.exists():
        pytest.skip("cannot create a venv with pip here (%s -m venv): %s"
                    % (py, (r.stderr.strip().splitlines() or ["?"])[-1]))
    if _pip_version(vpy, env) < (19, 0):
        # A 3.6 venv comes with pip 18.1, which predates PEP 517 and cannot build any
        # project from its pyproject.toml; the README says to upgrade it first, which on
        # 3.6 gives 21.3.1, its last pip.
        r = run([vpy, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], env=env,
                timeout=600)
        assert r.returncode == 0, show(r)
        if minor == "3.6":
            assert _pip_version(vpy, env) == (21, 3), _pip_version(vpy, env)

    # Build from a copy so that build/ and dist/ never land in the checkout.
    src = tmp_path / "src"
    shutil.copytree(str(ROOT), str(src), ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        ".venv", "venv", ".tox"))
    assert (src / "pyproject.toml").is_file(), "pyproject.toml is missing"
    r = run([vpy, "-m", "pip", "install", "--quiet", src], env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, show(r)

    version = module_version()
    elsewhere = tmp_path / "elsewhere"   # so the copy in src can't be imported
    elsewhere.mkdir()
    command = venv / "bin" / "scratch-keepalive"
    r = run([command, "--version"], env=env, cwd=elsewhere)
    assert r.returncode == 0, show(r)
    assert r.stdout.strip() == "scratch-keepalive " + version, show(r)

    r = run([vpy, "-m", "scratch_keepalive", "--version"], env=env, cwd=elsewhere)
    assert r.returncode == 0, show(r)
    assert r.stdout.strip() == "scratch-keepalive " + version, show(r)

    r = run([vpy, "-m", "pip", "show", "br-scratch-keepalive"], env=env, cwd=elsewhere)
    assert r.returncode == 0, show(r)
    assert "Version: %s" % version in r.stdout.splitlines(), show(r)
    r = run([vpy, "-c", "import scratch_keepalive as s; print(s.__file__)"], env=env,
            cwd=elsewhere)
    assert r.returncode == 0, show(r)
    assert str(Path(r.stdout.strip()).resolve()).startswith(str(venv.resolve()) + os.sep), \
        r.stdout

    # A real command through the console script: init, add, refresh, list.
    scratch = tmp_path / "scratch"
    (scratch / "ds").mkdir(parents=True)
    (scratch / "ds" / "f").write_text("x")
    tool_env = dict(env, SCRATCH_KEEPALIVE_HOME=str(tmp_path / "state"), TZ="UTC")
    for argv in (["init", "--profile", "generic", "--scratch-root", scratch],
                 ["add", "--name", "ds", "--path", scratch / "ds", "--keep-until",
                  "2099-12-31"],
                 ["refresh", "--name", "ds"]):
        r = run([command] + argv, env=tool_env, cwd=elsewhere)
        assert r.returncode == 0, show(r)
    r = run([command, "list", "--json"], env=tool_env, cwd=elsewhere)
    assert r.returncode == 0, show(r)
    listed = json.loads(r.stdout)
    assert [(e["name"], e["state"], e["last_mode"]) for e in listed] == [("ds", "ok", "touch")]
