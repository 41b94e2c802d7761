#!/usr/bin/env bash
# Start a real SLURM cluster of N nodes on localhost (Debian slurm-wlm 22.05 + munge + slurmdbd/MariaDB).
#
#   sudo bash hpc/slurm-up.sh              # one node; then: source hpc/slurm-env.sh; sbatch --wrap hostname
#   sudo bash hpc/slurm-up.sh --nodes 2    # two nodes on this host (the test suite's cluster): sbatch -N2 ...
#
# Several nodes on one host: each is its own slurmd (`slurmd -N NAME`) with its own NodeName, port,
# spool directory, pid file and log; all of them reach this host at 127.0.0.1. The first node is named
# after this host (`hostname -s`), the others <host>2, <host>3, ...
# Used by the tests and the demo. Idempotent: a healthy cluster of the same N is left alone (exit 0 in well under a
# second), dead daemons (even after kill -9, with stale pid files) are restarted, missing Debian
# packages are installed; another N rewrites slurm.conf and restarts the daemons. There is no systemd here, so every daemon is started directly and keeps its
# config, spool, logs, pid file and data under one state directory:
#   WBS_SLURM_STATE       state directory (default /tmp/wbs-slurm)
#   WBS_SLURM_PORT_BASE   slurmctld port; slurmd, slurmdbd use the next two (default 6817, SLURM's own);
#                         the slurmd of node i >= 2 listens on WBS_SLURM_PORT_BASE + 1 + i (6820, 6821, ...)
#   WBS_SLURM_CPUS        CPUs each node advertises (default 8 / N: 8 for one node, 4 each for two)
# Nothing is written to /etc: clients find the cluster through SLURM_CONF (see hpc/slurm-env.sh and the
# `env` file this script writes into the state directory).
# Stop with hpc/slurm-down.sh [--purge].
set -euo pipefail

nnodes=1
while (($#)); do
    case "$1" in
        --nodes) nnodes="${2:-}"; shift 2 || { echo "[slurm-up] --nodes needs a number" >&2; exit 2; } ;;
        --nodes=*) nnodes="${1#--nodes=}"; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "[slurm-up] unknown argument: $1 (use --nodes N)" >&2; exit 2 ;;
    esac
done
[[ "$nnodes" =~ ^[1-9][0-9]?$ ]] || { echo "[slurm-up] --nodes: a number from 1 to 99, not '$nnodes'" >&2; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state="${WBS_SLURM_STATE:-/tmp/wbs-slurm}"
port_base="${WBS_SLURM_PORT_BASE:-6817}"
cluster=wbs
account=wbs
t_start=$(date +%s.%N)

etc="$state/etc" run="$state/run" log="$state/log" spool="$state/spool"
conf="$etc/slurm.conf" dbdconf="$etc/slurmdbd.conf" mycnf="$etc/my.cnf"
munge_dir="$state/munge" munge_sock="$state/munge/munge.socket.2"
datadir="$state/mysql/data" mysql_sock="$state/mysql/mysqld.sock"
export SLURM_CONF="$conf"

say() { echo "[slurm-up] $*" >&2; }

# die MESSAGE [LOGFILE]: the failing daemon's own log usually says why, so show its tail.
die() {
    echo "[slurm-up] ERROR: $1" >&2
    if [[ -n "${2:-}" && -f "$2" ]]; then
        echo "[slurm-up] last lines of $2:" >&2
        tail -n 25 "$2" | sed 's/^/    /' >&2
        if tail -n 25 "$2" | grep -q 'Address already in use'; then
            echo "[slurm-up] another SLURM holds ports $port_base-$((port_base + 2)): stop it, or choose" \
                "other ports with WBS_SLURM_PORT_BASE (and another WBS_SLURM_STATE)" >&2
        fi
    fi
    exit 1
}

# alive NAME: the pid file names a live process that really is NAME (a stale pid file after kill -9
# may name a pid since reused by something else). Daemons end up children of PID 1, which here does
# not always reap them: a zombie keeps its name, so it is counted as dead explicitly.
# Daemon names are program names, except slurmd-NODE: the slurmd of node NODE (SlurmdPidFile has %n).
pidfile() { if [[ $1 == munged ]]; then echo "$munge_dir/munged.pid"; else echo "$run/$1.pid"; fi; }
program() { if [[ $1 == slurmd-* ]]; then echo slurmd; else echo "$1"; fi; }
proc_alive() {  # PID NAME
    [[ -n "$1" && -r "/proc/$1/comm" && "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2" ]] || return 1
    ! grep -qE '^State:[[:space:]]+[ZX]' "/proc/$1/status" 2>/dev/null
}
alive() {
    local pidfile
    pidfile="$(pidfile "$1")"
    [[ -s "$pidfile" ]] && proc_alive "$(tr -dc '0-9' < "$pidfile")" "$(program "$1")"
}

# died NAME: NAME was started and is gone again, so waiting longer for it is pointless. The daemons
# that fork write their pid file first; mariadbd does not fork and is followed through its launch pid.
mariadbd_launched=
died() {
    if [[ $1 == mariadbd && -n "$mariadbd_launched" ]]; then
        ! proc_alive "$mariadbd_launched" mariadbd && ! alive mariadbd
    else
        [[ -s "$(pidfile "$1")" ]] && ! alive "$1"
    fi
}

# wait_for SECONDS DAEMON CMD...: poll CMD until it succeeds. Gives up early when DAEMON died; on
# failure shows CMD's last output (the caller then shows the daemon's log).
wait_for() {
    local limit="$1" daemon="$2"; shift 2
    local deadline=$((SECONDS + limit))
    until "$@" > "$run/check.out" 2>&1; do
        if died "$daemon"; then
            echo "[slurm-up] $daemon exited during start-up" >&2
            return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "[slurm-up] gave up waiting for $daemon after $limit s; the last check said:" >&2
            sed 's/^/    /' "$run/check.out" | tail -n 10 >&2
            return 1
        fi
        sleep 0.2
    done
}

host="$(hostname -s)"
nodes=("$host")
for ((i = 2; i <= nnodes; i++)); do nodes+=("$host$i"); done
node_csv="$(IFS=,; echo "${nodes[*]}")"

node_state() { timeout 10 sinfo -h -N -n "$1" -o %T 2>/dev/null | head -n1; }
node_ready() { [[ "$(node_state "$1")" =~ ^(idle|mixed|allocated|completing)$ ]]; }
sacct_ok() { timeout 10 sacct -n -X -S now-1minutes >/dev/null 2>&1; }

healthy() {
    [[ -f "$conf" && -f "$state/env" ]] || return 1
    local d n
    for d in munged mariadbd slurmdbd slurmctld "${nodes[@]/#/slurmd-}"; do alive "$d" || return 1; done
    for n in "${nodes[@]}"; do node_ready "$n" || return 1; done
    sacct_ok
}

print_env() {
    local took
    took=$(awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    say "cluster '$cluster' up in ${took} s: ${#nodes[@]} node(s) $node_csv ($(timeout 10 sinfo -h -N -p debug -o '%c CPUs, %m MB, %T' | head -n1) each), partition debug"
    say "logs: $log"
    say "clients need (or: source hpc/slurm-env.sh):"
    sed 's/^/export /' "$state/env"
}

[[ $EUID -eq 0 ]] || die "must run as root: slurmd and the job steps run as root, munged as user munge"
umask 022
mkdir -p "$etc" "$run" "$log" "$spool/ctld" "$spool/d" "$munge_dir" "$state/mysql"
# Two callers at once (parallel test sessions, a demo) must not start daemons twice. fd 9 holds the lock
# and is closed for every daemon (9>&-), or the daemons would hold it for ever.
exec 9> "$state/lock"
flock -w 600 9 || die "another hpc/slurm-up.sh or slurm-down.sh holds $state/lock"
# Daemons inherit our working directory; do not let them pin a caller's (temporary) one.
cd "$state"

# ---------------------------------------------------------------- packages
pkgs=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
have_all() {
    local b
    for b in slurmctld slurmd sbatch sacct sacctmgr slurmdbd munged munge mariadbd mariadb-install-db mariadb-admin; do
        command -v "$b" >/dev/null || return 1
    done
    compgen -G "/usr/lib/*/slurm-wlm/accounting_storage_mysql.so" > /dev/null
}
if ! have_all; then
    say "installing ${pkgs[*]} (Debian packages)"
    # Without systemd, package scripts would try to start the services with their system-wide
    # defaults (/var/lib/mysql, /etc/munge ...); forbid that for the duration of the install.
    made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
        trap '[[ $made_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=120 \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${pkgs[@]}" \
            > "$log/apt.log" 2>&1
    }
    # A fresh machine may have stale or no package lists: update once, only when needed.
    if ! apt_install; then
        say "apt-get install failed; running apt-get update and retrying"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >> "$log/apt.log" 2>&1 || true
        apt_install || die "could not install ${pkgs[*]}" "$log/apt.log"
    fi
    if [[ $made_policy == 1 ]]; then rm -f /usr/sbin/policy-rc.d; made_policy=0; fi
    have_all || die "packages installed but some programs are still missing" "$log/apt.log"
fi

# ---------------------------------------------------------------- layout and configs
# The munge user must be able to reach its key and socket through the state directory.
chmod 755 "$state" "$etc" "$run" "$log" "$state/mysql"
# munged refuses a socket or key directory that others can write to.
chown munge:munge "$munge_dir"
chmod 755 "$munge_dir"

# Fixed node hardware from what slurmd itself will report, so the node never drains for "Low RealMemory".
hw="$(slurmd -C | head -n1)" || die "slurmd -C failed"
hw_field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<< "$hw"; }
cpus="$(hw_field CPUs)" mem="$(hw_field RealMemory)"
[[ -n "$cpus" && -n "$mem" ]] || die "could not parse CPUs/RealMemory from: $hw"
# The nodes advertise 8 CPUs in all (WBS_SLURM_CPUS each, default 8 / N), oversubscribing a small
# machine, so that a driver job (sbatch slurm/cv.sh) and three 2-task DDP fold jobs fit at once on a
# 2-core test machine, whatever N: two nodes do not double the load the tests put on the machine.
# config_overrides lets slurmd accept more CPUs than it counts. Set WBS_SLURM_CPUS=$cpus for the real count.
cpus="${WBS_SLURM_CPUS:-$(( 8 / nnodes > 0 ? 8 / nnodes : 1 ))}"
# Each node claims the host's memory: memory is not a consumable here (CR_CPU).
hw_line="CPUs=$cpus RealMemory=$mem"

ctld_port=$port_base slurmd_port=$((port_base + 1)) dbd_port=$((port_base + 2))
# node_port I: the slurmd port of the I-th node (1-based); the first keeps SLURM's default 6818.
node_port() { if (($1 == 1)); then echo "$slurmd_port"; else echo $((port_base + 1 + $1)); fi; }
node_lines=""
for ((i = 1; i <= nnodes; i++)); do
    node_lines+="NodeName=${nodes[i-1]} NodeHostname=$host NodeAddr=127.0.0.1 Port=$(node_port "$i") $hw_line State=UNKNOWN"$'\n'
done

# write_config FILE MODE: stdin into FILE; the temporary file gets MODE before any byte is written.
write_config() {
    local tmp="$1.tmp.$$"
    install -m "$2" /dev/null "$tmp"
    cat >> "$tmp"
    mv -f "$tmp" "$1"
}

write_config "$conf" 644 <<EOF
# Written by hpc/slurm-up.sh: a test cluster of $nnodes node(s) on this host. Timeouts are short so that tests are fast.
ClusterName=$cluster
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
# cred_expire also holds a requeued job back before it may start again (default 120 s).
AuthInfo=socket=$munge_sock,cred_expire=5
StateSaveLocation=$spool/ctld
# %n: the node's name, so that the slurmds of one host keep apart.
SlurmdSpoolDir=$spool/d/%n
SlurmctldPidFile=$run/slurmctld.pid
SlurmdPidFile=$run/slurmd-%n.pid
SlurmctldLogFile=$log/slurmctld.log
SlurmdLogFile=$log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
# No cgroups without systemd: track processes by parent pid, bind nothing.
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# CPUs are the consumable: one-CPU tasks pack $cpus at a time; memory is not scheduled.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=5
# submitit reads job states from sacct, so accounting is required, not optional.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
# Clients authenticate to slurmdbd through the munge socket named here, not AuthInfo's.
AccountingStoragePass=$munge_sock
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
# Requeue and preemption (scontrol requeue, submitit's checkpoint-and-requeue): a job in partition
# 'urgent' preempts jobs in 'debug'; the victim gets its --signal (submitit: USR2) first, then is requeued.
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
ReturnToService=2
SlurmctldTimeout=10
SlurmdTimeout=10
MessageTimeout=5
InactiveLimit=0
KillWait=5
MinJobAge=10
Waittime=0
${node_lines}PartitionName=debug Nodes=$node_csv Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=10
PartitionName=urgent Nodes=$node_csv MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF

# One database password for the life of the state directory.
if [[ ! -s "$etc/dbpass" ]]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > "$etc/dbpass")
fi
dbpass="$(cat "$etc/dbpass")"

# slurmdbd reads slurmdbd.conf from the directory of SLURM_CONF and insists on mode 0600.
write_config "$dbdconf" 600 <<EOF
AuthType=auth/munge
AuthInfo=socket=$munge_sock
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
DebugLevel=info
LogFile=$log/slurmdbd.log
PidFile=$run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$dbpass
StorageLoc=slurm_acct_db
EOF

# A private MariaDB: no network, its own socket, no system-wide option files (--defaults-file).
write_config "$mycnf" 644 <<EOF
[client]
socket=$mysql_sock
user=root
[mysqld]
user=root
datadir=$datadir
socket=$mysql_sock
pid-file=$run/mariadbd.pid
log-error=$log/mariadbd.log
skip-networking
skip-name-resolve
# Throwaway test accounting: trade durability for start-up speed (slurmdbd creates ~40 tables).
innodb_buffer_pool_size=512M
innodb_log_file_size=64M
innodb_lock_wait_timeout=900
innodb_flush_log_at_trx_commit=0
innodb_doublewrite=0
EOF

# What clients need, one KEY=VALUE a line: read by hpc/slurm-env.sh and the tests.
printf 'SLURM_CONF=%s\n' "$conf" > "$state/env"

# Daemons read their configs only at start: a cluster started from other configs (an older version of
# this script, other ports) is restarted, even if healthy. The stamp is written only once all is up, so
# a failed restart is retried by the next run.
config_sum="$(cat "$conf" "$dbdconf" "$mycnf" | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$run/config.sha256" 2>/dev/null)" == "$config_sum" ]]; then
    if healthy; then
        print_env
        exit 0
    fi
else
    # Every slurmd there is (an earlier run may have had more nodes, or the one-node slurmd.pid).
    running_nodes=()
    for f in "$run"/slurmd*.pid; do
        if [[ -e "$f" ]]; then running_nodes+=("$(basename "$f" .pid)"); fi
    done
    for d in munged mariadbd slurmdbd slurmctld "${running_nodes[@]}"; do
        if alive "$d"; then
            say "configuration changed since the daemons started: restarting them"
            WBS_SLURM_LOCKED=1 bash "$here/slurm-down.sh"
            break
        fi
    done
fi
rm -f "$run/config.sha256"

# ---------------------------------------------------------------- munge
if [[ ! -s "$munge_dir/munge.key" ]]; then
    head -c 1024 /dev/urandom > "$munge_dir/munge.key.tmp"
    mv -f "$munge_dir/munge.key.tmp" "$munge_dir/munge.key"
fi
chown munge:munge "$munge_dir/munge.key"
chmod 400 "$munge_dir/munge.key"

munge_ok() { munge -n -S "$munge_sock" | unmunge -S "$munge_sock"; }
if ! alive munged; then
    say "starting munged"
    rm -f "$munge_dir/munged.pid"
    # munged runs as munge: its pid file lives in its own directory so that it can remove it on exit.
    touch "$log/munged.log" && chown munge:munge "$log/munged.log"
    runuser -u munge -- munged --socket="$munge_sock" --key-file="$munge_dir/munge.key" \
        --log-file="$log/munged.log" --pid-file="$munge_dir/munged.pid" --seed-file="$munge_dir/munged.seed" \
        < /dev/null >> "$log/munged.log" 2>&1 9>&- || die "munged did not start" "$log/munged.log"
fi
wait_for 15 munged munge_ok || die "munge does not answer on $munge_sock" "$log/munged.log"

# ---------------------------------------------------------------- MariaDB
if [[ ! -d "$datadir/mysql" ]]; then
    say "initialising MariaDB in $datadir"
    # Build into a temporary dir and rename, so an interrupted first run is redone, not half-used.
    rm -rf "$datadir.tmp"
    mariadb-install-db --defaults-file="$mycnf" --datadir="$datadir.tmp" --auth-root-authentication-method=socket \
        --skip-test-db > "$log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed" "$log/mariadb-install.log"
    mv "$datadir.tmp" "$datadir"
fi
db_ok() { mariadb-admin --defaults-file="$mycnf" --connect-timeout=2 ping; }
if ! alive mariadbd; then
    say "starting mariadbd"
    rm -f "$run/mariadbd.pid"
    # mariadbd does not daemonize itself: detach it from our session and our caller's pipes.
    setsid mariadbd --defaults-file="$mycnf" < /dev/null >> "$log/mariadbd.log" 2>&1 9>&- &
    mariadbd_launched=$!
fi
wait_for 60 mariadbd db_ok || die "MariaDB does not answer on $mysql_sock" "$log/mariadbd.log"
mariadb --defaults-file="$mycnf" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$dbpass';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" \
    2>> "$log/mariadbd.log" || die "could not create the slurm database user" "$log/mariadbd.log"

# ---------------------------------------------------------------- slurmdbd
# The slurm user of the database connects through our socket: libmariadb takes it from MYSQL_UNIX_PORT.
dbd_ok() { timeout 10 sacctmgr -n -P show cluster format=cluster; }
if ! alive slurmdbd; then
    say "starting slurmdbd"
    rm -f "$run/slurmdbd.pid"
    MYSQL_UNIX_PORT="$mysql_sock" slurmdbd < /dev/null >> "$log/slurmdbd.log" 2>&1 9>&- || die "slurmdbd did not start" "$log/slurmdbd.log"
fi
# The first start creates the accounting tables: allow for a slow disk.
wait_for 90 slurmdbd dbd_ok || die "slurmdbd does not answer on port $dbd_port" "$log/slurmdbd.log"

# slurmctld only sends accounting for a cluster the database knows, so register it before starting it.
if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$cluster"; then
    sacctmgr -i add cluster "$cluster" > /dev/null || die "sacctmgr could not add cluster $cluster" "$log/slurmdbd.log"
fi
if ! sacctmgr -n -P show account format=account | grep -qx "$account"; then
    sacctmgr -i add account "$account" Cluster="$cluster" Description="wbs-dist tests" Organization=wbs > /dev/null \
        || die "sacctmgr could not add account $account" "$log/slurmdbd.log"
fi
if ! sacctmgr -n -P show assoc user=root account="$account" format=user | grep -qx root; then
    sacctmgr -i add user root Account="$account" > /dev/null || die "sacctmgr could not add root to $account" "$log/slurmdbd.log"
fi
if [[ "$(sacctmgr -n -P show user root format=defaultaccount)" != "$account" ]]; then
    sacctmgr -i modify user root set DefaultAccount="$account" > /dev/null \
        || die "sacctmgr could not make $account root's default account" "$log/slurmdbd.log"
fi

# ---------------------------------------------------------------- slurmctld, slurmd
ctld_ok() { timeout 10 scontrol ping | grep -q UP; }
if ! alive slurmctld; then
    say "starting slurmctld"
    rm -f "$run/slurmctld.pid"
    slurmctld < /dev/null >> "$log/slurmctld.log" 2>&1 9>&- || die "slurmctld did not start" "$log/slurmctld.log"
fi
wait_for 30 slurmctld ctld_ok || die "slurmctld does not answer on port $ctld_port" "$log/slurmctld.log"

for node in "${nodes[@]}"; do
    if ! alive "slurmd-$node"; then
        say "starting slurmd for node $node"
        rm -f "$run/slurmd-$node.pid"
        mkdir -p "$spool/d/$node"
        slurmd -N "$node" < /dev/null >> "$log/slurmd-$node.log" 2>&1 9>&- \
            || die "slurmd for node $node did not start" "$log/slurmd-$node.log"
    fi
done
registered() { [[ -n "$(node_state "$1")" && ! "$(node_state "$1")" =~ ^(unknown|down) ]]; }
for node in "${nodes[@]}"; do
    wait_for 30 "slurmd-$node" registered "$node" \
        || die "node $node did not register (state: $(node_state "$node"))" "$log/slurmd-$node.log"
    # A node drained or downed by an earlier run (killed slurmd, missed heartbeats) stays out of
    # service until told otherwise.
    if [[ "$(node_state "$node")" =~ ^(drain|drained|draining|down|fail) ]]; then
        scontrol update NodeName="$node" State=RESUME || true
    fi
    wait_for 30 slurmctld node_ready "$node" || die "node $node is not usable (state: $(node_state "$node"))" "$log/slurmctld.log"
done
wait_for 30 slurmdbd sacct_ok || die "sacct does not answer" "$log/slurmdbd.log"
echo "$config_sum" > "$run/config.sha256"

print_env
