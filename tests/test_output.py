"""What the tool writes, and where it cannot: a dataset name it could not print on one
line is refused; a closed output pipe ends a command quietly (and a broken pipe of
something else is still an error); a non-UTF-8 path on a strict UTF-8 stdout.
"""
import os
import subprocess
import sys

import pytest

from conftest import KEEP, SCRIPT, run_in, sk, small_dataset


# --------------------------------------------------------------------------- names


def test_name_with_a_trailing_newline_is_refused(tmp_path):
    """`$` in the name pattern matched before a trailing newline: `add --name $'evil\\n'` exited 0 and
    made logs/evil<newline>/. Now it is invalid input (exit 2) and nothing is written."""
    scratch, state = tmp_path / "scratch", tmp_path / "state"
    scratch.mkdir()
    root = small_dataset(scratch)
    r = run_in(state, "init", "--profile", "generic", "--scratch-root", scratch)
    assert r.rc == 0, r
    before = sorted(os.listdir(str(state)))
    r = run_in(state, "add", "--name", "evil\n", "--path", root, "--keep-until", KEEP)
    assert r.rc == 2, r
    assert r.err.startswith("scratch-keepalive: error: invalid dataset name 'evil\\n'"), r
    assert len(r.err.splitlines()) == 1, r
    assert sorted(os.listdir(str(state))) == before
    assert os.listdir(str(state / "logs")) == []
    assert not (root / ".scratch-keepalive").exists()
    assert run_in(state, "list", "--json").json() == []
    for bad in ("evil\n", "ok\r\n", "a" * 64 + "\n"):
        with pytest.raises(sk.UsageError):
            sk.check_name(bad)
    assert sk.check_name("a" * 64) == "a" * 64


# --------------------------------------------------------------------------- closed output pipe


def run_into_closed_pipe(*argv):
    """Run the tool with stdout a pipe nobody reads any more (as after `| head -0` exited)."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, str(SCRIPT)] + [str(a) for a in argv], stdout=w,
                           stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=120)
    finally:
        os.close(w)
    return p.returncode, p.stderr.decode("utf-8", "replace")


@pytest.mark.parametrize("argv", [["list"], ["list", "--json"], ["status"],
                                  ["status", "--json"], ["status", "--name", "ds00"],
                                  ["refresh", "--json"], ["refresh"], ["doctor"], ["--help"]],
                         ids=lambda a: " ".join(a))
def test_closed_output_pipe_ends_quietly(cli, generic, env, argv):
    """`list | head -0` printed "error: [Errno 32] Broken pipe; check the path and its
    permissions" and exited 1. Now: no text at all on stderr, exit 141 (128 + SIGPIPE, what
    the shell reports for git), and the work is done (a refresh records its run). 25
    datasets make the text of `status` larger than the output buffer, so the pipe breaks
    in the middle of the output as well as at its end."""
    for i in range(25):
        root = env["scratch"] / ("ds%02d" % i)
        root.mkdir()
        (root / "f").write_text("x")
        assert cli("add", "--name", "ds%02d" % i, "--path", root, "--keep-until", KEEP).rc == 0
    rc, err = run_into_closed_pipe(*argv)
    assert (rc, err) == (141, ""), (rc, err)
    if argv[0] == "refresh":
        assert all(e["last_refresh"] for e in cli("list", "--json").json())


def test_broken_pipe_of_something_else_is_still_an_error(cli, generic, env, monkeypatch):
    """Only the closing of the tool's own output is quiet: a broken pipe elsewhere (here
    raised by the command while its output is fine) is still reported."""
    def broken(args, ctx):
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(sk, "cmd_list", broken)     # build_parser() looks it up per call
    r = cli("list")
    assert r.rc == 1 and "Broken pipe" in r.err, r


# --------------------------------------------------------------------------- non-UTF-8 names


def test_non_utf8_dataset_path_on_a_strict_utf8_stdout(tmp_path):
    """A directory whose name is not valid UTF-8, with PYTHONIOENCODING=utf-8:strict: `add`
    registered it and then exited 1 with "internal error (UnicodeEncodeError)". Now every
    command prints the path escaped and exits 0, and the registry holds the exact bytes."""
    scratch, state = tmp_path / "scratch", tmp_path / "state"
    scratch.mkdir()
    raw = os.path.join(os.fsencode(str(scratch)), b"caf\xe9 \xff")
    os.mkdir(raw)
    with open(os.path.join(raw, b"f"), "wb") as f:
        f.write(b"x")
    path = os.fsdecode(raw)         # surrogateescape: subprocess passes the bytes back
    strict = {"PYTHONIOENCODING": "utf-8:strict"}
    r = run_in(state, "init", "--profile", "generic", "--scratch-root", scratch, **strict)
    assert r.rc == 0, r
    r = run_in(state, "add", "--name", "cafe", "--path", path, "--keep-until", KEEP, **strict)
    assert r.rc == 0, r
    assert r.err == "", r
    assert "caf\\udce9 \\udcff" in r.out or "caf\\xe9 \\xff" in r.out, r
    assert os.path.exists(os.path.join(raw, b".scratch-keepalive"))
    entries = run_in(state, "list", "--json", **strict).json()
    assert os.fsencode(entries[0]["path"]) == raw
    for argv in (["list"], ["status"], ["status", "--name", "cafe"], ["refresh"],
                 ["refresh", "--name", "cafe", "--json"], ["remove", "--name", "cafe"]):
        r = run_in(state, *argv, **strict)
        assert r.rc == 0 and "error" not in r.err, (argv, r)
    assert run_in(state, "list", "--json").json() == []
