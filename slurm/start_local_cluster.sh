#!/usr/bin/env bash
# Start a real single-node Slurm cluster on this machine, for tests and CI.
#
#   eval "$(slurm/start_local_cluster.sh [DIR])"      # DIR defaults to /tmp/diffquant-slurm
#
# * Idempotent: when `sinfo` already reports a usable node (a cluster that was already
#   there, or the one a previous call started), nothing is started.
# * Otherwise (needs root): installs munge + slurmctld + slurmd + slurm-client with apt
#   when they are missing, starts munged, writes DIR/slurm.conf (node = `hostname -s`,
#   CPUs = `nproc` without OMP_NUM_THREADS, one default partition `debug`), starts slurmctld then slurmd and waits
#   until the node is idle.
# * All Slurm state (config, state, spool, pid and log files) lives under DIR. munged is
#   the system one (/run/munge, key /etc/munge/munge.key).
# * Progress goes to stderr. The last (and only) line on stdout is
#   `export SLURM_CONF=DIR/slurm.conf`, so callers can `eval` the output.
#   For a cluster that was already there and uses the default config, it is a comment.
# * Stop what this started with slurm/stop_local_cluster.sh [DIR].
#
# Environment knobs: DIFFQUANT_SLURM_PARTITION (default debug),
# DIFFQUANT_SLURM_TIMEOUT_S (seconds to wait for the node, default 60).
set -euo pipefail

DIR="${1:-${DIFFQUANT_SLURM_DIR:-/tmp/diffquant-slurm}}"
PARTITION="${DIFFQUANT_SLURM_PARTITION:-debug}"
WAIT_S="${DIFFQUANT_SLURM_TIMEOUT_S:-60}"
T0=$(date +%s)

log() { echo "[start_local_cluster] $*" >&2; }
die() {
    echo "[start_local_cluster] ERROR: $*" >&2
    exit 1
}
elapsed() { echo "$(($(date +%s) - T0))s"; }

# Usable node states in `sinfo -h -o %T` (a trailing * means "not responding").
usable_states() { grep -Eqx '(idle|mixed|allocated|completing)'; }

# cluster_answers [CONF]: 0 when sinfo (with SLURM_CONF=CONF, or the caller's env) lists a usable node.
cluster_answers() {
    command -v sinfo >/dev/null 2>&1 || return 1
    local out
    if [[ -n "${1:-}" ]]; then
        out=$(SLURM_CONF="$1" timeout 20 sinfo -h -o %T 2>/dev/null) || return 1
    else
        out=$(timeout 20 sinfo -h -o %T 2>/dev/null) || return 1
    fi
    usable_states <<<"$out"
}

pid_alive() { # pid_alive PIDFILE NAME
    local pid
    [[ -s "$1" ]] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [[ -n "$pid" ]] && [[ -r "/proc/$pid/comm" ]] && [[ "$(cat "/proc/$pid/comm")" == "$2" ]]
}

print_export() { printf 'export SLURM_CONF=%q\n' "$1"; }

# ---------------------------------------------------------------------------------------
# 1. Already running?
DIR="$(realpath -m -- "$DIR")"
CONF="$DIR/slurm.conf"

if pid_alive "$DIR/slurmctld.pid" slurmctld || pid_alive "$DIR/slurmd.pid" slurmd; then
    if [[ -f "$CONF" ]] && pid_alive "$DIR/slurmctld.pid" slurmctld && pid_alive "$DIR/slurmd.pid" slurmd; then
        # Ours is running: give a node that is still registering a few seconds.
        for _ in $(seq 1 20); do
            if cluster_answers "$CONF"; then
                log "cluster under $DIR is already running ($(elapsed))"
                print_export "$CONF"
                exit 0
            fi
            sleep 0.5
        done
        log "daemons under $DIR are alive but the node is not usable; restarting them"
    else
        log "only part of the cluster under $DIR is running; restarting it"
    fi
    [[ $EUID -eq 0 ]] || die "the cluster under $DIR needs a restart, which needs root"
    bash "$(dirname "${BASH_SOURCE[0]}")/stop_local_cluster.sh" "$DIR" >&2 || true
fi

# (Not when SLURM_CONF is our own, dead, config: sinfo needs ~10 s to give up on it.)
if [[ "$(realpath -m -- "${SLURM_CONF:-/nonexistent}")" != "$CONF" ]] && cluster_answers ""; then
    if [[ -n "${SLURM_CONF:-}" ]]; then
        log "an existing Slurm cluster answers (SLURM_CONF=$SLURM_CONF); nothing started"
        print_export "$SLURM_CONF"
    else
        log "an existing Slurm cluster answers (default config); nothing started"
        echo "# existing Slurm cluster (default configuration); nothing to export"
    fi
    exit 0
fi

# ---------------------------------------------------------------------------------------
# 2. Start our own. Needs root (apt, munged, slurmd launching jobs).
if [[ $EUID -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        log "re-running as root through sudo"
        exec sudo -n -E bash "${BASH_SOURCE[0]}" "$DIR"
    fi
    die "no Slurm cluster answers and starting one needs root (run this script as root or with sudo)"
fi

mkdir -p "$DIR/log" || die "cannot create $DIR"
APT_LOG="$DIR/log/apt.log"

# Slurm refuses to run a node when its state files belong to a previous, dead cluster
# (they are ours anyway): start from a clean state and spool.
if pgrep -x slurmctld >/dev/null 2>&1 || pgrep -x slurmd >/dev/null 2>&1; then
    die "a slurmctld/slurmd that this script did not start is running (pids: $(pgrep -x 'slurmctld|slurmd' | tr '\n' ' '))," \
        "but sinfo does not report a usable node with SLURM_CONF=${SLURM_CONF:-<default>}." \
        "Stop it, or point SLURM_CONF at its config."
fi

# 2a. Packages.
need_pkgs=()
command -v munged >/dev/null 2>&1 || need_pkgs+=(munge)
command -v slurmctld >/dev/null 2>&1 || need_pkgs+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || need_pkgs+=(slurmd)
command -v sbatch >/dev/null 2>&1 || need_pkgs+=(slurm-client)
if ((${#need_pkgs[@]})); then
    command -v apt-get >/dev/null 2>&1 || die "missing ${need_pkgs[*]} and no apt-get to install them"
    log "installing ${need_pkgs[*]} with apt (log: $APT_LOG) ..."
    # Keep package scripts from starting services (there is no init system to manage them).
    made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt_ok=1
    {
        apt-get update -q &&
            apt-get install -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
                munge slurmctld slurmd slurm-client
    } >"$APT_LOG" 2>&1 || apt_ok=0
    ((made_policy)) && rm -f /usr/sbin/policy-rc.d
    if ((!apt_ok)); then
        tail -n 30 "$APT_LOG" >&2
        die "apt-get failed installing munge slurmctld slurmd slurm-client (full log: $APT_LOG)"
    fi
    log "packages installed ($(elapsed))"
fi
for b in munged munge unmunge slurmctld slurmd sinfo sbatch; do
    command -v "$b" >/dev/null 2>&1 || die "$b not found on PATH after installing"
done

# 2b. munge (the system daemon; reused when it already works).
if timeout 10 munge -n 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; then
    log "munged already running; reusing it"
else
    id munge >/dev/null 2>&1 || die "user 'munge' does not exist (is the munge package installed correctly?)"
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key --force >&2
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    rm -f /run/munge/munged.pid
    su -s /bin/sh munge -c /usr/sbin/munged >&2 || die "munged failed to start (see /var/log/munge/munged.log)"
    for _ in $(seq 1 50); do
        [[ -s /run/munge/munged.pid ]] && break
        sleep 0.1
    done
    cp /run/munge/munged.pid "$DIR/munged.pid" 2>/dev/null || true
    timeout 10 munge -n 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1 ||
        die "munge does not work after starting munged: $(tail -n 5 /var/log/munge/munged.log 2>/dev/null)"
    log "munged started (pid $(cat "$DIR/munged.pid" 2>/dev/null || echo '?'))"
fi

# 2c. Config. Everything under DIR.
NODE="$(hostname -s)"
# GNU nproc honours OMP_NUM_THREADS / OMP_THREAD_LIMIT: a cluster started from a one-thread test
# run would get a 1-CPU node and run one job at a time. Count the CPUs this process may use.
CPUS="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
MEM_MB=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
# A bit under the machine's memory (slurmd drains a node whose RealMemory is above what it finds).
REAL_MB=$((MEM_MB - (MEM_MB / 20 > 512 ? MEM_MB / 20 : 512)))
((REAL_MB > 256)) || REAL_MB=256
SLURM_USER=root
id slurm >/dev/null 2>&1 && SLURM_USER=slurm

rm -rf "$DIR/state" "$DIR/spool"
for f in slurmctld.log slurmd.log; do
    [[ -f "$DIR/log/$f" ]] && mv -f "$DIR/log/$f" "$DIR/log/$f.old"
done
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
chown "$SLURM_USER" "$DIR/state" "$DIR/log"
chmod 755 "$DIR" "$DIR/log"

# Job scripts are executed from the spool dir: make sure DIR is not on a noexec mount.
printf '#!/bin/sh\nexit 0\n' >"$DIR/spool/.exec_check"
chmod 755 "$DIR/spool/.exec_check"
"$DIR/spool/.exec_check" 2>/dev/null ||
    die "$DIR is on a noexec filesystem; Slurm runs job scripts from its spool dir. Pass another DIR."
rm -f "$DIR/spool/.exec_check"

cat >"$CONF" <<EOF
# Generated by slurm/start_local_cluster.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ). Single-node test cluster.
ClusterName=diffquant-ci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=${SLURM_USER}
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
InactiveLimit=0
KillWait=10
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/slurmctld.pid
SlurmdPidFile=${DIR}/slurmd.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${REAL_MB} State=UNKNOWN
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
chmod 644 "$CONF"
log "wrote $CONF (node $NODE, CPUs=$CPUS, RealMemory=${REAL_MB}MB, partition $PARTITION)"

# 2d. Daemons.
show_logs() {
    for f in "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log"; do
        [[ -f "$f" ]] && {
            echo "----- tail $f" >&2
            tail -n 25 "$f" >&2
        }
    done
    return 0
}

export SLURM_CONF="$CONF"
rm -f "$DIR/slurmctld.pid" "$DIR/slurmd.pid"
slurmctld -f "$CONF" >&2 || {
    show_logs
    die "slurmctld failed to start"
}
for _ in $(seq 1 50); do
    timeout 5 scontrol ping >/dev/null 2>&1 && break
    sleep 0.2
done
slurmd -f "$CONF" -N "$NODE" >&2 || {
    show_logs
    die "slurmd failed to start"
}

# 2e. Wait for an idle node.
deadline=$(($(date +%s) + WAIT_S))
state=""
while :; do
    state=$(timeout 10 sinfo -h -o %T 2>/dev/null | head -n1 || true)
    if usable_states <<<"$state"; then
        break
    fi
    if [[ "$state" =~ ^(drain|fail) ]] || (($(date +%s) >= deadline)); then
        echo "----- sinfo -R" >&2
        timeout 10 sinfo -R >&2 || true
        show_logs
        pid_alive "$DIR/slurmctld.pid" slurmctld || log "slurmctld is not running"
        pid_alive "$DIR/slurmd.pid" slurmd || log "slurmd is not running"
        die "node did not become idle within ${WAIT_S}s (last state: '${state:-no answer}'); logs under $DIR/log"
    fi
    sleep 0.5
done
log "cluster up: partition $PARTITION, node $NODE $state ($(elapsed))"
print_export "$CONF"
