"""Patch classification data for notebook 04 (its steps: :mod:`helpers.paper.classification`).

- :func:`load_class_patches`: the labelled (tumour 1 / non-tumour 0) patches of a split at one
  scale, from the caches of notebook 02 (or notebook 04's own, with overlap), memory-mapped,
  with the slides that give no patch at that scale listed.
- :func:`class_batches`: balanced training batches, the minority class repeated up to the
  majority's count (each repeat augmented differently on the device), as the paper balances.
- :func:`class_prepare` / :func:`make_class_evaluator`: the device side of the pipeline and the
  validation metrics for :func:`helpers.learning.train.fit`.
- :func:`predict_patches` and :func:`prediction_table`: tumour probabilities of the test
  patches, one row per patch with its slide, scale and level-0 coordinates, for notebook 05.

Used by notebook 04, training jobs (:mod:`helpers.paper.jobs`) and ``bench/``.
"""

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..core.errors import InputError, check_positive
from ..learning.train import SeededPrepare
from ..patching.augment import augment_batch, balance_indices
from ..patching.caches import open_cache

#: Columns of a prediction table (one row per patch, model and scale).
PREDICTION_COLUMNS = ["case_id", "split", "model", "scale", "x", "y", "footprint", "prob", "pred", "label"]


@dataclass
class ClassPatches:
    """The labelled patches of several slides at one scale, as one dataset.

    Attributes:
        scale: the downscale factor.
        sets: the :class:`helpers.patching.caches.PatchSet` of each slide with patches.
        owner, local: which set and which row each patch comes from.
        labels: ``(n,)`` 0/1.
        rows: the cache-table rows of the patches (case_id, x, y, footprint, fractions ...).
        no_patch: case ids that give no labelled patch at this scale.
    """

    scale: int
    sets: list
    owner: np.ndarray
    local: np.ndarray
    labels: np.ndarray
    rows: pd.DataFrame
    no_patch: list = field(default_factory=list)

    def __len__(self):
        return len(self.labels)

    def counts(self):
        """``(tumour, non-tumour)`` patch counts."""
        return int((self.labels == 1).sum()), int((self.labels == 0).sum())

    def subset(self, idx):
        """The patches ``idx`` as a dataset of their own."""
        idx = np.asarray(idx, int)
        return ClassPatches(
            self.scale,
            self.sets,
            self.owner[idx],
            self.local[idx],
            self.labels[idx],
            self.rows.iloc[idx].reset_index(drop=True),
            self.no_patch,
        )

    def take(self, idx):
        """uint8 patches ``(k, P, P, 3)`` for dataset rows ``idx`` (read set by set)."""
        idx = np.asarray(idx)
        if not len(self.sets):
            raise InputError(f"no patch at {self.scale}x")
        P = self.sets[0].patches.shape[1]
        x = np.empty((len(idx), P, P, 3), np.uint8)
        own = self.owner[idx]
        for s in np.unique(own):
            sel = np.flatnonzero(own == s)
            rows = self.local[idx[sel]]
            order = np.argsort(rows, kind="stable")
            x[sel[order]] = self.sets[s].patches[rows[order]]
        return x


def load_class_patches(cases, cache_root, params, scale, what="training", labelled_only=True):
    """Open the patches of ``cases`` at ``scale`` as one dataset (memory-mapped).

    Args:
        cases: :class:`helpers.wsi.dataset.Case` objects of one split.
        cache_root: the folder of the patch caches.
        params: the :class:`helpers.patching.caches.ExtractionParams` the caches were made with.
        scale: 4, 16, 64 ...
        what: the split's name, for messages.
        labelled_only: leave out ambiguous and unlabelled patches (label -1), as training and
            Table 1 do; ``False`` keeps every kept patch (the slide's vote counts them all).

    Raises:
        InputError: a cache is missing (run the extraction first).
    """
    sets, owner, local, labels, rows, none = [], [], [], [], [], []
    for case in cases:
        fix = "run the patch extraction for this scale first (notebook 02, or notebook 04's section 1)"
        ps = open_cache(cache_root, case, scale, params, fix)
        k = ps.kept
        if labelled_only:
            k = k[k["label"] >= 0]
        if not len(k):
            none.append(case.case_id)
            continue
        sets.append(ps)
        owner.append(np.full(len(k), len(sets) - 1))
        local.append(k["index"].to_numpy())
        labels.append(k["label"].to_numpy(np.int64))
        rows.append(k)
    if not sets:
        return ClassPatches(
            scale,
            [],
            np.zeros(0, int),
            np.zeros(0, int),
            np.zeros(0, np.int64),
            pd.DataFrame(columns=["case_id", "x", "y", "footprint", "label"]),
            none,
        )
    return ClassPatches(
        scale,
        sets,
        np.concatenate(owner),
        np.concatenate(local),
        np.concatenate(labels),
        pd.concat(rows, ignore_index=True),
        none,
    )


def require_both_classes(data, what):
    """Raise :class:`InputError` naming the scale when ``data`` lacks a class."""
    t, n = data.counts()
    if t == 0 or n == 0:
        missing = "tumour" if t == 0 else "non-tumour"
        raise InputError(
            f"at {data.scale}x the {what} split has no {missing} patch ({t} tumour, {n} non-tumour, "
            f"{len(data.no_patch)} slides without any labelled patch): a classifier cannot be trained "
            f"there. Use a smaller stride at {data.scale}x, other slides in the split, or drop the scale"
        )


def class_batches(data, batch_size, balance=True, seed=0, max_batches=None):
    """``batches(epoch)``: one epoch of ``(x, y)`` uint8/int64 CPU batches.

    With ``balance``, each epoch is :func:`helpers.patching.augment.balance_indices` of the labels (the
    minority repeated up to the majority, a new seeded draw per epoch); else a permutation.
    ``max_batches`` cuts an epoch short (e.g. for BatchNorm recalibration).

    Raises:
        InputError: a class is absent (naming the scale), with ``balance``.
    """
    check_positive("batch_size", batch_size, integer=True)
    if balance:
        require_both_classes(data, "training")
    elif not len(data):
        raise InputError(f"no labelled training patch at {data.scale}x")

    def batches(epoch):
        rng_seed = [seed, epoch]
        idx = (
            balance_indices(data.labels, seed=np.random.default_rng(rng_seed).integers(2**31))
            if balance
            else np.random.default_rng(rng_seed).permutation(len(data))
        )

        n_batches = -(-len(idx) // batch_size)
        if max_batches:
            n_batches = min(n_batches, max_batches)

        class _Epoch:
            def __len__(self):
                return n_batches

            def __iter__(self):
                for i in range(0, n_batches * batch_size, batch_size):
                    b = idx[i : i + batch_size]
                    yield (torch.from_numpy(data.take(b)).permute(0, 3, 1, 2), torch.from_numpy(data.labels[b]))

        return _Epoch()

    return batches


def class_prepare(input_size, augment=True, color=0.0, seed=0):
    """``prepare(x, y, device, train)``: to the device, to [0, 1], resized, augmented in training.

    Returns:
        A :class:`helpers.learning.train.SeededPrepare`: its augmentation generator (seeded with
        ``seed``) is checkpointed by ``fit``, so a resumed run is exact.
    """

    def prepare(x, y, device, train, generator):
        x = x.to(device, non_blocking=True).float().div_(255)
        if x.shape[-1] != input_size:
            x = F.interpolate(x, size=input_size, mode="area")
        if train and augment:
            x = augment_batch(x, generator=generator(device), color=color)
        return x, y.to(device, non_blocking=True)

    return SeededPrepare(prepare, seed)


def predict_patches(model, data, input_size, batch_size=256, device=None):
    """Tumour probabilities (softmax of class 1) of every patch of ``data``, as float32.

    On a CPU the model runs in the channels-last memory format for the call (oneDNN's kernels
    for it were 1.3x (ResNet-50) to 4.6x (EfficientNet-B0) faster at 32 px, measured on a
    2-core EPYC) and is put back as it was after it.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    fmt = torch.channels_last if device.type == "cpu" else None
    if fmt is not None:
        model.to(memory_format=fmt)
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(data), batch_size):
                x = torch.from_numpy(data.take(np.arange(i, min(len(data), i + batch_size)))).permute(0, 3, 1, 2)
                x = x.to(device).float().div_(255)
                if x.shape[-1] != input_size:
                    x = F.interpolate(x, size=input_size, mode="area")
                if fmt is not None:
                    x = x.contiguous(memory_format=fmt)
                out.append(torch.softmax(model(x).float(), 1)[:, 1].cpu().numpy())
    finally:
        if fmt is not None:
            model.to(memory_format=torch.contiguous_format)
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def make_class_evaluator(data, input_size, batch_size=64, max_patches=0, seed=0):
    """``evaluate(model, device)`` -> validation loss, accuracy and balanced accuracy.

    Balanced accuracy (the mean of sensitivity and specificity) is what the checkpoint should
    be chosen on when the validation classes are unbalanced: accuracy rewards predicting the
    majority class. With ``max_patches``, a fixed, seeded sample of at most that many patches
    (half from each class where possible) is evaluated every epoch.
    """
    if not len(data):
        raise InputError(
            f"the validation split has no labelled patch at {data.scale}x; put slides that "
            f"give patches at this scale in it, or drop the scale"
        )
    idx = np.arange(len(data))
    if max_patches and len(data) > max_patches:
        rng = np.random.default_rng(seed)
        per = [np.flatnonzero(data.labels == c) for c in (0, 1)]
        half = max_patches // 2
        take = [rng.choice(p, min(len(p), half + max(0, half - len(q))), replace=False) for p, q in zip(per, per[::-1])]
        idx = np.sort(np.concatenate(take))
    sub = data.subset(idx)
    y = torch.from_numpy(sub.labels)

    def evaluate(model, device):
        p = torch.from_numpy(predict_patches(model, sub, input_size, batch_size, device))
        eps = 1e-6
        loss = float(-(y * torch.log(p + eps) + (1 - y) * torch.log(1 - p + eps)).mean())
        pred = (p >= 0.5).long()
        # The mean recall over the classes present (a class absent from validation is left out).
        recalls = [float((pred[y == c] == c).float().mean()) for c in (0, 1) if bool((y == c).any())]
        return {
            "val_loss": loss,
            "val_acc": float((pred == y).float().mean()),
            "val_bal_acc": sum(recalls) / len(recalls),
        }

    evaluate.n_patches = len(sub)
    return evaluate


def prediction_table(data, probs, model_name, threshold=0.5, split=""):
    """One row per patch: slide, split, model, scale, level-0 ``x``/``y``/``footprint``,
    probability, predicted and true label (the columns of :data:`PREDICTION_COLUMNS`)."""
    probs = np.asarray(probs, np.float32)
    if len(probs) != len(data):
        raise InputError(f"{len(probs)} probabilities for {len(data)} patches")
    if not len(data):
        return pd.DataFrame(columns=PREDICTION_COLUMNS)
    r = data.rows
    return pd.DataFrame(
        {
            "case_id": r["case_id"].to_numpy(),
            "split": split,
            "model": model_name,
            "scale": data.scale,
            "x": r["x"].to_numpy(),
            "y": r["y"].to_numpy(),
            "footprint": r["footprint"].to_numpy(),
            "prob": probs.round(5),
            "pred": (probs >= threshold).astype(int),
            "label": data.labels,
        }
    )[PREDICTION_COLUMNS]
