#!/usr/bin/env bash
# Installs, from Debian packages, the servers the integration tests start
# themselves: a single-node SLURM (munge, slurmctld, slurmd and the client
# commands) for tests/test_slurm.py. Nothing is started or enabled here; the
# tests bring the cluster up with scripts/slurm/start.sh and down with
# scripts/slurm/stop.sh.
#
#   bash scripts/install-test-servers.sh
#
# Idempotent: exits at once when everything is installed already. Runs apt
# through sudo only when not root. Debian 12 (bookworm) / Ubuntu; SLURM 22.05
# there. Job status comes from squeue (profiles/slurm), so slurmdbd and a
# database are not needed.
set -euo pipefail

PACKAGES=(munge slurmctld slurmd slurm-client)

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-servers: apt-get not found; install ${missing[*]} (SLURM and munge) by hand" >&2
    exit 1
fi

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install-test-servers: not root and no sudo; install ${missing[*]} as root" >&2
        exit 1
    fi
    SUDO=(sudo)
fi

# Package scripts would start (or fail to start) the daemons; on a machine
# without systemd or in a container, a policy-rc.d that answers 101 stops
# that. Put one in place only if there is none, and remove only our own.
POLICY=/usr/sbin/policy-rc.d
own_policy=0
cleanup() {
    if [[ $own_policy -eq 1 ]]; then
        "${SUDO[@]}" rm -f "$POLICY"
    fi
}
trap cleanup EXIT
if [[ ! -e "$POLICY" ]]; then
    printf '#!/bin/sh\n# installed by magma scripts/install-test-servers.sh for the duration of an apt run\nexit 101\n' \
        | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 755 "$POLICY"
    own_policy=1
fi

apt_install() {
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
}

echo "install-test-servers: installing ${missing[*]}" >&2
# An old or empty package list makes the install fail; refresh it once then.
if ! apt_install; then
    "${SUDO[@]}" apt-get update -q
    apt_install
fi
