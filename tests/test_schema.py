"""The contracts of DESIGN 3.2 and 3.3, pinned: schema.py must say exactly what DESIGN says."""

from wbs_dist import schema


def test_annotation_contract_design_3_2():
    assert schema.ANNOTATIONS_CSV == "annotations.csv"
    assert schema.ANNOTATION_COLUMNS == ("study_uid", "view", "lesion_id", "label", "tumor_type")
    assert schema.VIEWS == ("anterior", "posterior")
    assert schema.LABELS == ("malignant", "benign")
    assert schema.TUMOR_TYPES == ("lung", "prostate", "breast", "other")
    assert schema.MASKS_DIR == "masks"


def test_predictions_contract_design_3_3():
    assert schema.PREDICTION_COLUMNS == ("patient_id", "study_uid", "lesion_id", "view", "fold", "label", "score",
                                         "tumor_type", "lesion_count")
    assert schema.LABEL_CODES == {"malignant": 1, "benign": 0}        # label 1 malignant / 0 benign
    assert schema.STUDY_TUMOR_TYPES == ("lung", "prostate", "breast")  # metrics.json tumor_type subgroups
    assert schema.BURDEN_GROUPS == ("few", "medium", "extensive")


def test_burden_groups_follow_the_study():
    assert [schema.burden_group(n) for n in (1, 3, 4, 6, 7, 40)] == \
        ["few", "few", "medium", "medium", "extensive", "extensive"]


def test_unidentified_views_sort_after_the_named_ones():
    assert sorted(["unknown_1", "posterior", "unknown", "anterior"], key=schema.view_order) == \
        ["anterior", "posterior", "unknown", "unknown_1"]
