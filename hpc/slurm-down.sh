#!/usr/bin/env bash
# Stop the local SLURM cluster started by hpc/slurm-up.sh (every node's slurmd).
#
#   bash hpc/slurm-down.sh            # stop the daemons; keep state (jobs, accounting, logs) for the next up
#   bash hpc/slurm-down.sh --purge    # also cancel all jobs first and delete the state directory
#
# Only processes named in our own pid files are signalled (and only if the pid still belongs to the
# expected program), so a system-wide SLURM, MariaDB or munge is never touched. Idempotent.
set -euo pipefail

state="${WBS_SLURM_STATE:-/tmp/wbs-slurm}"
purge=0
for arg in "$@"; do
    case "$arg" in
        --purge) purge=1 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "[slurm-down] unknown argument: $arg (use --purge or nothing)" >&2; exit 2 ;;
    esac
done

say() { echo "[slurm-down] $*" >&2; }

pidfile() { if [[ $1 == munged ]]; then echo "$state/munge/munged.pid"; else echo "$state/run/$1.pid"; fi; }
# slurmd-NODE is the slurmd of node NODE (one per node; the one-node cluster of earlier versions: slurmd).
program() { if [[ $1 == slurmd-* ]]; then echo slurmd; else echo "$1"; fi; }

# running PID NAME: PID is a live NAME. Our daemons end up children of PID 1, which here does not
# always reap them: a zombie keeps its name, so it counts as gone.
running() {
    [[ -r "/proc/$1/comm" && "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2" ]] || return 1
    ! grep -qE '^State:[[:space:]]+[ZX]' "/proc/$1/status" 2>/dev/null
}

# pid_of NAME: the live pid from NAME's pid file, or nothing (no file, dead, or the pid was reused).
pid_of() {
    local f pid
    f="$(pidfile "$1")"
    [[ -s "$f" ]] || return 0
    pid="$(tr -dc '0-9' < "$f")"
    if [[ -n "$pid" ]] && running "$pid" "$(program "$1")"; then echo "$pid"; fi
    return 0
}

stop() {
    local name="$1" pid i
    pid="$(pid_of "$name")"
    if [[ -z "$pid" ]]; then
        rm -f "$(pidfile "$name")"
        return 0
    fi
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    # MariaDB flushes on TERM, the others exit at once; 20 s covers a slow disk before we insist.
    for ((i = 0; i < 100; i++)); do
        running "$pid" "$(program "$name")" || break
        sleep 0.2
    done
    if running "$pid" "$(program "$name")"; then
        say "$name (pid $pid) ignored SIGTERM for 20 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$(pidfile "$name")"
}

if [[ ! -d "$state" ]]; then
    say "nothing to stop: $state does not exist"
    exit 0
fi

# Not while hpc/slurm-up.sh is starting daemons (it calls us itself, holding the lock, to restart).
if [[ -z "${WBS_SLURM_LOCKED:-}" ]]; then
    exec 9> "$state/lock"
    flock -w 600 9 || { say "another slurm-up.sh or slurm-down.sh holds $state/lock"; exit 1; }
fi

if ((purge)) && [[ -n "$(pid_of slurmctld)" ]]; then
    # Running jobs outlive slurmd (their slurmstepd keeps going); before deleting their state, end them.
    export SLURM_CONF="$state/etc/slurm.conf"
    jobs="$(timeout 10 squeue -h -o %A 2>/dev/null || true)"
    [[ -n "$jobs" ]] && { timeout 10 scancel --quiet $jobs 2>/dev/null || true; }
    for ((i = 0; i < 50; i++)); do
        [[ -z "$(timeout 5 squeue -h -t R,CG -o %A 2>/dev/null)" ]] && break
        sleep 0.2
    done
fi

# Reverse start order: compute side first (every node's slurmd), the database and authentication last.
slurmds=()
for f in "$state"/run/slurmd*.pid; do
    if [[ -e "$f" ]]; then slurmds+=("$(basename "$f" .pid)"); fi
done
for d in "${slurmds[@]}" slurmctld slurmdbd mariadbd munged; do stop "$d"; done

if ((purge)); then
    case "$state" in
        /|/tmp|/root|/home|/var|/usr|/etc|"") say "refusing to delete '$state'"; exit 1 ;;
    esac
    rm -rf "$state"
    say "removed $state"
fi
say "stopped"
