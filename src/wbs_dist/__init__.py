"""wbs_dist: whole-body bone scintigraphy lesion classifier at HPC scale."""
__version__ = "0.1.0"
