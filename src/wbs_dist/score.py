"""`wbs-dist score`: an archive's lesions scored by the fold ensemble, streamed, sharded, resumable.

    wbs-dist score ARCHIVE --run RUN_DIR --out PRED.csv [--fold K] [--shard I/N] [--overlays DIR]

Reads DICOM studies straight from a folder, .zip or .tar(.gz) (no store), in two passes like
ingest: headers only, to group objects into studies (`ingest.group_studies`); then one study per
task in worker processes: decode and identify views (`ingest.assemble_study`), lesions from the
annotations (DESIGN 3.2) when the study has rows, else hot-spot candidates (`candidates`), and the
training level (`store.training_level`, `store.count_scale`). The main process turns each lesion
into the network input with the training code itself (`dataset.normalise`, `dataset.make_input`),
batches lesions across studies, and runs the models while the workers decode the next studies
(a bounded number of studies in flight, so memory stays flat whatever the archive's size).

Models: every finished fold of RUN_DIR (`fold<K>/done.json`, weights from `fold<K>/last.pt`, input
size and channels from `fold<K>/config.yaml`); a lesion's score is the mean of the folds'
probabilities. `--fold K` scores with one fold.

Outputs (an unsharded run):
    PRED.csv            one row per lesion (DESIGN 3.3): `fold` empty, `label` 1/0 from the
                        annotations or empty, `tumor_type` from the annotations or empty,
                        `lesion_count` = lesions scored in the study
    PRED.summary.csv    one row per study: source (annotated | candidates), views, lesions, highest
                        score and its lesion
    PRED.errors.csv     every input not scored, with the reason (exit status 3 when not empty)
    --overlays DIR      DIR/<study_uid>.png: the views side by side, lesion contours coloured by
                        score (green 0 -> yellow -> red 1), for review

These outputs go back to the site that owns the archive, which must be able to act on them: they
carry the original Study Instance UID and Patient ID and are therefore identifying, unlike the
store. Logs and progress output never show them.

Views: anterior on the left half and posterior on the right, as in training. A view the DICOM does
not identify (`unknown`, e.g. the NEMA NM1 scan) is never paired by guess: it is scored alone in
the anterior slot (the posterior half empty, as for a study without a posterior view), and its
lesions are reported with view `unknown`. Annotations cannot name such a view, so it is scored in
candidate studies only.

Resumable and sharded. Results go to PRED.csv.parts/: every `--part-size` studies (or minute)
the finished studies' rows are written to a new part file, fsynced and renamed into place, so a
part is complete or absent whatever moment a kill comes; a study is done exactly when it is in a
part. A rerun skips done studies, and the merge takes each study from the first part holding it,
so no lesion is ever written twice. A manifest pins what the parts were made with (archive, models'
weights, input size, candidate parameters); another setup is refused rather than mixed in.
`--shard I/N` takes the studies whose uid hashes to I mod N and writes parts only; the merge is the
same command without `--shard`, which also scores whatever the shards left undone (a failed array
task, say) and checks the result against the whole archive. slurm/score.sh does both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .atomic import fsync_dir, write_csv
from . import annotations as ann
from . import candidates
from .archive import Archive
from .config import Config, load_config
from .dicom import Rejected
from .errors import EXIT_OK, EXIT_SKIPPED, UsageError
from .ingest import (StudyJob, StudyOutcome, assemble_study, find_annotations, group_studies, header_of,
                     mask_members)
from .store import VIEWS, count_scale, training_level

log = logging.getLogger("wbs_dist.score")

PART_FORMAT = 1
SUMMARY_COLUMNS = ("study_uid", "patient_id", "source", "views", "lesions", "max_score", "max_lesion_id")
FLUSH_SECONDS = 60.0


def _prediction_columns():
    from .train import PREDICTION_COLUMNS  # train imports torch; the workers must not

    return PREDICTION_COLUMNS


def shard_of(key: str, n: int) -> int:
    """Deterministic, independent of order and of the archive's other contents."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % n


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. 0/4")
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


# -- worker side (no torch here: spawned workers import this module) ---------------------------------
@dataclass
class Scan:
    """One network image of a study: counts at the training level, its scale and label map."""

    image: np.ndarray
    scale: float
    labels: np.ndarray


@dataclass
class StudyResult:
    uid: str
    patient_id: str
    source: str = ""                                   # annotated | candidates
    tumor_type: str = ""
    views: list[str] = field(default_factory=list)
    scans: list[Scan] = field(default_factory=list)
    lesions: list[tuple[int, str, str, int]] = field(default_factory=list)  # id, view, label, scan
    errors: list[tuple[str, str]] = field(default_factory=list)
    native: dict[str, np.ndarray] | None = None        # for overlays
    native_labels: dict[str, np.ndarray] | None = None


_WORKER: dict = {}


def _init_worker(archive: Archive, masks: Archive | None, height: int, width: int, overlays: bool) -> None:
    _WORKER.update(archive=archive, masks=masks, size=(height, width), overlays=overlays)


def _study_task(job: StudyJob) -> StudyResult:
    res = StudyResult(job.key, job.patient)
    outcome = StudyOutcome(job.key)
    try:
        data = assemble_study(job, outcome, _WORKER["archive"], _WORKER["masks"])
    except Rejected as exc:
        outcome.errors.append((job.members[0], str(exc)))
        data = None
    if data is None:
        # assemble_study words its reasons for ingest; here the study is not scored.
        res.errors = [(path, reason.replace("not ingested", "not scored")) for path, reason in outcome.errors]
        return res
    views = data.views
    if job.annotations is not None:
        res.source, res.tumor_type = "annotated", job.annotations.tumor_type or ""
        labels = data.labels
        lesions = [(les["lesion_id"], les["view"], "1" if les["label"] == "malignant" else "0")
                   for les in data.attrs["lesions"]]
    else:
        res.source = "candidates"
        labels, regions = candidates.find_candidates(views)
        lesions = [(reg.label, reg.view, "") for reg in regions]
    res.views = sorted(views, key=lambda v: (VIEWS.index(v) if v in VIEWS else len(VIEWS), v))
    height, width = _WORKER["size"]
    # Identified views share one image; each unidentified view is an image of its own, in the
    # anterior slot (never paired by guess).
    slots = {v: 0 for v in res.views if v in VIEWS}
    groups = [{v: v for v in slots}] if slots else []
    for v in res.views:
        if v not in VIEWS:
            slots[v] = len(groups)
            groups.append({"anterior": v})
    for group in groups:
        image, lab = training_level({slot: views[v] for slot, v in group.items()},
                                    {slot: labels[v] for slot, v in group.items() if v in labels}, height, width)
        res.scans.append(Scan(image, count_scale(image), lab))
    res.lesions = [(lid, view, label, slots[view]) for lid, view, label in lesions]
    if _WORKER["overlays"]:
        res.native, res.native_labels = views, labels
    return res


class _Inline:
    """The executor interface, run in the calling process (`--workers 0`)."""

    def __init__(self, initargs):
        _init_worker(*initargs)

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


def _pool(workers: int, initargs):
    if workers <= 0:
        return _Inline(initargs)
    # spawn, not fork: the parent holds torch's threads, which do not survive a fork.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=initargs)


def _header_task(name: str):
    return name, header_of(_WORKER["archive"], name)


# -- models (main process) ------------------------------------------------------------------------------
def finished_folds(run_dir: Path, fold: int | None = None) -> tuple[list[tuple[int, Path]], Config]:
    """The finished folds of a run directory (fold<K>/done.json) and their common config."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"--run {run_dir}: no such run directory")
    found = sorted((int(p.name[4:]), p) for p in run_dir.glob("fold*") if p.name[4:].isdigit())
    if fold is not None:
        found = [(k, p) for k, p in found if k == fold]
        if not found:
            raise UsageError(f"--fold {fold}: no {run_dir}/fold{fold}")
    finished = [(k, p) for k, p in found if (p / "done.json").exists()]
    if not finished:
        names = ", ".join(p.name for _, p in found) or "no fold<K> folders"
        raise UsageError(f"{run_dir} holds no finished fold ({names}; a fold is finished when its "
                         "done.json exists): train first, or pass --fold of a finished one")
    unfinished = sorted(set(found) - set(finished))
    if unfinished:
        log.warning("scoring without unfinished fold(s) %s", ", ".join(p.name for _, p in unfinished))
    config = load_config(finished[0][1] / "config.yaml")
    for k, path in finished[1:]:
        other = load_config(path / "config.yaml")
        if Ensemble.shape(other) != Ensemble.shape(config):
            raise UsageError(f"{path}/config.yaml differs from fold {finished[0][0]}'s in model/image size/"
                             f"channels ({Ensemble.shape(other)} vs {Ensemble.shape(config)}): not one ensemble")
    return finished, config


class Ensemble:
    """The finished folds of a run directory: mean probability of malignancy over folds."""

    def __init__(self, run_dir: Path, fold: int | None = None, device: str | None = None):
        import torch

        from .checkpoint import load_checkpoint
        from .models import build_model

        finished, self.config = finished_folds(run_dir, fold)
        self.folds = [k for k, _ in finished]
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.models = []
        digest = hashlib.sha256()
        for k, path in finished:
            state = load_checkpoint(path / "last.pt")
            if state is None:
                raise UsageError(f"{path}: done.json but no last.pt")
            model = build_model(self.config.model, self.channels, "none", input_size=self.size)
            model.load_state_dict(state["model"])
            for name, tensor in state["model"].items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            self.models.append(model.to(self.device).eval())
            del state
        self.digest = digest.hexdigest()
        self.autocast = self.device.type == "cuda" and self.config.bf16

    @property
    def channels(self) -> int:
        return 3 if self.config.other_lesions_channel else 2

    @property
    def size(self) -> tuple[int, int]:
        return self.config.image_height, self.config.image_width

    @staticmethod
    def shape(cfg: Config) -> tuple:
        return cfg.model, cfg.image_height, cfg.image_width, cfg.other_lesions_channel

    def fingerprint(self) -> dict:
        return {"folds": self.folds, "weights_sha256": self.digest, "model": self.config.model,
                "image_size": list(self.size), "other_lesions_channel": self.config.other_lesions_channel}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        from .models import split_logits

        batch = torch.from_numpy(x).to(self.device, non_blocking=True)
        if self.autocast:
            batch = batch.contiguous(memory_format=torch.channels_last)
        total = torch.zeros(len(x), dtype=torch.float64, device=self.device)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            for model in self.models:
                main, _ = split_logits(model(batch))
                total += torch.sigmoid(main.float().view(-1)).double()
        return (total / len(self.models)).cpu().numpy()


# -- parts: the done-list and the results, crash-safe ------------------------------------------------------
def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _write_durable(path: Path, text: str) -> None:
    """Write to a temp name, fsync, rename into place, fsync the folder: whole or absent."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Parts:
    def __init__(self, out: Path, fingerprint: dict, tag: str):
        self.dir = parts_dir(out)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as the manifest reads back (tuples -> lists)
        self.tag = tag
        self.seq = 0

    def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.dir / "manifest.json"
        tmp = self.dir / f".manifest.{self.tag}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.fingerprint, indent=1, sort_keys=True))
        try:
            os.link(tmp, manifest)          # first writer wins, atomically (shards start together)
        except FileExistsError:
            have = json.loads(manifest.read_text())
            if have != self.fingerprint:
                keys = sorted(k for k in set(have) | set(self.fingerprint) if have.get(k) != self.fingerprint.get(k))
                raise UsageError(f"{self.dir} holds results scored with another setup (differs in: "
                                 f"{', '.join(keys)}); choose another --out or remove {self.dir}")
        finally:
            tmp.unlink(missing_ok=True)
        for stale in self.dir.glob(f".part-{self.tag}-*.tmp"):
            stale.unlink(missing_ok=True)   # a killed run's unfinished part: never trusted

    def records(self) -> dict[str, dict]:
        """study uid -> its record, from every complete part; the first part (by name) wins."""
        out: dict[str, dict] = {}
        for path in sorted(self.dir.glob("part-*.json")):
            try:
                doc = json.loads(path.read_text())
                studies = doc["studies"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable part %s (%s); its studies are scored again", path, exc)
                continue
            for rec in studies:
                out.setdefault(rec["study_uid"], rec)
        return out

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        self.seq += 1
        name = f"part-{self.tag}-{time.time_ns():020d}-{os.getpid()}-{self.seq:06d}.json"
        _write_durable(self.dir / name, json.dumps({"studies": records}))


# -- the run --------------------------------------------------------------------------------------------------
def _record(res: StudyResult, scores: np.ndarray) -> dict:
    return {"study_uid": res.uid, "patient_id": res.patient_id, "source": res.source,
            "tumor_type": res.tumor_type, "views": res.views,
            "lesions": [[lid, view, label, round(float(s), 6)]
                        for (lid, view, label, _), s in zip(res.lesions, scores)]}


def merge(records: list[dict], out: Path) -> tuple[int, int]:
    """Write PRED.csv and PRED.summary.csv from study records; (studies, lesions)."""
    records = sorted(records, key=lambda r: (r["patient_id"], r["study_uid"]))
    rows, summary = [], []
    for rec in records:
        lesions = sorted(rec["lesions"], key=lambda les: les[0])
        for lid, view, label, score in lesions:
            rows.append([rec["patient_id"], rec["study_uid"], lid, view, "", label, f"{score:.6f}",
                         rec["tumor_type"], len(lesions)])
        top = max(lesions, key=lambda les: (les[3], -les[0]), default=None)
        summary.append([rec["study_uid"], rec["patient_id"], rec["source"], "|".join(rec["views"]), len(lesions),
                        "" if top is None else f"{top[3]:.6f}", "" if top is None else top[0]])
    write_csv(out, _prediction_columns(), rows)
    write_csv(summary_path(out), SUMMARY_COLUMNS, summary)
    return len(records), len(rows)


def summary_path(out: Path) -> Path:
    return out.with_name(out.stem + ".summary.csv")


def errors_path(out: Path, shard: tuple[int, int] | None) -> Path:
    if shard is None:
        return out.with_name(out.stem + ".errors.csv")
    return parts_dir(out) / f"errors.shard-{shard[0]}-of-{shard[1]}.csv"


class _Batcher:
    """Lesions of finished studies, scored in batches across studies; a study's record is ready
    once all its lesions are scored."""

    def __init__(self, ensemble: Ensemble, batch: int):
        from .dataset import make_input, normalise

        self.ensemble, self.batch = ensemble, batch
        self._make_input, self._normalise = make_input, normalise
        self.queue: deque = deque()         # (study, lesion index)
        self.open: dict[str, list] = {}     # uid -> [result, normalised images, scores, remaining]

    def add(self, res: StudyResult) -> StudyResult | None:
        """Queue a study's lesions; returns it at once when it has none."""
        if not res.lesions:
            return res
        images = [self._normalise(scan.image, np.float32(scan.scale)) for scan in res.scans]
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
        probs = self.ensemble(x)
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
        return self._make_input(images[scan], res.scans[scan].labels, lid, self.ensemble.config.other_lesions_channel)


def run_score(archive: Path, run: Path, out: Path, fold: int | None = None, shard: str | tuple | None = None,
              overlays: Path | None = None, workers: int = 2, batch: int = 32, annotations: Path | None = None,
              part_size: int = 64) -> int:
    out = Path(out)
    shard = parse_shard(shard) if isinstance(shard, str) else shard
    if batch < 1 or part_size < 1 or workers < 0:
        raise UsageError("--batch and --part-size must be >= 1, --workers >= 0")
    if out.suffix.lower() != ".csv":
        raise UsageError(f"--out {out}: expected a .csv path (summary and errors are written beside it)")
    _, config = finished_folds(run, fold)
    mine = (lambda key: True) if shard is None else (lambda key: shard_of(key, shard[1]) == shard[0])
    t0 = time.perf_counter()
    with Archive.open(archive) as arc:
        ann_src, csv_name, exclude = find_annotations(arc, annotations)
        errors: list[tuple[str, str]] = [(r.path, r.reason) for r in arc.refused]
        if ann_src is not None and ann_src is not arc:
            errors += [(f"{annotations}/{r.path}", r.reason) for r in ann_src.refused]
        rows = ann.parse_annotations(ann_src.read(csv_name), csv_name) if ann_src is not None else {}
        members = [m for m in arc.members if m not in exclude]
        pool = _pool(workers, (arc, ann_src, config.image_height, config.image_width, overlays is not None))
        try:
            # The workers start and read headers while this process loads the models.
            headers = pool.map(_header_task, members, chunksize=max(1, min(32, len(members) // 64)))
            ensemble = Ensemble(run, fold)
            fingerprint = {"format": PART_FORMAT, "archive": str(Path(archive).resolve()),
                           "annotations": str(Path(annotations).resolve()) if annotations else None,
                           "run": ensemble.fingerprint(), "candidates": candidates.PARAMETERS}
            out.parent.mkdir(parents=True, exist_ok=True)
            parts = Parts(out, fingerprint, "all" if shard is None else f"{shard[0]}of{shard[1]}")
            parts.open()
            studies = group_studies(tqdm(headers, total=len(members), desc="reading headers", unit="file",
                                         file=sys.stderr, disable=None, mininterval=0.5), errors)
            for uid, a in rows.items():
                if uid not in studies:
                    lines = ", ".join(map(str, a.rows[:10])) + (" ..." if len(a.rows) > 10 else "")
                    errors.append((csv_name, f"lines {lines}: study_uid matches no DICOM study in the archive"))
            errors = [e for e in errors if mine(e[0])]
            done = parts.records()
            jobs = []
            for uid, objs in sorted(studies.items(), key=lambda kv: kv[1][0][0]):
                if not mine(uid) or uid in done:
                    continue
                patient_id = next((h.patient_id for _, h in objs if h.patient_id), "")
                jobs.append(StudyJob(uid, patient_id, sorted(n for n, _ in objs), rows.get(uid),
                                     mask_members(ann_src, csv_name, uid), csv_name or "annotations.csv"))
            with _cpu_threads(ensemble.device.type, workers):
                scored, lesions = _score_jobs(pool, jobs, ensemble, batch, parts, part_size, overlays, errors,
                                              workers)
        finally:
            pool.shutdown(cancel_futures=True)
    seconds = time.perf_counter() - t0
    skipped = len([s for s in studies if mine(s) and s in done])
    err_path = errors_path(out, shard)
    write_csv(err_path, ["path", "reason"], errors)
    if shard is not None:
        print(f"shard {shard[0]}/{shard[1]}: {scored} studies scored ({skipped} already done), {lesions} lesions, "
              f"{seconds:.1f} s; run without --shard to write {out}")
    else:
        records = parts.records()
        n_studies, n_lesions = merge([records[u] for u in studies if u in records], out)
        print(f"{out}: {n_studies} studies, {n_lesions} lesions ({scored} studies scored now, {skipped} already "
              f"done, {seconds:.1f} s); summary {summary_path(out)}")
    if errors:
        _summarise(errors, err_path)
        return EXIT_SKIPPED
    return EXIT_OK


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


def _score_jobs(pool, jobs, ensemble, batch, parts: Parts, part_size, overlays, errors, workers) -> tuple[int, int]:
    batcher = _Batcher(ensemble, batch)
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
        finished.append(_record(res, scores))
        if overlays is not None:
            write_overlay(Path(overlays), res, scores)
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
                if res.errors:
                    errors.extend(res.errors)
                    bar.update(1)
                elif batcher.add(res) is not None:
                    complete(res, np.zeros(0))
        parts.write(finished)
    finally:
        bar.close()
    return scored, lesions


# -- overlays --------------------------------------------------------------------------------------------------
def _colour(score: float) -> tuple[int, int, int]:
    """green (0) -> yellow (0.5) -> red (1)."""
    s = min(max(float(score), 0.0), 1.0)
    return (int(round(255 * min(1.0, 2 * s))), int(round(255 * min(1.0, 2 * (1 - s)))), 0)


def write_overlay(folder: Path, res: StudyResult, scores: np.ndarray) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    panels = []
    for view in res.views:
        counts = res.native[view].astype(np.float32)
        body = counts[counts > 0]
        top = float(np.percentile(body, 99.0)) if body.size else 1.0
        grey = (np.clip(counts / max(top, 1e-6), 0, 1) * 255).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        labels = res.native_labels.get(view)
        mine = [(lid, s) for (lid, lview, _, _), s in zip(res.lesions, scores) if lview == view]
        if labels is not None and mine:
            colour = np.zeros((int(labels.max()) + 1, 3), np.uint8)
            scored = np.zeros(len(colour), bool)
            for lid, s in mine:
                colour[lid], scored[lid] = _colour(s), True
            # A contour pixel is a lesion pixel with a 4-neighbour outside that lesion.
            edge = np.zeros(labels.shape, bool)
            edge[1:] |= labels[1:] != labels[:-1]
            edge[:-1] |= labels[:-1] != labels[1:]
            edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
            edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
            edge &= scored[labels]
            rgb[edge] = colour[labels[edge]]
        panels.append(rgb)
    rows = max(p.shape[0] for p in panels)
    panels = [np.pad(p, ((0, rows - p.shape[0]), (0, 4), (0, 0))) for p in panels]
    path = folder / f"{res.uid}.png"
    tmp = folder / f".{res.uid}.{os.getpid()}.png"
    Image.fromarray(np.concatenate(panels, axis=1)).save(tmp)
    os.replace(tmp, path)
    return path


def _summarise(errors: list[tuple[str, str]], path: Path) -> None:
    print(f"wbs-dist score: {len(errors)} input(s) not scored, listed with reasons in {path}:", file=sys.stderr)
    for p, reason in errors[:20]:
        print(f"  {p}: {reason}", file=sys.stderr)
    if len(errors) > 20:
        print(f"  ... and {len(errors) - 20} more", file=sys.stderr)
