"""What a scale means: a level-0 downsample (the paper's), or a downsample of a resolution in um/px
(``scale_reference``) so that slides from 20x and 40x scanners give one magnification per scale."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.core.errors import InputError
from helpers.demo.synthetic import CaseSpec, write_case
from helpers.learning.inference import predict_slide
from helpers.paper.segmentation_data import mask_fraction_map
from helpers.patching.caches import ExtractionParams, load_patch_set
from helpers.patching.patches import extract_slide
from helpers.wsi.dataset import Case, resolution_warning, slide_resolutions
from helpers.wsi.slides import Slide, scale_downsample


@pytest.mark.parametrize(
    "scale, mpp, ref, want",
    [
        (4, 0.25, 0.0, 4),  # the default: level-0 downsamples, whatever the scanner
        (4, None, 0.0, 4),
        (4, 0.25, 0.5, 8),  # a 40x scan read at 2 um/px
        (4, 0.5, 0.5, 4),
        (1, 0.2527, 0.5, 2),  # Aperio's 40x: 1.979, within 2 % of 2
        (4, 0.504, 0.5, 4),  # and its 20x: 3.97
        (1, 0.2, 0.5, 2.5),  # fractional: resampled
    ],
)
def test_scale_downsample(scale, mpp, ref, want):
    got = scale_downsample(scale, mpp, ref)
    assert got == pytest.approx(want) and isinstance(got, int) == (want == int(want))


def test_a_physical_scale_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(InputError, match=r"s\.svs.*no microns per pixel.*scale_reference: 0"):
        scale_downsample(4, None, 0.5, tmp_path / "s.svs")
    with pytest.raises(InputError, match=r"upsampling.*scale_reference >= 0\.5"):
        scale_downsample(1, 0.5, 0.25, "s20x.svs")  # 20x slide asked for 0.25 um/px
    png = tmp_path / "plain.png"
    Image.fromarray(np.full((300, 300, 3), 200, np.uint8)).save(png)
    with pytest.warns(UserWarning), Slide(png) as s:
        assert s.downsample_at(4) == 4
        with pytest.raises(InputError, match="plain.png"):
            s.downsample_at(4, 0.5)


def test_resolution_warning_names_slides_and_the_parameter():
    mpps = {"a40": 0.2527, "b40": 0.2527, "c20": 0.5040, "d": None}
    line = resolution_warning(mpps)
    assert "a40" in line and "c20" in line and "scale_reference: 0.5" in line
    assert resolution_warning({"a": 0.5, "b": 0.53}) is None  # one scanner's spread
    assert resolution_warning(mpps | {"d": 0.5}, 0.5) is None  # a physical scale: nothing mixed
    with pytest.raises(InputError, match="d"):
        resolution_warning(mpps, 0.5)


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """One tissue scanned at 20x and at 40x (twice the pixels a side), with masks."""
    folder = tmp_path_factory.mktemp("twins")
    spec = CaseSpec("t20", 1400, 1200, True, 5, tumor_share=0.5)
    out = []
    for name, mag in (("t20", 1), ("t40", 2)):
        paths = write_case(CaseSpec(**{**spec.__dict__, "case_id": name, "magnify": mag}), folder)
        out.append(Case(name, paths["slide"], paths["whole"], paths["viable"]))
    return out


def test_twins_give_the_same_patches_at_a_physical_scale(twins, tmp_path):
    with Slide(twins[0].slide) as a, Slide(twins[1].slide) as b:
        assert b.dimensions == (2 * a.dimensions[0], 2 * a.dimensions[1]) and b.mpp[0] == a.mpp[0] / 2
    level0 = ExtractionParams(patch_size=32, stride=32, tissue_method="slide", mask_scale=0)
    physical = ExtractionParams(**{**level0.__dict__, "scale_reference": 0.5})
    counts = {}
    for name, p in (("level0", level0), ("physical", physical)):
        sets = [extract_slide(c, 4, tmp_path, p)[0] for c in twins]
        counts[name] = [s.meta["n_kept"] for s in sets]
        if name == "physical":
            assert [s.meta["downsample"] for s in sets] == [4, 8]
            um = [s.table.footprint.iloc[0] * mpp for s, mpp in zip(sets, (0.5, 0.25))]
            assert um[0] == um[1] == 64  # 32 px at 2 um/px on both scans
            assert abs(sets[0].meta["n_pos"] - sets[1].meta["n_pos"]) <= 0.02 * sets[0].meta["n_pos"]
            assert "scale_reference" in sets[0].meta["key"]["params"]
    assert abs(counts["physical"][1] - counts["physical"][0]) <= 0.02 * counts["physical"][0]
    assert counts["level0"][1] > 3.5 * counts["level0"][0]  # 4x of level 0 is 1 um/px on the 40x scan


def test_a_fractional_downsample_is_cut_and_labelled(twins, tmp_path):
    """0.6 um/px on a 0.5 um/px slide: 4x is a 4.8 downsample, read by resampling."""
    p = ExtractionParams(patch_size=32, stride=32, tissue_method="slide", mask_scale=4, scale_reference=0.6)
    ps, _ = extract_slide(twins[0], 4, tmp_path, p)
    with Slide(twins[0].slide) as s:
        W, H = s.dimensions
    assert ps.meta["downsample"] == pytest.approx(4.8)
    assert (ps.meta["grid_rows"], ps.meta["grid_cols"]) == (int(H // 4.8) // 32, int(W // 4.8) // 32)
    assert (ps.table.footprint == 154).all() and ps.table.x.iloc[1] == 154
    assert ps.meta["n_pos"] > 0 and ps.meta["n_neg"] > 0 and ps.masks.shape[0] == ps.meta["n_kept"]
    kept = ps.table[ps.table.kept]
    mask_share = np.asarray(ps.masks).reshape(len(kept), -1).mean(axis=1)[kept["index"].to_numpy()]
    assert np.corrcoef(mask_share, kept.viable_frac)[0, 1] > 0.9  # the mask patches are the patches'
    assert json.loads((ps.folder / "meta.json").read_text())["downsample"] == pytest.approx(4.8)
    assert load_patch_set(ps.folder).meta["n_kept"] == ps.meta["n_kept"]


class _Dark(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return (x[:, 1:2] < 0.55).float() + 0 * self.w


def test_whole_slide_inference_at_a_physical_scale(twins):
    """The 40x scan at 2x of 0.5 um/px (a level-0 downsample of 4) gives the 20x scan's canvas;
    a fractional downsample gives a canvas of level-0 cells of that fraction."""
    args = {"out_downsample": 8, "patch_size": 64, "stride": 64, "progress": False, "scale": 2}
    a = predict_slide(_Dark(), twins[0].slide, lambda o: o, downsample=2, **args)
    b = predict_slide(_Dark(), twins[1].slide, lambda o: o, downsample=4, **args)
    assert a["prob"].shape == b["prob"].shape and (a["downsample"], b["downsample"]) == (8, 16)
    assert np.abs(a["prob"] - b["prob"]).mean() < 0.05
    c = predict_slide(_Dark(), twins[0].slide, lambda o: o, downsample=2.6, **args)
    with Slide(twins[0].slide) as s:
        W, H = s.dimensions
    assert c["downsample"] == pytest.approx(10.4) and c["prob"].shape == (int(H // 2.6) // 4, int(W // 2.6) // 4)
    truth = mask_fraction_map(twins[0].viable, (W, H), c["downsample"])
    assert truth.shape == c["prob"].shape and 0 < truth.mean() < 1


def test_a_model_is_not_applied_at_another_resolution():
    from helpers.wsi.dataset import check_trained_resolution, scale_resolution

    at20, at40 = {"a": 0.5, "b": 0.503}, {"c": 0.25, "d": 0.25}
    assert scale_resolution(at20, 4) == pytest.approx(2.012) and scale_resolution(at40, 4, 0.5) == 2.0  # the median
    assert scale_resolution(at20 | at40, 4) is None and scale_resolution(at20 | {"e": None}, 4) is None
    check_trained_resolution(2.0, at40, 4, 0.5, "best.pt")  # trained at 20x, applied to 40x at 0.5 um/px
    check_trained_resolution(None, at40, 4, 0.0, "best.pt")  # unknown: nothing to compare
    with pytest.raises(
        InputError, match=r"best\.pt was trained on patches at 2 um/px.*1 um/px.*scale_reference to 0\.5"
    ):
        check_trained_resolution(2.0, at40, 4, 0.0, "best.pt")


def test_voting_regions_are_one_area_in_microns(twins):
    from types import SimpleNamespace

    import pandas as pd

    from helpers.paper.voting import assign_units, region_labels, region_sides

    cases = {c.case_id: c for c in twins}
    run = SimpleNamespace(params=ExtractionParams(scale_reference=0.5), cases=cases, mpps=slide_resolutions(twins))
    assert region_sides(run, 512) == {"t20": 512, "t40": 1024}
    level0 = SimpleNamespace(params=ExtractionParams(), cases=run.cases, mpps=run.mpps)
    assert region_sides(level0, 512) == {"t20": 512, "t40": 512}
    pred = pd.DataFrame({"case_id": ["t20", "t40"], "x": [600, 1200], "y": [0, 0], "footprint": [64, 128]})
    assert list(assign_units(pred, region_sides(run, 512)).unit) == ["t20:r0c1", "t40:r0c1"]
    truth = region_labels(run, ["t20", "t40"], 512)
    a, b = (truth[truth.index.str.startswith(k)] for k in ("t20:", "t40:"))
    assert len(a) == len(b) > 4 and np.abs(a.tumour_fraction.to_numpy() - b.tumour_fraction.to_numpy()).max() < 0.02
