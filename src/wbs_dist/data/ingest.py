"""Ingest: DICOM archive + annotations → de-identified Zarr store, in parallel, resumable.

The archive is read in two passes (data/studies.py): headers only, to group objects into studies,
find duplicates and map annotation rows; then one study per task in worker processes, decoded,
prepared for the store (training level) and written a batch at a time (data/batches.py: up to 64
studies in a few files): a task is one batch's studies, so each worker compresses and writes its own and
nothing but errors comes back. Studies already in the store are skipped, so a rerun after a kill
finishes the job (a kill loses at most the batches being filled, one a worker). Every refused input is listed with its reason in the
errors CSV (beside the store, not in it: it names archive paths); the rest is ingested.

Sharded (`shard=(I, N)`, `--shard I/N`): N jobs ingest one archive into one store at the same time.
Each reads every header (so a patient's studies are checked together, whichever shards hold them)
and writes the studies whose Study Instance UID hashes to I (data/shards.py, as score splits), under
the store lock taken shared. The finalize is the same call without a shard: it takes the lock
exclusive (refused while a shard holds it; `wait_lock_s` waits), writes whatever the shards left
undone, rebuilds the lesion table once and writes the complete errors CSV. The result equals a
one-process ingest of the archive.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from wbs_dist.atomic import PRIVATE, write_csv
from wbs_dist.data.deid import keyed_hash, load_or_create_secret, secret_check
from wbs_dist.data.shards import parse_shard, shard_of
from wbs_dist.data.batches import BATCH_STUDIES, prepare
from wbs_dist.data.store import Store, store_lock
from wbs_dist.data.studies import (DEFAULT_MAX_OBJECT_MB, DEFAULT_MAX_VIEWS, Budgets, StudyJob, StudySource,
                                   exception_text, group_studies, in_archive_order, patient_id_of)
from wbs_dist.data.workers import StudyPool, assemble, worker_state
from wbs_dist.errors import UsageError

ERRORS_COLUMNS = ("path", "reason")
BURNED_IN = ("refused: Burned In Annotation (0028,0301) is YES: text in the pixels may name the patient; "
             "its study is not stored (--accept-burned-in stores it, and the store is then not de-identified)")


@dataclass
class IngestResult:
    store: Path
    counts: dict                                # the store's counts after the run (Store.rebuild_lesion_table)
    written: int                                # studies written by this run
    already: int                                # studies that were in the store before it
    errors: list[tuple[str, str]] = field(default_factory=list)   # (path, reason) of every skipped input
    errors_path: Path | None = None
    shard: tuple[int, int] | None = None        # (I, N) of a shard run; counts is then {} (no table yet)


def _batch_task(jobs: list[StudyJob]) -> list[tuple[bool, list[tuple[str, str]]]]:
    """In a worker: decode, check and prepare the studies of one batch and write it; (written, errors)
    a study. Compression and writing happen here, beside the decoding, not in one process for all."""
    state = worker_state()
    if "store" not in state:
        state["store"] = Store.open(state["store_path"])
    out = []
    with state["store"].writer(len(jobs)) as writer:
        for job in jobs:
            data, errors = assemble(job)
            try:
                study = None if data is None else prepare(data, state["train_size"])
            except Exception as exc:  # this study's (a MemoryError resampling it), not its batch's
                errors.append((job.members[0], f"study could not be prepared ({exception_text(exc)}); skipped"))
                study = None
            out.append((study is not None and writer.add(study), errors))
    return out


def _groups(jobs: list, batch_studies: int, workers: int) -> list[list]:
    """Batches of at most `batch_studies`, at least one a worker (a small archive keeps both cores)."""
    size = max(1, min(batch_studies, -(-len(jobs) // max(1, workers))))
    return [jobs[i:i + size] for i in range(0, len(jobs), size)]


def ingest(archive: Path, store: Path, annotations: Path | None = None, secret_file: Path | None = None,
           workers: int = 2, train_size: tuple[int, int] = (512, 256),
           errors_path: Path | None = None, max_object_mb: float = DEFAULT_MAX_OBJECT_MB,
           max_views: int = DEFAULT_MAX_VIEWS, accept_burned_in: bool = False,
           shard: tuple[int, int] | str | None = None, wait_lock_s: float = 0.0,
           batch_studies: int = BATCH_STUDIES) -> IngestResult:
    """Ingest `archive` into `store` (created, or completed when it exists) and write the errors CSV.
    Objects declaring more than `max_object_mb` of pixel data and studies of more than `max_views`
    views are listed, not decoded (studies.Budgets). A study with an object marked Burned In
    Annotation YES is listed, not stored, unless `accept_burned_in` (the store is then not
    de-identified: its pixels may show a name or an ID). `shard` (I, N) or "I/N": write only that
    shard's studies, beside other shards (see the module's notes); `wait_lock_s`: wait that long for
    the store lock instead of being refused at once; `batch_studies`: studies a batch (fewer files, or
    less work lost to a kill)."""
    if batch_studies < 1:
        raise UsageError(f"--batch-studies must be at least 1 (got {batch_studies})")
    budgets = Budgets(max_object_mb, max_views)
    shard = parse_shard(shard) if isinstance(shard, str) else shard
    secret = load_or_create_secret(secret_file)
    if Path(store).resolve() == Path(archive).resolve():
        raise UsageError("the store cannot be the archive itself")
    mine = (lambda name: True) if shard is None else (lambda name: shard_of(name, shard[1]) == shard[0])
    # One ingest at a time per store: two runs clearing each other's staging and rebuilding the lesion
    # table at once left torn studies behind (5 of 9 staggered pairs, issue 13). Shards write disjoint
    # studies and nothing store-wide: they share the lock, and keep the finalize out until they end.
    lock = store_lock(store, f"wbs-dist ingest {archive}" + (f" --shard {shard[0]}/{shard[1]}" if shard else ""),
                      "exclusive" if shard is None else "shared").wait(wait_lock_s)
    try:
        with StudySource.open(archive, annotations, budgets) as source:
            return _ingest(source, store, secret, workers, train_size, errors_path, accept_burned_in, shard, mine,
                           batch_studies)
    finally:
        lock.release()


def _ingest(source, store, secret, workers, train_size, errors_path, accept_burned_in, shard, mine,
            batch_studies) -> IngestResult:
    st = Store.create_or_open(store, train_size)
    st.claim_secret(secret_check(secret))       # every shard alike: one secret per store
    if shard is None:
        st.clear_staging()                     # leftovers of an interrupted run are never trusted
        st.clear_torn_batches()
    else:
        st.clear_dead_staging()                # other shards' work in progress is theirs
    # Errors found before studies exist (members, headers, annotation rows) go to the shard their
    # member's name hashes to, so that the shards' errors files together list each once.
    errors = [e for e in source.errors if mine(e[0])]
    # One decoding process gains nothing over this one: workers <= 1 decode in-process.
    with StudyPool(source, workers if workers > 1 else 0, {"store_path": st.path, "train_size": st.train_size}) as pool:
        header_errors: list[tuple[str, str]] = []
        studies = group_studies(pool.headers(source.members), header_errors)
        errors += [e for e in header_errors + source.unmatched_rows(studies) if mine(e[0])]

        jobs, patients_tumor = [], defaultdict(set)
        already = 0
        for uid, objs in in_archive_order(studies):
            if not accept_burned_in and any(h.burned_in for _, h in objs):
                errors += [(name, BURNED_IN) for name, _ in objs if mine(uid)]
                continue
            patient_id = patient_id_of(objs)
            # A study without Patient ID becomes its own patient: never merged with a stranger.
            patient = keyed_hash(secret, "patient", patient_id) if patient_id else \
                keyed_hash(secret, "patient-of-study", uid)
            job = source.job(keyed_hash(secret, "study", uid), patient, uid, objs)
            if job.annotations is not None and job.annotations.tumor_type:
                patients_tumor[patient].add(job.annotations.tumor_type)   # every shard's: a patient spans shards
            if not mine(uid):
                continue
            if st.has_study(job.key):
                already += 1
                continue
            jobs.append(job)
        conflicted = {p for p, types in patients_tumor.items() if len(types) > 1}
        for job in jobs:
            if job.patient in conflicted and job.annotations is not None:
                job.annotations.problems.append("tumor_type differs between studies of the same patient")

        if shard is not None and jobs:
            st.retire_lesion_table()
        written = 0
        for batch in pool.map_groups(_batch_task, _groups(jobs, batch_studies, workers), "ingesting"):
            for was_written, study_errors in batch:
                errors.extend(study_errors)
                written += was_written
    if shard is None:
        counts = st.rebuild_lesion_table()
        st.clear_staging()
        default_errors = st.path.with_name(st.path.name + ".errors.csv")
    else:
        counts = {}
        shutil.rmtree(st.staging(), ignore_errors=True)
        default_errors = st.path.with_name(f"{st.path.name}.errors.shard-{shard[0]}-of-{shard[1]}.csv")
    errors_path = Path(errors_path) if errors_path else default_errors
    errors_path.parent.mkdir(parents=True, exist_ok=True)
    # Names archive members, which may carry patient names: private, and safe to open in a spreadsheet.
    write_csv(errors_path, ERRORS_COLUMNS, errors, mode=PRIVATE, formula_safe=True)
    return IngestResult(st.path, counts, written, already, errors, errors_path, shard)
