# shellcheck shell=bash
# Shared by start.sh and stop.sh (sourced, not run).
#
# Settings, all optional, read from the environment:
#   MAGMA_SLURM_DIR          state, spool, logs, pid files and slurm.conf
#                            (default /tmp/magma-slurm)
#   MAGMA_SLURM_CPUS         CPUs the node advertises (default 2 x cores, at least 4)
#   MAGMA_SLURM_MEM_MB       RealMemory of the node (default MemTotal - 10%)
#   MAGMA_SLURM_CTLD_PORT    slurmctld port (default 6817)
#   MAGMA_SLURM_SLURMD_PORT  slurmd port (default 6818)
#   MAGMA_SLURM_TIMEOUT      seconds to wait for the cluster to come up (default 60)

DIR=${MAGMA_SLURM_DIR:-/tmp/magma-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

log() { echo "magma-slurm: $*" >&2; }

# Run as root: the daemons need it. Re-run this script through sudo otherwise,
# passing the settings on (sudo may not keep the environment).
become_root() {
    if [[ "$(id -u)" -ne 0 ]]; then
        if ! command -v sudo >/dev/null 2>&1; then
            log "must run as root (no sudo found)"
            exit 1
        fi
        local vars=() v
        for v in MAGMA_SLURM_DIR MAGMA_SLURM_CPUS MAGMA_SLURM_MEM_MB MAGMA_SLURM_CTLD_PORT \
                 MAGMA_SLURM_SLURMD_PORT MAGMA_SLURM_TIMEOUT; do
            [[ -n "${!v:-}" ]] && vars+=("$v=${!v}")
        done
        exec sudo env "${vars[@]}" bash "$0" "$@"
    fi
}

# The pid in pidfile $1 (empty if there is none).
read_pid() { [[ -s "$1" ]] && tr -dc '0-9' 2>/dev/null <"$1"; true; }

# True if process $1 is alive and named $2. Daemons that exited can linger as
# zombies when PID 1 does not reap them, so a process in state Z counts as
# dead; the name check guards against a reused pid.
pid_alive() {
    local pid=$1 name=$2 state
    [[ -n "$pid" && -r /proc/$pid/stat ]] || return 1
    [[ "$(cat /proc/"$pid"/comm 2>/dev/null)" == "$name" ]] || return 1
    # field 3 of /proc/<pid>/stat, after the ")" that ends the command name
    state=$(sed 's/^.*) //' /proc/"$pid"/stat 2>/dev/null | cut -d' ' -f1)
    [[ -n "$state" && "$state" != Z ]]
}

# True if the process of pidfile $1 is alive and named $2.
alive() { pid_alive "$(read_pid "$1")" "$2"; }

# Stop the process of pidfile $1 (name $2): SIGTERM, then SIGKILL after $3 s.
stop_pid() {
    local pidfile=$1 name=$2 grace=${3:-15} pid i
    pid=$(read_pid "$pidfile")
    if pid_alive "$pid" "$name"; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < grace * 5; i++)); do
            pid_alive "$pid" "$name" || break
            sleep 0.2
        done
        if pid_alive "$pid" "$name"; then
            log "$name (pid $pid) did not stop in ${grace}s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
        fi
    fi
    rm -f "$pidfile"
}
