"""Losses and metrics of the paper, with the conventions that its numbers leave open.

- :func:`soft_dice_loss`: the paper's eq. 1 as intended. The printed equation,
  ``sum(p r) / (sum p^2 + sum r^2)``, lacks the factor 2 and the ``1 -`` of the soft Dice loss
  (Milletari et al., 2016): as printed it is half a similarity, maximised rather than minimised.
- Dice and Jaccard (eq. 2) three ways: pooled over all pixels, mean over patches (with an
  explicit rule for patches where both masks are empty), and the PAIP 2019 score (Jaccard, 0
  when below 0.65). For one mask J = D / (2 - D), so the paper's Dice 0.69 with Jaccard 0.68
  cannot come from one pooled mask.
- Patch classification: confusion matrix, accuracy, sensitivity, specificity.

Used by notebooks 03 (segmentation) and 04 (classification); numpy and torch inputs alike.
"""

import numpy as np
import torch

from ..core.errors import InputError


def soft_dice_loss(probs, target, eps=1.0, per_image=True):
    """``1 - 2 sum(p r) / (sum p^2 + sum r^2)`` (eq. 1 as intended).

    Args:
        probs: predicted probabilities, ``(n, 1, h, w)`` or ``(n, h, w)``, in [0, 1].
        target: the 0/1 masks, same shape.
        eps: smoothing added to both sides (keeps empty-empty images at loss 0).
        per_image: sums over each image and averages the losses (default), or, when False,
            sums over the whole batch as one region: steadier when most patches hold no tumour,
            since an empty patch then cannot dominate the batch's loss.

    Returns:
        A scalar tensor.
    """
    if probs.shape != target.shape:
        raise InputError(f"soft_dice_loss: probs {tuple(probs.shape)} and target {tuple(target.shape)} differ")
    rows = probs.shape[0] if per_image else 1
    p = probs.reshape(rows, -1).float()
    r = target.reshape(rows, -1).float()
    inter = (p * r).sum(1)
    denom = (p * p).sum(1) + (r * r).sum(1)
    return (1 - (2 * inter + eps) / (denom + eps)).mean()


def _as_bool(a):
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a).astype(bool)


def dice_jaccard(pred, target, empty=1.0):
    """Dice and Jaccard of two binary masks, pooled over all their pixels.

    Args:
        pred, target: binary arrays of one shape (any number of dimensions).
        empty: the value of both when both masks are empty (no tumour, none predicted).

    Returns:
        ``(dice, jaccard)`` floats.
    """
    p, t = _as_bool(pred), _as_bool(target)
    if p.shape != t.shape:
        raise InputError(f"prediction {p.shape} and ground truth {t.shape} differ in shape")
    inter = np.count_nonzero(p & t)
    total = np.count_nonzero(p) + np.count_nonzero(t)
    if total == 0:
        return float(empty), float(empty)
    return 2 * inter / total, inter / (total - inter)


def dice_jaccard_per_patch(pred, target, empty=1.0):
    """Mean Dice and mean Jaccard over patches (the first axis), with ``empty`` for patches
    where both masks are empty; returns ``(dice, jaccard, n_empty)``."""
    p, t = _as_bool(pred), _as_bool(target)
    n = p.shape[0]
    p = p.reshape(n, int(np.prod(p.shape[1:])))
    t = t.reshape(n, int(np.prod(t.shape[1:])))
    inter = np.count_nonzero(p & t, axis=1)
    total = np.count_nonzero(p, axis=1) + np.count_nonzero(t, axis=1)
    is_empty = total == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(is_empty, empty, 2 * inter / np.maximum(total, 1))
        j = np.where(is_empty, empty, inter / np.maximum(total - inter, 1))
    return float(d.mean()) if n else float("nan"), float(j.mean()) if n else float("nan"), int(is_empty.sum())


def paip_score(jaccard, threshold=0.65):
    """The PAIP 2019 task-1 score of a slide: its Jaccard index, or 0 when below ``threshold``."""
    return float(jaccard) if jaccard >= threshold else 0.0


def jaccard_from_dice(dice):
    """J = D / (2 - D): the Jaccard index that one mask with this Dice coefficient has."""
    return dice / (2 - dice)


def classification_report(y_true, y_pred):
    """Accuracy, sensitivity (tumour recall), specificity and the 2 x 2 confusion matrix.

    Args:
        y_true, y_pred: 0/1 labels (1 = tumour).

    Returns:
        A dict with ``accuracy``, ``sensitivity``, ``specificity``, ``n`` and ``confusion``
        (rows: true 0/1, columns: predicted 0/1).
    """
    t = np.asarray(y_true).astype(int)
    p = np.asarray(y_pred).astype(int)
    if t.shape != p.shape:
        raise InputError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    cm = np.zeros((2, 2), int)
    np.add.at(cm, (t, p), 1)
    tn, fp, fn, tp = cm.ravel()
    return {
        "n": int(t.size),
        "accuracy": (tp + tn) / t.size if t.size else float("nan"),
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "confusion": cm,
    }


def majority_baseline(y_true):
    """The accuracy of calling every unit the more common class of ``y_true`` (NaN when empty).

    A classifier is read against this number, not against 50 %: on a test set that is 56 %
    non-tumour, a model that always answers "non-tumour" scores 56 %.
    """
    t = np.asarray(y_true).astype(int)
    if not t.size:
        return float("nan")
    share = float(t.mean())
    return max(share, 1 - share)


def bootstrap_interval(correct, groups, n_boot=2000, level=0.95, seed=0):
    """A percentile bootstrap interval of an accuracy, resampling whole groups (slides).

    Patches of one slide are not independent (same stain, same tumour), so the interval
    resamples the test *slides* with replacement and pools their patches each time.

    Args:
        correct: 0/1 per unit (patch or region): whether it was classified correctly.
        groups: the group (slide id) of each unit.
        n_boot: bootstrap draws.
        level: the interval's coverage.
        seed: the draws' seed (intervals are reproducible).

    Returns:
        ``(low, high)``, or ``(nan, nan)`` without units.
    """
    c = np.asarray(correct, float)
    g = np.asarray(groups)
    if c.shape != g.shape:
        raise InputError(f"correct {c.shape} and groups {g.shape} differ in shape")
    if not c.size:
        return float("nan"), float("nan")
    _, inv = np.unique(g, return_inverse=True)
    hits = np.bincount(inv, weights=c)
    sizes = np.bincount(inv).astype(float)
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(sizes), (n_boot, len(sizes)))
    acc = hits[draw].sum(1) / sizes[draw].sum(1)
    a = (1 - level) / 2
    return float(np.quantile(acc, a)), float(np.quantile(acc, 1 - a))


def read_against_baseline(accuracy, baseline, low, margin=0.0):
    """One word for an accuracy read against its majority-class baseline and interval.

    Returns:
        ``"above baseline"`` when even the interval's low end is above the baseline,
        ``"AT OR BELOW BASELINE"`` when the accuracy itself is not above it, else
        ``"not clearly above"`` (above, but the interval reaches the baseline).
    """
    if any(np.isnan(v) for v in (accuracy, baseline)):
        return "not measured"
    if accuracy <= baseline + margin:
        return "AT OR BELOW BASELINE"
    return "above baseline" if low > baseline else "not clearly above"
