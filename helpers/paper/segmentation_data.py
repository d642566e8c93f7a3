"""Segmentation data and training pieces for notebook 03 (its steps: :mod:`helpers.paper.segmentation`).

- :class:`SegmentationPatches`: the 1x patch caches of a set of slides, indexed as one dataset
  (memory-mapped: a split of real slides is tens of GB and is never loaded whole), with each
  patch's tumour fraction from the cache table.
- :func:`segmentation_batches`: the training batches, a seeded share of them drawn from
  patches that hold tumour (most tissue patches hold none, and a Dice loss learns little from
  a batch without any tumour).
- :func:`segmentation_prepare`: the device side of the input pipeline: uint8 to float, resize
  to the network's input side (a CPU demo trains on downscaled patches), augmentation.
- :func:`make_evaluator`: validation loss and pooled Dice over a fixed sample of the validation
  patches, for :func:`helpers.learning.train.fit`.
- :func:`mask_fraction_map`: a slide's ground truth at the stitching canvas's scale (read in
  bands, never a whole mask in memory), for notebook 03's scores and notebook 05's regions.

Used by notebook 03, training jobs (:mod:`helpers.paper.jobs`) and ``bench/``.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import InputError, check_fraction, check_positive
from ..learning.metrics import soft_dice_loss
from ..learning.train import SeededPrepare
from ..learning.unetpp import as_head_list, probabilities
from ..patching.augment import augment_batch
from ..patching.caches import open_cache
from ..wsi.slides import Mask


@dataclass
class SegmentationPatches:
    """The kept 1x patches (and their masks) of several slides, as one dataset.

    Attributes:
        sets: the :class:`helpers.patching.caches.PatchSet` of each slide.
        case_ids: one per set.
        owner: ``(n,)`` which set each patch comes from.
        local: ``(n,)`` the patch's row in its set.
        tumour_frac: ``(n,)`` the patch's tumour fraction (from the cache table).
    """

    sets: list
    case_ids: list
    owner: np.ndarray
    local: np.ndarray
    tumour_frac: np.ndarray

    def __len__(self):
        return len(self.owner)

    def take(self, idx):
        """``(images, masks)`` uint8 arrays ``(k, P, P, 3)`` and ``(k, P, P)`` for dataset rows ``idx``."""
        idx = np.asarray(idx)
        order = np.lexsort((self.local[idx], self.owner[idx]))  # memory-map friendly reads
        P = self.sets[0].patches.shape[1]
        x = np.empty((len(idx), P, P, 3), np.uint8)
        m = np.empty((len(idx), P, P), np.uint8)
        for s in np.unique(self.owner[idx]):
            sel = order[self.owner[idx][order] == s]
            rows = self.local[idx][sel]
            x[sel] = self.sets[s].patches[rows]
            m[sel] = self.sets[s].masks[rows]
        return x, m


def load_segmentation_patches(cases, cache_root, params, what="training"):
    """Open the segmentation-scale patch caches of ``cases`` (written by notebook 02) as one dataset.

    Args:
        cases: :class:`helpers.wsi.dataset.Case` objects (one split).
        cache_root: ``runs/<run>/patches``.
        params: the :class:`helpers.patching.caches.ExtractionParams` notebook 02 used (its
            ``mask_scale`` is the segmentation scale).
        what: the split's name, for messages.

    Raises:
        InputError: a cache is missing (run notebook 02), holds no masks (a slide without
            masks), or the split holds no patch at all.
    """
    sets, ids, owner, local, frac = [], [], [], [], []
    col = f"{params.label_mask}_frac"
    scale = params.mask_scale
    for case in cases:
        fix = f"run notebook 02 (with {scale} among its scales and the same parameters) first"
        ps = open_cache(cache_root, case, scale, params, fix)
        if ps.masks is None:
            raise InputError(
                f"{case.case_id}: its patch cache holds no masks (the slide has no "
                f"{params.label_mask} mask); segmentation needs masks for every {what} slide"
            )
        kept = ps.kept
        sets.append(ps)
        ids.append(case.case_id)
        owner.append(np.full(len(kept), len(sets) - 1))
        local.append(kept["index"].to_numpy())
        frac.append(kept[col].to_numpy(np.float32))
    if not sets or sum(len(o) for o in owner) == 0:
        raise InputError(
            f"the {what} split holds no tissue patch at scale {scale}; check the split and "
            "notebook 02's tissue_threshold"
        )
    return SegmentationPatches(sets, ids, np.concatenate(owner), np.concatenate(local), np.concatenate(frac))


def segmentation_batches(data, batch_size, steps, tumour_share=0.5, min_frac=0.05, seed=0):
    """A function ``batches(epoch)`` giving ``steps`` batches of ``(x, m)`` uint8 CPU tensors.

    Args:
        data: :class:`SegmentationPatches`.
        batch_size: patches per batch.
        steps: batches per epoch.
        tumour_share: the share of each batch drawn from patches whose tumour fraction is at
            least ``min_frac``; the rest are drawn from all patches (0 = plain random batches).
        min_frac: what counts as a patch with tumour.
        seed: epoch ``e`` draws from ``seed + e``, so a resumed run sees the same batches.

    Raises:
        InputError: ``tumour_share > 0`` and no training patch holds tumour.
    """
    check_positive("batch_size", batch_size, integer=True)
    check_positive("steps", steps, integer=True)
    check_fraction("tumour_share", tumour_share)
    has = np.flatnonzero(data.tumour_frac >= min_frac)
    if tumour_share > 0 and len(has) == 0:
        raise InputError(
            f"no training patch holds tumour (fraction >= {min_frac}) in "
            f"{', '.join(data.case_ids)}: the segmentation network has nothing to learn. "
            "Put slides with tumour in the training split, or check label_mask"
        )
    n_t = int(round(batch_size * tumour_share))

    def batches(epoch):
        rng = np.random.default_rng([seed, epoch])

        class _Epoch:
            def __len__(self):
                return steps

            def __iter__(self):
                for _ in range(steps):
                    idx = np.concatenate(
                        [rng.choice(has, n_t) if n_t else np.zeros(0, int), rng.choice(len(data), batch_size - n_t)]
                    )
                    x, m = data.take(idx)
                    yield torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(m)[:, None]

        return _Epoch()

    return batches


def resize_pair(x, m, size):
    """Area-resize float images and 0/1 masks (mask pixel = 1 where over half is tumour)."""
    if x.shape[-1] == size:
        return x, m
    x = F.interpolate(x, size=size, mode="area")
    if m is not None:
        m = (F.interpolate(m.float(), size=size, mode="area") > 0.5).float()
    return x, m


def segmentation_prepare(input_size, augment=True, color=0.0, seed=0):
    """``prepare(x, m, device, train)`` for :func:`helpers.learning.train.fit`.

    Moves a uint8 batch to the device, scales it to [0, 1], resizes it to ``input_size`` and,
    when training, augments images and masks with one geometry (on the device: a GPU does the
    augmentation too).

    Returns:
        A :class:`helpers.learning.train.SeededPrepare`: its augmentation generator (seeded with
        ``seed``) has ``state_dict()``/``load_state_dict()``, so ``fit`` checkpoints it and a
        resumed run draws the same augmentations as an uninterrupted one.
    """

    def prepare(x, m, device, train, generator):
        x = x.to(device, non_blocking=True).float().div_(255)
        m = m.to(device, non_blocking=True).float()
        x, m = resize_pair(x, m, input_size)
        if train and augment:
            x, m = augment_batch(x, generator=generator(device), masks=m, color=color)
        return x, m

    return SeededPrepare(prepare, seed)


def make_evaluator(data, input_size, max_patches=512, batch_size=32, per_image=False, seed=0):
    """``evaluate(model, device)`` -> ``{"val_loss", "val_dice"}`` over a fixed validation sample.

    The sample holds every validation patch with tumour and a seeded draw of the others, up
    to ``max_patches`` (a validation split of real slides has tens of thousands of patches).
    ``val_dice`` is pooled over the sample's pixels at the network's input size, with the
    probabilities thresholded at 0.5; ``val_loss`` is the training loss on the sample, with a
    pooled loss pooled over the whole sample (averaging it over batches would score every
    batch without tumour near 1, whatever the model does).
    """
    check_positive("max_patches", max_patches, integer=True)
    rng = np.random.default_rng(seed)
    has = np.flatnonzero(data.tumour_frac > 0)
    rest = np.setdiff1d(np.arange(len(data)), has)
    if len(has) > max_patches:
        has = rng.choice(has, max_patches, replace=False)
    rest = rng.choice(rest, min(len(rest), max_patches - len(has)), replace=False)
    sample = np.sort(np.concatenate([has, rest]))

    def evaluate(model, device):
        inter = total = 0.0
        soft = None  # per head: sum(p r), sum(p^2) + sum(r^2) over the sample
        for i in range(0, len(sample), batch_size):
            x, m = data.take(sample[i : i + batch_size])
            x = torch.from_numpy(x).to(device).permute(0, 3, 1, 2).float().div_(255)
            m = torch.from_numpy(m).to(device)[:, None].float()
            x, m = resize_pair(x, m, input_size)
            out = as_head_list(model(x))
            sums = []
            for h in out:
                p = torch.sigmoid(h.float())
                if per_image:
                    sums.append((float(soft_dice_loss(p, m, per_image=True)) * len(x), len(x)))
                else:
                    sums.append((float((p * m).sum()), float((p * p).sum() + (m * m).sum())))
            soft = sums if soft is None else [(a + c, b + d) for (a, b), (c, d) in zip(soft, sums)]
            pb = probabilities(out) > 0.5
            inter += float((pb & (m > 0)).sum())
            total += float(pb.sum() + (m > 0).sum())
        if per_image:
            loss = sum(a / b for a, b in soft) / len(soft)
        else:  # the batch-pooled loss, pooled over the whole sample (eps = 1 as in training)
            loss = sum(1 - (2 * a + 1) / (b + 1) for a, b in soft) / len(soft)
        return {"val_loss": loss, "val_dice": 2 * inter / total if total else 1.0}

    evaluate.n_patches = len(sample)
    return evaluate


def mask_fraction_map(mask_path, slide_dimensions, downsample, max_pixels=2**25):
    """A mask's fraction of tumour in each ``downsample`` x ``downsample`` cell.

    Reads the mask in bands of rows (at most ``max_pixels`` mask pixels at once), so a mask of a
    50,000 px slide is never in memory whole. The output has the stitching canvas's shape,
    ``(H // downsample, W // downsample)``.
    """
    W, H = slide_dimensions
    d = downsample
    out_h, out_w = int(H // d), int(W // d)
    with Mask(mask_path, slide_dimensions) as mask:
        if mask.downsample != 1.0 or d != int(d):
            # A mask stored at a downsample, or a fractional canvas (a physical scale): nearest
            # sampling onto the canvas grid, band by band.
            out = np.zeros((out_h, out_w), np.float32)
            rows = max(1, int(max_pixels // max(1.0, W * d)))
            for r in range(0, out_h, rows):
                k = min(rows, out_h - r)
                out[r : r + k] = mask.read(0, r * d, out_w, k, downsample=d)
            return out
        d = int(d)
        out = np.zeros((out_h, out_w), np.float32)
        band = max(1, (max_pixels // max(1, W)) // d) * d
        for y in range(0, out_h * d, band):
            y1 = min(out_h * d, y + band)
            a = mask.read_native(0, y, out_w * d, y1)
            k = (y1 - y) // d
            out[y // d : y // d + k] = a[: k * d, : out_w * d].reshape(k, d, out_w, d).mean(axis=(1, 3))
        return out
