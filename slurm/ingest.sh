#!/bin/bash
# Ingest one archive into one store with many jobs at once: an array of shards, then one finalize job.
#
#   bash slurm/ingest.sh ARCHIVE STORE [--shards N] [ingest options ...]     # on a login node
#
# submits both for you (N = 8 by default) and prints their job ids. By hand, the same:
#
#   jid=$(sbatch --parsable --array=0-15 slurm/ingest.sh ARCHIVE STORE [options])
#   sbatch --dependency=afterany:$jid -o slurm-ingest-%j.out slurm/ingest.sh ARCHIVE STORE [same options]
#
# Logs: slurm-ingest-<array>_<I>.out per shard, slurm-ingest-<job>.out for the finalize (the
# #SBATCH default's %a would name it <job>_4294967294, SLURM's "no array index").
# Each array task writes the studies whose Study Instance UID hashes to its index (`--shard I/N`,
# N = the array's size) into STORE, taking the store lock shared; the tasks run at the same time.
# The second job, not an array, is the same command without --shard (the finalize): it takes the
# lock exclusive, ingests whatever the shards left undone (afterany: it runs even when a shard
# failed or timed out), rebuilds the lesion table once and writes STORE.errors.csv. It waits up to
# 10 min for the lock (--wait-lock): a shard killed with its node holds it until its heartbeat is
# 5 min old. Rerunning either resumes; a study is never written twice.
# Every task reads every header of the archive and writes into STORE: put both on storage all nodes
# mount. A folder or .zip is read in place, but every task would extract a .tar whole: unpack a tar
# once first. The pseudonyms' secret ($WBS_DIST_SECRET_FILE, else ~/.config/wbs_dist/secret) must be
# the same file for every task: create it once before submitting (`wbs-dist ingest` of anything, or
# copy the site's), on storage the nodes share. Run from the repository, or set WBS_DIST_VENV
# (hpc/setup-venv.sh). A task that skipped bad inputs exits 3 (listed in STORE.errors.shard-I-of-N.csv,
# and again in the finalize's STORE.errors.csv), which SLURM shows as FAILED.
#SBATCH --job-name=wbs-ingest
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=12:00:00
#SBATCH --output=slurm-ingest-%A_%a.out
set -euo pipefail

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    # Not inside a job: submit the shards and the finalize that depends on them.
    shards=8
    args=()
    while (( $# )); do
        case "$1" in
            --shards) shards="$2"; shift 2 ;;
            --shards=*) shards="${1#*=}"; shift ;;
            *) args+=("$1"); shift ;;
        esac
    done
    if (( ${#args[@]} < 2 )) || ! [[ "$shards" =~ ^[1-9][0-9]*$ ]]; then
        echo "usage: bash slurm/ingest.sh ARCHIVE STORE [--shards N] [wbs-dist ingest options]" >&2
        exit 2
    fi
    script="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
    array=$(sbatch --parsable --array="0-$(( shards - 1 ))" "$script" "${args[@]}")
    array="${array%%;*}"
    final=$(sbatch --parsable --dependency="afterany:$array" --output=slurm-ingest-%j.out "$script" "${args[@]}")
    final="${final%%;*}"
    echo "shards: job array $array ($shards tasks); finalize: job $final (after the array, whatever its end)"
    exit 0
fi

venv="${WBS_DIST_VENV:-${SLURM_SUBMIT_DIR:-.}/.venv}"
source "$venv/bin/activate"

archive="$1" store="$2"
shift 2
workers=${SLURM_CPUS_PER_TASK:-2}
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    exec wbs-dist ingest "$archive" --store "$store" --workers "$workers" \
        --shard "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT" "$@"
fi
exec wbs-dist ingest "$archive" --store "$store" --workers "$workers" --wait-lock 600 "$@"
