"""Counts -> training level -> network input: the preprocessing that training and scoring share.

Ingest stores each study's training level (`training_level`, `count_scale`); the training Dataset, the
reference for both DALI graphs (train/loader.py, train/lesion_op.py) and the scorer (infer/) turn it into
the network input with `normalise` and `make_input`, and augmentation mirrors each view with
`mirror_views`. One definition, so that a model scores an archive with exactly the inputs it was
trained on (tests compare the scorer's inputs with the Dataset's and the DALI graphs', bit for bit).

The network input of one lesion, (C, H, W) float32, anterior | posterior side by side:

    channel 0   the image: training level / count_scale (99th percentile of body counts)
    channel 1   this lesion's mask (1 inside, 0 outside)
    channel 2   the study's other lesions (1 inside any other lesion); dropped when
                `other_lesions_channel` is false, so burden and neighbours are then invisible
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from wbs_dist.detection import with_copies
from wbs_dist.schema import VIEWS


# -- counts -> training level (ingest, scoring) -------------------------------------------------------
def resample_counts(view: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area (box) resampling: each output pixel is the mean count of the input area it covers."""
    img = Image.fromarray(np.asarray(view, dtype=np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.Resampling.BOX), dtype=np.float32)


def resample_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Label map at a lower resolution: a pixel takes the lesion covering most of its area when that
    lesion covers at least half of it; every lesion keeps at least its best-covered pixel so that
    small lesions never vanish from the training level."""
    out = np.zeros((height, width), np.uint16)
    best = np.zeros((height, width), np.float32)
    sy, sx = labels.shape[0] / height, labels.shape[1] / width
    # One pass finds every lesion's bounding box; each lesion is then resampled over the output
    # pixels its box touches, not over the whole view.
    for index, found in enumerate(ndimage.find_objects(labels)):
        if found is None:
            continue
        lid = index + 1
        rows, cols = found
        y0, y1 = int(rows.start // sy), min(height, int(np.ceil(rows.stop / sy)))
        x0, x1 = int(cols.start // sx), min(width, int(np.ceil(cols.stop / sx)))
        ys, xs = slice(int(y0 * sy), min(labels.shape[0], int(np.ceil(y1 * sy)))), \
            slice(int(x0 * sx), min(labels.shape[1], int(np.ceil(x1 * sx))))
        patch = (labels[ys, xs] == lid).astype(np.float32)
        img = Image.fromarray(patch, mode="F")
        cover = np.asarray(img.resize((x1 - x0, y1 - y0), Image.Resampling.BOX,
                                      box=(x0 * sx - xs.start, y0 * sy - ys.start,
                                           x1 * sx - xs.start, y1 * sy - ys.start)), dtype=np.float32)
        region_best = best[y0:y1, x0:x1]
        take = (cover >= 0.5) & (cover > region_best)
        if not take.any():
            take = np.zeros_like(take)
            take[np.unravel_index(np.argmax(cover), cover.shape)] = True
        out[y0:y1, x0:x1][take] = lid
        region_best[take] = cover[take]
    return out


def training_level(views: dict[str, np.ndarray], labels: dict[str, np.ndarray], height: int,
                   width: int) -> tuple[np.ndarray, np.ndarray]:
    """The training level of a study: anterior | posterior side by side, each view area-resampled to
    (height, width / 2); zeros where a view is absent. Views of other names are not placed."""
    image = np.zeros((height, width), np.float32)
    out = np.zeros((height, width), np.uint16)
    half = width // 2
    for i, view in enumerate(VIEWS):
        if view in views:
            image[:, i * half:(i + 1) * half] = resample_counts(views[view], height, half)
        if view in labels:
            out[:, i * half:(i + 1) * half] = resample_labels(labels[view], height, half)
    return image, out


def count_scale(image: np.ndarray) -> float:
    """The count normalisation: the 99th percentile of the body's counts at the training level.

    Scans differ in injected activity, uptake time and acquisition speed, so raw counts are not
    comparable between patients. Dividing by a high percentile of the body (pixels > 0) maps typical
    skeletal uptake below ~1 while hot spots and the bladder stay above 1, in every scan alike; a
    percentile rather than the maximum so one hot bladder does not darken the whole skeleton.
    """
    body = image[image > 0]
    if body.size == 0:
        return 1.0
    return max(float(np.percentile(body, 99.0)), 1e-6)



# -- training level -> network input (Dataset, DALI graphs, scorer) ---------------------------------
def normalise(image: np.ndarray, scale: np.float32) -> np.ndarray:
    """Counts → network input. The one definition both loaders use, so they agree bit for bit."""
    return image / np.float32(scale)


def detection_level(views: dict[str, np.ndarray], labels: dict[str, np.ndarray], height: int, width: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A study at the learned detector's level: (normalised image float32, label map uint16 with the
    other-view copies), from native views and label maps keyed by slot (schema.VIEWS); the image by
    its own count scale at that level. Training (train/detector.py) and scoring (infer/score.py) use it."""
    image, lab = training_level(views, labels, height, width)
    return normalise(image, np.float32(count_scale(image))), with_copies(lab, image)


def make_input(image: np.ndarray, labels: np.ndarray, lesion_id: int, other_lesions_channel: bool) -> np.ndarray:
    """(H, W) normalised image and label map → (C, H, W) float32 network input."""
    lid = np.uint16(lesion_id)
    chans = [image, (labels == lid).astype(np.float32)]
    if other_lesions_channel:
        chans.append(((labels != 0) & (labels != lid)).astype(np.float32))
    return np.stack(chans)


def mirror_views(x: np.ndarray) -> np.ndarray:
    """Mirror each view in place: (C, H, W) with two views side by side."""
    c, h, w = x.shape
    return np.ascontiguousarray(x.reshape(c, h, 2, w // 2)[..., ::-1].reshape(c, h, w))


def input_channels(other_lesions_channel: bool) -> int:
    """Channels of the network input (see the module note)."""
    return 3 if other_lesions_channel else 2
