"""A run's finished fold models as one ensemble: the mean probability of malignancy over folds.

Models: every finished fold of RUN_DIR (train.rundir: `fold<K>/done.json`; weights from `last.pt`, input
size and channels from `config.yaml`); `fold=K` takes one fold. Loading needs torch; the rest of
infer/ (the decoding workers) must not import it, so this module is imported by the main process only.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from wbs_dist.config import Config
from wbs_dist.errors import UsageError
from wbs_dist.infer.known import ENSEMBLE
from wbs_dist.preprocess import input_channels
from wbs_dist.train.checkpoint import load_checkpoint
from wbs_dist.train.detector import build_detector
from wbs_dist.train.models import build_model, split_logits
from wbs_dist.train.rundir import FoldDir, fold_dirs

log = logging.getLogger("wbs_dist.score")


def shape(cfg: Config) -> tuple:
    """What must agree between the folds of one ensemble."""
    return cfg.task, cfg.model, tuple(cfg.train_size), cfg.other_lesions_channel


def finished_folds(run_dir: Path, fold: int | None = None) -> tuple[list[FoldDir], Config]:
    """The finished folds of a run directory and their common config."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"--run {run_dir}: no such run directory")
    found = fold_dirs(run_dir)
    if fold is not None:
        found = [f for f in found if f.fold == fold]
        if not found:
            raise UsageError(f"--fold {fold}: no {run_dir}/fold{fold}")
    finished = [f for f in found if f.is_finished()]
    if not finished:
        names = ", ".join(f.path.name for f in found) or "no fold<K> folders"
        raise UsageError(f"{run_dir} holds no finished fold ({names}; a fold is finished when its "
                         "done.json exists): train first, or pass --fold of a finished one")
    unfinished = [f for f in found if not f.is_finished()]
    if unfinished:
        log.warning("scoring without unfinished fold(s) %s", ", ".join(f.path.name for f in unfinished))
    config = finished[0].read_config()
    # One ensemble, one split: folds of two splits are two runs (a re-split store under one run_dir).
    splits = {f.path.name: f.split() for f in finished}
    if len(set(splits.values()) - {""}) > 1:
        listed = ", ".join(f"{name} on {split or 'an unrecorded split'}" for name, split in splits.items())
        raise UsageError(f"the split changed within {run_dir}: its finished folds were trained on different splits "
                         f"({listed}), so they are no one "
                         "run: score with the folds of one split (--fold K), or retrain the others in a new run_dir")
    for f in finished[1:]:
        other = f.read_config()
        if shape(other) != shape(config):
            raise UsageError(f"{f.config} differs from fold {finished[0].fold}'s in model/image size/"
                             f"channels ({shape(other)} vs {shape(config)}): not one ensemble")
    return finished, config


class Ensemble:
    """The finished folds of a run directory: mean probability of malignancy over folds (task
    classify), or mean lesion probability map over folds (task detect, `maps`)."""

    def __init__(self, run_dir: Path, fold: int | None = None, device: str | None = None, task: str = "classify"):
        finished, self.config = finished_folds(run_dir, fold)
        if self.config.task != task:
            raise UsageError(f"{run_dir} holds {self.config.task} folds ({self.config.model}), not {task}: "
                             + ("pass the classifier's run as --run and the detector's as --detector"
                                if task == "detect" or self.config.task == "detect" else ""))
        self.split = finished[0].split()
        # A detector fold's operating threshold was chosen on its training folds (detection.json).
        self.detection = {f.fold: f.read_detection() for f in finished} if task == "detect" else {}
        self.thresholds = {k: d["threshold"] for k, d in self.detection.items()}
        self.folds = [f.fold for f in finished]
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.models = []
        digest = hashlib.sha256()
        for f in finished:
            state = load_checkpoint(f.last)
            if state is None:
                raise UsageError(f"{f.path}: done.json but no last.pt")
            model = (build_detector(self.config.model) if task == "detect" else
                     build_model(self.config.model, self.channels, "none", input_size=self.size))
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
        return input_channels(self.config.other_lesions_channel)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.config.train_size)

    def fingerprint(self) -> dict:
        return {"folds": self.folds, "weights_sha256": self.digest, "model": self.config.model,
                "image_size": list(self.size), "other_lesions_channel": self.config.other_lesions_channel}

    def __call__(self, x: np.ndarray, folds: np.ndarray | None = None) -> np.ndarray:
        """Probability of malignancy of each input: the mean over every fold's model, or, where
        `folds` names a fold (known.py's out-of-fold rule), that fold's model alone."""
        want = np.full(len(x), ENSEMBLE) if folds is None else np.asarray(folds)
        missing = set(want[want != ENSEMBLE].tolist()) - set(self.folds)
        if missing:
            raise ValueError(f"fold(s) {sorted(missing)} are not in this ensemble ({self.folds})")
        batch = torch.from_numpy(x).to(self.device, non_blocking=True)
        if self.autocast:
            batch = batch.contiguous(memory_format=torch.channels_last)
        total = torch.zeros(len(x), dtype=torch.float64, device=self.device)
        count = np.zeros(len(x))
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            for fold, model in zip(self.folds, self.models):
                rows = np.flatnonzero((want == ENSEMBLE) | (want == fold))
                if not len(rows):
                    continue
                index = torch.from_numpy(rows).to(self.device)
                main, _ = split_logits(model(batch if len(rows) == len(x) else batch[index]))
                total[index] += torch.sigmoid(main.float().view(-1)).double()
                count[rows] += 1
        return total.cpu().numpy() / count

    def below_target(self) -> dict[int, tuple[float | None, float]]:
        """Detector folds whose threshold does not reach their target sensitivity on their own training
        folds: {fold: (sensitivity there, target)}."""
        out = {}
        for k, d in self.detection.items():
            at = next((p for p in d["train_froc"] if p["threshold"] == d["threshold"]), None)
            sens = at["sensitivity"] if at else None
            if sens is None or sens < d["target_sensitivity"]:
                out[k] = (sens, d["target_sensitivity"])
        return out

    def maps(self, x: np.ndarray, fold: int = ENSEMBLE) -> tuple[np.ndarray, float]:
        """A detector's (N, H, W) lesion probability, the mean over every fold (or `fold`'s alone),
        and the threshold to cut it at: that fold's, or the median of the folds' (each chosen on its
        training folds)."""
        models = list(zip(self.folds, self.models)) if fold == ENSEMBLE else \
            [(k, m) for k, m in zip(self.folds, self.models) if k == fold]
        if not models:
            raise ValueError(f"fold {fold} is not in this ensemble ({self.folds})")
        batch = torch.from_numpy(x).to(self.device)
        total = torch.zeros((len(x), *x.shape[2:]), dtype=torch.float64, device=self.device)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            for _, model in models:
                total += torch.softmax(model(batch).float(), dim=1)[:, 1].double()
        threshold = float(np.median([self.thresholds[k] for k, _ in models]))
        return (total / len(models)).cpu().numpy(), threshold

