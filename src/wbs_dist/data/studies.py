"""Reading studies out of an archive: shared by ingest (-> store) and score (-> predictions).

Two passes over the archive. The header pass reads every member's DICOM header only (cheap) and
groups the objects into studies, setting aside unreadable members and second copies of an object.
The study pass decodes one study per task, identifies its views and checks its annotations against
them (`assemble_study`). Both passes run in a pool of worker processes (`StudyPool`); each stage
adds its own work to the study task (ingest writes the study into the store, score finds candidates
and builds the network's images).

Annotations (DESIGN 3.2) are found beside the DICOM files (one annotations.csv anywhere in the
archive, its masks/ beside it) or in a folder given apart. Messages are the stage's to frame: a
study that cannot be used is "skipped", with each reason listed.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from collections import defaultdict
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from wbs_dist.data import annotations as ann
from wbs_dist.data.archive import Archive
from wbs_dist.data.dicom import Header, Rejected, decode, read_header
from wbs_dist.errors import UsageError
from wbs_dist.schema import ANNOTATIONS_CSV, MASKS_DIR, UNKNOWN_VIEW, VIEWS

log = logging.getLogger("wbs_dist.studies")


@dataclass
class StudyJob:
    """One study to read: its objects, annotations and mask members. `key` and `patient` are what
    the stage calls the study and its patient (pseudonyms in ingest, the DICOM's own in score)."""

    key: str
    patient: str
    members: list[str]
    annotations: ann.StudyAnnotations | None
    masks: dict[str, str]                       # view -> mask member name in the annotation source
    csv_name: str = ANNOTATIONS_CSV


@dataclass
class StudyData:
    """A study decoded and checked: native views, their label maps, attributes for the store."""

    key: str
    attrs: dict                                 # JSON-able: patient, annotated, tumor_type, views, lesions, ...
    views: dict[str, np.ndarray]                # view name -> native pixels
    labels: dict[str, np.ndarray]               # view name -> native uint16 label map


@dataclass
class StudySource:
    """An opened archive, where its annotations live and what was refused on the way."""

    archive: Archive
    annotations: Archive | None                 # the archive itself, a separate folder, or None
    csv_name: str | None                        # annotations.csv's member name in `annotations`
    rows: dict[str, ann.StudyAnnotations]       # study uid -> its annotation rows
    members: list[str]                          # members to read as DICOM (annotation files left out)
    errors: list[tuple[str, str]] = field(default_factory=list)   # (path, reason): refused members

    @classmethod
    def open(cls, archive: Path, annotations: Path | None = None) -> "StudySource":
        arc = Archive.open(archive)
        try:
            src, csv_name, exclude = _find_annotations(arc, annotations)
            errors = [(r.path, r.reason) for r in arc.refused]
            if src is not None and src is not arc:
                errors += [(f"{annotations}/{r.path}", r.reason) for r in src.refused]
            rows = ann.parse_annotations(src.read(csv_name), csv_name) if src is not None else {}
        except BaseException:
            arc.close()
            raise
        return cls(arc, src, csv_name, rows, [m for m in arc.members if m not in exclude], errors)

    def close(self) -> None:
        if self.annotations is not None and self.annotations is not self.archive:
            self.annotations.close()
        self.archive.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def masks(self, uid: str) -> dict[str, str]:
        """view -> mask member name of a study, from the folder holding annotations.csv."""
        if self.annotations is None or self.csv_name is None:
            return {}
        base = str(PurePosixPath(self.csv_name).parent)
        prefix = "" if base == "." else f"{base}/"
        return {view: f"{prefix}{MASKS_DIR}/{uid}/{view}.png" for view in VIEWS
                if self.annotations.has(f"{prefix}{MASKS_DIR}/{uid}/{view}.png")}

    def job(self, key: str, patient: str, uid: str, objects: list[tuple[str, Header]]) -> StudyJob:
        return StudyJob(key, patient, sorted(n for n, _ in objects), self.rows.get(uid), self.masks(uid),
                        self.csv_name or ANNOTATIONS_CSV)

    def unmatched_rows(self, studies: dict) -> list[tuple[str, str]]:
        """Annotation rows whose study is not in the archive, by line number."""
        out = []
        for uid, a in self.rows.items():
            if uid not in studies:
                lines = sorted(a.rows + [int(p.split()[1]) for p in a.problems if p.startswith("line ")])
                shown = ", ".join(map(str, lines[:10])) + (" ..." if len(lines) > 10 else "")
                out.append((self.csv_name, f"lines {shown}: study_uid matches no DICOM study in the archive"))
        return out


def _find_annotations(arc: Archive, annotations: Path | None) -> tuple[Archive | None, str | None, set[str]]:
    """(source archive, csv member name, members to exclude from DICOM reading)."""
    if annotations is not None:
        src = Archive.open(annotations)
        if src.kind != "dir":
            src.close()
            raise UsageError(f"--annotations must be a folder holding {ANNOTATIONS_CSV} and {MASKS_DIR}/: "
                             f"{annotations}")
        if not src.has(ANNOTATIONS_CSV):
            src.close()
            raise UsageError(f"{annotations}: no {ANNOTATIONS_CSV}")
        return src, ANNOTATIONS_CSV, set()
    found = [m for m in arc.members if PurePosixPath(m).name == ANNOTATIONS_CSV]
    if not found:
        return None, None, set()
    if len(found) > 1:
        raise UsageError(f"{arc.path}: several {ANNOTATIONS_CSV} ({', '.join(found)}); pass --annotations DIR")
    base = PurePosixPath(found[0]).parent
    prefix = "" if str(base) == "." else f"{base}/"
    exclude = {found[0]} | {m for m in arc.members if m.startswith(f"{prefix}{MASKS_DIR}/")}
    return arc, found[0], exclude


# -- the header pass ----------------------------------------------------------------------------------
def header_of(arc: Archive, name: str) -> Header | str:
    """A member's DICOM header, or the reason it is not one we can use."""
    try:
        if arc.size(name) == 0:
            return "empty file"
        with arc.open_member(name) as fh:
            return read_header(fh)
    except Rejected as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read ({exc})"


def group_studies(headers, errors: list[tuple[str, str]]) -> dict[str, list[tuple[str, Header]]]:
    """(member, header or reason) pairs → study uid → its objects, in the order given. Unreadable
    members and second copies of an object (same SOP Instance UID) go to `errors`."""
    studies: dict[str, list[tuple[str, Header]]] = defaultdict(list)
    first_sop: dict[str, str] = {}
    for name, res in headers:
        if isinstance(res, str):
            errors.append((name, res))
        elif res.directory:
            log.debug("skipping DICOMDIR %s", name)
        elif res.sop_uid in first_sop:
            errors.append((name, f"duplicate SOP Instance UID: same object as {first_sop[res.sop_uid]}; "
                                 "not read twice"))
        else:
            first_sop[res.sop_uid] = name
            studies[res.study_uid].append((name, res))
    return studies


def in_archive_order(studies: dict[str, list[tuple[str, Header]]]):
    """(uid, objects) pairs by the first member's name: a stable order whatever the header pass did."""
    return sorted(studies.items(), key=lambda kv: kv[1][0][0])


def patient_id_of(objects: list[tuple[str, Header]]) -> str:
    """The study's Patient ID: the first object that has one ('' when none does)."""
    return next((h.patient_id for _, h in objects if h.patient_id), "")


# -- the study pass --------------------------------------------------------------------------------------
def assemble_study(job: StudyJob, errors: list[tuple[str, str]], arc: Archive,
                   masks: Archive | None) -> StudyData | None:
    """Decode a study's objects, identify its views and check its annotations against them.

    None when an object or the annotations fail (the reasons are added to `errors`); raises Rejected
    when the study as a whole cannot be used (two views of one name, sizes differ)."""
    views: dict[str, np.ndarray] = {}
    sources, origin = [], {}
    failed = set()
    for name in job.members:
        try:
            obj = decode(arc.read(name))
        except Rejected as exc:
            errors.append((name, str(exc)))
            failed.add(name)
            continue
        except OSError as exc:
            errors.append((name, f"cannot read ({exc})"))
            failed.add(name)
            continue
        sources.append(obj.meta)
        for v in obj.views:
            vname = v.name
            if vname in views and vname != UNKNOWN_VIEW:
                raise Rejected(f"study has two {vname} views ({origin[vname]} and {name}); skipped")
            if vname == UNKNOWN_VIEW:
                k = sum(1 for n in views if n.startswith(UNKNOWN_VIEW))
                vname = UNKNOWN_VIEW if k == 0 else f"{UNKNOWN_VIEW}_{k}"
            views[vname] = v.pixels
            origin[vname] = name
    if failed:
        errors.extend((m, "skipped: another object of the same study failed") for m in job.members
                      if m not in failed)
        return None
    shapes = {(arr.shape, arr.dtype.str) for arr in views.values()}
    if len(shapes) > 1:
        raise Rejected("views of one study differ in size or pixel type "
                       f"({', '.join(f'{v} {a.shape[0]}x{a.shape[1]} {a.dtype}' for v, a in views.items())}); skipped")

    labels: dict[str, np.ndarray] = {}
    lesions = []
    a = job.annotations
    if a is not None:
        problems = _check_annotations(job, views, masks, labels, lesions)
        if problems:
            errors.extend(problems)
            errors.extend((m, "skipped: its annotations have problems (listed above)") for m in job.members)
            return None
        lesions.sort(key=lambda les: les["lesion_id"])

    attrs = {
        "patient": job.patient,
        "annotated": a is not None,
        "tumor_type": a.tumor_type if a is not None else None,
        "views": list(views),
        "lesions": lesions,
        "sources": sources,
        "dtypes": {v: str(arr.dtype) for v, arr in views.items()},
    }
    return StudyData(job.key, attrs, views, labels)


def _check_annotations(job: StudyJob, views: dict[str, np.ndarray], masks: Archive | None,
                       labels: dict, lesions: list) -> list[tuple[str, str]]:
    """Fill `labels` and `lesions` from the study's rows and masks; the problems found, if any."""
    a, csv_name = job.annotations, job.csv_name
    problems = [(csv_name, p) for p in a.problems]
    by_view: dict[str, dict[int, ann.Lesion]] = defaultdict(dict)
    for les in a.lesions:
        by_view[les.view][les.lesion_id] = les
    for view in sorted(set(by_view) | set(job.masks)):
        rows = by_view.get(view, {})
        if view not in views:
            if rows:
                problems.append((csv_name, f"lines {', '.join(str(r.row) for r in rows.values())}: annotation "
                                 f"rows name the {view} view, which the DICOM does not identify"))
            continue
        if view not in job.masks:
            problems.append((csv_name, f"no mask {MASKS_DIR}/<study_uid>/{view}.png for the annotated {view} view"))
            continue
        member = job.masks[view]
        try:
            mask = ann.read_mask(masks.read(member), member, views[view].shape)
        except (ValueError, OSError) as exc:
            problems.append((member, str(exc)))
            continue
        ids, areas = np.unique(mask, return_counts=True)
        present = {int(i): int(c) for i, c in zip(ids, areas) if i}
        for lid in sorted(set(rows) - set(present)):
            problems.append((member, f"lesion {lid} (line {rows[lid].row}) has no pixels in the mask"))
        for lid in sorted(set(present) - set(rows)):
            problems.append((member, f"mask value {lid} has no annotation row"))
        if rows:
            labels[view] = mask
        for lid in sorted(rows):
            lesions.append({"lesion_id": lid, "view": view, "label": rows[lid].label, "area": present.get(lid, 0)})
    return problems


# -- worker processes -------------------------------------------------------------------------------------
# Module-level so that spawned processes can import it: the archive, the annotation source and what the
# stage adds (its `extra`), set once per worker by the pool's initializer.
_STATE: dict = {}


def worker_state() -> dict:
    """This process's archive ('archive'), annotation source ('masks') and the stage's extras."""
    return _STATE


def _init_worker(archive: Archive, masks: Archive | None, extra: dict) -> None:
    _STATE.clear()
    _STATE.update(extra, archive=archive, masks=masks)


def _header_task(name: str) -> tuple[str, Header | str]:
    return name, header_of(_STATE["archive"], name)


def assemble(job: StudyJob) -> tuple[StudyData | None, list[tuple[str, str]]]:
    """The study task's common part, in a worker: the study (or None) and the reasons it failed."""
    errors: list[tuple[str, str]] = []
    try:
        data = assemble_study(job, errors, _STATE["archive"], _STATE["masks"])
    except Rejected as exc:
        errors.append((job.members[0], str(exc)))
        data = None
    return data, errors


class _Inline:
    """The executor interface, run in the calling process (workers = 0)."""

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # surfaces in the caller as the pool would surface it
            fut.set_exception(exc)
        return fut

    def map(self, fn, items, chunksize=1):
        return map(fn, items)

    def shutdown(self, cancel_futures=False):
        pass


class StudyPool:
    """`workers` decoding processes (0: this process) that know the source and the stage's extras."""

    def __init__(self, source: StudySource, workers: int, extra: dict | None = None):
        initargs = (source.archive, source.annotations, dict(extra or {}))
        if workers <= 0:
            _init_worker(*initargs)
            self.executor = _Inline()
        else:
            # spawn, not fork: the parent holds zarr's I/O thread and torch's threads, which do not
            # survive a fork.
            self.executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker, initargs=initargs)

    def headers(self, members: list[str], progress: bool = True):
        """(member, header or reason) for every member, lazily, with a progress bar on stderr."""
        it = self.executor.map(_header_task, members, chunksize=max(1, min(32, len(members) // 64)))
        return tqdm(it, total=len(members), desc="reading headers", unit="file", file=sys.stderr,
                    dynamic_ncols=True, mininterval=0.5, disable=None if progress else True)

    def map(self, fn, items: list, desc: str):
        it = self.executor.map(fn, items, chunksize=max(1, min(32, len(items) // 64)))
        return tqdm(it, total=len(items), desc=desc, unit="study", file=sys.stderr, dynamic_ncols=True,
                    mininterval=0.5, disable=None)

    def submit(self, fn, *args) -> Future:
        return self.executor.submit(fn, *args)

    def shutdown(self) -> None:
        self.executor.shutdown(cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
