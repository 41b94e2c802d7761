"""`wbs-dist score`: an archive's lesions scored by the fold ensemble, streamed, sharded, resumable.

    wbs-dist score ARCHIVE --run RUN_DIR --out PRED.csv [--fold K] [--shard I/N] [--overlays DIR]

Reads DICOM studies straight from a folder, .zip or .tar(.gz) (no store), in the two passes of
data/studies.py, shared with ingest: headers only, to group objects into studies; then one study
per task in worker processes: decode and identify views (`studies.assemble`), lesions from the
annotations (DESIGN 3.2) when the study has rows, else hot-spot candidates (`candidates`), and the
training level (`preprocess.training_level`, `preprocess.count_scale`). The main process turns each
lesion into the network input with the training code itself (`preprocess.normalise`,
`preprocess.make_input`), batches lesions across studies, and runs the models (ensemble.py) while
the workers decode the next studies (a bounded number of studies in flight, so memory stays flat
whatever the archive's size). A lesion's score is the mean of the folds' probabilities; `--fold K`
scores with one fold. Out-of-fold rule (known.py): a study whose patient is in the run's store is
scored by the model of that patient's validation fold alone, never by models that trained on it.

Outputs (an unsharded run):
    PRED.csv            one row per lesion (DESIGN 3.3): `fold` the validation fold of a patient the
                        run trained on, empty for a new patient (the ensemble); `label` 1/0 from the
                        annotations or empty, `tumor_type` from the annotations or empty,
                        `lesion_count` = lesions scored in the study
    PRED.summary.csv    one row per study: source (annotated | candidates), views, lesions, highest
                        score and its lesion, fold as in PRED.csv
    PRED.errors.csv     every input not scored, with the reason (exit status 3 when not empty)
    --overlays DIR      DIR/<study_uid>.png: the views side by side, lesion contours coloured by
                        score (green 0 -> yellow -> red 1), for review; a UID that is not a valid
                        DICOM UID is named by its hash, uid-<16 hex>.png (overlay.py)

These outputs go back to the site that owns the archive, which must be able to act on them: they
carry the original Study Instance UID and Patient ID and are therefore identifying, unlike the
store; they are written readable by their owner only. Logs and progress output never show them.

Views: anterior on the left half and posterior on the right, as in training. A view the DICOM does
not identify (`unknown`, e.g. the NEMA NM1 scan) is never paired by guess: it is scored alone in
the anterior slot (the posterior half empty, as for a study without a posterior view), and its
lesions are reported with view `unknown`. Annotations cannot name such a view, so it is scored in
candidate studies only.

Resumable and sharded: results go to PRED.csv.parts/ (parts.py). `--shard I/N` takes the studies whose uid hashes to I mod N and writes parts only; the merge is the
same command without `--shard`, which also scores whatever the shards left undone (a failed array
task, say) and checks the result against the whole archive. slurm/score.sh does both.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from wbs_dist import finder
from wbs_dist.atomic import PRIVATE, write_csv
from wbs_dist.data.shards import parse_shard, shard_of
from wbs_dist.data.studies import (DEFAULT_MAX_OBJECT_MB, DEFAULT_MAX_VIEWS, Budgets, StudyJob, StudySource,
                                   group_studies, in_archive_order, patient_id_of)
from wbs_dist.data.workers import StudyPool, assemble, worker_state
from wbs_dist.errors import UsageError
from wbs_dist.infer import learned
from wbs_dist.infer.ensemble import finished_folds
from wbs_dist.infer.known import ENSEMBLE, known_patients
from wbs_dist.infer.parts import PART_FORMAT, Parts, errors_path, merge, summary_path
from wbs_dist.preprocess import count_scale, detection_level, make_input, normalise, training_level
from wbs_dist.schema import ANTERIOR, LABEL_CODES, VIEWS, view_order

FLUSH_SECONDS = 60.0
ERRORS_COLUMNS = ("path", "reason")


@dataclass
class ScoreResult:
    out: Path
    shard: tuple[int, int] | None
    scored: int                     # studies scored by this run
    already: int                    # studies found done in the parts
    lesions: int                    # lesions scored by this run
    seconds: float
    errors: list[tuple[str, str]]   # inputs not scored, with the reason
    errors_path: Path
    merged: tuple[int, int] | None  # (studies, lesions) written to OUT; None for a shard
    known: int = 0                  # studies of patients the run trained on (scored out-of-fold or listed)
    unrecognised: str = ""          # why such patients could not be recognised ('' when they could)

    @property
    def summary_path(self) -> Path:
        return summary_path(self.out)


# -- worker side (no torch here: spawned workers import this module) ---------------------------------
@dataclass
class Scan:
    """One network image of a study: counts at the training level, its scale and label map."""

    image: np.ndarray
    scale: float
    labels: np.ndarray
    slots: dict[str, str] = field(default_factory=dict)     # half of the image (VIEWS) -> the view in it
    detect: np.ndarray | None = None                         # learned candidates: the detector's input
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)   # slot -> native (rows, cols)


@dataclass
class StudyResult:
    uid: str
    patient_id: str
    source: str = ""                                   # annotated | candidates (classical) | learned
    tumor_type: str = ""
    views: list[str] = field(default_factory=list)
    scans: list[Scan] = field(default_factory=list)
    lesions: list[tuple[int, str, str, int]] = field(default_factory=list)  # id, view, label, scan
    errors: list[tuple[str, str]] = field(default_factory=list)
    native: dict[str, np.ndarray] | None = None        # for overlays
    native_labels: dict[str, np.ndarray] | None = None


def _study_task(job: StudyJob) -> StudyResult:
    res = StudyResult(job.key, job.patient)
    data, res.errors = assemble(job)
    if data is None:
        return res
    views = data.views
    if job.annotations is not None:
        res.source, res.tumor_type = "annotated", job.annotations.tumor_type or ""
        labels = data.labels
        lesions = [(les["lesion_id"], les["view"], str(LABEL_CODES[les["label"]]))
                   for les in data.attrs["lesions"]]
    elif worker_state()["candidates"] == "learned":
        res.source, labels, lesions = "learned", {}, []       # the main process runs the detector (learned.py)
    else:
        res.source = "candidates"
        labels, regions = finder.find_candidates(views)
        lesions = [(reg.label, reg.view, "") for reg in regions]
    res.views = sorted(views, key=view_order)
    height, width = worker_state()["size"]
    # Identified views share one image; each unidentified view is an image of its own, in the
    # anterior slot (never paired by guess).
    slots = {v: 0 for v in res.views if v in VIEWS}
    groups = [{v: v for v in slots}] if slots else []
    for v in res.views:
        if v not in VIEWS:
            slots[v] = len(groups)
            groups.append({ANTERIOR: v})
    for group in groups:
        image, lab = training_level({slot: views[v] for slot, v in group.items()},
                                    {slot: labels[v] for slot, v in group.items() if v in labels}, height, width)
        res.scans.append(Scan(image, count_scale(image), lab, dict(group)))
        if res.source == "learned":
            res.scans[-1].detect = detection_level({slot: views[v] for slot, v in group.items()}, {},
                                                   *worker_state()["detect_size"])[0]
            res.scans[-1].shapes = {slot: views[v].shape for slot, v in group.items()}
    res.lesions = [(lid, view, label, slots[view]) for lid, view, label in lesions]
    if worker_state()["overlays"]:
        res.native, res.native_labels = views, labels
    return res


# -- the run --------------------------------------------------------------------------------------------------
def _record(res: StudyResult, scores: np.ndarray, fold: int) -> dict:
    return {"study_uid": res.uid, "patient_id": res.patient_id, "source": res.source,
            "fold": None if fold == ENSEMBLE else fold,
            "tumor_type": res.tumor_type, "views": res.views,
            "lesions": [[lid, view, label, round(float(s), 6)]
                        for (lid, view, label, _), s in zip(res.lesions, scores)]}


class _Batcher:
    """Lesions of finished studies, scored in batches across studies; a study's record is ready
    once all its lesions are scored."""

    def __init__(self, ensemble, batch: int, folds: dict[str, int]):
        self.ensemble, self.batch, self.folds = ensemble, batch, folds
        self.queue: deque = deque()         # (study, lesion index)
        self.open: dict[str, list] = {}     # uid -> [result, normalised images, scores, remaining]

    def add(self, res: StudyResult) -> StudyResult | None:
        """Queue a study's lesions; returns it at once when it has none."""
        if not res.lesions:
            return res
        images = [normalise(scan.image, np.float32(scan.scale)) for scan in res.scans]
        self.open[res.uid] = [res, images, np.zeros(len(res.lesions)), len(res.lesions)]
        self.queue.extend((res.uid, i) for i in range(len(res.lesions)))
        return None

    @property
    def studies(self) -> int:
        return len(self.open)

    def run(self) -> list[tuple[StudyResult, np.ndarray]]:
        """Score up to one batch; the studies this completes."""
        items = [self.queue.popleft() for _ in range(min(self.batch, len(self.queue)))]
        x = np.stack([self._input(uid, i) for uid, i in items])
        probs = self.ensemble(x, np.array([self.folds.get(uid, ENSEMBLE) for uid, _ in items]))
        done = []
        for (uid, i), p in zip(items, probs):
            entry = self.open[uid]
            entry[2][i] = p
            entry[3] -= 1
            if entry[3] == 0:
                del self.open[uid]
                done.append((entry[0], entry[2]))
        return done

    def _input(self, uid: str, i: int) -> np.ndarray:
        res, images = self.open[uid][0], self.open[uid][1]
        lid, _, _, scan = res.lesions[i]
        return make_input(images[scan], res.scans[scan].labels, lid, self.ensemble.config.other_lesions_channel)


def score_archive(archive: Path, run: Path, out: Path, fold: int | None = None,
                  shard: tuple[int, int] | str | None = None, overlays: Path | None = None, workers: int = 2,
                  batch: int = 32, annotations: Path | None = None, part_size: int = 64,
                  max_object_mb: float = DEFAULT_MAX_OBJECT_MB, max_views: int = DEFAULT_MAX_VIEWS,
                  store: Path | None = None, secret_file: Path | None = None, detector: Path | None = None,
                  candidates_from: str | None = None) -> ScoreResult:
    """Score `archive` with the run's fold models into OUT (or, with a shard, into OUT's parts).
    Studies of patients in the run's store (`store`, default the run's config key) are scored by
    their validation fold's model only (known.py); `secret_file` as ingest's. Studies without
    annotations get candidates from `detector` (a run of task=detect folds: learned.py) or the
    classical finder; `candidates_from` ('learned' | 'classical') chooses explicitly."""
    from wbs_dist.infer.ensemble import Ensemble     # torch: the main process only

    out = Path(out)
    shard = parse_shard(shard) if isinstance(shard, str) else shard
    if batch < 1 or part_size < 1 or workers < 0:
        raise UsageError("--batch and --part-size must be >= 1, --workers >= 0")
    if out.suffix.lower() != ".csv":
        raise UsageError(f"--out {out}: expected a .csv path (summary and errors are written beside it)")
    finished, config = finished_folds(run, fold)
    explicit = candidates_from is not None
    candidates_from = candidates_from or ("learned" if detector is not None else "classical")
    if candidates_from not in ("learned", "classical") or (candidates_from == "learned" and detector is None):
        raise UsageError(f"--candidates {candidates_from}: 'classical', or 'learned' with --detector RUN_DIR")
    known = known_patients(store if store is not None else config.store, finished[0].split(), secret_file)
    mine = (lambda key: True) if shard is None else (lambda key: shard_of(key, shard[1]) == shard[0])
    t0 = time.perf_counter()
    budgets = Budgets(max_object_mb, max_views)      # a bad value: exit 2 before the archive is read
    # One writer per output and shard: the lock is taken once the parts folder exists and held until
    # the merge is written.
    with contextlib.ExitStack() as held:
        with StudySource.open(archive, annotations, budgets) as source:
            errors = list(source.errors)
            extra = {"size": tuple(config.train_size), "overlays": overlays is not None, "candidates": candidates_from,
                     "detect_size": tuple(finished_folds(detector, fold)[1].train_size)
                     if candidates_from == "learned" else None}
            with StudyPool(source, workers, extra) as pool:
                # The workers start and read headers while this process loads the models.
                headers = pool.headers(source.members)
                ensemble = Ensemble(run, fold)
                ensemble.detector = None
                if candidates_from == "learned":
                    ensemble.detector = learned.load_detector(detector, fold, ensemble.split, explicit)
                fingerprint = {"format": PART_FORMAT, "archive": str(Path(archive).resolve()),
                               "annotations": str(Path(annotations).resolve()) if annotations else None,
                               "run": ensemble.fingerprint(), "candidates": finder.PARAMETERS,
                               "known": known.fingerprint(), "from": candidates_from,
                               "detector": ensemble.detector.fingerprint() if ensemble.detector else None}
                out.parent.mkdir(parents=True, exist_ok=True)
                parts = Parts(out, fingerprint, "all" if shard is None else f"{shard[0]}of{shard[1]}")
                parts.open()
                held.enter_context(parts.writer(f"wbs-dist score {archive}"))
                studies = group_studies(headers, errors)
                errors += source.unmatched_rows(studies)
                errors = [e for e in errors if mine(e[0])]
                done = parts.records()
                folds = {uid: known.fold_of(patient_id_of(objs), uid) for uid, objs in studies.items() if mine(uid)}
                have = [k for k in ensemble.folds if ensemble.detector is None or k in ensemble.detector.folds]
                errors += _not_out_of_fold(studies, folds, have, run)
                jobs = [source.job(uid, patient_id_of(objs), uid, objs) for uid, objs in in_archive_order(studies)
                        if mine(uid) and uid not in done and folds[uid] in (ENSEMBLE, *have)]
                with _cpu_threads(ensemble.device.type, workers):
                    scored, lesions = _score_jobs(pool, jobs, ensemble, batch, parts, part_size, overlays, errors,
                                                  workers, folds)
        seconds = time.perf_counter() - t0
        already = len([s for s in studies if mine(s) and s in done])
        err_path = errors_path(out, shard)
        # Member names and reasons come from the archive: formula-safe for the spreadsheet that opens it.
        write_csv(err_path, ERRORS_COLUMNS, errors, mode=PRIVATE, formula_safe=True)
        merged = None
        if shard is None:
            records = parts.records()
            merged = merge([records[u] for u in studies if u in records], out)
    return ScoreResult(out, shard, scored, already, lesions, seconds, errors, err_path, merged,
                       sum(f != ENSEMBLE for f in folds.values()), known.unrecognised)


def _not_out_of_fold(studies: dict, folds: dict[str, int], have: list[int], run: Path) -> list[tuple[str, str]]:
    """Studies of known patients whose validation fold's model is not at hand: every model at hand
    trained on them, so they are listed, not scored."""
    out = []
    for uid, fold in folds.items():
        if fold not in (ENSEMBLE, *have):
            reason = (f"patient of the run's validation fold {fold}, whose model is not "
                      f"{'finished' if not (Path(run) / f'fold{fold}' / 'done.json').exists() else 'selected (--fold)'}"
                      f"; the other folds trained on this patient, so it is not scored (out-of-fold rule)")
            out += [(name, reason) for name, _ in studies[uid]]
    return out


@contextmanager
def _cpu_threads(device: str, workers: int):
    """On CPU, leave the decoding processes their cores: OpenMP threads that outnumber the free
    cores spin against them (resnet18 ran 10x slower with 2 threads than with 1 beside busy
    processes on 2 cores)."""
    import torch

    before = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _score_jobs(pool: StudyPool, jobs, ensemble, batch, parts: Parts, part_size, overlays, errors,
                workers, folds: dict[str, int]) -> tuple[int, int]:
    from wbs_dist.infer.overlay import render, write_overlay

    batcher = _Batcher(ensemble, batch, folds)
    # Enough studies in flight to fill a batch and keep every worker busy while the model runs.
    limit = 2 * max(workers, 1) + batch
    pending: set[Future] = set()
    todo = iter(jobs)
    exhausted = False
    finished: list[dict] = []
    last_flush = time.monotonic()
    scored = lesions = 0
    bar = tqdm(total=len(jobs), desc="scoring", unit="study", file=sys.stderr, disable=None, mininterval=0.5)

    def complete(res: StudyResult, scores: np.ndarray) -> None:
        nonlocal scored, lesions, last_flush
        finished.append(_record(res, scores, folds.get(res.uid, ENSEMBLE)))
        if overlays is not None:
            image = render(res.views, res.native, res.native_labels,
                           [(lid, view, s) for (lid, view, _, _), s in zip(res.lesions, scores)])
            write_overlay(Path(overlays), res.uid, image)
        scored += 1
        lesions += len(res.lesions)
        bar.update(1)
        if len(finished) >= part_size or time.monotonic() - last_flush > FLUSH_SECONDS:
            parts.write(finished)
            finished.clear()
            last_flush = time.monotonic()

    try:
        while True:
            while not exhausted and len(pending) + batcher.studies < limit:
                job = next(todo, None)
                if job is None:
                    exhausted = True
                else:
                    pending.add(pool.submit(_study_task, job))
            if len(batcher.queue) >= batch or (batcher.queue and not pending):
                for res, scores in batcher.run():
                    complete(res, scores)
                continue
            if not pending:
                break
            ready, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in ready:
                res = fut.result()
                if res.source == "learned" and not res.errors:
                    res.lesions, native_labels = learned.propose(ensemble.detector, res.scans,
                                                                 folds.get(res.uid, ENSEMBLE))
                    if res.native is not None:
                        res.native_labels = native_labels
                if res.errors:
                    errors.extend(res.errors)
                    bar.update(1)
                elif batcher.add(res) is not None:
                    complete(res, np.zeros(0))
        parts.write(finished)
    finally:
        bar.close()
    return scored, lesions
