#!/bin/bash
# Plain sbatch, no driver: the five folds as a job array, each fold one DDP job under srun.
#
#   sbatch slurm/train_folds.sh configs/baseline.yaml [key=value ...]
#   wbs-dist cv configs/baseline.yaml --launcher local      # afterwards: skips the finished folds, writes the report
#
# Resources here, not in the config (this path does not read the slurm_* keys). One task per GPU.
#SBATCH --job-name=wbs-fold
#SBATCH --array=0-4
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=2-00:00:00
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --output=slurm-fold-%A_%a.out
set -uo pipefail
venv="${WBS_DIST_VENV:-${SLURM_SUBMIT_DIR:-.}/.venv}"
source "$venv/bin/activate"
# --signal (without B:) reaches the ranks themselves: they save at the next step and exit 75.
srun wbs-dist train "$@" --fold "$SLURM_ARRAY_TASK_ID"
status=$?
if [[ $status -eq 75 ]]; then
    # Preempted or near the time limit: checkpoint written; run again under the same job id.
    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
fi
exit $status
