#!/usr/bin/env python3
"""Keep research datasets on a purged scratch filesystem alive, within the site's rules.

scratch-keepalive registers datasets that live on a purged scratch filesystem
(on IU's Big Red 200: /N/scratch/$USER, where files not accessed for 30 days
are deleted without notice), each with a keep-until date, and walks them on a
schedule. Where the site allows it, a walk refreshes access times (touch
mode: atime only; mtime and contents are never written). Where it does not,
the same walk only checks and reports what is at risk of the purge (check
mode).

Safety model:
  * IU forbids changing access times to avoid the Slate-Scratch purge. On the
    br200 profile a dataset is refreshed only if it records a site approval
    (add/extend --approval TICKET); every other dataset is only checked.
  * Contents are never opened; mtime is never written (atime is set with
    utimensat and UTIME_OMIT for mtime); symlinks are never followed; other
    filesystems are never entered; nothing is ever deleted but this tool's
    own files.
  * A walk resumes from its checkpoint after a time limit, a signal or a
    crash. Only one walk per dataset runs at a time.
  * A dataset stops being protected the day after its keep-until date.

State (config, registry, checkpoints, logs, locks, job scripts) lives outside
scratch (see "state:" below). Each dataset root also holds one small sentinel
file, .scratch-keepalive.
"""

__version__ = "1.0.0"


# ---------------------------------------------------------------- imports

import _thread
import bisect
import datetime
import errno
import fcntl
import gc
import itertools
import os
import pwd
import resource
import stat
import struct
import sys
import time
import zlib


class _LazyModule(object):
    """A standard module imported where it is first used, not with this one.

    `status --brief` runs at every login and needs none of these; importing them all took
    about as long as starting the interpreter. The first attribute looked up imports the
    module and puts it in place of this proxy, so later lookups cost nothing extra.
    WARNING: a name used while this module is imported (a base class, a default
    argument, a constant) imports its module at once: still correct, only slower.
    """

    __slots__ = ("_name",)

    def __init__(self, name):
        object.__setattr__(self, "_name", name)

    def _module(self):
        name = object.__getattribute__(self, "_name")
        module = __import__(name)       # "a.b": package a, with a.b imported (`import a.b`)
        top = name.partition(".")[0]
        if globals().get(top) is self:
            globals()[top] = module
        return module

    def __getattr__(self, attr):
        return getattr(self._module(), attr)


class _LazyPattern(object):
    """re.compile(*args), compiled where it is first used, for the reason of _LazyModule:
    the module's patterns that `status --brief` does not use took a third of its import."""

    __slots__ = ("_args", "_compiled")

    def __init__(self, *args):
        self._args, self._compiled = args, None

    def __getattr__(self, attr):
        if self._compiled is None:
            self._compiled = re.compile(*self._args)
        return getattr(self._compiled, attr)


_json = _LazyModule("_json")        # json's C scanner, for _json_loads (ImportError at use)
_sha1 = _LazyModule("_sha1")        # SHA-1 without hashlib's OpenSSL (see new_sha1)
argparse = _LazyModule("argparse")
array = _LazyModule("array")        # on 3.12+ it imports collections
base64 = _LazyModule("base64")
concurrent = _LazyModule("concurrent.futures")      # bound as `import concurrent.futures`
contextlib = _LazyModule("contextlib")
ctypes = _LazyModule("ctypes")
difflib = _LazyModule("difflib")
gzip = _LazyModule("gzip")
hashlib = _LazyModule("hashlib")
json = _LazyModule("json")          # state is read by _json_loads (no json, no re)
mmap = _LazyModule("mmap")
pickle = _LazyModule("pickle")
re = _LazyModule("re")
select = _LazyModule("select")
shlex = _LazyModule("shlex")
signal = _LazyModule("signal")
socket = _LazyModule("socket")
subprocess = _LazyModule("subprocess")
textwrap = _LazyModule("textwrap")
threading = _LazyModule("threading")
types = _LazyModule("types")        # on 3.6 it imports collections and functools


def contextmanager(func):
    """contextlib.contextmanager, with contextlib imported at the first call (it and re
    bring in collections, functools and enum: a third of `status --brief`'s time)."""
    def call(*args, **kwargs):
        return contextlib.contextmanager(func)(*args, **kwargs)
    call.__name__, call.__doc__, call.__wrapped__ = func.__name__, func.__doc__, func
    return call


__all__ = [
    "main", "Failure", "UsageError", "BusyError", "StateError",
    "init", "add_dataset", "list_datasets", "status", "brief", "refresh",
    "extend", "set_enabled", "remove_dataset", "doctor", "repair",
    "install_cron", "uninstall_cron", "files", "rescue",
    "__version__",
]


# ---------------------------------------------------------------- constants

PROG = "scratch-keepalive"
FORMAT = 1                      # format version of every JSON state file
SENTINEL = ".scratch-keepalive"
SENTINEL_SETTINGS = ("keep_until", "cadence_days", "approval", "rescue_to")  # for a rebuild
JOB_NAME = "scratch-keepalive"
NAME_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
NAME_CHARS = NAME_FIRST | frozenset("._-")


def valid_name(name):
    """A dataset name: 1-64 of letters, digits, '.', '_', '-' (ASCII), not starting with
    one of the last three (what `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}` matching the whole name
    says, without importing re)."""
    return (isinstance(name, str) and 0 < len(name) <= 64 and name[0] in NAME_FIRST
            and all(c in NAME_CHARS for c in name))


# install-cron --mail-user: one '@', no space, quote, '#' or shell character, so that the
# address stays one word on an #SCRON line (split at spaces), in an #SBATCH line and in a
# shell; no leading '-' (an option to sbatch).
# WARNING: \Z, not $: "$" also matches before a trailing newline ("evil\n" would pass).
MAIL_RE = _LazyPattern(r"^[A-Za-z0-9_+][A-Za-z0-9._+-]{0,63}@"
                       r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\Z")
DAY = 86400
# A write failed because the disk or the user's quota is full.
FULL_ERRNOS = tuple(getattr(errno, n) for n in ("ENOSPC", "EDQUOT") if hasattr(errno, n))
TIME_MIN = 0.0                  # the instants this tool computes with: 1970 to 8999
TIME_MAX = 221845392000.0       # calendar.timegm((9000, 1, 1, 0, 0, 0))

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3
EXIT_BUSY = 4
EXIT_INTERRUPTED = 130
EXIT_PIPE = 141         # 128 + SIGPIPE: what a shell reports for git in `git log | head -1`
# With several datasets, the command's exit code is the first of these that
# any of them produced.
EXIT_PRIORITY = (EXIT_INTERRUPTED, EXIT_FAIL, EXIT_STOPPED, EXIT_BUSY, EXIT_OK)

PROFILES = {
    "br200": {
        "scratch_root": "/N/scratch/{user}",
        "purge_days": 30,
        "purge_days_fixed": True,
        "min_cadence": 14,
        "default_cadence": 14,
        "touch_allowed": False,
        "partition": "general",
        "cpus": 1,
        "mem": "2G",
        "time": "2:00:00",
        "account_required": True,
        "login_node_budget": 900,   # IU kills login-node processes at 20 CPU minutes
    },
    "generic": {
        "scratch_root": None,
        "purge_days": 30,
        "purge_days_fixed": False,
        "min_cadence": 1,
        "default_cadence": 14,
        "touch_allowed": True,
        "partition": None,
        "cpus": 1,
        "mem": "2G",
        "time": "2:00:00",
        "account_required": False,
        "login_node_budget": None,
    },
}
DEFAULT_PROFILE = "br200"

POLICY_BR200 = (
    "IU's Slate-Scratch terms forbid changing access times to avoid the purge "
    "(doing so can cost you scratch access). On br200 a dataset is refreshed only "
    "when it records a site approval (--approval TICKET); every other dataset is "
    "only checked, and the check tells you what to copy to Slate or Slate-Project.")

CHECKPOINT_SECONDS = 30.0       # a checkpoint at least this often during a walk
PROGRESS_SECONDS = 0.5
MAX_OPEN_DIRS = 64              # directory fds kept open; deeper ones reopen via ".."
RESCUE_SELECTIONS = ("at-risk", "all", "skip")   # skip: what could age out (scheduled)
MAX_LOGGED_ERRORS = 100
KEEP_LOGS = 20
BATCH = 256                     # entries stat'ed per batch (and per budget check)
# Parallel walk messages: a batch is at most BATCH names of at most 255 bytes; a reply
# carries at most MAX_LOGGED_ERRORS names. Both fit, with pickle's overhead.
BATCH_MESSAGE_MAX = 1 << 17
REPLY_MESSAGE_MAX = 1 << 16
MAX_SEGMENTS = 16               # directories (fds) per parallel batch
THREAD_BATCH = 32               # entries per batch for threads: spread latency-bound work
STOP_POLL_SECONDS = 0.2         # how often a wait for a worker process looks for a stop
LIST_CHUNK = 4096               # directory entries encoded at a time
# Why a walk's result says nothing of what vanished (its counts null), where nothing is
# wrong: these go in the JSON's manifest_note, not in the text's summary line.
UNKNOWN_VANISHED = {
    "dry-run": "a dry run compares no manifests: what vanished is not known",
    "off": "manifests are off for this dataset or walk: what vanished is not known",
    "first": "no earlier complete walk left a manifest: what vanished is known after the "
             "next complete walk",
    "incomplete": "the walk is not complete: what vanished is known once it is"}
# What a walk found vanished since the walk before (see forensics()).
FORENSICS_ZERO = {"entries_vanished": 0, "bytes_vanished": 0, "entries_likely_purged": 0,
                  "bytes_likely_purged": 0}
_SCHEDULE_LOCKS = set()         # schedule lock paths this process holds
SCHEDULE_LOCK_WAIT = 120        # seconds a schedule change waits for another one

# Linux utimensat(2) constants.
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
AT_SYMLINK_NOFOLLOW = 0x100

O_NOATIME = getattr(os, "O_NOATIME", 0)
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_PATH = getattr(os, "O_PATH", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
O_DIR_FLAGS = os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC


# ---------------------------------------------------------------- errors


class Failure(Exception):
    """Every error the tool reports. main() prints it as one line and returns exit_code.

    The message says what went wrong and what to do about it.
    """
    exit_code = EXIT_FAIL


class UsageError(Failure):
    """Bad input: nothing was changed (exit 2)."""
    exit_code = EXIT_USAGE


class BusyError(Failure):
    """Another process holds the dataset's lock (exit 4)."""
    exit_code = EXIT_BUSY


class StateError(Failure):
    """A state file cannot be read; `repair` mends it (exit 1)."""


class DiskFullError(Failure, OSError):
    """A write failed because the disk or the quota is full; the message names the file.

    Still an OSError with its errno, so that code which tolerates a failed write (a record
    that is only informative) keeps tolerating it.
    """

    def __init__(self, code, message, filename=None):
        OSError.__init__(self, code, message, filename)

    def __str__(self):
        return self.strerror


class _ParserExit(Exception):
    """argparse wanted to exit (after --help or --version)."""

    def __init__(self, status):
        Exception.__init__(self, status)
        self.status = status


# ---------------------------------------------------------------- small helpers


def iso(t):
    """Epoch seconds -> 'YYYY-MM-DDTHH:MM:SSZ' (UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _digits(text, n=None):
    """text is ASCII digits only (n of them); str.isdigit also takes '²' and others."""
    return bool(text) and (n is None or len(text) == n) and all(c in "0123456789"
                                                                for c in text)


def _iso_parts(text):
    """'YYYY-MM-DD[(T| )HH:MM[:SS[.fff]][Z|+HH:MM|+HHMM]]' -> (y, mo, d, hh, mm, ss, tz)
    as text (hh, mm, ss None when absent; tz None), or None (what a regex would say, without
    importing re)."""
    date, rest = text[:10], text[10:]
    if not (_digits(date[:4], 4) and date[4:5] == "-" and _digits(date[5:7], 2) and
            date[7:8] == "-" and _digits(date[8:], 2)):
        return None
    if not rest:
        return date[:4], date[5:7], date[8:], None, None, None, None
    if rest[0] not in "T " or rest[3:4] != ":" or not (_digits(rest[1:3], 2) and
                                                        _digits(rest[4:6], 2)):
        return None
    hh, mm, ss, rest = rest[1:3], rest[4:6], None, rest[6:]
    if rest[:1] == ":" and _digits(rest[1:3], 2):
        ss, rest = rest[1:3], rest[3:]
        if rest[:1] == ".":
            i = len(rest) - len(rest[1:].lstrip("0123456789"))     # "." and its digits
            if i == 1:
                return None
            rest = rest[i:]
    tz = rest or None
    if tz and tz != "Z" and not (tz[0] in "+-" and (
            _digits(tz[1:], 4) or (tz[3:4] == ":" and _digits(tz[1:3] + tz[4:], 4)))):
        return None
    return date[:4], date[5:7], date[8:], hh, mm, ss, tz


def parse_iso(text):
    """'2026-08-01T03:00:00Z' (or a date, or an offset) -> epoch seconds; None if not valid."""
    parts = _iso_parts(text.strip())
    if parts is None:
        return None
    y, mo, d, hh, mm, ss, tz = parts
    try:
        dt = datetime.datetime(int(y), int(mo), int(d), int(hh or 0), int(mm or 0), int(ss or 0))
    except ValueError:
        return None
    since = dt - datetime.datetime(1970, 1, 1)     # calendar.timegm, without importing calendar
    t = since.days * DAY + since.seconds
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        t -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return float(t)


def parse_date(text):
    """'YYYY-MM-DD' -> datetime.date, or None when it is not a real date."""
    # not strptime: its first call costs the login line (status --brief) ~2 ms
    t = parse_iso(text) if isinstance(text, str) and len(text) == 10 else None
    return None if t is None else utc_date(t)


def utc_date(t):
    """The UTC calendar date of epoch seconds t."""
    return datetime.date(1970, 1, 1) + datetime.timedelta(days=int(t // DAY))


def policy_now(env):
    """The instant every policy decision uses: SCRATCH_KEEPALIVE_NOW, else the clock."""
    text = env.get("SCRATCH_KEEPALIVE_NOW")
    if not text:
        return time.time()
    t = parse_iso(text)
    if t is None or not TIME_MIN <= t < TIME_MAX:
        why = "is not an ISO-8601 time" if t is None else "lies outside the years 1970 to 8999"
        raise UsageError("SCRATCH_KEEPALIVE_NOW=%r %s; use e.g. 2026-08-01T03:00:00Z, or unset "
                         "it" % (text, why))
    return t


def human_count(n):
    return "{:,}".format(n)


def plural(n, word, words=None):
    """'1 error', '2 errors', '1,024 entries': the count and the word it takes."""
    return "%s %s" % (human_count(n), word if n == 1 else (words or word + "s"))


def _ident(st):
    """What names a file whatever its name: (st_dev, st_ino)."""
    return st.st_dev, st.st_ino


def _lstat_mode(name, dir_fd):
    """name's st_mode (not following a symlink), 0 when it cannot be had."""
    try:
        return os.lstat(name, dir_fd=dir_fd).st_mode
    except OSError:
        return 0


def random_token(n):
    """n random characters of [a-z0-9]."""
    return "".join("abcdefghijklmnopqrstuvwxyz0123456789"[b % 36] for b in os.urandom(n))


def human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0


def encode_name(name):
    """A file name (bytes) -> a str that JSON can hold and decode_name() reverses exactly."""
    return name.decode("utf-8", "surrogateescape")


def decode_name(text):
    return text.encode("utf-8", "surrogateescape")


def display_path(path):
    """A path for messages: undecodable bytes and control characters shown escaped."""
    if isinstance(path, bytes):
        path = path.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in path)


def is_below(path, root):
    """True when path lies strictly below root (both real, absolute)."""
    root = root.rstrip("/") or "/"
    prefix = root if root == "/" else root + "/"
    return path != root and path.startswith(prefix)


def overlaps(a, b):
    return a == b or is_below(a, b) or is_below(b, a)


def current_user(env):
    user = env.get("USER") or env.get("LOGNAME")
    if user:
        return user
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def default_state_dir(env):
    if env.get("SCRATCH_KEEPALIVE_HOME"):
        return env["SCRATCH_KEEPALIVE_HOME"]
    if env.get("XDG_STATE_HOME"):
        return os.path.join(env["XDG_STATE_HOME"], "scratch-keepalive")
    home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".local", "state", "scratch-keepalive")


def combine_exit_codes(codes):
    codes = set(codes)
    for code in EXIT_PRIORITY:
        if code in codes:
            return code
    return EXIT_OK


def check_name(name):
    if not valid_name(name):
        raise UsageError("invalid dataset name %r; use 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit" % (name,))
    return name


# ---------------------------------------------------------------- state: files


def atomic_write(path, data, mode=0o600):
    """Write bytes to path so that a crash leaves the old file or the new one, never a mix.

    Temp file in the same directory (.NAME.PID.XXXXXXXX.tmp), created O_EXCL|O_NOFOLLOW
    through a descriptor of the directory held from start to end, flush, fsync,
    os.replace within that directory, fsync it; then the temp files that killed writes of
    NAME left behind go. Nothing is ever written through a link: the temp file is new, and
    the rename replaces whatever sits at NAME (a symlink itself, not what it points to).
    """
    directory = os.path.dirname(path) or "."
    base = os.path.basename(path)
    dfd = os.open(directory, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    try:
        _atomic_write_at(dfd, path, base, data, mode)
        with contextlib.suppress(OSError):
            os.fsync(dfd)
    finally:
        os.close(dfd)
    for stale in stale_temps(directory, base):
        with contextlib.suppress(OSError):
            os.unlink(stale)


def _atomic_write_at(dfd, path, base, data, mode):
    """atomic_write()'s steps inside the directory dfd."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC
    for _ in range(100):
        tmp = ".%s.%d.%s.tmp" % (base, os.getpid(), random_token(8))
        try:
            fd = os.open(tmp, flags, mode, dir_fd=dfd)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise_if_full(e, path)
            raise
    else:
        raise Failure("cannot create a temp file beside %s; run `%s repair`" % (path, PROG))
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, base, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise_if_full(e, path)
        if isinstance(e, OSError) and e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
            raise StateError("cannot replace %s: a directory sits where that state file "
                             "belongs; run `%s repair` (it sets it aside)"
                             % (display_path(path), PROG)) from None
        raise


# atomic_write's temp files; older ones have no pid in their names.
_TEMP_RE = _LazyPattern(r"^\.(.+?)\.(?:(\d{1,10})\.)?[a-z0-9_]{8}\.tmp$")
TEMP_STALE_SECONDS = 60


def stale_temps(directory, base=None):
    """Temp files of atomic writes (of file `base`, or any) that were killed: older than a
    minute and, where the name records it, of a process that is gone. A live writer's temp
    file is never among them (its pid lives; on another host sharing the directory, it has
    been writing for a minute)."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for n in names:
        m = _TEMP_RE.match(n)
        if not m or (base is not None and m.group(1) != base):
            continue
        p = os.path.join(directory, n)
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or time.time() - st.st_mtime < TEMP_STALE_SECONDS:
            continue
        if m.group(2) and int(m.group(2)) < 2 ** 31 and _pid_alive(int(m.group(2))):
            continue
        found.append(p)
    return found


def raise_if_full(e, path):
    """A write to path failed with e: when the disk or the quota is full, say so and name it.

    (The OSError of a failed write() names no file, and permissions are not the problem.)
    """
    if isinstance(e, OSError) and e.errno in FULL_ERRNOS and not isinstance(e, DiskFullError):
        raise DiskFullError(e.errno, full_message(e, path), path) from None


def full_message(e, path=None):
    where = display_path(path) if path else "the state directory or the dataset"
    return ("cannot write %s: the disk or quota is full (%s); free some space there (see "
            "`df -h` and `quota`), or use another state directory (--state-dir)"
            % (where, e.strerror))


def dump_json(obj):
    return (json.dumps(obj, sort_keys=True, indent=2) + "\n").encode("ascii")


class UnreadableState(StateError):
    """A state file exists but cannot be read (permissions): it may be intact, never rebuild it."""


class NewerState(StateError):
    """A state file written by a newer scratch-keepalive: refused, never deleted or overwritten."""


class InvalidState(StateError):
    """A state file that is damaged or breaks its schema: `repair` sets it aside and mends it."""


class _JSONContext(object):
    """What the json module's C scanner reads off its decoder: json.loads's defaults."""
    strict = True
    object_hook = object_pairs_hook = None
    parse_float, parse_int = float, int
    memo = {}

    @staticmethod
    def parse_constant(name):
        return float(name)          # NaN, Infinity, -Infinity, as json.loads takes them


_SCANNER = []       # the C scanner, made on first use; None where there is none


def _json_loads(raw):
    """Parse JSON bytes; ValueError for anything that is not a UTF-8 JSON text.

    It reads as json.loads does, through the C scanner that json.loads uses itself when it
    can: importing the json package (and re, which it needs) costs `status --brief`, run
    at every login, about as much as the rest of its work.
    WARNING: decoding recurses once per nesting level: '[' * 100000 raises RecursionError,
    which is not a ValueError.
    """
    if not _SCANNER:
        try:
            _SCANNER.append(_json.make_scanner(_JSONContext()))
        except (ImportError, AttributeError):
            _SCANNER.append(None)
    try:
        text = raw.decode("utf-8")
        if _SCANNER[0] is None:
            return json.loads(text)
        text = text.strip(" \t\n\r")
        try:
            doc, end = _SCANNER[0](text, 0)
        except StopIteration:
            raise ValueError("Expecting value: line 1 column 1 (char 0)")
        except (ValueError, RecursionError):
            raise
        except Exception:
            # WARNING: on 3.10 and 3.11 the scanner's own error path fails (SystemError)
            # unless json.decoder was imported: json.loads says what is wrong.
            return json.loads(text)
        if end != len(text):
            raise ValueError("Extra data at char %d" % end)
        return doc
    except RecursionError:
        raise ValueError("nested too deeply")


def _owner_hint(path, uid=None):
    """What to say about a state file the kernel will not let us read (or of owner uid)."""
    if uid is None:
        try:
            uid = os.lstat(path).st_uid
        except OSError:
            uid = None
    if uid is not None and uid != os.geteuid():
        try:
            owner = "%s (uid %d)" % (pwd.getpwuid(uid).pw_name, uid)
        except KeyError:
            owner = "uid %d" % uid
        return ("it belongs to %s, not to you (written by `sudo %s ...`?); run `sudo chown "
                "$USER %s`, then try again" % (owner, PROG, shell_quote(path)))
    return "run `chmod u+rw %s`, then try again" % shell_quote(path)


KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
# The largest state file of each kind that is ever read, checked before reading: a file
# larger than its kind can be is not ours (a device, a file that grows without end). Each
# is generous: a manifest takes about 12 bytes an entry (10 million entries: 115 MiB; the
# limit is 30 times that), a checkpoint a few KiB whatever the size of the dataset (its
# cursor is one path), a registry entry a few KiB (64 MiB: thousands of datasets).
STATE_LIMITS = {"config": MiB, "registry": 64 * MiB, "registry backup": 64 * MiB,
                "schedule": MiB, "checkpoint": 16 * MiB, "rescue checkpoint": 16 * MiB,
                "lock": 64 * KiB, "manifest": 4 * GiB, "job script": MiB,
                "purge record": 4 * GiB}


def open_state(path, kind, flags=os.O_RDONLY, dir_fd=None):
    """A descriptor of the state file at path: None when there is none, else a regular file
    of this user within STATE_LIMITS[kind], or a StateError that names it and says what to do.

    WARNING: the one way a file under the state directory is opened. A name alone proves
    nothing: a FIFO there hangs an open or a read for good (O_NONBLOCK), /dev/zero never
    ends (regular files only, size checked), a symlink leads out of the state directory
    (O_NOFOLLOW), another user's file is not ours to trust. dir_fd: a held descriptor of
    path's directory, which the file is then opened in.
    """
    name = path if dir_fd is None else os.path.basename(path)
    try:
        fd = os.open(name, flags | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _state_open_error(path, kind, e) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_uid != os.geteuid():     # may be intact
            raise UnreadableState("the %s %s cannot be trusted: %s" % (
                kind, display_path(path), _owner_hint(path, st.st_uid)))
        why = state_file_problem(st, kind)
        if why:
            raise InvalidState("the %s %s is %s; run `%s repair` (it sets it aside)"
                               % (kind, display_path(path), why, PROG))
    except BaseException:
        os.close(fd)
        raise
    return fd


def state_file_problem(st, kind=None, foreign=False):
    """What makes the file of stat st no state file of ours, in words, else None: not a
    regular file, (foreign) another user's, other names (hard links: another name of it
    may be anywhere, and it would be written through), larger than a `kind` can be."""
    if not stat.S_ISREG(st.st_mode):
        return "%s, not a regular file" % file_kind(st.st_mode)
    if foreign and st.st_uid != os.geteuid():
        return "another user's file (uid %d)" % st.st_uid
    if st.st_nlink > 1:
        return "a file with other names (hard links, %d in all)" % st.st_nlink
    limit = STATE_LIMITS.get(kind)
    if limit is not None and st.st_size > limit:
        return "%s, more than a %s can be (%s)" % (human_bytes(st.st_size), kind,
                                                    human_bytes(limit))
    return None


def _state_open_error(path, kind, e):
    if e.errno == errno.ELOOP:
        return InvalidState("the %s %s is a symlink, which %s never follows in its state "
                            "directory; run `%s repair` (it sets the link aside; what it "
                            "points to is not touched)" % (kind, display_path(path), PROG, PROG))
    if e.errno in (errno.EACCES, errno.EPERM):
        return UnreadableState("cannot read the %s %s (%s): %s" % (
            kind, display_path(path), e.strerror, _owner_hint(path)))
    return InvalidState("cannot read the %s %s (%s); run `%s repair` (it sets the file "
                        "aside)" % (kind, display_path(path), e.strerror, PROG))


def odd_state_file(path, foreign=False, kind=None):
    """What sits at path when it is not a file of ours that open_state takes (see
    state_file_problem), else None (also when nothing is there)."""
    try:
        return state_file_problem(os.lstat(path), kind, foreign)
    except OSError:
        return None


def set_aside_odd(path, dry_run=False):
    """(where it went, what it is) when path held something other than a regular file of
    ours, which is renamed aside (never deleted, never followed); else None."""
    what = odd_state_file(path, foreign=True)
    if what is None:
        return None
    return _set_aside(path, dry_run), what


def read_state(path, kind):
    """The bytes of the state file at path (see open_state), None when there is none."""
    fd = open_state(path, kind)
    if fd is None:
        return None
    try:
        limit = STATE_LIMITS.get(kind, 64 * MiB)
        parts, got = [], 0
        while got <= limit:
            data = os.read(fd, min(limit + 1 - got, 1 << 20))
            if not data:
                break
            parts.append(data)
            got += len(data)
    except OSError as e:
        raise _state_open_error(path, kind, e) from None
    finally:
        os.close(fd)
    if got > limit:
        raise InvalidState("the %s %s grew past the %s a %s can be; run `%s repair` (it sets "
                           "it aside)" % (kind, display_path(path), human_bytes(limit), kind,
                                          PROG))
    return b"".join(parts)


def read_json(path, kind, schema=None):
    """Read a state document. None when absent; a StateError when it cannot be used.

    Rule for versions: a document carries "format": N. This version reads
    formats 1..FORMAT; a larger N was written by a newer scratch-keepalive and
    is refused (NewerState: upgrade), never deleted or overwritten. A file we
    may not read is UnreadableState (it may be intact); a damaged one, or one
    that breaks `schema` (see check_doc), is InvalidState.
    """
    raw = read_state(path, kind)
    if raw is None:
        return None
    try:
        doc = _json_loads(raw)
    except ValueError as e:
        raise InvalidState("the %s %s is damaged (%s); run `%s repair`" % (kind, path, e, PROG))
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if not _is_int(fmt) or fmt < 1:
        raise InvalidState("the %s %s has no format version; run `%s repair`"
                           % (kind, path, PROG))
    if fmt > FORMAT:
        raise NewerState("the %s %s was written by a newer scratch-keepalive (format %d); "
                         "upgrade this one (it is %s); the file is left as it is"
                         % (kind, path, fmt, __version__))
    if schema is not None:
        problems = check_doc(doc, schema)
        if problems:
            raise InvalidState(invalid_message(kind, path, problems[0]))
    return doc


# --------------------------------------------------------------- state: schemas, the store, locks
#
# Every document is checked on read, so that no command meets a wrong type deep inside.
# A schema maps a field to (required, check); a check returns None when the value is
# good, else what the value should be. Unknown keys are ignored: newer versions (and
# other parts of this one) add fields, and an older reader must still work.


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _valid(test, what):
    """A check that takes the values test() accepts; what: what the others should be."""
    def check(v):
        if not test(v):
            return what
    return check


def _text(test=None):
    """A test for a non-empty string without a NUL that test() (if any) accepts."""
    return lambda v: (isinstance(v, str) and v != "" and "\0" not in v
                      and (test is None or bool(test(v))))


def _int(lo, hi):
    return _valid(lambda v: _is_int(v) and lo <= v <= hi,
                  "a whole number from %d to %d" % (lo, hi))


def _one_of(*values):
    return _valid(lambda v: v in values, "one of %s" % ", ".join(map(str, values)))


def _in_time_range(v):
    """An ISO time this tool can compute with (years 1970 to 8999)."""
    t = parse_iso(v)
    return t is not None and TIME_MIN <= t < TIME_MAX


_str = _valid(_text(), "a non-empty string")
_abs_path = _valid(_text(lambda v: v.startswith("/")), "an absolute path")
_bool = _valid(lambda v: isinstance(v, bool), "true or false")
_time = _valid(lambda v: isinstance(v, str) and _in_time_range(v),
               "an ISO time such as 2026-08-01T03:00:00Z")
_date = _valid(lambda v: isinstance(v, str) and parse_date(v) is not None and
               "1970" <= v < "9000", "a date YYYY-MM-DD")


def _null_or(check):
    def nullable(v):
        if v is not None and check(v):
            return "null or " + check(v)
    return nullable


_counts = _valid(lambda v: (isinstance(v, dict)
                            and not any(_COUNT(v.get(f, 0)) for f in Counts.FIELDS)),
                 "an object of counts (whole numbers of at least 0)")


def _object(schema):
    """A check for an object that must follow schema."""
    def check(v):
        problems = check_doc(v, schema)
        if problems:
            field, want = problems[0]
            return want if field is None else "an object whose %s is %s" % (field, want)
    return check


def _list_of(check, what):
    return _valid(lambda v: isinstance(v, list) and not any(check(x) for x in v),
                  "a list of %s" % what)


def check_doc(doc, schema):
    """[(field, what it should be)] for each field of doc that breaks schema (field None:
    doc is not an object)."""
    if not isinstance(doc, dict):
        return [(None, "an object")]
    problems = []
    for field in sorted(schema):
        required, check = schema[field]
        if field not in doc:
            if required:
                problems.append((field, "present (it is missing)"))
            continue
        want = check(doc[field])
        if want:
            problems.append((field, want))
    return problems


def invalid_message(kind, path, problem, entry=None):
    field, want = problem
    where = "dataset %r: " % entry if entry is not None else ""
    return ("the %s %s is invalid: %s%s should be %s; run `%s repair` (it keeps a copy of the "
            "file)" % (kind, path, where, "it" if field is None else "field %r" % field, want,
                       PROG))


def _is_names(v):
    """A place inside a dataset as the list of its names."""
    return isinstance(v, list) and not any(_str(c) or "/" in c for c in v)


_cursor = _valid(lambda v: (isinstance(v, dict) and _is_names(v.get("path"))
                            and not _bool(v.get("subtree_done", False))),
                 "a walk position {\"path\": [names], \"subtree_done\": true|false}")


_name = _valid(valid_name, "a dataset name (letters, digits, '.', '_' or '-')")
_slurm_time = _valid(lambda v: isinstance(v, str) and parse_slurm_time(v) is not None,
                     "a Slurm time limit such as 2:00:00")
_slurm_mem = _valid(lambda v: isinstance(v, str) and re.match(r"^\d+[KMGT]?$", v),
                    "a Slurm memory size such as 2G")
_mail_user = _valid(lambda v: isinstance(v, str) and MAIL_RE.match(v),
                    "an e-mail address such as jdoe@iu.edu")
_epoch = _valid(lambda v: _plausible(v, 0, 1e11), "a time in seconds since 1970")
_purge_file = _valid(lambda v: (isinstance(v, str) and v.startswith("purge-") and
                                v.endswith(".skm") and _digits(v[6:-4]) and len(v) <= 19),
                     "a purge file name (purge-N.skm)")


def _run(v):
    """A refresh result as the registry keeps it (`last_run`), as far as the tool reads it."""
    schema = dict(RUN_SCHEMA)
    schema.update((f, (True, _COUNT)) for f in Counts.FIELDS)
    return _object(schema)(v)


def _opt(check):
    """A field that may be missing or null, else takes check."""
    return False, _null_or(check)


_COUNT = _int(0, 2 ** 63)
_OPT_TIME = _opt(_time)
CONFIG_SCHEMA = {
    "profile": (True, _one_of(*sorted(PROFILES))), "scratch_root": (True, _abs_path),
    "purge_days": _opt(_int(6, 3650)), "created": _OPT_TIME, "updated": _OPT_TIME,
}
_FORENSICS_SCHEMA = dict([(f, (True, _COUNT)) for f in FORENSICS_ZERO] + [
    ("walk_started", _OPT_TIME), ("previous_walk_started", _OPT_TIME)])
RUN_SCHEMA = {
    "name": (True, _name), "mode": (True, _one_of("touch", "check")),
    "complete": (True, _bool), "resumed": (True, _bool), "dry_run": (False, _bool),
    "reason": _opt(_str), "stopped": _opt(_str), "log": _opt(_str),
    "entries_done": (False, _COUNT), "started": _OPT_TIME, "finished": _OPT_TIME,
}
ENTRY_SCHEMA = {
    "name": (True, _name), "path": (True, _abs_path), "keep_until": (True, _date),
    "cadence_days": (True, _int(1, 3650)), "approval": _opt(_str), "enabled": (False, _bool),
    "added": _OPT_TIME, "last_refresh": _OPT_TIME, "last_refresh_start": _OPT_TIME,
    "last_touch_start": _OPT_TIME, "last_check_start": _OPT_TIME,
    "last_mode": _opt(_one_of("touch", "check")), "last_run": _opt(_run),
    "last_total_entries": _opt(_COUNT), "last_totals": _opt(_counts),
    "manifest": (False, _bool), "rescue_to": _opt(_abs_path),
    "forensics": _opt(_object(_FORENSICS_SCHEMA)),
    # The latest purge a walk found (see PurgeWriter), kept until a newer one replaces it.
    "purge": _opt(_object(dict(
        _FORENSICS_SCHEMA, found=(True, _time), file=(True, _purge_file), seen=_OPT_TIME,
        dest=_opt(_abs_path), now=_opt(_epoch)))),
    # The last complete, real rescue: which walk's manifest it copied from, to where, and
    # what it could not copy (copies_cover()).
    "last_rescue": _opt(_object({
        "to": (True, _abs_path), "walk_started": _OPT_TIME, "finished": _OPT_TIME,
        "manifest_seq": _opt(_COUNT),
        "entries_not_rescued": (True, _COUNT), "entries_not_owned": (True, _COUNT)})),
    "missing_since": _OPT_TIME, "last_manifest_seq": _opt(_COUNT),
    # Set by `add`: a manifest of an earlier registration at the same path is not its.
    "registration": _opt(_str),
}
CHECKPOINT_SCHEMA = {
    "dataset": (True, _name), "path": (True, _abs_path), "mode": (True, _one_of("touch", "check")),
    "cursor": _opt(_cursor), "entries_done": (True, _COUNT), "totals": _opt(_counts),
    "walk_started": _OPT_TIME, "updated": _OPT_TIME, "pid": _opt(_COUNT), "host": _opt(_str),
    "manifest": _opt(_object({"offset": (True, _COUNT), "entries": (True, _COUNT)})),
}


_token = _valid(_text(lambda v: RESCUE_TOKEN_RE.match(v)), "a token")


def _rescue_cursor(v):
    """A copy's position is a walk's (_cursor); one written before they were one format is
    the list of the last entry's names."""
    if not _is_names(v):
        return _cursor(v)


RESCUE_CHECKPOINT_SCHEMA = {
    "dataset": (True, _name), "path": (True, _abs_path), "to": (True, _abs_path),
    "selection": (True, _one_of(*RESCUE_SELECTIONS)), "manifest_walk_started": (True, _time),
    "cursor": _opt(_rescue_cursor), "entries_done": (True, _COUNT),
    "bytes_copied": (True, _COUNT), "started": _OPT_TIME, "updated": _OPT_TIME,
    "pid": _opt(_COUNT), "host": _opt(_str),
    # the tokens in the names of the temporary files its runs made (rescue_temp_token)
    "temps": _opt(_list_of(_token, "tokens")),
}
CHECKPOINT_KINDS = {"walk": ("checkpoint", CHECKPOINT_SCHEMA),
                    "rescue": ("rescue checkpoint", RESCUE_CHECKPOINT_SCHEMA)}
CHECKPOINT_PLACES = {"walk": ("checkpoints",), "rescue": ("checkpoints", "rescue")}
SCHEDULE_RUN_SCHEMA = {
    "job_id": _opt(_str), "finished": _OPT_TIME, "exit_code": _opt(_int(0, 255)),
    "continuation": _opt(_str), "datasets": _opt(_list_of(_str, "names")),
    # refresh --fail-on-risk: the code the run had before the risk found made it 1, and
    # the datasets whose risk did.
    "exit_code_before_risk": _opt(_int(0, 255)), "risk": _opt(_list_of(_str, "names")),
}
SCHEDULE_SCHEMA = {
    "method": (True, _one_of("scrontab", "sbatch")), "cadence_days": (True, _int(1, 3650)),
    "account": _opt(_str), "partition": _opt(_str), "cpus": _opt(_int(1, 100000)),
    "mem": _opt(_slurm_mem), "time": _opt(_slurm_time), "python": _opt(_abs_path),
    "script": _opt(_abs_path), "job_script": _opt(_abs_path), "installed": _OPT_TIME,
    "job_id": _opt(_str), "last_run": _opt(_object(SCHEDULE_RUN_SCHEMA)),
    "mail_user": _opt(_mail_user),
}
LOCK_SCHEMA = {"pid": (True, _int(1, 2 ** 31 - 1)), "host": (True, _str), "since": (False, _str)}


def split_entries(doc, path, kind="registry"):
    """The entries of the registry document doc that follow ENTRY_SCHEMA, and {name: (message,
    entry)} for the others; InvalidState when it has no datasets table."""
    datasets = doc.get("datasets") if isinstance(doc, dict) else None
    if not isinstance(datasets, dict):
        raise InvalidState("the %s %s has no datasets table; run `%s repair`"
                           % (kind, path, PROG))
    good, bad = {}, {}
    for key in sorted(datasets):
        entry = datasets[key]
        problems = check_doc(entry, ENTRY_SCHEMA)
        if not problems and entry["name"] != key:
            problems = [("name", "%r, the name it is registered under" % key)]
        if problems:
            bad[key] = (invalid_message(kind, path, problems[0], entry=key), entry)
        else:
            good[key] = entry
    return good, bad


class Store(object):
    """The state directory: config, registry (with backup), checkpoints, logs, locks.

    Directories are 0700, files 0600. Every document is JSON written by atomic_write();
    every file is opened by open_state(), and nothing is written through a directory of
    the store that is not one (ensure()).
    """

    def __init__(self, state_dir):
        self.dir = os.path.abspath(state_dir)
        self.config_path = os.path.join(self.dir, "config.json")
        self.registry_path = os.path.join(self.dir, "registry.json")
        self.backup_path = self.registry_path + ".bak"
        self.checkpoint_dir = os.path.join(self.dir, "checkpoints")
        self.log_dir = os.path.join(self.dir, "logs")
        self.lock_dir = os.path.join(self.dir, "locks")
        self.schedule_path = os.path.join(self.dir, "schedule.json")

    def ensure(self):
        for d in (self.dir, self.checkpoint_dir, self.log_dir, self.lock_dir):
            try:
                os.makedirs(d, mode=0o700)
            except FileExistsError:
                pass
            except OSError as e:
                raise Failure("cannot create the state directory %s (%s); choose another with "
                              "--state-dir or SCRATCH_KEEPALIVE_HOME" % (d, e.strerror))
        odd = self.odd_dirs()
        if odd:
            raise StateError("%s is %s, not a directory; %s never writes through one: run `%s "
                             "repair` (it sets it aside)" % (display_path(odd[0][0]), odd[0][1],
                                                             PROG, PROG))

    def odd_dirs(self):
        """[(path, what is there)] for the state directory's own directories (checkpoints,
        logs, locks, manifests and those of each dataset's) that are not directories: a
        symlink there would have files written, renamed and deleted wherever it points."""
        found = []
        top = os.path.join(self.dir, "manifests")
        dirs = [self.checkpoint_dir, os.path.join(self.checkpoint_dir, "rescue"), self.log_dir,
                self.lock_dir, top]
        for d in dirs + [p for p in _names_ending(top, "") if not _SET_ASIDE_RE.search(p)]:
            try:
                st = os.lstat(d)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                found.append((d, file_kind(st.st_mode)))
        return found

    # -- config
    def load_config(self):
        return read_json(self.config_path, "config", CONFIG_SCHEMA)

    def require_config(self):
        cfg = self.load_config()
        if cfg is None:
            how = ("the br200 profile: /N/scratch/$USER, its 30-day purge" if on_br200() else
                   "e.g. `%s init --profile generic --scratch-root DIR`" % PROG)
            raise UsageError("no configuration in %s; run `%s init` first (%s)"
                             % (self.dir, PROG, how))
        return cfg

    def save_config(self, cfg):
        self.ensure()
        atomic_write(self.config_path, dump_json(dict(cfg, format=FORMAT)))

    # -- registry
    def load_registry(self):
        """The registry; InvalidState naming the first entry that breaks ENTRY_SCHEMA."""
        reg, bad = self.load_registry_parts()
        if bad:
            raise InvalidState(bad[sorted(bad)[0]][0])
        return reg

    def load_registry_parts(self, path=None, kind="registry"):
        """(the registry with its valid entries, {name: (message, entry)} for the invalid ones).

        Raises a StateError only when the document as a whole cannot be used."""
        path = path or self.registry_path
        doc = read_json(path, kind)
        if doc is None:
            return {"format": FORMAT, "datasets": {}}, {}
        good, bad = split_entries(doc, path, kind)
        return dict(doc, datasets=good), bad

    @contextmanager
    def schedule_lock(self, wait=None):
        """One schedule change at a time (install, uninstall, a job submitting its successor):
        two chain jobs checking squeue at once could otherwise each submit one. Reentrant."""
        path = self.lock_path(".schedule")
        if path in _SCHEDULE_LOCKS:
            yield
            return
        lock = FileLock(self, ".schedule", "another %s is changing the schedule (%%s); try "
                        "again when it has finished" % PROG,
                        wait=SCHEDULE_LOCK_WAIT if wait is None else wait)
        with lock:
            _SCHEDULE_LOCKS.add(path)
            try:
                yield
            finally:
                _SCHEDULE_LOCKS.discard(path)

    @contextmanager
    def update_registry(self):
        """Read-modify-write the registry under its lock; the old one becomes the backup."""
        self.ensure()
        fd = open_lock_file(self.lock_path(".registry"))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            reg = self.load_registry()
            yield reg
            try:
                previous = read_state(self.registry_path, "registry")
            except StateError:
                previous = None     # not a registry of ours: never the backup
            if previous is not None:
                try:
                    if not split_entries(_json_loads(previous), self.registry_path)[1]:
                        atomic_write(self.backup_path, previous)
                except (ValueError, InvalidState):
                    pass    # never let a damaged registry replace the last good backup
            atomic_write(self.registry_path, dump_json(dict(reg, format=FORMAT)))
        finally:
            os.close(fd)

    # -- checkpoints: a walk's in checkpoints/NAME.json, a rescue's in
    # checkpoints/rescue/NAME.json (not checkpoints/NAME.rescue.json: "NAME.rescue" is a
    # valid dataset name, whose walk checkpoint that would be)
    def checkpoint_path(self, name, kind="walk"):
        return os.path.join(self.dir, *CHECKPOINT_PLACES[kind] + (name + ".json",))

    def real_dir(self, path):
        """path (a directory in the state directory), once every directory from the state
        directory down to it is one (not a symlink): else not_followed (a StateError). A
        read through a link would take another place's files for ours."""
        rel = os.path.relpath(path, self.dir)
        try:
            os.close(self.open_dir(*([] if rel == "." else rel.split(os.sep)), flags=O_PATH_DIR))
        except FileNotFoundError:
            pass            # nothing there to read
        return path

    def load_checkpoint(self, name, kind="walk"):
        path = self.checkpoint_path(name, kind)
        self.real_dir(os.path.dirname(path))
        return read_json(path, *CHECKPOINT_KINDS[kind])

    def load_checkpoint_quiet(self, name, kind="walk"):
        """The checkpoint, or None when absent or damaged (a walk then starts over).

        One we may not read, or of a newer format, is refused (raised): a walk that started
        over would overwrite it, then delete it."""
        try:
            return self.load_checkpoint(name, kind)
        except InvalidState:
            return None

    def save_checkpoint(self, name, doc, kind="walk"):
        self.ensure()
        os.close(self.make_dir(*CHECKPOINT_PLACES[kind]))
        atomic_write(self.checkpoint_path(name, kind), dump_json(dict(doc, format=FORMAT)))

    def delete_checkpoint(self, name, kind="walk"):
        """Delete the checkpoint through its directory's fd (never through a link); nothing
        there, a directory there (repair's to set aside): nothing done."""
        self.unlink_names(CHECKPOINT_PLACES[kind], lambda names: [name + ".json"])

    def checkpoint_exists(self, name):
        return os.path.exists(self.checkpoint_path(name))

    # -- manifests
    def manifest_dir(self, name):
        return os.path.join(self.dir, "manifests", name)

    def partial_manifest_path(self, name):
        return os.path.join(self.manifest_dir(name), "partial.skm")

    def manifests(self, name):
        """The complete manifests of dataset name, newest first: [(number, path)]."""
        d = self.real_dir(self.manifest_dir(name))
        try:
            files = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = []
        for f in files:
            m = re.match(r"^manifest-(\d{1,9})\.skm$", f)
            if m:
                found.append((int(m.group(1)), os.path.join(d, f)))
        return sorted(found, reverse=True)

    def manifest_number(self, name, wanted=None):
        """The number the next complete manifest of dataset name takes: wanted (the one
        its header says) when that follows the newest, else the one after the newest."""
        have = self.manifests(name)
        newest = have[0][0] if have else 0
        if _is_int(wanted) and newest < wanted < 10 ** 9:
            return wanted
        return newest + 1

    def manifest_path(self, name, number):
        return os.path.join(self.manifest_dir(name), "manifest-%06d.skm" % number)

    def keep_manifest(self, name, partial, number):
        """Make the complete manifest partial the newest, as number (manifest_number());
        keep MANIFEST_KEEP of them."""
        have = self.manifests(name)
        path = self.manifest_path(name, number)
        os.replace(partial, path)
        old = set(os.path.basename(p) for _, p in have[MANIFEST_KEEP - 1:])
        self.unlink_names(("manifests", name), lambda names: [f for f in names if f in old],
                          sync=True)
        return path

    def purge_record_path(self, name, file):
        return os.path.join(self.real_dir(self.manifest_dir(name)), file)

    def prune_purge_records(self, name, keep):
        """Delete the purge files of dataset name but keep (the one its record names)."""
        self.unlink_names(("manifests", name), lambda names: [
            f for f in names if re.match(r"^purge-\d{1,9}\.skm$", f) and f != keep])

    def delete_manifests(self, name):
        """Delete the manifests of dataset name, through its directory's fd (never through
        a symlink); what is not a file (repair sets it aside) stays."""
        if self.unlink_names(("manifests", name),
                             lambda names: [f for f in names if f.endswith(".skm")]):
            with contextlib.suppress(OSError):
                os.rmdir(self.manifest_dir(name))

    # -- logs
    def dataset_log_dir(self, name):
        return os.path.join(self.log_dir, name)

    def new_log(self, name, started, mode):
        # Names sort by start time: prune_logs() keeps the newest by name.
        base = "%s.%06d-%s-%d.log" % (time.strftime("%Y%m%dT%H%M%S", time.gmtime(started)),
                                      int((started % 1) * 1e6), mode, os.getpid())
        dfd = self.make_dir("logs", name)
        try:
            fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_APPEND | O_NOFOLLOW | O_CLOEXEC,
                         0o600, dir_fd=dfd)
        finally:
            os.close(dfd)
        return (os.path.join(self.dataset_log_dir(name), base),
                os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace"))

    def prune_logs(self, name, keep=KEEP_LOGS):
        def old(names):
            logs = [f for f in names if f.endswith(".log")]
            return logs[:-keep] if keep else logs
        self.unlink_names(("logs", name), old)

    def unlink_names(self, parts, pick, sync=False):
        """Delete the files pick(its sorted names) names in directory self.dir/parts...,
        through its fd (never through a symlink). False (nothing done) when it cannot be
        opened."""
        try:
            dfd = self.open_dir(*parts)
        except (OSError, StateError):
            return False
        try:
            for f in pick(sorted(os.listdir(dfd))):
                with contextlib.suppress(OSError):
                    os.unlink(f, dir_fd=dfd)
            if sync:
                with contextlib.suppress(OSError):
                    os.fsync(dfd)
        finally:
            os.close(dfd)
        return True

    def make_dir(self, *parts):
        """open_dir() of self.dir/parts..., each made (0700) where missing."""
        for i in range(1, len(parts) + 1):
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.join(self.dir, *parts[:i]), 0o700)
        return self.open_dir(*parts)

    def open_dir(self, *parts, flags=os.O_RDONLY | O_DIRECTORY | O_CLOEXEC):
        """A descriptor (opened with flags) of the directory self.dir/parts..., never through
        a symlink.

        WARNING: the state directory is ours, and nothing in it is followed: a symlink at
        logs/NAME made log pruning delete files wherever it pointed. (The state directory
        itself may be reached through a symlink.)
        """
        def refused(dir_fd, i, e):
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                return not_followed(os.path.join(self.dir, *parts[:i + 1]))
            return e
        return open_below(os.open(self.dir, flags), parts, flags, refused)

    # -- locks: the store's own start with a dot, which no dataset name can (valid_name), so
    # a dataset called "registry" never shares a lock file with the registry.
    def lock_path(self, name):
        return os.path.join(self.lock_dir, name + ".lock")


class FileLock(object):
    """An exclusive fcntl lock on the file locks/NAME.lock of store that records its holder's
    pid, host and start time.

    It dies with its holder: no stale lock can block. wait: seconds to wait for it; when
    it stays taken, BusyError(busy % the holder's description).
    """

    def __init__(self, store, name, busy, wait=0):
        self.store, self.path, self.busy, self.wait = store, store.lock_path(name), busy, wait
        self.fd = None

    def acquire(self):
        self.store.ensure()
        fd = open_lock_file(self.path)
        deadline = time.monotonic() + self.wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                    if time.monotonic() >= deadline:
                        raise BusyError(self.busy % lock_holder(self.path))
                    time.sleep(0.2)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": iso(time.time())}).encode("ascii"))
        except BaseException as e:
            os.close(fd)
            raise_if_full(e, self.path)
            raise
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class DatasetLock(FileLock):
    """One refresh (or remove) of a dataset at a time; a second one is refused at once."""

    def __init__(self, store, name):
        FileLock.__init__(self, store, name, "dataset %r is busy: %%s holds its lock; wait for "
                          "it to finish (or stop it), then try again" % name)


def not_followed(path):
    try:
        what = file_kind(os.lstat(path).st_mode)
    except OSError:
        what = "not a directory"
    return StateError("%s is %s where the state directory needs a directory (%s never "
                      "follows a symlink inside it); run `%s repair` (it sets it aside; what "
                      "a link points to is not touched)" % (display_path(path), what, PROG,
                                                            PROG))


def open_lock_file(path):
    """A read-write descriptor of the lock file at path, created if need be: never a FIFO,
    a directory or a link (open_state), so taking a lock cannot block or write elsewhere."""
    fd = open_state(path, "lock", os.O_RDWR | os.O_CREAT)
    if fd is None:      # its directory vanished
        raise StateError("cannot create the lock file %s; run `%s repair`"
                         % (display_path(path), PROG))
    return fd


def lock_holder(path):
    info = _lock_record(path)
    if info is None:
        return "another process"
    return "pid %s on host %s (since %s)" % (info["pid"], info["host"], info.get("since", "?"))


# ---------------------------------------------------------------- state: the dataset root


class ContainmentError(Failure):
    """The dataset root cannot be reached from the scratch root without following a symlink."""


O_PATH_DIR = (O_PATH or os.O_RDONLY) | O_DIRECTORY | O_CLOEXEC


def _root_base(path, scratch_root):
    """(directory to start from, components below it) for a dataset root.

    The scratch root itself may be reached through a symlink (as /N/scratch may be), so the
    walk starts there; a path recorded against its real place starts from that. A path
    below neither is refused (ContainmentError). Without a scratch root (no usable config)
    the walk starts from "/": a recorded root is a real path, so no component of it may
    be a symlink either.
    """
    if not path.startswith("/") or os.path.normpath(path) != path or path.startswith("//"):
        raise ContainmentError("the dataset root %s is not a plain absolute path; nothing is "
                               "walked or written there; remove the dataset and add it again"
                               % display_path(path))
    # WARNING: a registry entry is checked here, every time it is used, not only by `add`:
    # an edited (or restored) registry may name any directory, and nothing outside the
    # scratch root is walked, touched, copied or written into.
    bases = [scratch_root, os.path.realpath(scratch_root)] if scratch_root else ["/"]
    for base in bases:
        if is_below(path, base):
            rest = path[len(base.rstrip("/")):]
            return base, [c for c in rest.split("/") if c]
    raise ContainmentError("the dataset root %s is not strictly below the scratch root %s "
                           "(an edited registry, or a moved scratch root?); nothing is walked "
                           "or written there; remove the dataset and add it again below the "
                           "scratch root" % (display_path(path),
                                             display_path(scratch_root or "/")))


def open_dataset_root(path, scratch_root=None):
    """An fd (O_PATH where Linux has it) of the dataset root `path`, opened one component
    at a time from the scratch root with O_NOFOLLOW, so that a symlink between the two is
    refused (ContainmentError) and a swap made later cannot redirect what the fd names.

    Everything done inside a dataset (walk, sentinel) goes through this fd.
    """
    base, comps = _root_base(path, scratch_root)
    try:
        fd = os.open(base, O_PATH_DIR)
    except OSError as e:
        raise Failure("cannot open %s (%s)" % (display_path(base), e.strerror))
    return open_below(fd, comps, O_PATH_DIR, lambda dir_fd, i, e: _containment_error(
        path, dir_fd, os.path.join(base, *comps[:i]), comps[i], e))


def open_below(fd, names, flags, refused):
    """The directory fd/names..., opened one name at a time with O_NOFOLLOW, so that no
    symlink is followed: its descriptor (fd and those between are closed). When one cannot
    be opened, refused(the descriptor of its directory, its index, the OSError) returns
    what to raise."""
    try:
        for i, name in enumerate(names):
            try:
                sub = os.open(name, flags | O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                raise refused(fd, i, e) from None
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def _containment_error(path, dir_fd, here, comp, err):
    where = os.path.join(here, comp)
    try:
        st = os.stat(comp, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        try:
            target = " -> %s" % display_path(os.readlink(comp, dir_fd=dir_fd))
        except OSError:
            target = ""
        return ContainmentError(
            "%s is a symlink (%s%s) between the scratch root and the dataset root %s; a walk "
            "never follows one: put the directory back, or remove the dataset and add its new "
            "place" % (display_path(where), display_path(comp), target, display_path(path)))
    if st is not None:
        return ContainmentError("%s is not a directory, so the dataset root %s cannot be "
                                "reached" % (display_path(where), display_path(path)))
    return Failure("cannot reach the dataset root %s: %s (%s)" % (
        display_path(path), display_path(where), err.strerror))


def dataset_root_fd(ctx, ds):
    """open_dataset_root() for a registered dataset, from the scratch root in force."""
    try:
        cfg = ctx.store.load_config()
    except StateError:
        cfg = None
    root = scratch_root_of(cfg, ctx.env) if cfg else None
    try:
        others = ctx.store.load_registry()["datasets"]
    except StateError:
        others = {}
    for other in others.values():     # `add` refuses an overlap; an edited registry may not
        if other["name"] != ds["name"] and overlaps(other["path"], ds["path"]):
            raise ContainmentError(
                "its path %s is, contains or lies inside dataset %r's (%s), which `add` "
                "refuses (the registry was edited?); `%s remove --name %s`, then add it again "
                "with its own directory" % (ds["path"], other["name"], other["path"], PROG,
                                            ds["name"]))
    try:
        return open_dataset_root(ds["path"], root)
    except ContainmentError as e:
        if root and not is_below(ds["path"], root) and not is_below(
                ds["path"], os.path.realpath(root)):
            raise ContainmentError("%s (`%s remove --name %s`, then `%s add --name %s --path "
                                   "DIR ...`)" % (e, PROG, ds["name"], PROG, ds["name"])) from None
        raise


@contextmanager
def dataset_root(ctx, ds):
    """dataset_root_fd() as a context (the fd, closed on leaving); refused: Failure
    "dataset NAME: why"."""
    try:
        fd = dataset_root_fd(ctx, ds)
    except Failure as e:
        raise Failure("dataset %r: %s" % (ds["name"], e)) from None
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def _root_fd_of(root):
    """root as a dataset-root fd: an int is used as is; a path is opened safely (from "/")."""
    if isinstance(root, int):
        yield root
        return
    fd = open_dataset_root(os.fsdecode(root))
    try:
        yield fd
    finally:
        os.close(fd)


# ---------------------------------------------------------------- state: the sentinel
#
# The sentinel is a regular file of SENTINEL_SIZE bytes: the JSON document, then spaces,
# then a newline. It is only ever rewritten by ONE pwrite of its whole length at offset 0,
# never truncated, never replaced by a rename (that would move the root's mtime): a failed
# or killed rewrite (over quota, RLIMIT_FSIZE, SIGKILL between two pages) leaves a prefix of
# the new bytes over the old ones. The document starts with the same fixed header on every
# rewrite (tool and name), so even such a mix is still recognised as ours. Sentinels written
# by 1.0.0 (indented JSON of any size) are read as they are and padded on their next rewrite.
# WARNING: every open here is O_NONBLOCK|O_NOFOLLOW and refuses anything but a regular file:
# a FIFO at the sentinel path would otherwise hang the command (and its lock) for good.

SENTINEL_SIZE = 4096
SENTINEL_HEAD = _LazyPattern(br'\A\{"tool": "scratch-keepalive", "name": '
                             br'"([A-Za-z0-9][A-Za-z0-9._-]{0,63})", ')
O_SENTINEL = O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC


def sentinel_path(root):
    return os.path.join(root, SENTINEL)


def encode_sentinel(doc, size=SENTINEL_SIZE):
    """The sentinel's bytes: the header, the other keys sorted, padded to SENTINEL_SIZE (to
    size when that is more: an old, longer sentinel is padded over all of it)."""
    rest = dict((k, v) for k, v in doc.items() if k not in ("tool", "name"))
    body = json.dumps(rest, sort_keys=True, ensure_ascii=False)
    text = '{"tool": %s, "name": %s%s' % (json.dumps(PROG), json.dumps(doc["name"]),
                                          ", " + body[1:] if rest else "}")
    data = text.encode("utf-8")
    if len(data) >= SENTINEL_SIZE:
        # Cannot happen within the documented limits (name <= 64, approval <= 500
        # characters); refused rather than written torn.
        raise Failure("the sentinel of dataset %r would be %d bytes, more than the %d it "
                      "holds; shorten its approval text with `%s extend --approval`" % (
                          doc["name"], len(data), SENTINEL_SIZE - 1, PROG))
    return data + b" " * (max(size, SENTINEL_SIZE) - 1 - len(data)) + b"\n"


def decode_sentinel(raw):
    """The sentinel's document if these bytes are ours (old or new layout, or a torn
    rewrite of ours: then just its tool and name), else None."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict):
        return doc if doc.get("tool") == PROG else None
    m = SENTINEL_HEAD.match(raw)
    return {"tool": PROG, "name": m.group(1).decode("ascii"), "torn": True} if m else None


def _open_sentinel(root, flags=os.O_RDONLY | O_NOATIME):
    """(fd, document, None) of the sentinel path when it holds a regular file of ours, else
    (None, None, why not): "missing", "a symlink", "not a regular file (a FIFO)", "another
    tool's file", or the error. root: the dataset root's fd (open_dataset_root) or its path.
    """
    try:
        with _root_fd_of(root) as root_fd:
            fd = os.open(SENTINEL, flags | O_SENTINEL, dir_fd=root_fd)
    except Failure as e:
        return None, None, str(e)
    except OSError as e:
        if e.errno == errno.EPERM and flags & O_NOATIME:
            return _open_sentinel(root, flags & ~O_NOATIME)
        if e.errno == errno.ELOOP:
            return None, None, "a symlink"
        return None, None, "missing" if e.errno == errno.ENOENT else e.strerror
    doc = None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            why = "not a regular file (%s)" % file_kind(mode)
        else:
            doc = decode_sentinel(os.pread(fd, max(SENTINEL_SIZE, 65536), 0))
            why = None if doc else "another tool's file"
    except OSError as e:
        why = e.strerror
    if why:
        os.close(fd)
        return None, None, why
    return fd, doc, None


def file_kind(mode):
    for test, kind in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISLNK, "a symlink"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def sentinel_state(root):
    """(the sentinel's JSON, None) when it is a regular file written by this tool, else
    (None, why not): see _open_sentinel."""
    fd, doc, why = _open_sentinel(root)
    if fd is not None:
        os.close(fd)
    return doc, why


def read_sentinel(root):
    """The sentinel's JSON when it is a regular file written by this tool, else None."""
    return sentinel_state(root)[0]


def sentinel_doc(ds):
    """What the sentinel records: enough to rebuild the dataset's registry entry, settings
    included (keep-until, cadence, approval), should the registry be lost."""
    return {"tool": PROG, "format": FORMAT, "name": ds["name"], "added": ds.get("added"),
            "last_refresh": ds.get("last_refresh"), "keep_until": ds.get("keep_until"),
            "cadence_days": ds.get("cadence_days"), "approval": ds.get("approval"),
            "rescue_to": ds.get("rescue_to"),
            "about": "This directory is registered with scratch-keepalive as dataset %r. "
                     "Run `scratch-keepalive status --name %s` for its state." % (ds["name"],
                                                                                 ds["name"])}


def create_sentinel(root, ds):
    """Create the sentinel; never through a symlink, never over another tool's file.

    An existing sentinel of ours naming the same dataset is rewritten in place.
    Returns True when this call created the file.
    """
    data = encode_sentinel(sentinel_doc(ds))
    path = sentinel_path(root if not isinstance(root, int) else ds["path"])
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_SENTINEL
    with _root_fd_of(root) as root_fd:
        try:
            fd = os.open(SENTINEL, flags, 0o644, dir_fd=root_fd)
        except FileExistsError:
            existing = read_sentinel(root_fd)
            if existing is None:
                raise UsageError("%s exists and was not written by scratch-keepalive (or is a "
                                 "symlink or not a regular file); move it away, then add again"
                                 % display_path(path))
            if existing.get("name") != ds["name"]:
                raise UsageError("%s says this directory is dataset %r (registered in another "
                                 "state directory?); remove it there, or delete the file"
                                 % (display_path(path), existing.get("name")))
            update_sentinel(root_fd, ds)
            return False
        except OSError as e:
            raise UsageError("cannot create %s (%s); check the directory's permissions"
                             % (display_path(path), e.strerror))
        try:
            _pwrite_all(fd, data)
        except OSError as e:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(SENTINEL, dir_fd=root_fd)
            raise Failure("cannot write %s (%s); free some space (or quota) on scratch, then add "
                          "again" % (display_path(path), e.strerror))
        os.close(fd)
        return True


def _pwrite_all(fd, data):
    """ONE pwrite of data at offset 0; a short write is an error (ENOSPC: what else)."""
    n = os.pwrite(fd, data, 0)
    if n != len(data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def update_sentinel(root, ds):
    """Rewrite our sentinel in place: one pwrite of its whole (fixed) length at offset 0,
    never a truncation or a rename, so the root's mtime does not move and a failure or a
    kill leaves a file still recognised as ours. False if it is not ours or the write failed.
    """
    fd, _, _ = _open_sentinel(root, os.O_RDWR)
    if fd is None:
        return False
    try:
        _pwrite_all(fd, encode_sentinel(sentinel_doc(ds), os.fstat(fd).st_size))
    except (Failure, OSError):
        return False
    finally:
        os.close(fd)
    return True


def delete_sentinel(root):
    """Delete the sentinel only when it is our regular file. True when deleted."""
    try:
        with _root_fd_of(root) as root_fd:
            if read_sentinel(root_fd) is None:
                return False
            os.unlink(SENTINEL, dir_fd=root_fd)
            return True
    except (Failure, OSError):
        return False


# ------------------------------------------------------- policy: thresholds, due, risk, attention


def profile_of(cfg):
    return PROFILES[cfg["profile"]]


def purge_days_of(cfg):
    return int(cfg.get("purge_days") or profile_of(cfg)["purge_days"])


def default_cadence(cfg):
    """A dataset's cadence when none is given: the profile's, as long as the purge allows."""
    return min(profile_of(cfg)["default_cadence"], purge_days_of(cfg) - 5)


def thresholds_days(cfg, cadence):
    """(skip, at-risk, purge) ages in days for a cadence; see the contract."""
    purge = purge_days_of(cfg)
    return purge - cadence - 5, purge - cadence - 3, purge


def thresholds_ns(cfg, cadence, now):
    now_ns = int(now * 1e9)
    return tuple(now_ns - days * DAY * 10 ** 9 for days in thresholds_days(cfg, cadence))


def dataset_mode(cfg, ds, force_check=False):
    if force_check:
        return "check"
    return "touch" if (profile_of(cfg)["touch_allowed"] or ds.get("approval")) else "check"


def on_br200():
    """True where Big Red 200's scratch filesystem is mounted (the parent of br200's root)."""
    return os.path.isdir(os.path.dirname(PROFILES["br200"]["scratch_root"]))


def scratch_root_of(cfg, env):
    return env.get("SCRATCH_KEEPALIVE_SCRATCH_ROOT") or cfg.get("scratch_root")


def root_present(path):
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _walk_start_text(ds, mode):
    """The recorded start of the last complete walk of this mode (ISO text), or None.

    A registry written before last_touch_start and last_check_start existed knows only
    the last complete walk of either mode: it stands for the mode it was in.
    """
    key = "last_%s_start" % mode
    if key in ds:
        return ds[key]
    if ds.get("last_mode") == mode:
        return ds.get("last_refresh_start") or ds.get("last_refresh")
    return None


def walk_start(ds, mode):
    """When the last complete walk of this mode (touch or check) started (epoch), or None."""
    text = _walk_start_text(ds, mode)
    return parse_iso(text) if text else None


def record_walk(ds, mode, walk_started, finished):
    """What a complete, non-dry-run walk records in its registry entry (ISO times).

    Only such a walk may call this: a check walk moves only the check record, so a
    touch-mode dataset never looks refreshed by one; dry runs and stopped walks record
    nothing. last_refresh, last_refresh_start and last_mode cover either mode.
    """
    for m in ("touch", "check"):
        ds["last_%s_start" % m] = _walk_start_text(ds, m)     # an older registry's, kept
    ds["last_%s_start" % mode] = walk_started
    ds["last_refresh"] = finished
    ds["last_refresh_start"] = walk_started
    ds["last_mode"] = mode


def schedule_cadence(store):
    """The installed schedule's cadence in days (SCHEDULE_SCHEMA: a whole number), or None
    (none installed, or unreadable: doctor reports that; the rules then fall back to the
    dataset's own cadence)."""
    try:
        doc = load_schedule(store)
    except StateError:
        return None
    return None if doc is None else doc["cadence_days"]


def threshold_cadence(ds, sched_cadence):
    """The cadence the skip and at-risk thresholds assume: a dataset is walked no more
    often than the schedule runs, so the larger of its cadence and the schedule's."""
    return max(int(ds["cadence_days"]), sched_cadence or 0)


# -- due: three rules, side by side. Each answers its own question, so each counts from
# its own walk over its own span (C: the dataset's cadence, S: the schedule's):
#  - the schedule's, is_due(): does this `refresh --due` walk the dataset? C - S + 1 days
#    from the START of the last complete walk of the dataset's own mode: the schedule's
#    promise needs exactly that (see is_due), and a check walk, dry run or stopped walk
#    must not make a touch-mode dataset look refreshed.
#  - the people's, state_due_at(): the `due` that `list` and `status` show, "every C
#    days" as a person reads it: C - 1 days from that same start. The contract fixes its
#    meaning; the schedule never selects by it.
#  - doctor's, overdue_at(): has the machinery stopped? Any complete walk, of either mode,
#    shows that the schedule ran, so it counts from the END of the last one (or the
#    dataset's addition), C + OVERDUE_DAYS days: a working schedule's runs can be C + 3
#    days apart (cron_schedule: days 1 and 15 leave 17 days after a 31-day month's 15th),
#    and the run then needs time to finish its walk; one more day covers that.

OVERDUE_DAYS = 4        # doctor's overdue: this many days past the cadence


def schedule_due_at(last_start, cadence, sched_cadence):
    """When the schedule's rule makes a dataset due again, its last complete walk of its
    mode having started at last_start (see is_due)."""
    return last_start + (int(cadence) - int(sched_cadence or cadence) + 1) * DAY


def is_due(last_start, cadence, sched_cadence, now):
    """The schedule's due rule (`refresh --due`), for a dataset of one mode.

    Due unless its last complete walk of that mode started less than (cadence -
    schedule cadence + 1) days ago; the schedule's cadence is the installed one, else
    the dataset's own (24 hours). Why: a complete touch walk at W leaves entries up to
    skip days old, and the run after one that skips the dataset can be schedule cadence
    + 3 days away; this rule keeps the next walk within cadence + 4 days of W.
    """
    return last_start is None or now >= schedule_due_at(last_start, cadence, sched_cadence)


def state_due_at(start, cadence):
    """When the people's `state` turns `due`: cadence - 1 days after start, the start of
    the last complete walk of the dataset's mode."""
    return start + (int(cadence) - 1) * DAY


def overdue_at(ds):
    """When doctor calls dataset ds overdue (a FAIL: its walks stopped coming): cadence +
    OVERDUE_DAYS days after its last complete walk of either mode ended, or after it was
    added when never walked; None when the registry says neither."""
    text = ds.get("last_refresh") or ds.get("added")
    since = parse_iso(text) if isinstance(text, str) else None
    return None if since is None else since + (int(ds["cadence_days"]) + OVERDUE_DAYS) * DAY


def resumable(ckpt, ds, mode, due_run, sched_cadence, now):
    """Whether a walk continues from this checkpoint instead of starting over.

    Only a walk of the same mode and path continues. And a `refresh --due` run starts
    over a walk that another refresh began (a manual one, stopped) once that walk is due
    by the rule: completing it would record its old start, so the schedule's next walk
    would come a full run too late for the entries it reached back then. Walks that
    `refresh --due` began always continue (a long walk spread over many continuations
    must finish).
    """
    if ckpt is None or ckpt.get("mode") != mode or ckpt.get("path") != ds["path"]:
        return False
    if not due_run or ckpt.get("due_run", True) is not False:
        return True
    text = ckpt.get("walk_started")
    started = parse_iso(text) if isinstance(text, str) else None
    return not is_due(started, ds["cadence_days"], sched_cadence, now)


def dataset_state(store, ds, now, mode=None):
    """missing, expired, disabled, partial, never, due or ok: the first that applies.

    `due` is the people's rule (state_due_at), for the last complete walk of mode (None:
    the mode of its last walk); `refresh --due` selects by the schedule's (is_due).
    """
    if not root_present(ds["path"]):
        return "missing"
    if parse_date(ds["keep_until"]) < utc_date(now):
        return "expired"
    if not ds.get("enabled", True):
        return "disabled"
    if store.checkpoint_exists(ds["name"]):
        return "partial"
    if not ds.get("last_refresh"):
        return "never"
    start = walk_start(ds, mode or ds.get("last_mode") or "touch")
    return "due" if start is None or now >= state_due_at(start, ds["cadence_days"]) else "ok"


def last_walk_totals(ds):
    """The counts of the last complete walk (of either mode) as a whole, or {} (none yet, or
    the registry does not say)."""
    if not ds.get("last_refresh"):
        return {}
    totals = ds.get("last_totals")
    if isinstance(totals, dict):
        return totals
    run = ds.get("last_run")
    return run if isinstance(run, dict) and run.get("complete") and not run.get("resumed") else {}


def rescue_dest(ds, scratch_root=None):
    """Where a dataset's copies are: its --rescue-to, else where its last complete `rescue
    --to` went; None when neither, or when that lies in scratch (no safe place: a copy
    there is purged as its source is; `add` and `extend` refuse one, a hand edit may not)."""
    dest = ds.get("rescue_to") or (ds.get("last_rescue") or {}).get("to")
    if dest and scratch_root and (is_below(os.path.realpath(dest),
                                           os.path.realpath(scratch_root))
                                  or os.path.realpath(dest) == os.path.realpath(scratch_root)):
        return None
    return dest


def copies_cover(ds):
    """How many of the at-risk entries of ds's owner that its last complete walk found have
    no copy, as its last complete rescue of that walk's manifest left them; None when no
    such rescue happened (then none of them is known to have a copy)."""
    r = ds.get("last_rescue")
    same_walk = (r.get("manifest_seq") == ds.get("last_manifest_seq")
                 if isinstance(r, dict) and "last_manifest_seq" in ds else
                 isinstance(r, dict) and r.get("walk_started") == ds.get("last_refresh_start"))
    if not same_walk or r.get("to") != rescue_dest(ds):    # or copies made elsewhere
        return None
    return max(0, int(r.get("entries_not_rescued", 0)) - int(r.get("entries_not_owned", 0)))


def remaining_risk(ds):
    """What is still at risk after the last complete walk, or None before one: {"at_risk",
    "purge_eligible" (every owner's), "own_at_risk", "own_purge_eligible" (the user's own,
    less those with a copy), "others_at_risk"}. A touch walk refreshed every old entry it
    could: what it left is others' (its failures are errors). A check walk left all it
    found."""
    t = last_walk_totals(ds)
    if not t:
        return None
    theirs_risk = t.get("entries_at_risk_not_owned", 0)
    theirs_elig = t.get("entries_purge_eligible_not_owned", 0)
    if ds.get("last_mode") == "touch":
        at_risk, elig, own_risk, own_elig = theirs_risk, theirs_elig, 0, 0
    else:
        at_risk, elig = t.get("entries_at_risk", 0), t.get("entries_purge_eligible", 0)
        own_risk, own_elig = max(0, at_risk - theirs_risk), max(0, elig - theirs_elig)
    uncovered = copies_cover(ds)
    if uncovered is not None:
        own_risk, own_elig = min(own_risk, uncovered), min(own_elig, uncovered)
    return {"at_risk": at_risk, "purge_eligible": elig, "own_at_risk": own_risk,
            "own_purge_eligible": own_elig, "others_at_risk": theirs_risk}


def risk_of(ds):
    """What is still at risk after the last complete walk of either mode, every owner's
    entries counted: purge-eligible, at-risk or none; None before any complete walk."""
    rem = remaining_risk(ds)
    if rem is None:
        return None
    if rem["purge_eligible"]:
        return "purge-eligible"
    return "at-risk" if rem["at_risk"] else "none"


# What needs a dataset's user, most urgent first: attention() is each one's rule,
# attention_words() its words, the README's JSON section what each means. The schedule is
# not a dataset's attention: it has its own line and key.
ATTENTION_CODES = ("missing", "purged", "purge-eligible", "expired", "at-risk", "errors",
                   "stalled", "expiring")
EXPIRING_DAYS = 14


def run_errors(ds):
    """Entry errors of the last run; of the whole walk when that run completed it (a
    resumed walk's earlier runs count)."""
    run = ds.get("last_run") or {}
    whole = last_walk_totals(ds).get("errors", 0) if run.get("complete") else 0
    return max(int(run.get("errors") or 0), int(whole or 0))


def purge_unseen(ds, now):
    """The dataset's purge record while it still asks to be looked at, else None: until
    `files --vanished` has listed it, or PURGE_SEEN_DAYS after it was found."""
    p = ds.get("purge")
    if not isinstance(p, dict) or p.get("seen"):
        return None
    # Counted on the policy clock the finding walk ran on (`now`; the real `found` when
    # absent), as every other rule is.
    found = p.get("now") if _plausible(p.get("now"), 0, 1e11) else (
        parse_iso(p["found"]) if isinstance(p.get("found"), str) else None)
    return p if found is not None and now - found < PURGE_SEEN_DAYS * DAY else None


def attention(ds, now, checkpoint=None):
    """THE rule for what about dataset ds needs its user: a list of ATTENTION_CODES, most
    urgent first, empty exactly when nothing does. From state alone, so that every view
    (and --fail-on-risk) says the same, `status --brief` included, which looks at no
    dataset: its registry entry, and checkpoint, its walk checkpoint (or None). A missing
    root is what the last refresh found (`state`, for the schedule, looks now)."""
    found = set()
    if ds.get("missing_since"):
        found.add("missing")
    days_left = (parse_date(ds["keep_until"]) - utc_date(now)).days
    if days_left < 0:
        found.add("expired")        # no longer protected: nothing else is asked of it
        return [c for c in ATTENTION_CODES if c in found]
    if days_left <= EXPIRING_DAYS:
        found.add("expiring")
    if purge_unseen(ds, now):
        found.add("purged")
    rem = remaining_risk(ds)
    if rem and rem["own_purge_eligible"]:
        found.add("purge-eligible")
    elif rem and rem["own_at_risk"]:
        found.add("at-risk")
    if run_errors(ds):
        found.add("errors")
    updated = (checkpoint or {}).get("updated")     # CHECKPOINT_SCHEMA: a time, or null
    if updated and now - parse_iso(updated) > int(ds["cadence_days"]) * DAY:
        found.add("stalled")
    return [c for c in ATTENTION_CODES if c in found]


# ------------------------------------------------- the walk engine: order, stack, cursor, runners

_utimensat = None


def _load_utimensat():
    """ctypes binding of utimensat(2) (Python's os.utime cannot leave mtime alone), for
    the per-entry loop to call unwrapped: (utimensat, times = atime now and mtime
    untouched, get_errno, the array times points to, kept alive with it)."""
    global _utimensat
    if _utimensat is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            func = libc.utimensat
        except (ImportError, OSError, AttributeError):
            raise Failure("this system offers no utimensat(2) through ctypes, so atime cannot "
                          "be set without rewriting mtime; run with --check")
        # struct timespec[2] {tv_sec, tv_nsec}, both longs: atime now, mtime untouched
        times = (ctypes.c_long * 4)(0, UTIME_NOW, 0, UTIME_OMIT)
        func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
        func.restype = ctypes.c_int
        _utimensat = (func, ctypes.addressof(times), ctypes.get_errno, times)
    return _utimensat


def open_dir_ex(name, dir_fd=None):
    """(fd, quiet): the directory opened without following a symlink and, where allowed,
    with O_NOATIME; quiet is False when O_NOATIME was refused, so listing the
    directory may move its atime (the kernel allows O_NOATIME only to the owner)."""
    kw = {} if dir_fd is None else {"dir_fd": dir_fd}
    if O_NOATIME:
        try:
            return os.open(name, O_DIR_FLAGS | O_NOATIME, **kw), True
        except PermissionError:
            pass    # O_NOATIME needs ownership (or CAP_FOWNER); fall back to a plain open
    return os.open(name, O_DIR_FLAGS, **kw), not O_NOATIME


def list_dir_typed(fd):
    """(names, directory positions) of an open directory: names as bytes in byte order,
    and the sorted indexes in names of the entries that are directories.

    With os.scandir on a file descriptor (Python 3.7+), d_type says which are
    directories; where it is unknown, DirEntry.is_dir() falls back to an lstat.
    Names are encoded a chunk at a time in one call (no name holds a NUL), so a
    huge directory never holds its listing twice; directories are then found
    by bisection. Older Pythons lstat every name (one gone or denied is no directory: the
    per-entry rules count it).
    """
    enc = sys.getfilesystemencoding()
    if os.scandir not in os.supports_fd:
        names = sorted([n.encode(enc, "surrogateescape") for n in os.listdir(fd)])
        return names, [i for i, n in enumerate(names) if stat.S_ISDIR(_lstat_mode(n, fd))]
    names, dirnames = [], []
    it = os.scandir(fd)
    try:
        while True:
            ents = list(itertools.islice(it, LIST_CHUNK))
            if not ents:
                break
            chunk = [e.name for e in ents]
            for e in ents:
                try:
                    if e.is_dir(follow_symlinks=False):
                        dirnames.append(e.name)
                except OSError:
                    pass
            ents = None
            names.extend("\0".join(chunk).encode(enc, "surrogateescape").split(b"\0"))
    finally:
        it.close()
    names.sort()
    bisect_left = bisect.bisect_left
    return names, sorted(bisect_left(names, d.encode(enc, "surrogateescape")) for d in dirnames)


def parallel_ok():
    """Worker processes can be used: Python 3.7+ with fork and SCM_RIGHTS (CMSG_SPACE).
    (_socket: what socket re-exports CMSG_SPACE from, without socket's own imports.)"""
    return (sys.version_info >= (3, 7) and hasattr(os, "fork")
            and hasattr(__import__("_socket"), "CMSG_SPACE"))


def default_workers():
    """Worker processes for a walk: 2 where two CPUs are ours and Python can pass fds."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return 2 if (cpus >= 2 and parallel_ok()) else 1


# Filesystems whose metadata calls wait on a network round trip: threads overlap the waits.
NETWORK_THREADS = 16
NETWORK_FS = ("lustre", "nfs", "nfs4", "gpfs", "beegfs", "cifs", "smb3", "ceph", "panfs",
              "wekafs", "9p", "fuse.glusterfs", "afs")


def fs_type(path):
    """The filesystem type of the mount holding path, or None."""
    found = mount_of(os.path.realpath(path))    # a symlink may lead onto another mount
    return found[2] if found else None


_MOUNTINFO_ESCAPE = _LazyPattern(br"\\([0-7]{3})")


def decode_mountinfo_path(field):
    """A mount point as /proc/self/mountinfo writes it, octal escapes (\\040 ...) decoded."""
    return _MOUNTINFO_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field)


def read_mountinfo(mountinfo="/proc/self/mountinfo"):
    """[(mount point, source, filesystem type)] of this process's mount table, in the
    kernel's order (a later mount hides an earlier one at the same place): bytes, every
    octal escape decoded, so a mount point may hold any byte but NUL and "/" in a name.
    [] where the table cannot be read. The tool's one reader of the mount table."""
    try:
        with open(mountinfo, "rb") as f:
            lines = f.read().split(b"\n")    # a newline in a name is written \012
    except OSError:
        return []
    mounts = []
    for line in lines:
        # ID PARENT MAJ:MIN ROOT MOUNT-POINT OPTIONS [OPTIONAL FIELDS...] - TYPE SOURCE OPTIONS
        fields = line.split(b" ")
        sep = fields.index(b"-", 6) if b"-" in fields[6:] else len(fields)
        if len(fields) >= sep + 3:
            mounts.append(tuple(decode_mountinfo_path(fields[i]) for i in (4, sep + 2, sep + 1)))
    return mounts


def mount_of(path, mountinfo="/proc/self/mountinfo"):
    """(mount point, source, filesystem type) of the mount holding path (a real path), as
    text (surrogate-escaped), or None."""
    bpath, best = os.fsencode(path), None
    for mount in read_mountinfo(mountinfo):
        mnt = mount[0]
        if (bpath == mnt or bpath.startswith(mnt.rstrip(b"/") + b"/")) and (
                best is None or len(mnt) >= len(best[0])):
            best = mount
    return None if best is None else tuple(os.fsdecode(x) for x in best)


def mount_tree(root_fd, mountinfo="/proc/self/mountinfo"):
    """{directory below the root (tuple of names): set of its entries that are mount points}.

    Every mount point strictly below the dataset root, bind mounts of the same filesystem
    included (st_dev alone cannot see those). The root's path comes from the kernel
    (/proc/self/fd), in the same namespace as the mount table. Empty where neither exists.
    """
    try:
        root = os.fsencode(os.readlink("/proc/self/fd/%d" % root_fd))
    except OSError:
        return {}
    prefix = root.rstrip(b"/") + b"/"
    tree = {}
    for mnt, _, _ in read_mountinfo(mountinfo):
        if mnt.startswith(prefix) and len(mnt) > len(prefix):
            comps = tuple(c for c in mnt[len(prefix):].split(b"/") if c)
            tree.setdefault(comps[:-1], set()).add(comps[-1])
    return tree


def on_network_fs(*paths):
    """Whether any of paths is on a network filesystem (NETWORK_FS)."""
    return bool(set(fs_type(p) for p in paths) & set(NETWORK_FS))


def parallelism(opts, *paths):
    """(threads, workers) for a walk, or a copy between paths: what the user chose (the other
    then 1), else what suits the filesystems."""
    if opts.threads or opts.workers:
        return opts.threads or 1, opts.workers or 1
    # On a network filesystem each lstat/utimensat (each open and create) waits on a
    # server: NETWORK_THREADS threads keep that many calls in flight (the Lustre client
    # bounds what reaches the server at once: mdc.*.max_rpcs_in_flight). On a local disk
    # the cost is CPU: two processes (this one and a worker) where two CPUs are ours.
    if on_network_fs(*paths):
        return NETWORK_THREADS, 1
    return 1, default_workers()


def _process_batch(segments, touch_atime, touch, dry_run, skip_ns, risk_ns, purge_ns,
                   root_dev, euid, record=False):
    """lstat (and touch) every name of every (dir fd, names) segment, closing each fd: the
    per-entry rules of every walk. A directory on another device is a mount point, skipped;
    old entries are at risk or purge-eligible; touch mode touches those older than the skip
    threshold, unless another owner's (euid 0: all are ours). Returns (Counts.BATCH's sums,
    the first errors [(segment, name, errno)], error count, with record _new_columns())."""
    utimensat, times, get_errno, _ = touch_atime if touch and not dry_run else (None,) * 4
    touched = skipped = at_risk = b_risk = elig = b_elig = nerr = not_owned = 0
    risk_not_owned = elig_not_owned = 0
    errs, lstat = [], os.stat
    cols = _new_columns() if record else None
    add_type, add_size, add_atime, add_mtime = [c.append for c in cols] if record else [None] * 4
    for seg, (fd, names) in enumerate(segments):
        try:
            for name in names:
                try:
                    st = lstat(name, dir_fd=fd, follow_symlinks=False)
                except OSError as e:
                    nerr += 1
                    _entry_error(errs, seg, name, e.errno, cols)
                    continue
                mode = st.st_mode
                if mode & 0o170000 == 0o040000 and st.st_dev != root_dev:
                    skipped += 1        # a mount point
                    _entry_error(None, seg, name, None, cols)
                    continue
                a = st.st_atime_ns
                ftype = mode >> 12
                # Setting another owner's atime needs ownership (touch mode does not try).
                theirs = euid and st.st_uid != euid
                if a < risk_ns:
                    size = st.st_size if mode & 0o170000 == 0o100000 else 0
                    at_risk += 1
                    b_risk += size
                    if a < purge_ns:
                        elig += 1
                        b_elig += size
                        elig_not_owned += bool(theirs)
                    risk_not_owned += bool(theirs)
                if touch:
                    if a >= skip_ns:
                        skipped += 1
                    elif theirs:
                        not_owned += 1
                    elif not dry_run and utimensat(fd, name, times, AT_SYMLINK_NOFOLLOW):
                        nerr += 1
                        _entry_error(errs, seg, name, get_errno(), None)
                    else:
                        touched += 1
                        ftype |= _TYPE_TOUCHED
                if record:
                    add_type(ftype)
                    add_size(st.st_size)
                    add_atime(a)
                    add_mtime(st.st_mtime_ns)
        finally:
            os.close(fd)
    return ((touched, skipped, at_risk, b_risk, elig, b_elig, not_owned, risk_not_owned,
             elig_not_owned), errs, nerr, _column_bytes(cols) if record else None)


def _new_columns():
    """A batch's manifest columns, filled as its entries go by: file types (st_mode >> 12,
    _TYPE_TOUCHED added where this walk touched the entry; _KIND_OF_TYPE maps them to kind
    codes in one call), sizes, and atimes and mtimes in ns as found (a division per entry
    costs more than zlib saves; the mtime says whether a copy elsewhere is current).
    The numbers go in lists, packed once per batch: array("q").append parses its argument
    the slow way (PyArg_Parse), 75 ns an entry more for the three."""
    return bytearray(), [], [], []


def _column_bytes(cols):
    """The columns as a manifest chunk takes them: kind codes, and sizes, atimes and
    mtimes as little-endian int64."""
    pack = struct.Struct("<%dq" % len(cols[1])).pack
    return (bytes(cols[0].translate(_KIND_OF_TYPE)), pack(*cols[1]), pack(*cols[2]),
            pack(*cols[3]))


def _entry_error(errs, seg, name, err, cols):
    """An entry the rules could not apply to: its error kept among the first ones logged
    (errs None: not an error, a mount point), its manifest record (cols) says so: a file
    type no file has, vanished (ENOENT) or unknown, size and atime 0."""
    if errs is not None and len(errs) < MAX_LOGGED_ERRORS:
        errs.append((seg, name, err or errno.EIO))
    if cols is not None:
        cols[0].append(_TYPE_GONE if err == errno.ENOENT else _TYPE_UNKNOWN)
        for col in cols[1:]:
            col.append(0)


def _close_inherited_fds(keep):
    """In a forked worker: close every fd but stdio and keep.

    The worker must not hold the dataset's lock (a worker left behind, e.g. stopped, would
    keep the lock from the next run), the log, or the other workers' sockets.
    """
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        fds = range(3, 1024)
    for fd in fds:
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _worker_loop(sock, work):
    """A worker process: batches arrive with their directories' fds (SCM_RIGHTS), and go to
    work (a runner's), in a Batch without frames; its result goes back."""
    _close_inherited_fds(keep=sock.fileno())
    with contextlib.suppress(Exception):    # Linux: die with the main process (PR_SET_PDEATHSIG)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    # A signal to the process group (Ctrl-C, Slurm's TERM at the time limit) is the
    # parent's to act on: it finishes the batches in flight, checkpoints and closes the
    # sockets, and the worker then exits on EOF.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fd_size = array.array("i").itemsize
    while True:      # (EINTR is retried by Python itself: PEP 475)
        msg, anc, _, _ = sock.recvmsg(BATCH_MESSAGE_MAX,
                                      socket.CMSG_SPACE(MAX_SEGMENTS * fd_size))
        if not msg:
            return
        fds = array.array("i")
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fd_size])
        batch = Batch()
        batch_id, blobs, batch.extra = pickle.loads(msg)
        batch.fds, batch.names = list(fds), [blob.split(b"\0") for blob in blobs]
        sock.sendall(pickle.dumps((batch_id, work(batch)), 2))


def _max_inflight():
    """Batches in flight the fd limit allows: each holds up to MAX_SEGMENTS fds."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    fd_budget = max(2 * MAX_SEGMENTS, (min(soft, 4096) - 2 * MAX_OPEN_DIRS) // 2)
    return max(2, fd_budget // MAX_SEGMENTS)


class Batch(object):
    """Entries in the walk's order, one segment per directory: its frame, a dup of its fd
    (the walk may close the frame's own fd before the batch is done) and the names."""

    def __init__(self):
        self.frames = []
        self.fds = []
        self.names = []
        self.size = 0
        self.tag = None             # what done() is given with the result
        self.joined = None          # the names of each segment NUL-joined, once (blobs())
        self.extra = None           # what else a worker process needs (pickled with it)

    def add(self, frame, names):
        if self.frames and self.frames[-1] is frame:
            self.names[-1].extend(names)
        else:
            self.fds.append(os.dup(frame.fd))
            self.frames.append(frame)
            self.names.append(names)
        self.size += len(names)

    def segments(self):
        return list(zip(self.fds, self.names))

    def blobs(self):
        """Each segment's names NUL-joined (a name never holds a NUL), joined once: the
        manifest and a worker's message both take them."""
        if self.joined is None:
            self.joined = [b"\0".join(names) for names in self.names]
        return self.joined

    def close(self):
        """Close the fds of a batch that no runner took (or that a worker got copies of)."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


class InlineRunner(object):
    """Runs each batch as it is handed over, in this thread: the sequential walk.

    The runners' interface: submit(batch) takes a batch and its fds; collect(block)
    takes in finished batches (block: wait for one); drain() waits for all; close().
    Each finished batch goes to done(batch.tag, _process_batch's result), in this thread.
    """
    batch_size = BATCH

    def __init__(self, params, done, count=1, work=None):
        self.params = params        # _process_batch's arguments after the segments
        self.done = done
        self.work = work or self.rules      # what a batch is given to: the walk's rules
        self.inflight = {}          # batch key -> its tag
        self.waiting = None         # called while collect() waits (a copy: stop it, if asked)

    def rules(self, batch):
        return _process_batch(batch.segments(), *self.params)

    def submit(self, batch):
        self.done(batch.tag, self.work(batch))

    def collect(self, block):
        pass

    def drain(self):
        while self.inflight:
            self.collect(block=True)

    def close(self):
        pass


class ThreadRunner(InlineRunner):
    """Batches run on a thread pool: a latency-bound walk (a network filesystem) keeps
    that many metadata calls in flight."""
    batch_size = THREAD_BATCH

    def __init__(self, params, done, count, work=None):
        InlineRunner.__init__(self, params, done, work=work)
        self.futures = concurrent.futures
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=count)
        self.max_inflight = min(_max_inflight(), 2 * count)

    def submit(self, batch):
        while len(self.inflight) >= self.max_inflight:
            self.collect(block=True)
        fut = self.pool.submit(self.work, batch)
        self.inflight[fut] = batch.tag

    def collect(self, block):
        if not self.inflight:
            return
        done, _ = self.futures.wait(list(self.inflight), timeout=None if block else 0,
                                    return_when=self.futures.FIRST_COMPLETED)
        for fut in done:
            self.done(self.inflight.pop(fut), fut.result())

    def close(self):
        self.pool.shutdown(wait=True)


class Worker(object):
    """A forked walk worker: its pid, this process's end of its socket, batches it holds."""

    def __init__(self, pid, sock):
        self.pid = pid
        self.sock = sock
        self.batches = 0


class ProcessRunner(InlineRunner):
    """Batches go to forked worker processes with dups of their directories' fds
    (SCM_RIGHTS): a CPU-bound walk or copy (a local disk) uses more than one CPU. The
    work function runs there on a Batch without frames (fds, names, extra); a worker
    dies with this process (PR_SET_PDEATHSIG).

    count is the processes sharing the work, this one included: it forks count - 1
    workers and takes a batch itself whenever every worker has a backlog (one process
    per CPU: a third process on two CPUs only adds its own overhead)."""

    def __init__(self, params, done, count, work=None):
        InlineRunner.__init__(self, params, done, work=work)
        self.max_inflight = min(_max_inflight(), 4 * count)
        self.next_id = 0
        self.workers = []
        # Memory: what the workers need is imported here, once, and every object this
        # process has so far is moved out of the collector's reach (gc.freeze), so that
        # neither an import nor a collection in a worker copies the pages it shares; then
        # the C heap's free pages go back to the system (glibc's malloc_trim; a no-op
        # elsewhere), so that pages freed before the fork (the file's parse tree, when it
        # runs as `python3 FILE`) are not copied into every worker's share.
        array.array, pickle.dumps       # imported now, before the fork: shared
        gc.collect()
        gc.freeze()         # Python 3.7+, as every ProcessRunner is (parallel_ok)
        self.frozen = True
        with contextlib.suppress(OSError, AttributeError, ImportError):
            ctypes.CDLL(None).malloc_trim(0)
        try:
            for _ in range(count - 1):
                self.workers.append(self._fork())
        except BaseException:
            self.close()
            raise

    def _fork(self):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:    # the worker; it never returns into the caller's code
            code = 1
            try:
                _worker_loop(theirs, self.work)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        return Worker(pid, mine)

    def submit(self, batch):
        if len(self.inflight) >= self.max_inflight:
            self.collect(block=False)
        if len(self.inflight) >= self.max_inflight:
            # Every worker has a backlog: rather than sleep, this process does the batch
            # itself (the counts are sums, so the order they arrive in is moot).
            return InlineRunner.submit(self, batch)
        w = min(self.workers, key=lambda w: w.batches)
        # Names travel NUL-joined (a name never holds a NUL): far cheaper than a pickled list.
        data = pickle.dumps((self.next_id, batch.blobs(), batch.extra), 2)
        try:
            w.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     array.array("i", batch.fds))])
        except (BrokenPipeError, ConnectionResetError):
            raise self._died(w)
        finally:
            batch.close()       # the worker holds its own copies now
        w.batches += 1
        self.inflight[self.next_id] = batch.tag
        self.next_id += 1

    def collect(self, block):
        busy = [w.sock for w in self.workers if w.batches]
        if not busy:
            return
        while True:
            ready = select.select(busy, [], [], 0 if not block else
                                  None if self.waiting is None else STOP_POLL_SECONDS)[0]
            if ready or not block:
                break
            self.waiting()
        for w in self.workers:
            if w.sock in ready:
                self._receive(w)

    def _receive(self, w):
        try:
            data = w.sock.recv(REPLY_MESSAGE_MAX)
        except ConnectionResetError:
            data = b""
        if not data:
            raise self._died(w)
        reply = pickle.loads(data)
        w.batches -= 1
        self.done(self.inflight.pop(reply[0]), reply[1])

    def _died(self, w):
        """The Failure for worker w gone (OOM killer, a stray kill): how it ended, if known."""
        how = ""
        with contextlib.suppress(ChildProcessError):
            for _ in range(50):
                done, status = os.waitpid(w.pid, os.WNOHANG)
                if done and os.WIFSIGNALED(status):
                    sig = os.WTERMSIG(status)
                    how = " (killed by signal %d%s)" % (
                        sig, ", perhaps out of memory" if sig == signal.SIGKILL else "")
                elif done and os.WIFEXITED(status):
                    how = " (exit status %d)" % os.WEXITSTATUS(status)
                if done:
                    break
                time.sleep(0.01)
        return Failure("worker process %d died%s; progress up to the last checkpoint is kept: "
                       "run the command again to resume" % (w.pid, how))

    def close(self):
        for w in self.workers:
            with contextlib.suppress(OSError):
                w.sock.close()        # EOF: the worker exits
        for w in self.workers:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(w.pid, 0)
        self.workers = []
        if self.frozen:
            gc.unfreeze()
            self.frozen = False
        self.inflight = {}


def choose_runner(threads, workers):
    """(runner class, how many it runs): the one place that decides how a walk runs.

    Worker processes when more than one is asked for and Python can pass fds
    (3.7+), else threads when more than one is asked for, else inline.
    """
    if workers > 1 and parallel_ok():
        return ProcessRunner, workers
    if threads > 1:
        return ThreadRunner, threads
    return InlineRunner, 1


class Frame(object):
    """One directory on the walk's explicit stack (a copy's: both sides, see RescueRun)."""
    __slots__ = ("fd", "name", "names", "dirs", "idx", "ident", "parent", "mounts", "key",
                 "dst", "dst_ident", "error", "meta", "made", "pending")

    def __init__(self, fd, name, names, ident, dirs=None, parent=None, mounts=frozenset()):
        # key: the path from the root, NUL between components (b"" for the root), as the
        # manifest keys entries
        self.key = b"" if parent is None else child_key(parent.key, name)
        self.fd = fd                # None while closed: by the fd cap, or reopening failed
        self.name = name            # component name in the parent (bytes), None for the root
        self.names = names          # sorted entry names (bytes)
        self.dirs = dirs            # sorted indexes of the names that are directories
        self.idx = 0                # next name to consume
        self.ident = ident          # (st_dev, st_ino), to check a reopen via ".."
        self.parent = parent        # the parent frame (paths for error messages)
        self.mounts = mounts        # names in this directory that are mount points (mountinfo)
        # A copy's: the destination directory's fd and (st_dev, st_ino); why the source
        # could not be entered (None: it was); the source's (mode, mtime ns) to give the
        # destination when left; made by this run; copies into it still running.
        self.dst = self.dst_ident = self.error = self.meta = None
        self.made = False
        self.pending = 0

    def components(self):
        comps, f = [], self
        while f is not None and f.name is not None:
            comps.append(f.name)
            f = f.parent
        return comps[::-1]


def child_key(key, name):
    return key + b"\0" + name if key else name


def reopen_parent(fd, ident):
    """The directory ".." of directory fd, when it is the one entered as ident (st_dev,
    st_ino), else OSError ESTALE: a directory moved meanwhile has its ".." somewhere else,
    and the walk (or the copy) must not go on there as if it were the dataset."""
    parent = open_dir_ex("..", fd)[0]
    if _ident(os.fstat(parent)) != ident:
        os.close(parent)
        raise OSError(errno.ESTALE, "directory moved during the walk")
    return parent


class Counts(object):
    FIELDS = ("entries_seen", "entries_touched", "entries_skipped", "entries_at_risk",
              "bytes_at_risk", "entries_purge_eligible", "bytes_purge_eligible", "errors",
              "entries_not_owned", "entries_at_risk_not_owned",
              "entries_purge_eligible_not_owned", "dirs_listed_not_owned")
    # The sums _process_batch returns, in its order.
    BATCH = ("entries_touched", "entries_skipped", "entries_at_risk", "bytes_at_risk",
             "entries_purge_eligible", "bytes_purge_eligible", "entries_not_owned",
             "entries_at_risk_not_owned", "entries_purge_eligible_not_owned")

    def __init__(self, doc=None):
        for f in self.FIELDS:
            setattr(self, f, int((doc or {}).get(f, 0)))

    def as_dict(self):
        return dict((f, getattr(self, f)) for f in self.FIELDS)

    def add(self, other):
        for f in self.FIELDS:
            setattr(self, f, getattr(self, f) + getattr(other, f))


class RescueCounts(Counts):
    """A rescue's counts (see the README's JSON section, `rescue`)."""
    FIELDS = ("entries_done", "entries_copied", "bytes_copied", "dirs_created",
              "entries_skipped", "bytes_skipped", "entries_not_rescued", "entries_not_owned",
              "entries_newer_destination", "entries_special", "errors", "temps_removed")

    @property
    def entries_seen(self):
        """What the walker's loop counts its budgets and ticks by: the entries handed out."""
        return self.entries_done


class Walker(object):
    """Depth-first walk of one dataset in byte order, with a resumable cursor.

    Order: the root, then each directory's entries sorted by name bytes, a
    directory's subtree right after the directory itself. The cursor is the
    last entry consumed: {"path": [names], "subtree_done": bool}; everything at
    or before it in that order is done. Resuming skips those entries by
    bisecting each level's sorted listing, without re-walking them.

    This process lists, keeps the stack, the cursor and the budgets, and cuts
    batches in the walk's order (counted when batched: budgets are exact); a
    runner (choose_runner) applies the per-entry rules (_process_batch) to them.
    That work may run ahead of the cursor: it is idempotent, and the cursor is
    recorded only after sync(), so a resume repeats at most the stretch after
    the last checkpoint.

    The engine has three actions: touch and check (mode) here, and copy in
    RescueRun, a Walker that takes its entries from a manifest (_more, _next)
    where a walk lists directories, keeps both sides of the copy in each Frame
    (_push, _shed, _reopen, _leave: the stack's hooks) and gives its runner a
    work function of its own (_runner).
    """

    def __init__(self, root, mode, thresholds, dry_run=False, threads=1, workers=1,
                 root_fd=None, manifest=None):
        self.root = root
        self.manifest = manifest    # a ManifestWriter: every entry is recorded, in order
        self.seq = 0                # batches cut so far (their order in the manifest)
        self.root_fd = root_fd      # open_dataset_root()'s fd: the walk starts from it
        self.euid = os.geteuid()    # 0 (root) may set any atime: everything counts as ours
        self.mount_tree = {}        # mount points below the root (see mount_tree())
        self.root_b = os.fsencode(root)
        self.touch = mode == "touch"
        self.dry_run = dry_run
        self.skip_ns, self.risk_ns, self.purge_ns = thresholds
        self.counts = Counts()
        self.error_paths = []
        self.stack = []
        self.root_dev = None
        self.stop_reason = None
        self.touch_atime = _load_utimensat() if (self.touch and not dry_run) else None
        self.runner_class, self.runner_count = choose_runner(max(1, int(threads or 1)),
                                                             max(1, int(workers or 1)))
        self.runner = None          # started by run(), once the root's device is known
        self.batch = Batch()        # entries batched, not yet handed to the runner

    # -- errors
    def _error(self, name, err, frame=None, count=True):
        """Count an entry that vanished or denied access; log the first ones' paths."""
        if count:
            self.counts.errors += 1
        if len(self.error_paths) < MAX_LOGGED_ERRORS:
            frame = frame or (self.stack[-1] if self.stack else None)     # None: the top
            comps = frame.components() if frame is not None else []
            path = b"/".join([self.root_b] + comps + ([name] if name else []))
            self.error_paths.append("%s: %s" % (display_path(path), os.strerror(err)))

    def _tally(self, tag, result):
        """Add one finished batch's counts and errors (a frame of None: the root itself),
        and its records to the manifest."""
        seq, frames = tag
        sums, errs, nerr, cols = result
        if cols is not None:
            self.manifest.done(seq, cols)
        c = self.counts
        c.errors += nerr
        for field, n in zip(Counts.BATCH, sums):
            setattr(c, field, getattr(c, field) + n)
        for seg, name, err in errs:
            frame = frames[seg]
            self._error(name if frame is not None else None, err, frame, count=False)

    def _params(self):
        """The per-entry rules' arguments (_process_batch's after the segments)."""
        return (self.touch_atime, self.touch, self.dry_run, self.skip_ns, self.risk_ns,
                self.purge_ns, self.root_dev, self.euid, self.manifest is not None)

    def _now(self, frame, fd, name):
        """Apply the rules to the entry name of directory fd at once, in its place in the
        walk's order (after what is batched so far). frame None: the root itself."""
        self._flush()
        batch = Batch()
        batch.fds.append(os.dup(fd))
        batch.frames.append(frame)
        batch.names.append([name])
        self._cut(batch)
        self._tally(batch.tag, _process_batch(batch.segments(), *self._params()))

    def _cut(self, batch):
        """Number the batch and tell the manifest which entries it holds."""
        batch.tag = (self.seq, batch.frames)
        if self.manifest is not None:
            self.manifest.expect(self.seq, [
                (f.key, blob, len(n)) if f is not None else (b"", b"", 1)
                for f, n, blob in zip(batch.frames, batch.names, batch.blobs())])
        self.seq += 1

    def _unlisted(self, key):
        if self.manifest is not None:
            self.manifest.unlisted(key)

    # -- the stack
    def _descend(self, frame, name, batch=False):
        """Open, list and push a subdirectory of frame, unless it is another filesystem.

        With batch, its entry is batched too, with a stat from before its listing:
        listed through O_NOATIME, the listing moves nothing, so the batch stats it as
        usual; where the kernel refused O_NOATIME (another owner's directory), the entry
        is done here and now, before the listing. Errors are counted, never raised.
        Returns True when it was pushed.
        """
        try:
            fd, quiet = open_dir_ex(name, dir_fd=frame.fd)
        except OSError as e:
            if batch:
                self._append(frame, [name])
            if e.errno != errno.ENOTDIR:    # no longer a directory: its batch stats it as is
                self._error(name, e.errno or errno.EIO, frame)
                self._unlisted(child_key(frame.key, name))
            return False
        try:
            st = os.fstat(fd)
            same_fs = st.st_dev == self.root_dev
            if batch and (quiet or not same_fs):
                self._append(frame, [name])     # another filesystem: the rules skip it
            elif batch:
                self._now(frame, frame.fd, name)
            if not same_fs:
                os.close(fd)
                self._unlisted(child_key(frame.key, name))
                return False
            if not quiet:
                self.counts.dirs_listed_not_owned += 1
            names, dirs = list_dir_typed(fd)
        except OSError as e:
            os.close(fd)
            self._error(name, e.errno or errno.EIO, frame)
            self._unlisted(child_key(frame.key, name))
            return False
        self._push(Frame(fd, name, names, (st.st_dev, st.st_ino), dirs, frame,
                         self._mounts_below(frame, name)))
        return True

    def _push(self, frame):
        """Put frame on the stack. WARNING: deep trees would exhaust file descriptors: the
        frame MAX_OPEN_DIRS below the top (never the root) closes its fds (_shed), and is
        reopened through ".." of its child when the walk climbs back to it (_pop)."""
        self.stack.append(frame)
        if len(self.stack) > MAX_OPEN_DIRS + 1:
            self._shed(self.stack[-MAX_OPEN_DIRS - 1], self.stack[-MAX_OPEN_DIRS])

    def _shed(self, frame, child):
        if frame.fd is not None:
            os.close(frame.fd)
            frame.fd = None

    def _mounts_below(self, parent, name):
        """The names of mount points in the directory parent/name (usually none)."""
        if not self.mount_tree:
            return frozenset()
        return self.mount_tree.get(tuple(parent.components() + [name]), frozenset())

    def _pop(self):
        """Leave the top directory; reopen its parent through ".." if the fd cap closed it."""
        child = self.stack.pop()
        if self.stack and self.stack[-1].fd is None:
            self._reopen(self.stack[-1], child)
        self._leave(child)

    def _reopen(self, parent, child):
        """Reopen parent, shed by the fd cap, through ".." of child: the directory it was,
        or the rest of it is an error (reopen_parent)."""
        try:
            if child.fd is None:        # its own reopening failed: no way up from it
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
            parent.fd = reopen_parent(child.fd, parent.ident)
        except OSError as e:
            self._error(None, e.errno or errno.EIO)
            self._unlisted(parent.key)
            parent.idx = len(parent.names)      # cannot continue this directory

    def _leave(self, child):
        if child.fd is not None:
            os.close(child.fd)

    def close(self):
        self.batch.close()
        while self.stack:
            f = self.stack.pop()
            for fd in (f.fd, f.dst):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        if self.runner is not None:
            self.runner.close()
            self.runner = None

    # -- cursor
    def cursor(self):
        """The position after the last consumed entry (see the class docstring)."""
        if not self.stack:
            return None
        top = self.stack[-1]
        comps = top.components() + ([top.names[top.idx - 1]] if top.idx else [])
        return {"path": [encode_name(c) for c in comps], "subtree_done": top.idx > 0}

    def _start(self, cursor):
        """Visit the root (unless the cursor says it is done) and set up the stack.

        The root is opened from root_fd (open_dataset_root: no symlink on the way) when
        given, and visited through its fd (as "." of it) before it is listed.
        """
        fd = self._open_root()
        try:
            st = os.fstat(fd)
            self.root_dev = st.st_dev
            if cursor is None:
                self._now(None, fd, b".")
                self.counts.entries_seen += 1
            self.mount_tree = mount_tree(fd)
            names, dirs = list_dir_typed(fd)
        except OSError as e:
            os.close(fd)
            raise Failure("cannot list the dataset root %s (%s)" % (self.root, e.strerror))
        self.stack.append(Frame(fd, None, names, (st.st_dev, st.st_ino), dirs, None,
                                self.mount_tree.get((), frozenset())))
        if cursor is not None:
            self._seek([decode_name(c) for c in cursor.get("path", [])],
                       bool(cursor.get("subtree_done")))

    def _open_root(self):
        """The root's directory fd (O_NOATIME where ours); dirs_listed_not_owned if not."""
        try:
            fd, quiet = open_dir_ex(self.root_b if self.root_fd is None else ".", self.root_fd)
        except OSError as e:
            raise Failure("cannot open the dataset root %s (%s)" % (
                self.root, "not a directory" if e.errno == errno.ENOTDIR else e.strerror))
        if not quiet:
            self.counts.dirs_listed_not_owned += 1
        return fd

    def _seek(self, path, subtree_done):
        """Position the stack just after `path` without visiting anything before it."""
        for depth, comp in enumerate(path):
            frame = self.stack[-1]
            i = bisect.bisect_left(frame.names, comp)
            if i == len(frame.names) or frame.names[i] != comp:
                frame.idx = i   # the cursor's entry is gone; resume at its successor
                return
            frame.idx = i + 1
            if depth == len(path) - 1 and subtree_done:
                return
            # gone since the checkpoint (mode 0): carry on after it
            if (not stat.S_ISDIR(_lstat_mode(comp, frame.fd)) or comp in frame.mounts
                    or not self._descend(frame, comp)):
                return

    # -- the walk
    def run(self, cursor=None, max_entries=None, deadline=None, should_stop=None,
            on_tick=None, tick_every=BATCH):
        """Walk until done or stopped. Returns True when the walk completed.

        on_tick(walker) is called about every tick_every entries at a consistent
        point (checkpoints, progress). should_stop() returns a reason or None.
        """
        self._start(cursor)
        self.runner = self._runner()
        counts = self.counts
        next_tick = counts.entries_seen + tick_every
        while self._more():
            if counts.entries_seen >= next_tick:
                next_tick = counts.entries_seen + tick_every
                self.runner.collect(block=False)
                if on_tick is not None:
                    on_tick(self)
            reason = stop_reason(should_stop, deadline, max_entries, counts.entries_seen)
            if reason:
                self.sync()
                self.stop_reason = reason
                return False
            limit = next_tick - counts.entries_seen     # a tick lands between two entries
            if max_entries is not None:
                limit = min(limit, max_entries - counts.entries_seen)
            self._next(limit)
        self.sync()
        return True

    def _runner(self):
        return self.runner_class(self._params(), self._tally, self.runner_count)

    def _more(self):
        """Climb out of the directories that are done; False when the walk is."""
        stack = self.stack
        while stack and stack[-1].idx >= len(stack[-1].names):
            self._pop()
        return bool(stack)

    def _next(self, limit):
        """Take the walk's next entries, at most limit: batch the top directory's next
        names up to and including a subdirectory, whose own entries come next in the walk's
        order; then enter it (unless the mount table lists it: counted as skipped)."""
        frame = self.stack[-1]
        start = frame.idx
        end = min(len(frame.names), start + self.runner.batch_size, start + limit)
        dirs = frame.dirs
        j = bisect.bisect_left(dirs, start)
        is_dir = j < len(dirs) and dirs[j] < end
        k = dirs[j] + 1 if is_dir else end
        # The subdirectory itself is batched by _descend, its stat from before its listing.
        self._append(frame, frame.names[start:k - 1 if is_dir else k])
        self.counts.entries_seen += k - start
        frame.idx = k
        if is_dir and frame.names[k - 1] in frame.mounts:
            self._append(frame, frame.names[k - 1:k])
        elif is_dir:
            self._descend(frame, frame.names[k - 1], batch=True)

    def _append(self, frame, names):
        """Batch names of frame; hand the batch to the runner once it is full."""
        if frame.mounts:
            # Mount points the mount table lists (bind mounts): never handed to the rules,
            # which see only st_dev; counted as skipped here.
            kept = [n for n in names if n not in frame.mounts]
            self.counts.entries_skipped += len(names) - len(kept)
            for n in names:
                if n in frame.mounts:
                    self._unlisted(child_key(frame.key, n))
            names = kept
        if not names:
            return      # WARNING: an empty segment would reach a worker as one name, b""
        batch = self.batch
        batch.add(frame, names)
        if batch.size >= self.runner.batch_size or len(batch.frames) >= MAX_SEGMENTS:
            self._flush()

    def _flush(self):
        """Hand the batch being built to the runner."""
        batch, self.batch = self.batch, Batch()
        if batch.frames:
            self._cut(batch)
            self.runner.submit(batch)

    def sync(self):
        """Wait until every entry batched so far is done: counts and cursor then agree."""
        if self.runner is not None:
            self._flush()
            self.runner.drain()


# ---------------------------------------------------------------- manifests
#
# A manifest lists every entry a walk found, in the walk's order, as found (before any
# touch). File: MANIFEST_MAGIC, a JSON header line, then records, each a tag byte and
# struct "<II" (length, count) before its data:
#   C  a chunk of entries: zlib of (segment table, names, kinds, sizes, atimes), see
#      ManifestWriter._encode; chunks are independent, so a reader needs one at a time
#   U  directories the walk could not list (or finish): entries below them are unknown
#   E  the trailer (JSON: entries, walk_finished), written once the walk is complete
# and, after E, "<Q": the trailer record's offset. A partial manifest (the walk still
# going or stopped) has no E; the checkpoint records how far it is valid.
# Entry keys are relative paths with NUL between components ("" is the root): NUL sorts
# below every byte a name may hold, so byte order of keys is the walk's order
# (component-wise: run/x before run-2.txt), and merges compare keys in C.

MANIFEST_MAGIC = b"SKMANIFEST\n"
MANIFEST_FORMAT = 2             # 2: mtimes, and the header says whose manifest it is
MANIFEST_CHUNK = 4096           # entries per chunk (the writer's buffer; 8192: +0.5 MiB RSS)
MANIFEST_LEVEL = 1              # zlib level: 6 took 8 times as long, for 5% less
MANIFEST_KEEP = 2               # complete manifests kept per dataset
MANIFEST_HEADER_MAX = 64 * 1024     # the header line is read up to this length
K_FILE, K_DIR, K_LINK, K_OTHER = 0, 1, 2, 3
K_TOUCHED = 4                   # flag: this walk set the entry's atime
K_UNKNOWN = 8                   # lstat failed (not ENOENT): there, state unknown
K_GONE = 9                      # vanished while the walk listed it: not an entry
SENTINEL_KEY = SENTINEL.encode()     # the tool's own file, never an entry of the user's
KIND_NAMES = {K_FILE: "file", K_DIR: "dir", K_LINK: "symlink", K_OTHER: "other",
              K_UNKNOWN: "unknown"}
_TYPE_GONE, _TYPE_UNKNOWN = 0o11, 0o17      # file types (st_mode >> 12) that no file has
_TYPE_TOUCHED = 0o20                        # added to a file type: this walk touched it
_KIND_OF_TYPE = bytes({0o10: K_FILE, 0o04: K_DIR, 0o12: K_LINK, _TYPE_GONE: K_GONE,
                       _TYPE_UNKNOWN: K_UNKNOWN}.get(t & 0o17, K_OTHER)
                      | (K_TOUCHED if t & _TYPE_TOUCHED else 0) for t in range(256))
_BIG_ENDIAN = sys.byteorder == "big"


def key_path(key):
    """An entry key -> its path relative to the root (bytes; b"." for the root)."""
    return key.replace(b"\0", b"/") if key else b"."


def _le(arr):
    """array arr as little-endian bytes (the manifest's byte order on every machine)."""
    if _BIG_ENDIAN:
        arr = array.array(arr.typecode, arr)
        arr.byteswap()
    return arr.tobytes()


def _from_le(typecode, data):
    arr = array.array(typecode)
    arr.frombytes(data)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr


def byte_planes(data):
    """8-byte numbers as 8 planes: every first byte, then every second, ... The high bytes
    of sizes and times are mostly alike, so zlib makes short work of their planes (3 times
    faster than the numbers as they are, and smaller)."""
    return b"".join(data[i::8] for i in range(8))


def from_byte_planes(data, n):
    """byte_planes(data) of n numbers -> their array("q")."""
    out = bytearray(8 * n)
    for i in range(8):
        out[i::8] = data[i * n:(i + 1) * n]
    return _from_le("q", bytes(out))


class ManifestChunk(object):
    """One decoded chunk: keys (walk order), kinds (bytes), sizes, atimes and mtimes
    (arrays; times in ns; mtimes None in a format 1 manifest)."""
    __slots__ = ("keys", "kinds", "sizes", "atimes", "mtimes")

    def __init__(self, keys, kinds, sizes, atimes, mtimes):
        self.keys, self.kinds, self.sizes, self.atimes, self.mtimes = (
            keys, kinds, sizes, atimes, mtimes)


MANIFEST_RECORD_MAX = 64 * MiB     # what one record decodes to, at most (4,096 entries
# with 16 KiB paths): a small record that inflates without end is damaged, not a hang


def inflate(data, limit=MANIFEST_RECORD_MAX):
    """zlib data -> bytes, never more than limit (ValueError past it)."""
    d = zlib.decompressobj()
    raw = d.decompress(data, limit)
    if d.unconsumed_tail:
        raise ValueError("it inflates past %s" % human_bytes(limit))
    return raw


def decode_chunk(data, count):
    """A C record's data -> ManifestChunk (raises ValueError when it does not add up)."""
    raw = inflate(data)
    nseg, nent, names_len = struct.unpack_from("<III", raw, 0)
    if nent != count:
        raise ValueError("entry count")
    table = _from_le("I", raw[12:12 + 8 * nseg])
    dpos = 12 + 8 * nseg
    pos = dpos + sum(table[0::2])
    name_list = raw[pos:pos + names_len].split(b"\0") if nent else []
    pos += names_len
    keys = []
    kinds = raw[pos:pos + nent]
    sizes = from_byte_planes(raw[pos + nent:pos + 9 * nent], nent)
    atimes = from_byte_planes(raw[pos + 9 * nent:pos + 17 * nent], nent)
    mtimes = None
    if len(raw) == pos + 25 * nent and nent:        # format 2: mtimes follow
        mtimes = from_byte_planes(raw[pos + 17 * nent:pos + 25 * nent], nent)
    elif len(raw) != pos + 17 * nent:
        raise ValueError("lengths")
    if len(name_list) != nent or len(kinds) != nent or len(atimes) != nent:
        raise ValueError("lengths")
    i = 0
    for s in range(nseg):
        dlen, n = table[2 * s], table[2 * s + 1]
        seg = name_list[i:i + n]
        if dlen:
            keys.extend(map((raw[dpos:dpos + dlen] + b"\0").__add__, seg))
        else:
            keys.extend(seg)
        dpos += dlen
        i += n
    if i != nent:
        raise ValueError("segments")
    return ManifestChunk(keys, kinds, sizes, atimes, mtimes)


class Manifest(object):
    """A manifest on disk, read as a stream: header (dict), trailer (dict, None when the
    walk that wrote it did not complete), chunks(), entries(), unlisted keys seen so far."""

    def __init__(self, path):
        self.path = path
        fd = open_state(path, "manifest")
        if fd is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        self.f = os.fdopen(fd, "rb")
        try:
            if self.f.read(len(MANIFEST_MAGIC)) != MANIFEST_MAGIC:
                raise self._bad("not a manifest")
            self.header = json.loads(self.f.readline(MANIFEST_HEADER_MAX).decode("utf-8"))
            if not isinstance(self.header, dict):
                raise self._bad("header")
            fmt = self.header.get("format", 1)
            if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
                raise self._bad("format %r" % (fmt,))
            if fmt > MANIFEST_FORMAT:
                raise StateError("the manifest %s has format %s; this version reads up to %d: "
                                 "upgrade scratch-keepalive" % (path, self.header.get("format"),
                                                                MANIFEST_FORMAT))
            self.start = self.f.tell()
            self.trailer = self._read_trailer()
        except BaseException as e:
            self.f.close()
            if isinstance(e, ValueError):       # UnicodeDecodeError too
                raise self._bad(str(e))
            raise
        self.unlisted = set()

    def _bad(self, why):
        return StateError("the manifest %s is damaged (%s); the next complete walk writes a new "
                          "one" % (self.path, why))

    def _read_trailer(self):
        size = os.fstat(self.f.fileno()).st_size
        if size < self.start + 17:
            return None
        self.f.seek(size - 8)
        off = struct.unpack("<Q", self.f.read(8))[0]
        if not self.start <= off < size - 8:
            return None
        self.f.seek(off)
        head = self.f.read(9)
        if len(head) != 9 or head[:1] != b"E":
            return None
        length = struct.unpack("<II", head[1:])[0]
        if off + 9 + length != size - 8:
            return None
        doc = json.loads(self.f.read(length).decode("utf-8"))
        return doc if isinstance(doc, dict) else None

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def chunks(self):
        """Each chunk, decoded, in the walk's order; U records add to self.unlisted."""
        f = self.f
        f.seek(self.start)
        while True:
            head = f.read(9)
            if not head:
                return
            if len(head) != 9:
                raise self._bad("truncated record")
            tag = head[:1]
            length, count = struct.unpack("<II", head[1:])
            if tag == b"E":
                return
            data = f.read(length)
            if len(data) != length or tag not in (b"C", b"U"):
                raise self._bad("truncated record")
            try:
                if tag == b"U":
                    self.unlisted.update(decode_unlisted(data, count))
                else:
                    yield decode_chunk(data, count)
            except (ValueError, IndexError, zlib.error, struct.error) as e:
                raise self._bad("chunk: %s" % e)

    def entries(self):
        """(key, kind code, size, atime seconds) of every entry, in the walk's order."""
        for c in self.chunks():
            for i, key in enumerate(c.keys):
                if c.kinds[i] != K_GONE:
                    yield key, c.kinds[i], c.sizes[i], c.atimes[i] // 1000000000
            c = key = None      # not held while the next chunk is decoded: one at a time


def decode_unlisted(data, count):
    raw = inflate(data)
    lengths = _from_le("I", raw[:4 * count])
    keys, pos = [], 4 * count
    for n in lengths:
        keys.append(raw[pos:pos + n])
        pos += n
    if pos != len(raw):
        raise ValueError("unlisted lengths")
    return keys


def new_sha1():
    """A new SHA-1 object, from CPython's own _sha1 where it is there: hashlib loads
    OpenSSL's libcrypto, which adds almost 4 MiB to the walk's peak memory."""
    try:
        return _sha1.sha1()
    except ImportError:
        return hashlib.sha1()


class ManifestWriter(object):
    """Writes a walk's manifest as it goes: batches arrive out of order from the runners
    and are put back in the walk's order (expect() in order, done() in any); a chunk is
    compressed on the writer's one compressing thread (zlib lets go of the GIL; a thread
    started per chunk cost the walk 1-5 ms a chunk) and written in order.

    The file is written in place (it is partial until finish(), which adds the trailer);
    position() is what a checkpoint records, and a resume truncates the file back to it.
    """

    def __init__(self, store, name, header=None, resume=None):
        self.path = store.partial_manifest_path(name)
        store.ensure()
        dfd = store.make_dir("manifests", name)     # never through a link: see open_state
        try:
            self.fd = open_state(self.path, "manifest", os.O_WRONLY | os.O_CREAT, dir_fd=dfd)
        finally:
            os.close(dfd)
        if self.fd is None:
            raise StateError("cannot create the manifest %s (its directory vanished); run the "
                             "command again" % display_path(self.path))
        try:
            if resume:
                os.ftruncate(self.fd, resume["offset"])
                os.lseek(self.fd, resume["offset"], os.SEEK_SET)
                self.entries = resume["entries"]
            else:
                os.ftruncate(self.fd, 0)
                head = MANIFEST_MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n"
                self._write(head)
                self.entries = 0
        except BaseException:
            os.close(self.fd)
            raise
        # A digest of the keys alone, in order, however the batches were cut: two manifests
        # with the same one hold the same entries, and their merge can be skipped. (Not
        # kept across a resume: a resumed walk's manifest is merged the long way.)
        self.digest = None if resume else new_sha1()
        self.digest_dir = None
        self.expected = {}          # seq -> segments [(dir key, names blob, count)]
        self.ready = {}             # seq -> (kinds, sizes, atimes) bytes
        self.next_seq = None
        self._new_chunk()
        self.unlisted_keys = []
        self.pending = None         # the entries of the chunk being compressed
        self.thread = None          # the compressing thread, started with the first chunk
        self.job = None             # what it compresses next (None: end)
        self.result = None          # what it compressed (None: it failed)

    def _new_chunk(self):
        self.seg_dirs, self.seg_counts, self.names = [], [], []
        self.kinds, self.sizes, self.atimes, self.mtimes = [], [], [], []
        self.count = 0

    def _write(self, data):
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    # -- batches, in the walk's order
    def expect(self, seq, segments):
        if self.next_seq is None:
            self.next_seq = seq
        self.expected[seq] = segments

    def done(self, seq, columns):
        self.ready[seq] = columns
        while self.next_seq in self.ready:
            cols = self.ready.pop(self.next_seq)
            segs = self.expected.pop(self.next_seq)
            self.next_seq += 1
            self._add(segs, cols)

    def _add(self, segs, cols):
        digest = self.digest
        for d, blob, n in segs:
            self.seg_dirs.append(d)
            self.seg_counts.append(n)
            self.names.append(blob)
            if digest is not None:
                if d != self.digest_dir:
                    digest.update(b"\1" + d + b"\1")
                    self.digest_dir = d
                digest.update(blob + b"\0")
        self.kinds.append(cols[0])
        self.sizes.append(cols[1])
        self.atimes.append(cols[2])
        self.mtimes.append(cols[3])
        self.count += len(cols[0])
        if self.count >= MANIFEST_CHUNK:
            self._emit()

    def unlisted(self, key):
        """A directory the walk could not list or finish: what is below it is unknown."""
        self.unlisted_keys.append(key)

    # -- chunks
    def _encode(self):
        """The chunk being built, uncompressed, in one bytes: "<III" (segments,
        entries, names length), per segment "<II" (length of its directory's key, entries),
        the directory keys, the names (NUL between), kinds, sizes, atimes and mtimes (in
        byte_planes). (zlib takes care of the keys' shared prefixes.)"""
        table = array.array("I")
        for d, n in zip(self.seg_dirs, self.seg_counts):
            table.append(len(d))
            table.append(n)
        names = [b"\0"] * (2 * len(self.names) - 1) if self.names else []
        names[::2] = self.names
        size = sum(len(x) for x in names)
        return b"".join([struct.pack("<III", len(self.seg_dirs), self.count, size),
                         _le(table), b"".join(self.seg_dirs)] + names + [
                         b"".join(self.kinds), byte_planes(b"".join(self.sizes)),
                         byte_planes(b"".join(self.atimes)),
                         byte_planes(b"".join(self.mtimes))])

    def _emit(self):
        """Hand the chunk being built to the compressing thread (after the last one)."""
        self._flush_unlisted()
        if not self.count:
            return
        raw, count = self._encode(), self.count
        self._new_chunk()
        self._wait()
        if self.thread is None:
            self.todo, self.ready_lock = _thread.allocate_lock(), _thread.allocate_lock()
            self.todo.acquire()
            self.ready_lock.acquire()
            self.thread = threading.Thread(target=self._compressing, name="manifest-zlib")
            self.thread.daemon = True
            self.thread.start()
        self.job, self.pending = raw, count
        self.todo.release()

    def _compressing(self):
        """The compressing thread: one chunk per release of todo, until a job of None."""
        while True:
            self.todo.acquire()
            raw, self.job, self.result = self.job, None, None
            if raw is None:
                return
            try:
                self.result = zlib.compress(raw, MANIFEST_LEVEL)
            finally:
                # WARNING: drop the chunk before waiting for the next one, or a second
                # chunk's worth of memory stays held for the whole walk.
                raw = None
                self.ready_lock.release()

    def _wait(self):
        """Write the chunk the thread compressed (waiting for it)."""
        if self.pending is None:
            return
        count, self.pending = self.pending, None
        self.ready_lock.acquire()
        if self.result is None:
            raise Failure("compressing the manifest %s failed" % self.path)
        data, self.result = self.result, None
        self._record(b"C", data, count)
        self.entries += count

    def _record(self, tag, data, count):
        self._write(tag + struct.pack("<II", len(data), count) + data)

    def _flush_unlisted(self):
        if not self.unlisted_keys:
            return
        keys, self.unlisted_keys = self.unlisted_keys, []
        self._wait()        # U goes after every chunk that precedes it in the walk
        lengths = array.array("I", [len(k) for k in keys])
        self._record(b"U", zlib.compress(_le(lengths) + b"".join(keys)), len(keys))

    def position(self):
        """Everything so far on disk (fsync'ed): the checkpoint's {"offset", "entries"}.
        Only call when every expected batch is done (the walk's sync())."""
        self._emit()
        self._wait()
        os.fsync(self.fd)
        return {"offset": os.lseek(self.fd, 0, os.SEEK_CUR), "entries": self.entries}

    def finish(self, trailer):
        """Write what is left and the trailer: the manifest is complete."""
        pos = self.position()
        trailer = dict(trailer, entries=pos["entries"],
                       keys_digest=self.digest.hexdigest() if self.digest else None)
        data = json.dumps(trailer, sort_keys=True).encode()
        self._record(b"E", data, 0)
        self._write(struct.pack("<Q", pos["offset"]))
        os.fsync(self.fd)
        self.close()
        return pos["entries"]

    def close(self):
        if self.thread is not None:
            if self.pending is not None:
                self.ready_lock.acquire()
                self.pending = None
            self.job = None
            self.todo.release()
            self.thread.join()
            self.thread = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def vanished(prev, new, now, purge_days):
    """The entries of manifest prev that manifest new lacks, in the walk's order, by the walk
    that ends at now (policy clock): (key, kind, size, atime seconds, mtime ns or None,
    likely purged), each read once (both in walk order: one pass, a chunk of each in
    memory). Entries below a directory new could not list are unknown, not vanished; so are
    entries prev could not stat, and the sentinel."""
    old = prev.chunks()
    cur, start = None, 0
    prev_now = walk_now(prev)

    def below_unlisted(key):
        i = key.find(b"\0")
        while i >= 0:
            if key[:i] in new.unlisted:
                return True
            i = key.find(b"\0", i + 1)
        return key in new.unlisted

    def take(hi, present):
        """prev's entries up to key hi (None: all) missing from the set present."""
        nonlocal cur, start
        while True:
            if cur is None or start >= len(cur.keys):
                cur = keys = None       # not held while the next chunk is decoded
                cur = next(old, None)
                start = 0
                if cur is None:
                    return
            keys = cur.keys
            end = len(keys) if hi is None else bisect.bisect_right(keys, hi, start)
            span = keys[start:end] if start or end < len(keys) else keys
            if not present.issuperset(span):        # the usual case: nothing vanished
                mt = cur.mtimes
                for i in range(start, end):
                    k, kind = keys[i], cur.kinds[i]
                    if k not in present and kind < K_UNKNOWN and k != SENTINEL_KEY and \
                            not below_unlisted(k):
                        atime = cur.atimes[i] // 1000000000
                        yield (k, kind, cur.sizes[i], atime, None if mt is None else mt[i],
                               likely_purged(kind, atime, prev_now, now, purge_days))
            start = end
            if end < len(keys):
                return
    for chunk in new.chunks():
        if chunk.keys:
            yield from take(chunk.keys[-1], set(chunk.keys))
        chunk = None        # as above: one chunk of each manifest in memory
    yield from take(None, frozenset())


def partial_matches(path, walk_started, position):
    """True when path is the partial manifest of the walk begun at walk_started and holds
    at least what the checkpoint's position says."""
    try:
        with Manifest(path) as m:
            ok = m.header.get("walk_started") == walk_started and m.trailer is None
            return ok and os.fstat(m.f.fileno()).st_size >= int(position["offset"])
    except (OSError, Failure, TypeError, KeyError, ValueError):
        return False


def _plausible(v, lo, hi):
    """v is a number (not a bool, not NaN) within [lo, hi]."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi


def manifest_problem(h, ds, cfg, now, number=None, root_id=None):
    """Why the manifest header h cannot stand for a walk of dataset ds (None: it can):
    another dataset's or another root's, out of its sequence (number: its file's), or
    values no walk of ds could have written. now: the policy clock; walk starts are real
    times, checked against when ds was added and the real clock."""
    if h.get("dataset") != ds["name"] or h.get("root") != ds["path"]:
        return "it is not this dataset's (it names %r at %s)" % (h.get("dataset"), h.get("root"))
    if ds.get("registration") and h.get("registration") != ds["registration"]:
        return "it is of an earlier registration of this dataset (removed since)"
    if h.get("format", 1) >= 2:
        if root_id is not None and [h.get("root_dev"), h.get("root_ino")] != list(root_id):
            return "it is of another directory at the dataset's path"
        if number is not None and h.get("seq") != number:
            return "its sequence number %r is not its file's (%d)" % (h.get("seq"), number)
    prof = profile_of(cfg)
    started = h.get("walk_started")
    started = parse_iso(started) if isinstance(started, str) else None
    added = parse_iso(ds["added"]) if ds.get("added") else 0
    thresholds = h.get("thresholds_days")
    if (not _plausible(h.get("now"), added - DAY, now + DAY)
            or not _plausible(h.get("purge_days"), prof["min_cadence"] + 5, 3650)
            or started is None or not added - DAY <= started <= time.time() + DAY
            or not isinstance(thresholds, list) or len(thresholds) != 3
            or not all(_plausible(t, -3650, 3650) for t in thresholds)):
        return "its header holds values no walk of this dataset wrote"
    return None


def root_identity(path):
    """(st_dev, st_ino) of a dataset root that is a directory (not a symlink), else None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def likely_purged(kind, atime, prev_now, new_now, purge_days):
    """THE likely-purged rule: an entry that vanished between two walks was likely taken
    by the site's purge when purge days had passed, by the later walk, since its last
    access as the earlier walk left it (that walk's time where it touched the entry)."""
    last = max(atime, prev_now) if kind & K_TOUCHED else atime
    return last < new_now - purge_days * DAY


def same_mtime(copy_ns, source_ns):
    """A copy's mtime is its source's: to the nanosecond, or to the second where the copy
    keeps whole seconds only (some network filesystems)."""
    return copy_ns == source_ns or (copy_ns % 10 ** 9 == 0 and
                                    copy_ns // 10 ** 9 == source_ns // 10 ** 9)


def copy_of(dest, key, kind, size, mtime_ns):
    """The absolute path of a current copy of an entry in a rescue destination (bytes), or
    None: of the same kind, the size the manifest recorded (files; symlinks: the target's
    length) and the same mtime (same_mtime()), as rescue leaves its copies; an entry whose
    mtime the manifest lacks (format 1) has none."""
    if not dest or mtime_ns is None or not key:
        return None
    *dirs, name = key.split(b"\0")
    # Never through a symlink below dest: one into scratch would call the purged file safe.
    try:
        fd = open_below(os.open(os.fsencode(dest), O_DIR_FLAGS), dirs, O_DIR_FLAGS,
                        lambda dir_fd, i, e: e)
        try:
            st = os.lstat(name, dir_fd=fd)
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return None
    path = os.path.join(os.fsencode(dest), key_path(key))
    k = kind & ~K_TOUCHED
    same_kind = {K_FILE: stat.S_ISREG, K_DIR: stat.S_ISDIR, K_LINK: stat.S_ISLNK}.get(k)
    ok = (same_kind is not None and same_kind(st.st_mode)
          and (k == K_DIR or st.st_size == size) and same_mtime(st.st_mtime_ns, mtime_ns))
    return path if ok else None


# A purge record: what vanished between two complete walks, kept until a newer purge
# replaces it (the manifests it came from are soon rotated away). File: PURGE_MAGIC, then
# gzip of JSON lines: a header {dataset, walk_started, previous_walk_started, dest}, then
# one line per vanished entry {k: key (base64), t: kind, s: size, a: atime, m: mtime ns,
# p: likely purged, c: a copy in dest when found}.
PURGE_MAGIC = b"SKPURGE\n"
PURGE_SEEN_DAYS = 14            # status --brief names an unseen purge this long
PURGE_COUNTS = ("entries_vanished", "bytes_vanished", "entries_likely_purged",
                "bytes_likely_purged", "entries_with_copy", "entries_without_copy",
                "likely_purged_with_copy", "likely_purged_without_copy")


class PurgeWriter(object):
    """Counts what vanished between two manifests, writes the entries to a new purge file
    (O_EXCL, never through a link) and says whether each had a copy in dest."""

    def __init__(self, dir_fd, name, header):
        self.name, self.dir_fd = name, dir_fd
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
        self.raw = os.fdopen(fd, "wb")
        self.raw.write(PURGE_MAGIC)
        self.z = gzip.GzipFile(fileobj=self.raw, mode="wb", compresslevel=6)
        self.dest = header.get("dest")
        self.counts = dict.fromkeys(PURGE_COUNTS, 0)
        self._line(header)

    def _line(self, doc):
        self.z.write((json.dumps(doc, sort_keys=True) + "\n").encode("ascii"))

    def add(self, key, kind, size, atime, mtime_ns, purged):
        c = self.counts
        copied = copy_of(self.dest, key, kind, size, mtime_ns) is not None
        data = size if kind & ~K_TOUCHED == K_FILE else 0      # bytes: regular files'
        c["entries_vanished"] += 1
        c["bytes_vanished"] += data
        c["entries_with_copy" if copied else "entries_without_copy"] += 1
        if purged:
            c["entries_likely_purged"] += 1
            c["bytes_likely_purged"] += data
            c["likely_purged_with_copy" if copied else "likely_purged_without_copy"] += 1
        self._line({"k": base64.b64encode(key).decode("ascii"), "t": kind, "s": size,
                    "a": atime, "m": mtime_ns, "p": purged, "c": copied})

    def close(self, keep):
        self.z.close()
        self.raw.flush()
        if keep:
            os.fsync(self.raw.fileno())
        self.raw.close()
        if not keep:
            with contextlib.suppress(OSError):
                os.unlink(self.name, dir_fd=self.dir_fd)


PURGE_LINE_MAX = MiB       # one entry's line, at most (a path of 700 KiB, in base64)


def read_purge(path, entries_max=None):
    """A purge file -> (header, iterator of entry dicts); raises StateError when damaged,
    and when it holds more than entries_max entries (its record's count) or a line longer
    than any entry's: never read without end."""
    fd = open_state(path, "purge record")
    if fd is None:
        raise StateError("the purge record %s is missing; the next purge a walk finds "
                         "replaces it" % path)
    f = os.fdopen(fd, "rb")
    try:
        if f.read(len(PURGE_MAGIC)) != PURGE_MAGIC:
            raise ValueError("not a purge record")
        z = gzip.GzipFile(fileobj=f, mode="rb")
        header = json.loads(z.readline(PURGE_LINE_MAX).decode("ascii"))
        if not isinstance(header, dict):
            raise ValueError("header")
    except (OSError, ValueError, EOFError, UnicodeDecodeError) as e:
        f.close()
        raise StateError("the purge record %s is damaged (%s); the next purge a walk finds "
                         "replaces it" % (path, e))

    def entries():
        try:
            n = 0
            while True:
                line = z.readline(PURGE_LINE_MAX)
                if not line:
                    return
                n += 1
                if not line.endswith(b"\n") or (entries_max is not None and n > entries_max):
                    raise ValueError("more than its record holds")
                d = json.loads(line.decode("ascii"))
                d["k"] = base64.b64decode(d["k"])
                yield d
        except (OSError, ValueError, EOFError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise StateError("the purge record %s is damaged (%s)" % (path, e))
        finally:
            f.close()
    return header, entries()


def walk_now(m):
    """The policy clock when the walk that wrote manifest m ended (its last run, for a
    resumed walk: the trailer says; else when it began): what it touched, it touched by
    then."""
    now = (m.trailer or {}).get("now")
    return float(now if _plausible(now, 0, 1e11) else m.header["now"])


def find_purge(prev, new, purge_days, out, now):
    """What vanished between manifests prev and new, by the walk that ends at now (policy
    clock): each entry written to out (a PurgeWriter), which counts them; its counts. When
    both hold the same keys (their digests say so), nothing vanished: no need to read them."""
    same = ((prev.trailer or {}).get("keys_digest")
            and prev.trailer["keys_digest"] == (new.trailer or {}).get("keys_digest"))
    if not same:
        for item in vanished(prev, new, now, purge_days):
            out.add(*item)
    return out.counts


# ---------------------------------------------------------------- commands: the context


class Context(object):
    """What one invocation works with: the state dir, the environment, the output streams,
    and the Slurm handle (its commands run by `runner` when one is given)."""

    def __init__(self, state_dir=None, env=None, out=None, err=None, runner=None):
        self.env = dict(os.environ if env is None else env)
        self.store = Store(state_dir or default_state_dir(self.env))
        self.out = out
        self.err = err
        self.slurm = Slurm(runner)
        self._now = None

    @property
    def now(self):
        """policy_now(), read on first use (a bad SCRATCH_KEEPALIVE_NOW fails only then)."""
        if self._now is None:
            self._now = policy_now(self.env)
        return self._now

    def config(self):
        return self.store.require_config()


def _get(reg, name):
    check_name(name)
    ds = reg["datasets"].get(name)
    if ds is None:
        close = difflib.get_close_matches(name, sorted(reg["datasets"]), n=1)
        raise UsageError("no dataset named %r%s; `%s list` shows the registered ones" % (
            name, " (did you mean %r?)" % close[0] if close else "", PROG))
    return ds


# -------------------------------------------------------------- commands: init, add, list, status


def _init(ctx, profile, scratch_root, purge_days):
    store = ctx.store
    old = store.load_config() or {}
    datasets = store.load_registry()["datasets"]
    if profile is not None and profile not in PROFILES:
        raise UsageError("unknown profile %r; choose br200 or generic" % profile)
    name = profile or old.get("profile") or DEFAULT_PROFILE
    if old and old.get("profile") != name and datasets:
        raise UsageError("the profile is %s and %d dataset(s) are registered; remove them before "
                         "changing the profile to %s" % (old.get("profile"), len(datasets), name))
    same = old if old.get("profile") == name else {}
    root = _init_root(ctx, name, scratch_root or same.get("scratch_root"))
    purge = _init_purge_days(name, purge_days) or same.get("purge_days") or \
        PROFILES[name]["purge_days"]
    warnings = _init_state_dir_warnings(store, name, root)
    for ds in datasets.values():
        if not is_below(ds["path"], root):
            raise UsageError("dataset %r (%s) would not lie below the new scratch root %s; "
                             "remove it first" % (ds["name"], ds["path"], root))
        if int(ds["cadence_days"]) > purge - 5:
            raise UsageError("dataset %r has a %d-day cadence, too long for a %d-day purge; "
                             "lower it first" % (ds["name"], int(ds["cadence_days"]), purge))
    cfg = {"profile": name, "scratch_root": root, "purge_days": int(purge)}
    changed = dict((k, old.get(k)) for k in cfg) != cfg
    if changed:
        now = iso(time.time())
        store.save_config(dict(cfg, created=old.get("created") or now, updated=now))
    else:
        store.ensure()
    with contextlib.suppress(OSError):
        os.chmod(store.dir, 0o700)      # a pre-existing directory too: state is private
    return {"config": cfg, "changed": changed, "state_dir": store.dir, "warnings": warnings}


def _init_root(ctx, name, given):
    """The scratch root: the variable, then the option (or the recorded one), then the
    profile's; its real path."""
    prof = PROFILES[name]
    root = ctx.env.get("SCRATCH_KEEPALIVE_SCRATCH_ROOT") or given
    if not root:
        if prof["scratch_root"]:
            root = prof["scratch_root"].format(user=current_user(ctx.env))
        else:
            root = ctx.env.get("SCRATCH")
    if not root:
        raise UsageError("the generic profile needs a scratch root: pass --scratch-root DIR "
                         "(or set $SCRATCH)")
    if not os.path.isdir(root):
        hint = " (not on BR200? use --profile generic --scratch-root DIR)" if name == "br200" else ""
        raise UsageError("the scratch root %s does not exist or is not a directory%s"
                         % (root, hint))
    return os.path.realpath(root)


def _init_purge_days(name, purge_days):
    """--purge-days checked against the profile (None when not given)."""
    prof = PROFILES[name]
    if purge_days is None:
        return None
    if prof["purge_days_fixed"] and purge_days != prof["purge_days"]:
        raise UsageError("the br200 purge rule is fixed at %d days; --purge-days is for the "
                         "generic profile" % prof["purge_days"])
    if purge_days < prof["min_cadence"] + 5 or purge_days > 3650:
        raise UsageError("--purge-days must be between %d and 3650" % (prof["min_cadence"] + 5))
    return purge_days


def _init_state_dir_warnings(store, name, root):
    """A state directory inside scratch: refused on br200, a warning elsewhere."""
    if not overlaps(os.path.realpath(store.dir), root):
        return []
    if name == "br200":
        raise UsageError("the state directory %s lies inside the scratch root %s, where the "
                         "purge would delete it; choose another with --state-dir or "
                         "SCRATCH_KEEPALIVE_HOME" % (store.dir, root))
    return ["the state directory %s lies inside the scratch root %s: a purge could "
            "delete it; prefer a directory in your home" % (store.dir, root)]


def _check_keep_until(text, now):
    date = parse_date(text)
    if date is None:
        raise UsageError("--keep-until %r is not a real date; use YYYY-MM-DD" % (text,))
    if date < utc_date(now):
        raise UsageError("--keep-until %s is in the past (today is %s UTC); give a later date"
                         % (text, utc_date(now).isoformat()))
    return date.isoformat()


def _check_cadence(cfg, cadence):
    prof = profile_of(cfg)
    purge = purge_days_of(cfg)
    if cadence < prof["min_cadence"]:
        raise UsageError("--cadence-days %d is below the %s minimum of %d days"
                         % (cadence, cfg["profile"], prof["min_cadence"]))
    if cadence > purge - 5:
        raise UsageError("--cadence-days %d is too long for a %d-day purge (a refresh would come "
                         "too late); use at most %d" % (cadence, purge, purge - 5))
    return cadence


def _check_approval(text):
    if text is None:
        return None
    text = text.strip()
    if not text or len(text) > 500 or any(not c.isprintable() for c in text):
        raise UsageError("--approval must be a ticket number or the exemption's words, one line "
                         "of at most 500 characters")
    return text


def _add(ctx, name, path, keep_until, cadence_days, approval, rescue_to=None, manifest=True):
    store = ctx.store
    cfg = ctx.config()
    check_name(name)
    keep = _check_keep_until(keep_until, ctx.now)
    cadence = _check_cadence(cfg, int(default_cadence(cfg) if cadence_days is None
                                      else cadence_days))
    approval = _check_approval(approval)
    root = scratch_root_of(cfg, ctx.env)
    if not path or not os.path.exists(path):
        raise UsageError("--path %s does not exist; give the dataset's directory" % path)
    if not os.path.isdir(path):
        raise UsageError("--path %s is not a directory" % path)
    real = os.path.realpath(path)
    real_root = os.path.realpath(root)
    if real == real_root:
        raise UsageError("--path %s is the scratch root itself, which cannot be a dataset; "
                         "register a directory below it (one per dataset)" % path)
    if not is_below(real, real_root):
        raise UsageError("--path %s (really %s) is not below the scratch root %s; only datasets "
                         "on scratch need keeping alive" % (path, real, real_root))
    rescue_dest = _check_rescue_to(ctx, cfg, real, rescue_to)
    # The registry is saved when update_registry() exits, so the rollback sits outside it:
    # a failed save (a full state directory) must not leave the new sentinel behind.
    with _sentinel_rollback(real) as created, store.update_registry() as reg:
        if name in reg["datasets"]:
            raise UsageError("a dataset named %r is already registered; choose another name or "
                             "`%s remove --name %s` first" % (name, PROG, name))
        for other in reg["datasets"].values():
            if overlaps(real, other["path"]):
                raise UsageError("%s overlaps dataset %r (%s); a dataset may not be, contain or "
                                 "lie inside another" % (real, other["name"], other["path"]))
        ds = {"name": name, "path": real, "keep_until": keep, "cadence_days": cadence,
              "approval": approval, "enabled": True, "added": iso(time.time()),
              "registration": os.urandom(8).hex(),
              "last_refresh": None, "last_refresh_start": None, "last_mode": None,
              "last_touch_start": None, "last_check_start": None,
              "last_run": None, "last_total_entries": None}
        if not manifest:
            ds["manifest"] = False
        if rescue_dest:
            ds["rescue_to"] = rescue_dest
        try:        # reached from the scratch root without a symlink
            root_fd = open_dataset_root(real, root)
        except Failure as e:
            raise UsageError(str(e))
        try:
            if create_sentinel(root_fd, ds):
                created.append(real)
        finally:
            os.close(root_fd)
        reg["datasets"][name] = ds
    return _list_entry(ctx, cfg, ds)


def _check_rescue_to(ctx, cfg, dataset_path, text):
    """--rescue-to of add and extend: None (not given), "" (none: clear it) or the real
    path of a destination check_rescue_dest() accepts."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ""
    return check_rescue_dest(ctx, cfg, dataset_path, text, "--rescue-to")


@contextmanager
def _sentinel_rollback(root):
    """Yields a list; when the block fails after a path was appended to it (a sentinel this
    call created), that sentinel is deleted again."""
    created = []
    try:
        yield created
    except BaseException:
        if created:
            delete_sentinel(root)
        raise


def _list_entry(ctx, cfg, ds):
    mode = dataset_mode(cfg, ds)
    return {"name": ds["name"], "path": ds["path"], "enabled": bool(ds.get("enabled", True)),
            "keep_until": ds["keep_until"], "cadence_days": int(ds["cadence_days"]),
            "approval": ds.get("approval"), "mode": mode,
            "last_refresh": ds.get("last_refresh"), "last_mode": ds.get("last_mode"),
            "state": dataset_state(ctx.store, ds, ctx.now, mode), "risk": risk_of(ds),
            "attention": attention(ds, ctx.now, checkpoint_or_none(ctx.store, ds["name"])),
            "keep_manifests": ds.get("manifest") is not False,
            "rescue_to": ds.get("rescue_to")}


def checkpoint_or_none(store, name):
    """The dataset's walk checkpoint, or None (none, or one that cannot be read: doctor
    tells of that)."""
    try:
        return store.load_checkpoint_quiet(name)
    except StateError:
        return None


def last_purge(ds):
    """The purge record as `status --json` gives it (`last_purge`), or None."""
    p = ds.get("purge")
    if not isinstance(p, dict):
        return None
    return dict((k, p.get(k)) for k in PURGE_COUNTS + (
        "found", "walk_started", "previous_walk_started", "dest", "seen"))


def _entries(ctx, make, name=None):
    """make(ctx, cfg, ds) for dataset name, else for every registered one (by name); the
    config is required only when there is a dataset."""
    reg = ctx.store.load_registry()
    names = sorted(reg["datasets"]) if name is None else [_get(reg, name)["name"]]
    cfg = ctx.config() if names else None
    return [make(ctx, cfg, reg["datasets"][n]) for n in names]


def _list(ctx):
    return _entries(ctx, _list_entry)


def _status_entry(ctx, cfg, ds):
    entry = _list_entry(ctx, cfg, ds)
    try:        # never through the root when it is a symlink (that would move its atime)
        entry["sentinel"] = root_identity(ds["path"]) is not None and stat.S_ISREG(
            os.lstat(sentinel_path(ds["path"])).st_mode)
    except OSError:
        entry["sentinel"] = False
    ckpt = ctx.store.load_checkpoint_quiet(ds["name"])
    entry["checkpoint"] = None if ckpt is None else {
        "entries_done": int(ckpt.get("entries_done", 0)), "mode": ckpt.get("mode"),
        "updated": ckpt.get("updated"), "walk_started": ckpt.get("walk_started")}
    entry["last_run"] = ds.get("last_run")
    entry["last_refresh_start"] = ds.get("last_refresh_start")
    entry["added"] = ds.get("added")
    entry["last_touch_start"] = _walk_start_text(ds, "touch")
    entry["last_check_start"] = _walk_start_text(ds, "check")
    cadence = threshold_cadence(ds, schedule_cadence(ctx.store))
    entry["thresholds_days"] = dict(zip(("skip", "at_risk", "purge"),
                                        thresholds_days(cfg, cadence)))
    entry["vanished"] = ds.get("forensics")
    entry["last_purge"] = last_purge(ds)
    entry["remaining"] = remaining_risk(ds)
    entry["manifest"] = manifest_info(ctx.store, ds, cfg, ctx.now)
    start = walk_start(ds, entry["mode"])     # as `state` counts it: the mode's last walk
    entry["next_due"] = (None if start is None or not ds.get("last_refresh")
                         else iso(state_due_at(start, ds["cadence_days"])))
    return entry


def manifest_info(store, ds, cfg, now):
    """The newest complete manifest of a dataset: {path, walk_started, mode, entries, bytes,
    kept}, or None (none, or none that is a walk of it: manifest_problem())."""
    have = store.manifests(ds["name"])
    if not have:
        return None
    try:
        with Manifest(have[0][1]) as m:
            if manifest_problem(m.header, ds, cfg, now, have[0][0], root_identity(ds["path"])):
                return None
            return {"path": have[0][1], "walk_started": m.header.get("walk_started"),
                    "mode": m.header.get("mode"), "entries": (m.trailer or {}).get("entries"),
                    "bytes": os.fstat(m.f.fileno()).st_size, "kept": len(have)}
    except (OSError, Failure):
        return None


def _status(ctx, name=None, with_schedule=True):
    """with_schedule=False leaves out the `schedule` key (and its squeue call): the text
    shows the schedule once, below the datasets."""
    entries = _entries(ctx, _status_entry, name)
    if with_schedule and entries:
        sched = schedule_summary(ctx)
        for e in entries:
            e["schedule"] = None if sched is None else dict(sched)
    return entries if name is None else entries[0]


def _brief(ctx):
    """One alert per dataset whose attention() is not empty, then one for the schedule.

    It reads the state directory only: no walk, no stat of a dataset, no Slurm command,
    so that it can run at every login (from ~/.bashrc) and stay fast however many
    datasets there are and however slow scratch or the Slurm controller is.
    """
    datasets = ctx.store.load_registry()["datasets"]
    alerts = []
    for n in sorted(datasets):      # its most urgent code's kind and command, every finding
        codes = attention(datasets[n], ctx.now, checkpoint_or_none(ctx.store, n))
        said = [attention_words(datasets[n], c, ctx.now) for c in codes]
        if said:
            alerts.append(_alert(n, codes[0], "; ".join(w for w, _ in said), said[0][1], codes))
    sched = _brief_schedule(ctx, datasets)
    return alerts + ([sched] if sched else [])


def _alert(name, kind, message, command, codes=None):
    return {"name": name, "kind": kind, "message": message, "command": command,
            "attention": list(codes or [])}


def no_approval_words(name):
    """What every view says of a BR200 dataset without a site approval."""
    return ("%r has no site approval, so it is only checked (what is at risk is reported), "
            "never refreshed: IU forbids refreshing access times to avoid the purge. Copy what "
            "you need to Slate or Slate-Project, or record an exemption IU granted: `%s extend "
            "--name %s --approval TICKET`" % (name, PROG, name))


def attention_words(ds, code, now):
    """(what, command) for one attention code of ds: the words every view uses."""
    name = ds["name"]
    status_cmd = "%s status --name %s" % (PROG, name)
    files_cmd = "%s files --name %s" % (PROG, name)
    extend_cmd = "%s extend --name %s --keep-until YYYY-MM-DD" % (PROG, name)
    if code == "missing":
        return ("its root %s was missing at the refresh of %s (purged, moved or renamed?)"
                % (display_path(ds["path"]), ds.get("missing_since") or "?"), status_cmd)
    if code == "purged":
        return purge_words(ds["purge"]), files_cmd + " --vanished"
    if code in ("purge-eligible", "at-risk"):
        n = remaining_risk(ds)["own_" + code.replace("-", "_")]
        return ("%s of yours %s after the check walk of %s, not copied by a rescue of that "
                "walk: copy what you need somewhere safe" % (
                    plural(n, "entry", "entries"), "older than the purge age remain"
                    if code == "purge-eligible" else "at risk remain",
                    ds.get("last_refresh") or "?"), "%s --%s" % (files_cmd, code))
    if code == "expired":
        return ("its keep-until date %s has passed: it is no longer refreshed or checked"
                % ds["keep_until"], extend_cmd)
    if code == "errors":
        run = ds["last_run"]
        return ("its last run (%s) had %s%s" % (
            run.get("finished") or "?", plural(run_errors(ds), "error"),
            ", listed in " + display_path(run["log"]) if run.get("log") else ""), status_cmd)
    if code == "stalled":
        return ("a walk stopped part-way and has not been resumed within its cadence of %d "
                "days" % int(ds["cadence_days"]), "%s %s --name %s" % (
                    PROG, "refresh" if ds.get("enabled", True) else "enable", name))
    days_left = (parse_date(ds["keep_until"]) - utc_date(now)).days
    return ("kept only until %s (%s): after that it is no longer refreshed or checked"
            % (ds["keep_until"], "today" if days_left == 0 else "in " + plural(days_left, "day")),
            extend_cmd)


def purge_words(p):
    """What a purge record says, in one phrase."""
    text = "%s (%s) likely purged between the walks of %s and %s" % (
        plural(p["entries_likely_purged"], "entry", "entries"),
        human_bytes(p["bytes_likely_purged"]), p.get("previous_walk_started") or "?",
        p.get("walk_started") or "?")
    if p.get("dest"):
        text += ": %s have a copy in %s, %s lost" % (
            human_count(p.get("likely_purged_with_copy", 0)), display_path(p["dest"]),
            human_count(p.get("likely_purged_without_copy", 0)))
    others = p["entries_vanished"] - p["entries_likely_purged"]
    if others:
        text += "; %s more deleted or moved" % human_count(others)
    return text


def _brief_schedule(ctx, datasets):
    """The schedule's alert, or None: missing (datasets to keep, no schedule), failed (its
    last run failed, or its record cannot be read), silent (no scheduled run has reported
    for cadence + 3 days since the last report or the install)."""
    live = [d for d in datasets.values() if d.get("enabled", True)
            and parse_date(d["keep_until"]) >= utc_date(ctx.now)]
    try:
        doc = load_schedule(ctx.store)
    except StateError:
        return _alert(None, "failed", "its record in the state directory cannot be read",
                      "%s doctor" % PROG)
    if doc is None:
        if not live:
            return None
        cfg = ctx.store.load_config() or {}     # unreadable: raised, the login line says so
        account = cfg.get("profile") in PROFILES and profile_of(cfg)["account_required"]
        return _alert(None, "missing", "none is installed, so %s refreshed or checked only "
                      "when you run refresh" % ("%s is" % live[0]["name"] if len(live) == 1 else
                                                "%d datasets are" % len(live)),
                      "%s install-cron%s" % (PROG, " --account ACCOUNT" if account else ""))
    last = doc.get("last_run") or {}
    failed = _scheduled_run_failed(last)
    if failed:
        log = os.path.join(ctx.store.log_dir, "slurm-%s.out" % last["job_id"]) \
            if last.get("job_id") else None
        return _alert(None, "failed", "its last run (job %s, %s) %s%s" % (
            last.get("job_id") or "?", (last.get("finished") or "?")[:10], failed,
            "; its log: " + display_path(log) if log else ""), "%s doctor" % PROG)
    times = [parse_iso(t) for t in (doc.get("installed"), last.get("finished"))
             if isinstance(t, str)]
    since = max(times) if times else None
    limit = doc["cadence_days"] + 3
    if live and since is not None and ctx.now - since > limit * DAY:
        return _alert(None, "silent", "no scheduled run has reported since %s (more than %d "
                      "days: cadence + 3)" % (iso(since)[:10], limit), "%s doctor" % PROG)
    return None


def _scheduled_run_failed(last):
    """How a scheduled run's record says it failed, or None. A stop whose continuation was
    booked did not fail, nor did a run that --fail-on-risk made exit 1 (the datasets say
    that risk)."""
    code = last.get("exit_code_before_risk", last.get("exit_code"))
    if code in (None, EXIT_OK):
        return None
    said = last.get("continuation")
    if code == EXIT_STOPPED:
        if said and not said.startswith(CONTINUATION_FAILED):
            return None
        return "stopped before its walk completed, and %s" % (
            said or "no continuation was booked")
    return "failed (exit %d)" % code


# --------------------------------------------------------------- commands: extend, enable, remove


def _extend(ctx, name, keep_until, approval, cadence_days=None, rescue_to=None, manifest=None):
    cfg = ctx.config()
    check_name(name)
    if all(v is None for v in (keep_until, approval, cadence_days, rescue_to, manifest)):
        raise UsageError("extend needs --keep-until YYYY-MM-DD, --approval TEXT, "
                         "--cadence-days N, --rescue-to DIR, --manifest or --no-manifest")
    keep = _check_keep_until(keep_until, ctx.now) if keep_until is not None else None
    approval = _check_approval(approval)
    if cadence_days is not None:
        _check_cadence(cfg, cadence_days)
    with ctx.store.update_registry() as reg:
        ds = _get(reg, name)
        if root_present(ds["path"]):
            os.close(dataset_root_fd(ctx, ds))  # refused outside the scratch root
        if keep is not None:
            ds["keep_until"] = keep
        if approval is not None:
            ds["approval"] = approval
        if cadence_days is not None:
            ds["cadence_days"] = int(cadence_days)
        if manifest is not None:
            ds["manifest"] = bool(manifest)
        rescue_dest = _check_rescue_to(ctx, cfg, ds["path"], rescue_to)
        if rescue_dest is not None:
            ds["rescue_to"] = rescue_dest or None
    # The sentinel records the settings too (a registry rebuilt from it keeps them); when
    # the root is gone, the registry alone records them.
    _at_root(ctx, ds, lambda root_fd: update_sentinel(root_fd, ds), None)
    return _list_entry(ctx, cfg, ds)


def _set_enabled(ctx, name, enabled):
    cfg = ctx.config()
    with ctx.store.update_registry() as reg:
        ds = _get(reg, name)
        ds["enabled"] = bool(enabled)
    return _list_entry(ctx, cfg, ds)


def _remove(ctx, name):
    store = ctx.store
    _get(store.load_registry(), name)
    with DatasetLock(store, name):
        store.load_checkpoint_quiet(name)   # refuses one it may not delete (newer, unreadable)
        with store.update_registry() as reg:
            ds = _get(reg, name)
            del reg["datasets"][name]
        sentinel_deleted = _at_root(ctx, ds, delete_sentinel, False)
        store.delete_checkpoint(name)
        store.delete_checkpoint(name, "rescue")
        store.delete_manifests(name)
    with contextlib.suppress(OSError):
        os.unlink(store.lock_path(name))
    return {"name": name, "path": ds["path"], "sentinel_deleted": sentinel_deleted}


def _at_root(ctx, ds, act, unreachable):
    """act(the dataset's root fd), never through a symlinked parent; unreachable when the
    root cannot be reached."""
    try:
        root_fd = dataset_root_fd(ctx, ds)
    except Failure:
        return unreachable
    try:
        return act(root_fd)
    finally:
        os.close(root_fd)


# ---------------------------------------------------------------- commands: files
#
# `files` lists entries of the last complete manifest (or what vanished between the two
# newest), classified as of the walk that wrote it, streamed: one chunk of the manifest
# and one batch of output lines in memory, whatever the number of entries.
#
# Text output is one path per line, relative to the dataset root. A path that holds a
# control character, a double quote, a backslash or bytes that are not UTF-8 is printed
# between double quotes with C escapes (\n, \t, \", \\, \ooo for other bytes): git's
# quoting (`git ls-files` with core.quotePath=false) plus octal for bytes that are not
# UTF-8, so a line never holds a raw newline or tab and a quoted line starts with ".
# `-0` prints the raw bytes, NUL-terminated, for rsync --from0 and tar --null. The root
# itself and the sentinel are never listed.

FILES_KINDS = ("at-risk", "purge-eligible", "vanished")
REASON_PURGED = "likely purged"         # last atime older than purge days at the newer walk
REASON_DELETED = "deleted or moved"
FILES_BATCH = 4096                      # output lines written at a time
_NEEDS_QUOTE = _LazyPattern("[\x00-\x1f\x7f-\x9f\"\\\\\u2028\u2029\udc80-\udcff]")
_C_ESCAPES = {"\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f",
              "\r": "\\r", '"': '\\"', "\\": "\\\\"}


def quote_path(path):
    """A path (bytes) -> one line of text: as it is, or quoted C-style (see above)."""
    text = path.decode("utf-8", "surrogateescape")
    if not _NEEDS_QUOTE.search(text):
        return text
    out = ['"']
    for c in text:
        if not _NEEDS_QUOTE.match(c):
            out.append(c)
        elif c in _C_ESCAPES:
            out.append(_C_ESCAPES[c])
        else:       # other controls, and each byte that is not UTF-8
            out.extend("\\%03o" % b for b in c.encode("utf-8", "surrogateescape"))
    out.append('"')
    return "".join(out)


NO_COPY = object()      # an entry of a list that is not of what vanished: no `copy` key


def file_doc(key, kind, size, atime, reason=None, copy=NO_COPY):
    """One entry as `files --json` prints it (and files() yields it)."""
    rel = key_path(key)
    doc = {"kind": KIND_NAMES.get(kind & ~K_TOUCHED, "unknown"), "size": size}
    try:
        doc["path"] = rel.decode("utf-8")
    except UnicodeDecodeError:
        doc["path"] = rel.decode("utf-8", "replace")
        doc["path_b64"] = base64.b64encode(rel).decode("ascii")
    doc["atime"], doc["touched"] = None, False      # an entry the walk could not stat
    if kind & ~K_TOUCHED != K_UNKNOWN:
        with contextlib.suppress(OverflowError, ValueError, OSError):   # beyond gmtime
            doc["atime"] = iso(atime)
        doc["touched"] = bool(kind & K_TOUCHED)
    if reason is not None:
        doc["reason"] = reason
    if copy is not NO_COPY:
        doc["copy"] = None if copy is None else copy.decode("utf-8", "surrogateescape")
    return doc


def _check_older_than(days):
    if days is None:
        return None
    try:
        value = float(days)
    except (TypeError, ValueError):
        value = None
    if value is None or not 0 <= value < 1e6:      # also NaN and infinity
        raise UsageError("--older-than %r is not a number of days (0 or more, e.g. 13)"
                         % (days,))
    return value


def manifests_of(store, name):
    """store.manifests(name), refused (Failure) when no complete walk has left one yet."""
    found = store.manifests(name)
    if not found:
        raise Failure("no complete walk of %r has left a manifest yet; run `%s refresh --name "
                      "%s` (check mode touches nothing) to make one" % (name, PROG, name))
    return found


def check_manifest(m, number, ds, cfg, now, root_id):
    """Refuse (StateError) the manifest m (file number) unless it is a complete walk of ds
    (manifest_problem()): another dataset's or another root's would send its names through
    this one's root."""
    why = None if m.trailer is None else manifest_problem(m.header, ds, cfg, now, number,
                                                          root_id)
    if m.trailer is None or why:
        raise StateError("the manifest %s %s; the next complete walk (`%s refresh --name %s`) "
                         "writes one" % (m.path, "is not used: " + why if why else
                                         "is not complete", PROG, ds["name"]))


class FileList(object):
    """The entries `files` lists (_entries(), _vanished()). Open on creation; items()
    streams (key, kind, size, atime, reason, copy) and closes its files when done."""

    def __init__(self, store, ds, kind, older_than, cfg, now, scratch_root=None):
        self.name, self.kind, self.older_than = ds["name"], kind, older_than
        self.ds, self.cfg, self.now = ds, cfg, now
        self.manifests = []
        self.record = self.purge_entries = self.trailer = None
        record = ds.get("purge") if kind == "vanished" else None
        try:
            if isinstance(record, dict):
                path = store.purge_record_path(self.name, record["file"])
                h, self.purge_entries = read_purge(path, record.get("entries_vanished"))
                if (h.get("dataset"), h.get("walk_started")) != (self.name,
                                                                 record.get("walk_started")):
                    raise StateError("the purge record %s is not the one %r's registry entry "
                                     "names (it is of %r, the walk of %s); the next purge a "
                                     "walk finds replaces it" % (path, self.name,
                                                                 h.get("dataset"),
                                                                 h.get("walk_started")))
                self.header, self.record = h, record
                ds = {"rescue_to": h.get("dest")}       # where its walk looked for copies
            else:
                self._open(store)
                self.header = self.manifests[0].header
                self.trailer = self.manifests[0].trailer
        except BaseException:
            self.close()
            raise
        self.dest = rescue_dest(ds, scratch_root)

    def _open(self, store):
        need = 2 if self.kind == "vanished" else 1
        for _ in range(5):      # a walk finishing now may delete the oldest as we open it
            found = manifests_of(store, self.name)
            if len(found) < need:
                raise Failure("only one complete walk of %r has left a manifest; what vanished "
                              "is known after the next one: run `%s refresh --name %s` again "
                              "later" % (self.name, PROG, self.name))
            try:
                self.manifests = [Manifest(path) for _, path in found[:need]]
                break
            except FileNotFoundError:
                self.close()
        else:
            raise StateError("the manifests of %r keep changing (a walk is finishing); "
                             "run the command again" % self.name)
        for m, (number, _) in zip(self.manifests, found):
            check_manifest(m, number, self.ds, self.cfg, self.now, root_identity(self.ds["path"]))

    def close(self):
        for m in self.manifests:
            m.close()
        if self.purge_entries is not None:
            self.purge_entries.close()

    def cutoff(self, header):
        """Entries with an atime below this (epoch seconds) are listed; None: all."""
        days = [] if self.older_than is None else [self.older_than]
        if self.kind == "at-risk":
            days.append(float(header["thresholds_days"][1]))
        elif self.kind == "purge-eligible":
            days.append(float(header["purge_days"]))
        return float(header["now"]) - max(days) * DAY if days else None

    def items(self):
        try:
            yield from self._vanished() if self.kind == "vanished" else self._entries()
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise StateError("the manifest of %r has a header this version cannot use (%s); "
                             "the next complete walk writes a new one" % (self.name, e))
        finally:
            self.close()

    def _entries(self):
        """Every entry but the root and the sentinel; with a cutoff, those not touched by
        the walk whose atime (as found) lies below it. Entries the walk could not stat have
        no atime: they are listed only without a class."""
        cut = self.cutoff(self.header)
        for key, kind, size, atime in self.manifests[0].entries():
            # WARNING: never the root: rsync --files-from takes "." for the root's contents
            # and would copy every file directly in it, listed or not.
            if key == SENTINEL_KEY or key == b"":
                continue
            if cut is not None and (kind & K_TOUCHED or kind == K_UNKNOWN or atime >= cut):
                continue
            yield key, kind, size, atime, None, NO_COPY

    def _vanished(self):
        """What vanished: the purge record's entries (what the walk that found the purge saw
        vanish), else what the older manifest holds and the newer lacks; with the reason
        (the rule the refresh result counts by: likely_purged()) and a current copy in the
        rescue destination, as it is now."""
        if self.record is not None:
            found = ((d["k"], d["t"], d["s"], d["a"], d.get("m"), d["p"])
                     for d in self.purge_entries
                     if d["k"] != SENTINEL_KEY)     # in the records of earlier versions
        else:
            new, old = self.manifests
            if old.header.get("walk_started", "") > new.header.get("walk_started", "") or \
                    old.header.get("seq", 0) >= new.header.get("seq", 1):
                raise StateError("what vanished from %r is not known: its two newest manifests "
                                 "are out of order" % self.name)
            found = vanished(old, new, walk_now(new), float(new.header["purge_days"]))
        cut = self.cutoff(self.header)
        for key, kind, size, atime, mtime, purged in found:
            if cut is None or atime < cut:
                yield (key, kind, size, atime, REASON_PURGED if purged else REASON_DELETED,
                       copy_of(self.dest, key, kind, size, mtime))


def _files(ctx, name, kind, older_than):
    k = None if kind is None else str(kind).replace("_", "-")
    if k is not None and k not in FILES_KINDS:
        raise UsageError("unknown kind of file list %r; use one of %s, or none for every "
                         "entry" % (kind, ", ".join(FILES_KINDS)))
    older_than = _check_older_than(older_than)
    cfg = ctx.config()
    ds = _get(ctx.store.load_registry(), name)
    return FileList(ctx.store, ds, k, older_than, cfg, ctx.now,
                    scratch_root_of(cfg, ctx.env))


def mark_purge_seen(store, name, file):
    """The user has listed the purge record `file` to its end: status --brief stops naming
    it. Recorded under the dataset's lock, and not at all while a walk holds it."""
    lock = DatasetLock(store, name)      # refused at once while a walk holds it
    try:
        lock.acquire()
    except BusyError:
        return
    try:
        with store.update_registry() as reg:
            p = (reg["datasets"].get(name) or {}).get("purge")
            if isinstance(p, dict) and p.get("file") == file and not p.get("seen"):
                p["seen"] = iso(time.time())
    finally:
        lock.release()


# ---------------------------------------------------------------- dataset runs: refresh


class RefreshOptions(object):
    """due: select by the schedule's rule (is_due). scheduled: the schedule's own run (the
    method, as `--scheduled` gives it, or None), the one marker of one: it alone rescues
    to --rescue-to after a walk, as it alone keeps the job chain going (cmd_refresh)."""

    def __init__(self, name=None, due=False, check=False, dry_run=False, max_seconds=None,
                 max_entries=None, threads=None, checkpoint_every=CHECKPOINT_SECONDS,
                 workers=None, no_manifest=False, fail_on_risk=False, scheduled=None):
        self.name = name
        self.scheduled = scheduled
        self.no_manifest = no_manifest
        self.due = due
        self.check = check
        self.dry_run = dry_run
        self.max_seconds = max_seconds
        self.max_entries = max_entries
        self.threads = threads
        self.checkpoint_every = checkpoint_every
        self.workers = workers
        self.fail_on_risk = bool(fail_on_risk)


# Why a walk or a copy stopped before it was done: the one vocabulary of a result's
# "stopped", with its words for people. A signal is should_stop()'s answer (stop_signals
# gives these codes); a budget is Budget's.
STOP_INT, STOP_TERM, STOP_HUP = "int", "term", "hup"        # Ctrl-C, SIGTERM, SIGHUP
STOP_MAX_SECONDS, STOP_MAX_ENTRIES = "max-seconds", "max-entries"
STOP_CRASHED = "crashed"        # a rescue's copying threads, when the rescue itself failed
STOP_WORDS = {
    STOP_INT: "interrupted (Ctrl-C)",
    STOP_TERM: "stopped by a signal (SIGTERM)",
    STOP_HUP: "stopped by a signal (SIGHUP: the terminal closed)",
    STOP_MAX_SECONDS: "stopped at its time limit",
    STOP_MAX_ENTRIES: "stopped at --max-entries",
}


def stop_reason(should_stop=None, deadline=None, entries_left=None, entries_done=0):
    """Why to stop now, or None: the one test a walk or a copy makes between entries. In
    this order: a signal (should_stop() answers its code), --max-entries (entries_done
    reached entries_left), --max-seconds (time.monotonic() reached deadline)."""
    reason = should_stop() if should_stop is not None else None
    if reason:
        return reason
    if entries_left is not None and entries_done >= entries_left:
        return STOP_MAX_ENTRIES
    if deadline is not None and time.monotonic() >= deadline:
        return STOP_MAX_SECONDS
    return None


class Budget(object):
    """Budgets cover the whole command, across datasets: each run charges entries_left
    with the entries it did."""

    def __init__(self, max_seconds, max_entries):
        self.deadline = None if max_seconds is None else time.monotonic() + max_seconds
        self.entries_left = max_entries

    def stop_reason(self, should_stop=None, entries_done=0):
        """stop_reason() against this budget, entries_done being those done since the
        budget was last charged."""
        return stop_reason(should_stop, self.deadline, self.entries_left, entries_done)


def run_exit_code(complete, errors, stopped):
    """A dataset run's exit code (a walk's or a copy's): complete, 1 with errors, else 0;
    stopped, 130 for Ctrl-C, else 3 (run it again to resume)."""
    if complete:
        return EXIT_FAIL if errors else EXIT_OK
    return EXIT_INTERRUPTED if stopped == STOP_INT else EXIT_STOPPED


class RunLog(object):
    """A dataset run's log (logs/NAME/, store.new_log), a line at a time with the time in
    front: what the run is, what happened, its counts and how it ended. A dry run keeps
    none: RunLog() writes nowhere."""

    def __init__(self, store=None, name=None, started=None, kind=None):
        self.path, self.f = store.new_log(name, started, kind) if store else (None, None)

    def write(self, line):
        if self.f is not None:
            self.f.write("%s %s\n" % (iso(time.time()), line))

    def end(self, counts, complete, stopped, code):
        """The last lines: the counts, how the run ended and its exit code."""
        self.write("counts " + " ".join("%s=%d" % kv for kv in sorted(counts.as_dict().items())))
        self.write("end %s exit=%d" % ("complete" if complete else "stopped reason=%s" % stopped,
                                       code))
        self.close()

    def crashed(self, done):
        self.write("end crashed " + done)
        self.close()

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None


def empty_result(name, mode, reason=None):
    """The result of a dataset not walked, and why."""
    result = dict(Counts().as_dict(), name=name, mode=mode, complete=False, resumed=False)
    if reason is not None:
        result["reason"] = reason
    return result


def _select(ctx, cfg, reg, opts):
    """The datasets to walk, and results for the ones named but not walkable."""
    sched_cadence = schedule_cadence(ctx.store) if opts.due else None
    chosen, refused = [], []
    named = opts.name is not None
    for ds in [_get(reg, opts.name)] if named else [reg["datasets"][n] for n in sorted(
            reg["datasets"])]:
        st = dataset_state(ctx.store, ds, ctx.now)
        reasons = {"missing": "its root %s is missing (purged or moved?)%s" % (
                       ds["path"], "; check it, then `%s remove --name %s` or re-add it" % (
                           PROG, ds["name"]) if named else ""),
                   "expired": "its keep-until date %s has passed; `%s extend --name %s "
                              "--keep-until YYYY-MM-DD` to keep it" % (ds["keep_until"], PROG,
                                                                       ds["name"]),
                   "disabled": "it is disabled; `%s enable --name %s` first" % (PROG, ds["name"])}
        reason = reasons.get(st)
        if reason is None:
            # --due keeps its meaning with --name: the schedule's rule decides (exit 0).
            reason = not_due_reason(cfg, ds, st, opts, sched_cadence, ctx.now)
            st = "not-due"
        if reason is None:
            chosen.append(ds)
        elif named or st == "missing":      # unnamed: only a missing root is said
            refused.append((ds, st, reason))
    return chosen, refused


def not_due_reason(cfg, ds, st, opts, sched_cadence, now):
    """None when `refresh` walks ds (in state st) now: not --due, a partial walk, or is_due();
    else why `refresh --due` does not, and when it will."""
    if not opts.due or st == "partial":
        return None
    mode = dataset_mode(cfg, ds, opts.check)
    last = walk_start(ds, mode)
    if is_due(last, ds["cadence_days"], sched_cadence, now):
        return None
    return ("not due until %s (its last complete %s walk started %s); without --due, `%s "
            "refresh --name %s` walks it now" % (
                iso(schedule_due_at(last, ds["cadence_days"], sched_cadence)), mode, iso(last),
                PROG, ds["name"]))


def workers_note(opts):
    """What to say when --workers N was asked for where worker processes cannot be."""
    if opts.workers and opts.workers > 1 and not parallel_ok():
        return ("--workers needs Python 3.7 or newer (this is %d.%d): it runs in one process; "
                "--threads N overlaps metadata calls on any version" % sys.version_info[:2])
    return None


def on_login_node(cfg, env):
    return profile_of(cfg)["login_node_budget"] is not None and not env.get("SLURM_JOB_ID")


def _refresh(ctx, opts, should_stop=None, progress=None):
    cfg = ctx.config()
    reg = ctx.store.load_registry()
    chosen, refused = _select(ctx, cfg, reg, opts)
    max_seconds, login_note = _login_budget(ctx, cfg, opts, chosen)
    notes = [n for n in (login_note, chosen and workers_note(opts)) if n]
    budget = Budget(max_seconds, opts.max_entries)
    results, codes = _refused(ctx, cfg, refused, opts)
    if not chosen and not refused:
        notes.append("nothing to refresh: no enabled, unexpired dataset%s"
                     % (" is due" if opts.due else ""))
    for ds in chosen:
        mode = dataset_mode(cfg, ds, opts.check)
        if mode == "check" and not opts.check and not profile_of(cfg)["touch_allowed"]:
            notes.append(no_approval_words(ds["name"]))
        reason = budget.stop_reason()
        if reason:
            r = empty_result(ds["name"], mode, "not started: the %s budget was used up" % reason)
            code = EXIT_STOPPED
        else:
            try:
                r, code = _refresh_one(ctx, cfg, ds, mode, opts, budget, should_stop, progress)
            except Failure as e:        # a BusyError's code is EXIT_BUSY
                r, code = empty_result(ds["name"], mode, str(e)), e.exit_code
        if opts.scheduled and not opts.dry_run and r.get("complete"):
            rescued, rescue_code = _scheduled_rescue(ctx, ds["name"], budget, should_stop)
            if rescued is not None:
                r["rescue"] = rescued
                code = combine_exit_codes([code, rescue_code])
        results.append(r)
        codes.append(code)
        if code == EXIT_INTERRUPTED:
            break
    walked = codes[len(refused):]
    if login_note and walked and all(c == EXIT_BUSY for c in walked):
        notes.remove(login_note)        # nothing ran here: no budget to speak of
    if opts.scheduled and not opts.dry_run and EXIT_INTERRUPTED not in codes:
        _finish_rescues(ctx, cfg, chosen, budget, should_stop, results, codes)
    out = {"results": results, "exit_code": combine_exit_codes(codes), "notes": notes}
    if opts.fail_on_risk:       # the exit code counts the risk found as a failure
        out["risk"], out["codes"] = risk_found(ctx, results), codes
        out["exit_code"] = risk_exit_code(codes, out["risk"])
        if out["risk"]:
            notes.append("--fail-on-risk: exit 1, because of %s" % "; ".join(
                "%s (%s)" % (n, why) for n, why in out["risk"]))
    return out


def _login_budget(ctx, cfg, opts, chosen):
    """(the run's --max-seconds, the note that says why) on a login node, where a walk must
    not run long; (opts.max_seconds, None) elsewhere."""
    if opts.max_seconds is not None or not on_login_node(cfg, ctx.env) or not chosen or \
            opts.dry_run:
        return opts.max_seconds, None
    seconds = profile_of(cfg)["login_node_budget"]
    return seconds, ("on a login node (no SLURM_JOB_ID): this run stops after %d minutes "
                     "(IU kills login-node processes after 20 CPU minutes); the next run resumes "
                     "where it stopped. Run the rest as a job: `sbatch -A ACCOUNT -p general "
                     "-t 2:00:00 --mem=2G --wrap \"%s refresh\"`, or schedule it with "
                     "`%s install-cron --account ACCOUNT`" % (seconds // 60, PROG, PROG))


def _refused(ctx, cfg, refused, opts):
    """(results, exit codes) of the datasets named but not walked: not due (0), or missing,
    expired or disabled (1). A missing root is recorded in the registry, so that `status
    --brief` (which looks at no dataset) can tell; its next complete walk clears it."""
    results = [dict(empty_result(ds["name"], dataset_mode(cfg, ds, opts.check), reason),
                    state=st) for ds, st, reason in refused]
    codes = [EXIT_OK if st == "not-due" else EXIT_FAIL for _, st, _ in refused]
    gone = [ds for ds, st, _ in refused if st == "missing"]
    if gone and not opts.dry_run:
        with ctx.store.update_registry() as reg:
            for ds in gone:
                cur = reg["datasets"].get(ds["name"])
                if cur is not None and cur.get("path") == ds["path"] and \
                        not cur.get("missing_since"):
                    cur["missing_since"] = iso(time.time())
    return results, codes


def risk_found(ctx, results):
    """[(name, what)] for the walks `refresh --fail-on-risk` fails on, read from attention():
    a complete walk after which entries of the user's older than the purge age remain with
    no copy (`purge-eligible`: a check walk's), or that found a purge (`purged`). A
    keep-until, others' entries or an older purge do not fail a run."""
    try:
        datasets = ctx.store.load_registry()["datasets"]
    except StateError:
        datasets = {}
    found = []
    for r in results:
        ds = datasets.get(r["name"])
        if ds is None or not r.get("complete"):
            continue
        if r.get("dry_run"):        # recorded nothing: judge the counts it found
            ds = dict(ds, last_totals=dict((f, r.get(f, 0)) for f in Counts.FIELDS),
                      last_mode=r["mode"], last_refresh=r.get("finished"),
                      last_refresh_start=None, purge=None)
        codes = attention(ds, ctx.now)
        why = []
        if "purge-eligible" in codes:
            why.append("%s purge-eligible" % plural(remaining_risk(ds)["own_purge_eligible"],
                                                    "entry", "entries"))
        if "purged" in codes and r.get("entries_likely_purged"):    # this walk found it
            why.append("%s likely purged" % plural(r["entries_likely_purged"], "entry",
                                                   "entries"))
        if why:
            found.append((r["name"], ", ".join(why)))
    return found


def risk_exit_code(codes, risk, continued=False):
    """The exit code of `refresh --fail-on-risk`: the first of 130, 1, 3, 4, 0 that any
    dataset produced, as without it, where risk found counts as a 1, and (continued: a
    scheduled run that booked the continuation of its stopped walks) a stop as a 0."""
    codes = [EXIT_OK if c == EXIT_STOPPED and continued else c for c in codes]
    return combine_exit_codes(codes + ([EXIT_FAIL] if risk else []))


def _finish_rescues(ctx, cfg, walked, budget, should_stop, results, codes):
    """The scheduled rescues a budget stopped, of datasets this run did not walk: each is
    taken up where it stopped (its walk is complete; the continuation job exists for it)."""
    names = set(ds["name"] for ds in walked)
    for name, ds in sorted(ctx.store.load_registry()["datasets"].items()):
        if name in names or not ds.get("enabled", True) or not pending_rescue(ctx.store, ds):
            continue
        r = empty_result(name, dataset_mode(cfg, ds), "not due; its scheduled rescue, stopped "
                                                      "before, was taken up")
        r["rescue"], code = _scheduled_rescue(ctx, name, budget, should_stop)
        results.append(r)
        codes.append(code)
        if code == EXIT_INTERRUPTED:
            break


def _refresh_one(ctx, cfg, ds, mode, opts, budget, should_stop, progress):
    """Walk one dataset from its root's fd, reached from the scratch root without following
    a symlink; checkpoint, log and record. Returns (result, exit code)."""
    store = ctx.store
    name = ds["name"]
    if not root_present(ds["path"]):
        raise Failure("dataset %r: its root %s is missing" % (name, ds["path"]))
    lock = None if opts.dry_run else DatasetLock(store, name).acquire()
    try:
        # Read again under the lock: a `remove` (or a remove and re-add elsewhere) may have
        # finished since the registry was read, and its data must not be walked.
        current = store.load_registry()["datasets"].get(name)
        if current is None or current.get("path") != ds["path"]:
            why = ("it was removed while this refresh was starting; nothing was walked"
                   if current is None else "its path changed to %s while this refresh was "
                   "starting; nothing was walked (refresh it again)"
                   % display_path(current["path"]))
            return empty_result(name, mode, why), (EXIT_FAIL if opts.name is not None
                                                   else EXIT_OK)
        with dataset_root(ctx, current) as root_fd:     # refused when a symlink is on the way
            run = DatasetRun(ctx, cfg, current, mode, opts, root_fd)
            run.open_log()
            run.open_manifest()
            complete = run.walk(budget, should_stop, progress)
            run.finish_manifest(complete)
            result = run.result(complete)
            run.close_log(result)
            if not opts.dry_run:
                run.record(result)
        return result, result["exit_code"]
    except OSError as e:
        raise_if_full(e, e.filename or store.dir)     # the log or the record: name the place
        raise
    finally:
        if lock is not None:
            lock.release()


class DatasetRun(object):
    """One refresh (or check) of one dataset, its steps in _refresh_one's order.

    What a run guarantees: it resumes the checkpoint of an unfinished walk in the same mode
    of the same path (see resumable()), else starts at the root, reached through root_fd.
    The thresholds assume the larger of the dataset's and the schedule's cadence. The
    cursor is checkpointed at least every opts.checkpoint_every seconds and when the walk
    stops, so a resume repeats at most the stretch since the last checkpoint.
    Unless manifests are off, the walk writes its manifest as it goes (resumed with the
    checkpoint). Every run records its result as last_run; a dry run writes nothing at all.
    """

    def __init__(self, ctx, cfg, ds, mode, opts, root_fd):
        self.ctx, self.store, self.cfg, self.ds, self.mode, self.opts = (
            ctx, ctx.store, cfg, ds, mode, opts)
        self.name = ds["name"]
        self.started = time.time()
        self.root_fd = root_fd
        self.sched_cadence = schedule_cadence(ctx.store)
        self.cadence = threshold_cadence(ds, self.sched_cadence)
        self.resume_point()
        threads, workers = parallelism(opts, ds["path"])
        self.walker = Walker(ds["path"], mode, thresholds_ns(cfg, self.cadence, ctx.now),
                             dry_run=opts.dry_run, threads=threads, workers=workers,
                             root_fd=root_fd)
        self.log = RunLog()
        self.wants_manifest = not (opts.dry_run or opts.no_manifest or ds.get("manifest") is False)
        self.manifest = None        # the ManifestWriter of this walk
        self.manifest_note = None   # why this walk leaves no manifest, if it should have
        self.forensics = None
        self.purge = None           # the purge record this walk found, if any
        self.manifest_keep = None   # (partial path, number): the manifest record() keeps
        self.timing = {"checkpoint_seconds": 0.0, "checkpoints": 0}

    def resume_point(self):
        """Take up the checkpoint of this walk; another mode's or path's position, or a
        stale manual one, starts over: a new walk is one resumed from an empty checkpoint."""
        ckpt = None if self.opts.dry_run else self.store.load_checkpoint_quiet(self.name)
        self.resumed = bool(resumable(ckpt, self.ds, self.mode, self.opts.due,
                                      self.sched_cadence, self.ctx.now))
        if not self.resumed:
            ckpt = {"walk_started": iso(self.started), "due_run": bool(self.opts.due)}
        self.due_run = ckpt.get("due_run", True) is not False    # begun by `refresh --due`
        self.cursor = ckpt.get("cursor")        # where the walk resumes; None: at the root
        self.walk_started = ckpt.get("walk_started")
        self.done_before = int(ckpt.get("entries_done", 0))     # by earlier runs of this walk
        self.totals = Counts(ckpt.get("totals"))        # and their counts
        self.manifest_resume = ckpt.get("manifest")     # the checkpoint's manifest position

    def open_log(self):
        """A new log (none for a dry run), opened with what this run is and where it starts."""
        if not self.opts.dry_run:
            self.log = RunLog(self.store, self.name, self.started, self.mode)
        skip_d, risk_d, purge_d = thresholds_days(self.cfg, self.cadence)
        self.log.write("start dataset=%s path=%s mode=%s pid=%d host=%s version=%s" % (
            self.name, display_path(self.ds["path"]), self.mode, os.getpid(),
            socket.gethostname(), __version__))
        self.log.write("thresholds skip_days=%d at_risk_days=%d purge_days=%d now=%s%s" % (
            skip_d, risk_d, purge_d, iso(self.ctx.now), " resumed entries_done=%d"
            % self.done_before if self.resumed else ""))

    def open_manifest(self):
        """Start this walk's manifest, or take up the partial one a resumed walk left."""
        if not self.wants_manifest:
            return
        path = self.store.partial_manifest_path(self.name)
        if self.resumed:
            if not self.manifest_resume or not partial_matches(path, self.walk_started,
                                                               self.manifest_resume):
                self.manifest_note = ("this walk resumed without the start of its manifest; "
                                      "the next complete walk writes one")
                self.log.write("manifest none (%s)" % self.manifest_note)
                return
            self.manifest = ManifestWriter(self.store, self.name, resume=self.manifest_resume)
        else:
            aside = set_aside_odd(path)     # a new walk: whatever is not our file goes aside
            if aside:
                self.log.write("manifest set aside %s (%s)" % (display_path(aside[0]),
                                                               aside[1]))
            dev, ino = _ident(os.fstat(self.root_fd))
            self.manifest = ManifestWriter(self.store, self.name, header={
                "format": MANIFEST_FORMAT, "dataset": self.name, "root": self.ds["path"],
                "root_dev": dev, "root_ino": ino, "seq": self.store.manifest_number(self.name),
                "registration": self.ds.get("registration"),
                "mode": self.mode, "walk_started": self.walk_started, "now": self.ctx.now,
                "thresholds_days": list(thresholds_days(self.cfg, self.cadence)),
                "purge_days": purge_days_of(self.cfg)})
        self.walker.manifest = self.manifest

    def finish_manifest(self, complete):
        """A complete walk's manifest becomes the newest; then what vanished is counted."""
        writer, self.manifest = self.manifest, None
        if writer is not None and not complete:
            writer.close()
        if writer is None or not complete:
            return
        writer.finish({"walk_finished": iso(time.time()), "now": self.ctx.now})
        previous = self.store.manifests(self.name)
        if previous:
            try:
                self.forensics = self.compare(previous[0], writer.path)
            except (Failure, OSError) as e:
                # What vanished stays unknown this time; the walk and its manifest stand.
                self.manifest_note = "what vanished is not known: %s" % (
                    e if isinstance(e, Failure) else "%s: %s" % (previous[0][1], e.strerror))
                self.log.write("manifest compare failed (%s)" % self.manifest_note)
        with Manifest(writer.path) as m:
            number = self.store.manifest_number(self.name, m.header.get("seq"))
        # Kept (renamed into place) by record(), once the registry holds what this
        # comparison found: a kill in between must not leave a purge nobody recorded.
        self.manifest_keep = (writer.path, number)

    def compare(self, previous, new_path):
        """What vanished since the previous complete walk's manifest (number, path): the
        counts, and (when entries were likely purged) a new purge record, self.purge. A
        manifest that is not this dataset's previous walk's is not used (Failure: what
        vanished is unknown)."""
        number, prev_path = previous
        with Manifest(prev_path) as prev, Manifest(new_path) as new:
            why = manifest_problem(prev.header, self.ds, self.cfg, self.ctx.now, number,
                                   _ident(os.fstat(self.root_fd)))
            if why is None and prev.trailer is None:
                why = "it is not complete"
            started = prev.header.get("walk_started") or ""
            if why is None and started > self.walk_started:
                why = "it is newer than this walk"      # (whole seconds: equal is fine)
            if why is None and prev.header.get("format", 1) >= 2 and \
                    not prev.header.get("seq", 0) < new.header.get("seq", 0):
                why = "it is out of sequence"
            if why is None and "last_manifest_seq" in self.ds and \
                    self.ds["last_manifest_seq"] != prev.header.get("seq"):
                # Its touches are not the last ones: a complete walk since left no manifest.
                why = "the complete walk of %s left no manifest after it" % (
                    self.ds.get("last_refresh_start"))
            if why is not None:
                raise StateError("the previous manifest %s is not used: %s" % (prev_path, why))
            purge_days = int(new.header["purge_days"])
            dest = rescue_dest(self.ds, scratch_root_of(self.cfg, self.ctx.env))
            head = {"walk_started": self.walk_started, "dest": dest,
                    "previous_walk_started": started, "now": self.ctx.now}
            dfd = self.store.open_dir("manifests", self.name)
            fname = "purge-%06d.skm" % int(new.header.get("seq") or number + 1)
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(fname, dir_fd=dfd)        # a crashed walk's, never recorded
                out = PurgeWriter(dfd, fname, dict(head, dataset=self.name,
                                                   purge_days=purge_days))
                try:
                    counts = find_purge(prev, new, purge_days, out, self.ctx.now)
                finally:
                    # A purge is what the site took: entries the user deleted (none of
                    # them old enough) replace no record that may not have been seen yet.
                    out.close(keep=out.counts["entries_likely_purged"] > 0)
            finally:
                os.close(dfd)
            if counts["entries_likely_purged"]:
                self.purge = dict(counts, found=iso(time.time()), file=fname, seen=None,
                                  **head)
            return dict(counts, previous_walk_started=started)

    def walk(self, budget, should_stop, progress):
        """Walk from the resume point within the budget. Returns True when complete."""
        walker = self.walker
        self.progress = progress
        self.t_walk = self.last_checkpoint = time.monotonic()
        self.last_progress = 0.0
        try:
            complete = walker.run(cursor=self.cursor, max_entries=budget.entries_left,
                                  deadline=budget.deadline, should_stop=should_stop,
                                  on_tick=self.on_tick)
            if not complete:
                self.save_checkpoint()
        except BaseException:
            self.crashed()
            raise
        finally:
            self.timing["walk_seconds"] = round(time.monotonic() - self.t_walk, 6)
            walker.close()
        if budget.entries_left is not None:
            budget.entries_left -= walker.counts.entries_seen
        return complete

    def on_tick(self, walker):
        t = time.monotonic()
        if t - self.last_checkpoint >= self.opts.checkpoint_every:
            walker.sync()        # do the work, then record the cursor
            self.save_checkpoint()
            self.last_checkpoint = time.monotonic()
        if self.progress is not None and t - self.last_progress >= PROGRESS_SECONDS:
            self.last_progress = t
            seen = walker.counts.entries_seen
            self.progress(self.name, self.done_before + seen, seen, t - self.t_walk,
                          self.ds.get("last_total_entries"))

    def save_checkpoint(self):
        """Record the walker's cursor; only once the work before it is done (sync)."""
        if self.opts.dry_run:
            return
        t0 = time.monotonic()
        counts = self.walker.counts
        run_totals = Counts(self.totals.as_dict())
        run_totals.add(counts)
        self.store.save_checkpoint(self.name, {
            "dataset": self.name, "path": self.ds["path"], "mode": self.mode,
            "cursor": self.walker.cursor(), "entries_done": self.done_before + counts.entries_seen,
            "totals": run_totals.as_dict(), "walk_started": self.walk_started,
            "updated": iso(time.time()), "due_run": self.due_run, "pid": os.getpid(),
            "host": socket.gethostname(),
            "manifest": self.manifest.position() if self.manifest is not None else None})
        self.timing["checkpoint_seconds"] += time.monotonic() - t0
        self.timing["checkpoints"] += 1

    def crashed(self):
        """A crash in the walk: keep the position reached so far (save_checkpoint(), once
        the work before it is done; else the last checkpoint stands), and log the crash."""
        if self.walker.stack:
            with contextlib.suppress(Exception):
                self.walker.sync()
                self.save_checkpoint()
        if self.manifest is not None:
            with contextlib.suppress(Exception):
                self.manifest.close()
        self.log.crashed("entries_seen=%d" % self.walker.counts.entries_seen)

    def result(self, complete):
        """The run's result document, its exit code included."""
        counts, stopped = self.walker.counts, self.walker.stop_reason
        self.timing["checkpoint_seconds"] = round(self.timing["checkpoint_seconds"], 6)
        result = dict(counts.as_dict(), name=self.name, mode=self.mode, complete=complete,
                      resumed=self.resumed, entries_done=self.done_before + counts.entries_seen,
                      started=iso(self.started), finished=iso(time.time()),
                      dry_run=bool(self.opts.dry_run), stopped=None if complete else stopped,
                      log=self.log.path, timing=self.timing)
        result.update(self.forensics or dict.fromkeys(FORENSICS_ZERO))
        result["manifest"] = (self.store.manifest_path(self.name, self.manifest_keep[1])
                              if self.manifest_keep else None)
        if self.forensics is None or self.manifest_note:
            # Nothing compared: what vanished is not known, and why.
            result["manifest_note"] = self.manifest_note or UNKNOWN_VANISHED[
                "dry-run" if self.opts.dry_run else "off" if not self.wants_manifest
                else "first" if complete else "incomplete"]
        # The walk's errors, its earlier runs' included: it completed with them.
        result["exit_code"] = run_exit_code(complete, counts.errors + self.totals.errors,
                                            stopped)
        return result

    def close_log(self, result):
        """The log's last lines: the first errors' paths, the counts, how the walk ended."""
        walker, counts = self.walker, self.walker.counts
        for line in walker.error_paths:
            self.log.write("error %s" % line)
        if counts.errors > len(walker.error_paths):
            self.log.write("error ... and %d more" % (counts.errors - len(walker.error_paths)))
        self.log.end(counts, result["complete"], walker.stop_reason, result["exit_code"])

    def record(self, result):
        """Store what the run did in the registry, the checkpoint and the sentinel."""
        complete = result["complete"]
        if complete:
            self.totals.add(self.walker.counts)
            self.store.delete_checkpoint(self.name)
        with self.store.update_registry() as reg:
            cur = reg["datasets"].get(self.name)
            if cur is not None:
                cur["last_run"] = dict((k, v) for k, v in result.items() if k != "timing")
                if complete:
                    record_walk(cur, self.mode, self.walk_started, result["finished"])
                    # Which manifest stands for this walk (None: it left none).
                    cur["last_manifest_seq"] = (self.manifest_keep[1] if self.manifest_keep
                                                else None)
                    cur["last_total_entries"] = result["entries_done"]
                    cur["last_totals"] = self.totals.as_dict()
                    if self.forensics is not None:
                        cur["forensics"] = dict(self.forensics, walk_started=self.walk_started)
                    if self.purge is not None:
                        cur["purge"] = self.purge
                cur.pop("missing_since", None)          # it was there for this run
        if complete and self.manifest_keep is not None:
            self.store.keep_manifest(self.name, *self.manifest_keep)
        if complete and cur is not None:
            self.store.prune_purge_records(self.name, (cur.get("purge") or {}).get("file"))
        if complete and self.mode == "touch" and cur is not None:
            update_sentinel(self.root_fd, cur)
        self.store.prune_logs(self.name)


# ---------------------------------------------------------------- dataset runs: rescue (copy)
#
# `rescue` copies entries of a dataset's last complete manifest to safe storage, as
# DIR/<path relative to the root>. What it promises:
#   * never a disguised refresh: files are read with O_NOATIME (the kernel allows it to
#     their owner only, so another owner's files are listed as not rescued, never read);
#     a symlink's atime, which readlink(2) moves, is put back at once; directories are
#     opened, never listed, on the source side;
#   * never following a symlink: sources are opened from the dataset root's fd, and the
#     destination from DIR's fd, one component at a time with O_NOFOLLOW;
#   * every directory entered on the source side is the one the walk found: on the
#     dataset's filesystem, not a mount point, and, reopened through ".." when the fd
#     cap closed it, the same (st_dev, st_ino) as when it was entered;
#   * DIR is opened once, one component at a time without following a symlink, and
#     everything below it is made and opened from that fd;
#   * every file and symlink is written to a temporary name (RESCUE_TEMP_RE) in its
#     destination directory and renamed into place complete; a rescue killed outright
#     leaves only those, and a later one removes them in every directory it enters;
#   * nothing is deleted but its own temporary files: their names carry a token of the
#     run that made them, recorded in the checkpoint before the first is made; a
#     destination newer than the source is never overwritten; one with the same size and
#     mtime is skipped.
# The cursor (the last manifest key done, walk order) is checkpointed outside scratch
# (Store.checkpoint_path(name, "rescue")).

RESCUE_MARGIN = 0.05            # room wanted beyond the bytes to copy
RESCUE_CHUNK = 1 << 24          # bytes per copy call: budgets and signals are checked between
RESCUE_PATH_MAX = 1024          # a destination's path (the sentinel records it)
RESCUE_LISTED = 100             # not-rescued entries named in the result (the log has all)
RESCUE_TEMP_FORMAT = ".scratch-keepalive-rescue.%s.%d.%s-%d.tmp"   # host, pid, token, serial
RESCUE_TEMP_RE = _LazyPattern(r"^\.scratch-keepalive-rescue\.[A-Za-z0-9_-]{1,32}\.\d{1,10}\."
                              r"([a-z0-9]{8})-\d{1,12}\.tmp\Z")
RESCUE_TOKEN_RE = _LazyPattern(r"^[a-z0-9]{8}\Z")
RESCUE_TOKENS_KEPT = 32         # the runs of one rescue whose temporary files it removes
RESCUE_BATCH = 16               # files of a directory handed to a worker process at once
RESCUE_READ_AHEAD = 32          # files a copy on a local disk asks the data of ahead (hint())
RESCUE_READ_AHEAD_BYTES = 1 << 20   # of each file, at most
# What a rescue did not copy, and why (the result's not_rescued reasons).
NOT_RESCUED_WORDS = {
    "other-owner": "of another owner (only a file's owner may read it without moving its "
                   "access time)",
    "newer-destination": "the destination is newer (never overwritten)",
    "special": "not a file, directory or symlink (FIFO, socket or device)",
    "error": "error",
}


def check_rescue_dest(ctx, cfg, dataset_path, to, flag="--to"):
    """The real absolute path of a rescue destination (it need not exist yet).

    UsageError when it is, contains or lies below the scratch root or the dataset (a copy
    there is purged with the rest), or exists and is not a directory."""
    if not to or "\0" in to or len(to) > RESCUE_PATH_MAX:
        raise UsageError("%s needs a directory, a path of at most %d characters (on BR200: "
                         "/N/project/<project> or /N/slate/$USER)" % (flag, RESCUE_PATH_MAX))
    path = os.path.abspath(to)
    head, tail = path, []
    while not os.path.lexists(head):
        head, part = os.path.split(head)
        tail.append(part)
    real = os.path.join(os.path.realpath(head), *reversed(tail)) if tail else \
        os.path.realpath(head)
    if len(real) > RESCUE_PATH_MAX:
        raise UsageError("%s %s is really %s, longer than %d characters; give a shorter path"
                         % (flag, display_path(to), display_path(real), RESCUE_PATH_MAX))
    if not os.path.isdir(os.path.realpath(head)):
        raise UsageError("%s %s: %s is not a directory; give a directory to copy into"
                         % (flag, display_path(to), display_path(head)))
    root = scratch_root_of(cfg, ctx.env)
    for place, what in ((dataset_path, "the dataset"), (root, "the scratch root"),
                        (os.path.realpath(root), "the scratch root")):
        if overlaps(real, place):
            raise UsageError(
                "%s %s (really %s) %s %s %s: a copy there is purged with the rest; give a "
                "directory on safe storage (on BR200: Slate-Project /N/project/<project>, or "
                "Slate /N/slate/$USER)" % (
                    flag, display_path(to), display_path(real),
                    "is" if real == place else "lies inside" if is_below(real, place)
                    else "contains", what, display_path(place)))
    return real


# -- the user's quota: read_quota() is the one probe (rescue's room check, doctor's check)

QUOTA_TIMEOUT = 60      # seconds for `lfs quota` or `quota`: one question to a quota server
QUOTA_HINT = "the filesystem's quota service may be down or slow; try again later"


def quota_runner(argv, input_text=None):
    """How `lfs quota` and `quota` run: default_runner with quota's own time limit and
    words (a quota server that does not answer says nothing about Slurm)."""
    return default_runner(argv, input_text, QUOTA_TIMEOUT, QUOTA_HINT)


def _quota_number(text):
    text = text.rstrip("*")
    return int(text) if text.isdigit() else None


def parse_quota_table(text, files=False):
    """[(filesystem, used KiB, soft limit KiB, hard limit KiB)] from the table `quota -w`
    or `lfs quota` prints; files=True: each row goes on with (files, soft limit, hard
    limit), and a row without them is left out. Rows that do not parse are left out; a
    name too long for its column may stand alone on its line, with its numbers on the
    next one."""
    rows, pending, header = [], None, False
    for line in text.splitlines():
        tok = line.split()
        if not tok:
            continue
        if tok[0] == "Filesystem":
            header = True
            continue
        if not header:
            continue
        if len(tok) == 1 and _quota_number(tok[0]) is None:
            pending = tok[0]
            continue
        if _quota_number(tok[0]) is None:
            fs, nums = tok[0], tok[1:]
        elif pending is not None:
            fs, nums = pending, tok
        else:
            continue
        pending = None
        vals = [_quota_number(t) for t in nums[:3]]
        if files:
            rest = nums[3:]
            if rest and _quota_number(rest[0]) is None:
                rest = rest[1:]         # the blocks' grace, where the table shows one
            vals += [_quota_number(t) for t in rest[:3]]
        if len(vals) == (6 if files else 3) and None not in vals:
            rows.append(tuple([fs] + vals))
    return rows


def quota_room(row):
    """Bytes the user may still write under a quota row; None when it sets no limit."""
    used, soft, hard = row[1:4]
    limits = [v for v in (soft, hard) if v > 0]
    if not limits:
        return None
    return max(0, min(limits) - used) * 1024


class QuotaReading(object):
    """The user's quota where a path lies, as one command said it: command (its text, for
    messages), row (parse_quota_table's, files=True) or None, and why there is none."""

    def __init__(self, command, row=None, why=None):
        self.command, self.row, self.why = command, row, why


def read_quota(path, user, runner=None):
    """The user's quota where path lies (a QuotaReading): `lfs quota -u USER PATH` on
    Lustre, else `quota -w -u USER` (its row for path's mount). A missing command, no
    quota there and odd output are not errors: the reading says why it has no row. A
    command that does not answer in QUOTA_TIMEOUT s raises Failure (quota_runner's)."""
    mount = mount_of(os.path.realpath(path))
    lustre = mount is not None and mount[2] == "lustre"
    argv = ["lfs", "quota", "-u", user, path] if lustre else ["quota", "-w", "-u", user]
    command = " ".join(argv)
    res = (runner or quota_runner)(argv)
    if res is None:
        return QuotaReading(command, why="`%s` is not installed here" % argv[0])
    if lustre and res.rc != 0:
        said = " ".join((res.err.strip() or res.out.strip()).split())
        return QuotaReading(command, why="`%s` failed: %s" % (
            command, said[:200] or "exit status %d" % res.rc))
    # quota exits 1 when a limit is exceeded: its table still says by how much.
    rows = [r for r in parse_quota_table(res.out, files=True)
            if lustre or (mount is not None and r[0] in (mount[0], mount[1]))]
    return QuotaReading(command, rows[0]) if rows else QuotaReading(
        command, why="`%s` shows no quota for %s" % (command, display_path(path)))


def user_quota_room(ctx, path, runner=None):
    """(bytes the user's quota still allows below path, the command that said so), or None
    when no quota limits it or none can be read (read_quota)."""
    reading = read_quota(path, current_user(ctx.env), runner)
    room = quota_room(reading.row) if reading.row else None
    return None if room is None else (room, reading.command)


def check_rescue_room(ctx, dest, need, runner=None):
    """UsageError when dest's filesystem, or the user's quota there, lacks room for need
    bytes plus RESCUE_MARGIN."""
    want = int(need * (1 + RESCUE_MARGIN))
    if need <= 0:
        return
    place = dest
    while not os.path.lexists(place):
        place = os.path.dirname(place)
    try:
        st = os.statvfs(place)
    except OSError as e:
        raise Failure("cannot see how much room %s has (%s)" % (display_path(place), e.strerror))
    free = st.f_bavail * st.f_frsize
    if free < want:
        raise UsageError("%s has %s free, too little for the %s to copy plus %d%%; free some "
                         "space there or rescue somewhere else; nothing was copied" % (
                             display_path(place), human_bytes(free), human_bytes(need),
                             int(RESCUE_MARGIN * 100)))
    quota = user_quota_room(ctx, place, runner)
    if quota is not None and quota[0] < want:
        raise UsageError("your quota at %s allows %s more, too little for the %s to copy plus "
                         "%d%% (`%s`); free some space there or rescue somewhere else; nothing "
                         "was copied" % (display_path(place), human_bytes(quota[0]),
                                         human_bytes(need), int(RESCUE_MARGIN * 100), quota[1]))


class RescueOptions(object):
    def __init__(self, name, to, all=False, dry_run=False, max_seconds=None, max_entries=None,
                 checkpoint_every=CHECKPOINT_SECONDS, selection=None, threads=None,
                 workers=None):
        self.name, self.to, self.dry_run = name, to, dry_run
        self.selection = selection or ("all" if all else "at-risk")
        self.max_seconds, self.max_entries = max_seconds, max_entries
        self.checkpoint_every = checkpoint_every
        # copies in flight on threads, processes sharing them; None: parallelism() decides
        self.threads, self.workers = threads, workers


def _rescue(ctx, opts, budget, should_stop=None, progress=None):
    """One rescue, the dataset's lock held (none for a dry run). Returns the result."""
    store = ctx.store
    cfg = ctx.config()
    ds = _get(store.load_registry(), opts.name)
    dest = check_rescue_dest(ctx, cfg, ds["path"], opts.to)
    if not root_present(ds["path"]):
        raise Failure("dataset %r: its root %s is missing (purged or moved?); nothing to rescue"
                      % (ds["name"], display_path(ds["path"])))
    notes = [n for n in (workers_note(opts),) if n]
    if budget.deadline is None and on_login_node(cfg, ctx.env) and not opts.dry_run:
        # Copying costs CPU time too (the kernel's, with copy_file_range or sendfile).
        seconds = profile_of(cfg)["login_node_budget"]
        budget.deadline = time.monotonic() + seconds
        notes.append("on a login node (no SLURM_JOB_ID): this rescue stops after %d minutes "
                     "(IU kills login-node processes after 20 CPU minutes); run it again to "
                     "resume, or run it as a job: `sbatch -A ACCOUNT -p general -t 2:00:00 "
                     "--mem=2G --wrap \"%s rescue --name %s --to %s\"`" % (
                         seconds // 60, PROG, ds["name"], shell_quote(dest)))
    lock = None if opts.dry_run else DatasetLock(store, ds["name"]).acquire()
    try:
        current = store.load_registry()["datasets"].get(ds["name"])
        if current is None or current["path"] != ds["path"]:
            raise Failure("dataset %r was removed or moved while this rescue was starting; "
                          "nothing was copied" % ds["name"])
        manifests = manifests_of(store, ds["name"])
        with dataset_root(ctx, current) as root_fd:
            with Manifest(manifests[0][1]) as m:
                check_manifest(m, manifests[0][0], current, cfg, ctx.now,
                               _ident(os.fstat(root_fd)))
            run = RescueRun(ctx, current, dest, opts, manifests[0][1], root_fd)
            result = dict(run.go(budget, should_stop, progress), notes=notes)
        if result["complete"] and not opts.dry_run:
            record_rescue(store, ds["name"], result, manifests[0][0])
        return result
    except OSError as e:
        raise_if_full(e, e.filename or dest)
        raise
    finally:
        if lock is not None:
            lock.release()


class _RescueStop(Exception):
    """A budget or a signal stopped the rescue inside a file's copy (args: why)."""


class RescueRun(Walker):
    """One rescue of one dataset from one manifest: a walk whose action is copy.

    Steps: read the manifest's classification line; take up the checkpoint of the same
    rescue (dataset path, destination, selection and manifest), else start at the first
    entry; add up what needs copying (quick check against the destination) and refuse a
    destination without room; then copy on the walker's engine: its loop, budgets and
    ticks (run()); its stack of Frames, here holding both sides of the copy, with the one
    fd cap and the identity-checked way back up (_push, _shed, _pop, _reopen); its
    runners, which copy files on threads where latency dominates and on a worker process
    on a local disk (a directory's files a batch, queue()). Where a walk lists a
    directory, the copy takes the manifest's next selected entry (_more, _next), so
    directories are opened, never listed, and only the directories on the way to an
    entry are entered. A checkpoint's cursor is the last entry handed out once every
    copy is done (sync), or the one before a copy a stop cut short (rollback).
    Directories get their source's mode and mtime when the copy leaves them (their
    contents first, or the mtime would move), whichever run finishes them (reenter()).
    """

    def __init__(self, ctx, ds, dest, opts, manifest_path, root_fd):
        threads, workers = (1, 1) if opts.dry_run else parallelism(opts, ds["path"], dest)
        Walker.__init__(self, ds["path"], "copy", (0, 0, 0), opts.dry_run, threads=threads,
                        workers=workers, root_fd=root_fd)
        self.ctx, self.store, self.ds, self.dest, self.opts = ctx, ctx.store, ds, dest, opts
        self.name = ds["name"]
        self.manifest_path = manifest_path
        self.started = time.time()
        self.host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:32] or "host"
        self.pid = os.getpid()
        self.token = random_token(8)    # in the names of the temporary files this run makes
        self.temp_tokens = [self.token]     # ... and the ones it may remove (resume_point)
        self.temp_serial = itertools.count()
        self.root_dev = os.fstat(root_fd).st_dev
        self.cursor = None          # the last key handed out (bytes), None: none yet
        self.resumed = False
        self.done_before = self.copied_before = 0
        self.counts = RescueCounts()
        self.not_rescued = []       # the first RESCUE_LISTED of them
        self.error_whys = {}        # why -> how many errors, for the summary line
        self.parents_made = []      # --to's missing parents that open_dest made
        self.stopped = None         # why a copy was cut short (a budget or a signal)
        self.log = RunLog()
        self.total_entries = self.total_bytes = 0
        self.copy_calls = ["copy_file_range", "sendfile", "read"]
        self.umask = os.umask(0o077)    # read, and put back at once
        os.umask(self.umask)
        self.todo = None            # the selected entries after the cursor (entries())
        self.ahead = []             # the next of them, read from todo by _more()
        self.hinted = 0             # how many of those hint() has seen
        # On a local disk, without threads: hint() asks for the next files' data.
        self.read_ahead = threads == 1 and not opts.dry_run and not on_network_fs(ds["path"])
        # Files handed over at a time: a directory's next ones to a worker process (one
        # message, its fds once); one to a thread, so that threads overlap every file.
        self.batch_files = RESCUE_BATCH if self.runner_class is ProcessRunner else 1
        self.rollback = None        # [the cursor before the first copy a stop cut short]
        self.aborted = None         # set when the copying threads must stop (crashed())
        self.halt = None            # its byte set: the worker processes' copies must stop
        self.lock = threading.Lock()            # the counts a copying thread adds to
        self.walk_started = None
        self.last_checkpoint = self.last_progress = self.t0 = 0.0

    # -- setting up
    def go(self, budget, should_stop, progress):
        self.budget, self.should_stop, self.progress = budget, should_stop, progress
        with Manifest(self.manifest_path) as m:      # check_manifest()'d by _rescue
            self.walk_started = m.header.get("walk_started")
            self.line = self.selection_line(m.header)
            self.resume_point()
            self.plan(m)
            check_rescue_room(self.ctx, self.dest, self.total_bytes)
        try:
            self.open_dest()
            self.open_log()
            self.mount_tree = mount_tree(self.root_fd)
            self.stack[0].mounts = self.mount_tree.get((), frozenset())
            if not self.opts.dry_run:
                self.save_checkpoint()      # the token, before any temporary file is made
            self.t0 = self.last_checkpoint = time.monotonic()
            with Manifest(self.manifest_path) as m:
                self.todo = self.entries(m)
                complete = self.run(self.cursor, budget.entries_left, budget.deadline,
                                    self.stop_now, on_tick=self.tick, tick_every=1)
            if complete and self.stopped:       # a copy cut short after the last was handed out
                complete, self.stop_reason = False, self.stopped
            while self.stack:
                self._pop()
        except BaseException:
            self.crashed()
            raise
        finally:
            self.close()
        return self.finish(complete, budget)

    def selection_line(self, header):
        """The atime (seconds) below which an entry is selected; None: every entry."""
        if self.opts.selection == "all":
            return None
        try:
            skip_d, risk_d = header["thresholds_days"][:2]
            now = float(header["now"])
        except (KeyError, TypeError, ValueError):
            raise StateError("the manifest %s has no thresholds; the next complete walk "
                             "writes a new one" % self.manifest_path)
        return now - (skip_d if self.opts.selection == "skip" else risk_d) * DAY

    def selected(self, key, code, atime):
        if not key or key == SENTINEL.encode("ascii"):
            return False        # the root is DIR itself; the sentinel is ours
        if self.line is None:
            return True
        return not code & K_TOUCHED and code != K_UNKNOWN and atime < self.line

    def resume_point(self):
        if self.opts.dry_run:
            return
        ck = self.store.load_checkpoint_quiet(self.name, "rescue")
        if ck is not None:      # its runs' temporary files are no one else's (the lock)
            self.temp_tokens = (ck.get("temps") or [])[1 - RESCUE_TOKENS_KEPT:] + [self.token]
        if ck is None or (ck["path"], ck["to"], ck["selection"], ck["manifest_walk_started"]) \
                != (self.ds["path"], self.dest, self.opts.selection, self.walk_started):
            return              # another rescue's position: start over (the quick check
            # makes that cheap)
        self.resumed = True
        cursor = ck.get("cursor")
        if cursor is not None:
            done = cursor if isinstance(cursor, list) else cursor["path"]
            self.cursor = b"\0".join(decode_name(c) for c in done)
        self.done_before = ck["entries_done"]
        self.copied_before = ck["bytes_copied"]

    def entries(self, m):
        """The selected entries after the cursor: (key, kind code, size)."""
        for key, code, size, atime in m.entries():
            if self.cursor is not None and key <= self.cursor:
                continue
            if self.selected(key, code, atime):
                yield key, code, size

    def plan(self, m):
        """Count the entries to go, and the bytes the regular files among them still need
        (those the quick check would not skip), for the room check and the progress."""
        dest = os.fsencode(self.dest)
        there = {}          # a directory's key -> whether it is at the destination
        for key, code, size in self.entries(m):
            self.total_entries += 1
            if code & ~K_TOUCHED != K_FILE:
                continue
            parent = key.rpartition(b"\0")[0]
            if parent not in there:         # one look for a directory, not one a file
                there[parent] = os.path.isdir(os.path.join(dest, key_path(parent)))
            try:
                st = os.lstat(os.path.join(dest, key_path(key))) if there[parent] else None
            except OSError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != size:
                self.total_bytes += size

    def open_dest(self):
        """DIR's fd, the bottom of the destination stack: opened once, from "/", one
        component at a time, never through a symlink (what was missing made: DIR 0700), and
        then where it really is must be where check_rescue_dest() looked. By name, a
        parent swapped for a symlink after the checks would send the copy through it."""
        fd = os.open("/", O_DIR_FLAGS)
        try:
            parts = [p for p in self.dest.split("/") if p]
            for i, part in enumerate(parts):
                parent, fd = fd, None       # dest_step closes it
                fd = self.dest_step(parent, part, "/" + "/".join(parts[:i + 1]),
                                    i == len(parts) - 1)
                if fd is None:      # a dry run: not there yet
                    self.stack = [self.root_frame(None)]
                    return
            where = os.readlink("/proc/self/fd/%d" % fd) if os.path.isdir("/proc/self/fd") \
                else self.dest
            if where != self.dest:
                raise self.dest_changed("it is now %s" % display_path(where))
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        self.stack = [self.root_frame(fd)]
        if not self.opts.dry_run:
            self.remove_temps(fd)

    def root_frame(self, dst):
        """The bottom of the stack: the dataset root (a dup of root_fd) and DIR (dst)."""
        frame = Frame(os.dup(self.root_fd), None, (), _ident(os.fstat(self.root_fd)))
        frame.dst = dst
        return frame

    def dest_step(self, fd, part, path, last):
        """The fd of directory part below fd (which it closes), made when missing (None in
        a dry run)."""
        try:
            try:
                return os.open(part, O_DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if self.opts.dry_run:
                    return None
                os.mkdir(part, 0o700 if last else 0o777, dir_fd=fd)
                if not last:
                    self.parents_made.append(path)
                return os.open(part, O_DIR_FLAGS, dir_fd=fd)
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                raise self.dest_changed("%s is no longer a directory (a symlink?)"
                                        % display_path(path))
            raise_if_full(e, self.dest)
            raise Failure("cannot %s %s (%s); create it yourself or give another directory"
                          % ("open" if os.path.lexists(path) else "create",
                             display_path(path), e.strerror))
        finally:
            os.close(fd)

    def dest_changed(self, how):
        return UsageError("--to %s changed after it was checked: %s; nothing was copied; look "
                          "at it, then run rescue again" % (display_path(self.dest), how))

    def reenter(self):
        """On resuming, enter the directories the cursor is in (and the cursor itself, if
        it is one), so that leaving them gives them their modes and mtimes, whichever run
        finishes their subtrees."""
        if self.cursor is None:
            return
        comps = self.cursor.split(b"\0")
        frame = self.goto(comps[:-1])
        if frame.fd is not None and stat.S_ISDIR(_lstat_mode(comps[-1], frame.fd)):
            self.goto(comps)

    def open_log(self):
        if self.opts.dry_run:
            return
        self.log = RunLog(self.store, self.name, self.started, "rescue")
        self.log.write("start rescue dataset=%s path=%s to=%s selection=%s manifest=%s "
                       "walk_started=%s pid=%d host=%s version=%s%s" % (
                           self.name, display_path(self.ds["path"]), display_path(self.dest),
                           self.opts.selection, self.manifest_path, self.walk_started,
                           os.getpid(), socket.gethostname(), __version__,
                           " resumed entries_done=%d" % self.done_before if self.resumed
                           else ""))

    # -- the walker's engine: the copy's entries, stack and runner
    def _start(self, cursor):
        self.reenter()

    def _more(self):
        while len(self.ahead) <= RESCUE_READ_AHEAD:
            entry = next(self.todo, None)
            if entry is None:
                break
            self.ahead.append(entry)
        return bool(self.ahead)

    def _next(self, limit):
        """Copy the next selected entry: a directory entered here, in order; anything else
        handed to the runner (copy_one())."""
        key, code, _ = self.ahead.pop(0)
        self.hinted = max(0, self.hinted - 1)
        before, self.cursor = self.cursor, key
        self.counts.entries_done += 1
        comps = key.split(b"\0")
        path = b"/".join(comps)
        try:
            frame = self.goto(comps[:-1])
            if frame.error:
                return self.failed(path, frame.error)
            # A directory then (or what the walk could not look at) that is one now: entered
            # here, in order, with the walk's rules (a mount point is not).
            if code & ~K_TOUCHED in (K_DIR, K_UNKNOWN) and \
                    stat.S_ISDIR(_lstat_mode(comps[-1], frame.fd)):
                top = self.goto(comps, counts=True)
                return self.failed(path, top.error) if top.error else None
        except OSError as e:        # the destination refused a look (EACCES, EIO, ...)
            if e.errno in FULL_ERRNOS or isinstance(e, DiskFullError):
                raise
            return self.failed(path, e.strerror or str(e))
        if self.read_ahead:
            self.hint(frame)
        self.queue(frame, comps[-1], (path, before))
        return None

    def queue(self, frame, name, tag):
        """Batch a file of frame's directory for the runner; tag: (its path, the cursor
        before it). A batch holds one directory's files, and grows while the runner is busy:
        never a file held back while a worker process waits."""
        batch = self.batch
        if batch.frames and batch.frames[0] is not frame:
            self._flush()
            batch = self.batch
        if not batch.frames:
            batch.frames, batch.names, batch.tag = [frame], [[]], (frame, [])
        batch.names[0].append(name)
        batch.tag[1].append(tag)
        batch.size += 1
        frame.pending += 1
        if batch.size >= self.batch_files or not self.runner.inflight:
            self._flush()       # full, or nothing for the worker to do meanwhile

    def _flush(self):
        """Hand the batch being built to the runner; for worker processes, with dups of its
        directory's fds on both sides (they get copies of them) and whether this run made
        it."""
        batch, self.batch = self.batch, Batch()
        if batch.frames:
            frame = batch.frames[0]
            if self.runner_class is ProcessRunner:
                batch.fds = [os.dup(fd) for fd in (frame.fd, frame.dst) if fd is not None]
                batch.extra = frame.made
            self.runner.submit(batch)

    def hint(self, frame):
        """Ask for the data of the next files of frame's directory now (POSIX_FADV_WILLNEED:
        the kernel reads it in the background), so that a copy on a local disk, one file at
        a time, reads the next files while it writes this one, as tar's reader runs ahead of
        its writer (with a cold cache, most of what a copy of small files waits for).
        Regular files only, opened as the copy opens them (O_NOFOLLOW, O_NOATIME: no access
        time moves; another owner's is not opened), up to RESCUE_READ_AHEAD_BYTES of each;
        nothing is read here."""
        prefix = frame.key + b"\0" if frame.key else b""
        while self.hinted < len(self.ahead):
            key, code, size = self.ahead[self.hinted]
            name = key[len(prefix):]
            if not key.startswith(prefix) or b"\0" in name:
                return      # in another directory: hinted once the copy is there
            self.hinted += 1
            if code & ~K_TOUCHED != K_FILE or not size or \
                    not stat.S_ISREG(_lstat_mode(name, frame.fd)):
                continue
            try:
                fd = os.open(name, os.O_RDONLY | O_NOFOLLOW | O_NOATIME | os.O_NONBLOCK
                             | O_CLOEXEC, dir_fd=frame.fd)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, min(size, RESCUE_READ_AHEAD_BYTES),
                                 os.POSIX_FADV_WILLNEED)
            except (OSError, AttributeError):
                pass
            finally:
                os.close(fd)

    def _runner(self):
        if self.runner_class is ProcessRunner:
            self.halt = mmap.mmap(-1, 1)    # shared with the workers forked now
        runner = self.runner_class(None, self._tally, self.runner_count, work=self.copy_batch)
        runner.waiting = self.stop_now
        return runner

    def stop_now(self):
        """Why the copy must stop (a signal, a stop inside a copy), or None; a reason found
        is passed on to the worker processes' copies (halt)."""
        reason = self.stopped or self.should_stop and self.should_stop()
        if reason and self.halt is not None and not self.halt[0]:
            self.stopped, self.halt[0] = reason, 1
        return reason

    def copy_batch(self, batch):
        """The runner's work, in this process or a worker process: the files of one
        directory, in order. One a stop cut short is a _RescueStop, and so is each after
        it, not begun (a worker begins no file but the batch's first once the copies must
        stop: as on a thread, a file handed out is begun). Returns (their outcomes, the
        bytes a worker process copied)."""
        if batch.frames:        # in this process: the frame itself
            frame = batch.frames[0]
        else:                   # in a worker process: its copies of the frame's fds
            frame = Frame(batch.fds[0], None, (), None)
            frame.dst, frame.made = (batch.fds + [None])[1], batch.extra
        before, outcomes = self.counts.bytes_copied, []
        try:
            for name in batch.names[0]:
                stop = None
                if outcomes and isinstance(outcomes[-1], _RescueStop):
                    stop = outcomes[-1]         # the rest of a batch a stop cut short
                elif outcomes and not batch.frames:
                    stop = self.must_stop()     # a worker begins no more once told to stop
                if stop:
                    outcomes.append(stop)
                    continue
                try:
                    outcomes.append(self.look_and_copy(frame, name))
                except OSError as e:    # the destination refused a look (EACCES, EIO, ...)
                    outcomes.append(e)
        finally:
            for fd in batch.fds:
                os.close(fd)
        return outcomes, 0 if os.getpid() == self.pid else self.counts.bytes_copied - before

    def _tally(self, tag, result):
        """Count what look_and_copy() did with a batch's files (in this thread). Should
        counting one raise (a full disk), the resume starts before it."""
        frame, files = tag
        outcomes, moved = result
        if moved:
            with self.lock:
                self.counts.bytes_copied += moved
        frame.pending -= len(files)
        for i, ((path, before), outcome) in enumerate(zip(files, outcomes)):
            if isinstance(outcome, _RescueStop):
                self.stopped = self.stopped or outcome.args[0]
                self.counts.entries_done -= 1    # to be done again: resume before it
                self.roll_back(before)
                continue
            try:
                self.copied(path, outcome)
            except BaseException:
                self.counts.entries_done -= len(files) - i      # it and the rest: not done
                self.roll_back(before)
                raise

    def roll_back(self, before):
        """A checkpoint's cursor is to be at most before (the cursor before a file not done)."""
        if self.rollback is None or not _key_after(before, self.rollback[0]):
            self.rollback = [before]

    def tick(self, walker):
        t = time.monotonic()
        if not self.opts.dry_run and t - self.last_checkpoint >= self.opts.checkpoint_every:
            self.sync()         # the checkpoint's cursor: every copy before it done
            self.save_checkpoint()
            self.last_checkpoint = time.monotonic()
        if self.progress is not None and t - self.last_progress >= PROGRESS_SECONDS:
            self.last_progress = t
            self.progress(self.name, self.counts.entries_done, self.total_entries,
                          self.counts.bytes_copied, self.total_bytes, t - self.t0)

    def settle(self, frame):
        """Wait for the copies still to run into frame (its queued ones handed over)."""
        if self.batch.frames and self.batch.frames[0] is frame:
            self._flush()
        while frame.pending and self.runner is not None and self.runner.inflight:
            self.runner.collect(block=True)

    def checkpoint_cursor(self):
        """The last key before which every copy is done: the cursor, unless copies still
        run (crashed) or a stop cut one short."""
        waiting = list(self.runner.inflight.values()) if self.runner is not None else []
        if self.batch.frames:
            waiting.append(self.batch.tag)
        cursor = waiting[0][1][0][1] if waiting else self.cursor   # the first not done
        if self.rollback is not None and _key_after(cursor, self.rollback[0]):
            cursor = self.rollback[0]
        return cursor

    # -- the copy
    def look_and_copy(self, frame, name):
        """Look at one entry (not a directory) on both sides and copy it if it should be:
        what it came to, as copied() takes it. Safe on a copying thread: it changes
        nothing of the run's but bytes_copied (under the lock)."""
        try:
            st = os.lstat(name, dir_fd=frame.fd)
        except OSError as e:
            return _Changed("vanished since the walk" if e.errno == errno.ENOENT
                            else e.strerror)
        if stat.S_ISDIR(st.st_mode):
            return _Changed("became a directory since the walk (run refresh, then rescue "
                            "again)")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            return "special"
        if self.euid != 0 and st.st_uid != self.euid:
            return "other-owner"
        size = st.st_size if stat.S_ISREG(st.st_mode) else 0
        have = self.dest_stat(frame, name)
        if have is not None:
            if stat.S_ISDIR(have.st_mode):
                return _Changed("a directory is in its place at the destination")
            if self.same(st, have, frame, name):
                return ("skipped", size)
            if have.st_mtime_ns > st.st_mtime_ns:
                return "newer-destination"
        if self.opts.dry_run:
            return ("copied", size)
        try:
            if stat.S_ISLNK(st.st_mode):
                self.copy_link(frame, name, st)
            else:
                self.copy_file(frame, name)
        except _NotOwned:
            return "other-owner"
        except (_RescueStop, _Changed, OSError) as e:
            return e
        return ("copied", 0)        # its bytes were counted as they went

    def copied(self, path, outcome):
        """Count what look_and_copy() did with the entry at path."""
        if isinstance(outcome, tuple):
            what, size = outcome
            field = "entries_" + what
            setattr(self.counts, field, getattr(self.counts, field) + 1)
            if what == "skipped":
                self.counts.bytes_skipped += size
            else:
                self.counts.bytes_copied += size        # a dry run's: what it would copy
        elif isinstance(outcome, str):
            self.not_copied(path, outcome)
        elif isinstance(outcome, OSError) and outcome.errno in FULL_ERRNOS:
            raise DiskFullError(outcome.errno, "cannot write %s: the destination's disk or "
                                "quota is full (%s); free some space there and run rescue "
                                "again (it resumes)" % (display_path(os.path.join(
                                    os.fsencode(self.dest), path)), outcome.strerror))
        else:
            self.failed(path, str(outcome) if isinstance(outcome, _Changed)
                        else outcome.strerror or str(outcome))

    def same(self, st, have, frame, name):
        """rsync's quick check: same kind, same size and mtime (a symlink: same target)."""
        if stat.S_ISLNK(st.st_mode):
            if not stat.S_ISLNK(have.st_mode) or frame.dst is None:
                return False
            try:
                return os.readlink(name, dir_fd=frame.dst) == self.read_link(frame, name, st)
            except (OSError, _Changed):     # changed: the copy says so (copy_link())
                return False
        if not stat.S_ISREG(have.st_mode) or have.st_size != st.st_size:
            return False
        return same_mtime(have.st_mtime_ns, st.st_mtime_ns)

    def dest_stat(self, frame, name):
        if frame.dst is None or frame.made:
            return None     # nothing there, or a directory this run made: nothing yet
        try:
            return os.lstat(name, dir_fd=frame.dst)
        except FileNotFoundError:
            return None

    def read_link(self, frame, name, st):
        """The target of the source symlink st is of; readlink(2) moves the link's atime:
        put back. Both through an O_PATH fd of that very link, never by name: the name may
        meanwhile be another entry's, whose times must not be set."""
        fd = os.open(name, O_PATH | O_NOFOLLOW | O_CLOEXEC, dir_fd=frame.fd)
        try:
            if _ident(os.fstat(fd)) != _ident(st):
                raise _Changed("changed since it was looked at")
            target = os.readlink(b"", dir_fd=fd)
            with contextlib.suppress(OSError):
                # A symlink's mtime cannot change (only a new link replaces it): writing
                # back the one just read rolls back nothing. /proc/self/fd/N of an O_PATH
                # fd leads to the link itself, not to what it points to.
                os.utime("/proc/self/fd/%d" % fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fd)
        return target

    def temp_name(self):
        # The pid of the process making it: a worker's names are never this one's.
        return RESCUE_TEMP_FORMAT % (self.host, os.getpid(), self.token, next(self.temp_serial))

    def copy_link(self, frame, name, st):
        target = self.read_link(frame, name, st)
        tmp = self.temp_name()
        os.symlink(target, tmp, dir_fd=frame.dst)
        try:
            os.utime(tmp, ns=(int(time.time() * 1e9), st.st_mtime_ns), dir_fd=frame.dst,
                     follow_symlinks=False)
            os.replace(tmp, name, src_dir_fd=frame.dst, dst_dir_fd=frame.dst)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=frame.dst)
            raise

    def copy_file(self, frame, name):
        """Copy a regular file's data extents into a temporary file, then rename it."""
        try:
            src = os.open(name, os.O_RDONLY | O_NOFOLLOW | O_NOATIME | os.O_NONBLOCK
                          | O_CLOEXEC, dir_fd=frame.fd)
        except PermissionError as e:
            if e.errno == errno.EPERM:
                raise _NotOwned()
            raise
        try:
            before = os.fstat(src)
            if not stat.S_ISREG(before.st_mode):
                raise _Changed("changed into another kind of entry since the walk")
            tmp = self.temp_name()
            mode = stat.S_IMODE(before.st_mode) & ~(stat.S_ISUID | stat.S_ISGID)
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                          mode & 0o777, dir_fd=frame.dst)
            try:
                try:
                    if self.copy_data(src, out, before) < before.st_size:
                        os.ftruncate(out, before.st_size)   # a hole at the end stays a hole
                    if mode & (self.umask | ~0o777):        # what open()'s mode did not give
                        os.chmod(out, mode)
                    os.utime(out, ns=(int(time.time() * 1e9), before.st_mtime_ns))
                finally:
                    os.close(out)
                after = os.fstat(src)
                if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                    raise _Changed("changed while it was copied (still being written?); run "
                                   "rescue again when it is finished")
                os.replace(tmp, name, src_dir_fd=frame.dst, dst_dir_fd=frame.dst)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=frame.dst)
                raise
        finally:
            os.close(src)

    def copy_data(self, src, out, st):
        """Copy the data extents of src (SEEK_DATA/SEEK_HOLE; a file whose blocks hold its
        size has none to find) to the same offsets of out; returns where the data written
        ends."""
        pos, size = 0, st.st_size
        dense = st.st_blocks * 512 >= size
        while pos < size:
            if dense:
                start, end = pos, size
            else:
                start, end = self.extent(src, pos, size)
                if start is None:
                    return pos  # only a hole from pos on
            while start < end:
                # A stop cuts a copy short between two chunks: never one whose data is all
                # written (a small file's is one chunk).
                stop = self.must_stop() if start else None     # after its first chunk
                if stop:
                    raise stop
                n = self.copy_range(src, out, start, min(RESCUE_CHUNK, end - start))
                if n <= 0:
                    return start    # the file shrank: the size check after the copy says so
                start += n
                with self.lock:
                    self.counts.bytes_copied += n
            pos = end
        return pos

    def must_stop(self):
        """A _RescueStop when the copies must stop now (a budget's time, a signal, a crash,
        the main process's halt), else None. A count of entries never stops a copy (it
        counts those handed out)."""
        reason = self.aborted or stop_reason(self.should_stop, self.budget.deadline) \
            or self.halt is not None and self.halt[0] and STOP_TERM
        if not reason:
            return None
        self.stopped = self.stopped or reason
        return _RescueStop(self.stopped)

    @staticmethod
    def extent(src, pos, size):
        """(start, end) of the first data extent of src at or after pos; (None, None) when
        there is none (a hole to the end)."""
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return None, None
            return pos, size    # no sparse support here: all of it is data
        try:
            return start, min(size, os.lseek(src, start, os.SEEK_HOLE))
        except OSError:
            return start, size

    def copy_range(self, src, out, offset, count):
        """Up to count bytes at offset, by the best call that works here."""
        while True:
            how = self.copy_calls[0]
            try:
                if how == "copy_file_range" and hasattr(os, "copy_file_range"):
                    return os.copy_file_range(src, out, count, offset, offset)
                if how == "sendfile" and hasattr(os, "sendfile"):
                    os.lseek(out, offset, os.SEEK_SET)
                    return os.sendfile(out, src, offset, count)
                if how == "read":
                    data = os.pread(src, count, offset)
                    written = 0
                    while written < len(data):
                        written += os.pwrite(out, data[written:], offset + written)
                    return len(data)
            except OSError as e:
                if how == "read" or e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                                                    errno.EOPNOTSUPP, errno.EBADF):
                    raise
            self.copy_calls.pop(0)

    # -- the two-sided stack: Walker's _push, _pop with these
    def goto(self, comps, counts=False):
        """Make the stack hold the directories comps (from the root), opening (and on the
        destination, creating) what is missing, leaving the others. Returns the top."""
        stack = self.stack
        keep = 1
        while keep < len(stack) and keep - 1 < len(comps) and stack[keep].name == comps[keep - 1]:
            keep += 1
        while len(stack) > keep:
            self._pop()
        for name in comps[len(stack) - 1:]:
            self._push(self.enter(stack[-1], name, counts))
        return stack[-1]

    def _shed(self, frame, child):
        """The fd cap: frame closes its fds on both sides, reopened through ".." of child
        when the copy comes back to it (_reopen). Not where child could not give them back
        (an error, or, in a dry run, not there at the destination)."""
        if frame.fd is None or child.fd is None or (frame.dst is not None and child.dst is None):
            return
        self.settle(frame)          # its copies use its fds
        os.close(frame.fd)
        if frame.dst is not None:
            os.close(frame.dst)
        frame.fd = frame.dst = None

    def _reopen(self, frame, child):
        """Reopen a shed frame from its child's fds (".." is never a symlink), both sides
        checked to be the directories it left: one moved meanwhile (its ".." is now
        somewhere else) is an error for the rest of its subtree, never followed."""
        if frame.error:
            return
        fds = []
        try:
            if child.fd is None:        # its own reopening failed: no way up from it
                raise OSError(errno.EBADF, "the way back up through its subdirectory failed")
            fds.append(reopen_parent(child.fd, frame.ident))
            if child.dst is not None:
                fds.append(reopen_parent(child.dst, frame.dst_ident))
        except OSError as e:
            for fd in fds:
                os.close(fd)
            frame.error = "its directory %s %s" % (
                display_path(b"/".join(frame.components())),
                "moved during the rescue (its way back up is not where it was); not copied "
                "further" if e.errno == errno.ESTALE else "cannot be reopened (%s)" % e.strerror)
            return
        frame.fd, frame.dst = fds[0], (fds[1] if len(fds) > 1 else None)

    def enter(self, parent, name, counts):
        """The frame of directory name below parent: its source opened (O_NOFOLLOW,
        O_NOATIME) and found on the dataset's filesystem and not a mount point, its
        destination opened or made (0700 while it is filled). counts: the entry is one the
        copy selected (its making, or finding it there, is counted)."""
        frame = Frame(None, name, (), None, parent=parent,
                      mounts=self._mounts_below(parent, name))
        if parent.error:
            frame.error = parent.error
            return frame
        why = None
        try:
            st = os.lstat(name, dir_fd=parent.fd)
            if not stat.S_ISDIR(st.st_mode):
                why = "is no longer a directory"
            elif st.st_dev != self.root_dev or name in parent.mounts:
                why = "is a mount point (another filesystem is mounted there); not copied"
            else:
                frame.fd = open_dir_ex(name, parent.fd)[0]
                if _ident(os.fstat(frame.fd)) != _ident(st):
                    why = "changed while it was opened"
        except OSError as e:
            why = "cannot be opened (%s)" % ("vanished since the walk" if e.errno == errno.ENOENT
                                             else e.strerror)
        if why:
            if frame.fd is not None:
                os.close(frame.fd)
                frame.fd = None
            frame.error = "its directory %s %s" % (display_path(b"/".join(frame.components())),
                                                   why)
            return frame
        frame.ident, frame.meta = _ident(st), (st.st_mode, st.st_mtime_ns)
        try:
            self.enter_dest(parent, frame, counts)
        except OSError as e:
            raise_if_full(e, os.path.join(self.dest, os.fsdecode(name)))
            frame.error = "its destination directory cannot be made (%s)" % e.strerror
        return frame

    def enter_dest(self, parent, frame, counts):
        """Open frame's destination directory below parent's, made when missing."""
        name = frame.name
        have = self.dest_stat(parent, name)
        if have is None:
            self.counts.dirs_created += 1
            if self.opts.dry_run:       # would be made
                return
            os.mkdir(name, 0o700, dir_fd=parent.dst)
            frame.made = True
        elif not stat.S_ISDIR(have.st_mode):
            frame.error = ("%s exists at the destination and is not a directory (a symlink "
                           "there is never followed)" % display_path(name))
            return
        elif counts:
            self.counts.entries_skipped += 1
        frame.dst = os.open(name, O_DIR_FLAGS, dir_fd=parent.dst)
        frame.dst_ident = _ident(os.fstat(frame.dst))
        if self.opts.dry_run:
            return
        mode = os.fstat(frame.dst).st_mode
        if self.euid != 0 and mode & 0o700 != 0o700:
            os.chmod(frame.dst, stat.S_IMODE(mode) | 0o700)     # the final mode on leaving
        if have is not None:
            self.remove_temps(frame.dst)

    def _leave(self, frame):
        """Close frame's fds; its destination directory gets the source's mode and mtime
        now that its contents are done."""
        self.settle(frame)      # its contents first, or its mtime would move
        if frame.dst is not None:
            if not self.opts.dry_run and frame.meta is not None:
                with contextlib.suppress(OSError):
                    os.chmod(frame.dst, stat.S_IMODE(frame.meta[0]))
                    os.utime(frame.dst, ns=(int(time.time() * 1e9), frame.meta[1]))
            os.close(frame.dst)
        if frame.fd is not None:
            os.close(frame.fd)

    def remove_temps(self, dfd):
        """Delete, in an open destination directory, the temporary files the runs of this
        rescue left (their token says so): never a file of anyone else's."""
        try:
            names = os.listdir(dfd)
        except OSError:
            return
        for n in names:
            m = RESCUE_TEMP_RE.match(n)
            if not m or m.group(1) not in self.temp_tokens:
                continue
            if not stat.S_ISREG(_lstat_mode(n, dfd)) and not stat.S_ISLNK(_lstat_mode(n, dfd)):
                continue
            with contextlib.suppress(OSError):
                os.unlink(n, dir_fd=dfd)
                self.counts.temps_removed += 1

    # -- outcomes
    def not_copied(self, path, reason):
        self.counts.entries_not_rescued += 1
        field = RESCUE_REASON_COUNTS[reason]
        setattr(self.counts, field, getattr(self.counts, field) + 1)
        self.listed(path, reason)

    def failed(self, path, why):
        self.counts.entries_not_rescued += 1
        self.counts.errors += 1
        self.error_whys[why] = self.error_whys.get(why, 0) + 1
        self.listed(path, "error", why)

    def listed(self, path, reason, why=None):
        text = display_path(path)
        self.log.write("not-rescued %s %s%s" % (reason, text, ": " + why if why else ""))
        if len(self.not_rescued) < RESCUE_LISTED:
            item = {"path": encode_name(path), "reason": reason}
            try:
                path.decode("utf-8")
            except UnicodeDecodeError:
                item["path_b64"] = base64.b64encode(path).decode("ascii")
            if why:
                item["why"] = why
            self.not_rescued.append(item)

    # -- checkpoint, result
    def save_checkpoint(self):
        self.store.save_checkpoint(self.name, {
            "dataset": self.name, "path": self.ds["path"], "to": self.dest,
            "selection": self.opts.selection, "manifest_walk_started": self.walk_started,
            # The walk's position: the last entry handed out, done, its subtree not (yet).
            "cursor": None if self.checkpoint_cursor() is None else {
                "path": [encode_name(c) for c in self.checkpoint_cursor().split(b"\0")],
                "subtree_done": False},
            "entries_done": self.done_before + self.counts.entries_done,
            "bytes_copied": self.copied_before + self.counts.bytes_copied,
            "started": iso(self.started), "updated": iso(time.time()), "pid": os.getpid(),
            "host": socket.gethostname(), "temps": self.temp_tokens}, "rescue")

    def crashed(self):
        self.aborted = STOP_CRASHED     # copies stop at their next chunk
        if self.halt is not None:
            self.halt[0] = 1
        if self.runner is not None:     # what the copies came to, counted (or rolled back)
            with contextlib.suppress(Exception):
                self.runner.drain()
        if not self.opts.dry_run and self.cursor is not None:   # there is a position to keep
            with contextlib.suppress(Exception):
                self.save_checkpoint()
        self.batch = Batch()            # queued, never started
        if self.runner is not None:
            self.runner.inflight.clear()
        with contextlib.suppress(Exception):
            while self.stack:
                self._pop()
        self.log.crashed("entries_done=%d" % self.counts.entries_done)

    def finish(self, complete, budget):
        if budget.entries_left is not None:
            budget.entries_left -= self.counts.entries_done
        if not self.opts.dry_run:
            if complete:
                self.store.delete_checkpoint(self.name, "rescue")
            else:
                self.save_checkpoint()
        result = dict(self.counts.as_dict(), name=self.name, to=self.dest,
                      selection=self.opts.selection, dry_run=bool(self.opts.dry_run),
                      complete=complete, resumed=self.resumed,
                      stopped=None if complete else self.stop_reason,
                      manifest=self.manifest_path, walk_started=self.walk_started,
                      entries_total=self.total_entries, bytes_total=self.total_bytes,
                      entries_done_total=self.done_before + self.counts.entries_done,
                      bytes_copied_total=self.copied_before + self.counts.bytes_copied,
                      not_rescued=self.not_rescued, started=iso(self.started),
                      finished=iso(time.time()), log=self.log.path,
                      errors_why=sorted(self.error_whys.items(), key=lambda kv: -kv[1]),
                      parents_made=self.parents_made)
        result["exit_code"] = run_exit_code(complete, self.counts.errors, self.stop_reason)
        if self.log.f is not None:
            self.log.end(self.counts, complete, self.stop_reason, result["exit_code"])
            self.store.prune_logs(self.name)
        return result


class _NotOwned(Exception):
    """O_NOATIME refused: the file is another owner's (read it, and its atime would move)."""


class _Changed(Exception):
    """The source changed under the copy; the message says how."""


RESCUE_REASON_COUNTS = {"other-owner": "entries_not_owned",
                        "newer-destination": "entries_newer_destination",
                        "special": "entries_special"}


def _key_after(a, b):
    """Manifest key a comes after b in the walk's order (None: before every key)."""
    return a is not None and (b is None or a > b)


def record_rescue(store, name, r, manifest_seq):
    """A complete rescue's record in the registry: the dataset's copies are there (see
    copies_cover(); a purge record looks for copies in its destination)."""
    with store.update_registry() as reg:
        cur = reg["datasets"].get(name)
        if cur is not None:
            cur["last_rescue"] = {"to": r["to"], "walk_started": r["walk_started"],
                                  "manifest_seq": manifest_seq,
                                  "finished": r["finished"],
                                  "entries_not_rescued": r["entries_not_rescued"],
                                  "entries_not_owned": r["entries_not_owned"]}


def _scheduled_rescue(ctx, name, budget, should_stop):
    """After a complete scheduled walk (or to finish one a budget stopped), rescue what could
    age out before the schedule's next run to the dataset's rescue_to. (result, code)."""
    ds = ctx.store.load_registry()["datasets"].get(name)
    if ds is None or not ds.get("rescue_to"):
        return None, EXIT_OK
    opts = RescueOptions(name, ds["rescue_to"], selection="skip")
    try:
        r = _rescue(ctx, opts, budget, should_stop)
    except Failure as e:
        code = EXIT_BUSY if isinstance(e, BusyError) else EXIT_FAIL
        return {"name": name, "to": ds["rescue_to"], "complete": False, "reason": str(e),
                "exit_code": code}, code
    return r, r["exit_code"]


def pending_rescue(store, ds):
    """True when a scheduled rescue of ds stopped before it was done."""
    try:
        ck = store.load_checkpoint_quiet(ds["name"], "rescue")
    except StateError:
        return False
    return bool(ck and ds.get("rescue_to") and ck["selection"] == "skip")


def run_state(r, command, with_done=False):
    """How a walk's result r ended, in words: complete (resumed), or not and what now."""
    if r["complete"]:
        return "complete" + (", resumed" if r["resumed"] else "")
    stopped = r.get("stopped")
    why = STOP_WORDS.get(stopped, "stopped (%s)" % (stopped or "unknown reason"))
    if with_done:
        why += " with %s of the walk done" % plural(r.get("entries_done", 0), "entry", "entries")
    return "NOT complete: %s; %s" % (why, "nothing was saved (dry run)" if r.get("dry_run")
                                     else "run %s again to resume from the checkpoint" % command)


def describe_rescue(r):
    """One line that tells a person what a rescue did."""
    name = r["name"]
    if r.get("reason"):
        return "%s: not rescued: %s" % (name, r["reason"])
    dry = "(dry run) would copy" if r.get("dry_run") else "copied"
    body = "%s %s (%s) to %s" % (dry, plural(r["entries_copied"], "entry", "entries"),
                                 human_bytes(r["bytes_copied"]), display_path(r["to"]))
    if r["dirs_created"]:
        body += ", %s made" % plural(r["dirs_created"], "directory", "directories")
    if r.get("parents_made"):
        body += "; made the missing parent director%s of %s: %s" % (
            "ies" if len(r["parents_made"]) > 1 else "y", display_path(r["to"]),
            ", ".join(display_path(p) for p in r["parents_made"]))
    body += "; %s already there (same size and mtime)" % human_count(r["entries_skipped"])
    if r["entries_not_rescued"]:
        parts = []
        for key, word in (("entries_not_owned", "of another owner"),
                          ("entries_newer_destination", "newer at the destination (kept)"),
                          ("entries_special", "FIFOs, sockets or devices"),
                          ("errors", "errors")):
            if r[key]:
                parts.append("%s %s" % (human_count(r[key]), word))
            if key == "errors" and r[key] and r.get("errors_why"):     # why, not only in the log
                parts[-1] += ": " + ", ".join(
                    why if len(r["errors_why"]) == 1 else "%s (%d)" % (why, n)
                    for why, n in r["errors_why"][:3])
        body += "; NOT rescued: %s (%s)%s" % (
            human_count(r["entries_not_rescued"]), ", ".join(parts),
            ", listed in " + r["log"] if r.get("log") else "")
    return "%s: %s; %s" % (name, body, run_state(r, "rescue"))


# ---------------------------------------------------------------- Slurm and the schedule

SCRON_BEGIN = "# BEGIN scratch-keepalive: managed by `scratch-keepalive install-cron`; do not edit"
SCRON_END = "# END scratch-keepalive"
RESUME_JOB_NAME = JOB_NAME + "-resume"
CONTINUATION_FAILED = "could not schedule a continuation"
JOB_MARGIN_SECONDS = 300        # the refresh stops this long before the job's time limit


class CommandResult(object):
    def __init__(self, argv, rc, out, err):
        self.argv, self.rc, self.out, self.err = argv, rc, out, err


SLURM_HINT = "is the Slurm controller up? (`scontrol ping`)"


def default_runner(argv, input_text=None, timeout=120, hint=SLURM_HINT):
    """Run an external command; None when it is not installed. Text is surrogate-escaped bytes.
    A command that does not answer within timeout seconds raises Failure, with hint."""
    try:
        p = subprocess.run(argv, input=None if input_text is None else
                           input_text.encode("utf-8", "surrogateescape"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    except (FileNotFoundError, PermissionError):
        # WARNING: an unreadable directory in PATH makes a missing command PermissionError
        # ([Errno 13] Permission denied: 'lfs'), not FileNotFoundError: not runnable here.
        return None
    except subprocess.TimeoutExpired:
        raise Failure("`%s` did not answer within %d s; %s" % (" ".join(argv[:2]), timeout,
                                                                hint))
    return CommandResult(argv, p.returncode, p.stdout.decode("utf-8", "surrogateescape"),
                         p.stderr.decode("utf-8", "surrogateescape"))


SLURM_HINTS = (
    ("Unable to contact slurm controller", "the Slurm controller is unreachable; try again later "
                                           "(`scontrol ping` tells when it is back)"),
    ("Invalid partition", "check --partition (`sinfo -s` lists the partitions)"),
    ("invalid partition", "check --partition (`sinfo -s` lists the partitions)"),
    ("Invalid account", "check --account (`sacctmgr show assoc user=$USER format=account` lists "
                        "yours; on BR200 they come from RT Projects)"),
    ("Memory specification", "lower --mem"),
    ("node configuration is not available", "lower --mem, --cpus or --time for this partition"),
    ("time limit", "lower --time"),
    ("errors in your crontab", "the crontab did not parse; run `scratch-keepalive install-cron "
                               "--dry-run` to see it"),
)


def slurm_reason(res):
    """Slurm's own words from a failed command, prefixes stripped, on one line."""
    lines = []
    for line in (res.err + "\n" + res.out).splitlines():
        line = line.strip()
        for prefix in ("sbatch: error: ", "scrontab: fatal: ", "scrontab: error: ",
                       "squeue: error: ", "scancel: error: ", "scontrol: error: ", "error: "):
            if line.startswith(prefix):
                line = line[len(prefix):]
        if line and line not in lines:
            lines.append(line)
    return "; ".join(lines) or "exit status %d" % res.rc


def slurm_failure(what, res):
    reason = slurm_reason(res)
    hint = next((h for key, h in SLURM_HINTS if key in reason), "see Slurm's message")
    return Failure("%s failed: %s; %s" % (what, reason, hint))


class Slurm(object):
    """Every Slurm command goes through here: return codes checked, stderr kept for messages.

    `runner` can be replaced (unit tests of message parsing); the real checks run
    against a real slurmctld.
    """

    def __init__(self, runner=None):
        self.runner = runner or default_runner

    def run(self, argv, input_text=None):
        return self.runner(argv, input_text)

    def require(self, argv, what=None, input_text=None):
        """The command's result: a Failure when it is not installed, or when it fails and
        what (the words for the failure) is given."""
        res = self.run(argv, input_text)
        if res is None:
            raise Failure("`%s` is not installed here: Slurm is needed for scheduling; run this "
                          "on the cluster's login node" % argv[0])
        if what is not None and res.rc != 0:
            raise slurm_failure(what, res)
        return res

    # -- scrontab
    def crontab(self):
        """('ok', text) | ('empty', '') | ('disabled', reason) | ('missing', None)."""
        res = self.run(["scrontab", "-l"])
        if res is None:
            return "missing", None
        if res.rc == 0:
            return "ok", res.out
        text = res.out + res.err
        if "scrontab is disabled" in text:
            return "disabled", slurm_reason(res)
        if "no crontab for" in text:
            return "empty", ""
        ping = self.run(["scontrol", "ping"])     # a controller that is down: say so plainly
        if ping is not None and (ping.rc != 0 or "UP" not in ping.out):
            raise Failure("the Slurm controller is unreachable (`scontrol ping`: %s); try again "
                          "later" % slurm_reason(ping))
        raise slurm_failure("reading your scrontab (`scrontab -l`)", res)

    def install_crontab(self, text):
        self.require(["scrontab", "-"], "installing the scrontab", input_text=text)

    # -- jobs
    def pending(self, name=JOB_NAME):
        """[(job id, start time)] of this user's pending jobs with that name."""
        res = self.require(["squeue", "--me", "--name=" + name, "--states=PENDING", "--noheader",
                            "--format=%i %S"], "listing your pending jobs (`squeue`)")
        jobs = []
        for line in res.out.splitlines():
            parts = line.split()
            if parts and parts[0].isdigit():
                jobs.append((parts[0], parts[1] if len(parts) > 1 else "N/A"))
        return sorted(jobs, key=lambda j: int(j[0]))

    def submit(self, argv_tail):
        res = self.require(["sbatch", "--parsable"] + argv_tail, "submitting the job (`sbatch`)")
        job = res.out.strip().split(";")[0]
        if not job.isdigit():
            raise Failure("sbatch printed %r, not a job id; check `squeue --me`" % res.out.strip())
        return job

    def cancel(self, job_id):
        self.require(["scancel", str(job_id)], "cancelling job %s (`scancel`)" % job_id)

    def test_only(self, argv_tail):
        """`sbatch --test-only`: None when Slurm would accept the job, else its reason."""
        res = self.require(["sbatch", "--test-only"] + argv_tail)
        return None if res.rc == 0 else slurm_reason(res)


def parse_slurm_time(text):
    """A Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> seconds."""
    m = re.match(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$", text or "")
    if not m:
        return None
    d, a, b, c = m.groups()
    # With a day or three fields the fields are hours, minutes, seconds; else minutes, seconds.
    units = (3600, 60, 1) if d is not None or c is not None else (60, 1)
    secs = int(d or 0) * DAY + sum(int(x) * u for x, u in zip((a, b, c), units) if x)
    return secs or None


# Cron schedules a cadence can use: every gap between runs must lie within
# [cadence, cadence + 3] days in every month. `*/14` in the day-of-month field
# is NOT one: it runs on the 29th and again on the 1st.
CRON_SCHEDULES = (
    # (cadence, day-of-month, day-of-week, shortest gap, longest gap, description)
    (1, "*", "*", 1, 1, "every day"),
    (2, "*", "1,3,5", 2, 3, "Monday, Wednesday and Friday"),
    (3, "*", "1,4", 3, 4, "Monday and Thursday"),
    (4, "1,5,9,13,17,21,25", "*", 4, 7, "days 1, 5, 9, 13, 17, 21 and 25 of the month"),
    (7, "*", "1", 7, 7, "every Monday"),
    (14, "1,15", "*", 14, 17, "days 1 and 15 of the month"),
    (28, "1", "*", 28, 31, "day 1 of the month"),
)


def cron_schedule(cadence):
    """The cron schedule for a cadence: (entry, effective cadence).

    The effective cadence is the shortest gap: the cadence itself when cron can
    express it, else the largest schedule whose longest gap stays within
    cadence + 3 days (runs come more often, never too late).
    """
    best = max((s for s in CRON_SCHEDULES if s[4] <= cadence + 3), key=lambda s: s[3])
    return best, best[3]


def shell_quote(text):
    return shlex.quote(text)


def script_path():
    return os.path.abspath(__file__)


JOB_SCRIPT = "job.sh"


def job_script_path(store):
    """The chain's job script: always this name in the state directory."""
    return os.path.join(store.dir, JOB_SCRIPT)


def directive_option(opt):
    """An option as an #SBATCH line holds it: sbatch reads '"' quotes and '\\' escapes there
    (a shell would not see this line), so a value with a space or a '#' is double-quoted."""
    key, sep, value = opt.partition("=")
    if not sep or not re.search(r"[\s\"'\\#]", value):
        return opt
    return '%s="%s"' % (key, value.replace("\\", "\\\\").replace('"', '\\"'))


class CronRequest(object):
    """What install-cron was asked for. None: the old schedule's value (with reinstall),
    else the profile's; install_cron()'s keyword arguments are the public form of this."""

    def __init__(self, method="auto", account=None, partition=None, cpus=None, mem=None,
                 time_limit=None, cadence_days=None, dry_run=False, reinstall=False,
                 mail_user=None):
        self.method = method or "auto"
        self.account, self.partition, self.cpus, self.mem = account, partition, cpus, mem
        self.time_limit, self.cadence_days = time_limit, cadence_days
        self.dry_run, self.reinstall = bool(dry_run), bool(reinstall)
        self.mail_user = mail_user


class Schedule(object):
    """What install-cron installs: the request, the paths, and the texts rendered from them."""

    def __init__(self, store, cfg, env, method, account, partition, cpus, mem, time_limit,
                 cadence, python=None, script=None, mail_user=None):
        self.store = store
        self.cfg = cfg
        self.method = method
        self.account = account
        self.partition = partition
        self.cpus = cpus
        self.mem = mem
        self.time = time_limit
        self.cadence = cadence
        self.python = python or sys.executable
        self.script = script or script_path()
        self.user = current_user(env)
        self.job_script = job_script_path(store)
        # Slurm mails this address when the job fails, and the job runs refresh
        # --fail-on-risk, so that risk found by a walk is such a failure.
        self.mail_user = mail_user

    @classmethod
    def from_doc(cls, store, cfg, env, doc, method=None):
        """The schedule a stored document describes (what an old document lacks: defaults)."""
        return cls(store, cfg, env, method or doc.get("method") or "sbatch",
                   account=doc.get("account"), partition=doc.get("partition"),
                   cpus=int(doc.get("cpus") or 1), mem=doc.get("mem") or "2G",
                   time_limit=doc.get("time") or "2:00:00",
                   cadence=int(doc.get("cadence_days") or 14),
                   python=doc.get("python"), script=doc.get("script"),
                   mail_user=doc.get("mail_user"))

    def as_dict(self):
        doc = {"method": self.method, "account": self.account, "partition": self.partition,
               "cpus": self.cpus, "mem": self.mem, "time": self.time,
               "cadence_days": self.cadence, "python": self.python, "script": self.script,
               "job_script": self.job_script if self.method == "sbatch" else None,
               "state_dir": self.store.dir, "scratch_root": self.cfg["scratch_root"]}
        if self.mail_user:      # only then: without it, install-cron prints what it did before
            doc["mail_user"] = self.mail_user
        return doc

    def request_options(self, name=JOB_NAME):
        opts = ["--job-name=" + name]
        if self.partition:
            opts.append("--partition=" + self.partition)
        if self.account:
            opts.append("--account=" + self.account)
        # --output is a filename pattern: `%%` there means exactly the path's `%`.
        opts += ["--cpus-per-task=%d" % self.cpus, "--mem=" + self.mem, "--time=" + self.time,
                 "--output=" + os.path.join(self.store.log_dir.replace("%", "%%"),
                                            "slurm-%j.out")]
        if self.mail_user:      # MAIL_RE: one word, no quoting needed anywhere
            opts += ["--mail-type=FAIL", "--mail-user=" + self.mail_user]
        return opts

    def check_paths(self):
        """Refuse (exit 2) a path that the rendered lines cannot hold, before anything changes.

        WARNING: scrontab splits an #SCRON line at every space, quotes or not, and a crontab
        entry is one line; sbatch reads quotes in #SBATCH lines (directive_option) but no
        line break. `%` is escaped where Slurm reads a filename pattern (request_options).
        """
        fix = "; choose a state directory without one (--state-dir DIR)"
        if re.search(r"[\n\r]", self.store.dir):
            raise UsageError("the state directory %s holds a line break, which no #SBATCH or "
                             "#SCRON line can hold%s" % (display_path(self.store.dir), fix))
        if self.method != "scrontab":
            return
        if re.search(r"\s", self.store.dir):
            raise UsageError("the state directory %r holds a space, which an #SCRON line cannot "
                             "hold (scrontab splits it at spaces)%s, or use --method sbatch"
                             % (self.store.dir, fix))
        for what, path in (("scratch root", self.cfg["scratch_root"]),
                           ("Python interpreter", self.python), ("script", self.script)):
            if re.search(r"[\n\r]", path):
                raise UsageError("the %s %s holds a line break, which a crontab entry (one line) "
                                 "cannot hold; use --method sbatch" % (what, display_path(path)))

    def command(self):
        """The job's command: absolute paths, state dir and scratch root passed explicitly."""
        # unset: the job must not inherit the installer's SCRATCH_KEEPALIVE_* (sbatch exports
        # the submitter's environment, and every successor passes it on).
        # -c LOADER: the script loaded from its bytecode (see LOADER), not compiled anew.
        return "cd %s && unset SCRATCH_KEEPALIVE_NOW SCRATCH_KEEPALIVE_HOME && " \
               "SCRATCH_KEEPALIVE_SCRATCH_ROOT=%s exec %s -c %s %s --state-dir %s refresh " \
               "--due%s --scheduled %s --max-seconds %d" % (
                   shell_quote(self.store.dir), shell_quote(self.cfg["scratch_root"]),
                   shell_quote(self.python), shell_quote(LOADER), shell_quote(self.script),
                   shell_quote(self.store.dir), " --fail-on-risk" if self.mail_user else "",
                   self.method, max(60, parse_slurm_time(self.time) - JOB_MARGIN_SECONDS))

    def cron_block(self):
        (cad, dom, dow, lo, hi, desc), _ = cron_schedule(self.cadence)
        # A fixed minute and early-morning hour per user, so users do not all start at once.
        h = sum(ord(c) * (i + 1) for i, c in enumerate(self.user)) % 240
        minute, hour = h % 60, 1 + h // 60
        return "\n".join([
            SCRON_BEGIN,
            "# runs %s at %02d:%02d; each run refreshes only the datasets that are due" % (
                desc, hour, minute),
            "#SCRON " + " ".join(self.request_options()),  # check_paths: no spaces
            "%d %d %s * %s %s" % (minute, hour, dom, dow, self.command()),
            SCRON_END, ""])

    def job_text(self):
        lines = ["#!/bin/bash"]
        lines += ["#SBATCH " + directive_option(o) for o in self.request_options()]
        lines += [
            "#SBATCH --no-requeue",
            "#SBATCH --signal=B:TERM@120",
            "# Managed by `scratch-keepalive install-cron`; `scratch-keepalive uninstall-cron`",
            "# removes it. Each run first submits its successor (one pending job at most, and",
            "# only while this file exists), then refreshes the datasets that are due.",
            self.command(),
            ""]
        return "\n".join(lines)

    def text(self):
        return self.cron_block() if self.method == "scrontab" else self.job_text()


def merge_crontab(current, block):
    """The crontab with our block replaced (or appended); every other line kept byte for byte."""
    start = current.find(SCRON_BEGIN)
    if start >= 0:
        end = current.find(SCRON_END, start)
        if end >= 0:
            end = current.find("\n", end)
            end = len(current) if end < 0 else end + 1
            return current[:start] + block + current[end:]
    if current and not current.endswith("\n"):
        current += "\n"
    return current + block


def load_schedule(store):
    return read_json(store.schedule_path, "schedule", SCHEDULE_SCHEMA)


def save_schedule(store, doc):
    atomic_write(store.schedule_path, dump_json(dict(doc, format=FORMAT)))


def _schedule_request(ctx, cfg, old, req):
    """Validate and complete the job request from req, the old schedule, the profile.

    Returns (the Schedule's keyword arguments but its method, the enabled datasets)."""
    prof = profile_of(cfg)
    old = old or {}
    account = req.account or old.get("account")
    if prof["account_required"] and not account:
        raise UsageError("--account is required on %s (IU rejects jobs without -A); find yours "
                         "with `sacctmgr show assoc user=$USER format=account` or in RT "
                         "Projects" % cfg["profile"])
    mem = req.mem or old.get("mem") or prof["mem"]
    if not re.match(r"^\d+[KMGT]?$", mem):
        raise UsageError("--mem %r is not a Slurm memory size; use e.g. 2G or 2048M" % mem)
    time_limit = req.time_limit or old.get("time") or prof["time"]
    seconds = parse_slurm_time(time_limit)
    if seconds is None:
        raise UsageError("--time %r is not a Slurm time limit; use e.g. 2:00:00" % time_limit)
    if seconds < 600:
        raise UsageError("--time %s is too short for a refresh; give at least 0:10:00"
                         % time_limit)
    mail_user = req.mail_user if req.mail_user is not None else old.get("mail_user")
    if mail_user is not None and _mail_user(mail_user):
        raise UsageError("--mail-user %r is not an address this tool passes to Slurm (one "
                         "word with one '@'; letters, digits, '.', '_', '+' and '-' only); "
                         "give one like jdoe@iu.edu" % (mail_user,))
    reg = ctx.store.load_registry()
    enabled = [d for d in reg["datasets"].values() if d.get("enabled", True)]
    cadence = (req.cadence_days or old.get("cadence_days")
               or (min(int(d["cadence_days"]) for d in enabled) if enabled else None)
               or prof["default_cadence"])
    return {"account": account, "partition": req.partition or old.get("partition")
            or prof["partition"], "cpus": int(req.cpus or old.get("cpus") or prof["cpus"]),
            "mem": mem, "time_limit": time_limit, "mail_user": mail_user,
            "cadence": _check_cadence(cfg, int(cadence))}, enabled


def _choose_method(ctx, method):
    """(method, current crontab text or None)."""
    if method == "sbatch":
        return "sbatch", None
    kind, text = ctx.slurm.crontab()
    if kind in ("ok", "empty"):
        return "scrontab", text
    if method == "scrontab":
        if kind == "missing":
            raise Failure("`scrontab` is not installed here; use --method sbatch (or auto)")
        raise Failure("scrontab is not available: %s; use --method sbatch (or auto)" % text)
    return "sbatch", None


def _install_cron(ctx, req):
    """Validate, render, then install: nothing changes until every check has passed.
    A dry run takes no lock (contextlib.suppress(): a context that does nothing)."""
    with contextlib.suppress() if req.dry_run else ctx.store.schedule_lock():
        cfg = ctx.config()
        old = load_schedule(ctx.store)
        method = req.method
        if req.reinstall:
            if old is None:
                raise UsageError("no schedule is installed; run `%s install-cron` first" % PROG)
            if method == "auto":
                method = old.get("method") or "auto"
        fields, enabled = _schedule_request(ctx, cfg, old if req.reinstall else None, req)
        sched = Schedule(ctx.store, cfg, ctx.env, method, **fields)
        sched.check_paths()     # before asking Slurm
        sched.method, current = _choose_method(ctx, method)
        sched.check_paths()
        info = {"schedule": sched.as_dict(), "text": sched.text(),
                "warnings": _cadence_warnings(sched, enabled), "dry_run": req.dry_run,
                "job_id": None}
        if req.dry_run:
            return info
        ctx.store.ensure()
        if sched.method == "scrontab":
            _install_block(ctx, sched, old, current)
        else:
            info["job_id"] = _install_chain_instead(ctx, sched)
        doc = sched.as_dict()
        doc.update(installed=iso(time.time()), job_id=info["job_id"],
                   last_run=(old or {}).get("last_run"))
        save_schedule(ctx.store, doc)
        return info


def _cadence_warnings(sched, enabled):
    """What the user should know: a cadence cron cannot keep, datasets it serves late."""
    warnings = []
    cadence = every = sched.cadence
    if sched.method == "scrontab":
        (_, _, _, lo, hi, desc), every = cron_schedule(cadence)
        if every != cadence:
            warnings.append("cron cannot run every %d days; the schedule runs on %s (every %d "
                            "to %d days)" % (cadence, desc, lo, hi))
    for d in sorted(enabled, key=lambda d: d["name"]):
        c = int(d["cadence_days"])
        if c < every:
            warnings.append("dataset %r wants a refresh every %d days but the schedule runs "
                            "every %d; it will be refreshed late" % (d["name"], c, every))
        elif c % every:
            warnings.append("dataset %r has a %d-day cadence; on a %d-day schedule it is "
                            "refreshed every %d days: set `%s extend --name %s --cadence-days "
                            "%d`" % (d["name"], c, every, (c // every + 1) * every, PROG,
                                     d["name"], every))
    return warnings


def _install_block(ctx, sched, old, current):
    """Our block into the scrontab; then the old chain (if any) goes."""
    from_chain = bool(old and old.get("method") == "sbatch")
    # The chain's pending jobs are listed BEFORE the crontab is installed: afterwards the
    # cron job has the same name, and an scancel would disable it (#DISABLED:).
    chain_jobs = ctx.slurm.pending(JOB_NAME) if from_chain else []
    ctx.slurm.install_crontab(merge_crontab(current, sched.text()))
    if from_chain:
        _remove_job_script(ctx.store)
        for job, _ in chain_jobs:
            ctx.slurm.cancel(job)


def _install_chain_instead(ctx, sched):
    """The chain in place of our scrontab block (if any). Returns the first job's id."""
    reason = ctx.slurm.test_only(sched.request_options() + ["--wrap", "true"])
    if reason is not None:      # Slurm judges the request before anything changes
        raise slurm_failure("checking the job request (`sbatch --test-only`)",
                            CommandResult([], 1, "", reason))
    # Our scrontab block goes first, so that no scancel ever reaches its cron job; it
    # comes back if the chain cannot be installed.
    crontab = _remove_cron_block(ctx)
    try:
        return _install_chain(ctx, sched)
    except BaseException:
        if crontab is not None:
            ctx.slurm.install_crontab(crontab)
        raise


def _install_chain(ctx, sched):
    """Write the job script and leave exactly one pending chain job. Returns its id."""
    slurm = ctx.slurm
    try:
        previous = read_state(sched.job_script, "job script")
    except StateError:
        previous = None     # not ours: not put back
    atomic_write(sched.job_script, sched.job_text().encode("utf-8", "surrogateescape"), 0o700)
    try:
        for job, _ in slurm.pending(JOB_NAME):
            slurm.cancel(job)       # running it again replaces, never duplicates
        return slurm.submit(["--begin=now", sched.job_script])
    except BaseException:
        if previous is None:
            with contextlib.suppress(OSError):
                os.unlink(sched.job_script)
        else:
            atomic_write(sched.job_script, previous, 0o700)
        raise


def _remove_job_script(store):
    """Delete the job script, so that no running chain job resubmits itself."""
    path = job_script_path(store)
    if not os.path.exists(path):
        return []
    os.unlink(path)
    return ["job script %s" % path]


def _remove_cron_block(ctx):
    """Our block out of the scrontab. Returns the scrontab it was in; None when it held none
    (or there is no scrontab here)."""
    kind, text = ctx.slurm.crontab()
    if kind != "ok" or SCRON_BEGIN not in text:
        return None
    stripped = merge_crontab(text, "")
    if stripped.strip():
        ctx.slurm.install_crontab(stripped)
    else:
        ctx.slurm.require(["scrontab", "-r"], "removing the scrontab")
    return text


def _uninstall_cron(ctx):
    """The job script, our scrontab block, then pending chain and continuation jobs.

    Order matters: the block goes before any scancel, because scancel on a scrontab job
    only comments its lines out (#DISABLED:)."""
    store = ctx.store
    with store.schedule_lock():
        try:
            load_schedule(store)
        except NewerState:
            raise           # a newer version's record is never deleted
        except StateError:
            pass            # a damaged record must not keep a schedule alive
        removed = _remove_job_script(store)
        if _remove_cron_block(ctx) is not None:
            removed.append("the scrontab block")
        if ctx.slurm.run(["squeue", "--version"]) is not None:
            for name in (JOB_NAME, RESUME_JOB_NAME):
                for job, _ in ctx.slurm.pending(name):
                    ctx.slurm.cancel(job)
                    removed.append("pending job %s (%s)" % (job, name))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(store.schedule_path)
    return {"removed": removed}


def schedule_status(ctx):
    """The installed schedule with its next run (from squeue), or None."""
    doc = load_schedule(ctx.store)
    if doc is None:
        return None
    info = {"method": doc.get("method"), "cadence_days": doc.get("cadence_days"),
            "installed": doc.get("installed"), "last_run": doc.get("last_run"),
            "mail_user": doc.get("mail_user"), "next_run": None, "pending_jobs": None}
    try:
        jobs = ctx.slurm.pending(JOB_NAME)
        info["pending_jobs"] = [j for j, _ in jobs]
        info["next_run"] = jobs[0][1] if jobs else None
    except Failure as e:
        info["error"] = str(e)
    return info


def schedule_summary(ctx):
    """The `schedule` key of `status --json`: None, or the installed method and next run.

    None comes from the state alone (no schedule.json: nothing is installed, and Slurm is
    not asked). An installed schedule's next run is the start time Slurm gives its pending
    job, as the text of `status` shows it; null with "error" when squeue cannot tell.
    """
    try:
        info = schedule_status(ctx)
    except StateError as e:     # a damaged record: say so, and still show the dataset
        info = {"pending_jobs": [], "error": str(e)}
    if info is None:
        return None
    summary = dict((k, info.get(k)) for k in ("method", "cadence_days", "installed",
                                              "pending_jobs", "error", "mail_user"))
    summary["next_run"] = slurm_time_utc(info.get("next_run"))
    return summary


def slurm_time_utc(text):
    """squeue's local `2026-12-04T03:53:00` as UTC `2026-12-04T03:53:00Z`; None if not a time."""
    try:
        return iso(time.mktime(time.strptime(text or "", "%Y-%m-%dT%H:%M:%S")))
    except (ValueError, OverflowError):
        return None


def _scheduled_before(ctx, method):
    """A chain job submits its successor first, so a crash in this run keeps the chain alive."""
    if not ctx.env.get("SLURM_JOB_ID"):
        raise UsageError("--scheduled is for runs inside a Slurm job (no SLURM_JOB_ID here); "
                         "use `%s refresh` instead" % PROG)
    doc = load_schedule(ctx.store)
    if method != "sbatch" or doc is None:
        return doc, None
    job_script = doc.get("job_script") or job_script_path(ctx.store)
    try:
        with ctx.store.schedule_lock():
            if not os.path.exists(job_script):
                return doc, "the job script is gone (uninstalled): no successor submitted"
            if ctx.slurm.pending(JOB_NAME):
                return doc, "a successor is already pending"
            job = ctx.slurm.submit(["--begin=now+%ddays" % int(doc.get("cadence_days") or 14),
                                    job_script])
        return doc, "successor job %s submitted" % job
    except Failure as e:
        return doc, "could not submit the successor: %s" % e


def _scheduled_after(ctx, method, doc, code, results, risk=None, codes=None):
    """After a stopped run, one continuation soon; record the outcome for status and doctor.

    Returns (what was done, the job's exit code). With risk (refresh --fail-on-risk: the
    risk found, and codes, each dataset's exit code) the code is risk_exit_code()'s: a
    stop whose continuation is booked is no failure to mail about.
    """
    said = booked = None
    # Any walk a budget stopped needs its continuation, whatever another dataset's walk
    # ended with (entry errors make the run's code 1, not 3).
    stopped = code == EXIT_STOPPED or any(
        EXIT_STOPPED in (r.get("exit_code"), (r.get("rescue") or {}).get("exit_code"))
        for r in results)
    if stopped and doc is not None:
        try:
            with ctx.store.schedule_lock():
                said = _continue_soon(ctx, method, doc)
            booked = said is not None
        except Failure as e:
            said = "%s: %s" % (CONTINUATION_FAILED, e)
    final = code if risk is None else risk_exit_code(codes or [code], risk, booked)
    if doc is not None:
        doc = load_schedule(ctx.store) or doc
        doc["last_run"] = {"job_id": ctx.env.get("SLURM_JOB_ID"), "finished": iso(time.time()),
                           "exit_code": final, "continuation": said,
                           "datasets": [r["name"] for r in results]}
        if risk is not None:
            doc["last_run"].update(exit_code_before_risk=code, risk=[n for n, _ in risk])
        with contextlib.suppress(OSError):
            save_schedule(ctx.store, doc)
    return said, final


def _continue_soon(ctx, method, doc):
    slurm = ctx.slurm
    if method == "sbatch":
        jobs = slurm.pending(JOB_NAME)
        if jobs:
            slurm.require(["scontrol", "update", "JobId=%s" % jobs[0][0], "StartTime=now+1hour"],
                          "moving job %s (`scontrol update`)" % jobs[0][0])
            return "pending job %s moved to start in an hour" % jobs[0][0]
        job_script = doc.get("job_script") or job_script_path(ctx.store)
        if not os.path.exists(job_script):
            return None
        return "continuation job %s submitted" % slurm.submit(["--begin=now+1hour", job_script])
    if slurm.pending(RESUME_JOB_NAME):
        return "a continuation is already pending"
    sched = Schedule.from_doc(ctx.store, ctx.config(), ctx.env, doc, method="resume")
    job = slurm.submit(sched.request_options(RESUME_JOB_NAME) +
                       ["--begin=now+1hour", "--no-requeue", "--wrap", sched.command()])
    return "continuation job %s submitted" % job


# ---------------------------------------------------------------- doctor and repair


class Check(object):
    """One doctor finding: level ok, info (the data, for the user: not the tool's
    problem), warn or fail (a problem with the tool's machinery: doctor exits 1)."""

    def __init__(self, name, level, message, fix=None):
        self.name, self.level, self.message, self.fix = name, level, message, fix

    def as_dict(self):
        return {"name": self.name, "ok": self.level in ("ok", "info"), "level": self.level,
                "message": self.message}


def _doctor(ctx):
    checks = [c.as_dict() for c in _diagnose(ctx)]
    return {"ok": all(c["ok"] for c in checks), "checks": checks}


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _diagnose(ctx):
    """Every check, in a fixed order. Never raises for a damaged state: that is a finding."""
    store = ctx.store
    checks = [Check("python", "ok" if sys.version_info >= (3, 6) else "fail",
                    "Python %s at %s" % (sys.version.split()[0], sys.executable))]
    cfg, reg, bad, state_checks = _check_state_files(ctx)
    checks += state_checks
    root = scratch_root_of(cfg, ctx.env) if cfg else None
    checks += _check_environment(ctx, cfg, root)
    checks += _check_state_links(store)
    checks += _check_checkpoints(ctx, reg, bad)
    checks += _check_locks(ctx)
    checks += _check_temp_files(store)
    checks += _check_manifest_space(store)
    if cfg and reg is not None:
        for name in sorted(reg["datasets"]):
            checks += _check_dataset(ctx, cfg, root, reg["datasets"][name])
        checks += _check_schedule(ctx, cfg, reg)
    if root:
        checks += _check_quota(ctx, root)
    return checks


def _state_check(name, e, fix, then=""):
    """The failed check of a state file its loader refused with e. Repair sets a damaged
    file aside (fix, and `then` says what follows), never one that may be intact
    (unreadable) or that a newer version wrote."""
    damaged = isinstance(e, InvalidState)
    return Check(name, "fail", "%s%s" % (e, then if damaged else ""),
                 fix=fix if damaged else None)


def _some(items, n=3, sep=", "):
    """The first n of items, joined, and " ..." when there are more."""
    return sep.join(items[:n]) + (" ..." if len(items) > n else "")


def _check_state_files(ctx):
    """(config, registry of the valid entries, {name: (message, entry)}, checks)."""
    store = ctx.store
    out, cfg, reg, bad = [], None, None, {}
    try:
        cfg = store.load_config()
        out.append(Check("config", "ok", "config %s is readable" % store.config_path) if cfg else
                   Check("config", "fail", "no configuration in %s; run `%s init`"
                         % (store.dir, PROG)))
    except StateError as e:
        out.append(_state_check("config", e, "config"))
    try:
        reg, bad, lost, kept = _load_registry(ctx, cfg)
    except StateError as e:
        out.append(_state_check("registry", e, "registry", "; repair restores the last good "
                                "backup or rebuilds it from the sentinels"))
        lost = kept = None
    if lost:
        out.append(Check("registry", "fail", "the registry %s is missing, but its backup %s "
                         "lists %d dataset(s); repair restores it" % (
                             store.registry_path, store.backup_path, lost), fix="registry"))
    elif kept:
        out.append(Check("registry", "fail", "the registry %s lists no dataset, but its "
                         "backup %s lists %d whose sentinels are in place (%s); repair "
                         "restores them" % (store.registry_path, store.backup_path, len(kept),
                                            ", ".join(sorted(kept))), fix="registry"))
    elif reg is not None:
        out.append(Check("registry", "fail" if bad else "ok", "registry lists %d dataset(s)%s"
                         % (len(reg["datasets"]) + len(bad), "; %d invalid (below): repair "
                            "mends them from the backup or their sentinels" % len(bad)
                            if bad else ""), fix="registry" if bad else None))
    for name in sorted(bad):
        out.append(Check("entry:" + display_path(name)[:64], "fail", bad[name][0],
                         fix="registry"))
    odd = store.odd_dirs() + odd_state_files(store)
    if odd:
        out.append(Check("state-files", "fail", "%s where state belongs; repair sets %s aside "
                         "(renamed, never deleted)" % (
                             _some(["%s is %s" % (display_path(p), w) for p, w in odd], sep="; "),
                             "it" if len(odd) == 1 else "them"), fix="aside"))
    return cfg, reg, bad, out


def _load_registry(ctx, cfg):
    """(the registry of the valid entries, {name: (message, entry)} for the invalid ones, the
    number of datasets its backup lists when the registry file is missing, {name: entry} of
    the backup's datasets whose sentinels are in place when it lists none). Raises a
    StateError as load_registry_parts does.

    A sentinel in place lies below the scratch root and names its dataset: `remove` deletes
    the sentinel, so these datasets were not removed, the registry was emptied."""
    store = ctx.store
    reg, bad = store.load_registry_parts()
    if bad:
        return reg, bad, 0, {}
    # Only a registry that lists no dataset (a missing one lists none) is set against its backup.
    backup, backup_bad = _registry_backup(store) if not reg["datasets"] else (None, {})
    if not os.path.lexists(store.registry_path):
        return reg, bad, len(backup["datasets"]) + len(backup_bad) if backup is not None else 0, {}
    kept = {}
    for name, entry in sorted(backup["datasets"].items() if cfg and backup is not None else ()):
        if not _below_scratch_root(ctx, cfg, entry["path"]) or not root_present(entry["path"]):
            continue
        doc = _at_root(ctx, entry, read_sentinel, None)
        if doc is not None and doc.get("name") == name:
            kept[name] = entry
    return reg, bad, 0, kept


def _check_manifest_space(store):
    """Warn when the manifests take more than a tenth of the state directory's free space."""
    used = 0
    for dirpath, _, files in os.walk(os.path.join(store.dir, "manifests")):
        for f in files:
            with contextlib.suppress(OSError):
                used += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    try:
        st = os.statvfs(store.dir)
    except OSError:
        return []
    free = st.f_bavail * st.f_frsize
    if not used:
        return []
    if used <= free // 10:
        return [Check("manifests", "ok", "manifests take %s (%s free in the state directory)"
                      % (human_bytes(used), human_bytes(free)))]
    return [Check("manifests", "warn", "manifests take %s, more than a tenth of the %s free in "
                  "the state directory; free space there, or `%s extend --name NAME "
                  "--no-manifest` for the largest datasets" % (
                      human_bytes(used), human_bytes(free), PROG))]


def _check_temp_files(store):
    temps = stale_temps(store.dir) + stale_temps(store.checkpoint_dir)
    if not temps:
        return []
    return [Check("temp-files", "warn", "%d temp file(s) left by interrupted writes (%s); "
                  "repair removes them" % (len(temps), _some(temps, 1)), fix="temp")]


def _check_environment(ctx, cfg, root):
    store = ctx.store
    out = []
    if cfg:
        if root and os.path.isdir(root):
            out.append(Check("scratch-root", "ok", "scratch root %s exists" % root))
        else:
            out.append(Check("scratch-root", "fail", "scratch root %s does not exist%s" % (
                root, " (not on BR200?)" if cfg.get("profile") == "br200" else "")))
    if not os.path.isdir(store.dir):
        out.append(Check("state-dir", "fail", "state directory %s %s; `%s init` creates it" % (
            store.dir, "is not a directory" if os.path.lexists(store.dir) else "does not exist",
            PROG)))
        return out
    problems = []
    if root and overlaps(os.path.realpath(store.dir), os.path.realpath(root)):
        problems.append("it lies inside the scratch root, where the purge deletes it")
    writable = os.access(store.dir, os.W_OK | os.X_OK)
    if not writable:
        problems.append("it is not writable")
    wrong, loose, shut = _loose_permissions(store), [], []
    for p, st, _ in wrong:      # shut: lacking their owner's read or write (or search) right
        need = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
        if st.st_mode & need != need:
            shut.append((p, stat.S_IMODE(st.st_mode)))
        else:
            loose.append(p)
    if shut:
        problems.append("%s %s unreadable or unwritable by you (%s; dirs should be 0700, "
                        "files 0600)" % (_some([p for p, _ in shut]),
                                         "is" if len(shut) == 1 else "are",
                                         ", ".join("mode %03o" % m for _, m in shut[:3])))
    if loose:
        problems.append("%s %s group/other access (dirs should be 0700, files 0600)"
                        % (_some(loose), "has" if len(loose) == 1 else "have"))
    if problems:
        out.append(Check("state-dir", "fail", "state directory %s: %s" % (
            store.dir, "; ".join(problems)), fix="permissions" if wrong or not writable
            else None))
    else:
        out.append(Check("state-dir", "ok", "state directory %s is private and writable"
                         % store.dir))
    return out


def _check_state_links(store):
    """Symlinks inside the state directory: never followed, so what they meant is not done."""
    links = []
    for dirpath, dirs, files in os.walk(store.dir):     # os.walk does not follow them either
        for name in sorted(dirs + files):
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                links.append(p)
    if not links:
        return []
    return [Check("state-links", "fail", "%s %s a symlink inside the state directory, which %s "
                  "never follows (a refresh does not log through one); delete %s (`rm`: what "
                  "a link points to is not touched)" % (
                      _some([display_path(p) for p in links]),
                      "is" if len(links) == 1 else "are each", PROG,
                      "it" if len(links) == 1 else "them"))]


def _loose_permissions(store):
    """[(path, its lstat, the mode it should have)] for the state paths whose mode is not
    0700 (dirs and the job script) / 0600 (files)."""
    loose = []
    for dirpath, dirs, files in os.walk(store.dir):
        for name in [""] + files:
            p = os.path.join(dirpath, name) if name else dirpath
            try:
                st = os.lstat(p)
            except OSError:
                continue
            want = 0o700 if stat.S_ISDIR(st.st_mode) or name == JOB_SCRIPT else 0o600
            if stat.S_ISLNK(st.st_mode) or (name.startswith("slurm-") and name.endswith(".out")):
                continue    # Slurm creates its job logs with the job's umask
            if stat.S_IMODE(st.st_mode) != want:
                loose.append((p, st, want))
    return loose


def _check_checkpoints(ctx, reg, bad=()):
    """bad: names of invalid registry entries, whose checkpoints repair keeps."""
    out = []
    store = ctx.store
    for p in _names_ending(store.checkpoint_dir, ".json"):
        name = os.path.basename(p)[:-len(".json")]
        if name in bad:
            continue
        try:
            ck = store.load_checkpoint(name)
        except StateError as e:
            out.append(_state_check("checkpoint:" + name, e, "checkpoint", "; repair sets it "
                                    "aside and the next refresh starts over"))
            continue
        ds = reg["datasets"].get(name) if reg is not None else None
        if reg is not None and ds is None:
            out.append(Check("checkpoint:" + name, "fail", "checkpoint %s belongs to no "
                             "registered dataset; repair sets it aside" % store.checkpoint_path(
                                 name), fix="checkpoint"))
        elif ds is not None and ck.get("path") != ds["path"]:
            out.append(Check("checkpoint:" + name, "fail", "checkpoint of %r is for %s, not its "
                             "current path %s; repair sets it aside" % (
                                 name, ck.get("path"), ds["path"]), fix="checkpoint"))
        elif ds is not None:
            out.append(Check("checkpoint:" + name, "ok", "walk in progress: %s entries done, "
                             "saved %s" % (human_count(int(ck.get("entries_done", 0))),
                                           ck.get("updated"))))
    return out


def _lock_record(path):
    """The holder a lock file records, or None (released, or not a record LOCK_SCHEMA allows)."""
    try:
        raw = read_state(path, "lock") or b""
        rec = _json_loads(raw) if raw.strip() else None
    except (OSError, ValueError, StateError):
        return None
    return rec if rec is not None and not check_doc(rec, LOCK_SCHEMA) else None


def _lock_is_held(path):
    try:
        fd = open_state(path, "lock", os.O_RDWR)
    except (OSError, StateError):
        return False
    if fd is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _stale_locks(store):
    """[(dataset, path, record, provably dead, held)] for lock records whose holder is gone
    (held: a process the holder started still holds the lock, so it is not stale yet)."""
    found = []
    host = socket.gethostname()
    for path in _names_ending(store.lock_dir, ".lock"):
        f = os.path.basename(path)
        if f.startswith("."):
            continue        # the store's own locks, not a dataset's
        rec = _lock_record(path)
        if not rec:
            continue        # released cleanly (the record is emptied on release)
        dead = (rec.get("host") == host and isinstance(rec.get("pid"), int)
                and not _pid_alive(rec["pid"]))
        held = _lock_is_held(path)
        if held and not dead:
            continue        # a live holder
        found.append((f[:-len(".lock")], path, rec, dead, held))
    return found


_HELD_LOCK = "a process it started still holds the lock: end that process, then repair again"


def _check_locks(ctx):
    out = []
    for name, path, rec, dead, held in _stale_locks(ctx.store):
        if dead:
            out.append(Check("lock:" + name, "fail", "lock %s names pid %s on this host, which is "
                             "gone (killed?); %s" % (path, rec.get("pid"), _HELD_LOCK if held
                                                     else "repair removes it"),
                             fix=None if held else "lock"))
        else:
            out.append(Check("lock:" + name, "warn", "lock %s names pid %s on host %s (since %s); "
                             "if that run is over, delete the file" % (
                                 path, rec.get("pid"), rec.get("host"), rec.get("since"))))
    return out


def _check_dataset(ctx, cfg, root, ds):
    name, path = ds["name"], ds["path"]
    now = ctx.now
    out = []
    if os.path.islink(path):
        return [Check("root:" + name, "fail", "dataset %r: its path %s is a symlink, which %s "
                      "never follows; `%s remove --name %s`, then add it again with the real "
                      "path" % (name, path, PROG, PROG, name))]
    if not root_present(path):
        return [Check("root:" + name, "fail", "dataset %r: its root %s is missing (purged, moved "
                      "or renamed?); restore it or `%s remove --name %s`" % (name, path, PROG,
                                                                            name))]
    try:
        with dataset_root(ctx, ds) as root_fd:      # read through the root's fd (never blocking)
            sentinel, why = sentinel_state(root_fd)
    except Failure as e:
        return [Check("root:" + name, "fail", str(e))]
    out.append(Check("root:" + name, "ok", "dataset %r: %s is present" % (name, path)))
    if sentinel is None and why != "missing":
        out.append(Check("sentinel:" + name, "fail", "dataset %r: %s is not ours (%s); move it "
                         "away, then run `%s repair`" % (name, sentinel_path(path), why, PROG)))
    elif sentinel is None or sentinel.get("name") != name:
        out.append(Check("sentinel:" + name, "fail", "dataset %r: its sentinel %s is %s; repair "
                         "rewrites it" % (name, sentinel_path(path), "missing" if sentinel is None
                                          else "naming %r" % sentinel.get("name")),
                         fix="sentinel"))
    if root and not is_below(path, os.path.realpath(root)):
        out.append(Check("location:" + name, "fail", "dataset %r (%s) is no longer below the "
                         "scratch root %s" % (name, path, root)))
    days_left = (parse_date(ds["keep_until"]) - utc_date(now)).days
    active = ds.get("enabled", True) and days_left >= 0
    last, overdue = ds.get("last_refresh"), overdue_at(ds)
    if active and overdue is not None and now > overdue:
        out.append(Check("overdue:" + name, "fail", "dataset %r: %s more than %d days ago; check "
                         "the schedule (`%s status`) and run `%s refresh --name %s`" % (
                             name, "last complete refresh %s," % last if last else
                             "never refreshed, added", int(ds["cadence_days"]) + OVERDUE_DAYS,
                             PROG, PROG, name)))
    # The data is the user's to act on, not a fault of the tool: information.
    codes = attention(ds, now, checkpoint_or_none(ctx.store, name))
    for code in codes:
        what, command = attention_words(ds, code, now)
        out.append(Check("%s:%s" % (code, name), "info", "dataset %r: %s; run `%s`"
                         % (name, what, command)))
    if dataset_mode(cfg, ds) == "check" and active:
        out.append(Check("approval:" + name, "info", "dataset " + no_approval_words(name)))
    return out


def _check_schedule(ctx, cfg, reg):
    prof = profile_of(cfg)
    enabled = [d for d in reg["datasets"].values() if d.get("enabled", True)]
    try:
        doc = load_schedule(ctx.store)
    except StateError as e:
        return [_state_check("schedule", e, "schedule", ", then `%s install-cron` again" % PROG)]
    slurm = ctx.slurm
    if slurm.run(["squeue", "--version"]) is None:
        # Not a fault of the tool: it works, by hand (status --brief says so too).
        return [Check("schedule", "info", "Slurm is not installed here (not on a cluster?): "
                      "datasets are refreshed only when you run `%s refresh`" % PROG)]
    if doc is None:
        return [Check("schedule", "fail" if enabled else "ok",
                      "no schedule is installed%s" % (
                          "; run `%s install-cron%s`" % (PROG, " --account ACCOUNT" if
                                                          prof["account_required"] else "")
                          if enabled else " (no enabled datasets)"))]
    out = [Check("schedule", "ok", "%s schedule every %s days, installed %s" % (
        doc.get("method"), doc.get("cadence_days"), doc.get("installed")))]
    missing = [p for p in (doc.get("python"), doc.get("script")) if not p or not os.path.exists(p)]
    if missing:
        out.append(Check("schedule-paths", "fail", "the schedule runs %s, which no longer exists; "
                         "repair reinstalls it with %s" % (" and ".join(map(str, missing)),
                                                           sys.executable), fix="reinstall"))
    if int(doc.get("cadence_days") or 0) < prof["min_cadence"]:
        out.append(Check("schedule-cadence", "fail", "the schedule runs every %s days, below the "
                         "%s minimum of %d; run `%s install-cron --cadence-days %d`" % (
                             doc.get("cadence_days"), cfg["profile"], prof["min_cadence"], PROG,
                             prof["min_cadence"])))
    return out + _check_schedule_in_slurm(ctx, cfg, doc, prof)


def _check_schedule_in_slurm(ctx, cfg, doc, prof):
    """What Slurm holds of the installed schedule doc: its jobs, its block, its request."""
    slurm, out = ctx.slurm, []
    try:
        jobs = slurm.pending(JOB_NAME)
    except Failure as e:
        return [Check("schedule-jobs", "fail", "cannot list jobs: %s" % e)]
    if len(jobs) > 1:
        out.append(Check("schedule-jobs", "fail", "%d pending %s jobs (%s); there should be one; "
                         "repair cancels all but the earliest" % (
                             len(jobs), JOB_NAME, ", ".join(j for j, _ in jobs)),
                         fix="duplicates"))
    if doc.get("method") == "scrontab":
        kind, text = slurm.crontab()
        if kind != "ok" or SCRON_BEGIN not in (text or ""):
            out.append(Check("schedule-block", "fail", "the scrontab block is gone (%s); repair "
                             "reinstalls it" % (text if kind == "disabled" else "scrontab -l"),
                             fix="reinstall"))
        elif "#DISABLED:" in text[text.index(SCRON_BEGIN):].split(SCRON_END, 1)[0]:
            out.append(Check("schedule-block", "fail", "the scrontab block was disabled "
                             "(#DISABLED:, after an scancel of its job); repair reinstalls it",
                             fix="reinstall"))
    elif not jobs and not ctx.env.get("SLURM_JOB_ID"):
        out.append(Check("schedule-jobs", "fail", "no pending %s job: the chain is broken; "
                         "repair reinstalls it" % JOB_NAME, fix="reinstall"))
    if doc.get("account") or prof["account_required"]:
        sched = Schedule.from_doc(ctx.store, cfg, ctx.env, doc)
        reason = slurm.test_only(sched.request_options() + ["--wrap", "true"])
        if reason is not None:
            out.append(Check("schedule-account", "fail", "Slurm would reject the scheduled job: "
                             "%s; run `%s install-cron` with a valid --account/--partition" % (
                                 reason, PROG)))
    return out


def _check_quota(ctx, root, runner=None):
    """The user's quota on the scratch filesystem (read_quota): near its byte or file limit,
    or a quota command that does not answer, is a WARN."""
    try:
        reading = read_quota(root, current_user(ctx.env), runner)
    except Failure as e:
        return [Check("quota", "warn", "scratch quota: %s" % e)]
    if reading.row is None:
        return [Check("quota", "info", "scratch quota: not checked: %s" % reading.why)]
    _, used_kb, _, hard_kb, files, _, hard_files = reading.row
    near = ["%d%% of the %s limit" % (100 * used // hard, what)
            for what, used, hard in (("byte", used_kb, hard_kb), ("file", files, hard_files))
            if hard and used >= 0.9 * hard]
    if near:
        return [Check("quota", "warn", "scratch quota: %s (`%s`)" % (" and ".join(near),
                                                                       reading.command))]
    return [Check("quota", "ok", "scratch quota: %s KiB of %s, %s files of %s" % (
        used_kb, hard_kb or "unlimited", files, hard_files or "unlimited"))]


_SET_ASIDE_RE = _LazyPattern(r"\.corrupt-\d{8}T\d{6}Z(-\d+)?$")     # _set_aside()'s names


def _set_aside(path, dry_run, copy=False):
    """Rename a damaged file to PATH.corrupt-TIME (never over an earlier copy).

    copy: keep a copy there instead (for a file about to be replaced by atomic_write, so
    that no moment passes without one in place)."""
    base = "%s.corrupt-%s" % (path, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    target, n = base, 1
    while os.path.lexists(target):
        n += 1
        target = "%s-%d" % (base, n)
    if dry_run:
        return target
    if copy and stat.S_ISREG(os.lstat(path).st_mode):
        atomic_write(target, read_state(path, "registry") or b"")
    else:
        os.rename(path, target)
    return target


def _repair(ctx, dry_run):
    store = ctx.store
    actions, left = [], []
    act = actions.append

    def aside(path, what):
        act("set %s aside as %s: it was %s" % (
            display_path(path), display_path(_set_aside(path, dry_run)), what))

    for path, what in store.odd_dirs():
        aside(path, what + ", not a directory")
    for path, what in odd_state_files(store):
        aside(path, what)
    loose = _loose_permissions(store) if os.path.isdir(store.dir) else []
    if loose:
        act("set state permissions to 0700 (dirs) / 0600 (files) in %s" % store.dir)
    for p, st, want in [] if dry_run else loose:
        # A file with another name (which may be anywhere) is not ours to change.
        if stat.S_ISDIR(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink == 1):
            os.chmod(p, want)
    cfg = _load_or_set_aside(store.load_config, store.config_path, "config",
                             "run `%s init` again" % PROG, dry_run, act, left)
    # In a dry run `reg` is the registry as it would be after this step.
    reg, bad = _repair_registry(ctx, cfg, dry_run, act, left)
    for name in sorted(reg["datasets"] if reg is not None else ()):
        path = store.dataset_log_dir(name)      # logs/NAME (slurm-*.out: files)
        with contextlib.suppress(FileNotFoundError):
            mode = os.lstat(path).st_mode
            if not stat.S_ISDIR(mode):
                aside(path, "%s, not a directory" % file_kind(mode))
    for c in _check_checkpoints(ctx, reg, bad):
        if c.fix == "checkpoint":
            name = c.name.split(":", 1)[1]
            act("set checkpoint %s aside as %s; the next refresh starts over" % (
                name, _set_aside(store.checkpoint_path(name), dry_run)))
        elif c.level == "fail" and c.fix is None:
            left.append(c.message)
    _repair_locks(store, dry_run, act, left)
    for path in stale_temps(store.dir) + stale_temps(store.checkpoint_dir):
        act("remove the temp file %s (an interrupted write's)" % path)
        if not dry_run:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    if cfg is not None and reg is not None:
        _repair_sentinels(ctx, reg, dry_run, act, left)
        _load_or_set_aside(lambda: load_schedule(store), store.schedule_path, "schedule record",
                           "run `%s install-cron` again to record the schedule" % PROG,
                           dry_run, act, left)
        _repair_schedule(ctx, cfg, reg, dry_run, act, left)
    return {"actions": actions, "left": left, "dry_run": bool(dry_run)}


def odd_state_files(store):
    """[(path, what is there)] for the state paths holding something other than a regular
    file of ours (a FIFO, a symlink, a directory, a device, another user's file), among those
    no loader reports itself: the registry backup, the schedule record, the job script,
    rescue checkpoints, locks and manifests. (The config, the registry and walk checkpoints
    are refused by their loaders, and doctor and repair deal with them there; another
    user's schedule record may be intact, and is left to `sudo chown` as they are.)"""
    paths = [(store.backup_path, "registry backup"), (store.schedule_path, "schedule"),
             (job_script_path(store), "job script")]
    paths += [(p, "rescue checkpoint") for p in
              _names_ending(os.path.join(store.checkpoint_dir, "rescue"), ".json")]
    paths += [(p, "lock") for p in _names_ending(store.lock_dir, ".lock")]
    top = os.path.join(store.dir, "manifests")
    for d in _names_ending(top, ""):
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.lstat(d).st_mode):
                paths += [(p, "purge record" if os.path.basename(p).startswith("purge-")
                           else "manifest") for p in _names_ending(d, ".skm")]
    found = []
    for p, kind in paths:
        what = odd_state_file(p, foreign=p != store.schedule_path, kind=kind)
        if what is not None:
            found.append((p, what))
    return found


def _names_ending(directory, suffix):
    """The paths of the entries of directory whose names end with suffix, sorted."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [os.path.join(directory, n) for n in sorted(names) if n.endswith(suffix)]


def _load_or_set_aside(load, path, what, then, dry_run, act, left):
    """What load() returns; when it refuses a damaged file, the file is set aside and `then`
    is left for the user (a file that may be intact is left as it is); None when refused."""
    try:
        return load()
    except InvalidState as e:
        act("set the damaged %s aside as %s" % (what, _set_aside(path, dry_run)))
        left.append("%s; %s" % (e, then))
    except StateError as e:
        left.append("%s (repair leaves the %s as it is)" % (e, what))
    return None


def _repair_locks(store, dry_run, act, left):
    for name, path, rec, dead, held in _stale_locks(store):
        if dead and not held:
            act("remove the stale lock of %r (pid %s on this host is gone)" % (name, rec["pid"]))
            if not dry_run:
                os.unlink(path)
        elif dead:
            left.append("lock %s names pid %s, which is gone; %s" % (path, rec.get("pid"),
                                                                    _HELD_LOCK))
        else:
            left.append("lock %s names pid %s on host %s: not provably dead, left alone" % (
                path, rec.get("pid"), rec.get("host")))


def _repair_sentinels(ctx, reg, dry_run, act, left):
    """Rewrite missing or misnamed sentinels, and ones that do not record the settings,
    through each root's fd (never into a directory reached through a symlink)."""
    for ds in sorted(reg["datasets"].values(), key=lambda d: d["name"]):
        if not root_present(ds["path"]):
            continue
        try:
            root_fd = dataset_root_fd(ctx, ds)
        except Failure as e:
            left.append("dataset %r: %s (no sentinel is written there)" % (ds["name"], e))
            continue
        try:
            found, why = sentinel_state(root_fd)
            if found is None and why != "missing":
                left.append("%s exists but is not ours (%s); move it away, then repair again"
                            % (sentinel_path(ds["path"]), why))
                continue
            if found is None:
                act("rewrite the missing sentinel of %r in %s" % (ds["name"], ds["path"]))
            elif found.get("name") != ds["name"]:
                act("rewrite the sentinel of %r in %s (it named %r)" % (
                    ds["name"], ds["path"], found.get("name")))
            elif any(found.get(k) != ds.get(k) for k in SENTINEL_SETTINGS):
                act("record the keep-until, cadence and approval of %r in its sentinel"
                    % ds["name"])
            else:
                continue
            if not dry_run:
                (create_sentinel if found is None else update_sentinel)(root_fd, ds)
        finally:
            os.close(root_fd)


def _repair_registry(ctx, cfg, dry_run, act, left):
    """(the registry, mended where it is damaged, or None when it is not to be touched; the
    invalid entries it then keeps, whose checkpoints repair keeps too).

    Unreadable (another owner's?) or newer: it may be intact, so it is only reported. A
    document that cannot be used at all: the last good backup, else a rebuild from the
    sentinels. Invalid entries: every valid one is kept as it is; each invalid one comes
    from the backup where that has it valid, else from its sentinel.
    """
    store = ctx.store
    try:
        reg, bad, lost, kept = _load_registry(ctx, cfg)
    except InvalidState:
        reg, bad, lost, kept = None, {}, 0, {}
    except StateError as e:
        left.append("%s (repair leaves the registry as it is: it may be intact)" % e)
        return None, {}
    if reg is not None and not (bad or lost or kept):
        return reg, {}
    if reg is not None and cfg is None and not lost:
        left.append("the registry has %d invalid dataset(s) and the config is unusable: run "
                    "`%s init`, then repair again" % (len(bad), PROG))
        return None, bad
    if kept:
        act("restore %s into the emptied registry from its backup %s (their sentinels "
            "are in place)" % (", ".join(repr(n) for n in sorted(kept)), store.backup_path))
        reg = dict(reg, datasets=kept)
    elif lost:      # deleted (or set aside above): its backup is the last good one
        reg = None
    else:
        act("set the damaged registry aside as %s" % _set_aside(store.registry_path, dry_run,
                                                                copy=reg is not None))
    backup, backup_bad = _registry_backup(store)
    if reg is None:
        restored, reg, bad = _restore_registry(ctx, cfg, backup, backup_bad, left)
        act(restored)
        backup = None
    datasets = dict(reg["datasets"])
    found = []
    for name in sorted(bad):
        entry = _mend_entry(ctx, cfg, name, bad[name][1], backup, found, act, left)
        if entry is not None:
            datasets[name] = entry
    reg = dict(reg, datasets=datasets, format=FORMAT)
    if not dry_run:
        atomic_write(store.registry_path, dump_json(reg))
    return reg, {}


def _registry_backup(store):
    """(the backup registry of valid entries, its invalid ones), or (None, {})."""
    try:
        return store.load_registry_parts(store.backup_path, "registry backup")
    except StateError:
        return None, {}


def _restore_registry(ctx, cfg, backup, backup_bad, left):
    """The last good backup, else a registry rebuilt from the sentinels under the scratch root.

    Returns (what was done, the registry, {name: (message, entry)} still to mend).
    """
    store = ctx.store
    if backup is not None and (backup["datasets"] or backup_bad):
        return ("restore the registry from its last good backup %s (%d datasets)" % (
            store.backup_path, len(backup["datasets"]) + len(backup_bad)), backup,
            backup_bad if cfg is not None else {})
    root = scratch_root_of(cfg, ctx.env) if cfg else None
    if not root or not os.path.isdir(root):
        left.append("no backup and no scratch root to search for sentinels: re-add your "
                    "datasets with `%s add`" % PROG)
        return "start an empty registry", {"format": FORMAT, "datasets": {}}, {}
    datasets = {}
    for path, doc in _find_sentinels(root):
        name = doc.get("name")
        if not _name(name) and name not in datasets:
            datasets[name] = _rebuilt_entry(ctx, cfg, name, path, doc, left)
    return ("rebuild the registry from %d sentinel(s) found under %s" % (len(datasets), root),
            {"format": FORMAT, "datasets": datasets}, {})


def _mend_entry(ctx, cfg, name, entry, backup, found, act, left):
    """An invalid entry's replacement: the backup's, else one rebuilt from its sentinel
    (found: the sentinels under the scratch root, searched once). None: none to be had."""
    old = (backup or {}).get("datasets", {}).get(name)
    if old is not None:
        act("restore dataset %r from the backup %s" % (name, ctx.store.backup_path))
        return old
    path = entry.get("path") if isinstance(entry, dict) else None
    # Only a sentinel below the scratch root counts: an entry may name any directory.
    doc = (read_sentinel(path) if isinstance(path, str) and not _abs_path(path)
           and _below_scratch_root(ctx, cfg, path) else None)
    if doc is None or doc.get("name") != name:
        root = scratch_root_of(cfg, ctx.env)
        if not found and root and os.path.isdir(root):
            found.extend(_find_sentinels(root))
        path, doc = next(((p, d) for p, d in found if d.get("name") == name), (None, None))
    if doc is None:
        left.append("dataset %r is invalid and no sentinel names it: it was dropped from the "
                    "registry (a copy is kept aside); re-add it with `%s add`" % (name, PROG))
        act("drop the invalid dataset %r" % name)
        return None
    act("rebuild the invalid dataset %r from its sentinel in %s" % (name, path))
    return _rebuilt_entry(ctx, cfg, name, path, doc, left)


def _below_scratch_root(ctx, cfg, path):
    """True when path lies strictly below the scratch root in force (or its real place)."""
    root = scratch_root_of(cfg, ctx.env) if cfg else None
    return bool(root) and isinstance(path, str) and (
        is_below(path, root) or is_below(path, os.path.realpath(root)))


def _rebuilt_entry(ctx, cfg, name, path, doc, left):
    """A registry entry from a sentinel. Settings an older sentinel does not record get
    today's defaults, and `left` says so."""
    prof = profile_of(cfg)
    guessed = []
    keep = doc.get("keep_until")
    if _date(keep):
        keep = (utc_date(ctx.now) + datetime.timedelta(days=14)).isoformat()
        guessed.append("keep-until (now %s)" % keep)
    cadence = doc.get("cadence_days")
    if _int(prof["min_cadence"], purge_days_of(cfg) - 5)(cadence):
        cadence = default_cadence(cfg)
        guessed.append("cadence (now %d days)" % cadence)
    approval = doc.get("approval")
    try:
        _check_approval(approval if isinstance(approval, str) else None)
        wrong = "approval" not in doc or not isinstance(approval, (str, type(None)))
    except UsageError:
        wrong = True
    if wrong:
        approval = None
        guessed.append("approval (now none)")
    if guessed:
        left.append("dataset %r was recovered from an older sentinel that does not record its %s"
                    "; set them with `%s extend --name %s`" % (name, ", ".join(guessed), PROG,
                                                              name))
    last = doc.get("last_refresh")
    rescue_to = doc.get("rescue_to")
    return {"name": name, "path": path, "keep_until": keep, "cadence_days": cadence,
            "approval": approval, "enabled": True,
            "rescue_to": None if _abs_path(rescue_to) else rescue_to,
            "added": doc.get("added") if not _time(doc.get("added")) else None,
            "last_refresh": last if not _time(last) else None, "last_refresh_start": None,
            "last_mode": None, "last_run": None, "last_total_entries": None,
            "recovered": iso(time.time())}


def _find_sentinels(root, max_depth=4):
    """(dataset root, sentinel doc) for sentinels up to max_depth levels below root.

    Bounded on purpose: a scratch root may hold millions of entries.
    """
    root = os.path.realpath(root)   # recorded paths are real, as `add` records them
    found = []
    stack = [(root, 0)]
    while stack:
        path, depth = stack.pop()
        doc = read_sentinel(path) if path != root else None
        if doc is not None:
            found.append((path, doc))
            continue    # datasets do not nest
        if depth >= max_depth:
            continue
        try:
            fd = open_dir_ex(path)[0]
            try:
                names, dirs = list_dir_typed(fd)
            finally:
                os.close(fd)
        except OSError:
            continue
        stack += [(os.path.join(path, os.fsdecode(names[i])), depth + 1) for i in reversed(dirs)]
    return sorted(found)


def _repair_schedule(ctx, cfg, reg, dry_run, act, left):
    try:
        checks = _check_schedule(ctx, cfg, reg)
    except Failure as e:
        left.append("schedule: %s" % e)
        return
    fixes = set(c.fix for c in checks if c.fix)
    if "duplicates" in fixes:
        jobs = ctx.slurm.pending(JOB_NAME)
        for job, _ in jobs[1:]:
            act("cancel duplicate pending job %s (keeping %s)" % (job, jobs[0][0]))
            if not dry_run:
                ctx.slurm.cancel(job)
    if "reinstall" in fixes:
        act("reinstall the schedule with %s %s" % (sys.executable, script_path()))
        if not dry_run:
            doc = load_schedule(ctx.store)
            _install_cron(ctx, CronRequest(doc.get("method"), reinstall=True))
    # What it cannot mend; a damaged record was set aside above, and its words are left.
    left.extend(c.message for c in checks
                if c.level == "fail" and (not c.fix or c.name == "schedule"))


# ---------------------------------------------------------------- public API


def init(profile=None, scratch_root=None, purge_days=None, state_dir=None, env=None):
    """Create or update the config. Returns {"config": ..., "changed": bool, "warnings": [...]}."""
    return _init(Context(state_dir, env), profile, scratch_root, purge_days)


def add_dataset(name, path, keep_until, cadence_days=None, approval=None, state_dir=None,
                env=None, manifest=True, rescue_to=None):
    """Register a dataset and write its sentinel. Returns the dataset's list entry.

    manifest=False: its walks write no manifest (no `files`, `rescue` or vanished counts).
    rescue_to: a directory every scheduled walk then rescues to (see rescue())."""
    return _add(Context(state_dir, env), name, path, keep_until, cadence_days, approval, rescue_to,
                manifest=manifest)


def list_datasets(state_dir=None, env=None):
    """The registered datasets as the list of dicts `list --json` prints."""
    return _list(Context(state_dir, env))


def status(name=None, state_dir=None, env=None):
    """One dataset's status dict (name given) or a list of them, as `status --json` prints."""
    return _status(Context(state_dir, env), name)


def brief(state_dir=None, env=None):
    """What needs attention, as `status --brief --json` prints it: a list of {"name" (None
    for the schedule), "kind", "message", "command", "attention"}; empty when nothing does."""
    return _brief(Context(state_dir, env))


def extend(name, keep_until=None, approval=None, cadence_days=None, state_dir=None, env=None,
           rescue_to=None, manifest=None):
    """Move a keep-until date, record a site approval, change the cadence, set (or with
    "none" clear) the directory scheduled walks rescue to, turn manifests on or off
    (manifest True/False). Returns the entry."""
    return _extend(Context(state_dir, env), name, keep_until, approval, cadence_days, rescue_to,
                   manifest=manifest)


def set_enabled(name, enabled, state_dir=None, env=None):
    """Enable or disable one dataset. Returns the list entry."""
    return _set_enabled(Context(state_dir, env), name, enabled)


def remove_dataset(name, state_dir=None, env=None):
    """Unregister a dataset, delete its sentinel and checkpoint. Its data is never touched."""
    return _remove(Context(state_dir, env), name)


def files(name, kind=None, older_than=None, state_dir=None, env=None):
    """The entries of dataset name's last complete walk, as an iterator of dicts (path,
    kind, size, atime ISO, touched; path_b64 for a path that is not UTF-8; for
    kind="vanished", reason). kind: None (every entry), "at-risk", "purge-eligible" or
    "vanished"; older_than: days. Errors (unknown dataset, no manifest) are raised here,
    before the first entry; the manifest is read as the iterator is."""
    listing = _files(Context(state_dir, env), name, kind, older_than)
    return (file_doc(*item) for item in listing.items())


def refresh(name=None, due=False, check=False, dry_run=False, max_seconds=None,
            max_entries=None, threads=None, state_dir=None, env=None, should_stop=None,
            progress=None, workers=None, no_manifest=False, fail_on_risk=False):
    """Refresh (or check) datasets. Returns {"results": [...], "exit_code": N, "notes": [...]}.

    should_stop() may return "term", "hup" or "int" to stop the walk at the next
    entry, with the checkpoint saved. No printing, no signal handlers. fail_on_risk:
    exit_code is risk_exit_code()'s, and "risk" lists (name, what was found) for the
    datasets whose walk made it 1.
    """
    opts = RefreshOptions(name, due, check, dry_run, max_seconds, max_entries, threads,
                          workers=workers, no_manifest=no_manifest,
                          fail_on_risk=fail_on_risk)
    return _refresh(Context(state_dir, env), opts, should_stop=should_stop, progress=progress)


def rescue(name, to, all=False, dry_run=False, max_seconds=None, max_entries=None,
           state_dir=None, env=None, should_stop=None, progress=None,
           checkpoint_every=CHECKPOINT_SECONDS, threads=None, workers=None):
    """Copy the entries of dataset name's last complete walk that were at risk (all=True:
    every entry) to directory `to`, resumably. Returns the result (see README, "JSON
    output"), its exit_code included; raises UsageError (nothing copied) for a destination
    it refuses. should_stop() as for refresh(); progress(name, entries_done,
    entries_total, bytes_copied, bytes_total, seconds) is called now and then; threads,
    workers: copies in flight on threads, processes sharing the copies (as refresh's;
    default: parallelism())."""
    opts = RescueOptions(name, to, all, dry_run, max_seconds, max_entries, checkpoint_every,
                         threads=threads, workers=workers)
    return _rescue(Context(state_dir, env), opts, Budget(max_seconds, max_entries),
                   should_stop, progress)


def install_cron(method="auto", account=None, partition=None, cpus=None, mem=None,
                 time_limit=None, cadence_days=None, dry_run=False, reinstall=False,
                 state_dir=None, env=None, runner=None, mail_user=None):
    """Install (or with dry_run, render) the Slurm schedule. Returns a dict describing it.

    mail_user: Slurm mails that address when a scheduled job fails, and the job runs
    `refresh --due --fail-on-risk` (risk found is such a failure)."""
    return _install_cron(Context(state_dir, env, runner=runner),
                         CronRequest(method, account, partition, cpus, mem, time_limit,
                                     cadence_days, dry_run, reinstall, mail_user))


def uninstall_cron(state_dir=None, env=None, runner=None):
    """Remove the schedule: job script, scrontab block, pending jobs. Returns what was removed."""
    return _uninstall_cron(Context(state_dir, env, runner=runner))


def doctor(state_dir=None, env=None, runner=None):
    """Check everything; returns {"ok": bool, "checks": [{"name", "ok", "level", "message"}]}."""
    return _doctor(Context(state_dir, env, runner=runner))


def repair(dry_run=False, state_dir=None, env=None, runner=None):
    """Mend what doctor finds, where mending is safe. Returns {"actions": [...], "left": [...]}.

    Never deletes or modifies user data and never touches a timestamp in a dataset:
    damaged state is set aside (renamed), not deleted.
    """
    return _repair(Context(state_dir, env, runner=runner), dry_run)


# ---------------------------------------------------------------- CLI: output


def invoked_as():
    """How the user ran this file, for the hints: `python3 PATH`, `python3 -m MODULE`, or PROG.

    PROG where this module is not __main__ (the pip console script, the launchers that
    tools/install.sh and the README write, which import it, or main() called by another
    program) and for DIR/share/scratch-keepalive/scratch_keepalive.py run as a script (the
    scheduled job's LOADER, and launchers written by older versions of install.sh).
    """
    if __name__ != "__main__":
        return PROG
    spec = globals().get("__spec__")
    if spec is not None and spec.name and not globals().get("_SCRATCH_KEEPALIVE_RECOMPILED"):
        return "python3 -m " + spec.name
    path = sys.argv[0] if sys.argv and sys.argv[0] else "scratch_keepalive.py"
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.basename(parent) == PROG and os.path.basename(os.path.dirname(parent)) == "share":
        return PROG
    return "python3 " + shell_quote(path)


def rewrite_hints(text, form):
    """Every `scratch-keepalive ARGS` hint in text, as the user runs the tool: `form ARGS`.

    Messages keep saying PROG; this one rewrite (applied by main() to stdout and stderr)
    adapts every hint, whichever part of the code wrote it.
    """
    if form == PROG:
        return text
    text = text.replace("`%s " % PROG, "`%s " % form)
    if "'" not in form:     # also inside "..." (sbatch --wrap "scratch-keepalive refresh")
        text = text.replace('"%s ' % PROG, '"%s ' % form)
    return text


class OutputError(Failure):
    """The output cannot be written (a closed descriptor, a full device): exit 1."""


class OutputStream(object):
    """stdout or stderr as main() hands it to the commands: a failed write or flush (other
    than a closed pipe, which main() ends quietly) raises OutputError, never an OSError or
    an AttributeError (`>&-` leaves sys.stdout None). quiet (stderr): such a failure is
    dropped instead, since there is nowhere left to say anything. Its hints show the form
    the user ran, `form` (see rewrite_hints); write_raw() writes text that must stay exact:
    JSON and job scripts.
    """

    def __init__(self, stream, what, quiet=False, parent=None):
        self.stream, self.what, self.quiet, self.parent = stream, what, quiet, parent
        self.failed = None      # the OSError that ended this stream, if one did
        self.form = PROG

    def _call(self, name, *args):
        if self.failed is not None and self.quiet:
            return None
        try:
            if self.stream is None:
                raise OSError(errno.EBADF, "the descriptor is closed")
            return getattr(self.stream, name)(*args)
        except BrokenPipeError as e:
            if not self.quiet:
                raise
            self.failed = e
        except (OSError, ValueError) as e:      # EBADF, ENOSPC, EIO, a closed file...
            error = self.fail(e)
            if not self.quiet:
                raise error from None
        return None

    def fail(self, e):
        """Record that writing failed with e; the OutputError to report."""
        self.failed = e if isinstance(e, OSError) else OSError(errno.EBADF, str(e))
        if self.parent is not None:     # the text stream over this buffer failed with it
            self.parent.failed = self.failed
        return OutputError("cannot write to %s (%s); the output is lost: check where it goes "
                           "(a closed descriptor, a full disk)" % (
                               self.what, getattr(e, "strerror", None) or e))

    def write(self, text):
        return self._call("write", rewrite_hints(text, self.form))

    def write_raw(self, text):
        return self._call("write", text)

    def flush(self):
        return self._call("flush")

    @property
    def buffer(self):
        inner = getattr(self.stream, "buffer", None)
        return None if inner is None else OutputStream(inner, self.what, self.quiet, self)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def to_devnull(stream):
    """Point stream's descriptor at /dev/null once its output failed or its reader went away,
    so that the interpreter's last flush of what is still buffered cannot print "Exception
    ignored ..." at exit."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def emit_json(ctx, obj):
    ctx.out.write_raw(json.dumps(obj, sort_keys=True, indent=2) + "\n")


def say(ctx, text=""):
    write_safely(ctx.out, text + "\n")


def note(ctx, text, to_err=False):
    write_safely(ctx.err if to_err else ctx.out, "note: %s\n" % text)


def write_safely(stream, text):
    """Write text; what the stream cannot encode is written escaped instead of failing.

    A path that is not valid UTF-8 is held decoded with surrogateescape: on a strict UTF-8
    stdout (PYTHONIOENCODING=utf-8:strict) printing it raised UnicodeEncodeError after the
    command had done its work. Paths should go through display_path(); this is the net.
    """
    try:
        stream.write(text)
    except UnicodeEncodeError:
        enc = getattr(stream, "encoding", None) or "ascii"
        stream.write(text.encode(enc, "backslashreplace").decode(enc, "replace"))


def table(rows, headers):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()
                     for row in [headers] + rows)


def describe_result(r):
    """One line that tells a person what a refresh did to one dataset."""
    name = r["name"]
    if r.get("reason"):
        return "%s: not refreshed: %s" % (name, r["reason"])
    dry = "(dry run) " if r.get("dry_run") else ""
    # WARNING: a stopped run's counts cover only the entries it reached; say so, or
    # "touched 9 of 9 entries" reads as a complete walk.
    upto = "" if r["complete"] else " before it stopped"
    if r["mode"] == "touch":
        verb = "would touch" if r.get("dry_run") else "touched"
        body = "%s%s %s of %s%s (%s accessed recently, skipped)" % (
            dry, verb, human_count(r["entries_touched"]),
            plural(r["entries_seen"], "entry", "entries"), upto,
            human_count(r["entries_skipped"]))
    else:
        body = "%schecked %s%s: %s at risk (%s), %s purge-eligible (%s)" % (
            dry, plural(r["entries_seen"], "entry", "entries"), upto,
            human_count(r["entries_at_risk"]), human_bytes(r["bytes_at_risk"]),
            human_count(r["entries_purge_eligible"]), human_bytes(r["bytes_purge_eligible"]))
    if r.get("entries_not_owned"):
        body += ("; %s of other users not refreshed (only an entry's owner can set its "
                 "access time), %s of them at risk" % (
                     plural(r["entries_not_owned"], "entry", "entries"),
                     human_count(r.get("entries_at_risk_not_owned", 0))))
    if r.get("dirs_listed_not_owned") and r["mode"] == "check":
        body += ("; %s of other users had to be listed, which may have moved their access "
                 "times" % plural(r["dirs_listed_not_owned"], "directory", "directories"))
    if r.get("entries_vanished"):
        body += "; %s vanished since the walk before (%s), %s of them likely purged (%s): " \
                "`%s files --name %s --vanished` lists them" % (
                    plural(r["entries_vanished"], "entry", "entries"),
                    human_bytes(r.get("bytes_vanished", 0)),
                    human_count(r.get("entries_likely_purged", 0)),
                    human_bytes(r.get("bytes_likely_purged", 0)), PROG, name)
    if r.get("manifest_note") and r["manifest_note"] not in UNKNOWN_VANISHED.values():
        body += "; " + r["manifest_note"]
    if r["errors"]:
        body += "; %s (vanished or permission denied%s)" % (
            plural(r["errors"], "error"), ", listed in " + r["log"] if r.get("log") else "")
    state = run_state(r, "refresh", with_done=True)
    return "%s: %s; %s" % (name, body, state)


class Progress(object):
    """A one-line progress display on a terminal's stderr; silent otherwise."""

    def __init__(self, stream):
        self.stream = stream
        try:
            self.active = stream.isatty()
        except (AttributeError, ValueError):
            self.active = False
        self.shown = False

    def __call__(self, name, done, this_run, seconds, total):
        """A walk's progress (refresh's progress callback)."""
        rate = this_run / seconds if seconds > 0 else 0
        share = " %d%%" % min(99, 100 * done // total) if total else ""
        self.show("%s: %s entries, %s/s%s" % (name, human_count(done), human_count(int(rate)),
                                              share))

    def copied(self, name, done, total, copied, bytes_total, seconds):
        """A rescue's progress (rescue's progress callback)."""
        self.show("%s: rescued %s of %s entries, %s of %s" % (
            name, human_count(done), human_count(total), human_bytes(copied),
            human_bytes(bytes_total)))

    def show(self, text):
        if self.active:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
            self.shown = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        """Clear the line shown, if one is."""
        if self.shown:
            self.show("")
            self.shown = False


# ---------------------------------------------------------------- CLI: command handlers

NO_DATASETS = ("No datasets registered. Add one: `scratch-keepalive add --name NAME --path DIR "
               "--keep-until YYYY-MM-DD`")


def show(ctx, args, data, lines, code=EXIT_OK, notes=()):
    """A command's output: data as JSON with --json, else each line of lines(ctx, data);
    then its notes, on stderr with --json (stdout holds the JSON alone). Returns code."""
    if args.json:
        emit_json(ctx, data)
    else:
        for line in lines(ctx, data):
            say(ctx, line)
    for text in notes:
        note(ctx, text, to_err=args.json)
    return code


def cmd_init(args, ctx):
    r = _init(ctx, args.profile, args.scratch_root, args.purge_days)
    cfg = r["config"]
    prof = PROFILES[cfg["profile"]]
    say(ctx, "%s: profile %s, scratch root %s, state in %s" % (
        "Initialised" if r["changed"] else "Already initialised, nothing changed",
        cfg["profile"], cfg["scratch_root"], r["state_dir"]))
    say(ctx, "  purge rule: files not accessed for %d days are deleted" % cfg["purge_days"])
    say(ctx, "  refreshing access times: %s" % (
        "allowed (touch mode)" if prof["touch_allowed"]
        else "only for datasets with a site approval; others are checked"))
    for w in r["warnings"]:
        ctx.err.write("%s: warning: %s\n" % (PROG, w))
    if not prof["touch_allowed"]:
        note(ctx, POLICY_BR200)
    return EXIT_OK


def cmd_add(args, ctx):
    entry = _add(ctx, args.name, args.path, args.keep_until, args.cadence_days, args.approval,
                 args.rescue_to, manifest=not args.no_manifest)
    if args.json:
        emit_json(ctx, entry)
        return EXIT_OK
    name = entry["name"]
    say(ctx, "Added %r: %s, kept until %s, refreshed every %d days, %s mode" % (
        name, display_path(entry["path"]), entry["keep_until"], entry["cadence_days"],
        entry["mode"]))
    if entry["mode"] == "check":
        note(ctx, no_approval_words(name))
    try:
        scheduled = load_schedule(ctx.store) is not None
    except StateError:      # unreadable: doctor says so
        scheduled = False
    if scheduled:
        say(ctx, "Next: `%s refresh --name %s` now; the installed schedule walks it from its "
                 "next run on." % (PROG, name))
        return EXIT_OK
    account = account_hint(ctx.store)
    say(ctx, "Next: `%s refresh --name %s` now, and `%s install-cron%s` to schedule it%s." % (
        PROG, name, PROG, account, " (ACCOUNT: your Slurm account; `sacctmgr show assoc "
                                   "user=$USER format=account` lists yours)" if account else ""))
    return EXIT_OK


def account_hint(store):
    """The ` --account ACCOUNT` an install-cron hint needs where the profile's job needs an
    account (br200), else an empty string (also when the configuration cannot be read)."""
    try:
        cfg = store.load_config()
    except StateError:
        return ""
    known = isinstance(cfg, dict) and cfg.get("profile") in PROFILES
    return " --account ACCOUNT" if known and profile_of(cfg)["account_required"] else ""


def cmd_list(args, ctx):
    return show(ctx, args, _list(ctx), _list_lines)


def _list_lines(ctx, entries):
    if not entries:
        yield NO_DATASETS
        return
    rows = [[e["name"], "attention" if e["attention"] and e["state"] == "ok" else e["state"],
             ",".join(e["attention"]) or "-", e["risk"] or "-",
             e["mode"], e["keep_until"], e["last_refresh"] or "never", display_path(e["path"])]
            for e in entries]
    yield table(rows, ["NAME", "STATE", "ATTENTION", "RISK", "MODE", "KEEP-UNTIL",
                       "LAST-REFRESH", "PATH"])
    need = [e["name"] for e in entries if e["attention"]]
    if need:
        yield "%s: `%s status --name %s` says what to do" % (
            "needs attention" if len(need) == 1 else "%d need attention" % len(need), PROG,
            need[0] if len(need) == 1 else "NAME")


def state_text(e):
    """A dataset's state for people: never `ok` while its attention is not empty."""
    if not e["attention"]:
        return e["state"]
    return "needs attention: %s%s" % (", ".join(e["attention"]), "" if e["state"] == "ok"
                                      else " (%s)" % e["state"])


def cmd_status(args, ctx):
    if not args.brief:
        return show(ctx, args, _status(ctx, args.name, with_schedule=args.json), _status_text)
    if args.name is not None:
        raise UsageError("status --brief covers every dataset and the schedule, so it takes no "
                         "--name; `%s status --name %s` shows that one in full"
                         % (PROG, args.name))
    # Nothing when nothing needs attention, else one line per alert, its command last.
    return show(ctx, args, _brief(ctx), lambda ctx, alerts: (
        "%s: %s: %s; run `%s`" % (PROG, a["name"] or "schedule", a["message"], a["command"])
        for a in alerts))


def _status_text(ctx, data):
    """One dataset (data a dict: --name) or every one, then the schedule."""
    entries = [data] if isinstance(data, dict) else data
    if not entries:
        yield NO_DATASETS
    datasets = ctx.store.load_registry()["datasets"] if entries else {}
    for i, e in enumerate(entries):
        if i:
            yield ""
        ds = datasets.get(e["name"])
        words = [attention_words(ds, c, ctx.now) for c in e["attention"]] if ds else []
        yield from _status_lines(e, words)
    if isinstance(data, list):
        yield from _schedule_lines(ctx)


def _status_lines(e, ds_words):
    yield "%s: %s (%s mode)" % (e["name"], state_text(e), e["mode"])
    for what, command in ds_words:
        yield "  attention:     %s; run `%s`" % (what, command)
    yield "  path:          %s" % display_path(e["path"])
    yield "  keep until:    %s%s" % (e["keep_until"], "" if e["enabled"] else "  (disabled)")
    yield "  cadence:       every %d days; next due %s" % (
        e["cadence_days"], e["next_due"] or "now")
    t = e["thresholds_days"]
    yield "  approval:      %s" % (e["approval"] or "none")
    if e.get("rescue_to"):
        yield "  rescue to:     %s (after each scheduled walk)" % display_path(e["rescue_to"])
    yield ("  thresholds:    touch if not accessed for %d days; at risk after %d; purge after "
           "%d" % (t["skip"], t["at_risk"], t["purge"]))
    yield "  last refresh:  %s" % ("%s (%s mode)" % (e["last_refresh"], e["last_mode"])
                                   if e["last_refresh"] else "never")
    if e["risk"]:
        theirs = e["remaining"]["others_at_risk"]
        yield "  risk:          %s (still at risk after the last complete walk)%s" % (
            e["risk"], "; %s of other owners (not yours to refresh or copy)"
            % plural(theirs, "entry", "entries") if theirs and e["risk"] != "none" else "")
    run = e.get("last_run")
    if run:
        yield "  last run:      %s; %s" % (run.get("finished"),
                                           describe_result(run).split(": ", 1)[1])
        if run.get("log"):
            yield "  last log:      %s" % run["log"]
    p = e.get("last_purge")
    if p:
        yield "  last purge:    found %s: %s; `%s files --name %s --vanished` lists them%s" % (
            p["found"], purge_words(p), PROG, e["name"],
            " (listed %s)" % p["seen"] if p.get("seen") else "")
    m = e.get("manifest")
    if m:
        yield ("  manifest:      %s of the %s walk of %s, %s on disk (`%s files --name %s` "
               "lists them)" % (plural(m["entries"] or 0, "entry", "entries"), m["mode"],
                                m["walk_started"], human_bytes(m["bytes"]), PROG, e["name"]))
    ck = e["checkpoint"]
    yield "  checkpoint:    %s" % ("none" if not ck else "%s entries done (%s mode, saved %s)" % (
        human_count(ck["entries_done"]), ck["mode"], ck["updated"]))
    yield "  sentinel:      %s" % ("present" if e["sentinel"] else "MISSING (run `%s repair`)"
                                   % PROG)


def _schedule_lines(ctx):
    info = schedule_status(ctx)
    yield ""
    if info is None:
        yield "schedule: none installed (`%s install-cron%s`)" % (PROG, account_hint(ctx.store))
        return
    yield "schedule: %s, every %s days (installed %s)" % (
        info["method"], info["cadence_days"], info["installed"])
    if info.get("error"):
        yield "  next run:      unknown (%s)" % info["error"]
    elif info["method"] == "sbatch" or info["next_run"]:
        yield "  next run:      %s" % (
            "%s (job %s)" % (info["next_run"], info["pending_jobs"][0]) if info["pending_jobs"]
            else "NONE PENDING: the chain is broken; run `%s doctor`" % PROG)
    if info.get("mail_user"):
        yield ("  mail:          to %s when a run fails (the job runs refresh --fail-on-risk: "
               "risk found is a failure)" % info["mail_user"])
    run = info.get("last_run")
    yield "  last run:      %s" % ("never" if not run else "job %s finished %s, exit %s%s" % (
        run.get("job_id"), run.get("finished"), run.get("exit_code"),
        "; " + run["continuation"] if run.get("continuation") else ""))


@contextmanager
def stop_signals():
    """SIGTERM, SIGHUP and SIGINT ask the walk to stop and checkpoint; handlers restored on exit.

    SIGHUP is a closed terminal or a dropped SSH session: the walk stops as for SIGTERM
    (exit 3, progress checkpointed, lock released) instead of dying with its progress lost.
    Forked worker processes inherit the handler, so a hangup sent to the whole process
    group does not kill them under the main process. The flag is memory they share: a
    signal to the main process alone stops a copy running in a worker too.
    """
    flag = mmap.mmap(-1, 1)
    reasons = (None, STOP_INT, STOP_TERM, STOP_HUP)
    codes = {signal.SIGINT: 1, signal.SIGTERM: 2, signal.SIGHUP: 3}

    def handler(signum, frame):
        flag[0] = codes.get(signum, 2)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in codes:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield lambda: reasons[flag[0]]
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def cmd_refresh(args, ctx):
    opts = RefreshOptions(args.name, args.due, args.check, args.dry_run, args.max_seconds,
                          args.max_entries, args.threads, args.checkpoint_every, args.workers,
                          no_manifest=args.no_manifest, fail_on_risk=args.fail_on_risk,
                          scheduled=args.scheduled)
    doc = None
    if args.scheduled:
        doc, said = _scheduled_before(ctx, args.scheduled)
        if said:
            note(ctx, said, to_err=True)
    with stop_signals() as should_stop, Progress(ctx.err) as progress:
        out = _refresh(ctx, opts, should_stop=should_stop, progress=progress)
    code = out["exit_code"]
    if args.scheduled:
        before = combine_exit_codes(out["codes"]) if args.fail_on_risk else code
        said, code = _scheduled_after(ctx, args.scheduled, doc, before, out["results"],
                                      out.get("risk"), out.get("codes"))
        if said:
            out["notes"].append(said)
    return show(ctx, args, {"results": out["results"], "notes": out["notes"]}, _refreshed_lines,
                code, out["notes"])


def _refreshed_lines(ctx, out):
    for r in out["results"]:
        yield describe_result(r)
        if r.get("rescue"):
            yield "  rescue: " + describe_rescue(r["rescue"])


def cmd_extend(args, ctx):
    e = _extend(ctx, args.name, args.keep_until, args.approval, args.cadence_days,
                args.rescue_to, manifest=args.manifest)
    say(ctx, "%s: kept until %s; every %d days; approval: %s; %s mode%s" % (
        e["name"], e["keep_until"], e["cadence_days"], e["approval"] or "none", e["mode"],
        "" if e["keep_manifests"] else "; no manifests"))
    return EXIT_OK


def cmd_enable(args, ctx):
    """`enable` and `disable` (args.command)."""
    e = _set_enabled(ctx, args.name, args.command == "enable")
    if e["enabled"]:
        say(ctx, "%s: enabled (%s)" % (e["name"], state_text(e)))
    else:
        say(ctx, "%s: disabled; it is not refreshed until `%s enable --name %s`"
            % (e["name"], PROG, e["name"]))
    return EXIT_OK


def cmd_rescue(args, ctx):
    opts = RescueOptions(args.name, args.to, args.all, args.dry_run, args.max_seconds,
                         args.max_entries, args.checkpoint_every, threads=args.threads,
                         workers=args.workers)
    with stop_signals() as should_stop, Progress(ctx.err) as progress:
        r = _rescue(ctx, opts, Budget(args.max_seconds, args.max_entries), should_stop,
                    progress.copied)
    return show(ctx, args, r, lambda ctx, r: [describe_rescue(r)], r["exit_code"], r["notes"])


def cmd_remove(args, ctx):
    r = _remove(ctx, args.name)
    say(ctx, "%s: removed from the registry%s; no data under %s was touched" % (
        r["name"], " and its sentinel deleted" if r["sentinel_deleted"] else "",
        display_path(r["path"])))
    return EXIT_OK


def _age_words(seconds):
    """'3 days ago', '5 hours ago', '1 minute ago', 'less than a minute ago'."""
    seconds = max(0, int(seconds))
    for unit, size in (("day", DAY), ("hour", 3600), ("minute", 60)):
        if seconds >= 2 * size or (unit == "minute" and seconds >= size):
            return plural(seconds // size, unit) + " ago"
    return "less than a minute ago"


def files_header(listing, now):
    """The one line on stderr that says which walk a list comes from and how old it is."""
    def walk(h):
        return "the %s walk started %s" % (h.get("mode", "?"), h.get("walk_started", "?"))
    h = listing.header
    try:
        age = _age_words(now - float(h["now"]))
    except (KeyError, TypeError, ValueError):
        age = "age unknown"
    what = {None: "entries", "at-risk": "entries at risk", "purge-eligible":
            "purge-eligible entries", "vanished": "entries that vanished"}[listing.kind]
    if listing.older_than is not None:
        what += " not accessed for %g days" % listing.older_than
    if listing.record is not None:
        r = listing.record
        return "%s: %s: %s between the walks started %s and %s (the purge found %s, %s)%s" % (
            PROG, listing.name, what, r.get("previous_walk_started") or "?",
            r.get("walk_started") or "?", r["found"], age, "; copies looked for in " +
            display_path(listing.dest) if listing.dest else "")
    if listing.kind == "vanished":
        return "%s: %s: %s between %s and %s (%s)" % (
            PROG, listing.name, what, walk(listing.manifests[1].header), walk(h), age)
    return "%s: %s: %s as of %s (%s; %s in that walk)" % (
        PROG, listing.name, what, walk(h), age,
        plural(int(listing.trailer.get("entries", 0)), "entry", "entries"))


def _files_formatter(args):
    """The function that turns one item of a FileList into its output bytes."""
    def nul(key, kind, size, atime, reason, copy):
        return key_path(key) + b"\0"

    def jsonl(*item):
        return (json.dumps(file_doc(*item), sort_keys=True, ensure_ascii=False)
                + "\n").encode("utf-8")

    def text(key, kind, size, atime, reason, copy):
        # WARNING: the reason goes after a tab: quote_path never leaves a raw tab in a path.
        tail = "\n" if reason is None else "\t%s\n" % reason
        if copy is not NO_COPY:
            tail = "\t%s\t%s\n" % (reason, "copy: " + quote_path(copy) if copy else "no copy")
        return (quote_path(key_path(key)) + tail).encode("utf-8")
    return nul if args.null else jsonl if args.json else text


def cmd_files(args, ctx):
    listing = _files(ctx, args.name, args.kind, args.older_than)
    items = listing.items()
    try:
        ctx.out.flush()
        # Bytes, whatever the locale: -0 must pass names exactly, and text is UTF-8.
        buf = getattr(ctx.out, "buffer", None)
        if buf is not None:
            write = buf.write
        else:       # a text stream without bytes underneath (main() called in-process)
            def write(data):
                ctx.out.write_raw(data.decode("utf-8", "surrogateescape"))
        line = _files_formatter(args)
        header = [files_header(listing, ctx.now) + "\n"]

        def put(batch):
            write(b"".join(batch))
            if header:      # once stdout took the first lines: an output that fails at
                ctx.out.flush()     # once (closed, full) says one line, its error
                write_safely(ctx.err, header.pop())
        while True:     # the last batch, short or empty, says the header if none did
            batch = [line(*item) for item in itertools.islice(items, FILES_BATCH)]
            put(batch)
            if len(batch) < FILES_BATCH:
                break
        ctx.out.flush()
    finally:
        items.close()
        listing.close()
    if listing.record is not None and not listing.record.get("seen") and \
            listing.older_than is None:         # all of it listed, not a part
        mark_purge_seen(ctx.store, listing.name, listing.record["file"])
    return EXIT_OK


def cmd_install_cron(args, ctx):
    info = _install_cron(ctx, CronRequest(args.method, args.account, args.partition, args.cpus,
                                          args.mem, args.time, args.cadence_days, args.dry_run,
                                          args.reinstall, args.mail_user))
    for w in info["warnings"]:
        ctx.err.write("%s: warning: %s\n" % (PROG, w))
    return show(ctx, args, info, _installed_lines)


def _installed_lines(ctx, info):
    sched = info["schedule"]
    if info["dry_run"]:
        yield "Would install (%s):" % ("a block in your scrontab" if sched["method"] ==
                                       "scrontab" else "this job script, %s, and submit it"
                                       % sched["job_script"])
        ctx.out.write_raw(info["text"])     # exactly what would be installed
        return
    if sched["method"] == "scrontab":
        yield ("Installed a scrontab block (see `scrontab -l`): refresh --due every %d days."
               % sched["cadence_days"])
    else:
        yield ("Submitted job %s (%s), which resubmits itself every %d days while %s exists."
               % (info["job_id"], JOB_NAME, sched["cadence_days"], sched["job_script"]))
    yield "Request: partition %s, account %s, %d CPU, %s, %s. Logs: %s" % (
        sched["partition"] or "(default)", sched["account"] or "(default)", sched["cpus"],
        sched["mem"], sched["time"], ctx.store.log_dir)
    if sched.get("mail_user"):
        yield ("Slurm mails %s when a run fails; the job runs refresh --fail-on-risk, so "
               "entries at risk of the purge count as a failure." % sched["mail_user"])


def cmd_uninstall_cron(args, ctx):
    removed = _uninstall_cron(ctx)["removed"]
    say(ctx, "Removed: " + "; ".join(removed) if removed else "Nothing was installed.")
    return EXIT_OK


def cmd_doctor(args, ctx):
    report = _doctor(ctx)
    return show(ctx, args, report, _doctor_lines, EXIT_OK if report["ok"] else EXIT_FAIL)


def _doctor_lines(ctx, report):
    marks = {"ok": "ok  ", "info": "info", "warn": "WARN", "fail": "FAIL"}
    for c in report["checks"]:
        yield "%s %-22s %s" % (marks[c["level"]], c["name"], c["message"])
    fails = sum(1 for c in report["checks"] if not c["ok"])
    data = sorted(set(c["name"].split(":", 1)[1] for c in report["checks"]
                      if c["level"] == "info" and c["name"].split(":")[0] in ATTENTION_CODES))
    if not report["ok"]:
        yield "%s; `%s repair --dry-run` shows what can be mended" % (
            plural(fails, "problem"), PROG)
    elif data:
        yield "the tool can do its job; %s need%s you (the info lines above)" % (
            ", ".join(data), "s" if len(data) == 1 else "")
    else:
        yield "healthy"


def cmd_repair(args, ctx):
    return show(ctx, args, _repair(ctx, args.dry_run), _repair_lines)


def _repair_lines(ctx, out):
    verb = "would " if out["dry_run"] else ""
    for a in out["actions"]:
        yield "%s%s" % (verb, a)
    for text in out["left"]:
        yield "left for you: %s" % text
    if not out["actions"]:
        yield "nothing to repair"


# ---------------------------------------------------------------- CLI: parser

EXAMPLES = """\
examples:
  # try it on any Linux machine (generic profile, a directory of your choosing)
  scratch-keepalive init --profile generic --scratch-root /tmp
  scratch-keepalive add --name demo --path /tmp/demo --keep-until 2027-06-30
  scratch-keepalive refresh --name demo

  # on Big Red 200
  scratch-keepalive init
  scratch-keepalive add --name genomes --path /N/scratch/$USER/genomes --keep-until 2027-03-31
  scratch-keepalive refresh --name genomes        # check mode: reports what is at risk
  scratch-keepalive rescue --name genomes --to /N/project/mylab/genomes   # copy it off scratch
  scratch-keepalive install-cron --account r00000
  scratch-keepalive status --brief   # in ~/.bashrc: only what needs attention, at login

exit codes:
  0 done, 1 failed or entry errors or doctor found a problem, 2 usage or invalid input
  (nothing changed), 3 stopped early (progress checkpointed), 4 busy (locked by another
  process), 130 interrupted (progress checkpointed), 141 the output pipe was closed
  (`list | head -1`: the command ends quietly, as git does)

state: $SCRATCH_KEEPALIVE_HOME, else $XDG_STATE_HOME/scratch-keepalive, else
  ~/.local/state/scratch-keepalive (or --state-dir DIR). SCRATCH_KEEPALIVE_SCRATCH_ROOT
  overrides the scratch root; SCRATCH_KEEPALIVE_NOW (ISO-8601) replaces the clock for
  policy decisions (previews, tests).
"""


def _Parser(**kwargs):
    """An argparse parser that raises instead of exiting, so main() returns the exit code.
    (A class made when first needed: argparse is imported only when a command is parsed.)"""

    class _Parser(argparse.ArgumentParser):

        def error(self, message):
            raise UsageError("%s; see `%s --help`" % (message, self.prog))

        def exit(self, status=0, message=None):
            if message:
                sys.stderr.write(message)
            raise _ParserExit(status)

        def _print_message(self, message, file=None):
            """As argparse's, but a failed write is main()'s to report (argparse 3.9+ drops
            it). Only help and version text come here, for stdout: with none (`>&-`), no
            fallback to stderr."""
            if message:
                if file is None:
                    raise OSError(errno.EBADF, "the descriptor is closed")
                file.write(message)

    return _Parser(**kwargs)


def _int_range(lo, hi=None):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a whole number" % text)
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(
                "%d is out of range (%d to %s)" % (value, lo, hi if hi is not None else "any"))
        return value
    return parse


def _positive_seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number of seconds" % text)
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError("%r must be a positive number of seconds" % text)
    return value


def _days(text):
    try:
        return _check_older_than(text)
    except UsageError:
        raise argparse.ArgumentTypeError("%r is not a number of days (0 or more, e.g. 13)"
                                         % text)


def add_budget_arguments(p, scope=""):
    """--max-seconds and --max-entries: what a walk may take before it stops (to resume)."""
    for flag, kind, meta, what in (("--max-seconds", _positive_seconds, "S", "S seconds"),
                                   ("--max-entries", _int_range(0), "N", "N entries")):
        p.add_argument(flag, type=kind, metavar=meta,
                       help="stop after %s%s; resume next time" % (what, scope))


def add_json_argument(p):
    p.add_argument("--json", action="store_true",
                   help="print JSON instead of text (its keys: README.md, \"JSON output\")")


def add_rescue_to_argument(p):
    p.add_argument("--rescue-to", metavar="DIR",
                   help="every scheduled walk then rescues what could age out before the next "
                        "run to DIR (as `rescue`; off scratch); `none` clears it")


def add_state_dir_argument(p, top=False):
    p.add_argument("--state-dir", metavar="DIR", default=None if top else argparse.SUPPRESS,
                   help="state directory (default: $SCRATCH_KEEPALIVE_HOME, else "
                        "$XDG_STATE_HOME/scratch-keepalive, else ~/.local/state/scratch-keepalive)")


def _sub(subs, name, func, help_text, description, examples, dataset=None):
    """A command's parser, with --state-dir and, where dataset says, --name: "one" (required)
    or "any" (optional: only that one)."""
    description = "\n\n".join(textwrap.fill(par, 79, break_on_hyphens=False)
                                for par in description.split("\n\n"))
    p = subs.add_parser(name, help=help_text, description=description,
                        epilog="examples:\n" + examples,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    add_state_dir_argument(p)
    if dataset is not None:
        p.add_argument("--name", required=dataset == "one", metavar="NAME",
                       help="the dataset's name" if dataset == "one" else "only this dataset")
    return p


def _parser_init(subs):
    p = _sub(subs, "init", cmd_init, "choose the profile and scratch root",
             "Create or update the configuration. The same options again change nothing; new "
             "ones update it; changing the profile while datasets exist is refused.",
             "  scratch-keepalive init                      # br200: /N/scratch/$USER\n"
             "  scratch-keepalive init --profile generic --scratch-root $SCRATCH --purge-days 60\n")
    p.add_argument("--profile", choices=sorted(PROFILES), help="br200 (default) or generic")
    p.add_argument("--scratch-root", metavar="DIR", help="the purged filesystem's directory "
                   "(br200: /N/scratch/$USER; generic: $SCRATCH)")
    p.add_argument("--purge-days", type=_int_range(6, 3650), metavar="N",
                   help="generic: files not accessed for N days are purged (default 30)")


def _parser_add(subs):
    p = _sub(subs, "add", cmd_add, "register a dataset",
             "Register a dataset below the scratch root, to be kept until a date (inclusive), "
             "and write its sentinel file.",
             "  scratch-keepalive add --name genomes --path /N/scratch/$USER/genomes "
             "--keep-until 2027-03-31\n"
             "  scratch-keepalive add --name sims --path $SCRATCH/sims --keep-until 2027-01-15 "
             "--approval INC0012345\n")
    p.add_argument("--name", required=True, metavar="NAME",
                   help="a name: letters, digits, '.', '_', '-' (up to 64)")
    p.add_argument("--path", required=True, metavar="DIR", help="the dataset's root directory")
    p.add_argument("--keep-until", required=True, metavar="YYYY-MM-DD",
                   help="last day it is protected (inclusive, UTC)")
    p.add_argument("--cadence-days", type=_int_range(1, 3650), metavar="N",
                   help="days between refreshes (br200: at least 14; default 14)")
    p.add_argument("--approval", metavar="TEXT",
                   help="the site's approval to refresh access times (ticket or exemption)")
    add_rescue_to_argument(p)
    p.add_argument("--no-manifest", action="store_true",
                   help="its walks keep no manifest (the list behind `files`, `rescue` and "
                        "the vanished counts); for the rare dataset whose list the state "
                        "directory cannot hold")
    add_json_argument(p)


def _parser_list(subs):
    p = _sub(subs, "list", cmd_list, "list datasets",
             "List the registered datasets with their state: missing, expired, disabled, "
             "partial, never, due (cadence - 1 days since the last complete walk of its "
             "mode) or ok; and the risk the last complete walk found: purge-eligible, "
             "at-risk or none.",
             "  scratch-keepalive list\n  scratch-keepalive list --json\n")
    add_json_argument(p)


def _parser_status(subs):
    p = _sub(subs, "status", cmd_status, "show datasets in detail",
             "Show each dataset's state, thresholds, last run, checkpoint and sentinel.\n\n"
             "--brief prints nothing when nothing needs attention, else one line per "
             "dataset that does (its `attention`: %s) and "
             "one for the schedule (missing, failed, or silent: no scheduled run has reported "
             "for cadence + 3 days), each ending with the command to run. It reads the state "
             "directory only (no walk, no Slurm command), for ~/.bashrc." % ", ".join(
                 ATTENTION_CODES),
             "  scratch-keepalive status\n  scratch-keepalive status --name genomes --json\n"
             "  scratch-keepalive status --brief     # in ~/.bashrc: "
             "case $- in *i*) scratch-keepalive status --brief;; esac\n", "any")
    p.add_argument("--brief", action="store_true",
                   help="only what needs attention, one line each (nothing when all is well)")
    add_json_argument(p)


def _parser_refresh(subs):
    p = _sub(subs, "refresh", cmd_refresh, "walk datasets now (touch or check mode)",
             "Walk datasets depth-first in a fixed order and refresh access times (touch mode) "
             "or only check them (check mode). Progress is checkpointed; an interrupted walk "
             "resumes where it stopped.",
             "  scratch-keepalive refresh                       # every enabled dataset\n"
             "  scratch-keepalive refresh --name genomes --check\n"
             "  scratch-keepalive refresh --name genomes --dry-run   # walk, change nothing\n"
             "  # what the schedule runs: the job's time limit (%s) less %d minutes\n"
             "  scratch-keepalive refresh --due --max-seconds %d\n"
             % (PROFILES[DEFAULT_PROFILE]["time"], JOB_MARGIN_SECONDS // 60,
                parse_slurm_time(PROFILES[DEFAULT_PROFILE]["time"]) - JOB_MARGIN_SECONDS),
             "any")
    p.add_argument("--due", action="store_true",
                   help="what the schedule runs: only datasets never walked, with a "
                   "checkpoint, or whose last complete walk of their mode started at least "
                   "(cadence - schedule cadence + 1) days ago (24 hours when the two are "
                   "equal); a check walk or dry run never counts for a touch-mode dataset. "
                   "With --name, the same rule: NAME is walked only when due (or with a "
                   "checkpoint); otherwise it says when it will be, and exits 0")
    p.add_argument("--check", action="store_true", help="check mode: touch nothing, report risk")
    p.add_argument("--dry-run", action="store_true",
                   help="walk and report; write nothing (no checkpoint, no timestamps)")
    add_budget_arguments(p, " (whole command)")
    p.add_argument("--threads", type=_int_range(1, 64), metavar="N",
                   help="metadata calls in flight (default 16 on Lustre, NFS and other network "
                        "filesystems, else 1)")
    p.add_argument("--workers", type=_int_range(1, 64), metavar="N",
                   help="processes sharing the metadata work on a local disk (default 2 where "
                        "2 CPUs are available, else 1)")
    p.add_argument("--checkpoint-every", type=_positive_seconds, metavar="S",
                   default=CHECKPOINT_SECONDS, help="seconds between checkpoints (default 30)")
    p.add_argument("--no-manifest", action="store_true",
                   help="write no manifest of this walk (`files`, `rescue` and the vanished "
                        "counts keep using the last one)")
    p.add_argument("--fail-on-risk", action="store_true",
                   help="exit 1 when a complete check walk found purge-eligible entries, or "
                        "a walk of either mode found entries likely purged since the previous "
                        "one (what install-cron --mail-user runs, so that Slurm mails you); "
                        "only the exit code changes. Precedence: 130, then 1 (a failure or "
                        "this risk), then 3, 4, 0; in a scheduled job, a stop whose "
                        "continuation was booked counts as 0")
    p.add_argument("--scheduled", choices=("scrontab", "sbatch", "resume"),
                   help=argparse.SUPPRESS)
    add_json_argument(p)


def _parser_extend(subs):
    p = _sub(subs, "extend", cmd_extend, "change keep-until, record an approval",
             "Move a dataset's keep-until date and/or record the site's approval to refresh it.",
             "  scratch-keepalive extend --name genomes --keep-until 2027-09-30\n"
             "  scratch-keepalive extend --name genomes --approval 'INC0012345'\n"
             "  scratch-keepalive extend --name genomes --cadence-days 14\n", "one")
    p.add_argument("--keep-until", metavar="YYYY-MM-DD", help="the new last day (inclusive)")
    p.add_argument("--approval", metavar="TEXT", help="ticket or words of the site's exemption")
    p.add_argument("--cadence-days", type=_int_range(1, 3650), metavar="N",
                   help="days between refreshes (br200: at least 14)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--manifest", dest="manifest", action="store_const", const=True,
                   help="keep a manifest of each walk again (the default)")
    g.add_argument("--no-manifest", dest="manifest", action="store_const", const=False,
                   help="keep no manifest of its walks")
    add_rescue_to_argument(p)


def _parser_rescue(subs):
    p = _sub(subs, "rescue", cmd_rescue, "copy what is at risk to safe storage",
             "Copy the entries the dataset's last complete walk found at risk (--all: every "
             "entry) to DIR/<path below the dataset root>: files (sparse ones stay sparse), "
             "symlinks as links, directories with their modes, mtimes kept. Sources are read "
             "with O_NOATIME, so a rescue never refreshes what it copies; files of another "
             "owner cannot be read that way and are listed as not rescued. Each file is "
             "written under a temporary name and renamed when complete; one already there "
             "with the same size and mtime is skipped, and a newer one is never overwritten."
             "\n\nRefused (exit 2, nothing copied): a DIR that is, contains or lies inside "
             "the scratch root or the dataset, and a DIR whose filesystem or quota lacks room "
             "for the bytes to copy plus 5%. Stopped by --max-seconds, --max-entries or a "
             "signal (exit 3, Ctrl-C 130), it resumes from its checkpoint; exit 4 while a "
             "refresh or rescue of the dataset runs.",
             "  scratch-keepalive refresh --name genomes      # check: what is at risk?\n"
             "  scratch-keepalive files --name genomes --at-risk\n"
             "  scratch-keepalive rescue --name genomes --to /N/project/myproject/genomes "
             "--dry-run\n"
             "  scratch-keepalive rescue --name genomes --to /N/project/myproject/genomes\n"
             "  scratch-keepalive rescue --name genomes --to /N/slate/$USER/genomes --all\n",
             "one")
    p.add_argument("--to", required=True, metavar="DIR",
                   help="where to copy to, off scratch (BR200: /N/project/<project>/... or "
                        "/N/slate/$USER/...); made when missing")
    p.add_argument("--all", action="store_true",
                   help="every entry of the walk, not only the at-risk ones")
    p.add_argument("--dry-run", action="store_true",
                   help="say what would be copied; write nothing")
    add_budget_arguments(p)
    p.add_argument("--threads", type=_int_range(1, 64), metavar="N",
                   help="files copied at once (default 16 when either side is on Lustre, NFS "
                        "or another network filesystem)")
    p.add_argument("--workers", type=_int_range(1, 64), metavar="N",
                   help="processes sharing the copies on a local disk (default 2 where two "
                        "CPUs are ours and Python is 3.7+; --workers 1: one copy at a time)")
    p.add_argument("--checkpoint-every", type=_positive_seconds, metavar="S",
                   default=CHECKPOINT_SECONDS, help=argparse.SUPPRESS)
    add_json_argument(p)


def _parser_enable_and_disable(subs):
    for name, verb in (("enable", "resume refreshing a dataset"),
                       ("disable", "pause refreshing a dataset")):
        _sub(subs, name, cmd_enable, verb, verb[0].upper() + verb[1:] + ".",
             "  scratch-keepalive %s --name genomes\n" % name, "one")


def _parser_remove(subs):
    _sub(subs, "remove", cmd_remove, "unregister a dataset (data untouched)",
         "Unregister a dataset and delete its sentinel and checkpoint. Its data is never "
         "touched. A dataset being refreshed cannot be removed (exit 4).",
         "  scratch-keepalive remove --name genomes\n", "one")


def _parser_files(subs):
    p = _sub(subs, "files", cmd_files, "list the entries of the last walk: at risk, vanished",
             "List entries of the dataset's last complete walk (its manifest, in the state "
             "directory), classified as of that walk, one path per line relative to the "
             "dataset root (the root itself is not listed): every entry, or those at risk, "
             "purge-eligible, or (--vanished) gone since the walk before, each with its reason: \"likely purged\" (last access "
             "older than purge days at the newer walk) or \"deleted or moved\", after a tab. "
             "A path holding a control character, '\"', '\\' or bytes that are not UTF-8 is "
             "printed in double quotes with C escapes (git's quoting; \\ooo for such bytes); "
             "-0 prints raw bytes, NUL-terminated, for rsync --from0 and tar --null. One line "
             "on stderr names the walk and its age. Nothing is walked or touched.\n\n"
             "To copy the listed files, tar as below keeps their access times; rsync may "
             "move them (some builds read files without O_NOATIME despite --open-noatime): "
             "run the README's probe first (\"Copying them somewhere safe without moving "
             "their atimes\").\n\n"
             "Exit codes: 0 listed (also when nothing matches); 1 no complete walk has left a "
             "manifest yet (--vanished: fewer than two), or a manifest is damaged; 2 unknown "
             "dataset, bad DAYS, two classes, -0 with --json; 141 the reader of the output "
             "went away (`files | head`).",
             "  scratch-keepalive files --name genomes --at-risk\n"
             "  scratch-keepalive files --name genomes --vanished\n"
             "  scratch-keepalive files --name genomes --older-than 20 --json\n"
             "  scratch-keepalive files --name genomes --at-risk -0 |\n"
             "      tar --atime-preserve=system --null --no-recursion \\\n"
             "          -C /N/scratch/$USER/genomes -T - -cf DEST.tar\n", "one")
    which = p.add_mutually_exclusive_group()
    for flag, text in (("at-risk", "only entries at risk (not accessed for the at-risk days; "
                                   "br200: 13) and not touched by that walk"),
                       ("purge-eligible", "only entries not accessed for purge days"),
                       ("vanished", "entries of the walk before that the last walk no longer "
                                    "found, each with its reason")):
        which.add_argument("--" + flag, dest="kind", action="store_const", const=flag,
                           help=text)
    p.add_argument("--older-than", type=_days, metavar="DAYS",
                   help="only entries not accessed for DAYS days before that walk's start "
                        "(with a class: both)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("-0", "--null", dest="null", action="store_true",
                      help="raw paths, each ended by a NUL byte (rsync --from0, tar --null)")
    form.add_argument("--json", action="store_true",
                      help="JSON Lines: one object per entry (path, kind, size, atime, touched; "
                           "path_b64 when the path is not UTF-8; reason with --vanished)")


def _parser_install_cron(subs):
    p = _sub(subs, "install-cron", cmd_install_cron, "schedule refresh with Slurm",
             "Install exactly one recurring Slurm entry for you: a block in your scrontab, or, "
             "where scrontab is missing or disabled, a self-resubmitting batch job with at most "
             "one pending job. Running it again replaces, never duplicates. The job runs "
             "`refresh --due` with this interpreter and this file's absolute paths.",
             "  scratch-keepalive install-cron --account r00000 --dry-run   # show, change nothing\n"
             "  scratch-keepalive install-cron --account r00000\n"
             "  scratch-keepalive install-cron --account r00000 --method sbatch --time 4:00:00\n"
             "  scratch-keepalive install-cron --account r00000 --mail-user jdoe@iu.edu\n")
    p.add_argument("--method", choices=("auto", "scrontab", "sbatch"), default="auto",
                   help="auto (default): scrontab where it works, else the sbatch chain")
    for flag, meta, kind, text in (
            ("--account", "A", str, "Slurm account (required on br200)"),
            ("--partition", "P", str, "partition (br200: general)"),
            ("--cpus", "N", _int_range(1, 256), "CPUs (default 1)"),
            ("--mem", "M", str, "memory (default 2G)"),
            ("--time", "T", str, "time limit (default 2:00:00)")):
        p.add_argument(flag, metavar=meta, type=kind, help=text)
    p.add_argument("--cadence-days", type=_int_range(1, 3650), metavar="N",
                   help="days between runs (default: the smallest dataset cadence)")
    p.add_argument("--mail-user", metavar="ADDR",
                   help="Slurm mails ADDR when a run fails (--mail-type=FAIL), and the job "
                        "runs refresh --due --fail-on-risk: purge-eligible entries (check "
                        "mode) or entries likely purged make it fail; entries only at risk "
                        "(not accessed for the at-risk days, 13 on br200) do not")
    p.add_argument("--reinstall", action="store_true",
                   help="reinstall the recorded schedule with this interpreter and file "
                        "(after an upgrade or a move)")
    p.add_argument("--dry-run", action="store_true", help="print what would be installed")
    add_json_argument(p)


def _parser_uninstall_cron(subs):
    _sub(subs, "uninstall-cron", cmd_uninstall_cron, "remove the Slurm schedule",
         "Delete the job script, remove our scrontab block (other lines kept), then cancel "
         "pending jobs named scratch-keepalive. Exit 0 when nothing was installed.",
         "  scratch-keepalive uninstall-cron\n")


def _parser_doctor(subs):
    p = _sub(subs, "doctor", cmd_doctor, "check the setup for problems",
             "Check the environment, the state files, every dataset (root, sentinel, keep-until, "
             "overdue, errors, approval), locks, the schedule and the scratch quota. Exit 0 when "
             "healthy, 1 when anything needs attention; each finding says what to do.",
             "  scratch-keepalive doctor\n  scratch-keepalive doctor --json\n")
    add_json_argument(p)


def _parser_repair(subs):
    p = _sub(subs, "repair", cmd_repair, "mend what doctor finds",
             "Mend what is safe to mend: a damaged registry (set aside, restored from its backup "
             "or rebuilt from the sentinels), unreadable or orphaned checkpoints, stale locks of "
             "dead processes, missing sentinels, duplicate pending jobs, a schedule whose paths "
             "moved. It never deletes or modifies your data and never touches timestamps.",
             "  scratch-keepalive repair --dry-run   # list what it would do\n"
             "  scratch-keepalive repair\n")
    p.add_argument("--dry-run", action="store_true", help="list what it would do; change nothing")
    add_json_argument(p)


def build_parser():
    parser = _Parser(prog=PROG, description=__doc__, epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="%s %s" % (PROG, __version__))
    add_state_dir_argument(parser, top=True)
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs.required = True
    for add_command in (_parser_init, _parser_add, _parser_list, _parser_status,
                        _parser_refresh, _parser_extend, _parser_rescue,
                        _parser_enable_and_disable, _parser_remove, _parser_files,
                        _parser_install_cron, _parser_uninstall_cron, _parser_doctor,
                        _parser_repair):
        add_command(subs)
    return parser


# ---------------------------------------------------------------- CLI: main


def main(argv=None):
    """Run one command. Returns the exit code; never calls sys.exit."""
    out = OutputStream(sys.stdout, "standard output")
    err = OutputStream(sys.stderr, "standard error", quiet=True)
    try:
        code = _main(argv, out, err)
    except OutputError as e:        # the last flush, in _main's own handling
        err.write("%s: error: %s\n" % (PROG, e))
        code = EXIT_FAIL
    err.flush()
    if argv is None:        # the CLI entry: main() called in-process changes nothing
        for s in (out, err):    # an output that failed (a full device), not a closed pipe
            if s.failed is not None and not isinstance(s.failed, BrokenPipeError):
                to_devnull(s.stream)
    return code


def _main(argv, out, err):
    """main()'s work, with its output streams; an OutputError may still leave it."""
    if argv is None:        # run as a command: hints show how it was run
        argv = sys.argv[1:]
        out.form = err.form = invoked_as()
    try:
        try:
            args = login_line_args(argv) or build_parser().parse_args(list(argv))
        except OSError as e:    # --help or --version written to an output that fails
            if isinstance(e, BrokenPipeError):
                raise
            raise out.fail(e) from None
        ctx = Context(state_dir=args.state_dir, out=out, err=err)
        code = int(args.func(args, ctx) or 0)
        out.flush()     # a closed pipe shows here when all the output fit in the buffer
        return code
    except _ParserExit as e:
        return flushed(out, e.status)
    except Failure as e:
        err.write("%s: error: %s\n" % (PROG, e))
        return e.exit_code
    except KeyboardInterrupt:
        err.write("%s: error: interrupted\n" % PROG)
        return EXIT_INTERRUPTED
    except OSError as e:
        if isinstance(e, BrokenPipeError) and output_closed(out):
            return quiet_after_closed_pipe(out)
        if e.errno in FULL_ERRNOS:
            err.write("%s: error: %s\n" % (PROG, full_message(e, e.filename)))
            return EXIT_FAIL
        err.write("%s: error: %s; check the path and its permissions\n" % (PROG, e))
        return EXIT_FAIL
    except Exception as e:     # a bug: still one line, never a traceback, unless asked
        if os.environ.get("SCRATCH_KEEPALIVE_DEBUG"):
            raise
        err.write("%s: error: internal error (%s: %s); rerun with SCRATCH_KEEPALIVE_DEBUG=1 "
                  "for a traceback and report it\n" % (PROG, type(e).__name__, e))
        return EXIT_FAIL


def login_line_args(argv):
    """The arguments of `status --brief` (the login line in ~/.bashrc), or None for any other
    command line. It runs at every login, and building the whole parser takes about as long
    as the rest of that command; a test checks that these are what the parser gives."""
    if list(argv) != ["status", "--brief"]:
        return None
    return types.SimpleNamespace(state_dir=None, command="status", name=None, brief=True,
                                 json=False, func=cmd_status)


# `python3 -c LOADER SCRIPT ARGS` runs SCRIPT as `python3 SCRIPT ARGS` would, but loaded
# as an import loads a module: from __pycache__ when the bytecode there is current (and
# written there when the directory is writable). Compiling this file costs about 18 MiB at
# its peak, which a walk then never gets back; loading its bytecode, about 1 MiB. The
# scheduled job runs the tool this way (Schedule.command).
LOADER = ('import importlib.util as u, sys; sys.argv = sys.argv[1:]; '
          's = u.spec_from_file_location("__main__", sys.argv[0]); m = u.module_from_spec(s); '
          'm._SCRATCH_KEEPALIVE_RECOMPILED = True; sys.modules["__main__"] = m; '
          's.loader.exec_module(m)')


def flushed(stream, code):
    """code, once stream is flushed; EXIT_PIPE (quietly) when its reader has gone away."""
    try:
        stream.flush()
    except BrokenPipeError:
        return quiet_after_closed_pipe(stream)
    return quiet_after_closed_pipe(stream) if output_closed(stream) else code


def output_closed(stream):
    """True when nobody reads stream any more (the reader of a pipe or socket went away)."""
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    p = select.poll()
    p.register(fd, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))


def quiet_after_closed_pipe(stream):
    """The reader of the output went away (`list | head -1`): end quietly, as git does."""
    to_devnull(stream)
    return EXIT_PIPE


if __name__ == "__main__":
    sys.exit(main())
