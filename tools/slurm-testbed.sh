#!/usr/bin/env bash
# slurm-testbed.sh - a real single-node Slurm cluster on this machine, for
# testing scratch-keepalive's Slurm side (sbatch, squeue, scancel, scrontab)
# as an ordinary user.  Debian 12 (slurm-wlm 22.05 + munge), run as root,
# no systemd and no cgroups needed: the daemons run in the foreground under
# setsid and are tracked by PID files.
#
# Usage (as root):
#   tools/slurm-testbed.sh start     install what is missing, write slurm.conf,
#                                    start munged, slurmctld and slurmd, and
#                                    wait until a job runs as the test user
#   tools/slurm-testbed.sh stop      cancel running jobs, stop the daemons
#                                    (by recorded PID only); pending jobs and
#                                    crontabs are kept
#   tools/slurm-testbed.sh restart   stop + start
#   tools/slurm-testbed.sh reset     stop, wipe all Slurm state (jobs,
#                                    crontabs, logs), start
#   tools/slurm-testbed.sh status    exit 0 if the controller answers
#                                    `scontrol ping`; say if scrontab is enabled
#   tools/slurm-testbed.sh selftest  checks as the test user; last line is
#                                    "N passed, N failed"; non-zero on failure
#
# Environment (all optional):
#   SLURM_TESTBED_SCRON=1         1: ScronParameters=enable; 0: scrontab off
#                                 ("scrontab: fatal: scrontab is disabled ...")
#   SLURM_TESTBED_USER=slurmtest  ordinary user (created, with a home dir)
#   SLURM_TESTBED_REALMEM=<MB>    node RealMemory; default: what `slurmd -C`
#                                 sees (below 2048, `sbatch --mem=2G` fails)
#
# `start` is idempotent: with the daemons up and slurm.conf unchanged it only
# re-checks that a job runs; a changed slurm.conf restarts slurmctld and
# slurmd (jobs and crontabs are kept).  A first `start` on a machine without
# Slurm takes about a minute: the packages, plus the `scrontab` program, which
# Debian 12 does not ship and which is built here from Debian's own source of
# the installed version.
#
# Files it touches: the Slurm/munge packages, /etc/slurm/slurm.conf,
# /usr/local/bin/scrontab, an apt deb-src list under /etc/apt/sources.list.d,
# the test user, /run/slurm-testbed (PID files, daemon output), and
# /var/lib/slurm, /var/log/slurm (Slurm's own state and logs).
set -euo pipefail

TEST_USER=${SLURM_TESTBED_USER:-slurmtest}
SCRON=${SLURM_TESTBED_SCRON:-1}
REALMEM=${SLURM_TESTBED_REALMEM:-}

CONF=/etc/slurm/slurm.conf
STATE_DIR=/run/slurm-testbed
SLURM_STATE=/var/lib/slurm
SLURM_LOGS=/var/log/slurm
SCRONTAB_BIN=/usr/local/bin/scrontab
SCRONTAB_STAMP=/usr/local/share/slurm-testbed/scrontab.version
SRC_LIST_BASE=/etc/apt/sources.list.d/slurm-testbed-src
PKGS=(slurm-wlm slurmctld slurmd slurm-client munge)
DAEMONS=(munged slurmctld slurmd)          # start order; stop goes in reverse

# Every wait is bounded (seconds).
APT_LOCK_WAIT=300
DAEMON_START_WAIT=10
DAEMON_STOP_WAIT=15
CTLD_UP_WAIT=30
FIRST_JOB_WAIT=90
CANCEL_WAIT=20
CMD_WAIT=60                                 # one Slurm client command

# ================================================================= helpers ===
log() { printf '[slurm-testbed %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'slurm-testbed: error: %s\n' "$*" >&2; exit 1; }
t_now() { echo "$EPOCHREALTIME"; }
t_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

# Run a command line as the test user, with a login shell, bounded in time.
as_user() { timeout "$CMD_WAIT" runuser -l "$TEST_USER" -c "$*"; }

# Refuse bad knobs before anything is changed or stopped.
check_knobs() {
    [[ "$SCRON" =~ ^[01]$ ]] || die "SLURM_TESTBED_SCRON must be 0 or 1, not '$SCRON'"
    [[ "$REALMEM" =~ ^[0-9]*$ ]] || die "SLURM_TESTBED_REALMEM must be a number of MB, not '$REALMEM'"
    [[ "$TEST_USER" =~ ^[a-z_][a-z0-9_-]*$ ]] || die "SLURM_TESTBED_USER '$TEST_USER' is not a valid user name"
}

scron_wanted() { [ "$SCRON" = 1 ]; }

# ================================================================= install ===
APT_UPDATED=0
apt_update() {
    [ "$APT_UPDATED" = 1 ] && return 0
    log "apt-get update"
    apt-get -o DPkg::Lock::Timeout="$APT_LOCK_WAIT" -qq update \
        || die "apt-get update failed (see the messages above)"
    APT_UPDATED=1
}

apt_install() {
    log "apt-get install --no-install-recommends $*"
    # WARNING: without a policy-rc.d that says no, the package scripts would
    # start munged and slurmctld through /etc/init.d, outside our PID files,
    # and our own start would then collide with them (busy socket and ports).
    local made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# slurm-testbed.sh: no service starts during apt-get\nexit 101\n' \
            > /usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        made_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$APT_LOCK_WAIT" \
        -y -qq --no-install-recommends install "$@" >/dev/null || rc=$?
    if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
    [ "$rc" = 0 ] || die "apt-get install $* failed (rc $rc)"
}

pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

missing_pkgs() {
    local p
    for p in "${PKGS[@]}"; do pkg_installed "$p" || echo "$p"; done
}

# Tools for building scrontab that are not on the machine yet.
missing_build_tools() {
    command -v gcc >/dev/null || echo gcc
    command -v make >/dev/null || echo make
    command -v objcopy >/dev/null || echo binutils
    command -v dpkg-source >/dev/null || echo dpkg-dev
}

# 0 when a scrontab matching the installed slurm-client is in place.
scrontab_current() {
    if [ -x /usr/bin/scrontab ]; then        # a later Debian package may ship it
        if [ -f "$SCRONTAB_STAMP" ]; then rm -f "$SCRONTAB_BIN" "$SCRONTAB_STAMP"; fi
        return 0
    fi
    local ver
    ver=$(dpkg-query -W -f='${Version}' slurm-client 2>/dev/null) || return 1
    [ -x "$SCRONTAB_BIN" ] && [ "$(cat "$SCRONTAB_STAMP" 2>/dev/null)" = "$ver" ]
}

# apt-get source needs deb-src entries.  Derive them from the machine's own
# Debian entries (debian.sources and/or sources.list) so that the same mirror
# is used.  Sets SRC_ADDED=1 when a new list was written (apt-get update needed).
# WARNING: functions here report through globals, not through a status tested
# with && or ||: bash ignores `set -e` inside a function called that way.
SRC_ADDED=0
add_deb_src() {
    local f wrote=0
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        if grep -Eq '^[[:space:]]*(deb-src[[:space:]]|Types:.*deb-src)' "$f"; then
            return 0                         # deb-src already configured
        fi
    done
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        sed -E 's/^Types:.*\<deb\>.*/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
            > "$SRC_LIST_BASE.sources"
        wrote=1
    fi
    if [ -f /etc/apt/sources.list ] && grep -Eq '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list; then
        sed -En 's/^[[:space:]]*deb[[:space:]]+/deb-src /p' /etc/apt/sources.list > "$SRC_LIST_BASE.list"
        wrote=1
    fi
    [ "$wrote" = 1 ] || die "no Debian apt source found to derive a deb-src entry from; add a deb-src line for the Debian archive by hand"
    log "added deb-src entries in $SRC_LIST_BASE.*"
    SRC_ADDED=1
}

# Debian 12's slurm-client lacks /usr/bin/scrontab (it is missing from
# debian/slurm-client.install) although slurmctld supports scrontab.  Build
# that one program from the Debian source of exactly the installed version and
# link it against the installed libslurmfull.so.  The compile steps follow
# upstream's src/scrontab/Makefile.am.
build_scrontab() {
    local ver libdir work t0
    t0=$(t_now)
    ver=$(dpkg-query -W -f='${Version}' slurm-client)
    libdir=$(dirname "$(dpkg -L slurm-client slurm-wlm-basic-plugins 2>/dev/null | grep -m1 '/libslurmfull\.so$')")
    [ -f "$libdir/libslurmfull.so" ] || die "libslurmfull.so not found; is slurm-client installed?"
    log "building scrontab from the Debian source of slurm-wlm $ver"
    work=$(mktemp -d /tmp/slurm-testbed-build.XXXXXX)
    chmod 0755 "$work"                       # so apt's _apt user can write the download
    if ! (cd "$work" && timeout 600 apt-get -qq source "slurm-wlm=$ver" >source.log 2>&1); then
        if [ "$APT_UPDATED" = 0 ]; then      # stale or missing source indexes
            apt_update
            (cd "$work" && timeout 600 apt-get -qq source "slurm-wlm=$ver" >source.log 2>&1) \
                || { tail -20 "$work/source.log" >&2; die "apt-get source slurm-wlm=$ver failed"; }
        else
            tail -20 "$work/source.log" >&2; die "apt-get source slurm-wlm=$ver failed"
        fi
    fi
    # Run as a plain command (not under || or if), so that set -e stops the
    # subshell at the first failing step.
    (
        trap 'echo "slurm-testbed: error: building scrontab failed (sources kept in $work)" >&2' ERR
        S=$(find "$work" -maxdepth 1 -type d -name 'slurm-wlm-*' | head -n1)
        [ -n "$S" ] || { echo "unpacked source not found in $work" >&2; exit 1; }
        mkdir "$work/build"
        cd "$work/build"
        # configure runs only to produce config.h (about 30 s)
        timeout 600 "$S/configure" --prefix=/usr --sysconfdir=/etc/slurm \
            --libdir="$(dirname "$libdir")" --disable-debug --without-rpath \
            --disable-dependency-tracking >configure.log 2>&1 \
            || { tail -30 configure.log >&2; exit 1; }
        mkdir sc
        cd sc
        for f in env opt parse scrontab; do
            gcc -O2 -DHAVE_CONFIG_H -I.. -I../slurm -I"$S" -I"$S/slurm" \
                -c "$S/src/scrontab/$f.c" -o "$f.o"
        done
        for f in default_crontab usage; do   # text files linked in as data
            (cd "$S/src/scrontab" && ld -r -o "$work/build/sc/$f.bino" -z noexecstack --format=binary "$f.txt")
            objcopy --rename-section .data=.rodata,alloc,load,readonly,data,contents "$f.bino"
        done
        gcc -o scrontab env.o opt.o parse.o scrontab.o default_crontab.bino usage.bino \
            -L"$libdir" -lslurmfull -Wl,-rpath,"$libdir" -Wl,--export-dynamic
        install -m 0755 scrontab "$SCRONTAB_BIN"
    )
    rm -rf "$work"
    mkdir -p "$(dirname "$SCRONTAB_STAMP")"
    echo "$ver" > "$SCRONTAB_STAMP"
    log "installed $SCRONTAB_BIN in $(t_since "$t0") s"
}

# Install the packages and scrontab if missing, with at most one apt-get update.
ensure_installed() {
    local need=() need_update=0
    mapfile -t need < <(missing_pkgs)
    [ "${#need[@]}" = 0 ] || need_update=1
    if ! scrontab_current; then
        add_deb_src
        [ "$SRC_ADDED" = 0 ] || need_update=1
        mapfile -t -O "${#need[@]}" need < <(missing_build_tools)
    fi
    [ "$need_update" = 0 ] || apt_update
    [ "${#need[@]}" = 0 ] || apt_install "${need[@]}"
    if ! scrontab_current; then build_scrontab; fi
}

# ================================================================== config ===
prepare_system() {
    # The munge postinst normally creates the key.
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    # Without systemd there is no RuntimeDirectory=, so make the dirs here.
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    install -d -o slurm -g slurm -m 0755 "$SLURM_STATE" "$SLURM_STATE/slurmctld" "$SLURM_LOGS"
    install -d -o root -g root -m 0755 "$SLURM_STATE/slurmd" /run/slurm "$STATE_DIR"
    if ! id "$TEST_USER" >/dev/null 2>&1; then
        useradd -m -s /bin/bash "$TEST_USER"
        log "created user $TEST_USER"
    fi
}

real_memory() {
    if [ -n "$REALMEM" ]; then echo "$REALMEM"; return; fi
    # Above what slurmd sees, slurmd would drain the node.
    local mem
    mem=$(timeout 30 slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1) || true
    [ -n "$mem" ] || mem=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
    echo "$mem"
}

render_conf() {
    local host cpus mem scron_line=""
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(real_memory)
    [[ "$mem" =~ ^[0-9]+$ ]] || die "could not work out the node's RealMemory (got '$mem')"
    if scron_wanted; then scron_line=$'\nScronParameters=enable'; fi
    cat <<EOF
# generated by tools/slurm-testbed.sh: one node on localhost, no systemd/cgroups
ClusterName=testbed
SlurmctldHost=${host}(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$SLURM_STATE/slurmctld
SlurmdSpoolDir=$SLURM_STATE/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$SLURM_LOGS/slurmctld.log
SlurmdLogFile=$SLURM_LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
SchedulerType=sched/backfill
ReturnToService=2${scron_line}
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=general Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=debug Nodes=ALL Default=NO MaxTime=INFINITE State=UP
EOF
}

# Write slurm.conf; sets CONF_CHANGED=1 if it differed.
CONF_CHANGED=0
write_conf() {
    local tmp
    tmp=$(mktemp)
    render_conf > "$tmp"
    if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then rm -f "$tmp"; return 0; fi
    install -D -m 0644 "$tmp" "$CONF"
    rm -f "$tmp"
    CONF_CHANGED=1
    log "wrote $CONF (scrontab $(scron_wanted && echo enabled || echo disabled))"
}

conf_scron_enabled() { [ -f "$CONF" ] && grep -q '^ScronParameters=.*enable' "$CONF"; }

# ================================================================= daemons ===
pidfile() { echo "$STATE_DIR/$1.pid"; }

# alive NAME: the recorded PID exists and is still that daemon (not a reused PID).
alive() {
    local pf pid
    pf=$(pidfile "$1")
    [ -f "$pf" ] || return 1
    pid=$(cat "$pf")
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

start_daemon() {
    local name=$1 pid i
    shift
    if alive "$name"; then return 0; fi
    # The subshell closes inherited descriptors above 2, so that a caller
    # reading our output through a pipe is not kept waiting by the daemon,
    # then execs: setsid (its own session, safe from a caller's process-group
    # kill; not a group leader here, so it execs instead of forking) and the
    # daemon in foreground mode.  $! is therefore the daemon's own PID.
    (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            if [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
        done
        exec setsid "$@" </dev/null >"$STATE_DIR/$name.out" 2>&1
    ) &
    pid=$!
    echo "$pid" > "$(pidfile "$name")"
    for ((i = 0; i < DAEMON_START_WAIT * 10; i++)); do
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] && break
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -20 "$STATE_DIR/$name.out" >&2 || true
            die "$name exited at start (output in $STATE_DIR/$name.out)"
        fi
        sleep 0.1
    done
    alive "$name" || die "$name did not start within ${DAEMON_START_WAIT} s (see $STATE_DIR/$name.out)"
    log "started $name (pid $pid)"
}

stop_daemon() {
    local name=$1 pf pid i
    pf=$(pidfile "$name")
    if ! alive "$name"; then rm -f "$pf"; return 0; fi
    pid=$(cat "$pf")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < DAEMON_STOP_WAIT * 10; i++)); do
        [ -d "/proc/$pid" ] || break
        sleep 0.1
    done
    if alive "$name"; then
        log "$name (pid $pid) still running ${DAEMON_STOP_WAIT} s after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$pf"
    log "stopped $name (pid $pid)"
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munged() {
    alive munged && return 0
    if munge_works; then
        log "a munged not started by this script is already answering; using it"
        return 0
    fi
    # munged must run as user munge; setpriv execs, so the PID is kept
    # (runuser and su would fork).
    start_daemon munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F
    local i
    for ((i = 0; i < DAEMON_START_WAIT * 10; i++)); do munge_works && return 0; sleep 0.1; done
    die "munged does not answer (see $STATE_DIR/munged.out)"
}

ctld_up() { timeout 15 scontrol ping 2>/dev/null | grep -q 'is UP'; }

# Ready means: the controller answers, and a real job runs as the test user.
# (sinfo is no proof: after a restart it shows "idle" from the saved node
# state before slurmd has registered.)
wait_ready() {
    local deadline=$((SECONDS + CTLD_UP_WAIT))
    until ctld_up; do
        [ "$SECONDS" -lt "$deadline" ] || die "slurmctld does not answer 'scontrol ping' after ${CTLD_UP_WAIT} s (see $SLURM_LOGS/slurmctld.log)"
        alive slurmctld || die "slurmctld exited (see $STATE_DIR/slurmctld.out and $SLURM_LOGS/slurmctld.log)"
        sleep 0.2
    done
    if ! timeout "$((FIRST_JOB_WAIT + 10))" runuser -l "$TEST_USER" -c \
            "timeout $FIRST_JOB_WAIT srun --quiet -N1 -n1 -t 1 -J testbed-ready /bin/true"; then
        sinfo -N -l >&2 || true
        die "a test job did not run as $TEST_USER within ${FIRST_JOB_WAIT} s (see $SLURM_LOGS/*.log)"
    fi
}

# End every RUNNING/CONFIGURING job.  WARNING: never scancel a crontab job:
# scancel (also with --signal or --batch) turns the user's crontab lines into
# "#DISABLED:" comments.  `scontrol requeue` ends the run and keeps the
# crontab; the job waits, PENDING, for its next cron time.
end_running_jobs() {
    local id
    for id in $(timeout 15 squeue -h -t RUNNING,CONFIGURING -o %i 2>/dev/null | sort -u); do
        if timeout 15 scontrol -o show job "$id" 2>/dev/null | grep -q ' CronJob=Yes'; then
            timeout 15 scontrol requeue "$id" 2>/dev/null || true
        else
            timeout 15 scancel "$id" 2>/dev/null || true
        fi
    done
}

# Stop slurmd and slurmctld without leaving orphaned or ghost jobs behind.
stop_slurm() {
    if alive slurmctld && ctld_up; then
        # Partitions DOWN so that nothing new starts (not kept across a
        # restart: they come back UP from slurm.conf), then end running jobs
        # until none is left, so no job outlives slurmd and no RUNNING ghost
        # job is saved.  Pending jobs and crontabs are kept.
        local p ids="" deadline=$((SECONDS + CANCEL_WAIT))
        for p in $(timeout 15 sinfo -h -o %R 2>/dev/null | sort -u); do
            timeout 15 scontrol update PartitionName="$p" State=DOWN 2>/dev/null || true
        done
        while [ "$SECONDS" -lt "$deadline" ]; do
            ids=$(timeout 15 squeue -h -t RUNNING,CONFIGURING,COMPLETING -o %i 2>/dev/null | sort -u) || true
            [ -n "$ids" ] || break
            end_running_jobs
            sleep 0.2
        done
        [ -z "$ids" ] || log "WARNING: jobs still running at stop: ${ids//$'\n'/ }"
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
}

# ================================================================ commands ===
require_root() { [ "$(id -u)" = 0 ] || die "run this as root"; }

cmd_start() {
    local t0
    t0=$(t_now)
    check_knobs
    ensure_installed
    prepare_system
    write_conf
    if [ "$CONF_CHANGED" = 1 ] && { alive slurmctld || alive slurmd; }; then
        log "slurm.conf changed: restarting slurmctld and slurmd"
        stop_slurm
    fi
    start_munged
    start_daemon slurmctld /usr/sbin/slurmctld -D
    start_daemon slurmd /usr/sbin/slurmd -D
    wait_ready
    echo "slurm-testbed: up on $(hostname -s) (partitions general*, debug; scrontab $(conf_scron_enabled && echo enabled || echo disabled); user $TEST_USER) in $(t_since "$t0") s"
}

cmd_stop() {
    if ! command -v scontrol >/dev/null; then log "Slurm is not installed; nothing to stop"; return 0; fi
    stop_slurm
    stop_daemon munged
    echo "slurm-testbed: stopped"
}

cmd_reset() {
    cmd_stop
    rm -rf "${SLURM_STATE:?}/slurmctld/"* "${SLURM_STATE:?}/slurmd/"*
    if [ -d "$SLURM_LOGS" ]; then : > "$SLURM_LOGS/slurmctld.log"; : > "$SLURM_LOGS/slurmd.log"; fi
    log "wiped Slurm state (jobs, crontabs) and logs"
    cmd_start
}

cmd_status() {
    local d
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then echo "$d: running (pid $(cat "$(pidfile "$d")"))"
        else echo "$d: not running (no live PID recorded in $STATE_DIR)"; fi
    done
    if ! command -v scontrol >/dev/null; then
        echo "controller: Slurm is not installed"
        return 1
    fi
    if ! ctld_up; then
        echo "controller: not answering 'scontrol ping'"
        return 1
    fi
    echo "controller: $(timeout 15 scontrol ping 2>&1 | head -n1)"
    # What the running controller uses, not just what the file says.
    local scron
    scron=$(timeout 15 scontrol show config 2>/dev/null | sed -n 's/^ScronParameters *= *//p')
    case "$scron" in
        *enable*) echo "scrontab: enabled (ScronParameters = $scron)" ;;
        *)        echo "scrontab: disabled (ScronParameters = ${scron:-(null)})" ;;
    esac
    timeout 15 sinfo || true
}

cmd_selftest() {
    local pass=0 fail=0 out err rc home jobid q state deadline
    # check DESCRIPTION COMMAND...: one PASS/FAIL line from COMMAND's status
    check() {
        local what=$1
        shift
        if "$@"; then echo "PASS: $what"; pass=$((pass + 1))
        else echo "FAIL: $what"; fail=$((fail + 1)); fi
    }
    finish() { echo "$pass passed, $fail failed"; [ "$fail" = 0 ]; }

    if ! id "$TEST_USER" >/dev/null 2>&1 || ! command -v scontrol >/dev/null || ! ctld_up; then
        check "cluster is up (run: $0 start)" false
        finish; return
    fi
    check "controller answers scontrol ping" true
    home=$(getent passwd "$TEST_USER" | cut -d: -f6)
    as_user "scancel --name=kt-selftest; rm -f ~/selftest-ran.txt ~/selftest-cron.txt" >/dev/null 2>&1 || true

    # 1. a tiny batch job runs as the user and completes
    jobid=$(as_user "sbatch --parsable -p debug -t 1 -J kt-selftest-run -o /dev/null --wrap='id -un > ~/selftest-ran.txt'" 2>&1) && rc=0 || rc=$?
    check "sbatch accepts a job: '$jobid' (rc $rc)" [ "$rc" = 0 ]
    if [ "$rc" = 0 ]; then
        state="" deadline=$((SECONDS + 60))
        while [ "$SECONDS" -lt "$deadline" ]; do
            state=$(timeout 15 scontrol show job "$jobid" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
            case "$state" in PENDING|CONFIGURING|RUNNING|COMPLETING|"") sleep 0.2 ;; *) break ;; esac
        done
        check "job $jobid ends COMPLETED: JobState=$state" [ "$state" = COMPLETED ]
        out=$(cat "$home/selftest-ran.txt" 2>/dev/null || true)
        check "job ran as the user: id -un = '$out'" [ "$out" = "$TEST_USER" ]
    fi

    # 2. a future job with the tool's resources, seen by squeue --me, cancelled
    jobid=$(as_user "sbatch --parsable --begin=now+14days --job-name=kt-selftest --dependency=singleton --partition=general --cpus-per-task=1 --mem=2G --time=2:00:00 --wrap=true" 2>&1) && rc=0 || rc=$?
    check "sbatch --begin=now+14days --mem=2G --time=2:00:00: '$jobid' (rc $rc)" [ "$rc" = 0 ]
    if [ "$rc" = 0 ]; then
        q=$(as_user "squeue --me --name=kt-selftest --states=PENDING --noheader --format='%i %j %T'" 2>&1) || true
        check "squeue --me lists it: '$q'" [ "$q" = "$jobid kt-selftest PENDING" ]
        check "scancel $jobid" as_user "scancel $jobid"
    fi

    # 3. scrontab: install, list, remove (or the exact refusal when disabled).
    #    stdout and stderr are captured apart: merged, their order can change.
    if conf_scron_enabled; then
        as_user "printf '#SCRON --partition=general --time=00:05:00 --job-name=kt-selftest-scron\n30 3 * * 0 /bin/true\n' > ~/selftest-cron.txt"
        check "scrontab FILE installs a crontab" as_user "scrontab ~/selftest-cron.txt"
        out=$(as_user "scrontab -l" 2>/dev/null) || true
        check "scrontab -l lists the entry" grep -qx '30 3 \* \* 0 /bin/true' <<<"$out"
        q=$(as_user "squeue --me --name=kt-selftest-scron --noheader --format='%j %T'" 2>&1) || true
        check "the crontab job is pending in squeue: '$q'" [ "$q" = "kt-selftest-scron PENDING" ]
        check "scrontab -r" as_user "scrontab -r"
        out=$(as_user "scrontab -l" 2>/dev/null) && rc=0 || rc=$?
        check "scrontab -l after -r: '$out' (rc $rc)" [ "$rc:$out" = "1:no crontab for $TEST_USER" ]
        as_user "rm -f ~/selftest-cron.txt" || true
    else
        err=$(as_user "scrontab -l" 2>&1 >/dev/null) && rc=0 || rc=$?
        check "scrontab is refused as disabled: '$err' (rc $rc)" \
            [ "$rc:$err" = "1:scrontab: fatal: scrontab is disabled on this cluster" ]
    fi
    finish
}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

# The daemons keep the working directory they start in, and every job step inherits it:
# start them from / so a deleted checkout never becomes a job's missing cwd.
case "${1:-}" in start|restart|reset) cd / ;; esac

case "${1:-}" in
    start)    require_root; cmd_start ;;
    stop)     require_root; cmd_stop ;;
    restart)  require_root; check_knobs; cmd_stop; cmd_start ;;
    reset)    require_root; check_knobs; cmd_reset ;;
    status)   require_root; cmd_status ;;
    selftest) require_root; cmd_selftest ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
