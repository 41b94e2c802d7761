"""Reading studies out of an archive: shared by ingest (-> store) and score (-> predictions).

Two passes over the archive. The header pass reads every member's DICOM header only (cheap) and
groups the objects into studies, setting aside unreadable members and second copies of an object.
The study pass decodes one study per task, identifies its views and checks its annotations against
them (`assemble_study`). Both passes run in a pool of worker processes (data/workers.py); each stage
adds its own work to the study task (ingest writes the study into the store, score finds candidates
and builds the network's images).

Annotations (DESIGN 3.2) are found beside the DICOM files (one annotations.csv anywhere in the
archive, its masks/ beside it) or in a folder given apart. Messages are the stage's to frame: a
study that cannot be used is "skipped", with each reason listed.

Budgets (`Budgets`, the --max-object-mb and --max-views options of ingest and score) are checked
before work: archive members by their declared sizes (archive.py), DICOM objects and studies by
their headers' declared pixel data and frame counts, masks by their PNG headers. Whatever a member
or a study raises while it is read or decoded (MemoryError, a bad zip CRC, zlib or PIL errors, ...)
becomes that input's listed error; the rest of the archive is read.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from wbs_dist.data import annotations as ann
from wbs_dist.data.archive import DEFAULT_MAX_OBJECT_MB, MEMBER_SLACK, MiB, Archive
from wbs_dist.data.dicom import Header, Rejected, decode, read_header
from wbs_dist.errors import InputError, UsageError
from wbs_dist.schema import ANNOTATIONS_CSV, MASKS_DIR, UNKNOWN_VIEW, VIEWS

log = logging.getLogger("wbs_dist.studies")

DEFAULT_MAX_VIEWS = 8   # a whole-body study has 2 (anterior, posterior); spot views and repeats add a few


@dataclass(frozen=True)
class Budgets:
    """Ceilings checked before anything is decoded. The default object ceiling is generous: a
    whole-body NM object (1024 x 256, 2 frames, int16) is 1 MiB."""

    max_object_mb: float = DEFAULT_MAX_OBJECT_MB   # declared pixel data of one object, and of one study
    max_views: int = DEFAULT_MAX_VIEWS             # declared frames (views) of one study

    def __post_init__(self):
        if not 0 < self.max_object_mb < float("inf"):
            raise UsageError(f"--max-object-mb must be > 0 (got {self.max_object_mb})")
        if self.max_views < 1:
            raise UsageError(f"--max-views must be >= 1 (got {self.max_views})")

    @property
    def object_bytes(self) -> int:
        return int(self.max_object_mb * MiB)

    @property
    def member_bytes(self) -> int:
        """The largest archive member read: the object ceiling plus room for headers."""
        return self.object_bytes + MEMBER_SLACK


def exception_text(exc: BaseException) -> str:
    """'Type: message', one line. An OSError gives its strerror alone: its file name would be a path
    in the private temporary folder, which means nothing to the user (the member is named already)."""
    msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    msg = msg.splitlines()[0][:300] if msg else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


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
    views: int = 0                              # frames its objects' headers declare
    nbytes: int = 0                             # pixel data its objects' headers declare


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
    budgets: Budgets = field(default_factory=Budgets)

    @classmethod
    def open(cls, archive: Path, annotations: Path | None = None,
             budgets: Budgets | None = None) -> "StudySource":
        budgets = budgets or Budgets()
        arc = Archive.open(archive, budgets.member_bytes)
        src = None
        try:
            src, csv_name, exclude = _find_annotations(arc, annotations, budgets.member_bytes)
            errors = [(r.path, r.reason) for r in arc.refused]
            if src is not None and src is not arc:
                errors += [(f"{annotations}/{r.path}", r.reason) for r in src.refused]
            rows = ann.parse_annotations(_read_csv(src, csv_name), csv_name) if src is not None else {}
        except BaseException:
            if src is not None and src is not arc:
                src.close()
            arc.close()
            raise
        return cls(arc, src, csv_name, rows, [m for m in arc.members if m not in exclude], errors, budgets)

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
                        self.csv_name or ANNOTATIONS_CSV, views=sum(h.frames for _, h in objects),
                        nbytes=sum(h.nbytes for _, h in objects))

    def unmatched_rows(self, studies: dict) -> list[tuple[str, str]]:
        """Annotation rows whose study is not in the archive, by line number."""
        out = []
        for uid, a in self.rows.items():
            if uid not in studies:
                lines = sorted(a.rows + [int(p.split()[1]) for p in a.problems if p.startswith("line ")])
                shown = ", ".join(map(str, lines[:10])) + (" ..." if len(lines) > 10 else "")
                out.append((self.csv_name, f"lines {shown}: study_uid matches no DICOM study in the archive"))
        return out


def _read_csv(src: Archive, csv_name: str) -> bytes:
    """annotations.csv's bytes. Unreadable (a bad zip CRC, a refused member) stops the run (exit 2):
    ingesting its studies as unannotated would hide the problem, and a rerun would keep them so."""
    if not src.has(csv_name):
        reason = next((r.reason for r in src.refused if r.path == csv_name), "not readable")
        raise InputError(f"{csv_name}: {reason}")
    try:
        return src.read(csv_name)
    except Exception as exc:
        raise InputError(f"{csv_name}: cannot read ({exception_text(exc)})") from None


def _find_annotations(arc: Archive, annotations: Path | None,
                      member_limit: int | None = None) -> tuple[Archive | None, str | None, set[str]]:
    """(source archive, csv member name, members to exclude from DICOM reading)."""
    if annotations is not None:
        src = Archive.open(annotations, member_limit)
        if src.kind != "dir":
            src.close()
            raise UsageError(f"--annotations must be a folder holding {ANNOTATIONS_CSV} and {MASKS_DIR}/: "
                             f"{annotations}")
        if not src.has(ANNOTATIONS_CSV) and not any(r.path == ANNOTATIONS_CSV for r in src.refused):
            src.close()
            raise UsageError(f"{annotations}: no {ANNOTATIONS_CSV}")
        return src, ANNOTATIONS_CSV, set()
    found = [m for m in arc.members if PurePosixPath(m).name == ANNOTATIONS_CSV]
    found += [r.path for r in arc.refused if PurePosixPath(r.path).name == ANNOTATIONS_CSV
              and not r.reason.startswith("refused: absolute") and "escapes" not in r.reason
              and "link" not in r.reason]          # too large, encrypted, ...: named, not ignored
    if not found:
        return None, None, set()
    if len(found) > 1:
        raise UsageError(f"{arc.path}: several {ANNOTATIONS_CSV} ({', '.join(found)}); pass --annotations DIR")
    base = PurePosixPath(found[0]).parent
    prefix = "" if str(base) == "." else f"{base}/"
    exclude = {found[0]} | {m for m in arc.members if m.startswith(f"{prefix}{MASKS_DIR}/")}
    return arc, found[0], exclude


# -- the header pass ----------------------------------------------------------------------------------
def header_of(arc: Archive, name: str, budgets: Budgets | None = None) -> Header | str:
    """A member's DICOM header, or the reason it is not one we can use."""
    budgets = budgets or Budgets()
    try:
        if arc.size(name) == 0:
            return "empty file"
        with arc.open_member(name) as fh:
            return read_header(fh, budgets.object_bytes)
    except Rejected as exc:
        return str(exc)
    except Exception as exc:  # OSError, a bad zip member (BadZipFile, zlib.error), MemoryError, ...
        return f"cannot read ({exception_text(exc)})"


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
                   masks: Archive | None, budgets: Budgets | None = None) -> StudyData | None:
    """Decode a study's objects, identify its views and check its annotations against them.

    None when an object or the annotations fail (the reasons are added to `errors`); raises Rejected
    when the study as a whole cannot be used (two views of one name, sizes differ, too many views)."""
    budgets = budgets or Budgets()
    # Budgets of the study as a whole, from its headers, before anything is decoded: each object is
    # within the ceiling already (header pass), but many of them together need not be.
    if job.views > budgets.max_views:
        raise Rejected(f"study declares {job.views} views in {len(job.members)} object(s), more than the "
                       f"{budgets.max_views} allowed (--max-views); skipped, not decoded")
    if job.nbytes > budgets.object_bytes:
        raise Rejected(f"study declares {job.nbytes / MiB:.1f} MiB of pixel data in {len(job.members)} "
                       f"object(s), over the {budgets.max_object_mb:g} MiB ceiling (--max-object-mb); "
                       "skipped, not decoded")
    views: dict[str, np.ndarray] = {}
    sources, origin = [], {}
    failed = set()
    for name in job.members:
        try:
            obj = decode(arc.read(name), budgets.object_bytes)
        except Rejected as exc:
            errors.append((name, str(exc)))
            failed.add(name)
            continue
        except Exception as exc:  # OSError, BadZipFile (bad CRC), zlib.error, MemoryError: this object's error
            log.debug("reading %s failed", name, exc_info=True)
            errors.append((name, f"cannot read ({exception_text(exc)})"))
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
    if len(views) > budgets.max_views:   # the headers said fewer frames than the pixel data holds
        raise Rejected(f"study has {len(views)} views, more than the {budgets.max_views} allowed "
                       "(--max-views); skipped")
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
        except ValueError as exc:
            problems.append((member, str(exc)))
            continue
        except Exception as exc:  # reading the member: OSError, a bad zip CRC, zlib.error, MemoryError
            problems.append((member, f"{member}: cannot read ({exception_text(exc)})"))
            continue
        # bincount, not np.unique: a count per label value without sorting the mask (np.unique's sort
        # was 0.94 s of a 22.5 s one-process ingest of 100 studies); uint16 ids bound its length.
        areas = np.bincount(mask.ravel())
        present = {int(i): int(c) for i, c in enumerate(areas) if i and c}
        for lid in sorted(set(rows) - set(present)):
            problems.append((member, f"lesion {lid} (line {rows[lid].row}) has no pixels in the mask"))
        for lid in sorted(set(present) - set(rows)):
            problems.append((member, f"mask value {lid} has no annotation row"))
        if rows:
            labels[view] = mask
        for lid in sorted(rows):
            lesions.append({"lesion_id": lid, "view": view, "label": rows[lid].label, "area": present.get(lid, 0)})
    return problems
