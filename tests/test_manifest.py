"""Tests of what the manifests give a user: `files` (every entry, at risk, purge-eligible,
vanished), its output forms, its errors, and the proofs with the real tools it feeds
(rsync --from0 and tar --null), a purge simulated between two walks, the walk's order on
odd names, and a manifest that survives a SIGKILL and resume.

Listing a directory moves its atime (relatime moves it when older than a day), so these
tests look at the trees only through conftest's snapshot(), which lists with O_NOATIME.
"""

import base64
import json
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import (DAY, KEEP, NOW_EPOCH, REPO, SCRIPT, assert_error,  # noqa: F401
                      give_to_nobody, pause_env, pause_shim, reaped, run_command, run_script,
                      run_as_nobody, set_atime, sk, snapshot, start_script, wait_stopped)

OLD = NOW_EPOCH - 40 * DAY          # older than purge days (30): purge-eligible and at risk
RISKY = NOW_EPOCH - 20 * DAY        # at risk (13 days), not purge-eligible
RECENT = NOW_EPOCH - 1 * DAY        # neither
ODD_NAMES = [b"run", b"run/x", b"run-2.txt", b"sp ace", b"tab\there", b"new\nline",
             b"caf\xc3\xa9", b"bad\xff\xfe", b"-dash", b'q"uote', b"back\\slash",
             b"dir with space", b"dir with space/-inner\n"]


# --------------------------------------------------------------------------- helpers


def build(root, spec):
    """A tree from {relative path (bytes): (kind, atime)}: kind "dir", "link" or the file's
    bytes. Atimes are set last, deepest first, so that building moves none of them."""
    root = os.fsencode(str(root))
    os.makedirs(root, exist_ok=True)
    for rel in sorted(spec):
        kind, _ = spec[rel]
        path = os.path.join(root, rel)
        if kind == "dir":
            os.makedirs(path, exist_ok=True)
        elif kind == "link":
            os.symlink(b"target-" + os.path.basename(rel), path)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(kind)
    for rel in sorted(spec, key=lambda r: -r.count(b"/")):
        set_atime(os.path.join(root, rel), spec[rel][1])


def walk_order(root):
    """Every entry below root (bytes, relative), as the walk visits them: depth-first, the
    names of a directory in byte order, a directory before what it holds. Computed here
    independently of the tool, listing with O_NOATIME."""
    out = []

    def visit(rel):
        path = os.path.join(root, rel) if rel else root
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOATIME", 0))
        try:
            names = sorted(os.fsencode(n) for n in os.listdir(fd))
        finally:
            os.close(fd)
        for n in names:
            child = os.path.join(rel, n) if rel else n
            out.append(child)
            if stat.S_ISDIR(os.lstat(os.path.join(root, child)).st_mode):
                visit(child)
    visit(b"")
    return out


def unquote(line):
    """The inverse of the text output's quoting (git's C style plus \\ooo bytes)."""
    if not line.startswith('"'):
        return line.encode("utf-8")
    assert line.endswith('"') and len(line) >= 2, line
    body, out, i = line[1:-1], bytearray(), 0
    simple = {"a": 7, "b": 8, "t": 9, "n": 10, "v": 11, "f": 12, "r": 13, '"': 34, "\\": 92}
    while i < len(body):
        c = body[i]
        if c != "\\":
            assert c != '"', line
            out += c.encode("utf-8")
            i += 1
        elif body[i + 1] in simple:
            out.append(simple[body[i + 1]])
            i += 2
        else:
            assert re.match(r"[0-3][0-7]{2}", body[i + 1:i + 4]), line
            out.append(int(body[i + 1:i + 4], 8))
            i += 4
    return bytes(out)


def state_bytes(state):
    """Every file under the state dir with its bytes: what "changed nothing" compares."""
    out = {}
    for dirpath, _, names in os.walk(str(state)):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, str(state))] = f.read()
    return out


def lines_of(out):
    return [unquote(x) for x in out.split("\n")[:-1]]


def refresh(cli, *args):
    r = cli("refresh", "--name", "ds", "--json", *args)
    assert r.rc in (0, 1), r
    return r.json()["results"][0]


@pytest.fixture
def odd(cli, generic):
    """Dataset ds (generic profile: skip 11 days, at risk 13, purge 30) of odd names with
    atimes of each class, walked once in check mode."""
    root = generic["scratch"] / "ds"
    ages = [OLD, RISKY, RECENT]
    spec = {}
    for i, name in enumerate(ODD_NAMES):
        kind = "dir" if name in (b"run", b"dir with space") else b"x" * (i + 1)
        spec[name] = (kind, ages[i % 3])
    spec[b"alink"] = ("link", RISKY)
    build(root, spec)
    assert cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0
    set_atime(str(root), RECENT)
    set_atime(str(root / ".scratch-keepalive"), OLD)    # in the manifest, never in a list
    res = refresh(cli, "--check")
    assert res["complete"], res
    return dict(generic, root=root, spec=spec, result=res)


# --------------------------------------------------------------------------- quoting


@pytest.mark.parametrize("raw, text", [
    (b"plain.txt", "plain.txt"), (b"sp ace", "sp ace"), (b"-dash", "-dash"),
    (b"caf\xc3\xa9", "caf\u00e9"), (b"new\nline", '"new\\nline"'), (b"tab\there", '"tab\\there"'),
    (b'q"uote', '"q\\"uote"'), (b"back\\slash", '"back\\\\slash"'), (b"bad\xff\xfe",
                                                                     '"bad\\377\\376"'),
    (b"bell\x07\x1b", '"bell\\a\\033"'), (b"c1\xc2\x85", '"c1\\302\\205"'),
    (b"del\x7f", '"del\\177"'), (b"sep\xe2\x80\xa8", '"sep\\342\\200\\250"'),
])
def test_quote_path(raw, text):
    assert sk.quote_path(raw) == text
    assert unquote(text) == raw
    assert "\n" not in text and "\t" not in text


def test_quoting_is_gits_for_names_that_are_utf8(tmp_path):
    """Where a name is valid UTF-8 without C1 controls, the quoting is exactly git's
    (`git ls-files` with core.quotePath=false)."""
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    names = [b"sp ace", b"tab\there", b"new\nline", b"caf\xc3\xa9", b'q"uote',
             b"back\\slash", b"bell\x07", b"esc\x1b[0m", b"cr\r", b"-dash"]
    repo = os.fsencode(str(tmp_path))
    subprocess.run([git, "init", "-q", str(tmp_path)], check=True)
    for n in names:
        with open(os.path.join(repo, n), "wb") as f:
            f.write(b"x")
    subprocess.run([git, "-C", str(tmp_path), "add", "-A"], check=True)
    out = subprocess.run([git, "-c", "core.quotePath=false", "-C", str(tmp_path), "ls-files"],
                         stdout=subprocess.PIPE, check=True).stdout.decode("utf-8")
    assert sorted(out.split("\n")[:-1]) == sorted(sk.quote_path(n) for n in names)


# --------------------------------------------------------------------------- files: lists


def test_files_lists_every_entry_in_the_walks_order_but_the_root(cli, odd):
    """Without a class: every entry of the last walk but the root and the sentinel, in the
    walk's order (run, run/x, then run-2.txt: component-wise, not whole-path byte order)."""
    r = cli("files", "--name", "ds")
    assert r.rc == 0, r
    want = [p for p in walk_order(os.fsencode(str(odd["root"]))) if p != b".scratch-keepalive"]
    assert lines_of(r.out) == want
    i = want.index
    assert i(b"run") < i(b"run/x") < i(b"run-2.txt")
    assert '"new\\nline"' in r.out.split("\n") and '"bad\\377\\376"' in r.out.split("\n")
    assert r.err.count("\n") == 1, r
    assert re.match(r"scratch-keepalive: ds: entries as of the check walk started "
                    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(less than a minute ago; 16 entries "
                    r"in that walk\)\n\Z", r.err), r.err


@pytest.mark.parametrize("flag, cutoff", [("--at-risk", NOW_EPOCH - 13 * DAY),
                                          ("--purge-eligible", NOW_EPOCH - 30 * DAY)])
def test_classes_are_exactly_the_walks_counts(cli, odd, flag, cutoff):
    """--at-risk and --purge-eligible list exactly the entries whose atime (as the walk
    found it) lies beyond the line, as many as the refresh result counted, with its bytes."""
    r = cli("files", "--name", "ds", flag, "--json")
    assert r.rc == 0, r
    docs = [json.loads(x) for x in r.out.splitlines()]
    paths = [base64.b64decode(d["path_b64"]) if "path_b64" in d else d["path"].encode()
             for d in docs]
    spec = odd["spec"]
    want = [p for p in walk_order(os.fsencode(str(odd["root"]))) if p in spec and
            spec[p][1] < cutoff]
    assert paths == want and want
    res = odd["result"]
    key = "at_risk" if flag == "--at-risk" else "purge_eligible"
    # the sentinel is old too: counted by the walk, never listed
    assert res["entries_" + key] == len(want) + 1
    assert res["bytes_" + key] == sum(d["size"] for d in docs if d["kind"] == "file") + \
        os.lstat(str(odd["root"] / ".scratch-keepalive")).st_size
    assert "entries at risk" in r.err if flag == "--at-risk" else "purge-eligible" in r.err


def test_older_than_alone_and_with_a_class(cli, odd):
    spec = odd["spec"]
    order = walk_order(os.fsencode(str(odd["root"])))
    r = cli("files", "--name", "ds", "--older-than", "30", "-0")
    assert r.rc == 0, r
    got = [os.fsencode(p) for p in r.out.split("\0")[:-1]]
    assert got == [p for p in order if p in spec and spec[p][1] < NOW_EPOCH - 30 * DAY]
    r = cli("files", "--name", "ds", "--older-than", "0.5", "-0")
    got = [os.fsencode(p) for p in r.out.split("\0")[:-1]]
    assert got == [p for p in order if p in spec]     # all but the root and the sentinel
    r = cli("files", "--name", "ds", "--at-risk", "--older-than", "30", "-0")
    assert [os.fsencode(p) for p in r.out.split("\0")[:-1]] == \
        [p for p in order if p in spec and spec[p][1] < NOW_EPOCH - 30 * DAY]
    assert "not accessed for 30 days" in r.err


def test_json_lines_keys_and_a_path_that_is_not_utf8(cli, odd):
    r = cli("files", "--name", "ds", "--json")
    docs = [json.loads(x) for x in r.out.splitlines()]
    by_path = dict((d["path"], d) for d in docs)
    bad = [d for d in docs if "path_b64" in d]
    assert len(bad) == 1 and base64.b64decode(bad[0]["path_b64"]) == b"bad\xff\xfe"
    assert bad[0]["path"] == "bad\ufffd\ufffd"
    d = by_path["new\nline"]
    assert set(d) == {"path", "kind", "size", "atime", "touched"}
    assert (d["kind"], d["size"], d["touched"]) == ("file", ODD_NAMES.index(b"new\nline") + 1,
                                                    False)
    assert d["atime"] == sk.iso(odd["spec"][b"new\nline"][1])
    assert by_path["run"]["kind"] == "dir" and by_path["alink"]["kind"] == "symlink"
    assert "." not in by_path and "" not in by_path
    api = list(sk.files("ds", state_dir=str(odd["state"])))
    assert api == docs and "files" in sk.__all__


def test_touched_entries_are_not_at_risk(cli, generic):
    """In touch mode the walk set the old entries' atimes: they are in the manifest (with
    the atime found and touched: true) but no longer at risk or older than anything."""
    root = generic["scratch"] / "t"
    build(root, {b"old": (b"o", OLD), b"recent": (b"r", RECENT)})
    assert cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0
    set_atime(str(root), RECENT)
    res = refresh(cli)
    assert res["mode"] == "touch" and res["entries_touched"] == 2, res   # old, sentinel
    docs = [json.loads(x) for x in cli("files", "--name", "ds", "--json").out.splitlines()]
    old = [d for d in docs if d["path"] == "old"][0]
    assert old["touched"] is True and old["atime"] == sk.iso(OLD)
    for flag in ("--at-risk", "--purge-eligible"):
        r = cli("files", "--name", "ds", flag)
        assert (r.rc, r.out) == (0, ""), r
    assert cli("files", "--name", "ds", "--older-than", "5").out == ""
    assert "the touch walk started" in r.err


@pytest.mark.parametrize("engine", [["--workers", "1", "--threads", "1"],
                                    ["--workers", "2"], ["--threads", "4", "--workers", "1"]])
def test_touch_mode_records_each_kind_and_whether_it_was_touched(cli, generic, engine):
    """A touch walk's manifest says, entry by entry, what each entry is and whether this
    walk touched it: every kind old (touched) and recent (not), on every engine, with more
    entries than one batch holds."""
    root = generic["scratch"] / "t"
    spec = {}
    for age, when in ((b"old", OLD), (b"recent", RECENT)):
        spec[age + b"-dir"] = ("dir", when)
        spec[age + b"-dir/inner"] = (b"i", when)
        spec[age + b"-link"] = ("link", when)
        for i in range(sk.BATCH + 3):
            spec[age + b"-%04d" % i] = (b"x" * (i % 7), when)
    build(root, spec)
    assert cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0
    set_atime(str(root), RECENT)
    res = refresh(cli, *engine)
    old = sum(1 for k in spec if k.startswith(b"old"))
    assert res["entries_touched"] == old + 1, res       # and the sentinel
    docs = [json.loads(x) for x in cli("files", "--name", "ds", "--json").out.splitlines()]
    got = dict((os.fsencode(d["path"]), (d["kind"], d["touched"], d["size"])) for d in docs)
    kinds = {"dir": "dir", "link": "symlink"}
    for rel, (what, _) in spec.items():
        size = os.lstat(os.path.join(os.fsencode(str(root)), rel)).st_size
        assert got.pop(rel) == (kinds.get(what, "file"), rel.startswith(b"old"), size), rel
    assert got == {}, got           # nothing else (files leaves out the sentinel)


# --------------------------------------------------------------------------- files: errors


def test_files_errors_are_one_line_with_their_exit_code_and_change_nothing(cli, generic, env):
    root = generic["scratch"] / "ds"
    build(root, {b"f": (b"x", OLD)})
    assert cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0
    before = state_bytes(env["state"])
    assert_error(cli("files", "--name", "ds"), 1, "no complete walk of 'ds' has left a "
                 "manifest yet", "`scratch-keepalive refresh --name ds`", quiet=True)
    assert state_bytes(env["state"]) == before
    refresh(cli, "--check")
    before = state_bytes(env["state"])
    cases = [
        (("--name", "nope"), 2, "no dataset named 'nope'", "`scratch-keepalive list`"),
        (("--name", "bad name!"), 2, "invalid dataset name"),
        (("--name", "ds", "--vanished"), 1, "only one complete walk of 'ds'",
         "`scratch-keepalive refresh --name ds`"),
        (("--name", "ds", "--older-than", "x"), 2, "argument --older-than: 'x' is not a "
         "number of days"),
        (("--name", "ds", "--older-than=-1"), 2, "'-1' is not a number of days"),
        # -0 is an option, so argparse takes a bare -1 for one too
        (("--name", "ds", "--older-than", "-1"), 2, "--older-than: expected one argument"),
        (("--name", "ds", "--older-than", "nan"), 2, "'nan' is not a number of days"),
        (("--name", "ds", "--at-risk", "--purge-eligible"), 2, "argument --purge-eligible: "
         "not allowed with argument --at-risk"),
        (("--name", "ds", "--vanished", "--at-risk"), 2, "not allowed with argument"),
        (("--name", "ds", "-0", "--json"), 2, "argument --json: not allowed with argument "
         "-0/--null"),
        (("--name", "ds", "--bogus"), 2, "unrecognized arguments: --bogus"),
    ]
    for argv, rc, *words in cases:
        assert_error(cli("files", *argv), rc, *words, quiet=True)
        assert state_bytes(env["state"]) == before, argv


def test_files_errors_of_the_api_come_before_the_first_entry(generic, cli):
    state = str(generic["state"])
    with pytest.raises(sk.UsageError, match="no dataset named 'nope'"):
        sk.files("nope", state_dir=state)
    root = generic["scratch"] / "ds"
    build(root, {b"f": (b"x", OLD)})
    assert cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0
    with pytest.raises(sk.Failure, match="no complete walk") as e:
        sk.files("ds", state_dir=state)
    assert e.value.exit_code == 1
    set_atime(str(root), RECENT)
    refresh(cli, "--check")
    with pytest.raises(sk.UsageError, match="unknown kind of file list 'risky'"):
        sk.files("ds", kind="risky", state_dir=state)
    with pytest.raises(sk.UsageError, match="not a number of days"):
        sk.files("ds", older_than=-3, state_dir=state)
    with pytest.raises(sk.Failure, match="only one complete walk"):
        sk.files("ds", kind="vanished", state_dir=state)
    assert [d["path"] for d in sk.files("ds", kind="at_risk", older_than=31,
                                        state_dir=state)] == ["f"]
    set_atime(str(root), OLD)
    refresh(cli, "--check")
    assert [d["path"] for d in sk.files("ds", older_than=31, state_dir=state)] == ["f"]


def test_a_damaged_manifest_is_one_line_exit_1(cli, generic, env):
    root = generic["scratch"] / "ds"
    build(root, {b"f": (b"x", OLD)})
    assert cli("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0
    refresh(cli, "--check")
    (_, path), = sk.Store(str(env["state"])).manifests("ds")
    with open(path, "r+b") as f:
        f.seek(len(sk.MANIFEST_MAGIC))          # its header: not JSON any more
        f.write(b"garbage" * 4)
    assert_error(cli("files", "--name", "ds"), 1, "is damaged", quiet=True)


# --------------------------------------------------------------------------- files: streams


def big_tree(root, n):
    """n empty files, 1,000 per directory."""
    root = os.fsencode(str(root))
    os.mkdir(root)
    for i in range(n):
        if i % 1000 == 0:
            d = os.path.join(root, b"d%04d" % (i // 1000))
            os.mkdir(d)
        os.close(os.open(os.path.join(d, b"file-with-a-longish-name-%07d" % i),
                         os.O_CREAT | os.O_WRONLY, 0o644))


# ru_maxrss of a child counts the memory of the process it was forked from (Linux keeps
# the high-water mark across fork and exec): the tool is started from a small interpreter
# with posix_spawn, never straight from pytest (~50 MB).
RSS_HELPER = r"""
import os, sys
pid = os.posix_spawn(sys.executable, [sys.executable] + sys.argv[1:], os.environ,
                     file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
_, status, usage = os.wait4(pid, 0)
print(os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1, usage.ru_maxrss)
"""


def peak_rss_kb(argv):
    """Peak RSS (KiB) of `python3 ARGV`, its output thrown away."""
    p = subprocess.run([sys.executable, "-c", RSS_HELPER] + [str(a) for a in argv],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    assert p.returncode == 0, p
    rc, rss = p.stdout.split()
    assert rc == b"0", p
    return int(rss)


def test_files_streams_memory_stays_flat_from_20k_to_200k_entries(shm_tmp, monkeypatch):
    """A list is never built in memory: the peak RSS of `files` (text, -0, --json, and
    --vanished, which merges two manifests) on a 200,000-entry dataset is within 4 MiB of
    that on a 20,000-entry one (measured: 1.1 to 2.0 MiB more; 800,000 entries take no
    more than 200,000)."""
    scratch, state = shm_tmp / "scratch", shm_tmp / "state"
    scratch.mkdir()
    monkeypatch.setenv("SCRATCH_KEEPALIVE_HOME", str(state))
    big_tree(scratch / "small", 20000)
    big_tree(scratch / "large", 200000)
    assert run_script("init", "--profile", "generic", "--scratch-root", scratch).rc == 0
    for name in ("small", "large"):
        assert run_script("add", "--name", name, "--path", scratch / name,
                          "--keep-until", KEEP).rc == 0
        r = run_script("refresh", "--name", name, "--check")
        assert r.rc == 0, r
    for name in ("small", "large"):         # a second walk: --vanished merges two
        os.unlink(str(scratch / name / "d0001" / "file-with-a-longish-name-0001000"))
        assert run_script("refresh", "--name", name, "--check").rc == 0
    for form in ([], ["-0"], ["--json"], ["--vanished", "--json"]):
        rss = dict((name, peak_rss_kb([SCRIPT, "files", "--name", name] + form))
                   for name in ("small", "large"))
        assert rss["large"] - rss["small"] < 4096, (form, rss)


def test_a_manifest_adds_little_to_a_walks_peak_memory(shm_tmp, monkeypatch):
    """Writing the manifest (records, zlib on its thread, the keys' digest) costs a walk of
    20,000 entries less than 1.5 MiB of peak RSS over the same walk with --no-manifest
    (measured: 0.8 to 1.1 MiB with chunks of 4,096 entries, 1.4 to 1.5 with 8,192;
    hashlib's OpenSSL would add 3.7 more). The tool runs as its scheduled job does, from its bytecode, so that
    compiling the file does not set the peak."""
    scratch, state = shm_tmp / "scratch", shm_tmp / "state"
    scratch.mkdir()
    copy = shm_tmp / "bin" / "scratch_keepalive.py"
    copy.parent.mkdir()
    shutil.copy(str(SCRIPT), str(copy))
    monkeypatch.setenv("SCRATCH_KEEPALIVE_HOME", str(state))
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    tool = ["-c", sk.LOADER, copy]
    big_tree(scratch / "ds", 20000)
    assert run_script("init", "--profile", "generic", "--scratch-root", scratch).rc == 0
    assert run_script("add", "--name", "ds", "--path", scratch / "ds",
                      "--keep-until", KEEP).rc == 0
    peak_rss_kb(tool + ["--version"])           # writes the bytecode
    assert list((copy.parent / "__pycache__").glob("*.pyc"))
    rss = {}
    # Each three times, the least: a run's peak varies with when the threads' buffers
    # happen to be alive at once (one run in a CI suite measured 1.55 MiB).
    for form in (["--no-manifest"], []) * 3:
        kb = peak_rss_kb(tool + ["refresh", "--name", "ds", "--check"] + form)
        rss[bool(form)] = min(kb, rss.get(bool(form), kb))
    assert list((state / "manifests" / "ds").glob("manifest-*.skm"))
    assert rss[False] - rss[True] < 1536, rss


def test_files_into_a_closed_pipe_ends_quietly(shm_tmp, monkeypatch):
    """`files | head -c 100`: the reader goes away mid-list; the command ends with 141 and
    nothing on stderr but its header line."""
    scratch = shm_tmp / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("SCRATCH_KEEPALIVE_HOME", str(shm_tmp / "state"))
    big_tree(scratch / "ds", 20000)
    assert run_script("init", "--profile", "generic", "--scratch-root", scratch).rc == 0
    assert run_script("add", "--name", "ds", "--path", scratch / "ds", "--keep-until",
                      KEEP).rc == 0
    assert run_script("refresh", "--name", "ds", "--check").rc == 0
    for form in ([], ["-0"], ["--json"]):
        p = subprocess.run(["bash", "-c", '"$@" | head -c 100 >/dev/null; exit "${PIPESTATUS[0]}"',
                            "sh", sys.executable, str(SCRIPT), "files", "--name", "ds"] + form,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        err = p.stderr.decode()
        assert p.returncode == 141, (form, err)
        assert err.count("\n") == 1 and err.startswith("scratch-keepalive: ds: entries as "
                                                       "of"), (form, err)


# --------------------------------------------------------------------------- rsync and tar


def readme_block(marker):
    text = (REPO / "README.md").read_text()
    m = re.search(re.escape(marker) + r"\s*```sh\n(.*?)```", text, re.S)
    assert m, "no ```sh block after %r in README.md" % marker
    return m.group(1)


def rsync_version():
    exe = shutil.which("rsync")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], stdout=subprocess.PIPE).stdout.decode()
    m = re.search(r"version\s+(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


def reads_move_atimes(d):
    """True when reading a file with an old atime moves it here (relatime or strictatime):
    what makes "no atime moved" mean something."""
    p = os.path.join(str(d), "atime-probe")
    with open(p, "wb") as f:
        f.write(b"probe")
    old = time.time() - 3 * DAY
    set_atime(p, old)
    with open(p, "rb") as f:
        f.read()
    moved = os.lstat(p).st_atime_ns != int(old) * 10 ** 9
    os.unlink(p)
    return moved


RESCUE_AGES = {   # path: (kind, age in days)
    b"old file": (b"o" * 10, 20),
    b"recent file": (b"r" * 11, 1),
    b"-leading-dash": (b"d" * 12, 40),
    b"new\nline": (b"n" * 13, 20),
    b"tab\tand space ": (b"t" * 14, 40),
    b"bad\xff\xfeutf8": (b"b" * 15, 20),
    b"q\"uote\\back": (b"q" * 16, 1),
    b"alink": ("link", 40),
    b"old dir": ("dir", 40),                   # at risk, its contents recent
    b"old dir/recent inside": (b"i" * 17, 1),
    b"young dir": ("dir", 1),              # not at risk, some contents are
    b"young dir/old inside": (b"j" * 18, 40),
    b"young dir/recent inside": (b"k" * 19, 1),
    b"young dir/deep": ("dir", 1),
    b"young dir/deep/-x\n\xff": (b"l" * 20, 20),
    b"run": ("dir", 20),
    b"run/x": (b"m" * 21, 20),
    b"run-2.txt": (b"p" * 22, 20),
}


def at_risk_dataset(cli, root, monkeypatch):
    """RESCUE_AGES built under `root` and checked, the policy clock at today, so that every
    atime lies in the real past (the kernel never moves an atime that lies in the future,
    which would make "unchanged" vacuous). Returns (spec, the at-risk paths in the walk's
    order, as `files --at-risk -0` lists them)."""
    today = int(time.time()) // DAY * DAY
    monkeypatch.setenv("SCRATCH_KEEPALIVE_NOW", sk.iso(today))
    spec = dict((p, (kind, today - days * DAY)) for p, (kind, days) in RESCUE_AGES.items())
    build(root, spec)
    assert cli("add", "--name", "genomes", "--path", root, "--keep-until",
               sk.utc_date(today + 30 * DAY).isoformat()).rc == 0
    set_atime(str(root), today - 20 * DAY)      # the root is at risk too: never listed
    set_atime(str(root / ".scratch-keepalive"), today - DAY)
    r = cli("refresh", "--name", "genomes", "--check", "--json")
    assert r.rc == 0, r
    cutoff = today - 13 * DAY
    at_risk = [p for p in walk_order(os.fsencode(str(root)))
               if p in spec and spec[p][1] < cutoff]
    assert r.json()["results"][0]["entries_at_risk"] == len(at_risk) + 1   # and the root
    listed = cli("files", "--name", "genomes", "--at-risk", "-0").out
    assert [os.fsencode(p) for p in listed.split("\0")[:-1]] == at_risk
    assert reads_move_atimes(root), "reads do not move atimes here: the test proves nothing"
    return spec, at_risk


def run_readme_block(marker, root, dest):
    """The README's block run as printed, with ROOT and DEST set to root and dest (the
    block's own lines for them replaced; set first for a block that only uses them, as the
    README's later blocks use those of its first) and the command's path; its stdout."""
    block = readme_block(marker)
    for name, value in (("DEST", dest), ("ROOT", root)):
        line = "%s=%s" % (name, sk.shell_quote(str(value)))
        block, n = re.subn(r"(?m)^%s=\S+" % name, line, block)
        assert n <= 1, block
        block = block if n else line + "\n" + block
    block = re.sub(r"(?m)^scratch-keepalive ", "%s %s " % (
        sk.shell_quote(sys.executable), sk.shell_quote(str(SCRIPT))), block)
    r = run_command(["bash", "-euo", "pipefail", "-c", block])
    assert r.rc == 0, r
    return r.out


def moved_entries(before, after):
    """The entries whose atime, mtime, size or mode changed; a symlink's own atime apart,
    every other field of it must hold."""
    moved = sorted(p for p in before if before[p] != after[p])
    if "alink" in moved:
        assert after["alink"][1:] == before["alink"][1:]
    return moved


def test_readme_tar_archives_exactly_the_at_risk_entries_and_moves_no_atime(
        cli, generic, tmp_path, monkeypatch):
    """The README's tar block: `files --at-risk -0 | tar --atime-preserve=system --null
    --no-recursion` archives exactly the at-risk entries, odd names included, in the
    walk's order and nothing from inside a listed directory; no atime in the dataset moves
    but a symlink's, which readlink(2) moves whatever the flags."""
    if shutil.which("tar") is None:
        pytest.skip("tar is not installed")
    root = generic["scratch"] / "genomes"
    spec, at_risk = at_risk_dataset(cli, root, monkeypatch)
    dest = tmp_path / "safe" / "genomes-at-risk"
    dest.parent.mkdir()
    before = snapshot(root)
    run_readme_block("<!-- test: files tar -->", root, dest)
    assert moved_entries(before, snapshot(root)) == ["alink"]
    with tarfile.open(str(dest) + ".tar") as tf:
        members = tf.getmembers()
        assert [os.fsencode(m.name).rstrip(b"/") for m in members] == at_risk
        for m in members:
            kind = spec[os.fsencode(m.name).rstrip(b"/")][0]
            assert (m.isdir(), m.issym()) == (kind == "dir", kind == "link"), m.name
            if kind not in ("dir", "link"):
                assert tf.extractfile(m).read() == kind, m.name


def test_readme_rsync_probe_is_right_and_rsync_copies_exactly_the_at_risk_entries(
        cli, generic, tmp_path, monkeypatch):
    """The README's rsync probe, then its rsync block, both as printed, against the rsync
    installed here: the probe's answer must be what the copy then does to the dataset's
    atimes (keeps: none moves but a symlink's; MOVES: every at-risk file's moved, as the
    README says), and either way the copy holds exactly the at-risk entries and the
    directories that lead to them, odd names included, a listed directory never filled
    with what is not listed."""
    version = rsync_version()
    if version is None:
        pytest.skip("rsync is not installed (`apt-get install -y rsync`; .ci/run does it)")
    if version < (3, 2, 3):
        pytest.skip("rsync %d.%d.%d has no --open-noatime (3.2.3 and later)" % version)
    root = generic["scratch"] / "genomes"
    spec, at_risk = at_risk_dataset(cli, root, monkeypatch)
    dest = tmp_path / "safe" / "genomes-at-risk"
    dest.parent.mkdir()
    before = snapshot(root)
    outside = sorted(os.listdir(str(generic["scratch"])))
    answer = run_readme_block("<!-- test: rsync probe -->", root, dest).strip()
    assert answer in ("this rsync keeps atimes", "this rsync MOVES atimes: use tar"), answer
    assert snapshot(root) == before, "the probe touched the dataset"
    assert sorted(os.listdir(str(generic["scratch"]))) == outside, "the probe left a file"
    run_readme_block("<!-- test: files rsync -->", root, dest)
    moved = moved_entries(before, snapshot(root))
    files = sorted(os.fsdecode(p) for p in at_risk if spec[p][0] not in ("dir", "link"))
    if answer == "this rsync keeps atimes":
        assert moved == ["alink"], moved
    else:
        assert set(files) <= set(moved), (files, moved)

    db = os.fsencode(str(dest))
    rb = os.fsencode(str(root))
    copied = {}
    for dirpath, dirs, names in os.walk(db):
        for n in dirs + names:
            p = os.path.join(dirpath, n)
            copied[os.path.relpath(p, db)] = os.lstat(p)
    risky = set(at_risk)
    leading = set()             # every directory above an at-risk entry
    for p in risky:
        while os.path.dirname(p):
            p = os.path.dirname(p)
            leading.add(p)
    assert set(p for p, st in copied.items() if not stat.S_ISDIR(st.st_mode)) == \
        set(p for p in risky if spec[p][0] != "dir")
    assert set(p for p, st in copied.items() if stat.S_ISDIR(st.st_mode)) == \
        set(p for p in risky if spec[p][0] == "dir") | leading
    for p in risky:
        src, dst = os.path.join(rb, p), os.path.join(db, p)
        kind = spec[p][0]
        if kind == "link":
            assert os.readlink(dst) == os.readlink(src) and stat.S_ISLNK(copied[p].st_mode)
        elif kind != "dir":
            with open(dst, "rb") as f:
                assert f.read() == kind
            assert copied[p].st_mtime_ns == os.lstat(src).st_mtime_ns      # rsync -a
    assert b"old dir/recent inside" not in copied and b"young dir/old inside" in copied


FAKE_RSYNC = """#!%s
# rsync -a --open-noatime SRC DST, as an rsync that does (or does not) honour the flag
import os, shutil, sys
fd = os.open(sys.argv[-2], os.O_RDONLY | %s)
with os.fdopen(fd, "rb") as src, open(sys.argv[-1], "wb") as dst:
    shutil.copyfileobj(src, dst)
"""


@pytest.mark.parametrize("flags,answer", [
    ("os.O_NOATIME", "this rsync keeps atimes"),
    ("0", "this rsync MOVES atimes: use tar")])
def test_readme_rsync_probe_tells_a_keeping_rsync_from_a_moving_one(
        generic, tmp_path, monkeypatch, flags, answer):
    """The probe's two answers, whatever rsync is installed here: with an `rsync` on PATH
    that opens its source with O_NOATIME it says keeps, with one that does not, MOVES.
    (The real rsync's answer is checked against what it does, above.)"""
    root = generic["scratch"] / "genomes"
    root.mkdir()
    assert reads_move_atimes(root), "reads do not move atimes here: the test proves nothing"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "rsync"
    fake.write_text(FAKE_RSYNC % (sys.executable, flags))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", "%s%s%s" % (bin_dir, os.pathsep, os.environ["PATH"]))
    outside = sorted(os.listdir(str(generic["scratch"])))
    assert run_readme_block("<!-- test: rsync probe -->", root, tmp_path / "d").strip() == \
        answer
    assert sorted(os.listdir(str(generic["scratch"]))) == outside


# --------------------------------------------------------------------------- purge forensics


PURGE_SPEC = {          # path: (contents, "dir" or "link"; atime), before the purge
    b"keep": ("dir", RECENT),
    b"keep/a": (b"a" * 3, RECENT),
    b"old1": (b"o" * 10, OLD),
    b"new1": (b"n" * 7, RECENT),
    b"risky1": (b"r" * 9, RISKY),
    b"odd\nname \xff": (b"d" * 8, OLD),
    b"alink": ("link", OLD),
    b"sub": ("dir", RECENT),
    b"sub/old2": (b"p" * 20, OLD),
    b"sub/stays": (b"s" * 2, OLD),
    b"gone": ("dir", OLD),
    b"gone/new3": (b"g" * 6, RECENT),
    b"gone/old3": (b"h" * 4, OLD),
    b"locked": ("dir", RECENT),
    b"locked/secret_new": (b"x" * 3, RECENT),
    b"locked/secret_old": (b"y" * 5, OLD),
}
# What a site's purge (old) and a user's cleanup (recent) delete between the two walks.
DELETED = [b"old1", b"new1", b"risky1", b"odd\nname \xff", b"alink", b"sub/old2", b"gone"]
DELETED_BELOW = [b"gone/new3", b"gone/old3"]
UNREADABLE = b"locked"           # chmod 000 after the first walk: unknown, never vanished


def test_a_purge_between_two_walks_is_reported_exactly(world_tmp):
    """Old files deleted as a site's purge would, recent ones as a user would, a directory
    made unreadable (and a file deleted inside it) between two check walks: the second
    walk's vanished and likely-purged counts and bytes are exact, `files --vanished` lists
    exactly those names with the right reasons, and nothing below the unreadable directory
    is called vanished. The tool runs as `nobody`, so that chmod 000 really denies it."""
    state, scratch, home = world_tmp / "state", world_tmp / "scratch", world_tmp / "home"
    run = run_as_nobody(home, state, need_root=False)
    root = scratch / "ds"
    home.mkdir()
    build(root, PURGE_SPEC)
    give_to_nobody(home, scratch)

    def run0(*argv):
        """Paths a -0 run prints (raw bytes: not UTF-8 text)."""
        p = subprocess.run(list(run.prefix) + [run.python, str(SCRIPT)] + list(argv) + ["-0"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=run.env,
                           timeout=120)
        assert p.returncode == 0, p
        return p.stdout.split(b"\0")[:-1]

    assert run("init", "--profile", "generic", "--scratch-root", scratch).rc == 0
    assert run("add", "--name", "ds", "--path", root, "--keep-until", KEEP).rc == 0
    set_atime(str(root), RECENT)
    r = run("refresh", "--name", "ds", "--check", "--json")
    assert r.rc == 0, r
    first = r.json()["results"][0]
    assert first["entries_vanished"] is None and "previous_walk_started" not in first, first
    assert first["manifest_note"] == sk.UNKNOWN_VANISHED["first"], first
    order = walk_order(os.fsencode(str(root)))

    rb = os.fsencode(str(root))
    for rel in DELETED:
        path = os.path.join(rb, rel)
        if PURGE_SPEC[rel][0] == "dir":
            shutil.rmtree(path)
        else:
            os.unlink(path)
    os.unlink(os.path.join(rb, b"locked/secret_old"))    # gone, but the tool cannot know
    os.chmod(os.path.join(rb, UNREADABLE), 0)
    r = run("refresh", "--name", "ds", "--check", "--json")
    assert r.rc == 1, r             # the unreadable directory is an entry error
    res = r.json()["results"][0]
    assert res["complete"] is True and res["errors"] >= 1, res

    vanished = [p for p in order if p in DELETED or p in DELETED_BELOW]
    purge_line = NOW_EPOCH - 30 * DAY

    def size(p):
        kind = PURGE_SPEC[p][0]
        return 0 if kind in ("dir", "link") else len(kind)
    purged = [p for p in vanished if PURGE_SPEC[p][1] < purge_line]
    assert len(vanished) == 9 and len(purged) == 6      # the fixture is what it says
    assert (res["entries_vanished"], res["bytes_vanished"], res["entries_likely_purged"],
            res["bytes_likely_purged"]) == (len(vanished), sum(map(size, vanished)),
                                            len(purged), sum(map(size, purged))), res
    assert (res["bytes_vanished"], res["bytes_likely_purged"]) == (64, 42)
    assert res["previous_walk_started"] == first["started"], (res, first)

    want = [(p, "likely purged" if p in purged else "deleted or moved") for p in vanished]
    r = run("files", "--name", "ds", "--vanished")
    assert r.rc == 0, r
    got = [(unquote(line.split("\t")[0]), line.split("\t")[1])
           for line in r.out.split("\n")[:-1]]
    assert got == want
    assert all(line.endswith("\tno copy") for line in r.out.split("\n")[:-1])
    assert '"odd\\nname \\377"\tlikely purged\tno copy' in r.out.split("\n")
    assert re.match(r"scratch-keepalive: ds: entries that vanished between the walks started "
                    r"\S+Z and \S+Z \(the purge found \S+Z, less than a minute ago\)\n"
                    r"\Z", r.err), r.err
    r = run("files", "--name", "ds", "--vanished", "--json")
    docs = [json.loads(x) for x in r.out.splitlines()]
    assert [(base64.b64decode(d["path_b64"]) if "path_b64" in d else d["path"].encode(),
             d["reason"]) for d in docs] == want
    assert [d["kind"] for d in docs if d["path"] in ("gone", "alink")] == ["symlink", "dir"]
    assert run0("files", "--name", "ds", "--vanished") == vanished
    assert run0("files", "--name", "ds", "--vanished", "--older-than", "30") == purged
    # the newest walk could not read locked/: what was there is unknown, not vanished
    assert not any(p.startswith(b"locked/") for p, _ in got)
    listed = run0("files", "--name", "ds")
    assert b"locked" in listed and not any(p.startswith(b"locked/") for p in listed)


# --------------------------------------------------------------------------- manifest order


def test_manifest_order_is_the_walks_on_odd_names(cli, odd, env):
    """The manifest holds every entry once, in the walk's order: depth-first, a directory's
    names in byte order (so run, run/x, then run-2.txt: component-wise, not the byte order
    of whole paths, where run-2.txt would come before run/x)."""
    (_, path), = sk.Store(str(env["state"])).manifests("ds")
    with sk.Manifest(path) as m:
        keys = [sk.key_path(k) for k, _, _, _ in m.entries()]
        assert m.trailer["entries"] == len(keys)
    want = [b"."] + walk_order(os.fsencode(str(odd["root"])))
    assert keys == want
    assert keys != [b"."] + sorted(keys[1:])        # whole-path byte order differs here
    assert keys.index(b"run/x") < keys.index(b"run-2.txt")
    assert b"dir with space/-inner\n" in keys and b"bad\xff\xfe" in keys


def test_a_manifest_survives_sigkill_mid_walk_and_resume(shm_tmp, monkeypatch, pause_shim):
    """The tool's process group killed outright twice in the middle of a check walk; the
    walk resumes with its partial manifest, and the manifest the completed walk leaves
    lists every entry exactly once, in the walk's order, under the first run's start.
    Each run is held (the pause shim) where its main process opens a directory to list it,
    a chunk or more of manifest entries past the last one's checkpoint (checkpoints every
    tick), and killed there: how fast the machine walks does not matter."""
    scratch, state = shm_tmp / "scratch", shm_tmp / "state"
    scratch.mkdir()
    monkeypatch.setenv("SCRATCH_KEEPALIVE_HOME", str(state))
    big_tree(scratch / "ds", 30000)
    assert run_script("init", "--profile", "generic", "--scratch-root", scratch).rc == 0
    assert run_script("add", "--name", "ds", "--path", scratch / "ds", "--keep-until",
                      KEEP).rc == 0
    ckpt = state / "checkpoints" / "ds.json"
    past, started = 0, None
    for held_at in ("d0010", "d0020"):
        p = start_script("refresh", "--name", "ds", "--check", "--json", "--checkpoint-every",
                         "0.000001", env=pause_env(dict(os.environ), pause_shim, "open",
                                                   scratch / "ds" / held_at))
        with reaped(p):
            wait_stopped(p, "the walk to stop before listing %s" % held_at)
            doc = json.loads(ckpt.read_text())
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
        assert p.returncode == -signal.SIGKILL
        assert doc["pid"] == p.pid and doc["manifest"]["entries"] > past, (past, doc)
        started = started or doc["walk_started"]
        assert doc["walk_started"] == started
        past = doc["manifest"]["entries"]
        assert (state / "manifests" / "ds" / "partial.skm").exists()
        assert sk.Store(str(state)).manifests("ds") == []
    r = run_script("refresh", "--name", "ds", "--check", "--json")
    assert r.rc == 0, r
    res = r.json()["results"][0]
    # its manifest taken up (no note that it resumed without one); the first one kept
    assert res["complete"] and res["resumed"] and res["manifest"], res
    assert res["manifest_note"] == sk.UNKNOWN_VANISHED["first"], res
    (_, path), = sk.Store(str(state)).manifests("ds")
    with sk.Manifest(path) as m:
        assert m.header["walk_started"] == started
        keys = [k for k, _, _, _ in m.entries()]
    want = [b""] + [k.replace(b"/", b"\0") for k in walk_order(os.fsencode(str(scratch / "ds")))]
    assert len(keys) == len(set(keys)) == 30000 + 30 + 2      # files, dirs, root, sentinel
    assert keys == want
