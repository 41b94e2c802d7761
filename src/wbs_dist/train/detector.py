"""The learned lesion detector: lesion vs background on the side-by-side training image.

What it learns from: every annotated study of the training folds (benign and malignant lesions
alike), at the detector's own level: config key `train_size` of a detect run is the detector's input,
made from the store's native views and label maps as ingest makes the classifier's level
(preprocess.training_level), at any size -- the classifier's level can be too coarse to see a lesion
(the demo's 128 x 64 puts a synthetic lesion of sigma ~3 px into less than one pixel). The image is
normalised by its own count scale (preprocess.count_scale at that level); the target is every
delineated lesion and its appearance on the other view (detection.with_copies: a lesion shows on
both views, delineated on one). Whole-study samples; the flip augmentation mirrors each view, image
and target together (preprocess.mirror_views), as the classifier's does.

The network: MONAI's `UNet` (residual units, Kerfoot et al. 2018), 2-D, one input channel, two
output classes. MONAI because it is the medical-imaging standard, maintained and tested against the
segmentation literature; this residual U-Net rather than `DynUNet` (nnU-Net's self-configuring one)
because a 512 x 256 planar image needs no per-dataset configuration of kernels and spacings, and
residual units train stably from scratch at the study's small batches. `unet`: five levels (16..256
channels, four stride-2 steps) reach a 32 x 16 bottleneck at 512 x 256, wider than any lesion;
`unet_small` (8..32, two steps) is for tests.

The loss: Dice + cross-entropy, equal weights, the segmentation literature's answer to class
imbalance (nnU-Net's default): lesions are well under 1 % of a study's pixels, so cross-entropy
alone learns "background everywhere"; the Dice term (MONAI's `DiceLoss` over the lesion class,
softmax) is a ratio over the lesion pixels, whatever their number. Per sample, so that the trainer
can leave out the padding of a global batch as it does for the classifier.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from wbs_dist.data.folds import lesion_folds
from wbs_dist.data.store import Store, int_to_key
from wbs_dist.errors import ConfigError
from wbs_dist.preprocess import detection_level, mirror_views
from wbs_dist.train.dataset import StoreDataset

WIDTHS = {"unet": ((16, 32, 64, 128, 256), (2, 2, 2, 2)), "unet_small": ((8, 16, 32), (2, 2))}


def build_detector(name: str = "unet") -> torch.nn.Module:
    """MONAI's residual U-Net, 1 channel in (the normalised image), 2 classes out (background, lesion)."""
    from monai.networks.nets import UNet

    if name not in WIDTHS:
        raise ConfigError(f"config key 'model': a detector is one of {', '.join(WIDTHS)} (got {name!r})")
    channels, strides = WIDTHS[name]
    return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=channels, strides=strides,
                num_res_units=2)


def check_input_size(cfg) -> None:
    """The U-Net halves its input at each stride: every side (and a training patch's rows) must be a
    multiple of the product of its strides, or its skip connections do not line up."""
    strides = WIDTHS.get(cfg.model, ((), ()))[1]
    step = int(np.prod(strides)) if strides else 1
    h, w = cfg.train_size
    if h % step or w % step:
        raise ConfigError(f"config key 'train_size': {cfg.model} needs both sides multiples of {step}, got {h}x{w}")
    if cfg.patch_rows and (cfg.patch_rows % step or cfg.patch_rows > h):
        raise ConfigError(f"config key 'patch_rows': {cfg.patch_rows} must be a multiple of {step} and at most the "
                          f"height {h} for {cfg.model} (0: whole studies)")


def detector_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) Dice + cross-entropy of each sample (validation's loss, per study): logits (N, 2, H, W),
    target (N, 1, H, W) of 0/1, in fp32 whatever the autocast."""
    from monai.losses import DiceLoss

    logits, target = logits.float(), target.long()
    dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, reduction="none")(logits, target)
    ce = torch.nn.functional.cross_entropy(logits, target[:, 0], reduction="none").mean(dim=(1, 2))
    return dice.reshape(len(logits)) + ce


def training_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, n_valid: torch.Tensor,
                  world: int) -> torch.Tensor:
    """Cross-entropy per real sample (padding left out, every sample weighing the same on any rank)
    plus the batch's Dice: the lesion pixels of this rank's real samples in one ratio (nnU-Net's
    batch Dice). A per-study Dice swings from 0 to 1 on a study whose lesions are a few pixels at the
    training level; on the demo's store it held the U-Net at "no lesion anywhere" for 72 steps."""
    logits, target = logits.float(), target.float()
    ce = torch.nn.functional.cross_entropy(logits, target[:, 0].long(), reduction="none").mean(dim=(1, 2))
    ce = (ce * valid).sum() * world / n_valid.clamp(min=1)
    w = valid.view(-1, 1, 1)
    p = torch.softmax(logits, dim=1)[:, 1] * w
    t = target[:, 0] * w
    dice = 1 - (2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5)
    return ce + dice


@dataclass
class StudyIndex:
    """The annotated studies of some folds: the detector's samples, at (height, width)."""

    store_path: Path
    height: int
    width: int
    study_keys: list[str]
    fold: np.ndarray                # int8 fold per study

    def __len__(self) -> int:
        return len(self.study_keys)

    def study_arrays(self, store: Store, s: int) -> tuple[np.ndarray, np.ndarray]:
        """Study s at the detector's level, from the store's native views and label maps."""
        views, labels = store.native_study(self.study_keys[s])
        return detection_level({v: a.astype(np.float32) for v, a in views.items()}, labels, self.height, self.width)

    def each_study(self, store: Store, threads: int = 4) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(s, study_arrays(store, s)) for every study: made from native views, in `threads` threads."""
        with ThreadPoolExecutor(threads) as pool:
            for s, (image, labels) in enumerate(pool.map(lambda s: self.study_arrays(store, s), range(len(self)))):
                yield s, image, labels


def study_index(store: Store, folds: Sequence[int], size: Sequence[int]) -> StudyIndex:
    """The studies with at least one lesion in the store's lesion table whose patients are in `folds`."""
    table = store.lesion_table()
    fold_of = lesion_folds(store, table)
    studies, first = np.unique(table["study"], return_index=True)
    keep = np.isin(fold_of[first], np.asarray(folds))
    keys = [int_to_key(s) for s in studies[keep]]
    height, width = size
    return StudyIndex(store.path, height, width, keys, fold_of[first][keep].astype(np.int8))


class StudyDataset(StoreDataset):
    """(1, H, W) normalised image and (1, H, W) lesion target (with other-view copies) of each study,
    read from the store; `flip_p` mirrors both views of a sample with that probability (training only)."""

    def __init__(self, index: StudyIndex, flip_p: float = 0.0, seed: int = 0):
        super().__init__(index)
        self.flip_p = flip_p
        self.rng = np.random.default_rng(seed)

    def __getitem__(self, i: int) -> dict:
        image, labels = self.index.study_arrays(self.store(), i)
        x, y = image[None], (labels > 0).astype(np.int64)[None]
        if self.flip_p and self.rng.random() < self.flip_p:
            x, y = mirror_views(x), mirror_views(y)
        return {"x": torch.from_numpy(np.ascontiguousarray(x)), "y": torch.from_numpy(np.ascontiguousarray(y)),
                "index": torch.tensor(i)}


@torch.no_grad()
def probability_maps(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """(N, H, W) lesion probability of a batch (N, 1, H, W), in fp32 whatever the model's autocast."""
    was = model.training
    model.eval()
    logits = model(x).float()
    model.train(was)
    return torch.softmax(logits, dim=1)[:, 1].cpu().numpy()
