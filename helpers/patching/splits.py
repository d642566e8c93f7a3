"""Train/validation/test splits by patient (by slide when no patient is given).

Patches of one slide look alike, and slides of one patient too: a split that puts one patient's
slides (or patches) on both sides of the train/test line leaks. The paper splits its 50 slides
0.6 / 0.2 / 0.2 (it reports 29 / 9 / 9). Used by notebook 02, which writes the split to the run
folder for notebooks 03-05.
"""

import numpy as np
import pandas as pd

from ..core.atomic import atomic_path
from ..core.errors import InputError
from ..core.params import check_fractions
from ..core.provenance import write_stamp


def split_cases(case_ids, labels=None, fractions=(0.6, 0.2, 0.2), seed=0, patients=None):
    """Assign slides to train/val/test, whole patients at a time, stratified by label.

    A patient's stratum is its label (tumour when any of its slides is; ``None`` when none of
    its slides has a label). Within a stratum the patients are shuffled with ``seed`` and the
    test and validation splits take patients until they hold their share of the stratum's
    slides (rounded; each gets at least one patient of a stratum of three or more patients);
    the rest train.

    Args:
        case_ids: the slide ids.
        labels: slide labels (0, 1 or ``None`` = unknown), same length, or ``None``.
        fractions: train, val and test shares of the slides.
        seed: the shuffle seed (recorded by the notebook).
        patients: the patient of each slide (same length), or ``None``: one patient per slide.

    Returns:
        A DataFrame ``case_id, patient_id, label, split`` in the order given.
    """
    case_ids = list(case_ids)
    if not case_ids:
        raise InputError("no slides to split: the dataset is empty")
    if len(set(case_ids)) != len(case_ids):
        raise InputError("slide ids must be unique to split")
    fractions = check_fractions(fractions)
    labels = [None] * len(case_ids) if labels is None else [None if v is None or v != v else int(v) for v in labels]
    patients = list(case_ids) if patients is None else [p or c for p, c in zip(patients, case_ids)]
    if len(labels) != len(case_ids) or len(patients) != len(case_ids):
        raise InputError("labels and patients must match case_ids in length")
    slides_of = {}
    for cid, pat in zip(case_ids, patients):
        slides_of.setdefault(pat, []).append(cid)
    label_of = dict(zip(case_ids, labels))
    strata = {}
    for pat, ids in slides_of.items():
        known = [label_of[c] for c in ids if label_of[c] is not None]
        strata.setdefault(max(known) if known else None, []).append(pat)
    rng = np.random.default_rng(seed)
    out = {}
    for lab in sorted(strata, key=lambda v: (v is None, v)):
        pats = sorted(strata[lab])
        rng.shuffle(pats)
        n = sum(len(slides_of[p]) for p in pats)
        want = {"test": round(n * fractions[2]), "val": round(n * fractions[1])}
        at_least = {s: int(len(pats) >= 3 and fractions[i] > 0) for s, i in (("val", 1), ("test", 2))}
        queue = list(pats)
        for split in ("test", "val"):
            got = 0
            while queue and len(queue) > 1 and (got < want[split] or (got == 0 and at_least[split])):
                p = queue.pop(0)
                got += len(slides_of[p])
                for c in slides_of[p]:
                    out[c] = split
        for p in queue:
            for c in slides_of[p]:
                out[c] = "train"
    return pd.DataFrame(
        {"case_id": case_ids, "patient_id": patients, "label": labels, "split": [out[c] for c in case_ids]}
    )


def save_split(run_folder, table, key):
    """Write ``<run>/split.csv`` and its provenance key (what notebooks 03-05 check it against).

    Args:
        run_folder: the run's folder.
        table: :func:`split_cases`'s table.
        key: what produced it: the extraction record's key, the slides' labels and patients,
            the fractions and the seed.
    """
    from pathlib import Path

    path = Path(run_folder) / "split.csv"
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    write_stamp(path, key)
    return path
