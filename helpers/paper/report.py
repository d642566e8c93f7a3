"""The paper's Table 1 and the reproduction report of a run (notebook 05's last cell).

- :data:`PAPER_TABLE1`: the paper's patch accuracies by model and scale.
- :func:`reproduction_report`: the run's segmentation, Table 1 and voting results beside the
  paper's, each read against its baseline, written as ``report.md`` and ``report.json``.

Used by notebooks 04 and 05.
"""

import numpy as np
import pandas as pd

from ..core.atomic import atomic_path, write_json
from ..core.paths import figures_dir
from ..core.provenance import read_stamp
from .voting import one_class_note

#: The paper's Table 1 (patch accuracy, %), by model and scale.
PAPER_TABLE1 = {
    ("efficientnet_b0", 4): 96.2,
    ("efficientnet_b0", 16): 92.8,
    ("efficientnet_b0", 64): 89.21,
    ("resnet50", 4): 93.31,
    ("resnet50", 16): 89.8,
    ("resnet50", 64): 86.21,
}


def _row(what, paper, ours, convention, ci="-", baseline="-", reading="-"):
    """One row of the report; a number that is missing (``None``, NaN) has no reading."""
    ok = ours is not None and not (isinstance(ours, float) and np.isnan(ours))
    return {
        "quantity": what,
        "paper": paper,
        "ours": ours if ok else None,
        "ci": ci,
        "baseline": baseline,
        "reading": reading if ok else "-",
        "convention": convention,
    }


def _segmentation_rows(run):
    """The report's rows of notebook 03 (over its test slides with tumour), each unmeasured one
    saying why, and the provenance of its ``metrics.csv`` (``None``: none for this run)."""

    seg = run.folder / "segmentation" / "metrics.csv"
    seg_key = read_stamp(seg)
    ours = seg_key is not None and seg_key.get("split") == run.split_key
    m = pd.read_csv(seg) if ours else pd.DataFrame()
    if "split" in m:
        m = m[m["split"] != "val"]
    tum = m[m["true_cells"] > 0] if "true_cells" in m else m.iloc[:0]
    why = "no test slide with tumour in its mask" if ours else "notebook 03 left no metrics for this run's split"
    rows = []
    for name, col, paper, conv in (
        ("Dice (segmentation)", "dice_pooled", 0.69, "pooled per slide, mean over test slides with tumour"),
        ("Jaccard (segmentation)", "jaccard_pooled", 0.68, "pooled per slide, mean over test slides with tumour"),
        ("Dice, per patch", "dice_patch", None, "mean over patches, empty = 1"),
        ("Jaccard, per patch", "jaccard_patch", None, "mean over patches, empty = 1"),
        ("PAIP 2019 score", "paip", None, "pooled Jaccard, 0 below 0.65"),
    ):
        vals = tum[col].to_numpy(float) if len(tum) else np.zeros(0)
        if not len(vals):
            rows.append(_row(name, paper, None, f"not measured: {why}"))
            continue
        ci = "-"
        if len(vals) > 1:
            draws = np.random.default_rng(0).choice(vals, (2000, len(vals))).mean(1)
            ci = f"{np.quantile(draws, 0.025):.3f}-{np.quantile(draws, 0.975):.3f}"
        rows.append(_row(name, paper, round(float(vals.mean()), 3), conv, ci, "0 (nothing predicted)"))
    return rows, seg_key


def _table1_rows(run):
    """The report's rows of notebook 04's Table 1, each unmeasured one with notebook 04's reason."""
    t1 = run.folder / "classification" / "table1.csv"
    t1 = pd.read_csv(t1) if t1.exists() else pd.DataFrame(columns=["model", "scale", "acc %"])
    rows = []
    for (model, scale), paper in PAPER_TABLE1.items():
        r = t1[(t1.model == model) & (t1.scale == f"{scale}x")]
        if len(r) and pd.notna(r["acc %"].iloc[0]):
            r = r.iloc[0]
            lo, hi = (float(v) / 100 for v in str(r["95% CI"]).split("-"))
            rows.append(
                _row(
                    f"patch accuracy {model} {scale}x",
                    round(paper / 100, 4),
                    round(float(r["acc %"]) / 100, 3),
                    f"{int(r['tumour'])} tumour + {int(r['non_tumour'])} non-tumour test patches, threshold 0.5",
                    f"{lo:.3f}-{hi:.3f}",
                    round(float(r["baseline %"]) / 100, 3),
                    r["reading"],
                )
            )
        else:
            why = str(r["why"].iloc[0]) if len(r) and "why" in r and pd.notna(r["why"].iloc[0]) else "not trained"
            rows.append(_row(f"patch accuracy {model} {scale}x", round(paper / 100, 4), None, f"not measured: {why}"))
    return rows


def _unit_rows(unit_rows):
    """The report's rows of the slide and region votes (an unmeasured one with its ``why``), and
    a note for each count whose baseline is 100 % (its units all truly of one class)."""
    rows, notes = [], []
    for u in unit_rows:
        sc = u.get("score")
        if sc is None or not sc["n"]:
            why = u.get("why", "no unit with a true label")
            rows.append(_row(u["quantity"], u["paper"], None, f"not measured: {why}"))
            continue
        rows.append(
            _row(
                u["quantity"],
                u["paper"],
                f"{sc['correct']} of {sc['n']}",
                u["convention"],
                f"{sc['ci'][0]:.2f}-{sc['ci'][1]:.2f}",
                f"{round(sc['baseline'] * sc['n'])} of {sc['n']}",
                sc["reading"],
            )
        )
        note = one_class_note(sc.get("one_class"), u.get("unit", "slide"))
        if note:
            notes.append(f"{u['quantity']}: {note}")
    return rows, notes


def _report_markdown(run_name, rows, notes, skipped):
    """The report's lines: the table, what is not available and why, and the counts whose baseline
    is 100 %."""
    md = [
        f"# Reproduction report: run `{run_name}`",
        "",
        "Generated by notebook 05 from this run's outputs; the paper's numbers are from its text (Table 1, "
        "section 4). *95% CI*: bootstrap over the test slides. *baseline*: calling every patch, slide or "
        "region the majority class of that same test set (for Dice: predicting no tumour). *reading*: the "
        "accuracy against its baseline (above it, with the whole interval above it, or not).",
        "",
        "| quantity | paper | ours | 95% CI | baseline | reading | convention |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    md += [
        f"| {r['quantity']} | {'-' if r['paper'] is None else r['paper']} | "
        f"{'n/a' if r['ours'] is None else r['ours']} | {r['ci']} | {r['baseline']} | "
        f"{r['reading'] if r['ours'] is not None else '-'} | {r['convention']} |"
        for r in rows
    ]
    if skipped:
        md += ["", "Not available in this run: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())]
    if notes:
        md += ["", "Counts whose baseline is 100 % in this run:", ""] + [f"- {n}." for n in notes]
    return md


def reproduction_report(run, unit_rows, pred_info):
    """Every number the paper reports beside this run's, each with its 95 % interval and its
    baseline; written to ``report.json`` and ``figures/05_reproduction_report.md`` of the run.
    A number that cannot be measured (nothing trained, nothing to vote on, no slide with a true
    label) is written as such, with why.

    Args:
        run: the :class:`helpers.notebook.session.Run`.
        unit_rows: the slide and region results, each a dict with ``quantity``, ``paper``,
            ``convention`` and ``score`` (:func:`unit_score`'s dict, or ``None`` with ``why``),
            and ``unit`` (``"slide"`` or ``"region"``, for the note when every unit is truly of
            one class; default ``"slide"``).
        pred_info: :func:`load_predictions`'s info (its provenance is recorded).

    Returns:
        A DataFrame ``quantity, paper, ours, ci, baseline, reading, convention``. ``report.json``
        holds its rows, the classifiers ``missing`` and the ``notes`` on the counts whose baseline
        is 100 %.
    """

    seg_rows, seg_key = _segmentation_rows(run)
    votes, notes = _unit_rows(unit_rows)
    rows = seg_rows + _table1_rows(run) + votes
    md = _report_markdown(run.name, rows, notes, pred_info["skipped"])
    with atomic_path(figures_dir(run.name) / "05_reproduction_report.md") as tmp:
        tmp.write_text("\n".join(md) + "\n")
    write_json(
        run.folder / "report.json",
        {
            "run_name": run.name,
            "rows": rows,
            "missing": list(pred_info["skipped"]),
            "notes": notes,
            "inputs": {
                "extraction": run.extraction_key,
                "split": run.split_key,
                "predictions": pred_info["key"],
                "segmentation": seg_key,
            },
        },
    )
    return pd.DataFrame(rows)
