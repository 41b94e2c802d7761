"""The data contracts of DESIGN 3.2 and 3.3 as constants: the one place their literals live.

Every stage imports views, labels, tumour types, burden groups and the column tuples from here; a
test pins these values to the DESIGN text, so changing one is a contract change (README, DESIGN and
the tests together). The synthetic archive (synth/) also imports them: its own DICOM codes are kept
apart on purpose, but the vocabulary of its annotations is the contract's.
"""

from __future__ import annotations

# -- views: anterior on the left half of the training image, posterior on the right -----------------
ANTERIOR = "anterior"
POSTERIOR = "posterior"
VIEWS = (ANTERIOR, POSTERIOR)
# A view the DICOM does not identify: stored and scored alone, never paired by guess. It may appear in
# the scorer's predictions, never in annotations.
UNKNOWN_VIEW = "unknown"
PREDICTION_VIEWS = VIEWS + (UNKNOWN_VIEW,)


def view_order(view: str) -> tuple[int, str]:
    """Sort key of a study's view names: anterior, posterior, then unidentified ones by name."""
    return (VIEWS.index(view) if view in VIEWS else len(VIEWS), view)

# -- labels ----------------------------------------------------------------------------------------------
MALIGNANT = "malignant"
BENIGN = "benign"
LABELS = (MALIGNANT, BENIGN)                       # as annotations.csv spells them
LABEL_CODES = {BENIGN: 0, MALIGNANT: 1}            # as the lesion table and predictions store them

# -- primary tumour ----------------------------------------------------------------------------------------
LUNG = "lung"
PROSTATE = "prostate"
BREAST = "breast"
OTHER = "other"
TUMOR_TYPES = (LUNG, PROSTATE, BREAST, OTHER)
# The study's tumour subgroups: "other" is reported when present but stays out of the chi-square.
STUDY_TUMOR_TYPES = (LUNG, PROSTATE, BREAST)

# -- lesion burden: lesions per study ------------------------------------------------------------------------
FEW = "few"
MEDIUM = "medium"
EXTENSIVE = "extensive"
BURDEN_GROUPS = (FEW, MEDIUM, EXTENSIVE)
BURDEN_TEXT = "lesions per study: few 1-3, medium 4-6, extensive > 6"


def burden_group(lesion_count: int) -> str:
    """The study's lesion-burden subgroup of a study with `lesion_count` lesions."""
    if lesion_count <= 3:
        return FEW
    return MEDIUM if lesion_count <= 6 else EXTENSIVE


# -- files ---------------------------------------------------------------------------------------------------
ANNOTATIONS_CSV = "annotations.csv"
ANNOTATION_COLUMNS = ("study_uid", "view", "lesion_id", "label", "tumor_type")
MASKS_DIR = "masks"                                # masks/<study_uid>/<view>.png beside annotations.csv
PREDICTION_COLUMNS = ("patient_id", "study_uid", "lesion_id", "view", "fold", "label", "score", "tumor_type",
                      "lesion_count")
