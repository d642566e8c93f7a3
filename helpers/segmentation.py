"""Segmentation data, training pieces and per-slide evaluation for notebook 03.

- :class:`SegmentationPatches`: the 1x patch caches of a set of slides, indexed as one dataset
  (memory-mapped: a split of real slides is tens of GB and is never loaded whole), with each
  patch's tumour fraction from the cache table.
- :func:`segmentation_batches`: the training batches, a seeded share of them drawn from
  patches that hold tumour (most tissue patches hold none, and a Dice loss learns little from
  a batch without any tumour).
- :func:`segmentation_prepare`: the device side of the input pipeline: uint8 to float, resize
  to the network's input side (a CPU demo trains on downscaled patches), augmentation.
- :func:`make_evaluator`: validation loss and pooled Dice over a fixed sample of the validation
  patches, for :func:`helpers.train.fit`.
- :func:`mask_fraction_map` and :func:`slide_metrics`: a slide's ground truth at the stitching
  canvas's scale (read in bands, never a whole mask in memory) and Dice / Jaccard three ways.

Used by notebook 03 and ``bench/``.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .augment import augment_batch
from .errors import InputError, check_fraction, check_positive
from .metrics import dice_jaccard, paip_score, soft_dice_loss
from .patches import cache_folder, load_patch_set
from .slides import Mask, box_reduce  # noqa: F401  (box_reduce re-exported for notebooks)
from .train import load_trained  # noqa: F401  (notebooks 03 and 04 load checkpoints with it)
from .unetpp import as_head_list, probabilities


@dataclass
class SegmentationPatches:
    """The kept 1x patches (and their masks) of several slides, as one dataset.

    Attributes:
        sets: the :class:`helpers.patches.PatchSet` of each slide.
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
        order = np.lexsort((self.local[idx], self.owner[idx]))   # memory-map friendly reads
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
    """Open the 1x patch caches of ``cases`` (written by notebook 02) as one dataset.

    Args:
        cases: :class:`helpers.slides.Case` objects (one split).
        cache_root: ``runs/<run>/patches``.
        params: the :class:`helpers.patches.ExtractionParams` notebook 02 used.
        what: the split's name, for messages.

    Raises:
        InputError: a cache is missing (run notebook 02), holds no masks (a slide without
            masks), or the split holds no patch at all.
    """
    sets, ids, owner, local, frac = [], [], [], [], []
    col = f"{params.label_mask}_frac"
    for case in cases:
        folder, _ = cache_folder(cache_root, case, 1, params)
        if not (folder / "meta.json").exists():
            raise InputError(f"no 1x patch cache for {case.case_id} at {folder}: run notebook 02 "
                             "(with scale 1 among its scales and the same parameters) first")
        ps = load_patch_set(folder)
        if ps.masks is None:
            raise InputError(f"{case.case_id}: its patch cache holds no masks (the slide has no "
                             f"{params.label_mask} mask); segmentation needs masks for every {what} slide")
        kept = ps.kept
        sets.append(ps)
        ids.append(case.case_id)
        owner.append(np.full(len(kept), len(sets) - 1))
        local.append(kept["index"].to_numpy())
        frac.append(kept[col].to_numpy(np.float32))
    if not sets or sum(len(o) for o in owner) == 0:
        raise InputError(f"the {what} split holds no tissue patch at scale 1; check the split and "
                         "notebook 02's tissue_threshold")
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
        raise InputError(f"no training patch holds tumour (fraction >= {min_frac}) in "
                         f"{', '.join(data.case_ids)}: the segmentation network has nothing to learn. "
                         "Put slides with tumour in the training split, or check label_mask")
    n_t = int(round(batch_size * tumour_share))

    def batches(epoch):
        rng = np.random.default_rng([seed, epoch])

        class _Epoch:
            def __len__(self):
                return steps

            def __iter__(self):
                for _ in range(steps):
                    idx = np.concatenate([rng.choice(has, n_t) if n_t else np.zeros(0, int),
                                          rng.choice(len(data), batch_size - n_t)])
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
    """``prepare(x, m, device, train)`` for :func:`helpers.train.fit`.

    Moves a uint8 batch to the device, scales it to [0, 1], resizes it to ``input_size`` and,
    when training, augments images and masks with one geometry (on the device: a GPU does the
    augmentation too).
    """
    gens = {}

    def prepare(x, m, device, train):
        x = x.to(device, non_blocking=True).float().div_(255)
        m = m.to(device, non_blocking=True).float()
        x, m = resize_pair(x, m, input_size)
        if train and augment:
            g = gens.get(device)
            if g is None:
                g = gens[device] = torch.Generator(device=device)
                g.manual_seed(seed)
            x, m = augment_batch(x, generator=g, masks=m, color=color)
        return x, m

    return prepare


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
        soft = None                     # per head: sum(p r), sum(p^2) + sum(r^2) over the sample
        for i in range(0, len(sample), batch_size):
            x, m = data.take(sample[i:i + batch_size])
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
        else:   # the batch-pooled loss, pooled over the whole sample (eps = 1 as in training)
            loss = sum(1 - (2 * a + 1) / (b + 1) for a, b in soft) / len(soft)
        return {"val_loss": loss, "val_dice": 2 * inter / total if total else 1.0}

    evaluate.n_patches = len(sample)
    return evaluate


def mask_fraction_map(mask_path, slide_dimensions, downsample, max_pixels=2 ** 25):
    """A mask's fraction of tumour in each ``downsample`` x ``downsample`` cell.

    Reads the mask in bands of rows (at most ``max_pixels`` mask pixels at once), so a mask of a
    50,000 px slide is never in memory whole. The output has the stitching canvas's shape,
    ``(H // downsample, W // downsample)``.
    """
    W, H = slide_dimensions
    d = int(downsample)
    out_h, out_w = H // d, W // d
    with Mask(mask_path, slide_dimensions) as mask:
        md = mask.downsample
        if md != 1.0:
            # A mask stored at a downsample: nearest sampling onto the canvas grid.
            return mask.read(0, 0, out_w, out_h, downsample=d).astype(np.float32)
        out = np.zeros((out_h, out_w), np.float32)
        band = max(1, (max_pixels // max(1, W)) // d) * d
        for y in range(0, out_h * d, band):
            y1 = min(out_h * d, y + band)
            a = mask.read_native(0, y, out_w * d, y1)
            k = (y1 - y) // d
            out[y // d:y // d + k] = a[:k * d, :out_w * d].reshape(k, d, out_w, d).mean(axis=(1, 3))
        return out


def slide_metrics(pred, truth, coverage, patch_cells, empty=1.0, paip_threshold=0.65):
    """Dice and Jaccard of one slide, three ways.

    Args:
        pred: the binary prediction at the canvas's scale.
        truth: the binary ground truth at the same scale.
        coverage: patches covering each canvas cell (0 = not predicted: glass).
        patch_cells: a patch's side in canvas cells (``patch_size // downsample``).
        empty: the per-patch value when a patch has no tumour and none is predicted.
        paip_threshold: the PAIP 2019 cut-off under which a slide's Jaccard scores 0.

    Returns:
        A dict: ``dice_pooled``, ``jaccard_pooled`` (over every pixel of the slide, at the
        canvas's scale), ``dice_patch``, ``jaccard_patch`` (mean over the predicted patches,
        ``empty`` for empty-empty ones), ``n_patches``, ``n_empty_patches``, ``paip`` (the
        pooled Jaccard, 0 below the cut-off) and the tumour areas in canvas cells.
    """
    pred = np.asarray(pred).astype(bool)
    truth = np.asarray(truth).astype(bool)
    if pred.shape != truth.shape:
        raise InputError(f"prediction {pred.shape} and ground truth {truth.shape} differ in shape")
    d, j = dice_jaccard(pred, truth, empty=empty)
    e = int(patch_cells)
    h, w = (pred.shape[0] // e) * e, (pred.shape[1] // e) * e

    def blocks(a):
        return a[:h, :w].reshape(h // e, e, w // e, e).swapaxes(1, 2).reshape(-1, e * e)

    predicted = blocks(np.asarray(coverage) > 0).any(1)
    pb, tb = blocks(pred)[predicted], blocks(truth)[predicted]
    inter = (pb & tb).sum(1)
    tot = pb.sum(1) + tb.sum(1)
    is_empty = tot == 0
    dp = np.where(is_empty, empty, 2 * inter / np.maximum(tot, 1))
    jp = np.where(is_empty, empty, inter / np.maximum(tot - inter, 1))
    n = int(predicted.sum())
    return {"dice_pooled": d, "jaccard_pooled": j,
            "dice_patch": float(dp.mean()) if n else float("nan"),
            "jaccard_patch": float(jp.mean()) if n else float("nan"),
            "n_patches": n, "n_empty_patches": int(is_empty.sum()),
            "paip": paip_score(j, paip_threshold),
            "pred_cells": int(pred.sum()), "true_cells": int(truth.sum())}


def segment_cases(model, cases, out_folder, input_size, params, out_downsample=8, stride=None,
                  threshold=0.5, batch_size=32, device=None, progress=True, log=print, tag=""):
    """Whole-slide segmentation of ``cases``, with per-slide metrics where a mask exists.

    Each slide is predicted by :func:`helpers.inference.predict_slide`, thresholded, and saved as
    ``<out_folder>/<case>_pred.tif`` (plus the probability canvas ``<case>_prob.npy``), both
    atomically. A slide whose files exist for the same ``tag`` (e.g. the checkpoint's epoch
    and the inference settings) is not predicted again, so an interrupted run resumes.

    Args:
        model: the trained network.
        cases: :class:`helpers.slides.Case` objects.
        out_folder: where the masks go.
        input_size: the network's input side.
        params: the run's :class:`helpers.patches.ExtractionParams` (patch size, glass test,
            which mask is the ground truth).
        out_downsample: the canvas's downscale (the masks' and the metrics' resolution).
        stride: the inference grid step (default: ``params.patch_size``, no overlap).
        threshold: probability above which a canvas cell is tumour.
        tag: identifies the model and settings; files made under another tag are redone.

    Returns:
        ``(table, canvases)``: a DataFrame with one row per case (metrics NaN where the case
        has no mask) and ``{case_id: {"prob", "pred", "truth" or None}}``.
    """
    import json
    import warnings
    from pathlib import Path

    import pandas as pd

    from .atomic import atomic_path, write_json
    from .inference import predict_slide, save_mask_tiff
    from .slides import Slide

    check_fraction("threshold", threshold)
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    P = params.patch_size
    stride = stride or P
    settings = {"tag": tag, "input_size": input_size, "out_downsample": out_downsample, "stride": stride,
                "patch_size": P, "glass_level": params.glass_level, "tissue_threshold": params.tissue_threshold}
    rows, canvases = [], {}
    for case in cases:
        stamp = out / f"{case.case_id}_prob.json"
        prob_path = out / f"{case.case_id}_prob.npy"
        with Slide(case.slide) as s:
            dims = s.dimensions
        if stamp.exists() and prob_path.exists() and json.loads(stamp.read_text()).get("settings") == settings:
            info = json.loads(stamp.read_text())
            prob = np.load(prob_path)
            cov = np.load(out / f"{case.case_id}_cov.npy")
            log(f"{case.case_id}: reusing the prediction made earlier with the same model and settings")
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = predict_slide(model, case.slide, probabilities, out_downsample=out_downsample, stride=stride,
                                    patch_size=P, batch_size=batch_size, device=device, tissue=params,
                                    progress=progress, input_size=input_size)
            for w in caught:
                log(f"{case.case_id}: {w.message}")
            prob, cov = res["prob"], res["coverage"]
            info = {"settings": settings, "n_patches": res["n_patches"], "seconds": round(res["seconds"], 2)}
            for name, arr in (("prob", prob), ("cov", cov)):
                with atomic_path(out / f"{case.case_id}_{name}.npy", suffix=".npy") as tmp:
                    np.save(tmp, arr)
            save_mask_tiff(out / f"{case.case_id}_pred.tif", prob > threshold, out_downsample)
            write_json(stamp, info)
        pred = prob > threshold
        mask_path = case.mask_path(params.label_mask)
        row = {"case_id": case.case_id, "n_patches": info["n_patches"], "seconds": info["seconds"]}
        truth = None
        if mask_path is None:
            log(f"{case.case_id}: no {params.label_mask} mask, so no metrics (the prediction is saved)")
        else:
            truth = mask_fraction_map(mask_path, dims, out_downsample) > 0.5
            row.update(slide_metrics(pred, truth, cov, P // out_downsample))
        rows.append(row)
        canvases[case.case_id] = {"prob": prob, "pred": pred, "truth": truth, "coverage": cov}
    return pd.DataFrame(rows), canvases
