# Source me: point SLURM's client commands (sbatch, squeue, sacct, scontrol, and submitit, which calls
# them) at the local cluster started by hpc/slurm-up.sh.
#
#   source hpc/slurm-env.sh
#
# The cluster keeps its slurm.conf in its state directory rather than /etc/slurm, so that it never
# clashes with a system SLURM and needs no clean-up in /etc; SLURM_CONF is all a client needs (the
# munge socket and the slurmdbd address are named inside that slurm.conf). Jobs inherit SLURM_CONF
# from the submitting shell (sbatch exports the environment), so `srun` inside a job finds it too.
_wbs_slurm_env="${WBS_SLURM_STATE:-/tmp/wbs-slurm}/env"
if [[ -f "$_wbs_slurm_env" ]]; then
    while IFS='=' read -r _wbs_key _wbs_value; do
        [[ -n "$_wbs_key" ]] && export "$_wbs_key=$_wbs_value"
    done < "$_wbs_slurm_env"
    unset _wbs_key _wbs_value
else
    echo "slurm-env.sh: $_wbs_slurm_env not found; start the cluster first: sudo bash hpc/slurm-up.sh" >&2
fi
unset _wbs_slurm_env
