#!/bin/bash
# Score an archive with a run's fold ensemble: an array of shards, then one merge job.
#
#   jid=$(sbatch --parsable --array=0-15 slurm/score.sh ARCHIVE RUN_DIR OUT/pred.csv [--overlays DIR ...])
#   sbatch --dependency=afterany:$jid -o slurm-score-%j.out slurm/score.sh ARCHIVE RUN_DIR OUT/pred.csv [same options]
#
# Logs: slurm-score-<array>_<I>.out per shard; give the merge job its own -o (the default's %a would
# name it <job>_4294967294, SLURM's "no array index"). With --detector DETECTOR_RUN every study without
# delineations gets the learned detector's lesions (README, Learned lesion detection).
# Each array task scores the studies whose uid hashes to its index (`--shard I/N`, N = the array's
# size) into OUT/pred.csv.parts/. The second job, not an array, is the same command without --shard:
# it writes pred.csv, pred.summary.csv and pred.errors.csv from the parts, and first scores any study
# the shards left undone (afterany: it runs even when a shard failed or timed out). Rerunning either
# resumes; finished studies are never scored twice. Every task reads the archive, so put it, the run
# and OUT on storage all nodes mount; a folder or .zip is read in place, but every task would extract
# a .tar whole, so unpack a tar once first. Use --array=0-(N-1): the shard count is the array's size.
# The output carries Patient IDs: keep OUT where the site keeps identifying data. Run from the
# repository, or set WBS_DIST_VENV (hpc/setup-venv.sh). A task that skipped bad inputs exits 3 (they
# are listed in the errors CSV), which SLURM shows as FAILED.
#SBATCH --job-name=wbs-score
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gpus=1
#SBATCH --mem=16G
#SBATCH --time=12:00:00
#SBATCH --output=slurm-score-%A_%a.out
set -euo pipefail
venv="${WBS_DIST_VENV:-${SLURM_SUBMIT_DIR:-.}/.venv}"
source "$venv/bin/activate"

archive="$1" run="$2" out="$3"
shift 3
workers=$(( ${SLURM_CPUS_PER_TASK:-3} - 1 ))    # one core drives the model
shard=()
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    shard=(--shard "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")
fi
exec wbs-dist score "$archive" --run "$run" --out "$out" --workers "$workers" "${shard[@]}" "$@"
