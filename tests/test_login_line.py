"""How the file is started: a script walk runs in the process it was started as; the
scheduled job's loader runs it from bytecode with a smaller peak; the login line
(`status --brief`) parses as the parser does and imports only what it needs.
"""
import os
import shutil
import subprocess
import sys

from conftest import (REPO, SCRIPT, go_on, pause_env, pause_shim, reaped,  # noqa: F401
                      run_script, setup_dataset, sk, small_dataset, tool_env, wait_stopped)


def test_a_script_walk_runs_as_it_was_started(tmp_path, pause_shim):
    """`python3 scratch_keepalive.py refresh` runs the walk in the process and with the
    command line it was started with: no re-execution. Every documented way to run the
    tool loads it from its bytecode (install.sh's launcher and the README's: see
    tests/test_install.py and tests/test_messages.py; the scheduled job: the loader test
    below), so a bare script only starts slower and keeps its parse tree, as the README
    says. Hints still name the script as it was run."""
    scratch, state = tmp_path / "scratch", tmp_path / "state"
    scratch.mkdir()
    root = small_dataset(scratch)
    setup_dataset(state, scratch, root)
    env = tool_env(state)
    argv = [sys.executable, "-B", str(SCRIPT), "refresh", "--name", "ds"]
    proc = subprocess.Popen(argv, env=pause_env(env, pause_shim, "stat", root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    with reaped(proc):
        wait_stopped(proc, "the refresh to stop before its walk")
        with open("/proc/%d/cmdline" % proc.pid, "rb") as f:
            cmdline = f.read().split(b"\0")
        out, err = go_on(proc)
    assert cmdline[:-1] == [os.fsencode(a) for a in argv], cmdline
    assert proc.returncode == 0, (out, err)
    assert b"ds: refreshed" in out or b"ds: touched" in out or b"complete" in out, out
    r = run_script("refresh", "--name", "nope", env=env, clean=True)
    assert r.rc == 2, r
    assert ("`python3 %s list`" % SCRIPT) in r.err, r
    assert not hasattr(sk, "reexec_by_compile")


def test_the_loader_runs_the_script_from_its_bytecode_with_a_smaller_peak(tmp_path):
    """The scheduled job's `python3 -c LOADER SCRIPT ARGS` (LOADER: see the module) runs the
    script as `python3 SCRIPT ARGS` does (output, exit code, hints) but from __pycache__,
    so its peak memory stays clear of the compile's (about 18 MB for this file)."""
    copy = tmp_path / "bin" / "scratch_keepalive.py"
    copy.parent.mkdir()
    shutil.copy(str(SCRIPT), str(copy))

    def peak(*argv):
        code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], "
                "stdout=subprocess.PIPE, stderr=subprocess.PIPE); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode); "
                "sys.stdout.flush(); sys.stdout.buffer.write(r.stdout + b'|' + r.stderr)")
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)    # as on a user's shell
        out = subprocess.run([sys.executable, "-c", code] + list(argv), env=env,
                             stdout=subprocess.PIPE).stdout
        head, _, rest = out.partition(b"\n")
        kb, rc = map(int, head.split())
        return kb, rc, rest
    loader = [sys.executable, "-c", sk.LOADER, str(copy)]
    assert peak(*(loader + ["--version"]))[1] == 0      # writes the bytecode
    assert list((copy.parent / "__pycache__").glob("scratch_keepalive.*.pyc"))
    script_kb, rc1, out1 = peak(sys.executable, str(copy), "list", "--state-dir",
                                str(tmp_path / "none"))
    loader_kb, rc2, out2 = peak(*(loader + ["list", "--state-dir", str(tmp_path / "none")]))
    assert (rc1, out1) == (rc2, out2), (out1, out2)
    assert ("`python3 %s init`" % copy).encode() in out2 or rc2 == 0, out2
    assert loader_kb < script_kb - 5 * 1024, (loader_kb, script_kb)


def test_the_login_line_parses_as_the_parser_does():
    """`status --brief` (the login line) skips building the parser; what it gets is what
    the parser gives, and any other command line goes through the parser."""
    fast = sk.login_line_args(["status", "--brief"])
    assert vars(fast) == vars(sk.build_parser().parse_args(["status", "--brief"]))
    for argv in (["status"], ["status", "--brief", "--json"], ["--brief", "status"],
                 ["--state-dir", "x", "status", "--brief"], []):
        assert sk.login_line_args(argv) is None, argv


def test_the_login_line_imports_only_what_it_needs(tmp_path):
    """`status --brief` imports none of the modules it does not use (argparse, subprocess,
    socket, ...): they are imported where first used. Each is still what its name says
    once used, and a test's monkeypatching through the module reaches the real one."""
    code = ("import sys; sys.path[0] = sys.argv.pop(1); import scratch_keepalive as m; "
            "rc = m.main(['status', '--brief']); "
            "print(' '.join(sorted(set(sys.modules) & set(sys.argv[1:])))); sys.exit(rc)")
    lazy = ["argparse", "subprocess", "socket", "tempfile", "threading", "textwrap",
            "signal", "select", "calendar", "_strptime", "json", "re", "enum", "contextlib",
            "collections", "functools", "_socket"]
    env = dict(os.environ, SCRATCH_KEEPALIVE_HOME=str(tmp_path / "state"))
    r = subprocess.run([sys.executable, "-S", "-c", code, str(REPO)] + lazy, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert r.returncode == 0, r
    assert r.stdout.strip() == "", r.stdout
    # With state to read: datasets that need attention, a checkpoint, a purge on record.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env.update(SCRATCH_KEEPALIVE_NOW="2030-01-01T00:00:00Z")
    for argv in (["init", "--profile", "generic", "--scratch-root", scratch],
                 ["add", "--name", "a", "--path", scratch / "a", "--keep-until", "2030-01-05"],
                 ["add", "--name", "b", "--path", scratch / "b", "--keep-until", "2030-06-30"],
                 ["refresh", "--name", "a", "--check"], ["refresh", "--name", "b", "--check"],
                 ["refresh", "--name", "a", "--check", "--max-entries", "1"]):
        if argv[0] == "add":
            (argv[4] / "sub").mkdir(parents=True)
            (argv[4] / "sub" / "f").write_text("x")
        if argv[:3] == ["refresh", "--name", "b"]:
            os.unlink(str(scratch / "b" / "sub" / "f"))
        subprocess.run([sys.executable, str(SCRIPT)] + [str(a) for a in argv], env=env,
                       stdout=subprocess.PIPE, check=argv[-1] != "1")
    r = subprocess.run([sys.executable, "-S", "-c", code, str(REPO)] + lazy, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    lines = r.stdout.splitlines()
    assert "scratch-keepalive: a: " in r.stdout and "scratch-keepalive: b: " in r.stdout, r
    assert lines[-1] == "", r.stdout          # none of them was imported
    import socket as real_socket
    assert sk.socket.gethostname() == real_socket.gethostname()
    assert sk.subprocess.PIPE == subprocess.PIPE
    assert sk.MAIL_RE.match("a@b.c") and not sk.MAIL_RE.match("a b@c")
