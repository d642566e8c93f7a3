"""Notebook 03's steps: the segmenter's plan, its training as a job, per-slide evaluation.

- :func:`slide_metrics`: a slide's Dice / Jaccard three ways (pooled, per patch, PAIP's).
- :class:`SegmentationPlan` / :func:`segmentation_plan`: what notebook 03 does with a run.
- :func:`train_segmenter`: the UNet++ trained as a job (:mod:`helpers.paper.jobs`), on one
  process or several GPUs; :func:`trained_segmenter` reads it back.
- :func:`segment_with` / :func:`segment_cases`: whole-slide masks of the validation and test
  slides, each scored against its ground truth, reused when their provenance matches.

The data, batches and evaluation are :mod:`helpers.paper.segmentation_data`'s. Used by
notebook 03.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.atomic import atomic_path
from ..core.errors import InputError, check_fraction
from ..core.paths import runs_root
from ..core.provenance import file_fingerprint, file_sha256, read_stamp, write_stamp
from ..learning.metrics import dice_jaccard, dice_jaccard_per_patch, paip_score
from ..learning.train import checkpoint_meta, trained_network
from ..learning.unetpp import build_segmenter, probabilities
from ..patching.caches import cache_folder
from ..wsi.slides import Slide
from .segmentation_data import (
    mask_fraction_map,
)

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

        from ..learning.inference import predict_slide, save_mask_tiff

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

    Each slide is predicted by :func:`helpers.learning.inference.predict_slide` at the segmentation
    scale (``params.mask_scale``), thresholded, and saved as ``<out_folder>/<case>_pred.tif``
    (plus the probability canvas ``<case>_prob.npy`` and coverage ``<case>_cov.npy``), all
    atomically. Each slide's files carry a provenance key (:mod:`helpers.core.provenance`): the
    slide's content, the model's weights and every inference setting. A slide whose files hold
    the same key is not predicted again (an interrupted run resumes); any other key (new
    weights, another stride ...) predicts it anew.

    Args:
        model: the trained network.
        cases: :class:`helpers.wsi.dataset.Case` objects.
        out_folder: where the masks go.
        input_size: the network's input side.
        params: the run's :class:`helpers.patching.caches.ExtractionParams` (patch size, segmentation
            scale, tissue test, which mask is the ground truth).
        weights: what identifies the weights (e.g. the SHA-256 of ``best.pt``).
        out_downsample: the canvas's downscale (the masks' and the metrics' resolution).
        stride: the inference grid step at the segmentation scale (default: the patch size).
        threshold: probability above which a canvas cell is tumour.

    Returns:
        ``(table, canvases)``: a DataFrame with one row per case (metrics NaN where the case
        has no mask) and ``{case_id: {"prob", "pred", "truth" or None, "coverage"}}``.
    """

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
        run: the :class:`helpers.notebook.session.Run`.
        models_from: a run name whose trained UNet++ to apply to every slide instead of training.

    Raises:
        InputError: ``models_from`` has no trained model; or, to train, the training or
            validation split has no slide with a mask, or no training patch holds tumour.
    """

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
    """Train notebook 03's UNet++ (resuming from ``last.pt``) as a :mod:`helpers.paper.jobs` job.

    On one device it trains in this process; with ``gpus`` > 1 and that many GPUs, with DDP
    (a torchrun subprocess). The checkpoint's ``meta`` records the network's settings and the
    data it was trained on (the split's key and every training and validation cache's key), so
    a rerun on other patches is refused instead of resumed.

    Args:
        run, plan: as from :func:`helpers.notebook.session.load_run` and :func:`segmentation_plan`.
        out_dir: the checkpoints' folder.
        gpus: GPUs for DDP.
        config: :class:`helpers.learning.train.TrainConfig` fields.
        settings: the :class:`helpers.paper.jobs.SegmentationJob` fields (``variant``,
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

    The network is the variant the checkpoint records (:func:`helpers.learning.train.trained_network`);
    no setting of this run must agree with it: the patch size, segmentation scale and input size
    it is applied at are its own (the resolution is checked by
    :meth:`helpers.notebook.session.Run.check_model_resolution`).
    """

    ck_path = Path(folder) / "best.pt"
    model, ck = trained_network(lambda meta: build_segmenter(meta.get("variant", "paper")), ck_path)
    return model, checkpoint_meta(ck), ck_path, file_sha256(ck_path)


def segment_with(run, plan, out_dir, device=None, out_downsample=8, stride=0, threshold=0.5, batch_size=32):
    """Segment the plan's slides with its trained model; write ``metrics.csv`` with its key.

    The patch size, segmentation scale and input size are the model's (as trained); the tissue
    test is this run's. Returns :func:`segment_cases`'s ``(table, canvases)``.
    """
    from dataclasses import replace

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
