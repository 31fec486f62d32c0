#!/usr/bin/env bash
# Stop the single-node Slurm cluster that slurm/start_local_cluster.sh started under DIR.
#
#   slurm/stop_local_cluster.sh [DIR]      # DIR defaults to /tmp/diffquant-slurm
#
# Only processes recorded in DIR's pid files are stopped (slurmd, slurmctld, and munged when
# the start script had to start it). A cluster that was already running before the start
# script (no pid files under DIR) is left alone. Jobs still queued/running on our cluster
# are cancelled first. Config and logs stay under DIR for inspection.
set -uo pipefail

DIR="${1:-${DIFFQUANT_SLURM_DIR:-/tmp/diffquant-slurm}}"
log() { echo "[stop_local_cluster] $*" >&2; }

if [[ ! -d "$DIR" ]]; then
    log "nothing to stop: $DIR does not exist"
    exit 0
fi

# read_pid PIDFILE NAME: print the pid when it is alive and is the expected program.
read_pid() {
    local pid
    [[ -s "$1" ]] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [[ -n "$pid" && -r "/proc/$pid/comm" && "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]] || return 1
    echo "$pid"
}

# stop_pid PID NAME: TERM, wait up to 10 s, then KILL.
stop_pid() {
    local pid=$1 name=$2
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 100); do
        [[ -d "/proc/$pid" ]] || {
            log "stopped $name (pid $pid)"
            return 0
        }
        sleep 0.1
    done
    log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

stopped=0
ctld_pid=$(read_pid "$DIR/slurmctld.pid" slurmctld || true)

# Cancel jobs so no slurmstepd / job processes outlive the daemons.
if [[ -n "$ctld_pid" && -f "$DIR/slurm.conf" ]] && command -v scancel >/dev/null 2>&1; then
    jobs=$(SLURM_CONF="$DIR/slurm.conf" timeout 10 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [[ -n "${jobs// /}" ]]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        SLURM_CONF="$DIR/slurm.conf" timeout 10 scancel $jobs 2>/dev/null || true
        for _ in $(seq 1 30); do
            [[ -z "$(SLURM_CONF="$DIR/slurm.conf" timeout 5 squeue -h -t R,CG -o %A 2>/dev/null)" ]] && break
            sleep 0.5
        done
    fi
fi

if pid=$(read_pid "$DIR/slurmd.pid" slurmd); then
    stop_pid "$pid" slurmd
    stopped=1
fi
if [[ -n "$ctld_pid" ]]; then
    stop_pid "$ctld_pid" slurmctld
    stopped=1
fi
if pid=$(read_pid "$DIR/munged.pid" munged); then
    stop_pid "$pid" munged
    stopped=1
fi
rm -f "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munged.pid"

if ((stopped)); then
    log "local cluster under $DIR stopped"
else
    log "nothing of ours was running under $DIR"
fi
exit 0
