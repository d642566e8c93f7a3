"""Patch classification pieces of notebook 04: data per scale, balanced batches, evaluation,
predictions with their coordinates, and the bad input the issue names."""

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.core.errors import InputError
from helpers.learning.models import build_classifier
from helpers.paper.classification_data import (
    PREDICTION_COLUMNS,
    class_batches,
    class_prepare,
    load_class_patches,
    make_class_evaluator,
    predict_patches,
    prediction_table,
    require_both_classes,
)
from helpers.patching.caches import ExtractionParams
from helpers.patching.patches import extract_dataset
from helpers.wsi.dataset import list_cases


@pytest.fixture(scope="module")
def cls_run(small_dataset, tmp_path_factory):
    """4x caches (stride 112: overlapping) of the tiny dataset."""
    root = tmp_path_factory.mktemp("clsrun")
    params = ExtractionParams(stride=112, mask_scale=0)
    cases = list_cases(small_dataset)
    # The tiny slides are too small for 16x: extraction says so, naming each one.
    with pytest.warns(UserWarning, match=r"3 \(slide, scale\) pairs fit no patch and are skipped: .*tiny_t1@16x"):
        extract_dataset(cases, [4, 16], root, params, workers=1, progress=False)
    return root, cases, params


def test_labelled_patches_and_their_rows(cls_run):
    root, cases, params = cls_run
    d = load_class_patches(cases, root, params, 4)
    t, n = d.counts()
    assert t > 0 and n > 0 and len(d) == t + n
    assert set(d.rows.case_id) <= {c.case_id for c in cases}
    assert (d.rows.label.to_numpy() == d.labels).all()
    # Row i of the table is patch i: the same pixels as the cache's row.
    i = len(d) - 1
    ps = d.sets[d.owner[i]]
    np.testing.assert_array_equal(d.take(np.array([i]))[0], ps.patches[d.local[i]])
    # Reading in any order gives each row its own patch.
    idx = np.array([i, 0, i // 2, 0])
    x = d.take(idx)
    for k, j in enumerate(idx):
        np.testing.assert_array_equal(x[k], d.sets[d.owner[j]].patches[d.local[j]])


def test_missing_cache_is_named(cls_run, tmp_path):
    _, cases, params = cls_run
    with pytest.raises(InputError, match="no 4x patch cache for tiny_n0"):
        load_class_patches([c for c in cases if c.case_id == "tiny_n0"], tmp_path, params, 4)


def test_a_class_absent_names_the_scale(cls_run):
    root, cases, params = cls_run
    free = load_class_patches([c for c in cases if c.case_id == "tiny_n0"], root, params, 4)
    assert free.counts()[0] == 0
    with pytest.raises(InputError, match="at 4x the training split has no tumour patch"):
        class_batches(free, 8)
    with pytest.raises(InputError, match="at 4x the validation split has no tumour"):
        require_both_classes(free, "validation")
    # A split without a single labelled patch at a scale: listed, and a clear error.
    empty = load_class_patches([c for c in cases if c.case_id == "tiny_n0"], root, params, 16)
    assert len(empty) == 0 and empty.no_patch == ["tiny_n0"]  # 2,048 px: no 16x patch fits
    with pytest.raises(InputError, match="no labelled patch at 16x"):
        make_class_evaluator(empty, 32)


def test_balanced_epochs(cls_run):
    root, cases, params = cls_run
    d = load_class_patches(cases, root, params, 4)
    t, n = d.counts()
    ep = list(class_batches(d, 16, balance=True, seed=3)(0))
    y = torch.cat([b[1] for b in ep])
    assert int((y == 1).sum()) == int((y == 0).sum()) == max(t, n)
    assert ep[0][0].dtype == torch.uint8 and ep[0][0].shape[1:] == (3, 224, 224)
    again = list(class_batches(d, 16, balance=True, seed=3)(0))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(ep, again))
    plain = class_batches(d, 2, balance=False, seed=3, max_batches=2)(0)
    assert len(plain) == 2 and len(list(plain)) == 2


def test_prepare_resizes_and_augments(cls_run):
    root, cases, params = cls_run
    d = load_class_patches(cases, root, params, 4)
    x, y = next(iter(class_batches(d, 4, seed=0)(0)))
    prep = class_prepare(64, color=0.05, seed=0)
    xa, ya = prep(x, y, torch.device("cpu"), True)
    xe, _ = prep(x, y, torch.device("cpu"), False)
    assert xa.shape == xe.shape == (4, 3, 64, 64) and torch.equal(ya, y)
    assert float(xa.min()) >= 0 and float(xa.max()) <= 1
    assert not torch.allclose(xa, xe)


class Constant(torch.nn.Module):
    """Logits that always say one class."""

    def __init__(self, cls):
        super().__init__()
        self.cls = cls
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(len(x), 2) + 0 * self.w
        out[:, self.cls] = 5.0
        return out


def test_evaluator_and_predictions_of_constant_models(cls_run):
    root, cases, params = cls_run
    d = load_class_patches(cases, root, params, 4)
    t, n = d.counts()
    ev = make_class_evaluator(d, 32)
    r = ev(Constant(0), torch.device("cpu"))
    assert r["val_acc"] == pytest.approx(n / (t + n)) and r["val_bal_acc"] == pytest.approx(0.5)
    p = predict_patches(Constant(1), d, 32, batch_size=7)
    assert p.shape == (len(d),) and (p > 0.99).all()
    tab = prediction_table(d, p, "const")
    assert list(tab.columns) == PREDICTION_COLUMNS and len(tab) == len(d)
    assert (tab.pred == 1).all() and (tab.label.to_numpy() == d.labels).all()
    assert (tab.scale == 4).all() and (tab.footprint == 896).all()
    # Coordinates are the cache table's level-0 ones.
    assert (tab[["case_id", "x", "y"]].to_numpy() == d.rows[["case_id", "x", "y"]].to_numpy()).all()
    with pytest.raises(InputError, match="probabilities for"):
        prediction_table(d, p[:-1], "const")


@pytest.mark.slow
def test_a_real_classifier_runs_on_the_patches(cls_run):
    root, cases, params = cls_run
    d = load_class_patches(cases, root, params, 4)
    torch.manual_seed(0)
    model = build_classifier("efficientnet_b0")
    p = predict_patches(model, d, 32, batch_size=16)
    assert p.shape == (len(d),) and np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    assert isinstance(prediction_table(d, p, "efficientnet_b0"), pd.DataFrame)


@pytest.mark.parametrize("arch", ["efficientnet_b0", "resnet50"])
def test_a_fresh_classifier_starts_at_chance(arch):
    # timm's EfficientNet head starts at +-1/sqrt(2): logits of about +-10 and a cross-entropy of
    # 4-7 before any step. A zeroed head starts at ln 2 and both softmax outputs at 0.5.
    torch.manual_seed(0)
    m = build_classifier(arch).eval()
    with torch.no_grad():
        out = m(torch.rand(8, 3, 32, 32))
    loss = torch.nn.functional.cross_entropy(out, torch.randint(0, 2, (8,)))
    assert loss.item() == pytest.approx(np.log(2), abs=1e-6)


def test_checkpoints_are_chosen_on_balanced_accuracy_and_validation_is_sampled(cls_run):
    from types import SimpleNamespace

    from helpers.paper.classification import ClassificationPlan, _job, sample_per_slide

    root, cases, params = cls_run
    plan = ClassificationPlan("train", ["resnet50"], [4], [112], {4: params}, {}, grid_params={4: params})
    run = SimpleNamespace(
        cache_root=root,
        data_dir=root,
        by_split={"train": cases[:1], "val": cases[1:]},
        data_key=lambda *a: "key",
        resolution=lambda *a: 2.0,
    )
    settings = dict(
        input_size={"resnet50": 32},
        batch_size=8,
        steps=1,
        balance=True,
        color_jitter=0.0,
        bn_batches=0,
        pretrained=False,
    )
    settings.update(weights={"resnet50": ""}, frozen={"resnet50": 0})
    job = _job(run, plan, root / "out", "resnet50", 4, {"optimizer": "adam", "lr": 1e-3}, settings, 0, "cpu")
    assert job.config["monitor"] == "val_bal_acc" and job.config["mode"] == "max"
    d = load_class_patches(cases, root, params, 4)
    few = sample_per_slide(d, 2, seed=0)
    per_slide = pd.Series(few.rows.case_id).value_counts()
    assert (per_slide <= 2).all() and set(per_slide.index) == set(d.rows.case_id)
    assert (sample_per_slide(d, 2, seed=0).rows.index == few.rows.index).all()  # seeded


def test_table1_row_reads_accuracy_against_the_test_sets_majority():
    from helpers.paper.classification import table1_row

    lab = pd.DataFrame({"case_id": ["a"] * 6 + ["b"] * 4, "label": [0] * 6 + [1] * 4, "pred": [0] * 10})
    r = table1_row(lab)
    # Calling everything non-tumour: 60 %, exactly the baseline, flagged.
    assert r["acc %"] == pytest.approx(60) and r["baseline %"] == pytest.approx(60)
    assert r["reading"] == "AT OR BELOW BASELINE" and r["slides"] == 2 and r["sensitivity %"] == 0
