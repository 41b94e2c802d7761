"""`wbs-dist ingest`: DICOM archive + annotations → de-identified Zarr store, in parallel, resumable.

Two passes over the archive. Pass 1 reads headers only (cheap) to group objects into studies, find
duplicates and map annotation rows; pass 2 decodes one study per task in worker processes and writes
it atomically (store.Store.write_study). Studies already in the store are skipped, so a rerun after
a kill finishes the job. Every refused input is listed with its reason in the errors CSV and the run
exits 3; the rest is ingested.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from . import annotations as ann
from .archive import Archive
from .atomic import write_csv
from .deid import keyed_hash, load_or_create_secret
from .dicom import Header, Rejected, decode, read_header
from .errors import EXIT_OK, EXIT_SKIPPED, UsageError
from .store import Store, StudyData

log = logging.getLogger("wbs_dist.ingest")


@dataclass
class StudyJob:
    key: str
    patient: str
    members: list[str]
    annotations: ann.StudyAnnotations | None
    masks: dict[str, str]                       # view -> mask member name in the annotation source
    csv_name: str = "annotations.csv"


@dataclass
class StudyOutcome:
    key: str
    written: bool = False
    lesions: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)


# -- worker side (module-level so spawned processes can import it) ----------------------------------
_WORKER: dict = {}


def _init_worker(archive: Archive, masks: Archive | None, store_path: Path) -> None:
    _WORKER.update(archive=archive, masks=masks, store=Store.open(store_path))


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


def _header_task(name: str) -> tuple[str, Header | str]:
    return name, header_of(_WORKER["archive"], name)


def _study_task(job: StudyJob) -> StudyOutcome:
    out = StudyOutcome(job.key)
    try:
        data = assemble_study(job, out, _WORKER["archive"], _WORKER["masks"])
    except Rejected as exc:
        out.errors.append((job.members[0], str(exc)))
        return out
    if data is not None:
        out.written = _WORKER["store"].write_study(data)
        out.lesions = len(data.attrs["lesions"])
    return out


def assemble_study(job: StudyJob, out: StudyOutcome, arc: Archive, masks: Archive | None) -> StudyData | None:
    """Decode a study's objects, identify its views and check its annotations against them.

    None when an object or the annotations fail (the reasons are added to `out.errors`); raises
    Rejected when the study as a whole cannot be used (two views of one name, sizes differ)."""
    views: dict[str, np.ndarray] = {}
    sources, origin = [], {}
    failed = False
    for name in job.members:
        try:
            obj = decode(arc.read(name))
        except Rejected as exc:
            out.errors.append((name, str(exc)))
            failed = True
            continue
        except OSError as exc:
            out.errors.append((name, f"cannot read ({exc})"))
            failed = True
            continue
        sources.append(obj.meta)
        for v in obj.views:
            vname = v.name
            if vname in views and vname != "unknown":
                raise Rejected(f"study has two {vname} views ({origin[vname]} and {name}); not ingested")
            if vname == "unknown":
                k = sum(1 for n in views if n.startswith("unknown"))
                vname = "unknown" if k == 0 else f"unknown_{k}"
            views[vname] = v.pixels
            origin[vname] = name
    if failed:
        others = [m for m in job.members if m not in {e[0] for e in out.errors}]
        for m in others:
            out.errors.append((m, "not ingested: another object of the same study failed"))
        return None
    shapes = {(arr.shape, arr.dtype.str) for arr in views.values()}
    if len(shapes) > 1:
        raise Rejected("views of one study differ in size or pixel type "
                       f"({', '.join(f'{v} {a.shape[0]}x{a.shape[1]} {a.dtype}' for v, a in views.items())}); not ingested")

    labels: dict[str, np.ndarray] = {}
    lesions = []
    a = job.annotations
    if a is not None:
        csv_name = job.csv_name
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
                problems.append((csv_name, f"no mask masks/<study_uid>/{view}.png for the annotated {view} view"))
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
        if problems:
            out.errors.extend(problems)
            out.errors.extend((m, "not ingested: its annotations have problems (listed above)") for m in job.members)
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


# -- driver -------------------------------------------------------------------------------------------
def find_annotations(arc: Archive, annotations: Path | None) -> tuple[Archive | None, str | None, set[str]]:
    """(source archive, csv member name, members to exclude from DICOM reading)."""
    if annotations is not None:
        src = Archive.open(annotations)
        if src.kind != "dir":
            raise UsageError(f"--annotations must be a folder holding annotations.csv and masks/: {annotations}")
        if not src.has("annotations.csv"):
            raise UsageError(f"{annotations}: no annotations.csv")
        return src, "annotations.csv", set()
    found = [m for m in arc.members if PurePosixPath(m).name == "annotations.csv"]
    if not found:
        return None, None, set()
    if len(found) > 1:
        raise UsageError(f"{arc.path}: several annotations.csv ({', '.join(found)}); pass --annotations DIR")
    base = PurePosixPath(found[0]).parent
    prefix = "" if str(base) == "." else f"{base}/"
    exclude = {found[0]} | {m for m in arc.members if m.startswith(f"{prefix}masks/")}
    return arc, found[0], exclude


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


def mask_members(ann_src: Archive | None, csv_name: str | None, uid: str) -> dict[str, str]:
    """view → mask member name for a study, from the folder holding annotations.csv."""
    if ann_src is None or csv_name is None:
        return {}
    base = str(PurePosixPath(csv_name).parent)
    prefix = "" if base == "." else f"{base}/"
    return {view: f"{prefix}masks/{uid}/{view}.png" for view in ann.VIEWS
            if ann_src.has(f"{prefix}masks/{uid}/{view}.png")}


def _pool(workers: int, initargs):
    if workers <= 1:
        _init_worker(*initargs)
        return None
    # spawn, not fork: the parent holds zarr's I/O thread, which does not survive a fork.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=initargs)


def _map(pool, fn, items, desc: str):
    it = map(fn, items) if pool is None else pool.map(fn, items, chunksize=max(1, min(32, len(items) // 64)))
    return tqdm(it, total=len(items), desc=desc, unit="file" if fn is _header_task else "study",
                file=sys.stderr, dynamic_ncols=True, mininterval=0.5, disable=None)


def run_ingest(archive: Path, store: Path, annotations: Path | None = None, secret_file: Path | None = None,
               workers: int = 2, train_size: tuple[int, int] = (512, 256), errors_path: Path | None = None) -> int:
    secret = load_or_create_secret(secret_file)
    if Path(store).resolve() == Path(archive).resolve():
        raise UsageError("the store cannot be the archive itself")
    with Archive.open(archive) as arc:
        ann_src, csv_name, exclude = find_annotations(arc, annotations)
        st = Store.create_or_open(store, train_size)
        st.clear_staging()                     # leftovers of an interrupted run are never trusted
        errors: list[tuple[str, str]] = [(r.path, r.reason) for r in arc.refused]
        if ann_src is not None and ann_src is not arc:
            errors += [(f"{annotations}/{r.path}", r.reason) for r in ann_src.refused]
        rows = ann.parse_annotations(ann_src.read(csv_name), csv_name) if ann_src is not None else {}

        candidates = [m for m in arc.members if m not in exclude]
        pool = _pool(workers, (arc, ann_src, st.path))
        try:
            # Pass 1: headers → studies.
            studies = group_studies(_map(pool, _header_task, candidates, "reading headers"), errors)

            # Annotation rows for studies that are not in the archive.
            for uid, a in rows.items():
                if uid not in studies:
                    lines = sorted(a.rows + [int(p.split()[1]) for p in a.problems if p.startswith("line ")])
                    shown = ", ".join(map(str, lines[:10])) + (" ..." if len(lines) > 10 else "")
                    errors.append((csv_name, f"lines {shown}: study_uid matches no DICOM study in the archive"))

            jobs, patients_tumor = [], defaultdict(set)
            skipped_existing = 0
            for uid, objs in sorted(studies.items(), key=lambda kv: kv[1][0][0]):
                patient_id = next((h.patient_id for _, h in objs if h.patient_id), "")
                # A study without Patient ID becomes its own patient: never merged with a stranger.
                patient = keyed_hash(secret, "patient", patient_id) if patient_id else keyed_hash(secret, "patient-of-study", uid)
                key = keyed_hash(secret, "study", uid)
                a = rows.get(uid)
                if a is not None and a.tumor_type:
                    patients_tumor[patient].add(a.tumor_type)
                masks = mask_members(ann_src, csv_name, uid)
                if st.has_study(key):
                    skipped_existing += 1
                    continue
                jobs.append(StudyJob(key, patient, sorted(n for n, _ in objs), a, masks, csv_name or "annotations.csv"))
            conflicted = {p for p, types in patients_tumor.items() if len(types) > 1}
            for job in jobs:
                if job.patient in conflicted and job.annotations is not None:
                    job.annotations.problems.append("tumor_type differs between studies of the same patient")

            # Pass 2: decode and write, one study per task.
            written = lesions = 0
            for outcome in _map(pool, _study_task, jobs, "ingesting"):
                errors.extend(outcome.errors)
                written += outcome.written
                lesions += outcome.lesions
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        counts = st.rebuild_lesion_table()
        st.clear_staging()
        # Beside the store, not in it: it names archive paths, and zarr would list it as a stray node.
        errors_path = Path(errors_path) if errors_path else st.path.with_name(st.path.name + ".errors.csv")
        _write_errors(errors_path, errors)

    print(f"store {st.path}: {counts['studies']} studies ({written} new, {skipped_existing} already there), "
          f"{counts['annotated_studies']} annotated, {counts['lesions']} lesions "
          f"({counts['malignant_lesions']} malignant)")
    if errors:
        _summarise(errors, errors_path)
        return EXIT_SKIPPED
    return EXIT_OK


def _write_errors(path: Path, errors: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(path, ["path", "reason"], errors)


def _summarise(errors: list[tuple[str, str]], path: Path) -> None:
    kinds = Counter(reason.split(" (")[0].split(":")[0] for _, reason in errors)
    print(f"wbs-dist ingest: {len(errors)} input(s) skipped, listed with reasons in {path}:", file=sys.stderr)
    for reason, n in kinds.most_common(12):
        print(f"  {n:6d}  {reason}", file=sys.stderr)
    for p, reason in errors[:20]:
        print(f"  {p}: {reason}", file=sys.stderr)
    if len(errors) > 20:
        print(f"  ... and {len(errors) - 20} more", file=sys.stderr)
