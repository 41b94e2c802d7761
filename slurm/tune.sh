#!/bin/bash
# The lr x batch sweep in ONE SLURM job: a Ray head on the first node, a Ray worker on each other node,
# `wbs-dist tune` driving the trials, and every Ray process stopped when the job ends, fails or is
# cancelled. Resources are the #SBATCH lines (trial sizes are the tune YAML's cpus_per_trial and
# gpus_per_trial); everything else is in the YAML.
#
#   sbatch slurm/tune.sh configs/tune.yaml [key=value ...]
#   sbatch --nodes=4 --gpus-per-node=4 --cpus-per-task=32 slurm/tune.sh configs/tune.yaml
#
# Resubmit the same command after a cancel or time-out: the sweep is restored from storage_path (put
# it and the store on storage every node mounts). Run it from the repository (or set WBS_DIST_VENV to
# the environment made by hpc/setup-venv.sh). RAY_HEAD_IP picks the head's interface when the first
# address of `hostname -I` is not the one the nodes reach each other on.
#SBATCH --job-name=wbs-tune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=2-00:00:00
#SBATCH --output=slurm-tune-%j.out
set -euo pipefail
venv="${WBS_DIST_VENV:-${SLURM_SUBMIT_DIR:-.}/.venv}"
source "$venv/bin/activate"

cpus="${SLURM_CPUS_PER_TASK:-1}"
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_ip="${RAY_HEAD_IP:-$(hostname -I | awk '{print $1}')}"
# A port the system has free now, not one derived from the job id: two jobs on one node, or another
# service, may hold any fixed choice.
port=$(python -c "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])")
export RAY_ADDRESS="$head_ip:$port"     # `wbs-dist tune` connects to it instead of starting Ray
# The head enables Ray 2.60's token authentication by default, but clients only use it when told so:
# say it to all of them. The token is ~/.ray/auth_token (or RAY_AUTH_TOKEN), which the nodes must share.
export RAY_AUTH_MODE=token
# Private to this user and job, made fresh (a fixed name in the shared /tmp could be another user's);
# short: Ray's socket paths must fit in 107 bytes. Ray makes the folder it is given world-writable
# (0777, Ray 2.60), so it gets r/ inside ours (mktemp -d: 0700), which nobody else can enter, even when
# a scancel's SIGKILL leaves it behind.
ray_tmp=$(mktemp -d "/tmp/ray-$(id -u)-$SLURM_JOB_ID-XXXX")

# stop_node_processes: end every process of this job on this node but the calling shell: TERM, up to
# 2 s, then KILL. Without cgroups (proctrack/linuxproc) SLURM finds a job's processes through their
# parents, so a process whose parent exits first escapes scancel's SIGKILL: in the tests a worker's
# `ray start --block` (which drains for up to 30 s on SIGTERM) outlived its cancelled job by over 30 s
# once the shell around it had exited on the signal. Chosen by SLURM_JOB_ID and SLURMD_NODENAME in
# their environment: never another job's Ray, nor another node's on a shared host; never the step
# that cleanup() starts to run this (WBS_TUNE_STOPPER), which a worker's own trap would otherwise end.
stop_node_processes() {
    python - "$$" <<'PY'
import os, signal, sys, time
spare = {int(sys.argv[1]), os.getpid()}
wanted = {f"SLURM_JOB_ID={os.environ['SLURM_JOB_ID']}".encode(),
          f"SLURMD_NODENAME={os.environ.get('SLURMD_NODENAME', '')}".encode()}
def ours():
    found = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = set(open(f"/proc/{p}/environ", "rb").read().split(b"\0"))
            if int(p) not in spare and wanted <= env and b"WBS_TUNE_STOPPER=1" not in env:
                found.append(int(p))
        except OSError:
            pass
    return found
for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 1.0)):
    for p in ours():
        try:
            os.kill(p, sig)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while ours() and time.monotonic() < deadline:
        time.sleep(0.1)
PY
}
export -f stop_node_processes

pids=()
# Ray started with --block fate-shares with its `ray start` process: ending that process (here; the
# srun of the workers carries the signal to their nodes) ends every Ray process it started. Only this
# job's processes are touched; `ray stop --force` would also kill other jobs' Ray on a shared node.
cleanup() {
    trap - EXIT TERM INT USR2
    if [[ -n "${driver:-}" ]] && kill -0 "$driver" 2>/dev/null; then
        # Tune saves its experiment state and stops on SIGUSR1 (SIGINT is ignored by background jobs).
        # Tune also saves its state with every reported epoch, so a short wait loses nothing: scancel
        # kills the whole job KillWait after its SIGTERM (30 s by default; 5 s on the test cluster).
        kill -USR1 "$driver" 2>/dev/null || true
        for _ in $(seq 6); do kill -0 "$driver" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$driver" 2>/dev/null || true
    fi
    if ((${#pids[@]} > 1)); then
        # Ray on every other node, stopped by a step of its own there: ending the workers' srun
        # kills their shells at once, which left their session folders behind. After a scancel no
        # step can start (this fails at once); SLURM's own kill and the workers' traps do it then.
        WBS_TUNE_STOPPER=1 timeout 30 srun --overlap --nodes=$((${#nodes[@]} - 1)) --ntasks=$((${#nodes[@]} - 1)) \
            --exclude="${nodes[0]}" bash -c 'stop_node_processes; rm -rf "/tmp/ray-$(id -u)-$SLURM_JOB_ID-w-"*' \
            > /dev/null 2>&1 || true
    fi
    # Then this node's: the head, the driver's leftovers, the srun of the workers.
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    stop_node_processes
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$ray_tmp"     # node-local session files; the sweep's own results are in storage_path
}
trap cleanup EXIT
trap 'exit 143' TERM INT USR2

echo "[tune.sh] Ray head on ${nodes[0]} ($RAY_ADDRESS), ${#nodes[@]} node(s), $cpus CPUs each" >&2
ray start --head --node-ip-address="$head_ip" --port="$port" --num-cpus="$cpus" \
    --temp-dir="$ray_tmp/r" --include-dashboard=false --disable-usage-stats --block &
pids+=($!)
# `ray status` fails under Ray 2.60's token authentication: a driver connecting is the probe.
ready=0
deadline=$((SECONDS + 180))
while ((SECONDS < deadline)); do
    kill -0 "${pids[0]}" 2>/dev/null || { echo "[tune.sh] ray start --head exited" >&2; exit 1; }
    if timeout 60 python -c "import ray; ray.init(logging_level='ERROR'); ray.shutdown()" > /dev/null 2>&1; then
        ready=1
        break
    fi
    sleep 1
done
((ready)) || { echo "[tune.sh] the Ray head at $RAY_ADDRESS did not answer within 180 s" >&2; exit 1; }
if ((${#nodes[@]} > 1)); then
    # One worker a node, each with a session folder of its own on that node (made there: /tmp is
    # node-local; without --temp-dir a worker used the fixed /tmp/ray, which another user or job may
    # hold), removed when its Ray stops (cleanup, below). On scancel the worker gets SIGTERM and ends
    # every process of the job on its node itself (stop_node_processes).
    srun --nodes=$((${#nodes[@]} - 1)) --ntasks=$((${#nodes[@]} - 1)) --exclude="${nodes[0]}" bash -c '
        d=$(mktemp -d "/tmp/ray-$(id -u)-$SLURM_JOB_ID-w-XXXX")
        trap "rm -rf \"\$d\"" EXIT
        trap "stop_node_processes; exit 143" TERM INT
        ray start --address="$RAY_ADDRESS" --num-cpus="$1" --temp-dir="$d/r" --disable-usage-stats --block &
        wait $!' worker "$cpus" &
    pids+=($!)
fi

wbs-dist tune "$@" &
driver=$!
wait "$driver"
