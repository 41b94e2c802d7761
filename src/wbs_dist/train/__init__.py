"""Training one fold: the lesions of a split (dataset), the DALI loader, the models, DDP, checkpoints,
the run directory's files and the trainer that ties them. Imports no launcher.
"""
