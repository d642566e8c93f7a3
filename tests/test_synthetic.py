"""helpers.synthetic: deterministic PAIP-like demo slides, their masks, labels and cache."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

import helpers.synthetic as syn
from helpers.slides import Mask, Slide, check_viable_inside_whole, list_cases, read_labels
from helpers.synthetic import CaseSpec, ensure_demo_dataset, write_case


def _leftovers(folder):
    """Temporaries (``.*.tmp*``) and writer buffers left anywhere under ``folder``."""
    folder = Path(folder)
    return sorted(str(p) for p in folder.rglob("*")
                  if ".tmp" in p.name or p.suffix in (".npy", ".raw"))


def _read_all(paths):
    with Slide(paths["slide"]) as s:
        rgb = s.read_region(0, 0, *s.dimensions)
    return rgb, tifffile.imread(paths["whole"]), tifffile.imread(paths["viable"])


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------

def test_same_spec_gives_identical_pixels_and_masks(tmp_path):
    spec = CaseSpec("det", 1024, 768, True, 7)
    a = _read_all(write_case(spec, tmp_path / "a"))
    b = _read_all(write_case(spec, tmp_path / "b"))
    for x, y, what in zip(a, b, ("pixels", "whole", "viable")):
        assert x.shape == y.shape, what
        assert np.array_equal(x, y), f"{what} differ between two writes of the same spec"
    # The comparison can fail: another seed draws another slide.
    c = _read_all(write_case(CaseSpec("det", 1024, 768, True, 8), tmp_path / "c"))
    assert not np.array_equal(a[0], c[0])


def test_render_region_is_deterministic_and_tiles_consistently():
    scene = syn._Scene(CaseSpec("r", 1024, 1024, True, 3))
    rgb, tissue, whole, viable = syn.render_region(scene, 0, 0, 512, 512)
    rgb2, *_ = syn.render_region(syn._Scene(CaseSpec("r", 1024, 1024, True, 3)), 0, 0, 512, 512)
    assert np.array_equal(rgb, rgb2)
    # Rendering a sub-window gives the same pixels as cutting it from the larger render
    # (the writer renders strip by strip, so strips must join without seams).
    sub, t_sub, w_sub, v_sub = syn.render_region(scene, 128, 200, 256, 100)
    assert np.array_equal(sub, rgb[200:300, 128:384])
    assert np.array_equal(w_sub, whole[200:300, 128:384])
    assert rgb.dtype == np.uint8 and rgb.shape == (512, 512, 3)


def test_small_dataset_masks_match_their_slides(small_dataset, small_cases):
    for spec in small_cases:
        with Slide(small_dataset / f"{spec.case_id}.svs") as s:
            assert s.dimensions == (spec.width, spec.height)
        for kind in ("whole", "viable"):
            m = tifffile.imread(small_dataset / f"{spec.case_id}_{kind}.tif")
            assert m.shape == (spec.height, spec.width)
            assert m.dtype == np.uint8
            assert set(np.unique(m).tolist()) <= {0, 1}


# ---------------------------------------------------------------------------------------------
# What OpenSlide sees
# ---------------------------------------------------------------------------------------------

def test_openslide_reads_demo_slide_as_aperio(small_dataset, small_cases):
    for spec in small_cases:
        path = small_dataset / f"{spec.case_id}.svs"
        assert openslide.OpenSlide.detect_format(str(path)) == "aperio"
        with openslide.OpenSlide(str(path)) as osr:
            props = osr.properties
            assert props["openslide.vendor"] == "aperio"
            assert float(props["openslide.mpp-x"]) == pytest.approx(0.5)
            assert float(props["openslide.mpp-y"]) == pytest.approx(0.5)
            assert float(props["openslide.objective-power"]) == 20
            assert osr.dimensions == (spec.width, spec.height)
            assert osr.level_count >= 2
            for i, d in enumerate(osr.level_downsamples):
                assert d == pytest.approx(4 ** i, rel=1e-3), (spec.case_id, osr.level_downsamples)
        with Slide(path) as s:
            assert s.vendor == "aperio"
            assert s.mpp == pytest.approx((0.5, 0.5))
            assert s.objective_power == 20
            assert s.level_dimensions[1] == (spec.width // 4, spec.height // 4)


def test_demo_pyramid_level_matches_box_reduced_level0(small_dataset):
    from helpers.slides import box_reduce

    with Slide(small_dataset / "tiny_t1.svs") as s:
        assert s.level_downsamples[1] == 4
        lvl1 = np.asarray(s._osr.read_region((256, 512), 1, (256, 256)).convert("RGB"))
        ref = box_reduce(s.read_region(256, 512, 1024, 1024), 4)
        elsewhere = box_reduce(s.read_region(1280, 1024, 1024, 1024), 4)
    diff = np.abs(lvl1.astype(int) - ref.astype(int))
    assert diff.mean() < 6.0  # both JPEG-compressed (fine texture), so not bit-exact
    # Over 16 x 16 blocks the JPEG noise averages out: the level shows the same picture...
    blocks = np.abs(box_reduce(lvl1, 16).astype(int) - box_reduce(ref, 16).astype(int))
    assert blocks.mean() < 1.5 and blocks.max() <= 8
    # ...and a different picture would not pass.
    assert np.abs(box_reduce(lvl1, 16).astype(int) - box_reduce(elsewhere, 16).astype(int)).mean() > 5


# ---------------------------------------------------------------------------------------------
# Masks: viable inside whole, tumour-free case empty
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case_id", ["tiny_t1", "tiny_t2"])
def test_viable_inside_whole_and_tumour_present(small_dataset, case_id):
    whole = tifffile.imread(small_dataset / f"{case_id}_whole.tif").astype(bool)
    viable = tifffile.imread(small_dataset / f"{case_id}_viable.tif").astype(bool)
    assert viable.sum() > 0.02 * viable.size, "a tumour case should have some viable tumour"
    assert not np.any(viable & ~whole), "viable tumour outside the whole-tumour area"
    assert whole.sum() >= viable.sum()
    with Mask(small_dataset / f"{case_id}_whole.tif", whole.shape[::-1]) as w, \
            Mask(small_dataset / f"{case_id}_viable.tif", whole.shape[::-1]) as v:
        res = check_viable_inside_whole(w, v, step=2)
    assert res["ok"] and not res["swapped"] and res["viable_outside"] == 0
    assert res["viable_px"] > 0


def test_tumour_lies_on_tissue(small_dataset):
    """The whole-tumour mask covers stained tissue, not glass."""
    whole = tifffile.imread(small_dataset / "tiny_t1_whole.tif").astype(bool)
    with Slide(small_dataset / "tiny_t1.svs") as s:
        rgb = s.read_region(0, 0, *s.dimensions)
    from helpers.patches import to_gray

    gray = to_gray(rgb)
    assert np.mean(gray[whole] < 225) > 0.95
    assert np.median(gray[~whole]) > np.median(gray[whole])


def test_tumour_free_case_has_empty_masks(small_dataset):
    for kind in ("whole", "viable"):
        m = tifffile.imread(small_dataset / f"tiny_n0_{kind}.tif")
        assert m.shape == (2048, 2048)
        assert m.max() == 0
    with Slide(small_dataset / "tiny_n0.svs") as s:
        from helpers.patches import to_gray

        gray = to_gray(s.read_region(0, 0, 512, 512, downsample=4))
    assert (gray < 210).mean() > 0.1, "the tumour-free case still has tissue"


# ---------------------------------------------------------------------------------------------
# labels.csv, manifest, cache reuse and atomicity
# ---------------------------------------------------------------------------------------------

def test_labels_csv_content(small_dataset, small_cases):
    with open(small_dataset / "labels.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["case_id", "label"]
    assert rows[1:] == [[c.case_id, str(int(c.tumor))] for c in small_cases]
    assert read_labels(small_dataset / "labels.csv") == {"tiny_t1": 1, "tiny_n0": 0, "tiny_t2": 1}
    cases = list_cases(small_dataset)
    assert [c.case_id for c in cases] == ["tiny_n0", "tiny_t1", "tiny_t2"]
    assert {c.case_id: c.label for c in cases} == {"tiny_t1": 1, "tiny_n0": 0, "tiny_t2": 1}
    for c in cases:
        assert c.whole == small_dataset / f"{c.case_id}_whole.tif"
        assert c.viable == small_dataset / f"{c.case_id}_viable.tif"


def test_manifest_and_no_leftovers(small_dataset, small_cases):
    mf = json.loads((small_dataset / "manifest.json").read_text())
    assert mf["generator_version"] == syn.GENERATOR_VERSION
    assert [c["case_id"] for c in mf["cases"]] == [c.case_id for c in small_cases]
    assert _leftovers(small_dataset.parent) == []
    names = sorted(p.name for p in small_dataset.iterdir())
    expected = sorted(["README.txt", "labels.csv", "manifest.json"]
                      + [f"{c.case_id}{s}" for c in small_cases for s in (".svs", "_whole.tif", "_viable.tif")])
    assert names == expected


def test_ensure_demo_dataset_reuses_cache(small_dataset, small_cases, monkeypatch):
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in small_dataset.iterdir()}

    def boom(*a, **k):
        raise AssertionError("write_case called although the cached dataset matches")

    monkeypatch.setattr(syn, "write_case", boom)
    out = ensure_demo_dataset(folder=small_dataset, cases=small_cases, workers=1, progress=False)
    assert Path(out) == small_dataset
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in small_dataset.iterdir()}
    assert after == before


def test_ensure_demo_dataset_regenerates_when_stale(tmp_path):
    folder = tmp_path / "ds"
    one = [CaseSpec("solo", 512, 512, True, 1)]
    ensure_demo_dataset(folder=folder, cases=one, workers=1, progress=False)
    first = (folder / "solo.svs").stat().st_ino
    # A changed case list makes the cache stale: the folder is replaced as a whole.
    two = one + [CaseSpec("duo", 512, 512, False, 2)]
    ensure_demo_dataset(folder=folder, cases=two, workers=1, progress=False)
    assert (folder / "duo.svs").exists()
    assert json.loads((folder / "manifest.json").read_text()) == syn._manifest(two)
    assert (folder / "solo.svs").stat().st_ino != first
    # A damaged manifest is not trusted either.
    (folder / "manifest.json").write_text("{not json")
    ensure_demo_dataset(folder=folder, cases=two, workers=1, progress=False)
    assert json.loads((folder / "manifest.json").read_text()) == syn._manifest(two)
    assert _leftovers(tmp_path) == []


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    cases = [CaseSpec("a", 512, 512, True, 1), CaseSpec("b", 512, 512, False, 2)]
    real = syn.write_case
    calls = []

    def flaky(spec, dest, *a, **k):
        calls.append(spec.case_id)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(spec, dest, *a, **k)

    monkeypatch.setattr(syn, "write_case", flaky)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_dataset(folder=folder, cases=cases, workers=1, progress=False)
    assert not folder.exists()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(syn, "write_case", real)
    ensure_demo_dataset(folder=folder, cases=cases, workers=1, progress=False)
    assert (folder / "manifest.json").exists() and (folder / "b_viable.tif").exists()
    assert _leftovers(tmp_path) == []


def test_write_case_failure_leaves_no_partial_files(tmp_path, monkeypatch):
    """A failure while writing a slide removes its temporaries and writes no final file."""
    def broken_render(*a, **k):
        raise RuntimeError("render failed")

    monkeypatch.setattr(syn, "render_region", broken_render)
    with pytest.raises(RuntimeError, match="render failed"):
        write_case(CaseSpec("x", 512, 512, True, 1), tmp_path)
    assert sorted(os.listdir(tmp_path)) == []


def test_file_sha256(tmp_path):
    import hashlib

    p = tmp_path / "f.bin"
    p.write_bytes(b"abc" * 1000)
    assert syn.file_sha256(p, chunk=7) == hashlib.sha256(b"abc" * 1000).hexdigest()
    from helpers.errors import InputError

    with pytest.raises(InputError, match="missing.bin"):
        syn.file_sha256(tmp_path / "missing.bin")
