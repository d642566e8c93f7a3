"""Majority voting over patch predictions (the paper's eq. 3-5), with its provenance.

The paper labels a whole slide by the class most of its patches are predicted as, per
classifier, then takes the majority over its classifiers. Here:

- a *unit* is a slide, or a fixed-size square region of a slide (every PAIP 2019 slide holds
  tumour, so voting on slides alone is trivially right there); a patch belongs to the region
  holding its centre, and a region's true label comes from the tumour mask;
- :func:`vote_units` gives each (unit, model, scale) its vote: tumour when the share of its
  patches predicted tumour reaches ``share`` (0.5: the paper's majority), with ``tie`` deciding
  an exact half;
- :func:`combine_votes` takes the majority over the six (model, scale) votes, and per model over
  its three scales, with the same explicit tie rule;
- :func:`provenance` joins it all into one table: unit x model x scale x patch -> probability
  -> patch label -> vote -> final label, so any final label can be traced to its patches.

Used by notebook 05.
"""

import math

import numpy as np
import pandas as pd

from ..core.atomic import atomic_path
from ..core.errors import InputError, check_fraction
from ..core.paths import runs_root
from ..core.provenance import file_sha256, read_stamp

TIES = ("tumour", "non-tumour")


def _check_tie(tie):
    if tie not in TIES:
        raise InputError(f"parameter 'tie' must be one of {TIES}, got {tie!r}")


def assign_units(pred, region_size=0):
    """Add a ``unit`` column: the slide id, or ``<slide>:r<row>c<col>`` of its region.

    Args:
        pred: a prediction table (``helpers.paper.classification_data.PREDICTION_COLUMNS``).
        region_size: the side of a region in level-0 pixels, or ``{slide id: side}`` (see
            :func:`region_sides`); 0 = whole slides.
    """
    out = pred.copy()
    if not region_size:
        out["unit"] = out["case_id"]
        return out
    sides = region_size.values() if isinstance(region_size, dict) else [region_size]
    if min(sides) <= 0:
        raise InputError(f"parameter 'region_size' must be 0 (slides) or a positive size in pixels, got {region_size}")
    side = out["case_id"].map(region_size) if isinstance(region_size, dict) else region_size
    cy = (out["y"] + out["footprint"] // 2) // side
    cx = (out["x"] + out["footprint"] // 2) // side
    out["unit"] = out["case_id"] + ":r" + cy.astype(str) + "c" + cx.astype(str)
    return out


def region_truth(tumour_fraction_map, cell, region_size, case_id, min_fraction=0.5):
    """True labels of a slide's regions from a tumour-fraction map.

    Args:
        tumour_fraction_map: the mask's fraction per ``cell`` x ``cell`` level-0 block (e.g.
            from :func:`helpers.paper.segmentation_data.mask_fraction_map`).
        cell: level-0 pixels per map cell; must divide ``region_size``.
        region_size: level-0 side of a region.
        case_id: the slide's id (for the unit names).
        min_fraction: a region is tumour when at least this share of it is tumour (0.5 matches
            the majority vote: a vote can only say "most of it").

    Returns:
        A DataFrame ``unit, tumour_fraction, label``.
    """
    if region_size % cell:
        raise InputError(f"region_size {region_size} must be a multiple of the map's cell {cell}")
    k = region_size // cell
    m = np.asarray(tumour_fraction_map, np.float64)
    rows = []
    for r in range(0, -(-m.shape[0] // k)):
        for c in range(0, -(-m.shape[1] // k)):
            f = float(m[r * k : (r + 1) * k, c * k : (c + 1) * k].mean())
            rows.append({"unit": f"{case_id}:r{r}c{c}", "tumour_fraction": f, "label": int(f >= min_fraction)})
    return pd.DataFrame(rows)


def _decide(share, threshold, tie):
    lab = (share > threshold).astype(int)
    at = np.isclose(share, threshold)
    return np.where(at, 1 if tie == "tumour" else 0, lab)


def vote_units(pred, share=0.5, tie="non-tumour"):
    """One vote per (unit, model, scale) from its patches' predicted labels (eq. 3-5).

    Args:
        pred: a prediction table with a ``unit`` column (:func:`assign_units`).
        share: the share of tumour patches above which the vote is tumour (0.5: majority).
        tie: the vote when the share equals ``share`` exactly.

    Returns:
        A DataFrame ``unit, model, scale, n_patches, n_tumour, tumour_share, vote``.
    """
    check_fraction("share", share)
    _check_tie(tie)
    if not len(pred):
        raise InputError("no predictions to vote on: notebook 04 saved an empty predictions.csv")
    g = pred.groupby(["unit", "model", "scale"], sort=True)
    v = g.agg(n_patches=("pred", "size"), n_tumour=("pred", "sum")).reset_index()
    v["tumour_share"] = v["n_tumour"] / v["n_patches"]
    v["vote"] = _decide(v["tumour_share"].to_numpy(), share, tie)
    return v


def combine_votes(votes, tie="non-tumour"):
    """Final labels per unit: the majority over all (model, scale) votes, and per model.

    Returns:
        A DataFrame indexed by unit with ``n_votes``, ``tumour_votes``, ``final`` (all
        classifiers) and ``final_<model>`` (that model's scales), ties broken by ``tie``.
    """
    _check_tie(tie)
    out = votes.groupby("unit").agg(n_votes=("vote", "size"), tumour_votes=("vote", "sum"))
    out["final"] = _decide((out["tumour_votes"] / out["n_votes"]).to_numpy(), 0.5, tie)
    for model, sub in votes.groupby("model"):
        s = sub.groupby("unit")["vote"].mean()
        out[f"final_{model}"] = pd.Series(_decide(s.to_numpy(), 0.5, tie), index=s.index)
    return out


def choose_threshold(scores, truth):
    """The cut on ``scores`` (tumour when above it) that best separates ``truth`` on the
    validation units: highest balanced accuracy, then the widest gap between the scores on its
    two sides; the cut lies in the middle of that gap.

    Args:
        scores: one number per unit (e.g. a classifier's share of tumour patches).
        truth: 0/1 per unit.

    Returns:
        The threshold (a float), or ``nan`` when there is no unit with a label.
    """
    s = np.asarray(scores, float)
    t = np.asarray(truth, float)
    keep = ~(np.isnan(s) | np.isnan(t))
    s, t = s[keep], t[keep].astype(int)
    if not s.size:
        return float("nan")
    u = np.unique(s)
    cuts = np.concatenate([[u[0] - 0.01], (u[:-1] + u[1:]) / 2, [u[-1]]])
    best = None
    for c in cuts:
        call = s > c
        recalls = [float((call[t == k] == k).mean()) for k in (0, 1) if (t == k).any()]
        bal = sum(recalls) / len(recalls)
        above, below = s[s > c], s[s <= c]
        gap = (above.min() if above.size else 1.0) - (below.max() if below.size else 0.0)
        if best is None or (bal, gap) > best[:2]:
            best = (bal, gap, c)
    return float(best[2])


def unit_score(truth, called, groups=None, seed=0):
    """How many units were called right, against calling them all the majority class.

    Args:
        truth, called: 0/1 per unit (slide or region).
        groups: the slide of each unit, for the bootstrap (default: each unit its own).

    Returns:
        A dict: ``correct``, ``n``, ``accuracy``, ``ci`` (95 % bootstrap over slides),
        ``baseline`` (the majority-class accuracy), ``reading`` and ``one_class``: the class
        every unit truly is (``"tumour"`` for the slides of PAIP 2019), or ``None`` when both
        are present. With one class the baseline is 100 %: a count with every unit right then
        reads ``shows nothing`` (see :func:`one_class_note`).
    """
    from ..learning.metrics import bootstrap_interval, majority_baseline, read_against_baseline

    t = np.asarray(truth, int)
    c = np.asarray(called, int)
    ok = t == c
    g = np.arange(len(t)) if groups is None else np.asarray(groups)
    lo, hi = bootstrap_interval(ok, g, seed=seed)
    acc = float(ok.mean()) if len(t) else float("nan")
    base = majority_baseline(t)
    one = one_class(t)
    reading = f"shows nothing: every true label is {one}" if one and ok.all() else read_against_baseline(acc, base, lo)
    return {
        "correct": int(ok.sum()),
        "n": int(len(t)),
        "accuracy": acc,
        "ci": (lo, hi),
        "baseline": base,
        "reading": reading,
        "one_class": one,
    }


def one_class(truth):
    """``"tumour"`` or ``"non-tumour"`` when every label of ``truth`` (0/1) is that class, else
    ``None`` (both classes, or none)."""
    t = np.asarray(truth, int)
    return ("non-tumour", "tumour")[t[0]] if len(t) and (t == t[0]).all() else None


def one_class_note(label, unit="slide"):
    """Why a count of ``unit``s called right cannot show that a vote works when every one of them
    is truly ``label`` (:func:`one_class`; on PAIP 2019 every slide holds tumour): calling them
    all ``label`` cannot fail.

    Returns:
        The sentence, or ``None`` when ``label`` is ``None`` (both classes present).
    """
    if label is None:
        return None
    return (
        f"every test {unit}'s true label is {label}, so calling every {unit} {label} cannot fail (it scores "
        f"100 %, the baseline): a {unit} count here can only show {label} {unit}s the vote misses, never that "
        "the vote works"
    )


def provenance(pred, votes, final):
    """One row per patch, model and scale: its probability and label, its classifier's vote on
    its unit, and the unit's final label."""
    p = pred.merge(votes[["unit", "model", "scale", "tumour_share", "vote"]], on=["unit", "model", "scale"])
    p = p.merge(final[["final"]], left_on="unit", right_index=True)
    cols = [
        "unit",
        "case_id",
        "model",
        "scale",
        "x",
        "y",
        "footprint",
        "prob",
        "pred",
        "label",
        "tumour_share",
        "vote",
        "final",
    ]
    return p[cols].sort_values(["unit", "model", "scale", "y", "x"]).reset_index(drop=True)


def load_predictions(run, models, scales):
    """Notebook 04's patch predictions for voting, checked to come from this run's data.

    Args:
        run: the :class:`helpers.notebook.session.Run`.
        models, scales: the classifiers whose votes count.

    Returns:
        ``(pred, info)``: the prediction table of those classifiers (empty when notebook 04
        gave none of them a prediction: then nothing is voted on, and the report says why), and
        a dict with ``slides`` (how many slides notebook 04 predicted), ``skipped``
        (``{classifier: why}`` for the requested classifiers without predictions), ``why``
        (``None``, or why there is nothing to vote on, with notebook 04's reasons) and ``key``
        (the table's provenance).

    Raises:
        InputError: no predictions table (run notebook 04), or one made from other caches,
            another split or other weights (rerun notebook 04).
    """

    path = run.folder / "classification" / "predictions.csv"
    fix = f"rerun notebook 04 (python -m helpers.run --only 04 --run-name {run.name})"
    if not path.exists():
        raise InputError(f"{path}: not found; {fix}")
    key = read_stamp(path)
    if key is None:
        raise InputError(f"{path} has no provenance record (made by an older version, or interrupted); {fix}")
    if key.get("extraction") != run.extraction_key or key.get("split") != run.split_key:
        raise InputError(
            f"{path} was made from other patch caches or another split (notebook 02 ran again since); {fix}"
        )
    for name, c in key.get("classifiers", {}).items():
        ck = runs_root() / c["checkpoint"]
        if ck.exists() and file_sha256(ck) != c["weights"]:
            raise InputError(
                f"{path}: the predictions of {name} come from other weights than {ck} (retrained since); {fix}"
            )
    pred = pd.read_csv(path, dtype={"case_id": str})
    if "split" not in pred.columns:
        raise InputError(f"{path} has no split column (made by an older version of notebook 04); {fix}")
    want = [f"{m}_x{s}" for m in models for s in scales]
    skipped = {
        k: key.get("skipped", {}).get(k, "no prediction in notebook 04's table (not trained there)")
        for k in want
        if k not in key.get("classifiers", {})
    }
    pred = pred[pred.model.isin(models) & pred.scale.isin(scales)].copy()
    why = None
    if not len(pred):
        by_why = {}
        for k, v in skipped.items():  # one reason per scale, as a rule: said once, with its classifiers
            by_why.setdefault(v, []).append(k)
        reasons = "; ".join(f"{', '.join(ks)}: {v}" for v, ks in by_why.items()) or "its table is empty"
        did = "applied" if key.get("mode") == "apply" else "trained"
        why = f"notebook 04 {did} no classifier of {models} at {scales}x ({reasons})"
    return pred, {"slides": len(key.get("slides", [])), "skipped": skipped, "why": why, "key": key}


def region_sides(run, region_size):
    """``{slide id: level-0 side of its voting regions}``: ``region_size`` on every slide, or,
    with a ``scale_reference``, ``region_size`` pixels of that resolution (one area in microns
    on every slide, as a scale is one resolution)."""
    ref = run.params.scale_reference
    if not ref or not region_size:
        return dict.fromkeys(run.cases, region_size)
    # every mpp is known: extraction refused a slide without one
    return {cid: round(region_size * ref / run.mpps[cid]) for cid in run.cases}


def region_labels(run, case_ids, region_size, min_tumour=0.5):
    """True labels of the regions of ``case_ids`` from their masks (slides without one are left
    out), indexed by unit (see :func:`region_truth`); regions as :func:`region_sides` sizes them."""
    from ..wsi.slides import Slide
    from .segmentation_data import mask_fraction_map

    sides = region_sides(run, region_size)
    cell = 64
    while region_size % cell:
        cell //= 2
    k = region_size // cell  # map cells a region side: the same on every slide
    out = []
    for cid in case_ids:
        case, side = run.cases[cid], sides[cid]
        mp = case.mask_path(run.params.label_mask)
        if mp is None:
            continue
        cell = side // k if side % k == 0 else math.gcd(side, 64)
        with Slide(case.slide, verify=False) as s:
            frac = mask_fraction_map(mp, s.dimensions, cell)
        out.append(region_truth(frac, cell, side, cid, min_tumour))
    if not out:
        return pd.DataFrame(columns=["tumour_fraction", "label"])
    return pd.concat(out).set_index("unit")


def segmentation_areas(run, case_ids, threshold=0.5):
    """Per slide segmented by notebook 03 (with this run's split and caches): the predicted
    tumour's share of the slide's tissue (``segmentation area``) and the slide's true label.
    Slides notebook 03 did not segment are left out."""

    seg = run.folder / "segmentation"
    key = read_stamp(seg / "metrics.csv")
    rows = []
    if key is None or key.get("split") != run.split_key or key.get("extraction") != run.extraction_key:
        return pd.DataFrame(columns=["truth", "segmentation area"])
    for cid in case_ids:
        prob_f, cov_f = seg / f"{cid}_prob.npy", seg / f"{cid}_cov.npy"
        if not prob_f.exists():
            continue
        prob, cov = np.load(prob_f), np.load(cov_f)
        rows.append(
            {
                "slide": cid,
                "truth": run.split.set_index("case_id").label.get(cid),
                "segmentation area": float((prob > threshold).sum() / max(1, (cov > 0).sum())),
            }
        )
    return pd.DataFrame(rows).set_index("slide") if rows else pd.DataFrame(columns=["truth", "segmentation area"])


def save_voting(run, prov, votes, slides):
    """Write ``voting/provenance.csv``, ``votes.csv`` and ``slides.csv``, atomically."""

    folder = run.folder / "voting"
    for name, table, index in (("provenance", prov, False), ("votes", votes, False), ("slides", slides, True)):
        with atomic_path(folder / f"{name}.csv") as tmp:
            table.to_csv(tmp, index=index)
    return folder
