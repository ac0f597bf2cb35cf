#!/usr/bin/env bash
# Stops the single-node cluster of scripts/slurm/start.sh: cancels its jobs,
# then stops slurmd, slurmctld and (only if start.sh started it) munged, each
# by its pid file, never by name, and removes the /etc/slurm/slurm.conf
# symlink if it is start.sh's. Safe to run when nothing is running. Logs and
# slurm.conf stay in $MAGMA_SLURM_DIR (default /tmp/magma-slurm) for
# inspection; start.sh begins from a fresh state anyway.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/slurm/common.sh
source "$HERE/common.sh"
become_root "$@"

if alive "$DIR/slurmctld.pid" slurmctld && [[ -s "$CONF" ]]; then
    # every job on this private cluster belongs to it: cancel them all, so no
    # job step keeps running without its daemons
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
    if [[ -n "$jobs" ]]; then
        log "cancelling jobs: ${jobs//$'\n'/ }"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            [[ -z "$(timeout 5 squeue -h -t running,completing -o %A 2>/dev/null || true)" ]] && break
            sleep 0.2
        done
    fi
fi

stop_pid "$DIR/slurmd.pid" slurmd
stop_pid "$DIR/slurmctld.pid" slurmctld
if [[ -e "$DIR/munged.pid" ]]; then
    stop_pid "$DIR/munged.pid" munged
fi
if [[ -L /etc/slurm/slurm.conf && "$(readlink /etc/slurm/slurm.conf)" == "$CONF" ]]; then
    rm -f /etc/slurm/slurm.conf
fi
exit 0
