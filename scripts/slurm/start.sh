#!/usr/bin/env bash
# Brings up a single-node SLURM cluster on this machine: munged (unless one is
# running already), slurmctld and slurmd, with the node "localhost" at
# 127.0.0.1 and one partition "debug" (the default). Uses the Debian packages
# that scripts/install-test-servers.sh installs; needs root (re-runs itself
# through sudo otherwise). State, spool, logs, pid files and slurm.conf live in
# $MAGMA_SLURM_DIR (default /tmp/magma-slurm); outside it, only the munge key,
# /run/munge and a symlink /etc/slurm/slurm.conf -> $MAGMA_SLURM_DIR/slurm.conf
# are created. The symlink is needed because the job step plugin removes
# SLURM_CONF from the environment of the `srun` it starts inside each job, so
# srun only finds the default path. A /etc/slurm/slurm.conf that is not this
# symlink (a machine that is part of a real cluster) is never replaced: the
# script stops with an error instead.
#
#   bash scripts/slurm/start.sh
#   snakemake --profile profiles/slurm ...
#   bash scripts/slurm/stop.sh
#
# The only line on stdout is `export SLURM_CONF=...` (useful if your shell has
# another SLURM_CONF set); progress and errors go to stderr. Running it again while the cluster is up does nothing. Exits non-zero,
# with the reason and the end of the daemon's log, if the cluster does not
# come up within MAGMA_SLURM_TIMEOUT seconds. Settings: see common.sh.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/slurm/common.sh
source "$HERE/common.sh"
become_root "$@"

TIMEOUT=${MAGMA_SLURM_TIMEOUT:-60}
CTLD_PORT=${MAGMA_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${MAGMA_SLURM_SLURMD_PORT:-6818}
cores=$(nproc)
CPUS=${MAGMA_SLURM_CPUS:-$((cores * 2 > 4 ? cores * 2 : 4))}
total_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
MEM_MB=${MAGMA_SLURM_MEM_MB:-$((total_mb - total_mb / 10))}

fail() {
    log "FAILED: $1"
    if [[ -n "${2:-}" && -s "$2" ]]; then
        log "last lines of $2:"
        tail -n 20 "$2" >&2
    fi
    exit 1
}

# /etc/slurm/slurm.conf must be ours, or absent
ETC_CONF=/etc/slurm/slurm.conf
if [[ -e "$ETC_CONF" || -L "$ETC_CONF" ]] && [[ "$(readlink "$ETC_CONF" || true)" != "$CONF" ]]; then
    fail "$ETC_CONF exists and is not a link to $CONF: this machine has a SLURM configuration of its own; not touching it"
fi

for exe in munged munge unmunge slurmctld slurmd sbatch squeue sinfo scontrol; do
    command -v "$exe" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin
    command -v "$exe" >/dev/null 2>&1 ||
        fail "'$exe' not found; install the packages first: bash scripts/install-test-servers.sh"
done

# Up already? Then there is nothing to do.
if alive "$DIR/slurmctld.pid" slurmctld && alive "$DIR/slurmd.pid" slurmd &&
    scontrol ping 2>/dev/null | grep -q UP; then
    log "already running ($CONF)"
    ln -sfn "$CONF" "$ETC_CONF"
    echo "export SLURM_CONF=$CONF"
    exit 0
fi
# Half up, or left over from a killed run: stop what is there and start clean.
bash "$HERE/stop.sh" >/dev/null

# --- munge: slurm authenticates every message with it ---------------------
munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if munge_works; then
    log "using the munged that is running"
else
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 700 /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
    force=()
    [[ -e /run/munge/munge.socket.2 ]] && force=(--force)  # a stale socket from a dead munged
    log "starting munged"
    runuser -u munge -- munged "${force[@]}" || fail "munged did not start" /var/log/munge/munged.log
    for ((i = 0; i < 50; i++)); do
        munge_works && break
        sleep 0.2
    done
    munge_works || fail "munge does not answer" /var/log/munge/munged.log
    mkdir -p "$DIR"
    # remember that this munged is ours, so that stop.sh stops it and no other
    cp /run/munge/munged.pid "$DIR/munged.pid"
fi

# --- slurm.conf, a fresh state ---------------------------------------------
rm -rf "$DIR/state" "$DIR/spool"
mkdir -p "$DIR/state" "$DIR/spool"
chmod 755 "$DIR"
sed -e "s|@DIR@|$DIR|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEM_MB@|$MEM_MB|g" \
    -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
    "$HERE/slurm.conf.in" >"$CONF.tmp"
chmod 644 "$CONF.tmp"
mv "$CONF.tmp" "$CONF"
mkdir -p /etc/slurm
ln -sfn "$CONF" "$ETC_CONF"
: >"$DIR/slurmctld.log"
: >"$DIR/slurmd.log"

# --- the daemons (both detach and write their pid files) -------------------
log "starting slurmctld ($CPUS CPUs, ${MEM_MB} MB on node localhost)"
slurmctld -f "$CONF" -c 2>>"$DIR/slurmctld.log" || fail "slurmctld did not start" "$DIR/slurmctld.log"
started=$SECONDS
deadline=$((SECONDS + TIMEOUT))
until scontrol ping 2>/dev/null | grep -q UP; do
    # (the pid file appears a moment after the daemon forks)
    if ! alive "$DIR/slurmctld.pid" slurmctld && ((SECONDS - started > 5)); then
        fail "slurmctld exited" "$DIR/slurmctld.log"
    fi
    ((SECONDS < deadline)) || fail "slurmctld does not answer after ${TIMEOUT}s" "$DIR/slurmctld.log"
    sleep 0.2
done

log "starting slurmd"
# the hostname is not "localhost": -N names the node as slurm.conf does
slurmd -f "$CONF" -N localhost 2>>"$DIR/slurmd.log" || fail "slurmd did not start" "$DIR/slurmd.log"
started=$SECONDS
while :; do
    state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
    case "$state" in
        idle | mixed | allocated | completing) break ;;
        down | drained | draining)  # "down*" (not responding yet) is waited for
            scontrol update NodeName=localhost State=RESUME 2>/dev/null || true ;;
    esac
    if ! alive "$DIR/slurmd.pid" slurmd && ((SECONDS - started > 5)); then
        fail "slurmd exited" "$DIR/slurmd.log"
    fi
    ((SECONDS < deadline)) ||
        fail "node localhost is '$state', not idle, after ${TIMEOUT}s ($(sinfo -h -R 2>/dev/null))" "$DIR/slurmd.log"
    sleep 0.2
done

log "up: partition debug, node localhost ($state); SLURM_CONF=$CONF"
echo "export SLURM_CONF=$CONF"
