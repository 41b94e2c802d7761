"""The predictions CSV (DESIGN 3.3) read and checked: every problem named by file, row and column.

Only labelled rows enter the arrays; unlabelled ones (empty label: unknown) are counted, so the
report can say how many it left out.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wbs_dist.errors import InputError
from wbs_dist.schema import LABEL_CODES, PREDICTION_COLUMNS, PREDICTION_VIEWS, TUMOR_TYPES, burden_group

ROW_CONVENTION = "rows numbered as lines of the file, header = row 1"
# The label column as the CSV spells it: a label code, or empty when unknown.
LABEL_TEXTS = tuple(sorted(str(code) for code in LABEL_CODES.values()))


@dataclass
class Predictions:
    """The labelled rows of one predictions CSV as arrays; unlabelled rows are only counted."""

    path: Path
    patient_id: np.ndarray
    fold: np.ndarray | None  # None when the file has no folds (scorer output)
    label: np.ndarray
    score: np.ndarray
    tumor_type: np.ndarray  # "" where unknown
    burden: np.ndarray
    n_unlabelled: int

    @property
    def folds(self) -> list[int]:
        return [] if self.fold is None else sorted({int(f) for f in self.fold})


def _bad(path: Path, row: int, column: str, message: str) -> InputError:
    return InputError(f"{path}, row {row}, column '{column}': {message} ({ROW_CONVENTION})")


def _int(path: Path, row: int, column: str, text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _bad(path, row, column, f"{text!r} is not an integer") from None
    if value < minimum:
        raise _bad(path, row, column, f"{value} is below {minimum}")
    return value


def read_predictions(path: Path) -> Predictions:
    """Read and validate one predictions CSV; any problem is an ``InputError`` naming row and column."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            try:
                return _parse(path, reader)
            except csv.Error as exc:
                raise InputError(f"{path}, row {reader.line_num}: malformed CSV ({exc}; "
                                 f"{ROW_CONVENTION})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None


def _parse(path: Path, reader) -> Predictions:
    header = next(reader, None)
    if header is None:
        raise InputError(f"{path}: empty file; expected a header with columns "
                         + ", ".join(PREDICTION_COLUMNS))
    names = [h.strip() for h in header]
    missing = [c for c in PREDICTION_COLUMNS if c not in names]
    if missing:
        raise InputError(f"{path}, row 1 (header): missing column(s) {', '.join(missing)}")
    col = {c: names.index(c) for c in PREDICTION_COLUMNS}

    patients, folds, labels, scores, tumors, burdens = [], [], [], [], [], []
    n_rows = n_unlabelled = 0
    lesion_row: dict[tuple[str, int], int] = {}
    patient_fold: dict[str, tuple[int | None, int]] = {}
    study_count: dict[str, list[int]] = {}  # study -> [lesion_count, its first row, rows seen]
    fold_row: tuple[bool, int] | None = None  # whether the first data row had a fold, and its row
    for record in reader:
        row = reader.line_num
        if not any(cell.strip() for cell in record):
            continue
        if len(record) != len(names):
            raise InputError(f"{path}, row {row}: {len(record)} fields but the header has "
                             f"{len(names)} ({ROW_CONVENTION})")
        value = {c: record[i].strip() for c, i in col.items()}
        n_rows += 1

        for c in ("patient_id", "study_uid"):
            if not value[c]:
                raise _bad(path, row, c, "empty")
        lesion_id = _int(path, row, "lesion_id", value["lesion_id"], 1)
        # The scorer's `unknown` view (a view the DICOM does not name) is allowed; views are not used
        # in any metric, so those rows are reported like the rest.
        if value["view"] not in PREDICTION_VIEWS:
            raise _bad(path, row, "view", f"{value['view']!r} is not one of {', '.join(PREDICTION_VIEWS)}")

        fold = _int(path, row, "fold", value["fold"], 0) if value["fold"] else None
        # Among the rows that are graded (a label): unlabelled rows, out of every metric, may lack the
        # fold that labelled ones carry (a scorer's candidates of a study the run never trained on).
        if not value["label"]:
            pass
        elif fold_row is None:
            fold_row = (fold is not None, row)
        elif (fold is not None) != fold_row[0]:
            raise _bad(path, row, "fold", f"{'set' if fold is not None else 'empty'} here but "
                       f"{'set' if fold_row[0] else 'empty'} in row {fold_row[1]}; either every "
                       "row has a fold or none has")

        if value["label"] and value["label"] not in LABEL_TEXTS:
            raise _bad(path, row, "label", f"{value['label']!r} is not {', '.join(LABEL_TEXTS)} or empty "
                       "(unknown)")
        try:
            score = float(value["score"])
        except ValueError:
            raise _bad(path, row, "score", f"{value['score']!r} is not a number") from None
        if not (math.isfinite(score) and 0.0 <= score <= 1.0):
            raise _bad(path, row, "score", f"{value['score']} is outside [0, 1]")
        tumor = value["tumor_type"].lower()
        if tumor and tumor not in TUMOR_TYPES:
            raise _bad(path, row, "tumor_type", f"unknown tumour type {value['tumor_type']!r} "
                       f"(allowed: {', '.join(TUMOR_TYPES)}, or empty when unknown)")
        lesion_count = _int(path, row, "lesion_count", value["lesion_count"], 1)

        key = (value["study_uid"], lesion_id)
        if key in lesion_row:
            raise _bad(path, row, "lesion_id", f"duplicate lesion: study {key[0]} lesion {key[1]} "
                       f"already in row {lesion_row[key]}")
        lesion_row[key] = row
        # lesion_count is the study's: a study whose rows disagree would sit in two burden groups.
        seen = study_count.setdefault(value["study_uid"], [lesion_count, row, 0])
        seen[2] += 1
        if seen[0] != lesion_count:
            raise _bad(path, row, "lesion_count", f"{lesion_count} here but {seen[0]} in row {seen[1]} for study "
                       f"{value['study_uid']}; it is the study's number of lesions, the same on each of its rows")
        # A patient in two validation folds means the split leaked, and it would give the patient
        # two thresholds under --threshold youden.
        first = patient_fold.setdefault(value["patient_id"], (fold, row))
        if first[0] != fold:
            raise _bad(path, row, "fold", f"patient {value['patient_id']} is in fold {fold} here "
                       f"but in fold {first[0]} in row {first[1]}; folds must split by patient")

        if not value["label"]:
            n_unlabelled += 1
            continue
        patients.append(value["patient_id"])
        folds.append(fold)
        labels.append(int(value["label"]))
        scores.append(score)
        tumors.append(tumor)
        burdens.append(burden_group(lesion_count))

    if not n_rows:
        raise InputError(f"{path}: no data rows below the header")
    for uid, (count, row, rows) in study_count.items():
        if rows > count:
            raise _bad(path, row, "lesion_count", f"study {uid} has {rows} rows (lesions) but a lesion_count of "
                       f"{count}")
    if not labels:
        raise InputError(f"{path}, column 'label': every row is empty (unknown); nothing to evaluate")
    return Predictions(
        path=path,
        patient_id=np.array(patients, dtype=object),
        fold=np.array(folds, dtype=int) if folds[0] is not None else None,
        label=np.array(labels, dtype=int),
        score=np.array(scores, dtype=float),
        tumor_type=np.array(tumors, dtype=object),
        burden=np.array(burdens, dtype=object),
        n_unlabelled=n_unlabelled,
    )
