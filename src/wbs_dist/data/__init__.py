"""Data: a DICOM archive and its annotations become a de-identified Zarr store with folds.

archive (safe members) -> dicom (one object) -> studies (objects grouped, annotations checked) ->
ingest (-> store) ; deid (pseudonyms, allow-list) ; folds (the patient-grouped split, in the store).
"""
