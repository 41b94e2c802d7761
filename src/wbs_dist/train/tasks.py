"""What a fold learns (config key `task`): its samples, network, loss, validation and outputs.

The trainer keeps what every task shares: the loop, checkpoints and exact resume, DDP, preemption,
the run directory. A task gives it
  samples     the training and validation sets of the fold (never the outer fold of a nested run), and
              how many training samples an epoch holds (the schedule's steps an epoch)
  network     a module whose output the task's loss and validation read
  loss        per real sample of the global batch: padding never counts, and every real sample
              weighs the same whatever rank it landed on (sum over this rank's samples x world /
              the global batch's real samples, as DDP averages gradients over ranks)
  validation  metrics gathered from every rank, in sample order (a row of metrics.csv)
  outputs     the fold's result files, written by rank 0 when it finishes

classify   the study's task: one lesion's malignancy (dataset.LesionIndex, LesionLoader, a backbone
           from models.py, BCE, AUC; predictions.csv, DESIGN 3.3)
detect     the learned lesion detector: lesion vs background over the whole study (detector.py,
           StudyLoader, Dice + CE; FROC on the validation fold; detection.json with the operating
           threshold chosen on the training folds, detection.py)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wbs_dist.config import DETECTORS, Config
from wbs_dist.data.store import Store, int_to_key
from wbs_dist.errors import ConfigError
from wbs_dist.schema import TUMOR_TYPES, VIEWS
from wbs_dist.train import ddp
from wbs_dist.train.dataset import LesionIndex, fold_indices, training_folds, with_non_lesions
from wbs_dist.train.models import AUX_LOSS_WEIGHT, build_model, split_logits
from wbs_dist.train.rundir import FoldDir


def make_task(cfg: Config, store: Store, fold: int, device: torch.device, world: int, rank: int):
    detector = cfg.model in DETECTORS
    if detector != (cfg.task == "detect"):
        raise ConfigError(f"config key 'model': {cfg.model} is {'a detector' if detector else 'a classifier'} but "
                          f"task is {cfg.task}: set task={'detect' if detector else 'classify'}, or a "
                          f"{'classifier' if detector else 'detector (' + ', '.join(DETECTORS) + ')'} as model")
    if cfg.patch_rows and not detector:
        raise ConfigError("config key 'patch_rows' is for task=detect (a classifier sees whole studies): set 0")
    if cfg.non_lesions and detector:
        raise ConfigError("config key 'non_lesions' is for task=classify (a detector learns every study's "
                          "background already): set 0")
    return (DetectTask if detector else ClassifyTask)(cfg, store, fold, device, world, rank)


def _per_sample_mean(per: torch.Tensor, valid: torch.Tensor, n_valid: torch.Tensor, world: int) -> torch.Tensor:
    return (per * valid).sum() * world / n_valid.clamp(min=1)


class ClassifyTask:
    metric = "val_auc"
    unit = "lesions"

    @property
    def samples(self) -> int:
        """Training samples an epoch."""
        return len(self.train_index)

    def __init__(self, cfg: Config, store: Store, fold: int, device: torch.device, world: int, rank: int):
        self.cfg, self.fold, self.device, self.world, self.rank = cfg, fold, device, world, rank
        self.train_index, self.val_index = fold_indices(store, cfg, fold)
        if cfg.non_lesions:                # training only: validation is the study's protocol
            self.train_index = with_non_lesions(self.train_index, store, cfg.non_lesions, world, rank)
        pos = self.train_index.label.sum()
        neg = len(self.train_index) - pos
        self.pos_weight = torch.tensor(neg / max(pos, 1.0) if cfg.class_weighting else 1.0, device=device)

    def model(self) -> torch.nn.Module:
        return build_model(self.cfg.model, self.train_index.channels, self.cfg.weights,
                           input_size=tuple(self.cfg.train_size))

    def loaders(self, device_id: int | None, start_epoch: int, start_step: int):
        from wbs_dist.train.loader import LesionLoader

        cfg = self.cfg
        train = LesionLoader(self.train_index, global_batch=cfg.batch_size, train=True, flip_p=cfg.flip_p,
                             seed=cfg.seed, world=self.world, rank=self.rank, device_id=device_id,
                             workers=cfg.num_workers, start_epoch=start_epoch, start_step=start_step)
        val = LesionLoader(self.val_index, global_batch=cfg.batch_size, train=False, seed=cfg.seed, world=self.world,
                           rank=self.rank, device_id=device_id, workers=cfg.num_workers)
        return train, val

    def inputs(self, batch) -> torch.Tensor:
        return batch.x

    def _bce(self, logits, y, valid, n_valid) -> torch.Tensor:
        per = F.binary_cross_entropy_with_logits(logits.float().view(-1), y, pos_weight=self.pos_weight,
                                                 reduction="none")
        return _per_sample_mean(per, valid, n_valid, self.world)

    def loss(self, output, batch, valid: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        y = batch.y.to(self.device)
        main, aux = split_logits(output)
        loss = self._bce(main, y, valid, n_valid)
        if aux is not None:
            loss = loss + AUX_LOSS_WEIGHT * self._bce(aux, y, valid, n_valid)
        return loss

    def validate(self, forward, loader) -> dict:
        idx, scores, losses = [], [], []
        for batch in loader.epoch():
            main, _ = split_logits(forward(batch.x))
            main = main.float().view(-1).cpu()
            keep = batch.valid.bool()
            idx.append(batch.index[keep].numpy())
            scores.append(torch.sigmoid(main[keep]).numpy())
            losses.append(F.binary_cross_entropy_with_logits(main[keep], batch.y[keep], reduction="none").numpy())
        idx, scores, losses = ddp.gather_arrays([np.concatenate(idx), np.concatenate(scores), np.concatenate(losses)])
        order = np.argsort(idx, kind="stable")
        idx, scores, losses = idx[order], scores[order], losses[order]
        labels = self.val_index.label[idx]
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) == 2 else None
        acc = float(((scores >= 0.5) == (labels == 1)).mean())
        return {"index": idx, "scores": scores, "val_loss": float(losses.mean()), "val_auc": auc,
                "row": {"val_auc": auc, "val_accuracy": acc}}

    def write_outputs(self, val: dict, files: FoldDir) -> Path:
        ix: LesionIndex = self.val_index
        rows = []
        for i, score in zip(val["index"], val["scores"]):
            rows.append([int_to_key(ix.patient[i]), ix.study_keys[ix.study[i]], int(ix.lesion_id[i]),
                         VIEWS[ix.view[i]], self.fold, int(ix.label[i]), f"{float(score):.6f}",
                         TUMOR_TYPES[ix.tumor_type[i]], int(ix.burden[i])])
        return files.write_predictions(rows)

    def final(self, forward, val: dict) -> dict:
        return val


class DetectTask:
    """The learned lesion detector; its metric is the validation sensitivity at 3 false positives a
    study (the issue's target), read off the FROC points."""

    metric = "val_sensitivity_at_3fp"
    unit = "studies"

    @property
    def samples(self) -> int:
        """Training samples an epoch: patches_per_study of every training study (StudyLoader's rule)."""
        from wbs_dist.train.loader import patches_per_study

        return len(self.train_index) * patches_per_study(self.cfg.train_size[0], self.cfg.patch_rows)

    def __init__(self, cfg: Config, store: Store, fold: int, device: torch.device, world: int, rank: int):
        from wbs_dist.train.detector import check_input_size, study_index

        self.cfg, self.fold, self.device, self.world, self.rank = cfg, fold, device, world, rank
        check_input_size(cfg)                     # before the store is read: a bad size fails at once
        self.train_index = study_index(store, training_folds(cfg, fold), cfg.train_size)
        self.val_index = study_index(store, [fold], cfg.train_size)

    def model(self) -> torch.nn.Module:
        from wbs_dist.train.detector import build_detector

        return build_detector(self.cfg.model)

    def loaders(self, device_id: int | None, start_epoch: int, start_step: int):
        from wbs_dist.train.loader import StudyLoader

        cfg = self.cfg
        train = StudyLoader(self.train_index, global_batch=cfg.batch_size, train=True, flip_p=cfg.flip_p,
                            seed=cfg.seed, world=self.world, rank=self.rank, device_id=device_id, workers=cfg.num_workers,
                            start_epoch=start_epoch, start_step=start_step, patch_rows=cfg.patch_rows)
        val = StudyLoader(self.val_index, global_batch=cfg.batch_size, train=False, seed=cfg.seed, world=self.world,
                          rank=self.rank, device_id=device_id, workers=cfg.num_workers)
        self._train_cache = train.cache          # `final` reads the training studies again from it
        return train, val

    def inputs(self, batch) -> torch.Tensor:
        return batch.x[:, :1]

    def loss(self, output, batch, valid: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        from wbs_dist.train.detector import training_loss

        return training_loss(output, batch.x[:, 1:].to(output.device), valid, n_valid, self.world)

    def _counts(self, forward, loader) -> dict:
        """Per study: loss and detection.COUNTS at every FROC threshold, gathered in study order. The
        counts need the lesion label maps (not the binary target): the loader's study cache holds them."""
        from wbs_dist.detection import COUNTS, THRESHOLDS, components, counts as match_counts, match
        from wbs_dist.train.detector import detector_loss

        idx, losses, counts = [], [], []
        label_maps = loader.cache.arrays()[1]
        for batch in loader.epoch():
            logits = forward(batch.x[:, :1]).float()
            keep = batch.valid.bool().to(logits.device)
            per = detector_loss(logits, batch.x[:, 1:].to(logits.device))
            prob = torch.softmax(logits, dim=1)[:, 1].cpu().numpy()
            for k in torch.nonzero(keep).view(-1).tolist():
                i = int(batch.index[k])
                truth = np.asarray(label_maps[i])
                ms = [match(components(prob[k], t), truth) for t in THRESHOLDS]
                counts.append([match_counts(m) for m in ms])
                idx.append(i)
                losses.append(float(per[k]))
        idx, losses, counts = ddp.gather_arrays([np.array(idx, np.int64), np.array(losses, np.float64),
                                                 np.array(counts, np.int64).reshape(-1, len(THRESHOLDS), len(COUNTS))])
        order = np.argsort(idx, kind="stable")
        return {"index": idx[order], "losses": losses[order], "counts": counts[order]}

    def validate(self, forward, loader) -> dict:
        from wbs_dist.detection import froc_from_counts, sensitivity_at

        got = self._counts(forward, loader)
        points = froc_from_counts(got["counts"])
        sens = sensitivity_at(points, 3.0)
        return {**got, "points": points, "val_loss": float(got["losses"].mean()), "val_auc": None,
                "row": {self.metric: sens}}

    def final(self, forward, val: dict) -> dict:
        """The operating threshold, chosen on the training folds' studies (no flip), never on this fold."""
        from wbs_dist.detection import choose_threshold, froc_from_counts
        from wbs_dist.train.loader import StudyLoader

        cfg = self.cfg
        # Over the training loader's cache (its studies at the detector's level), not a second one: at
        # 10,000 studies a cache of native views made again would cost minutes at every fold's end.
        with StudyLoader(self.train_index, global_batch=cfg.batch_size, train=False, seed=cfg.seed, world=self.world,
                         rank=self.rank, device_id=self.device.index if self.device.type == "cuda" else None,
                         workers=cfg.num_workers, cache=self._train_cache) as loader:
            train_points = froc_from_counts(self._counts(forward, loader)["counts"])
        threshold, note = choose_threshold(train_points, cfg.target_sensitivity)
        return {**val, "train_points": train_points, "threshold": threshold, "threshold_note": note}

    def write_outputs(self, val: dict, files: FoldDir) -> Path:
        at = next(p for p in val["points"] if p["threshold"] == val["threshold"])
        return files.write_detection({"fold": self.fold, "studies": len(self.val_index), "threshold": val["threshold"],
                                      "threshold_note": val["threshold_note"],
                                      "target_sensitivity": self.cfg.target_sensitivity, "at_threshold": at,
                                      "froc": val["points"], "train_froc": val["train_points"],
                                      "split": self.cfg.split})
