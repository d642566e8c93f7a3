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

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .augment import augment_batch
from .caches import cache_folder, load_patch_set
from .errors import InputError, check_fraction, check_positive
from .metrics import dice_jaccard, dice_jaccard_per_patch, paip_score, soft_dice_loss
from .slides import Mask
from .train import SeededPrepare
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
        cases: :class:`helpers.dataset.Case` objects (one split).
        cache_root: ``runs/<run>/patches``.
        params: the :class:`helpers.caches.ExtractionParams` notebook 02 used (its
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
        folder, _ = cache_folder(cache_root, case, scale, params)
        if not (folder / "meta.json").exists():
            raise InputError(
                f"no {scale}x patch cache for {case.case_id} at {folder}: run notebook 02 "
                f"(with {scale} among its scales and the same parameters) first"
            )
        ps = load_patch_set(folder)
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
    """``prepare(x, m, device, train)`` for :func:`helpers.train.fit`.

    Moves a uint8 batch to the device, scales it to [0, 1], resizes it to ``input_size`` and,
    when training, augments images and masks with one geometry (on the device: a GPU does the
    augmentation too).

    Returns:
        A :class:`helpers.train.SeededPrepare`: its augmentation generator (seeded with
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


#: The per-slide metrics of :func:`slide_metrics` (the columns of ``metrics.csv``).
METRIC_COLUMNS = (
    "dice_pooled",
    "jaccard_pooled",
    "dice_patch",
    "jaccard_patch",
    "n_scored_patches",
    "n_empty_patches",
    "paip",
    "pred_cells",
    "true_cells",
)


def slide_metrics(pred, truth, coverage, patch_cells, empty=1.0, paip_threshold=0.65):
    """Dice and Jaccard of one slide, three ways.

    Args:
        pred: the binary prediction at the canvas's scale.
        truth: the binary ground truth at the same scale.
        coverage: patches covering each canvas cell (0 = not predicted: glass).
        patch_cells: a patch's side in canvas cells.
        empty: the per-patch value when a patch has no tumour and none is predicted.
        paip_threshold: the PAIP 2019 cut-off under which a slide's Jaccard scores 0.

    Returns:
        A dict: ``dice_pooled``, ``jaccard_pooled`` (over every pixel of the slide, at the
        canvas's scale), ``dice_patch``, ``jaccard_patch`` (mean over the predicted grid
        cells of a patch's size, ``empty`` for empty-empty ones), ``n_scored_patches``,
        ``n_empty_patches``, ``paip`` (the pooled Jaccard, 0 below the cut-off) and the tumour
        areas in canvas cells.
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
    dp, jp, n_empty = dice_jaccard_per_patch(blocks(pred)[predicted], blocks(truth)[predicted], empty=empty)
    return {
        "dice_pooled": d,
        "jaccard_pooled": j,
        "dice_patch": dp,
        "jaccard_patch": jp,
        "n_scored_patches": int(predicted.sum()),
        "n_empty_patches": n_empty,
        "paip": paip_score(j, paip_threshold),
        "pred_cells": int(pred.sum()),
        "true_cells": int(truth.sum()),
    }


@dataclass
class _Segmenting:
    """What :func:`segment_cases` segments with (its arguments), and each slide's steps: the
    prediction's provenance key, reusing or making and saving the prediction, scoring it."""

    model: object
    out: Path
    input_size: int
    params: object
    weights: str
    out_downsample: int
    stride: int
    threshold: float
    batch_size: int
    device: object
    progress: bool
    log: object

    def key(self, case, downsample):
        """What ``case``'s prediction depends on: the slide's content, the weights and every
        inference setting (the canvas's ``downsample`` too under ``scale_reference``)."""
        from .provenance import file_fingerprint

        p = self.params
        key = {
            "slide": file_fingerprint(case.slide),
            "weights": self.weights,
            "input_size": self.input_size,
            "out_downsample": self.out_downsample,
            "stride": self.stride,
            "scale": p.mask_scale,
            "patch_size": p.patch_size,
            "tissue": {
                k: getattr(p, k) for k in ("tissue_method", "glass_level", "tissue_threshold", "tissue_subsample")
            },
        }
        if p.scale_reference:
            key["downsample"] = downsample
        return key

    def saved(self, case, key):
        """``(prob, coverage, info)`` of ``case``'s prediction saved with ``key``; ``None`` when
        there is none (or one with another key)."""
        from .provenance import read_stamp

        prob_path = self.out / f"{case.case_id}_prob.npy"
        info = read_stamp(prob_path)
        if info is None or info.get("key") != key or not prob_path.exists():
            return None
        prob, cov = np.load(prob_path), np.load(self.out / f"{case.case_id}_cov.npy")
        self.log(f"{case.case_id}: reusing its prediction (same slide, weights and settings)")
        return prob, cov, info

    def predict(self, case, key, downsample, cell):
        """Predict ``case``'s slide and save, atomically, its probabilities, coverage,
        thresholded mask and ``key``; the prediction's warnings go to ``log``.

        Returns:
            ``(prob, coverage, info)``.
        """
        import warnings

        from .atomic import atomic_path
        from .inference import predict_slide, save_mask_tiff
        from .provenance import write_stamp

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = predict_slide(
                self.model,
                case.slide,
                probabilities,
                out_downsample=self.out_downsample,
                stride=self.stride,
                patch_size=self.params.patch_size,
                batch_size=self.batch_size,
                device=self.device,
                tissue=self.params,
                progress=self.progress,
                input_size=self.input_size,
                scale=self.params.mask_scale,
                downsample=downsample,
            )
        for w in caught:
            self.log(f"{case.case_id}: {w.message}")
        prob, cov = res["prob"], res["coverage"]
        info = {"key": key, "n_patches": res["n_patches"], "seconds": round(res["seconds"], 2)}
        for name, arr in (("cov", cov), ("prob", prob)):
            with atomic_path(self.out / f"{case.case_id}_{name}.npy", suffix=".npy") as tmp:
                np.save(tmp, arr)
        save_mask_tiff(self.out / f"{case.case_id}_pred.tif", prob > self.threshold, cell)
        write_stamp(self.out / f"{case.case_id}_prob.npy", info)
        return prob, cov, info

    def score(self, case, info, pred, cov, dims, cell):
        """``(row, truth)``: ``case``'s row of the table (metrics NaN without a mask) and its
        ground truth at the canvas's scale (``None`` without a mask)."""
        p = self.params
        mask_path = case.mask_path(p.label_mask)
        row = {
            "case_id": case.case_id,
            "n_patches": info["n_patches"],
            "seconds": info["seconds"],
            **dict.fromkeys(METRIC_COLUMNS, float("nan")),
        }  # NaN where the slide has no mask
        if mask_path is None:
            self.log(f"{case.case_id}: no {p.label_mask} mask, so no metrics (the prediction is saved)")
            return row, None
        truth = mask_fraction_map(mask_path, dims, cell) > 0.5
        row.update(slide_metrics(pred, truth, cov, p.patch_size * p.mask_scale // self.out_downsample))
        return row, truth


def segment_cases(
    model,
    cases,
    out_folder,
    input_size,
    params,
    weights,
    out_downsample=8,
    stride=None,
    threshold=0.5,
    batch_size=32,
    device=None,
    progress=True,
    log=print,
):
    """Whole-slide segmentation of ``cases``, with per-slide metrics where a mask exists.

    Each slide is predicted by :func:`helpers.inference.predict_slide` at the segmentation
    scale (``params.mask_scale``), thresholded, and saved as ``<out_folder>/<case>_pred.tif``
    (plus the probability canvas ``<case>_prob.npy`` and coverage ``<case>_cov.npy``), all
    atomically. Each slide's files carry a provenance key (:mod:`helpers.provenance`): the
    slide's content, the model's weights and every inference setting. A slide whose files hold
    the same key is not predicted again (an interrupted run resumes); any other key (new
    weights, another stride ...) predicts it anew.

    Args:
        model: the trained network.
        cases: :class:`helpers.dataset.Case` objects.
        out_folder: where the masks go.
        input_size: the network's input side.
        params: the run's :class:`helpers.caches.ExtractionParams` (patch size, segmentation
            scale, tissue test, which mask is the ground truth).
        weights: what identifies the weights (e.g. the SHA-256 of ``best.pt``).
        out_downsample: the canvas's downscale (the masks' and the metrics' resolution).
        stride: the inference grid step at the segmentation scale (default: the patch size).
        threshold: probability above which a canvas cell is tumour.

    Returns:
        ``(table, canvases)``: a DataFrame with one row per case (metrics NaN where the case
        has no mask) and ``{case_id: {"prob", "pred", "truth" or None, "coverage"}}``.
    """
    from .slides import Slide

    check_fraction("threshold", threshold)
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    scale, stride = params.mask_scale, stride or params.patch_size
    job = _Segmenting(
        model, out, input_size, params, weights, out_downsample, stride, threshold, batch_size, device, progress, log
    )
    rows, canvases = [], {}
    for case in cases:
        with Slide(case.slide) as s:
            dims, ds = s.dimensions, s.downsample_at(scale, params.scale_reference)
        cell = out_downsample // scale * ds  # the canvas's level-0 pixels per cell
        key = job.key(case, ds)
        prob, cov, info = job.saved(case, key) or job.predict(case, key, ds, cell)
        pred = prob > threshold
        row, truth = job.score(case, info, pred, cov, dims, cell)
        rows.append(row)
        canvases[case.case_id] = {"prob": prob, "pred": pred, "truth": truth, "coverage": cov, "downsample": cell}
    return pd.DataFrame(rows), canvases


# ---------------------------------------------------------------------------------------------
# Notebook 03's plan: train on this run's slides, or apply an earlier run's model
# ---------------------------------------------------------------------------------------------


@dataclass
class SegmentationPlan:
    """What notebook 03 does with a run.

    Attributes:
        mode: ``train`` (train on this run's split, segment its test slides) or ``apply``
            (segment every slide with the model of ``source``).
        train, val: the training and validation slides (with masks), in ``train`` mode.
        targets: the slides to segment and score.
        source: the folder of the checkpoint to segment with.
        models_from: the run whose model is applied (``apply`` mode).
        calibration: slides segmented as well but not scored (the validation slides, on which
            notebook 05 chooses the predicted-tumour share that calls a slide tumour).
    """

    mode: str
    train: list
    val: list
    targets: list
    source: object
    models_from: str = ""
    calibration: list = field(default_factory=list)

    def describe(self):
        """One line for the notebook."""
        if self.mode == "apply":
            return (
                f"applying the UNet++ of run {self.models_from!r} to all {len(self.targets)} slides (no training here)"
            )
        return (
            f"training on {len(self.train)} slides with masks, validating on {len(self.val)}, "
            f"segmenting the {len(self.targets)} test slides (and the {len(self.calibration)} validation "
            "slides, for notebook 05)"
        )


def segmentation_plan(run, models_from=""):
    """Decide what notebook 03 can do with ``run``, or stop with one message saying why not.

    Args:
        run: the :class:`helpers.notebook.Run`.
        models_from: a run name whose trained UNet++ to apply to every slide instead of training.

    Raises:
        InputError: ``models_from`` has no trained model; or, to train, the training or
            validation split has no slide with a mask, or no training patch holds tumour.
    """
    from .caches import cache_folder
    from .paths import runs_root

    if models_from:
        src = runs_root() / models_from / "segmentation"
        if not (src / "best.pt").exists():
            raise InputError(
                f"parameter 'models_from': run {models_from!r} has no trained UNet++ ({src / 'best.pt'}); "
                "run its notebook 03 first, or name another run"
            )
        return SegmentationPlan("apply", [], [], list(run.cases.values()), src, models_from)
    kind = run.params.label_mask
    fix = (
        "add the slides' masks, or set models_from to an earlier run whose model to apply "
        "(README, 'Applying trained models')"
    )
    split = {s: [c for c in run.by_split[s] if c.mask_path(kind) is not None] for s in ("train", "val")}
    for s, what in (("train", "training"), ("val", "validation")):
        if not split[s]:
            raise InputError(
                f"no slide of the {what} split ({len(run.by_split[s])} slides) has a {kind} mask, so "
                f"segmentation cannot be trained here: {fix}"
            )
    with_tumour = 0
    for c in split["train"]:
        folder, _ = cache_folder(run.cache_root, c, run.params.mask_scale, run.params)
        if (folder / "table.csv").exists():
            t = pd.read_csv(folder / "table.csv", usecols=["kept", f"{kind}_frac"])
            with_tumour += int(((t[f"{kind}_frac"] >= 0.05) & t["kept"]).sum())
    if not with_tumour:
        raise InputError(
            f"no training patch at {run.params.mask_scale}x holds tumour (the {len(split['train'])} "
            f"training slides' {kind} masks are empty, or their slides too small for a patch): "
            f"segmentation has nothing to learn. {fix[0].upper() + fix[1:]}"
        )
    return SegmentationPlan(
        "train",
        split["train"],
        split["val"],
        list(run.by_split["test"]),
        run.folder / "segmentation",
        calibration=list(run.by_split["val"]),
    )


def train_segmenter(run, plan, out_dir, gpus=1, config=None, **settings):
    """Train notebook 03's UNet++ (resuming from ``last.pt``) as a :mod:`helpers.jobs` job.

    On one device it trains in this process; with ``gpus`` > 1 and that many GPUs, with DDP
    (a torchrun subprocess). The checkpoint's ``meta`` records the network's settings and the
    data it was trained on (the split's key and every training and validation cache's key), so
    a rerun on other patches is refused instead of resumed.

    Args:
        run, plan: as from :func:`helpers.notebook.load_run` and :func:`segmentation_plan`.
        out_dir: the checkpoints' folder.
        gpus: GPUs for DDP.
        config: :class:`helpers.train.TrainConfig` fields.
        settings: the :class:`helpers.jobs.SegmentationJob` fields (``variant``,
            ``input_size``, ``batch_size``, ``steps``, ...; ``weights_path`` "" = none).

    Returns:
        The history DataFrame.
    """
    from dataclasses import asdict

    from .jobs import SegmentationJob, run_distributed, run_job

    settings = dict(settings)
    settings["weights_path"] = settings.get("weights_path") or None
    scale = run.params.mask_scale
    meta = {
        "variant": settings.get("variant", "paper"),
        "input_size": settings.get("input_size"),
        "patch_size": run.params.patch_size,
        "scale": scale,
        "um_per_px": run.resolution(scale, ("train",)),
        "label_mask": run.params.label_mask,
        **{
            k: settings.get(k)
            for k in (
                "pretrained",
                "weights_path",
                "batch_size",
                "steps",
                "tumour_share",
                "color_jitter",
                "dice_per_image",
                "bn_batches",
            )
        },
        "data": {
            "split": run.split_key,
            "caches": {s: run.data_key(scale, (s,))["caches"][s] for s in ("train", "val")},
        },
    }
    job = SegmentationJob(
        params=asdict(run.params),
        cache_root=str(run.cache_root),
        data_dir=str(run.data_dir),
        train_cases=[c.case_id for c in plan.train],
        val_cases=[c.case_id for c in plan.val],
        out_dir=str(out_dir),
        config=dict(config or {}),
        meta=meta,
        progress=True,
        **settings,
    )
    import torch

    if gpus > 1 and torch.cuda.device_count() >= gpus:
        return run_distributed([job], gpus)[0]
    return run_job(job)


def trained_segmenter(folder):
    """The UNet++ of ``<folder>/best.pt`` with its settings (``meta``) and the file's SHA-256.

    The network is the variant the checkpoint records (:func:`helpers.train.trained_network`);
    no setting of this run must agree with it: the patch size, segmentation scale and input size
    it is applied at are its own (the resolution is checked by
    :meth:`helpers.notebook.Run.check_model_resolution`).
    """
    from .provenance import file_sha256
    from .train import checkpoint_meta, trained_network
    from .unetpp import build_segmenter

    ck_path = Path(folder) / "best.pt"
    model, ck = trained_network(lambda meta: build_segmenter(meta.get("variant", "paper")), ck_path)
    return model, checkpoint_meta(ck), ck_path, file_sha256(ck_path)


def segment_with(run, plan, out_dir, device=None, out_downsample=8, stride=0, threshold=0.5, batch_size=32):
    """Segment the plan's slides with its trained model; write ``metrics.csv`` with its key.

    The patch size, segmentation scale and input size are the model's (as trained); the tissue
    test is this run's. Returns :func:`segment_cases`'s ``(table, canvases)``.
    """
    from dataclasses import replace

    from .atomic import atomic_path
    from .provenance import write_stamp

    model, meta, ck_path, weights = trained_segmenter(plan.source)
    run.check_model_resolution(meta, ck_path)
    params = replace(run.params, patch_size=int(meta["patch_size"]), mask_scale=int(meta["scale"]))
    model.to(device or torch.device("cpu"))
    tables = []
    for split, cases in (("test" if plan.mode == "train" else "all", plan.targets), ("val", plan.calibration)):
        if not cases:
            continue
        table, segmented = segment_cases(
            model,
            cases,
            out_dir,
            int(meta["input_size"]),
            params,
            weights,
            out_downsample=out_downsample,
            stride=stride or None,
            threshold=threshold,
            batch_size=batch_size,
            device=device,
        )
        tables.append(table.assign(split=split))
        if split != "val":
            canvases = segmented
    table = pd.concat(tables, ignore_index=True)
    path = Path(out_dir) / "metrics.csv"
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    write_stamp(
        path,
        {
            "extraction": run.extraction_key,
            "split": run.split_key,
            "weights": weights,
            "models_from": plan.models_from,
            "slides": [c.case_id for c in plan.targets + plan.calibration],
            "out_downsample": out_downsample,
            "stride": stride,
            "threshold": threshold,
        },
    )
    return table[table.split != "val"].reset_index(drop=True), canvases
