"""Majority voting (eq. 3-5): units, the tie rule, combining classifiers, provenance, region
labels, bad input; and the runner's summary and sweep files."""

import json

import numpy as np
import pandas as pd
import pytest

from helpers.core.errors import InputError
from helpers.paper.voting import assign_units, combine_votes, load_predictions, provenance, region_truth, vote_units


def _pred(rows):
    cols = ["case_id", "model", "scale", "x", "y", "footprint", "prob", "pred", "label"]
    return pd.DataFrame(rows, columns=cols).assign(split="test")


@pytest.fixture
def pred():
    rows = []
    # Slide A: at 4x 3 of 4 patches tumour; at 16x 1 of 2 (a tie). Slide B: no tumour predicted.
    for i, p in enumerate([1, 1, 1, 0]):
        rows.append(["A", "m1", 4, i * 896, 0, 896, 0.9 if p else 0.1, p, 1])
    for i, p in enumerate([1, 0]):
        rows.append(["A", "m1", 16, i * 3584, 0, 3584, 0.8 if p else 0.2, p, 1])
    for i in range(3):
        rows.append(["B", "m1", 4, i * 896, 0, 896, 0.1, 0, 0])
        rows.append(["B", "m2", 4, i * 896, 0, 896, 0.2, 0, 0])
    rows.append(["A", "m2", 4, 0, 0, 896, 0.7, 1, 1])
    return _pred(rows)


def test_majority_and_tie_rule(pred):
    v = vote_units(assign_units(pred), 0.5, "non-tumour").set_index(["unit", "model", "scale"])
    assert v.loc[("A", "m1", 4), "vote"] == 1 and v.loc[("A", "m1", 4), "tumour_share"] == 0.75
    assert v.loc[("A", "m1", 16), "vote"] == 0  # 1 of 2: a tie, broken to non-tumour
    assert v.loc[("B", "m1", 4), "vote"] == 0
    t = vote_units(assign_units(pred), 0.5, "tumour").set_index(["unit", "model", "scale"])
    assert t.loc[("A", "m1", 16), "vote"] == 1
    # A lower share asks "does it hold tumour?" rather than "is it mostly tumour?".
    low = vote_units(assign_units(pred), 0.2, "non-tumour").set_index(["unit", "model", "scale"])
    assert low.loc[("A", "m1", 16), "vote"] == 1


def test_combining_classifiers_overall_and_per_model(pred):
    v = vote_units(assign_units(pred), 0.5, "non-tumour")
    f = combine_votes(v, "non-tumour")
    # A: votes m1@4 = 1, m1@16 = 0, m2@4 = 1 -> 2 of 3 tumour.
    assert f.loc["A", "final"] == 1 and f.loc["A", "tumour_votes"] == 2 and f.loc["A", "n_votes"] == 3
    assert f.loc["A", "final_m1"] == 0  # m1's own scales split 1-1: tie -> non-tumour
    assert f.loc["A", "final_m2"] == 1
    assert f.loc["B", "final"] == 0
    assert combine_votes(v, "tumour").loc["A", "final_m1"] == 1


def test_regions_units_and_truth(pred):
    r = assign_units(pred, 1792)
    # The centre of the 4x patch at x = 896 (896 + 448 = 1344) lies in region column 0.
    assert r.loc[(r.case_id == "A") & (r.scale == 4) & (r.x == 896), "unit"].iloc[0] == "A:r0c0"
    assert r.loc[(r.case_id == "A") & (r.scale == 4) & (r.x == 1792), "unit"].iloc[0] == "A:r0c1"
    frac = np.zeros((4, 6))
    frac[:2, :2] = 1.0  # the top-left region (2 x 2 cells) is all tumour
    frac[2:, 2:4] = 0.3  # another is 30 % tumour
    t = region_truth(frac, 896, 1792, "A", min_fraction=0.5).set_index("unit")
    assert len(t) == 6 and t.loc["A:r0c0", "label"] == 1 and t.loc["A:r1c1", "label"] == 0
    assert t.loc["A:r1c1", "tumour_fraction"] == pytest.approx(0.3)
    assert region_truth(frac, 896, 1792, "A", min_fraction=0.25).loc[lambda d: d.unit == "A:r1c1", "label"].iloc[0] == 1
    with pytest.raises(InputError, match="multiple"):
        region_truth(frac, 500, 1792, "A")
    with pytest.raises(InputError, match="region_size"):
        assign_units(pred, -5)


def test_provenance_traces_every_patch(pred):
    units = assign_units(pred)
    v = vote_units(units, 0.5, "non-tumour")
    f = combine_votes(v, "non-tumour")
    p = provenance(units, v, f)
    assert len(p) == len(pred)
    a = p[(p.unit == "A") & (p.model == "m1") & (p.scale == 4)]
    assert len(a) == 4 and (a.vote == 1).all() and (a.final == 1).all() and (a.tumour_share == 0.75).all()
    assert list(p.columns[:3]) == ["unit", "case_id", "model"]


def test_predictions_are_used_only_for_this_runs_data_and_weights(pred, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from helpers.core.provenance import file_sha256, write_stamp

    monkeypatch.setenv("PAIP_REPRO_RUNS", str(tmp_path))
    run = SimpleNamespace(name="r", folder=tmp_path / "r", extraction_key="E1", split_key="S1")
    cls = run.folder / "classification"
    with pytest.raises(InputError, match="not found; rerun notebook 04"):
        load_predictions(run, ["m1"], [4])
    cls.mkdir(parents=True)
    pred.to_csv(cls / "predictions.csv", index=False)
    with pytest.raises(InputError, match="no provenance record"):
        load_predictions(run, ["m1"], [4])
    ck = cls / "m1_x4" / "best.pt"
    ck.parent.mkdir()
    ck.write_bytes(b"weights 1")
    key = {
        "extraction": "E1",
        "split": "S1",
        "slides": ["A", "B"],
        "skipped": {"m2_x16": "at 16x no tumour patch"},
        "classifiers": {
            "m1_x4": {"weights": file_sha256(ck), "checkpoint": "r/classification/m1_x4/best.pt"},
            "m1_x16": {"weights": "x", "checkpoint": "r/classification/m1_x16/best.pt"},
            "m2_x4": {"weights": "x", "checkpoint": "r/classification/m2_x4/best.pt"},
        },
    }
    write_stamp(cls / "predictions.csv", key)
    got, info = load_predictions(run, ["m1", "m2"], [4, 16])
    # a table of an older notebook 04 (no split column): refused with the fix
    pred.drop(columns="split").to_csv(cls / "predictions.csv", index=False)
    write_stamp(cls / "predictions.csv", key)
    with pytest.raises(InputError, match="no split column"):
        load_predictions(run, ["m1"], [4])
    pred.to_csv(cls / "predictions.csv", index=False)
    write_stamp(cls / "predictions.csv", key)
    assert len(got) == len(pred) and info["slides"] == 2 and info["skipped"] == {"m2_x16": "at 16x no tumour patch"}
    # notebook 02 rerun since (other caches or another split): refused, not voted on
    write_stamp(cls / "predictions.csv", {**key, "split": "S0"})
    with pytest.raises(InputError, match="other patch caches or another split"):
        load_predictions(run, ["m1"], [4])
    # a classifier retrained after its predictions were saved: refused
    write_stamp(cls / "predictions.csv", key)
    ck.write_bytes(b"weights 2")
    with pytest.raises(InputError, match="m1_x4 come from other weights"):
        load_predictions(run, ["m1"], [4])
    ck.write_bytes(b"weights 1")
    assert info["why"] is None
    # nothing of what was asked: no votes, and why, with the reasons of notebook 04 (not an error:
    # notebook 05 still writes the report of what was trained)
    got, info = load_predictions(run, ["m2"], [16])
    assert not len(got)
    assert info["why"] == "notebook 04 trained no classifier of ['m2'] at [16]x (m2_x16: at 16x no tumour patch)"


def test_bad_input(pred):
    with pytest.raises(InputError, match="tie"):
        vote_units(assign_units(pred), 0.5, "maybe")
    with pytest.raises(InputError, match="no predictions"):
        vote_units(assign_units(pred).iloc[:0])


def test_summary_and_sweep_file_checks(tmp_path):
    from helpers.run import load_sweep, write_summary

    assert write_summary(tmp_path, {}) is None
    (tmp_path / "report.json").write_text(
        json.dumps({"rows": [{"quantity": "Dice", "paper": 0.69, "ours": 0.9, "convention": "pooled"}], "missing": []})
    )
    out = write_summary(tmp_path, {"profile": "demo", "parameters": {"seed": 1}, "seconds": 3.0})
    s = json.loads(out.read_text())
    assert s["numbers"][0]["ours"] == 0.9 and s["parameters"] == {"seed": 1} and s["profile"] == "demo"
    with pytest.raises(InputError, match="not found"):
        load_sweep(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "text, match",
    [
        ("name: x\nentries: []\n", "non-empty list"),
        ("entries: [{a: 1}]\n", "needs 'name'"),
        ("name: x\nentries: [{a: 1}]\nonlyy: [5]\n", "unknown keys"),
        ("name: [\n", "not valid YAML"),
        ("name: x\nentries: [{a: 1}]\nbase_entry: {seed: 1}\n", "'base_entry' needs a 'base_run'"),
    ],
)
def test_bad_sweep_files_are_named(tmp_path, text, match):
    from helpers.run import load_sweep

    bad = tmp_path / "s.yaml"
    bad.write_text(text)
    with pytest.raises(InputError, match=match):
        load_sweep(bad)


def test_sweep_with_an_unknown_parameter_fails_before_running(tmp_path, monkeypatch):
    from helpers import run

    monkeypatch.setenv("PAIP_REPRO_RUNS", str(tmp_path / "runs"))
    f = tmp_path / "s.yaml"
    f.write_text("name: sw\nprofile: demo\nonly: ['05']\nentries:\n  - {vote_share: 0.5}\n  - {vote_shares: 0.2}\n")
    ran = []
    monkeypatch.setattr(run, "_run", lambda args: ran.append(args) or 0)
    with pytest.raises(InputError, match="unknown parameter 'vote_shares'"):
        run.run_sweep(f)
    assert ran == []
    # A base run that lacks the earlier notebooks' outputs is named.
    f.write_text("name: sw\nprofile: demo\nbase_run: nothere\nonly: ['05']\nentries:\n  - {vote_share: 0.5}\n")
    with pytest.raises(InputError, match="base_run 'nothere': no such run"):
        run.run_sweep(f)


# ---------------------------------------------------------------------------------------------
# Baselines, intervals and thresholds chosen on validation slides (notebooks 04 and 05)
# ---------------------------------------------------------------------------------------------


def test_majority_baseline_and_reading():
    from helpers.learning.metrics import majority_baseline, read_against_baseline

    assert majority_baseline([1, 1, 1, 0]) == 0.75 and majority_baseline([0, 0, 1]) == pytest.approx(2 / 3)
    assert np.isnan(majority_baseline([]))
    assert read_against_baseline(0.56, 0.564, 0.5) == "AT OR BELOW BASELINE"  # EfficientNet-B0 64x of a74e99a
    assert read_against_baseline(0.9, 0.6, 0.8) == "above baseline"
    assert read_against_baseline(0.7, 0.6, 0.55) == "not clearly above"


def test_bootstrap_interval_resamples_slides_not_patches():
    from helpers.learning.metrics import bootstrap_interval

    # Two slides: one all right (100 patches), one all wrong (100 patches). Resampling patches
    # would give a narrow interval around 0.5; resampling the two slides gives 0, 0.5 or 1.
    correct = np.r_[np.ones(100), np.zeros(100)]
    groups = np.r_[np.zeros(100), np.ones(100)]
    lo, hi = bootstrap_interval(correct, groups, seed=1)
    assert lo == 0.0 and hi == 1.0
    lo2, hi2 = bootstrap_interval(correct, np.arange(200), seed=1)
    assert 0.4 < lo2 < 0.5 < hi2 < 0.6
    assert bootstrap_interval(correct, groups, seed=1) == (lo, hi)  # seeded
    with pytest.raises(InputError, match="differ in shape"):
        bootstrap_interval(correct, groups[:5])


def test_threshold_chosen_on_validation_separates_and_sits_in_the_gap():
    from helpers.paper.voting import choose_threshold, unit_score

    # Tumour slides with small tumour (shares 0.2-0.4) and tumour-free ones (0-0.05): the paper's
    # 0.5 calls every one non-tumour; the chosen cut lies in the middle of the gap.
    shares = [0.0, 0.05, 0.02, 0.2, 0.4, 0.3]
    truth = [0, 0, 0, 1, 1, 1]
    cut = choose_threshold(shares, truth)
    assert cut == pytest.approx((0.05 + 0.2) / 2)
    assert np.isnan(choose_threshold([], []))
    # Overlapping classes: the best balanced accuracy wins.
    assert choose_threshold([0.1, 0.3, 0.2, 0.6], [0, 0, 1, 1]) == pytest.approx(0.45)
    s = unit_score([1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0])
    assert (s["correct"], s["n"]) == (6, 7) and s["baseline"] == pytest.approx(4 / 7)
    assert s["ci"][0] <= 6 / 7 <= s["ci"][1]


def test_sweep_spread_counts_shares_and_numbers():
    from helpers.run import spread_markdown, sweep_spread

    table = pd.DataFrame(
        {
            "run": ["a", "a", "b", "b", "c", "c"],
            "quantity": ["dice", "slides", "dice", "slides", "dice", "slides"],
            "paper": [0.69, "9 of 9"] * 3,
            "ours": [0.8, "8 of 9", 0.9, "9 of 9", None, "7 of 9"],
        }
    )
    s = sweep_spread(table).set_index("quantity")
    assert s.loc["dice", "runs"] == 2 and s.loc["dice", "mean"] == pytest.approx(0.85)
    assert s.loc["slides", "mean"] == pytest.approx(8 / 9) and s.loc["slides", "sd"] == pytest.approx(1 / 9)
    md = spread_markdown(sweep_spread(table), 3)
    assert "| dice | 0.69 | 0.850 ± 0.071 | 0.800 - 0.900 |" in md


def _segmented_run(tmp_path, monkeypatch):
    """A run folder whose notebook 03 segmented two test slides with tumour, one without and a
    validation slide (``segmentation/metrics.csv`` of :func:`helpers.paper.segmentation.slide_metrics`,
    stamped)."""
    from types import SimpleNamespace

    from helpers.core.provenance import write_stamp
    from helpers.paper.segmentation import slide_metrics

    monkeypatch.setenv("PAIP_REPRO_RUNS", str(tmp_path))
    run = SimpleNamespace(name="r", folder=tmp_path / "r", extraction_key="E1", split_key="S1", cases={})
    truth = np.zeros((8, 8), bool)
    truth[:4] = True
    rows = []
    for cid, pred, split in (("a", truth, "test"), ("b", np.roll(truth, 2, 0), "test"), ("c", truth, "val")):
        rows.append({"case_id": cid, "split": split, **slide_metrics(pred, truth, np.ones((8, 8)), 4)})
    rows.append(
        {"case_id": "d", "split": "test", **slide_metrics(np.zeros((8, 8)), np.zeros((8, 8)), np.ones((8, 8)), 4)}
    )
    seg = run.folder / "segmentation" / "metrics.csv"
    seg.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(seg, index=False)
    write_stamp(seg, {"extraction": "E1", "split": "S1"})
    return run


def test_a_run_whose_notebook_04_trained_nothing_still_gets_its_report(tmp_path, monkeypatch):
    """Every classifier skipped (as on a folder without a non-tumour patch): notebook 05 votes on
    nothing, but the report and summary.json hold the segmentation and say why the rest is missing."""
    from helpers.paper.classification import ClassificationPlan, predict_classifiers
    from helpers.paper.report import reproduction_report
    from helpers.run import write_summary

    run = _segmented_run(tmp_path, monkeypatch)
    run.by_split = {"val": [], "test": []}
    models, scales = ["efficientnet_b0", "resnet50"], [4, 16, 64]
    skipped = {f"{m}_x{s}": f"at {s}x the training has no non-tumour patch" for m in models for s in scales}
    plan = ClassificationPlan("train", models, scales, [32, 8, 4], {}, {}, skipped=dict(skipped))
    predict_classifiers(run, plan, run.folder / "classification")  # what notebook 04 saves then
    pred, info = load_predictions(run, models, scales)
    assert not len(pred) and info["skipped"] == skipped
    assert info["why"].startswith("notebook 04 trained no classifier of ['efficientnet_b0', 'resnet50']")
    assert info["why"].endswith("; efficientnet_b0_x64, resnet50_x64: at 64x the training has no non-tumour patch)")
    unit_rows = [{"quantity": "slides correct, the paper's rule", "paper": "9 of 9", "score": None, "why": info["why"]}]
    report = reproduction_report(run, unit_rows, info).set_index("quantity")
    assert report.loc["Dice (segmentation)", "ours"] == pytest.approx(0.75)  # the mean of a (1) and b (0.5)
    assert report.loc["patch accuracy resnet50 16x", "convention"] == (
        "not measured: at 16x the training has no non-tumour patch"
    )
    assert report.loc["slides correct, the paper's rule", "convention"] == f"not measured: {info['why']}"
    md = (run.folder / "figures" / "05_reproduction_report.md").read_text()
    assert "| Dice (segmentation) | 0.69 | 0.75 |" in md and "not measured: notebook 04 trained no classifier" in md
    summary = json.loads(write_summary(run.folder, {"profile": "paper"}).read_text())
    numbers = {r["quantity"]: r for r in summary["numbers"]}
    assert numbers["Dice (segmentation)"]["ours"] == pytest.approx(0.75)
    assert numbers["patch accuracy efficientnet_b0 4x"]["convention"].startswith("not measured: at 4x")
    assert sorted(summary["missing"]) == sorted(skipped)


def test_segmentation_rows_say_why_they_are_not_measured(tmp_path, monkeypatch):
    from helpers.paper.report import reproduction_report

    run = _segmented_run(tmp_path, monkeypatch)
    info = {"skipped": {}, "key": None}
    run.split_key = "S2"  # notebook 02 split again since notebook 03 ran
    report = reproduction_report(run, [], info).set_index("quantity")
    assert report.loc["Dice (segmentation)", "ours"] is None
    assert report.loc["Dice (segmentation)", "convention"] == (
        "not measured: notebook 03 left no metrics for this run's split"
    )
    run.split_key = "S1"
    m = pd.read_csv(run.folder / "segmentation" / "metrics.csv")
    m.assign(true_cells=0).to_csv(run.folder / "segmentation" / "metrics.csv", index=False)
    report = reproduction_report(run, [], info).set_index("quantity")
    assert report.loc["PAIP 2019 score", "convention"] == "not measured: no test slide with tumour in its mask"


def test_a_slide_count_where_every_slide_holds_tumour_says_it_cannot_fail(tmp_path, monkeypatch):
    """As on PAIP 2019: calling every slide tumour scores 100 %, so 9 of 9 slides right shows
    nothing; the score, the report, report.json and summary.json say so. Regions of both classes
    are read against their baseline as before."""
    from helpers.paper.report import reproduction_report
    from helpers.paper.voting import one_class, one_class_note, unit_score
    from helpers.run import write_summary

    all_right = unit_score([1, 1, 1, 1], [1, 1, 1, 1])
    assert all_right["one_class"] == "tumour" and all_right["baseline"] == 1.0
    assert all_right["reading"] == "shows nothing: every true label is tumour"
    missed = unit_score([1, 1, 1, 1], [1, 0, 1, 1])
    assert missed["one_class"] == "tumour" and missed["reading"] == "AT OR BELOW BASELINE"
    assert unit_score([0, 0], [0, 0])["one_class"] == "non-tumour"
    assert unit_score([1, 0], [1, 0])["one_class"] is None and one_class_note(None) is None
    assert one_class(pd.Series([1.0, 1.0])) == "tumour" and one_class([]) is None
    note = one_class_note("tumour", "slide")
    assert note == (
        "every test slide's true label is tumour, so calling every slide tumour cannot fail (it scores 100 %, "
        "the baseline): a slide count here can only show tumour slides the vote misses, never that the vote works"
    )
    run = _segmented_run(tmp_path, monkeypatch)
    regions = unit_score([1, 0, 0, 1, 0], [1, 0, 1, 1, 0])
    unit_rows = [
        {"quantity": "slides correct, the paper's rule", "paper": "9 of 9", "score": all_right, "convention": "c"},
        {"quantity": "regions correct", "paper": "-", "score": regions, "unit": "region", "convention": "c"},
    ]
    report = reproduction_report(run, unit_rows, {"skipped": {}, "key": None}).set_index("quantity")
    assert report.loc["slides correct, the paper's rule", "ours"] == "4 of 4"
    assert report.loc["slides correct, the paper's rule", "baseline"] == "4 of 4"
    assert report.loc["slides correct, the paper's rule", "reading"] == "shows nothing: every true label is tumour"
    assert report.loc["regions correct", "reading"] == regions["reading"] != all_right["reading"]
    md = (run.folder / "figures" / "05_reproduction_report.md").read_text()
    assert f"Counts whose baseline is 100 % in this run:\n\n- slides correct, the paper's rule: {note}.\n" in md
    assert "regions correct:" not in md
    want = [f"slides correct, the paper's rule: {note}"]
    assert json.loads((run.folder / "report.json").read_text())["notes"] == want
    assert json.loads(write_summary(run.folder, {}).read_text())["notes"] == want
