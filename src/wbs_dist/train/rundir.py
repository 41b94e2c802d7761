"""A fold's run directory, RUN_DIR/fold<K>/, and the files in it: the one place that names them.

    config.yaml        the resolved config          train.log        the log (rank 0)
    metrics.csv        one row per epoch            events.*         TensorBoard scalars
    last.pt (+.prev)   newest checkpoint            best.pt          weights of the best validation AUC
    predictions.csv    validation predictions of the final epoch (DESIGN 3.3)
    detection.json     a detector fold's FROC and operating threshold (train/tasks.py DetectTask); read
                       only through read_detection, which names the file when it is unusable (exit 2)
    done.json          written last: the fold is finished (a rerun does nothing); names its split
    .lock              while a trainer works on the fold (wbs_dist.lock): one trainer at a time

The trainer writes them through this module, the launchers (cv, SLURM, tune) and the scorer read
them through it. Every file is written atomically (wbs_dist.atomic): a kill leaves the old file or
the new one.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from wbs_dist.atomic import write_csv, write_json
from wbs_dist.config import Config, config_from_dict, dump_config, read_mapping
from wbs_dist.errors import InputError
from wbs_dist.lock import Lock
from wbs_dist.schema import PREDICTION_COLUMNS

# The trainer at work in this thread. Several trainers can share a process (tune interleaves a trial's
# folds, Ray runs trials in threads), while logging handlers are process-wide: each fold's train.log
# takes only the records logged while its own trainer works (methods decorated with `at_work`).
_working: contextvars.ContextVar = contextvars.ContextVar("wbs_dist_fold_trainer", default=None)


class OwnRecords(logging.Filter):
    """Lets through the records logged while `owner` is at work in this thread."""

    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def filter(self, record) -> bool:
        return _working.get() is self.owner


def at_work(method):
    """Mark a method's records as its object's own (see OwnRecords)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        token = _working.set(self)
        try:
            return method(self, *args, **kwargs)
        finally:
            _working.reset(token)

    return wrapper


METRICS_COLUMNS = ("epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "lr", "seconds", "samples_per_s")


def metrics_columns(history: list[dict]) -> list[str]:
    """metrics.csv's columns: the classifier's (METRICS_COLUMNS), or the keys of another task's rows
    in the same order of kinds (epoch, losses, the task's validation metrics, lr, time)."""
    if not history or all(c in history[0] for c in METRICS_COLUMNS):
        return list(METRICS_COLUMNS)
    return list(history[0])


@dataclass
class FoldResult:
    fold: int
    run_dir: Path
    epochs: int
    val_auc: float | None
    val_loss: float
    predictions: Path


class FoldDir:
    """RUN_DIR/fold<K>/ of a config's run."""

    def __init__(self, run_dir: str | Path, fold: int):
        self.fold = fold
        self.path = Path(run_dir) / f"fold{fold}"

    @classmethod
    def of(cls, cfg: Config, fold: int) -> "FoldDir":
        return cls(cfg.run_dir, fold)

    # -- names ------------------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def predictions(self) -> Path:
        return self.path / "predictions.csv"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def done(self) -> Path:
        return self.path / "done.json"

    @property
    def log(self) -> Path:
        return self.path / "train.log"

    @property
    def detection(self) -> Path:
        return self.path / "detection.json"

    def lock(self, what: str) -> Lock:
        """One trainer per fold: two on one run directory interleave their files and fail their saves."""
        return Lock(self.path / ".lock", what, subject=f"fold {self.fold} of {self.path.parent}")

    # -- state ------------------------------------------------------------------------------------------
    def is_finished(self) -> bool:
        return self.done.exists()

    def _read_done(self) -> dict:
        """done.json, or an InputError (exit 2) naming it when it is unusable (cut short, hand-edited)."""
        try:
            info = json.loads(self.done.read_bytes())
            if not (isinstance(info, dict) and isinstance(info.get("epochs"), int) and "val_auc" in info
                    and "val_loss" in info and isinstance(info.get("split", ""), (str, type(None)))):
                raise ValueError("expected an object with epochs, val_auc, val_loss and split")
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.done}: unusable ({exc}). It marks fold {self.fold} finished: delete it and run "
                             "that fold's training again (it resumes from last.pt and writes it again)") from None
        return info

    def result(self) -> FoldResult | None:
        """The finished fold's result (from done.json), or None while it is not finished."""
        if not self.done.exists():
            return None
        info = self._read_done()
        return FoldResult(self.fold, self.path, info["epochs"], info["val_auc"], info["val_loss"], self.predictions)

    def split(self) -> str:
        """The fingerprint of the split a finished fold was trained on ('' when unfinished, or finished
        before folds recorded it)."""
        if not self.done.exists():
            return ""
        return self._read_done().get("split") or ""

    def read_config(self) -> Config:
        return config_from_dict(read_mapping(self.config), f"in {self.config}")

    def read_detection(self) -> dict:
        return read_detection(self.detection)

    # -- writes (rank 0) ------------------------------------------------------------------------------------
    def write_config(self, cfg: Config) -> None:
        dump_config(cfg, self.config)

    def write_metrics(self, history: list[dict]) -> None:
        cols = metrics_columns(history)
        write_csv(self.metrics, cols, [[h.get(c) for c in cols] for h in history])

    def write_predictions(self, rows: list[list]) -> Path:
        write_csv(self.predictions, PREDICTION_COLUMNS, rows)
        return self.predictions

    def write_done(self, epochs: int, val_auc: float | None, val_loss: float, lesions: int,
                   split: str = "") -> FoldResult:
        """The last write of a fold: from here on it counts as finished. `split`: the fingerprint of
        the split it trained on (launch.cv never aggregates two)."""
        write_json(self.done, {"fold": self.fold, "epochs": epochs, "val_auc": val_auc, "val_loss": val_loss,
                               "lesions": lesions, "split": split})
        return FoldResult(self.fold, self.path, epochs, val_auc, val_loss, self.predictions)

    def write_detection(self, doc: dict) -> Path:
        write_json(self.detection, doc, indent=1)
        return self.detection

    def log_handler(self, owner_filter: logging.Filter) -> logging.Handler:
        """A handler writing train.log, taking only the records `owner_filter` lets through."""
        handler = logging.FileHandler(self.log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.addFilter(owner_filter)
        return handler


def fold_dirs(run_dir: str | Path) -> list[FoldDir]:
    """Every fold<K>/ folder of a run directory, by K."""
    found = sorted((int(p.name[4:]), p) for p in Path(run_dir).glob("fold*") if p.name[4:].isdigit())
    return [FoldDir(run_dir, k) for k, _ in found]


# detection.json: what its readers (the cv detection report, the scorer's detector) rely on.
DETECTION_KEYS = ("threshold", "threshold_note", "target_sensitivity", "at_threshold", "froc", "train_froc")
COUNT_KEYS = ("found", "lesions", "false", "copies", "studies")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_detection(path: Path) -> dict:
    """A detector fold's detection.json, or an InputError (exit 2) naming the file and what is wrong
    with it (truncated, hand-edited, missing): never a traceback in the report or the scorer."""
    def bad(why: str) -> InputError:
        return InputError(f"{path}: {why}. To write it again, delete {Path(path).with_name('done.json')} and "
                          "run that fold's training again (it resumes from last.pt)")

    try:
        doc = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise bad("missing (every finished detector fold has one)")
    except OSError as exc:
        raise bad(f"cannot be read ({exc.strerror})")
    except ValueError as exc:                        # JSONDecodeError, or bytes that are not text
        raise bad(f"not valid JSON ({exc})")
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    missing = [k for k in DETECTION_KEYS if k not in doc]
    if missing:
        raise bad(f"missing key(s) {', '.join(missing)}")
    if not _number(doc["threshold"]) or not 0 < doc["threshold"] < 1:
        raise bad(f"threshold {doc['threshold']!r}: expected a number between 0 and 1 (exclusive)")
    if not _number(doc["target_sensitivity"]) or not 0 < doc["target_sensitivity"] <= 1:      # as the config key
        raise bad(f"target_sensitivity {doc['target_sensitivity']!r}: expected a number in (0, 1]")
    for name in ("froc", "train_froc"):
        if not isinstance(doc[name], list) or not doc[name]:
            raise bad(f"{name}: expected a non-empty list of points")
    points = [("at_threshold", doc["at_threshold"]), *((f"{name}[{i}]", q) for name in ("froc", "train_froc")
                                                        for i, q in enumerate(doc[name]))]
    for where, p in points:
        if not isinstance(p, dict):
            raise bad(f"{where}: expected an object")
        if (not _number(p.get("threshold")) or any(not _number(p.get(k)) or p[k] < 0 for k in COUNT_KEYS)
                or any(k not in p or p[k] is not None and not _number(p[k]) for k in ("sensitivity", "fp_per_study"))):
            raise bad(f"{where}: expected threshold, sensitivity, fp_per_study and counts {', '.join(COUNT_KEYS)} "
                      f"as numbers, got {json.dumps(p)[:200]}")
    return doc
