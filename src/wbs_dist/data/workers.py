"""The worker processes that read an archive's studies, for ingest and score alike.

`StudyPool(source, workers, extra)` starts `workers` spawned processes (0: this process) that each
hold the archive, the annotation source, the budgets and what the stage adds (`extra`: ingest the
store's path, score the training size). The header pass (`headers`) and the study task's common part
(`assemble`) run there; each stage adds its own work to the study task.

Stopping: leaving the pool's `with` block on an exception (SIGTERM turned into one by the CLI, a
KeyboardInterrupt) terminates the workers at once instead of waiting for the studies they decode, so
a cancelled job ends promptly and the caller's `with` blocks remove the temporary extraction.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from concurrent.futures import Future, ProcessPoolExecutor

from tqdm import tqdm

from wbs_dist.data.archive import Archive
from wbs_dist.data.dicom import Header, Rejected
from wbs_dist.data.studies import (Budgets, StudyData, StudyJob, StudySource, assemble_study, exception_text,
                                   header_of)

log = logging.getLogger("wbs_dist.studies")


# Module-level so that spawned processes can import it: the archive, the annotation source and what the
# stage adds (its `extra`), set once per worker by the pool's initializer.
_STATE: dict = {}


def worker_state() -> dict:
    """This process's archive ('archive'), annotation source ('masks') and the stage's extras."""
    return _STATE


def _init_worker(archive: Archive, masks: Archive | None, extra: dict, budgets: Budgets | None = None) -> None:
    _STATE.clear()
    _STATE.update(extra, archive=archive, masks=masks, budgets=budgets or Budgets())


def _header_task(name: str) -> tuple[str, Header | str]:
    return name, header_of(_STATE["archive"], name, _STATE["budgets"])


def assemble(job: StudyJob) -> tuple[StudyData | None, list[tuple[str, str]]]:
    """The study task's common part, in a worker: the study (or None) and the reasons it failed.
    Nothing a study's input raises escapes: it becomes the study's listed error."""
    errors: list[tuple[str, str]] = []
    try:
        data = assemble_study(job, errors, _STATE["archive"], _STATE["masks"], _STATE["budgets"])
    except Rejected as exc:
        errors.append((job.members[0], str(exc)))
        errors.extend((m, "skipped with its study (reason listed above)") for m in job.members[1:])
        data = None
    except Exception as exc:  # MemoryError, a decoder's or PIL's own error, ...: this study's, not the run's
        log.debug("study of %s failed", job.members[0], exc_info=True)
        errors.append((job.members[0], f"study could not be read ({exception_text(exc)}); skipped"))
        errors.extend((m, "skipped with its study (reason listed above)") for m in job.members[1:])
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
        initargs = (source.archive, source.annotations, dict(extra or {}), source.budgets)
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

    def map_groups(self, fn, groups: list[list], desc: str):
        """fn(group) for each group of studies, in order, as they finish; the progress bar counts studies."""
        bar = tqdm(total=sum(len(g) for g in groups), desc=desc, unit="study", file=sys.stderr, dynamic_ncols=True,
                   mininterval=0.5, disable=None)
        with bar:
            for group, result in zip(groups, self.executor.map(fn, groups)):
                bar.update(len(group))
                yield result

    def submit(self, fn, *args) -> Future:
        return self.executor.submit(fn, *args)

    def shutdown(self, now: bool = False) -> None:
        """Stop the workers: after their current tasks, or `now` (killed: an interrupted run)."""
        if now and isinstance(self.executor, ProcessPoolExecutor):
            # The executor would wait for the studies being decoded; a cancelled run must not.
            for proc in list((self.executor._processes or {}).values()):
                proc.terminate()
            self.executor.shutdown(wait=True, cancel_futures=True)
            return
        self.executor.shutdown(cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.shutdown(now=exc_type is not None)
