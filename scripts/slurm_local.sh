#!/usr/bin/env bash
# A one-node SLURM cluster on 127.0.0.1, to try (and test) `snakemake --profile profiles/slurm-local`.
#
#   sudo bash scripts/slurm_local.sh start     # installs slurm-wlm + munge (apt) if needed, starts the daemons
#   bash scripts/slurm_local.sh status
#   sudo bash scripts/slurm_local.sh stop
#
# Needs root (the daemons run as root; the config goes to /etc/slurm/slurm.conf, where the Snakemake SLURM
# executor's job steps find it: they drop SLURM_CONF). State, logs and munge's own key and socket live under
# $BITSWEEP_SLURM_DIR (default /tmp/bitsweep-slurm). Settings from a probe on a 2-core Debian 12 machine:
# linuxproc process tracking and no task plugin (no cgroups needed), no accounting (so the profile asks squeue,
# not sacct, for job states), MinJobAge well above the status-check interval.
set -euo pipefail

STATE=${BITSWEEP_SLURM_DIR:-/tmp/bitsweep-slurm}
CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)

log() { printf '[slurm-local] %s\n' "$*" >&2; }

install() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then return; fi
    log "apt-get install slurm-wlm munge"
    apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null && apt-get install -y -qq slurm-wlm munge >/dev/null
    }
}

write_config() {
    local cpus mem
    cpus=$(nproc)
    mem=$(free -m | awk '/^Mem:/ {print int($2 * 0.9)}')
    mkdir -p "$(dirname "$CONF")"
    cat >"$CONF" <<EOF
# Written by bitsweep's scripts/slurm_local.sh: a one-node cluster on 127.0.0.1.
ClusterName=bitsweep
SlurmctldHost=${HOST}(127.0.0.1)
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${STATE}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
ReturnToService=2
StateSaveLocation=${STATE}/state
SlurmdSpoolDir=${STATE}/spool
SlurmctldPidFile=${STATE}/slurmctld.pid
SlurmdPidFile=${STATE}/slurmd.pid
SlurmctldLogFile=${STATE}/log/slurmctld.log
SlurmdLogFile=${STATE}/log/slurmd.log
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    [[ $(id -u) == 0 ]] || { log "needs root"; exit 1; }
    install
    stop_daemons 2>/dev/null || true
    mkdir -p "$STATE"/{munge,state,spool,log}
    chmod 700 "$STATE" "$STATE/munge"
    if [[ ! -f $STATE/munge/munge.key ]]; then
        dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$STATE/munge/munge.key"
    fi
    munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
        --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/seed"
    write_config
    slurmctld -i
    slurmd
    local i
    for i in $(seq 60); do
        if sinfo -h -o '%t' 2>/dev/null | grep -q '^idle'; then
            log "up: $(sinfo -h -o '%P %D nodes %c cpus %m MB %t')"
            return
        fi
        sleep 0.5
    done
    log "the node did not become idle; logs in $STATE/log"
    sinfo || true
    exit 1
}

stop_daemons() {
    local name pid
    for name in slurmd slurmctld; do
        if [[ -f $STATE/$name.pid ]]; then
            pid=$(cat "$STATE/$name.pid")
            kill "$pid" 2>/dev/null || true
        fi
    done
    if [[ -f $STATE/munge/munged.pid ]]; then kill "$(cat "$STATE/munge/munged.pid")" 2>/dev/null || true; fi
    sleep 1
}

case "${1:-}" in
    start) start ;;
    stop) stop_daemons; log "stopped" ;;
    status) sinfo && squeue ;;
    install) install ;;
    *) echo "usage: $0 start|stop|status|install" >&2; exit 2 ;;
esac
