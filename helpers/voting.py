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

import numpy as np
import pandas as pd

from .errors import InputError, check_fraction

TIES = ("tumour", "non-tumour")


def _check_tie(tie):
    if tie not in TIES:
        raise InputError(f"parameter 'tie' must be one of {TIES}, got {tie!r}")


def assign_units(pred, region_size=0):
    """Add a ``unit`` column: the slide id, or ``<slide>:r<row>c<col>`` of its region.

    Args:
        pred: a prediction table (``helpers.classify.PREDICTION_COLUMNS``).
        region_size: the side of a region in level-0 pixels; 0 = whole slides.
    """
    out = pred.copy()
    if not region_size:
        out["unit"] = out["case_id"]
        return out
    if region_size < 0:
        raise InputError(f"parameter 'region_size' must be 0 (slides) or a positive size in pixels, got {region_size}")
    cy = (out["y"] + out["footprint"] // 2) // region_size
    cx = (out["x"] + out["footprint"] // 2) // region_size
    out["unit"] = out["case_id"] + ":r" + cy.astype(str) + "c" + cx.astype(str)
    return out


def region_truth(tumour_fraction_map, cell, region_size, case_id, min_fraction=0.5):
    """True labels of a slide's regions from a tumour-fraction map.

    Args:
        tumour_fraction_map: the mask's fraction per ``cell`` x ``cell`` level-0 block (e.g.
            from :func:`helpers.segmentation.mask_fraction_map`).
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
            f = float(m[r * k:(r + 1) * k, c * k:(c + 1) * k].mean())
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


def provenance(pred, votes, final):
    """One row per patch, model and scale: its probability and label, its classifier's vote on
    its unit, and the unit's final label."""
    p = pred.merge(votes[["unit", "model", "scale", "tumour_share", "vote"]], on=["unit", "model", "scale"])
    p = p.merge(final[["final"]], left_on="unit", right_index=True)
    cols = ["unit", "case_id", "model", "scale", "x", "y", "footprint", "prob", "pred", "label", "tumour_share",
            "vote", "final"]
    return p[cols].sort_values(["unit", "model", "scale", "y", "x"]).reset_index(drop=True)


def check_predictions(pred, models, scales, test_cases):
    """Name what is missing from notebook 04's predictions before voting.

    Raises:
        InputError: the table is empty, or a (model, scale) that notebook 04 was to train has
            no prediction (with the notebook to rerun), or the test split is empty.
    """
    if not test_cases:
        raise InputError("the test split is empty: notebook 02's split_fractions leave no test slide")
    if pred is None or not len(pred):
        raise InputError("no patch predictions: run notebook 04 (python -m helpers.run --only 04)")
    have = set(zip(pred["model"], pred["scale"]))
    missing = [f"{m} at {s}x" for m in models for s in scales if (m, s) not in have]
    return missing
