"""Slide-level train/validation/test splits (never patch-level: patches of one slide are alike).

The paper splits its 50 slides 0.6 / 0.2 / 0.2 (it reports 29 / 9 / 9). Used by notebook 02,
which writes the split to the run folder for notebooks 03-05.
"""

import numpy as np
import pandas as pd

from .errors import InputError

SPLITS = ("train", "val", "test")


def split_cases(case_ids, labels=None, fractions=(0.6, 0.2, 0.2), seed=0):
    """Assign whole slides to train/val/test, stratified by slide label where possible.

    Within each label group the slides are shuffled with ``seed`` and cut by ``fractions``
    (rounded; validation and test each get at least one slide of a group with three or more).

    Args:
        case_ids: the slide ids.
        labels: slide labels (same length) or ``None`` for no stratification; ``None``
            entries form a group of their own.
        fractions: train, val and test shares, summing to 1.
        seed: the shuffle seed (recorded by the notebook).

    Returns:
        A DataFrame with columns ``case_id``, ``label``, ``split``, in the order given.
    """
    case_ids = list(case_ids)
    if not case_ids:
        raise InputError("no cases to split: the dataset is empty")
    if len(set(case_ids)) != len(case_ids):
        raise InputError("case ids must be unique to split by slide")
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise InputError(f"parameter 'split_fractions' must be three non-negative shares summing to 1, got {fractions!r}")
    labels = [None] * len(case_ids) if labels is None else list(labels)
    if len(labels) != len(case_ids):
        raise InputError("labels must match case_ids in length")
    rng = np.random.default_rng(seed)
    out = {}
    groups = {}
    for cid, lab in zip(case_ids, labels):
        groups.setdefault(lab, []).append(cid)
    for lab in sorted(groups, key=lambda v: (v is None, v)):
        ids = sorted(groups[lab])
        rng.shuffle(ids)
        n = len(ids)
        n_val = int(round(n * fractions[1]))
        n_test = int(round(n * fractions[2]))
        if n >= 3:
            n_val = max(n_val, 1 if fractions[1] > 0 else 0)
            n_test = max(n_test, 1 if fractions[2] > 0 else 0)
        n_train = n - n_val - n_test
        if n_train < 0 or (n_train == 0 and fractions[0] > 0 and n >= 3):
            n_train, n_val = 1, max(0, n - 1 - n_test)
        for i, cid in enumerate(ids):
            out[cid] = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
    return pd.DataFrame({"case_id": case_ids, "label": labels, "split": [out[c] for c in case_ids]})
