#!/bin/sh
# install.sh - install scratch-keepalive for one user, without pip or network.
#
# Copies scratch_keepalive.py to $PREFIX/share/scratch-keepalive/ (with its
# bytecode) and writes a small launcher $PREFIX/bin/scratch-keepalive bound to
# a Python >= 3.6, which imports it from there.
# Run `install.sh --help` for the options.  POSIX sh: runs under dash
# (Debian) and bash (SLES), needs only coreutils, sed, grep and sort.
#
# Nothing is left half-installed: the new files are written to temporary
# files inside the target directories, checked by running them, and only
# then renamed into place.  The state directory (data, config, schedule)
# is never modified by this script.

PROG=install.sh
MODULE=scratch_keepalive.py
COMMAND=scratch-keepalive
MARKER='# scratch-keepalive launcher written by install.sh'
# The launcher's Python code: its first argument is the module's directory.
LAUNCH='import sys; sys.path[0] = sys.argv.pop(1); from scratch_keepalive import main; sys.exit(main())'

usage() {
    cat <<EOF
Usage: $PROG [--prefix DIR] [--python PATH] [--source FILE]
       $PROG --uninstall [--prefix DIR]

Install scratch-keepalive for the current user: no pip, no network, no root.

  --prefix DIR    install under DIR (default: ~/.local):
                    DIR/share/$COMMAND/$MODULE  (the program)
                    DIR/bin/$COMMAND              (the command you run)
  --python PATH   Python interpreter to use (must be >= 3.6).  Default: the
                  first 'python3' on PATH if it is >= 3.6, else the newest
                  'python3.X' on PATH.
  --source FILE   the $MODULE to install.  Default: the one next to
                  this script, or in the directory above it (a checkout).
  --uninstall     remove the command and the program (never the state
                  directory with your data, config and schedule)
  -h, --help      show this help and exit

Running it again is safe; it also upgrades an existing installation and
then refreshes an installed schedule (install-cron --reinstall).
State directory (never modified here): \$SCRATCH_KEEPALIVE_HOME, else
\$XDG_STATE_HOME/$COMMAND, else ~/.local/state/$COMMAND.
EOF
}

# --- messages -------------------------------------------------------------

die() {
    # Exactly one line on stderr, then exit (the EXIT trap cleans up).
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

usage_error() {
    printf '%s: error: %s (see %s --help)\n' "$PROG" "$*" "$PROG" >&2
    exit 2
}

warn() {
    printf '%s: warning: %s\n' "$PROG" "$*" >&2
}

say() {
    printf '%s\n' "$*"
}

# --- helpers --------------------------------------------------------------

# Quote a string for safe use in a sh script: 'it'\''s'.
shquote() {
    printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}

# Make a path absolute (relative to the current directory), expand ~.
abspath() {
    # shellcheck disable=SC2088  # a literal "~" given as --prefix=~/x
    case $1 in
        "~") printf '%s\n' "$HOME" ;;
        "~/"*) printf '%s/%s\n' "$HOME" "${1#\~/}" ;;
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$(pwd)" "$1" ;;
    esac
}

# The version in a source file's line  __version__ = "X.Y.Z"  (or empty).
file_version() {
    sed -n "s/^__version__ *= *[\"']\\([^\"']*\\)[\"'].*/\\1/p" "$1" 2>/dev/null | head -n 1
}

# Is this Python >= 3.6?  Decided by running it, nothing else.
python_ok() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 6))' >/dev/null 2>&1 </dev/null
}

python_version() {
    "$1" -c 'import sys; sys.stdout.write("%d.%d.%d" % tuple(sys.version_info[:3]))' 2>/dev/null </dev/null
}

# The real interpreter behind a name found on PATH (sees through wrappers
# such as pyenv shims, whose target depends on the current directory).
python_real() {
    _real=$("$1" -c 'import sys; sys.stdout.write(sys.executable or "")' 2>/dev/null </dev/null)
    case $_real in
        /*) if [ -f "$_real" ] && [ -x "$_real" ]; then
                printf '%s\n' "$_real"
                return 0
            fi ;;
    esac
    printf '%s\n' "$1"
}

# Is directory $1 one of the entries of $PATH?
on_path() {
    _want=${1%/}
    _want_real=$(cd -P -- "$_want" 2>/dev/null && pwd -P)
    _oldifs=$IFS
    IFS=:
    for _d in $PATH; do
        IFS=$_oldifs
        [ -n "$_d" ] || continue
        _d2=${_d%/}
        if [ "$_d2" = "$_want" ]; then
            return 0
        fi
        # Same directory under another name (symlinked home, say)?
        if [ -n "$_want_real" ] && [ -d "$_d2" ] &&
            [ "$(cd -P -- "$_d2" 2>/dev/null && pwd -P)" = "$_want_real" ]; then
            return 0
        fi
    done
    IFS=$_oldifs
    return 1
}

# Does the file look like a launcher written by this script?
is_our_launcher() {
    [ -f "$1" ] && grep -qF "$MARKER" "$1" 2>/dev/null
}

# Can "#!$1 -S" start a script, and a Python string in '' hold directory $2?
# Only plain characters (no white space, quote or backslash) and a line
# within the 127 bytes that older kernels read.
python_launcher_ok() {
    [ ${#1} -le 120 ] || return 1
    case $1$2 in
        *[!A-Za-z0-9/._+@,:=~-]*) return 1 ;;
    esac
    return 0
}

# The contents of a launcher running module file $2 with Python $1.  It
# imports the module (its directory first on sys.path, in place of the
# launcher's or the current one), so Python loads it from the bytecode cached
# in __pycache__ instead of compiling the whole file at every start, as
# `python3 FILE` does: that matters for the login line (status --brief).
# -S: no site-packages to scan at each start; the program needs none.  A
# Python script itself where its "#!" line can name the interpreter (a shell
# in between costs the login line a process start), else a sh script.
launcher_text() {
    _dir=$(dirname -- "$2")
    if python_launcher_ok "$1" "$_dir"; then
        printf '#!%s -S\n' "$1"
    else
        printf '#!/bin/sh\n'
    fi
    printf '%s (version %s).\n' "$MARKER" "$3"
    printf '# Re-run install.sh to change the Python or the program path.\n'
    if python_launcher_ok "$1" "$_dir"; then
        printf "import sys; sys.path[0] = '%s'; from scratch_keepalive import main; sys.exit(main())\n" \
            "$_dir"
    else
        printf 'exec %s -S -c %s %s "$@"\n' "$(shquote "$1")" "$(shquote "$LAUNCH")" \
            "$(shquote "$_dir")"
    fi
}

# Is launcher $1 valid code for its interpreter (sh, or Python $2)?
launcher_valid() {
    if [ "$(head -n 1 -- "$1")" = '#!/bin/sh' ]; then
        sh -n "$1" 2>/dev/null
    else
        "$2" -c 'import sys; compile(open(sys.argv[1]).read(), sys.argv[1], "exec")' "$1" \
            >/dev/null 2>&1 </dev/null
    fi
}

# Byte-compile module file $2 with Python $1 into its __pycache__ (whatever
# PYTHONDONTWRITEBYTECODE says), so that even the first start loads bytecode.
byte_compile() {
    "$1" -c 'import py_compile, sys; py_compile.compile(sys.argv[1], doraise=True)' "$2" \
        >/dev/null 2>&1 </dev/null
}

# Run "$@" --version and check it prints "scratch-keepalive $expect"
# (any version when $expect is empty).  Sets $got_version / $check_msg.
check_version() {
    _expect=$1
    shift
    got_version=
    check_msg=
    _out=$("$@" --version 2>&1 </dev/null)
    _rc=$?
    _line=$(printf '%s\n' "$_out" | grep "^$COMMAND " | head -n 1)
    if [ $_rc -ne 0 ] || [ -z "$_line" ]; then
        _last=$(printf '%s\n' "$_out" | sed '/^[[:space:]]*$/d' | tail -n 1)
        check_msg="'--version' exited with status $_rc${_last:+: $_last}"
        return 1
    fi
    got_version=${_line#"$COMMAND "}
    if [ -n "$_expect" ] && [ "$got_version" != "$_expect" ]; then
        check_msg="'--version' printed '$_line', expected '$COMMAND $_expect'"
        return 1
    fi
    return 0
}

# --- cleanup: remove our temporary files on any exit ----------------------

stage_dir=
tmp_launcher=
created_dirs=
committed=no

# shellcheck disable=SC2317  # called from the EXIT trap
cleanup() {
    if [ -n "$tmp_launcher" ]; then
        rm -f "$tmp_launcher"
    fi
    if [ -n "$stage_dir" ]; then
        rm -rf "$stage_dir"
    fi
    if [ "$committed" != yes ] && [ -n "$created_dirs" ]; then
        # Directories this run created, deepest first; rmdir keeps any
        # that are not empty.
        for _d in $created_dirs; do
            rmdir "$_d" 2>/dev/null
        done
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# Like mkdir -p, remembering (deepest first) the directories it created.
make_dir() {
    _missing=
    _p=$1
    while [ -n "$_p" ] && [ "$_p" != / ] && [ ! -d "$_p" ]; do
        _missing="$_p $_missing"
        _p=$(dirname -- "$_p")
    done
    mkdir -p -- "$1" 2>/dev/null || return 1
    for _m in $_missing; do
        created_dirs="$_m $created_dirs"
    done
    return 0
}

# --- options --------------------------------------------------------------

prefix=
python=
source=
action=install

need_value() {
    [ $# -ge 2 ] || usage_error "$1 needs a value"
    [ -n "$2" ] || usage_error "$1 needs a non-empty value"
}

while [ $# -gt 0 ]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --uninstall) action=uninstall ;;
        --prefix) need_value "$@"; prefix=$2; shift ;;
        --prefix=*) prefix=${1#*=}; [ -n "$prefix" ] || usage_error "--prefix needs a non-empty value" ;;
        --python) need_value "$@"; python=$2; shift ;;
        --python=*) python=${1#*=}; [ -n "$python" ] || usage_error "--python needs a non-empty value" ;;
        --source) need_value "$@"; source=$2; shift ;;
        --source=*) source=${1#*=}; [ -n "$source" ] || usage_error "--source needs a non-empty value" ;;
        -*) usage_error "unknown option '$1'" ;;
        *) usage_error "unexpected argument '$1'" ;;
    esac
    shift
done

if [ -z "$prefix" ]; then
    [ -n "${HOME:-}" ] || die "HOME is not set; give --prefix DIR"
    prefix=$HOME/.local
fi
prefix=$(abspath "$prefix")
prefix=${prefix%/}
[ -n "$prefix" ] || prefix=/

bin_dir=$prefix/bin
share_dir=$prefix/share/$COMMAND
launcher=$bin_dir/$COMMAND
installed=$share_dir/$MODULE
state_dir=${SCRATCH_KEEPALIVE_HOME:-${XDG_STATE_HOME:-${HOME:-}/.local/state}/$COMMAND}
schedule=$state_dir/schedule.json

# --- uninstall ------------------------------------------------------------

if [ "$action" = uninstall ]; then
    removed=no
    if [ -e "$launcher" ] || [ -L "$launcher" ]; then
        if is_our_launcher "$launcher"; then
            rm -f "$launcher" || die "cannot remove $launcher"
            say "removed $launcher"
            removed=yes
        else
            warn "left $launcher alone: it was not written by $PROG (installed with pip? then use 'pip uninstall br-scratch-keepalive')"
        fi
    fi
    if [ -e "$installed" ]; then
        rm -f "$installed" || die "cannot remove $installed"
        say "removed $installed"
        removed=yes
    fi
    # Its bytecode (written by this script and by Python).
    rm -f "$share_dir"/__pycache__/scratch_keepalive.*.pyc 2>/dev/null
    rmdir "$share_dir/__pycache__" 2>/dev/null
    # Leftovers of an interrupted run (temporary names of this script).
    rm -rf "$share_dir"/.install.* 2>/dev/null
    rm -f "$bin_dir"/.$COMMAND.* 2>/dev/null
    if [ -d "$share_dir" ]; then
        if rmdir "$share_dir" 2>/dev/null; then
            say "removed $share_dir (empty)"
        else
            say "kept $share_dir (not empty)"
        fi
    fi
    if [ "$removed" = no ]; then
        say "$COMMAND is not installed under $prefix: nothing to remove"
    fi
    say "state directory not touched: $state_dir"
    if [ -f "$schedule" ]; then
        warn "a schedule is still installed ($schedule); its crontab entry now points at a removed program: remove that entry with 'crontab -e', or install again"
    fi
    exit 0
fi

# --- install: find the source file ----------------------------------------

if [ -n "$source" ]; then
    source=$(abspath "$source")
    [ -e "$source" ] || die "source file not found: $source"
    [ -f "$source" ] || die "source is not a regular file: $source"
    [ -r "$source" ] || die "source file is not readable: $source"
else
    script_dir=$(cd -P -- "$(dirname -- "$0")" 2>/dev/null && pwd -P) ||
        die "cannot find the directory of $0; give --source FILE"
    for _cand in "$script_dir/$MODULE" "$script_dir/../$MODULE"; do
        if [ -f "$_cand" ]; then
            source=$(cd -P -- "$(dirname -- "$_cand")" && pwd -P)/$MODULE
            break
        fi
    done
    [ -n "$source" ] || die "$MODULE not found next to $PROG ($script_dir) or in $(dirname -- "$script_dir"); give --source FILE"
    [ -r "$source" ] || die "source file is not readable: $source"
fi
src_version=$(file_version "$source")

# --- install: find a Python >= 3.6 ----------------------------------------

py=
if [ -n "$python" ]; then
    case $python in
        */*) _given=$(abspath "$python") ;;
        *) _given=$(command -v "$python" 2>/dev/null) ||
               die "--python $python: not found on PATH" ;;
    esac
    [ -e "$_given" ] || die "--python $python: no such file"
    { [ -f "$_given" ] && [ -x "$_given" ]; } || die "--python $python: not an executable file"
    if ! python_ok "$_given"; then
        _v=$(python_version "$_given")
        die "--python $python is not a usable Python >= 3.6${_v:+ (it is Python $_v)}"
    fi
    py=$_given   # an explicit choice is used exactly as given
else
    tried=
    _p3=$(command -v python3 2>/dev/null)
    case $_p3 in
        /*) if python_ok "$_p3"; then
                py=$(python_real "$_p3")
            else
                tried="$_p3"
            fi ;;
    esac
    if [ -z "$py" ]; then
        # Every python3.X on PATH, newest minor first, PATH order on ties.
        _list=$(
            _n=0
            IFS=:
            for _d in $PATH; do
                [ -n "$_d" ] || _d=.
                for _f in "$_d"/python3.*; do
                    _b=${_f##*/}
                    _minor=${_b#python3.}
                    case $_minor in '' | *[!0-9]*) continue ;; esac
                    if [ ! -f "$_f" ] || [ ! -x "$_f" ]; then
                        continue
                    fi
                    _n=$((_n + 1))
                    printf '%s %s %s\n' "$_minor" "$_n" "$_f"
                done
            done | sort -k1,1nr -k2,2n
        )
        _nl='
'
        _oldifs=$IFS
        IFS=$_nl
        for _entry in $_list; do
            IFS=$_oldifs
            _f=${_entry#* }
            _f=${_f#* }
            if python_ok "$_f"; then
                py=$(python_real "$_f")
                break
            fi
            tried="${tried:+$tried, }$_f"
        done
        IFS=$_oldifs
    fi
    [ -n "$py" ] || die "no Python >= 3.6 found on PATH (tried: ${tried:-no python3 or python3.X at all}); load one (e.g. 'module load python') or give --python PATH"
fi
py_version=$(python_version "$py")

# --- install: stage, verify, then move into place -------------------------

old_version=
if [ -f "$installed" ]; then
    old_version=$(file_version "$installed")
    [ -n "$old_version" ] || old_version=unknown
fi
if { [ -e "$launcher" ] || [ -L "$launcher" ]; } && ! is_our_launcher "$launcher"; then
    warn "replacing $launcher, which was not written by $PROG"
fi

make_dir "$share_dir" || die "cannot create directory $share_dir"
make_dir "$bin_dir" || die "cannot create directory $bin_dir"
[ -w "$share_dir" ] || die "directory is not writable: $share_dir"
[ -w "$bin_dir" ] || die "directory is not writable: $bin_dir"

stage_dir=$(mktemp -d "$share_dir/.install.XXXXXX" 2>/dev/null) ||
    die "cannot create a temporary directory in $share_dir"
tmp_launcher=$(mktemp "$bin_dir/.$COMMAND.XXXXXX" 2>/dev/null) ||
    die "cannot create a temporary file in $bin_dir"

staged=$stage_dir/$MODULE
cp -- "$source" "$staged" 2>/dev/null || die "cannot copy $source to $share_dir"
chmod 644 "$staged" || die "cannot set permissions on $staged"

# 1. The program runs with this Python and reports the version in the file.
check_version "$src_version" "$py" "$staged" ||
    die "$source does not run with $py (Python $py_version): $check_msg"
new_version=$got_version

# 2. A launcher made the same way runs it too (pointed at the staged copy).
if ! launcher_text "$py" "$staged" "$new_version" >"$stage_dir/launcher" ||
    ! chmod 755 "$stage_dir/launcher"; then
    die "cannot write a test launcher in $stage_dir"
fi
check_version "$new_version" "$stage_dir/launcher" ||
    die "the launcher does not work: $check_msg"

# 3. The real launcher, written next to its final place.
if ! launcher_text "$py" "$installed" "$new_version" >"$tmp_launcher" ||
    ! chmod 755 "$tmp_launcher"; then
    die "cannot write $tmp_launcher"
fi
launcher_valid "$tmp_launcher" "$py" || die "the generated launcher is not valid code"

# Keep copies of what we replace, to put back if the final check fails.
had_installed=no
had_launcher=no
if [ -f "$installed" ]; then
    cp -p -- "$installed" "$stage_dir/previous-module" 2>/dev/null && had_installed=yes
fi
if [ -f "$launcher" ]; then
    cp -p -- "$launcher" "$stage_dir/previous-launcher" 2>/dev/null && had_launcher=yes
fi

rollback() {
    if [ "$had_installed" = yes ]; then
        mv -f -- "$stage_dir/previous-module" "$installed" 2>/dev/null
    else
        rm -f -- "$installed"
    fi
    if [ "$had_launcher" = yes ]; then
        cp -p -- "$stage_dir/previous-launcher" "$launcher" 2>/dev/null
    else
        rm -f -- "$launcher"
    fi
}

# Same directory, so each mv is an atomic rename.
mv -f -- "$staged" "$installed" || { rollback; die "cannot move the program into $installed"; }
mv -f -- "$tmp_launcher" "$launcher" || { rollback; die "cannot move the launcher into $launcher"; }
tmp_launcher=

# 4. Its bytecode, for a fast start from the first run on.
byte_compile "$py" "$installed" ||
    warn "could not byte-compile $installed: each start compiles it until Python can write $share_dir/__pycache__"

# 5. The installed command, as the user will run it.
if ! check_version "$new_version" "$launcher"; then
    rollback
    die "the installed command $launcher does not work ($check_msg); the previous state was restored"
fi
committed=yes

# --- report ---------------------------------------------------------------

if [ -z "$old_version" ]; then
    say "$COMMAND $new_version installed"
elif [ "$old_version" = "$new_version" ]; then
    say "$COMMAND $new_version installed (reinstalled over the same version)"
else
    say "$COMMAND $new_version installed (upgraded from $old_version)"
fi
say "  command: $launcher"
say "  program: $installed"
say "  python:  $py (Python $py_version)"
say "  state:   $state_dir (not touched)"

if on_path "$bin_dir"; then
    run_cmd=$COMMAND
else
    run_cmd=$launcher
    warn "$bin_dir is not on your PATH, so '$COMMAND' alone will not be found."
    warn "add this line to ~/.bashrc (then open a new shell):"
    # shellcheck disable=SC2016  # $PATH is meant literally, for ~/.bashrc
    printf '    export PATH="%s:$PATH"\n' "$bin_dir" >&2
fi

# --- refresh an installed schedule ----------------------------------------

if [ -f "$schedule" ]; then
    say "a schedule is installed ($schedule): refreshing it with '$COMMAND install-cron --reinstall'"
    if "$launcher" --state-dir "$state_dir" install-cron --reinstall </dev/null; then
        say "schedule refreshed"
    else
        warn "could not refresh the schedule automatically; it still points at the old program paths."
        warn "run this once to fix it:"
        printf '    %s install-cron\n' "$run_cmd" >&2
    fi
fi

exit 0
