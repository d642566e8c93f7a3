"""Notebook 04's steps: the classifiers' plan, their training as jobs, prediction, Table 1.

- :class:`ClassificationPlan` / :func:`classification_plan`: which classifiers (two networks at
  three scales) on which patches, where they are trained or read from.
- :func:`train_classifiers`: each classifier a training job (:mod:`helpers.paper.jobs`), on
  the GPUs, on CPU processes or in this process; :func:`augmentation_comparison` likewise.
- :func:`predict_classifiers` and :func:`table1_row`: the test patches' predictions of each
  classifier, and its row of the paper's Table 1.

The data, batches and evaluation are :mod:`helpers.paper.classification_data`'s. Used by
notebook 04.
"""

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..core.atomic import atomic_path
from ..core.errors import InputError
from ..core.parallel import usable_cpus
from ..core.paths import runs_root
from ..core.provenance import file_sha256, write_stamp
from ..learning.metrics import bootstrap_interval, classification_report, majority_baseline, read_against_baseline
from ..learning.train import checkpoint_meta, read_trained, trained_network
from ..patching.caches import too_small_reason
from ..wsi.slides import Slide
from .classification_data import (
    PREDICTION_COLUMNS,
    load_class_patches,
    predict_patches,
    prediction_table,
)

# ---------------------------------------------------------------------------------------------
# Notebook 04's plan: which classifiers, on which patches; training, prediction, Table 1
# ---------------------------------------------------------------------------------------------


@dataclass
class ClassificationPlan:
    """What notebook 04 does with a run.

    Attributes:
        mode: ``train`` (train on this run's split, predict its validation and test slides) or
            ``apply`` (predict every slide with the classifiers of ``models_from``).
        models, scales, strides: the classifiers (model x scale) and each scale's training grid
            step (training grids may overlap).
        params: ``{scale: ExtractionParams}`` of each scale's training caches.
        grid_params: ``{scale: ExtractionParams}`` of the grids that are predicted: the patch
            size as step (no overlap, as the paper), so no test patch is counted twice.
        sources: ``{"<model>_x<scale>": checkpoint folder}`` of the classifiers that predict.
        models_from: the run whose classifiers are applied.
        trainable: ``[(model, scale)]`` with both classes in training and validation (after
            :meth:`load_patches`).
        skipped: ``{"<model>_x<scale>": why}`` for the others.
        notes: what to tell about slides without patches.
    """

    mode: str
    models: list
    scales: list
    strides: list
    params: dict
    sources: dict
    models_from: str = ""
    trainable: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    sets: dict = field(default_factory=dict)
    grid_params: dict = field(default_factory=dict)

    def predicted_splits(self):
        """The splits whose slides are predicted: validation (to choose voting thresholds) and
        test in ``train`` mode; ``all`` in ``apply`` mode."""
        return ("val", "test") if self.mode == "train" else ("all",)

    def describe(self):
        """One line for the notebook."""
        what = (
            f"applying {len(self.sources)} classifiers of run {self.models_from!r} to every slide"
            if self.mode == "apply"
            else f"training {len(self.models)} models x scales {self.scales}"
        )
        return f"{what}; strides {dict(zip(self.scales, self.strides))} px at each scale"

    def target_split(self):
        """The split that is scored (``test``), or ``all`` in apply mode."""
        return "test" if self.mode == "train" else "all"

    def load_patches(self, run, progress=True):
        """Cut the caches each scale needs (another stride than notebook 02's), open the
        patches of every split, and find which classifiers can be trained.

        Returns:
            ``(sets, counts)``: ``{(scale, split): ClassPatches}`` and a table of tumour and
            non-tumour patches per scale and split, with the slides that give none. Training
            and validation patches (``train``, ``val``) are cut at the training stride; the
            predicted ones (``("grid", split)`` keys, the table's ``grid`` rows) without
            overlap.
        """
        from ..patching.patches import extract_dataset

        cases = {"all": list(run.cases.values()), **run.by_split}
        fit = ("train", "val") if self.mode == "train" else ()
        rows = []
        for sc in self.scales:
            p, g = self.params[sc], self.grid_params[sc]
            if fit:
                fit_cases = [c for s in fit for c in cases[s]]
                extract_dataset(fit_cases, [sc], run.cache_root, p, progress=progress, warn=False)
            grid_cases = [c for s in self.predicted_splits() for c in cases[s]]
            extract_dataset(grid_cases, [sc], run.cache_root, g, progress=progress, warn=False)
            todo = [(s, s, p, True) for s in fit] + [(("grid", s), s, g, False) for s in self.predicted_splits()]
            for key, s, prm, labelled in todo:
                d = load_class_patches(cases[s], run.cache_root, prm, sc, s, labelled_only=labelled)
                self.sets[(sc, key)] = d
                t, n = d.counts()
                rows.append(
                    {
                        "scale": f"{sc}x",
                        "stride": prm.stride,
                        "split": s if labelled else f"{s} (predicted)",
                        "tumour": t,
                        "non-tumour": n,
                        "unlabelled": int((d.labels < 0).sum()),
                        "slides without a patch": f"{len(d.no_patch)} of {len(cases[s])}",
                    }
                )
            small = []
            for c in run.cases.values():
                with Slide(c.slide, verify=False) as sl:
                    why = too_small_reason(sl.dimensions, sc, p.patch_size, sl.downsample_at(sc, p.scale_reference))
                if why:
                    small.append(c.case_id)
            if small:
                self.notes.append(
                    f"{len(small)} slides are smaller than one patch at {sc}x (no stride fixes that), e.g. {small[0]}"
                )
        if self.mode == "train":
            for arch in self.models:
                for sc in self.scales:
                    tr, va = self.sets[(sc, "train")].counts(), self.sets[(sc, "val")].counts()
                    lack = [
                        f"{what} has no {cls} patch"
                        for what, (t, n) in (("training", tr), ("validation", va))
                        for cls, k in (("tumour", t), ("non-tumour", n))
                        if k == 0
                    ]
                    if lack:
                        self.skipped[f"{arch}_x{sc}"] = f"at {sc}x the " + " and the ".join(lack)
                    else:
                        self.trainable.append((arch, sc))
        return self.sets, pd.DataFrame(rows)

    def read_patches(self, run, rows):
        """The cached patch images of prediction-table ``rows`` (for figures)."""
        out = []
        for r in rows.itertuples():
            d = self.sets[(r.scale, ("grid", r.split))]
            hit = np.flatnonzero(
                (d.rows["case_id"].to_numpy() == r.case_id)
                & (d.rows["x"].to_numpy() == r.x)
                & (d.rows["y"].to_numpy() == r.y)
            )
            if len(hit):
                out.append(d.take(hit[:1])[0])
        return out


#: What to do about a classifier trained on patches of another size than this run's.
PATCH_SIZE_FIX = (
    "it was trained on patches of another size than this run cuts: rerun notebook 02 with the "
    "patch_size it was trained on, or apply another run's models"
)


def classification_plan(run, models_from, models, scales, strides):
    """Decide what notebook 04 does, or stop with one message saying why it cannot.

    Raises:
        InputError: ``models_from`` has none of the requested classifiers, or a stride that
            does not fit the run's patches.
    """
    from dataclasses import replace

    params = {
        sc: replace(run.params, stride=st, mask_scale=run.params.mask_scale if st == run.params.stride else 0)
        for sc, st in zip(scales, strides)
    }
    P = run.params.patch_size
    grid = run.params if run.params.stride == P else replace(run.params, stride=P, mask_scale=0)
    grid_params = dict.fromkeys(scales, grid)
    if models_from:
        src = runs_root() / models_from / "classification"
        sources = {}
        for arch in models:
            for sc in scales:
                ck = src / f"{arch}_x{sc}" / "best.pt"
                if ck.exists():
                    sources[f"{arch}_x{sc}"] = ck.parent
        if not sources:
            raise InputError(
                f"parameter 'models_from': run {models_from!r} has no trained classifier of {models} at "
                f"{scales}x (no {src}/<model>_x<scale>/best.pt); run its notebook 04 first"
            )
        for folder in sources.values():
            ck = read_trained(folder / "best.pt", {"patch_size": P}, keys=("patch_size",), fix=PATCH_SIZE_FIX)
            meta = checkpoint_meta(ck)
            sc = int(meta.get("scale", 0))
            run.check_model_resolution(meta, folder / "best.pt")
            if sc in params and meta.get("stride"):
                params[sc] = replace(params[sc], stride=int(meta["stride"]), mask_scale=0)
        return ClassificationPlan(
            "apply",
            list(models),
            list(scales),
            [params[s].stride for s in scales],
            params,
            sources,
            models_from,
            grid_params=grid_params,
        )
    folder = run.folder / "classification"
    return ClassificationPlan(
        "train",
        list(models),
        list(scales),
        list(strides),
        params,
        {f"{a}_x{s}": folder / f"{a}_x{s}" for a in models for s in scales},
        grid_params=grid_params,
    )


def _job(run, plan, out_dir, arch, sc, recipe, settings, seed, device, augment=True):
    from dataclasses import asdict

    from .jobs import ClassifierJob

    p = plan.params[sc]
    meta = {
        "arch": arch,
        "scale": sc,
        "stride": p.stride,
        "patch_size": p.patch_size,
        "input_size": settings["input_size"][arch],
        "label_mask": p.label_mask,
        "um_per_px": run.resolution(sc, ("train",)),
        "pretrained": settings["pretrained"],
        "weights_path": settings["weights"][arch] or None,
        "frozen_stages": settings["frozen"][arch],
        "batch_size": settings["batch_size"],
        "steps": settings["steps"],
        "balance": settings["balance"],
        "color_jitter": settings["color_jitter"],
        "bn_batches": settings["bn_batches"],
        "augment": augment,
        "data": run.data_key(sc, ("train", "val"), p),
    }
    return ClassifierJob(
        arch=arch,
        scale=sc,
        params=asdict(p),
        cache_root=str(run.cache_root),
        data_dir=str(run.data_dir),
        train_cases=[c.case_id for c in run.by_split["train"]],
        val_cases=[c.case_id for c in run.by_split["val"]],
        out_dir=str(out_dir),
        input_size=settings["input_size"][arch],
        batch_size=settings["batch_size"],
        steps=settings["steps"],
        balance=settings["balance"],
        augment=augment,
        color_jitter=settings["color_jitter"],
        bn_batches=settings["bn_batches"],
        pretrained=settings["pretrained"],
        weights_path=settings["weights"][arch] or None,
        frozen_stages=settings["frozen"][arch],
        # the checkpoint kept is the epoch of best validation balanced accuracy: on unbalanced
        # classes the lowest loss can be a model that answers one class (balanced accuracy 0.5)
        config={**recipe, "monitor": "val_bal_acc", "mode": "max", "seed": seed, "device": device},
        meta=meta,
        progress=True,
    )


def train_classifiers(run, plan, out_dir, recipes, settings, seed=0, device="auto", gpus=1, cpu_jobs=1):
    """Train every trainable (model, scale) of ``plan`` into ``<out_dir>/<model>_x<scale>/``.

    One after another in this process; side by side, one per GPU, with ``gpus`` > 1; or, on a
    CPU, side by side in ``cpu_jobs`` processes that share the cores
    (:func:`helpers.paper.jobs.run_jobs`). Each resumes from its ``last.pt``. Skipped classifiers are
    printed with the reason.

    Why processes on a CPU: EfficientNet-B0's depthwise convolutions gain little from a second
    thread (a training step at 32 px took 0.367 s on one core of a 2-core EPYC, 0.308 s on two),
    so two classifiers trained side by side on one core each finish sooner than one after the
    other on both (measured: 1.6x). Each job is seeded by its spec; a job's numbers depend on
    its thread count (the last bits of sums), so they repeat for the same ``cpu_jobs`` and cores.

    Returns:
        ``{"<model>_x<scale>": history DataFrame}``.
    """
    from .jobs import run_job, run_jobs

    for key, why in plan.skipped.items():
        print(f"{key}: skipped: {why}")
    if plan.mode != "train" or not plan.trainable:
        if plan.mode == "train":
            print("no classifier can be trained on this dataset: notebook 05 will say so")
        return {}
    keys = [f"{a}_x{s}" for a, s in plan.trainable]
    jobs = [
        _job(run, plan, out_dir / k, a, s, recipes[a], settings, seed, device)
        for k, (a, s) in zip(keys, plan.trainable)
    ]
    n_gpu = min(gpus, torch.cuda.device_count())
    if n_gpu > 1:
        return dict(zip(keys, run_jobs(jobs, devices=list(range(n_gpu)))))
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if on_cpu and cpu_jobs > 1 and len(jobs) > 1:
        n = min(cpu_jobs, len(jobs))
        threads = max(1, usable_cpus() // n)
        # The longest jobs (most epochs, ResNet-50's heavier steps) first, so both processes end together.
        order = sorted(range(len(jobs)), key=lambda i: -jobs[i].config["epochs"] * (2 if "resnet" in keys[i] else 1))
        done = run_jobs([jobs[i] for i in order], devices=["cpu"] * n, threads=threads)
        return {keys[i]: h for i, h in sorted(zip(order, done))}
    out = {}
    for key, job in zip(keys, jobs):  # one after another in this process, each line naming its classifier
        out[key] = run_job(job, log=lambda m, k=key: print(f"{k}: {m}"))
    return out


def _load_classifier(plan, key, input_size):
    """The classifier ``key`` (``<model>_x<scale>``) of ``plan`` from its ``best.pt``, and the input
    size it was trained at (``input_size``, an int or ``{arch: int}``, only for checkpoints that
    do not record it). The checkpoint must be of that model and scale."""
    from ..learning.models import build_classifier

    arch, scale = key.rsplit("_x", 1)
    model, ck = trained_network(
        lambda meta: build_classifier(meta.get("arch", arch)),
        plan.sources[key] / "best.pt",
        {"arch": arch, "scale": int(scale)},
        keys=("arch", "scale"),
        fix=f"the folder {key} holds another classifier: train it again",
    )
    meta = checkpoint_meta(ck)
    fallback = input_size.get(meta.get("arch", arch), 224) if isinstance(input_size, dict) else input_size
    return model, int(meta.get("input_size", fallback))


#: Columns of Table 1 (``table1.csv``), one row per model and scale.
TABLE1_COLUMNS = [
    "model",
    "scale",
    "paper acc %",
    "acc %",
    "95% CI",
    "baseline %",
    "reading",
    "sensitivity %",
    "specificity %",
    "tumour",
    "non_tumour",
    "slides",
    "evaluated",
    "why",
    "confusion [[TN FP] [FN TP]]",
]


def table1_row(lab, seed=0):
    """Table 1's numbers for one classifier from its labelled predictions ``lab`` (columns
    ``case_id``, ``label``, ``pred``): accuracy with its 95 % bootstrap interval over slides,
    the majority-class baseline of the same patches, the reading against it, sensitivity,
    specificity and the confusion matrix."""

    r = classification_report(lab.label, lab.pred)
    lo, hi = bootstrap_interval((lab.label == lab.pred).to_numpy(), lab.case_id.to_numpy(), seed=seed)
    base = majority_baseline(lab.label)
    return {
        "evaluated": True,
        "why": "",
        "acc %": 100 * r["accuracy"],
        "95% CI": f"{100 * lo:.1f}-{100 * hi:.1f}",
        "baseline %": 100 * base,
        "reading": read_against_baseline(r["accuracy"], base, lo),
        "sensitivity %": 100 * r["sensitivity"],
        "specificity %": 100 * r["specificity"],
        "tumour": int((lab.label == 1).sum()),
        "non_tumour": int((lab.label == 0).sum()),
        "slides": int(lab.case_id.nunique()),
        "confusion [[TN FP] [FN TP]]": r["confusion"].tolist(),
    }


def sample_per_slide(data, limit, seed=0):
    """At most ``limit`` patches of each slide of ``data``, drawn at random (seeded), in order.

    A slide's share of tumour patches estimated from 300 random patches has a standard error
    of at most 0.03: enough for choosing a voting threshold on validation slides.
    """
    keep = []
    owners = data.owner
    rng = np.random.default_rng(seed)
    for s in np.unique(owners):
        idx = np.flatnonzero(owners == s)
        keep.append(np.sort(rng.choice(idx, limit, replace=False)) if len(idx) > limit else idx)
    return data.subset(np.concatenate(keep)) if keep else data


def predict_classifiers(run, plan, out_dir, input_size=224, device=None, val_per_slide=300):
    """Predict the patches of the predicted splits (validation and test; every slide when
    applying) with every classifier that has a checkpoint, on grids without overlap; write
    ``predictions.csv`` (with its provenance: each classifier's weights and the caches) and
    ``table1.csv`` (scored on the test split, or on every labelled slide when applying).
    Validation slides are predicted on a random sample of at most ``val_per_slide`` patches
    per slide and scale (0: all): they only serve to choose notebook 05's voting thresholds.

    Returns:
        ``(predictions, table1)``.
    """
    from .report import PAPER_TABLE1

    scored = plan.target_split()
    splits = plan.predicted_splits()
    slides = sorted({c.case_id for s in splits for c in (run.cases.values() if s == "all" else run.by_split[s])})
    preds, rows, used, skipped = [], [], {}, dict(plan.skipped)
    for arch in plan.models:
        for sc in plan.scales:
            key = f"{arch}_x{sc}"
            folder = plan.sources.get(key)
            row = {"model": arch, "scale": f"{sc}x", "paper acc %": PAPER_TABLE1.get((arch, sc), float("nan"))}
            why = skipped.get(key) or (
                None if folder is not None and (folder / "best.pt").exists() else "no trained checkpoint"
            )
            if why is None and not len(plan.sets[(sc, ("grid", scored))]):
                why = f"no {scored} patch at {sc}x"
            if why:
                skipped[key] = why
                rows.append({**row, "evaluated": False, "why": why})
                continue
            model, size = _load_classifier(plan, key, input_size)
            tables = {}
            for s in splits:
                data = plan.sets[(sc, ("grid", s))]
                if s == "val" and val_per_slide:
                    data = sample_per_slide(data, val_per_slide)
                if len(data):
                    prob = predict_patches(model.to(device or "cpu"), data, size, device=device)
                    tables[s] = prediction_table(data, prob, arch, split=s)
            preds.extend(tables.values())
            ck = folder / "best.pt"
            used[key] = {
                "weights": file_sha256(ck),
                "checkpoint": str(ck.resolve().relative_to(runs_root().resolve()))
                if ck.resolve().is_relative_to(runs_root().resolve())
                else str(ck),
                "data": run.data_key(sc, tuple(s for s in splits if s != "all"), plan.grid_params[sc]),
            }
            t = tables[scored]  # not empty: a classifier without a scored patch was skipped above
            lab = t[t.label >= 0]
            rows.append({**row, **(table1_row(lab) if len(lab) else {"evaluated": False, "why": "no labelled patch"})})
    pred = pd.concat(preds, ignore_index=True) if preds else pd.DataFrame(columns=PREDICTION_COLUMNS)
    table1 = pd.DataFrame(rows).reindex(columns=TABLE1_COLUMNS)
    table1[["tumour", "non_tumour", "slides"]] = table1[["tumour", "non_tumour", "slides"]].fillna(0).astype(int)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, t in (("predictions.csv", pred), ("table1.csv", table1)):
        with atomic_path(out_dir / name) as tmp:
            t.to_csv(tmp, index=False)
    write_stamp(
        out_dir / "predictions.csv",
        {
            "extraction": run.extraction_key,
            "split": run.split_key,
            "slides": slides,
            "mode": plan.mode,
            "models_from": plan.models_from,
            "classifiers": used,
            "skipped": skipped,
        },
    )
    return pred, table1


def augmentation_comparison(run, plan, out_dir, recipes, settings, arch="resnet50", scale=16, seed=0, device="auto"):
    """One classifier of the run trained again with augmentation off (same seed, epochs and
    batches), against the run's own, on the same test patches.

    Args:
        run, plan, out_dir, recipes, settings, seed, device: as for :func:`train_classifiers`.
        arch, scale: the classifier (the first trainable one when it was not trained).

    Returns:
        ``(table, curves)``: per augmentation (on, off) the best validation balanced accuracy and
        the test accuracy, sensitivity and specificity (%); and their histories.
    """
    from .jobs import run_job

    if (arch, scale) not in plan.trainable:
        if not plan.trainable:
            return pd.DataFrame(), {}
        arch, scale = plan.trainable[0]
    key = f"{arch}_x{scale}"
    folders = {"on": plan.sources[key], "off": out_dir / f"{key}_no_augmentation"}
    curves = {
        "on": pd.read_csv(folders["on"] / "history.csv"),
        "off": run_job(
            _job(run, plan, folders["off"], arch, scale, recipes[arch], settings, seed, device, augment=False),
            log=lambda m: None,
        ),
    }
    test = plan.sets[(scale, ("grid", "test"))]
    lab_idx = np.flatnonzero(test.labels >= 0)
    sub = test.subset(lab_idx)
    rows = []
    for name, folder in folders.items():
        r = {}
        if len(lab_idx):
            model, size = _load_classifier(
                ClassificationPlan("train", [], [], [], {}, {key: folder}), key, settings["input_size"]
            )
            prob = predict_patches(model, sub, size, device=torch.device("cpu"))
            r = table1_row(prediction_table(sub, prob, arch))
        rows.append(
            {
                "classifier": f"{arch} {scale}x",
                "augmentation": "on (the paper's)" if name == "on" else "off",
                "best val balanced acc %": 100 * float(curves[name].val_bal_acc.max()),
                "test acc %": r.get("acc %", float("nan")),
                "95% CI": r.get("95% CI", "-"),
                "baseline %": r.get("baseline %", float("nan")),
                "sensitivity %": r.get("sensitivity %", float("nan")),
                "specificity %": r.get("specificity %", float("nan")),
            }
        )
    return pd.DataFrame(rows), curves
