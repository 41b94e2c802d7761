"""Inference: an archive's lesions (annotations or hot-spot candidates) scored by a run's fold models."""
