#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for tests and local runs.
#
#   slurm/local-cluster.sh up       install (apt), configure and start; idempotent and quick when up
#   slurm/local-cluster.sh down     stop both slurmd and slurmctld (munged is left running)
#   slurm/local-cluster.sh status   daemons and `sinfo -N`; exit 0 when both nodes are usable
#
# Debian's Slurm (22.05) is built with MULTIPLE_SLURMD, so two `slurmd -N nodeX` daemons on one host,
# each on its own port, form a two-node cluster: node1 and node2, one CPU each, partition `debug`.
# Everything runs as root (SlurmUser=root, jobs run as the submitting user: root).
#
# Exit codes: 0 ok; 1 failure (the message names the log files); 2 usage;
#             3 cannot run here (not root, or slurm missing and no apt-get) -- test suites skip on 3.
#
# Files: /etc/slurm/slurm.conf, /var/log/slurm/{slurmctld,slurmd-node1,slurmd-node2}.log,
#        /var/log/slurm/jobcomp.log (one line per finished job; there is no slurmdbd, so no sacct),
#        /var/lib/slurm/slurmctld (controller state), /var/spool/slurmd/nodeX.
# Environment: T2I_SLURM_WAIT (seconds to wait for the nodes, default 60).
set -euo pipefail

readonly CONF_DIR=/etc/slurm
readonly CONF=$CONF_DIR/slurm.conf
readonly LOG_DIR=/var/log/slurm
readonly STATE_DIR=/var/lib/slurm/slurmctld
readonly SPOOL_DIR=/var/spool/slurmd
readonly CTLD_PIDFILE=/run/slurmctld.pid
readonly NODES=(node1 node2)
readonly PACKAGES=(slurmctld slurmd slurm-client munge)
readonly WAIT_SECONDS=${T2I_SLURM_WAIT:-60}

log() { echo "local-cluster: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
cannot_run() { echo "local-cluster: cannot run here: $*" >&2; exit 3; }

slurmd_pidfile() { echo "/run/slurmd-$1.pid"; }

# Succeeds when the pid in pidfile $1 is alive and is the program $2 (guards against stale pidfiles
# whose pid was reused by something else).
pid_alive() {
    local pidfile=$1 name=$2 pid
    [[ -r $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm && $(<"/proc/$pid/comm") == "$name" ]]
}

slurmctld_running() { pid_alive "$CTLD_PIDFILE" slurmctld; }
slurmd_running() { pid_alive "$(slurmd_pidfile "$1")" slurmd; }
munge_works() { command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

# Sends SIGTERM to the daemon in pidfile $1 (program $2) and waits up to 15 s for it to exit.
stop_daemon() {
    local pidfile=$1 name=$2 pid
    pid_alive "$pidfile" "$name" || return 0
    pid=$(<"$pidfile")
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 150); do
        [[ -d /proc/$pid ]] || return 0
        sleep 0.1
    done
    die "$name (pid $pid) did not exit within 15 s of SIGTERM"
}

check_can_run() {
    [[ $(id -u) -eq 0 ]] || cannot_run "must run as root (slurmd and munged need it)"
    if ! have_packages && ! command -v apt-get >/dev/null; then
        cannot_run "slurm is not installed and there is no apt-get to install it"
    fi
}

have_packages() {
    local package
    for package in "${PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null) == installed ]] || return 1
    done
}

install_packages() {
    have_packages && return 0
    log "installing ${PACKAGES[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' init scripts from starting daemons of their own (a slurmd without -N, a
    # slurmctld without a config): this script starts what it needs. Docker-style images already
    # have such a policy-rc.d; elsewhere one is put in place for the install and removed after it.
    local own_policy=false
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        own_policy=true
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    # Try with the package lists already on disk first; refresh them only when that fails (no lists
    # on a fresh image, or lists so old that the mirror no longer has those versions).
    if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/tmp/local-cluster-apt.log 2>&1 9>&-; then
        apt-get update -q >>/tmp/local-cluster-apt.log 2>&1 9>&- || die "apt-get update failed; see /tmp/local-cluster-apt.log"
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>/tmp/local-cluster-apt.log 2>&1 9>&- \
            || die "apt-get install ${PACKAGES[*]} failed; see /tmp/local-cluster-apt.log"
    fi
    have_packages || die "packages still missing after apt-get install; see /tmp/local-cluster-apt.log"
    if $own_policy; then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
}

start_munge() {
    munge_works && return 0
    local key=/etc/munge/munge.key
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [[ ! -s $key ]]; then
        log "creating $key"
        (umask 077 && dd if=/dev/urandom of="$key" bs=1024 count=1 status=none)
    fi
    chmod 0400 "$key"
    # A munged that runs but does not answer is not ours to kill: report it instead.
    if [[ -r /run/munge/munged.pid ]] && pid_alive /run/munge/munged.pid munged; then
        die "munged (pid $(</run/munge/munged.pid)) runs but 'munge -n | unmunge' fails; see /var/log/munge/munged.log"
    fi
    log "starting munged"
    # --force: munged refuses to run as root (and with root-owned files) without it.
    munged --force </dev/null >>/var/log/munge/munged.log 2>&1 9>&- \
        || die "munged failed to start; see /var/log/munge/munged.log"
    for _ in $(seq 50); do
        munge_works && return 0
        sleep 0.1
    done
    die "munged started but 'munge -n | unmunge' fails; see /var/log/munge/munged.log"
}

# The whole configuration, printed to stdout. Any change here makes `up` restart the daemons.
slurm_conf() {
    local host
    host=$(hostname -s)
    cat <<EOF
# Written by t2i slurm/local-cluster.sh: a two-node cluster on one machine. Do not edit by hand;
# edit the script and run "slurm/local-cluster.sh up" (it restarts the daemons on any change).
ClusterName=t2i-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
# No mail program is installed; without this slurmctld logs that /bin/mail is invalid.
MailProg=/bin/true
# No cgroups: processes are tracked through /proc and tasks are not bound, so no cgroup.conf needed.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Run the main scheduling loop every second (default 60 s) and the backfill loop every second
# (default 30 s); both are cheap with two nodes, and tests need not wait for them.
SchedulerParameters=sched_interval=1,bf_interval=1
# A node that was DOWN returns to service as soon as its slurmd registers with a valid config.
ReturnToService=2
# Timeouts for a machine where all daemons are local: a dead slurmd is noticed in 20 s.
SlurmdTimeout=20
MessageTimeout=10
SlurmctldTimeout=20
InactiveLimit=0
Waittime=0
# When a job is cancelled, requeued or reaches its time limit, all its processes (the batch shell
# too) get SIGCONT and SIGTERM at once, then SIGKILL KillWait=30 s later. For a warning before the
# time limit use sbatch --signal=B:USR1@N: slurmctld checks limits every 30 s, so it comes 10..40 s
# (N..N+30) before the end.
KillWait=30
# Batch jobs may be requeued (scontrol requeue, node failure) unless submitted with --no-requeue.
JobRequeue=1
# Finished jobs stay visible to "scontrol show job" for 10 minutes.
MinJobAge=600
# A requeued job may start again only after the job credential's lifetime (AuthInfo cred_expire,
# default 120 s); 10 s keeps requeue tests quick.
AuthInfo=cred_expire=10
# There is no accounting database (slurmdbd), so "sacct" does not work here. Instead every finished
# job (completed, failed, cancelled, timed out, requeued...) appends one line with its final JobState,
# ExitCode, times and nodes to this file.
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
AccountingStorageType=accounting_storage/none
StateSaveLocation=$STATE_DIR
SlurmctldPidFile=$CTLD_PIDFILE
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmctldPort=6817
# %n is the node name given with "slurmd -N": each slurmd gets its own files.
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdSpoolDir=$SPOOL_DIR/%n
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=1 RealMemory=10000 State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=1 RealMemory=10000 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
EOF
}

# Writes slurm.conf when its content differs, and then sets CONF_CHANGED=true.
CONF_CHANGED=false
write_conf() {
    local tmp
    mkdir -p "$CONF_DIR"
    tmp=$(mktemp "$CONF_DIR/.slurm.conf.XXXXXX")
    slurm_conf >"$tmp"
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 0
    fi
    chmod 0644 "$tmp"
    mv "$tmp" "$CONF"
    CONF_CHANGED=true
    log "wrote $CONF"
}

start_slurmctld() {
    slurmctld_running && return 0
    log "starting slurmctld"
    mkdir -p "$STATE_DIR" "$LOG_DIR"
    slurmctld </dev/null >>"$LOG_DIR/slurmctld.log" 2>&1 9>&- \
        || die "slurmctld failed to start; see $LOG_DIR/slurmctld.log"
    for _ in $(seq 150); do
        scontrol ping 2>/dev/null | grep -q 'is UP' && return 0
        sleep 0.2
    done
    die "slurmctld does not answer 'scontrol ping' after 30 s; see $LOG_DIR/slurmctld.log"
}

# Nodes whose slurmd this run started: they count as up only once they have registered again.
STARTED_NODES=()
start_slurmd() {
    local node=$1
    slurmd_running "$node" && return 0
    log "starting slurmd -N $node"
    STARTED_NODES+=("$node")
    mkdir -p "$SPOOL_DIR/$node" "$LOG_DIR"
    slurmd -N "$node" </dev/null >>"$LOG_DIR/slurmd-$node.log" 2>&1 9>&- \
        || die "slurmd -N $node failed to start; see $LOG_DIR/slurmd-$node.log"
}

# The controller goes first: once it is down it launches nothing more, so no job can be sent to a
# slurmd that is already stopping (such a launch is lost and the job shows RUNNING with no process).
stop_all() {
    local node
    stop_daemon "$CTLD_PIDFILE" slurmctld
    for node in "${NODES[@]}"; do
        stop_daemon "$(slurmd_pidfile "$node")" slurmd
    done
}

# `sinfo -N -h -o '%N %t'` lines for our nodes; a trailing * means "not responding".
node_states() { sinfo -N -h -o '%N %t' 2>/dev/null | sort -u; }

# Succeeds when node $1's slurmd registered with slurmctld at or after epoch second $2. (A restarted
# slurmctld shows the nodes idle from its saved state before their slurmd have registered.)
registered_since() {
    local started
    started=$(scontrol show node "$1" 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*' | cut -d= -f2)
    [[ -n $started && $started != None ]] && (($(date -d "$started" +%s) >= $2))
}

all_registered_since() {
    local node
    for node in "${STARTED_NODES[@]}"; do
        registered_since "$node" "$1" || return 1
    done
}

# Succeeds when every node answers and can run jobs (idle, mixed, allocated, completing, planned).
nodes_usable() {
    local states node state usable=0
    states=$(node_states) || return 1
    for node in "${NODES[@]}"; do
        state=$(awk -v n="$node" '$1 == n {print $2}' <<<"$states")
        case $state in
            idle | mix | alloc | comp | plnd) usable=$((usable + 1)) ;;
        esac
    done
    [[ $usable -eq ${#NODES[@]} ]]
}

# Resumes nodes that answer but are DOWN or DRAINED (e.g. after a killed job step or an unclean stop).
resume_nodes() {
    local node state
    while read -r node state; do
        case $state in
            down | drain | drng | drained | fail | failg)
                log "resuming $node (state $state)"
                scontrol update nodename="$node" state=resume 2>/dev/null || true
                ;;
        esac
    done < <(node_states)
}

# Waits until all nodes are usable and those in STARTED_NODES registered at or after epoch second $1.
wait_for_nodes() {
    local since=$1 deadline=$((SECONDS + WAIT_SECONDS))
    until nodes_usable && all_registered_since "$since"; do
        if ((SECONDS >= deadline)); then
            log "nodes not usable after ${WAIT_SECONDS} s:"
            sinfo -N -l >&2 || true
            die "see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd-node{1,2}.log ('scontrol show node' gives the reason)"
        fi
        resume_nodes
        sleep 0.5
    done
}

cmd_up() {
    install_packages
    start_munge
    mkdir -p "$LOG_DIR" "$STATE_DIR" "$SPOOL_DIR"
    write_conf
    # Node definitions and ports cannot change with "scontrol reconfigure": restart everything.
    # Running jobs survive this (their slurmstepd processes are left alone and slurmctld saves state).
    if $CONF_CHANGED && { slurmctld_running || slurmd_running node1 || slurmd_running node2; }; then
        log "configuration changed: restarting the slurm daemons"
        stop_all
    fi
    start_slurmctld
    local node since
    since=$(date +%s)
    for node in "${NODES[@]}"; do
        start_slurmd "$node"
    done
    wait_for_nodes "$since"
    sinfo -N
}

cmd_down() {
    # Jobs still running keep their slurmstepd processes; they are reattached when slurmd restarts.
    stop_all
    log "slurm daemons stopped (munged left running)"
}

cmd_status() {
    local node code=0
    if slurmctld_running; then echo "slurmctld: running (pid $(<"$CTLD_PIDFILE"))"; else echo "slurmctld: stopped"; fi
    for node in "${NODES[@]}"; do
        if slurmd_running "$node"; then
            echo "slurmd $node: running (pid $(<"$(slurmd_pidfile "$node")"))"
        else
            echo "slurmd $node: stopped"
        fi
    done
    if munge_works; then echo "munged: working"; else echo "munged: not working"; fi
    if command -v sinfo >/dev/null && slurmctld_running; then
        sinfo -N || true
        nodes_usable || code=1
    else
        code=1
    fi
    return "$code"
}

# Serialises up/down: several test sessions on one machine may call `up` at the same time, and two
# concurrent starts would race for the same ports and pid files. The lock lives on file descriptor 9,
# so every daemon is started with 9>&-: a daemon that inherited it would hold the lock for ever.
readonly LOCK_FILE=/run/lock/t2i-local-cluster.lock
lock() {
    mkdir -p "${LOCK_FILE%/*}"
    exec 9>"$LOCK_FILE"
    flock -w 300 9 || die "another local-cluster.sh up/down has held $LOCK_FILE for 300 s"
}

main() {
    case ${1:-} in
        up)
            check_can_run
            lock
            cmd_up
            ;;
        down)
            [[ $(id -u) -eq 0 ]] || cannot_run "must run as root"
            lock
            cmd_down
            ;;
        status) cmd_status ;;
        *)
            echo "usage: $0 up|down|status" >&2
            exit 2
            ;;
    esac
}

main "$@"
