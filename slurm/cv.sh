#!/bin/bash
# The cross-validation driver as a small SLURM job: it submits the folds (a job array, one DDP job per
# fold, resources from the config's slurm_* keys), waits, requeues/retries, and writes the report.
#
#   sbatch slurm/cv.sh configs/baseline.yaml [key=value ...]
#
# Run it from the repository (or set WBS_DIST_VENV to the environment made by hpc/setup-venv.sh).
# The driver needs no GPU and little memory; give it the time of the whole study.
#SBATCH --job-name=wbs-cv-driver
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=2G
#SBATCH --time=7-00:00:00
#SBATCH --output=slurm-cv-%j.out
set -euo pipefail
venv="${WBS_DIST_VENV:-${SLURM_SUBMIT_DIR:-.}/.venv}"
source "$venv/bin/activate"
exec wbs-dist cv "$@" --launcher slurm
