"""Segmentation pieces of notebook 03: data from the caches, batches, evaluation, per-slide
metrics, the extraction record, checkpoints, and whole-slide segmentation with its bad input."""

import json

import numpy as np
import pytest
import torch
from conftest import write_tiff_mask
from test_inference import Purple

from helpers.core.errors import InputError
from helpers.learning.train import TrainConfig, fit, load_trained
from helpers.paper.segmentation import segment_cases, slide_metrics
from helpers.paper.segmentation_data import (
    load_segmentation_patches,
    make_evaluator,
    mask_fraction_map,
    segmentation_batches,
    segmentation_prepare,
)
from helpers.patching.caches import ExtractionParams, load_extraction_record, save_extraction_record
from helpers.patching.patches import extract_dataset
from helpers.wsi.dataset import Case, list_cases
from helpers.wsi.slides import Mask, Slide


@pytest.fixture(scope="module")
def seg_run(small_dataset, tmp_path_factory):
    """A run folder with 1x caches (masks stored) of the tiny dataset and its record."""
    run = tmp_path_factory.mktemp("segrun")
    params = ExtractionParams()
    cases = list_cases(small_dataset)
    extract_dataset(cases, [1], run / "patches", params, workers=1, progress=False)
    save_extraction_record(run, small_dataset, [1], params, cases)
    return run, cases, params


def test_extraction_record_round_trip_and_errors(seg_run, small_dataset, tmp_path):
    import shutil

    run, cases, params = seg_run
    rec = load_extraction_record(run, small_dataset)
    assert rec["data_dir"] == small_dataset.resolve() and rec["scales"] == [1] and rec["params"] == params
    assert set(rec["caches"][1]) == {c.case_id for c in cases} and all(rec["caches"][1].values())
    with pytest.raises(InputError, match="run notebook 02"):
        load_extraction_record(tmp_path)
    # Other slides: refused. The same slides in another folder (a moved dataset): accepted.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(small_dataset / "tiny_t1.svs", other / "tiny_t1.svs")
    with pytest.raises(InputError, match="extracted its patches from the slides of"):
        load_extraction_record(run, other)
    moved = tmp_path / "moved"
    shutil.copytree(small_dataset, moved)
    assert load_extraction_record(run, moved)["data_dir"] == moved.resolve()


def test_patches_of_a_split_and_their_tumour_fractions(seg_run):
    run, cases, params = seg_run
    data = load_segmentation_patches(cases, run / "patches", params)
    assert len(data) == len(data.owner) == len(data.tumour_frac) and len(data) > 0
    assert data.case_ids == [c.case_id for c in cases]
    idx = np.array([len(data) - 1, 0, len(data) // 2])
    x, m = data.take(idx)
    assert x.shape == (3, 224, 224, 3) and m.shape == (3, 224, 224)
    for k, i in enumerate(idx):
        s = data.sets[data.owner[i]]
        np.testing.assert_array_equal(x[k], s.patches[data.local[i]])
        # The table's tumour fraction is the fraction of the stored mask.
        assert abs(m[k].mean() - data.tumour_frac[i]) < 1e-4  # the table keeps 4 decimals


def test_missing_cache_and_missing_masks_are_named(seg_run, tmp_path):
    run, cases, params = seg_run
    with pytest.raises(InputError, match="run notebook 02"):
        load_segmentation_patches(cases, tmp_path, params)
    from dataclasses import replace

    unmasked = [replace(cases[0], whole=None, viable=None)]
    extract_dataset(unmasked, [1], tmp_path / "p", params, workers=1, progress=False)
    with pytest.raises(InputError, match="holds no masks"):
        load_segmentation_patches(unmasked, tmp_path / "p", params)


def test_batches_hold_the_tumour_share_and_repeat_per_epoch(seg_run):
    run, cases, params = seg_run
    data = load_segmentation_patches(cases, run / "patches", params)
    batches = segmentation_batches(data, 8, 3, tumour_share=0.5, seed=1)
    epoch0 = list(batches(0))
    assert len(epoch0) == 3
    for x, m in epoch0:
        assert x.shape == (8, 3, 224, 224) and x.dtype == torch.uint8 and m.shape == (8, 1, 224, 224)
        # The first half comes from patches with >= 5 % tumour.
        assert (m[:4].float().mean((1, 2, 3)) >= 0.05).all()
    again = list(batches(0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, again))
    other = list(batches(1))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, other))


def test_no_tumour_in_training_split_is_a_clear_error(seg_run):
    run, cases, params = seg_run
    free = [c for c in cases if c.case_id == "tiny_n0"]
    data = load_segmentation_patches(free, run / "patches", params)
    with pytest.raises(InputError, match="no training patch holds tumour.*tiny_n0"):
        segmentation_batches(data, 8, 2, tumour_share=0.5)
    segmentation_batches(data, 8, 2, tumour_share=0.0)  # plain batches need no tumour


def test_prepare_resizes_and_augments_masks_alike(seg_run):
    run, cases, params = seg_run
    data = load_segmentation_patches(cases, run / "patches", params)
    x, m = next(iter(segmentation_batches(data, 4, 1, seed=0)(0)))
    prep = segmentation_prepare(64, augment=True, seed=0)
    xa, ma = prep(x, m, torch.device("cpu"), True)
    assert xa.shape == (4, 3, 64, 64) and ma.shape == (4, 1, 64, 64)
    assert set(torch.unique(ma).tolist()) <= {0.0, 1.0}
    xe, me = prep(x, m, torch.device("cpu"), False)
    # Without augmentation the resized mask keeps the tumour share of the original.
    assert abs(float(me.mean()) - float(m.float().mean())) < 0.02


def test_evaluator_scores_a_perfect_and_a_useless_model(seg_run):
    run, cases, params = seg_run
    data = load_segmentation_patches(cases, run / "patches", params)
    ev = make_evaluator(data, 224, max_patches=24, seed=0)
    assert ev.n_patches == min(24, len(data))

    class Oracle(torch.nn.Module):
        """Returns huge logits where the sample's masks are (looked up by the images)."""

        def forward(self, x):
            return [torch.full_like(x[:, :1], -20.0)]

    res = ev(Oracle(), torch.device("cpu"))
    assert res["val_dice"] == 0.0 and res["val_loss"] > 0.9  # predicts nothing, tumour exists


def test_mask_fraction_map_in_bands_matches_a_whole_read(tmp_path):
    rng = np.random.default_rng(0)
    m = (rng.random((300, 410)) < 0.3).astype(np.uint8)
    m[50:200, 100:300] = 1
    p = write_tiff_mask(tmp_path / "m.tif", m, tile=64)
    whole = mask_fraction_map(p, (410, 300), 8)
    banded = mask_fraction_map(p, (410, 300), 8, max_pixels=410 * 8)  # one band of 8 rows at a time
    ref = m[:296, :408].reshape(37, 8, 51, 8).mean(axis=(1, 3))
    np.testing.assert_allclose(whole, ref, atol=1e-6)
    np.testing.assert_allclose(banded, ref, atol=1e-6)
    # A mask stored at a downsample of the slide is sampled onto the canvas grid (nearest).
    m4 = np.ascontiguousarray(m[:296:4, :408:4])
    p4 = write_tiff_mask(tmp_path / "m4.tif", m4, tile=16)
    small = mask_fraction_map(p4, (408, 296), 8)
    np.testing.assert_array_equal(small, m4[1::2, 1::2])


def test_slide_metrics_three_conventions():
    truth = np.zeros((8, 8), bool)
    pred = np.zeros_like(truth)
    truth[0:4, 0:4] = True  # tumour fills patch (0, 0) of 4 x 4 cells
    pred[0:4, 0:2] = True  # half of it predicted
    cov = np.ones_like(truth, np.uint16)
    cov[4:, 4:] = 0  # patch (1, 1) is glass: not predicted
    r = slide_metrics(pred, truth, cov, 4)
    assert r["dice_pooled"] == pytest.approx(2 * 8 / (8 + 16))
    assert r["jaccard_pooled"] == pytest.approx(8 / 16)
    assert r["n_scored_patches"] == 3 and r["n_empty_patches"] == 2
    assert r["dice_patch"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert r["jaccard_patch"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert r["paip"] == 0.0  # Jaccard 0.5 < 0.65
    assert slide_metrics(truth, truth, cov, 4)["paip"] == 1.0
    with pytest.raises(InputError, match="differ in shape"):
        slide_metrics(pred[:4], truth, cov, 4)


def _tiny_fit(tmp_path, meta):
    model = torch.nn.Conv2d(3, 1, 1)
    x = torch.rand(4, 3, 8, 8)
    y = (x[:, :1] > 0.5).float()
    fit(
        model,
        lambda e: [(x, y)],
        lambda m, d: {"val_loss": 0.0},
        lambda o, t: ((o - t) ** 2).mean(),
        TrainConfig(epochs=1, device="cpu"),
        tmp_path,
        meta=meta,
        progress=False,
        log=lambda *a: None,
    )
    return model


def test_load_trained_refuses_other_settings(tmp_path):
    _tiny_fit(tmp_path, {"variant": "paper", "input_size": 64})
    model = torch.nn.Conv2d(3, 1, 1)
    ck = load_trained(model, tmp_path / "best.pt", {"variant": "paper", "input_size": 64})
    assert ck["epoch"] == 1
    with pytest.raises(InputError, match="input_size 64.*here 224"):
        load_trained(model, tmp_path / "best.pt", {"variant": "paper", "input_size": 224})
    with pytest.raises(InputError, match="do not fit"):
        load_trained(torch.nn.Conv2d(3, 2, 1), tmp_path / "best.pt", {"variant": "paper", "input_size": 64})
    with pytest.raises(InputError, match="no checkpoint"):
        load_trained(model, tmp_path / "nope.pt", {})


class PurpleHeads(Purple):
    """The stand-in segmenter with logits (UNet++ returns a list of logit maps)."""

    def forward(self, x):
        return [(super().forward(x) - 0.5) * 20]


def test_segment_cases_metrics_missing_mask_and_resume(seg_run, tmp_path):
    run, cases, params = seg_run
    t1 = next(c for c in cases if c.case_id == "tiny_t1")
    from dataclasses import replace

    unmasked = replace(t1, case_id="tiny_t1_nomask", viable=None, whole=None)
    logs = []
    table, canv = segment_cases(
        PurpleHeads(),
        [t1, unmasked],
        tmp_path,
        224,
        params,
        "weights-a",
        out_downsample=16,
        progress=False,
        log=logs.append,
    )
    row = table.set_index("case_id")
    assert row.loc["tiny_t1", "dice_pooled"] > 0.3
    assert np.isnan(row.loc["tiny_t1_nomask", "dice_pooled"])
    assert any("no viable mask, so no metrics" in m for m in logs)
    assert canv["tiny_t1_nomask"]["truth"] is None
    with Slide(t1.slide) as s:
        W, H = s.dimensions
        with Mask(tmp_path / "tiny_t1_pred.tif", s.dimensions) as m:
            assert m.downsample == pytest.approx(16, rel=0.01)
            np.testing.assert_array_equal(m.read_native(0, 0, W // 16, H // 16), canv["tiny_t1"]["pred"])
    stamp = json.loads((tmp_path / "tiny_t1_prob.npy.key.json").read_text())
    assert stamp["key"]["key"]["weights"] == "weights-a"
    # Rerun with the same weights: reused, same numbers; other weights (a retrained model):
    # predicted again, never the old model's masks.
    logs.clear()
    again, _ = segment_cases(
        PurpleHeads(), [t1], tmp_path, 224, params, "weights-a", out_downsample=16, progress=False, log=logs.append
    )
    assert any("reusing" in m for m in logs)
    assert again.dice_pooled.iloc[0] == row.loc["tiny_t1", "dice_pooled"]
    for changed in ({"weights": "weights-b"}, {"stride": 112}):
        logs.clear()
        segment_cases(
            PurpleHeads(),
            [t1],
            tmp_path,
            224,
            params,
            changed.get("weights", "weights-a"),
            out_downsample=16,
            stride=changed.get("stride"),
            progress=False,
            log=logs.append,
        )
        assert not any("reusing" in m for m in logs), changed
    assert not list(tmp_path.glob(".*tmp*"))


def test_segment_cases_slide_without_tissue(tmp_path):
    from PIL import Image

    folder = tmp_path / "d"
    folder.mkdir()
    Image.fromarray(np.full((448, 672, 3), 246, np.uint8)).save(folder / "glass.png")
    write_tiff_mask(folder / "glass_viable.tif", np.zeros((448, 672), np.uint8))
    case = Case("glass", folder / "glass.png", None, folder / "glass_viable.tif")
    logs = []
    with pytest.warns(UserWarning):  # no mpp for a PNG
        table, canv = segment_cases(
            PurpleHeads(),
            [case],
            tmp_path / "o",
            224,
            ExtractionParams(),
            "w",
            out_downsample=16,
            progress=False,
            log=logs.append,
        )
    assert any("no tissue patch found" in m for m in logs)
    assert table.n_patches.iloc[0] == 0 and not canv["glass"]["pred"].any()
    assert table.dice_pooled.iloc[0] == 1.0  # no tumour, none predicted: the empty convention
