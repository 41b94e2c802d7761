"""The archive: studies written as DICOM files, annotations.csv and mask PNGs into a folder, zip or tar.

Layout (DESIGN 3.2): ``DICOM/<folder>/<series>/IM<n>`` (paths carry no identifiers), then
``annotations.csv`` and ``masks/<study_uid>/<view>.png`` (16-bit label maps, pixel value = lesion_id;
one per view that delineates a lesion of an annotated study), named by schema.ANNOTATIONS_CSV and
schema.MASKS_DIR. :func:`write_archive` writes to a temporary path beside OUT and renames it, so OUT
is either complete or absent; every byte derives from the seed (fixed zip/tar/gzip times and names).
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import shutil
import sys
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from wbs_dist.errors import UsageError
from wbs_dist.schema import ANNOTATION_COLUMNS, ANNOTATIONS_CSV, MALIGNANT, MASKS_DIR, VIEWS
from wbs_dist.synth.dicom import study_files
from wbs_dist.synth.plan import FORMS, StudyPlan, followup_patients
from wbs_dist.synth.render import make_study

ARCHIVE_FORMS = ("dir", "zip", "tar")


def annotation_rows(plan: StudyPlan) -> list[tuple]:
    """The study's rows of the annotations file, in ANNOTATION_COLUMNS order (none when the study is
    left unannotated)."""
    if not plan.annotated:
        return []
    return [(plan.study_uid, les.view, les.lesion_id, les.label, plan.tumor_type) for les in plan.lesions]


def mask_png(label_map: np.ndarray) -> bytes:
    """A label map as a 16-bit greyscale PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(label_map.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------
# Sinks: one interface (add, close) over a folder, a zip and a tar (optionally gzipped)


class _DirSink:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir()

    def add(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def close(self) -> None:
        pass


class _ZipSink:
    def __init__(self, path: Path):
        self.zf = zipfile.ZipFile(path, "w", allowZip64=True)

    def add(self, name: str, data: bytes) -> None:
        info = zipfile.ZipInfo(name, date_time=(2000, 1, 1, 0, 0, 0))  # fixed: byte-identical output
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        self.zf.writestr(info, data, compresslevel=1)

    def close(self) -> None:
        self.zf.close()


class _TarSink:
    def __init__(self, path: Path, gz: bool):
        self.raw = open(path, "wb")
        # GzipFile with mtime=0 and no name keeps the gzip header free of time and path
        self.gz = gzip.GzipFile(filename="", fileobj=self.raw, mode="wb", compresslevel=1, mtime=0) \
            if gz else None
        self.tf = tarfile.open(fileobj=self.gz or self.raw, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 946684800, 0o644
        info.uname = info.gname = ""
        self.tf.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tf.close()
        if self.gz is not None:
            self.gz.close()
        self.raw.close()


def _infer_form(out: Path, form: str | None) -> tuple[str, bool]:
    name = out.name.lower()
    gz = name.endswith((".tar.gz", ".tgz"))
    if form is None:
        form = "zip" if name.endswith(".zip") else "tar" if gz or name.endswith(".tar") else "dir"
    if form not in ARCHIVE_FORMS:
        raise UsageError(f"--form must be one of {', '.join(ARCHIVE_FORMS)}, got {form!r}")
    return form, gz and form == "tar"


def _refuse_existing(out: Path, form: str) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if form == "dir" and out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    raise UsageError(f"{out} already exists{' and is not empty' if out.is_dir() else ''}; "
                     "synth never overwrites: choose a new path or remove it")


def write_archive(out: Path | str, patients: int, seed: int = 0, form: str | None = None,
                  progress: bool = True, followups: float = 0.0) -> dict:
    """Write studies 0 .. patients-1 of `seed` to OUT atomically (temp path beside OUT, then rename).

    `followups` > 0 adds round(followups x patients) follow-up scans of those patients (studies
    patients, patients+1, ...; whose patient each is: plan.followup_patients), so that some patients
    have two or more studies, as in a hospital export. The first `patients` studies are the same
    bytes as without follow-ups.

    `form` is one of :data:`ARCHIVE_FORMS`, or None to take it from OUT's name (.zip; .tar, .tar.gz,
    .tgz; else a folder). OUT must not exist (an empty folder is fine). `progress` shows a bar on
    stderr. Returns a summary: out, archive_form, patients, studies, followups (study index -> the
    index of its patient's first study), annotated_studies, lesions,
    malignant_lesion_fraction, metastatic_patient_fraction, tumor_types, dicom_forms, dicom_files,
    masks (PNG count), bytes. Raises UsageError on bad arguments or an existing OUT.
    """
    from tqdm import tqdm

    out = Path(out)
    if isinstance(patients, bool) or not isinstance(patients, int) or patients < 1:
        raise UsageError(f"--patients must be an integer >= 1, got {patients!r}")
    if not isinstance(seed, int) or seed < 0:
        raise UsageError(f"--seed must be an integer >= 0, got {seed!r}")
    try:
        extra = followup_patients(seed, patients, followups)
    except ValueError as exc:
        raise UsageError(f"--followups: {exc}") from None
    patient_of = [None] * patients + extra
    form, gz = _infer_form(out, form)
    _refuse_existing(out, form)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()

    sink = _DirSink(tmp) if form == "dir" else _ZipSink(tmp) if form == "zip" else _TarSink(tmp, gz)
    forms = Counter()
    n_files = n_masks = 0
    plans = []
    try:
        rows = []
        for i in tqdm(range(len(patient_of)), desc="synth", unit="study", file=sys.stderr, disable=not progress):
            study = make_study(seed, i, patient_of[i])
            plan = study.plan
            plans.append(plan)
            for name, data in study_files(study, i + 1):
                sink.add(name, data)
                n_files += 1
            forms[plan.form] += 1
            if plan.annotated and plan.lesions:
                rows.extend(annotation_rows(plan))
                for view in VIEWS:
                    if any(les.view == view for les in plan.lesions):
                        data = mask_png(study.labels[view])
                        sink.add(f"{MASKS_DIR}/{plan.study_uid}/{view}.png", data)
                        n_masks += 1
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(ANNOTATION_COLUMNS)
        writer.writerows(rows)
        sink.add(ANNOTATIONS_CSV, text.getvalue().encode())
        sink.close()
        _refuse_existing(out, form)  # someone may have created OUT meanwhile
        os.replace(tmp, out)
    except BaseException:
        try:
            sink.close()
        except Exception:
            pass
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise

    annotated = [p for p in plans if p.annotated]
    lesions = [les for p in annotated for les in p.lesions]
    size = out.stat().st_size if form != "dir" else sum(f.stat().st_size for f in out.rglob("*")
                                                         if f.is_file())
    # keyword keys: the summary's names are its own API, not the contract's file names
    return dict(
        out=str(out), archive_form=form + (".gz" if gz else ""), patients=patients,
        studies=len(plans), followups={patients + j: p for j, p in enumerate(extra)}, annotated_studies=len(annotated), lesions=len(lesions),
        malignant_lesion_fraction=(sum(les.label == MALIGNANT for les in lesions) / len(lesions)
                                   if lesions else 0.0),
        metastatic_patient_fraction=(sum(p.malignant for p in annotated) / len(annotated)
                                     if annotated else 0.0),
        tumor_types=dict(Counter(p.tumor_type for p in plans)),
        dicom_forms={f: forms[f] for f in FORMS if forms[f]},
        dicom_files=n_files, masks=n_masks, bytes=size,
    )
