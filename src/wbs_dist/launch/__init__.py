"""Launchers: how the folds get run (in this process, or as SLURM jobs). Training imports none of them."""
