"""helpers.demo.synthetic: deterministic PAIP-like demo slides, their masks, labels, cache and the zoo."""

import csv
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

import helpers.demo.synthetic as syn
from helpers.core.errors import InputError
from helpers.demo.synthetic import CaseSpec, ensure_demo_dataset, write_case, write_zoo_dataset
from helpers.wsi.dataset import describe_cases, list_cases, read_labels
from helpers.wsi.slides import Mask, Slide, SlideWarning, box_reduce, check_viable_inside_whole
from helpers.wsi.tissue import to_gray


def _leftovers(folder):
    """Temporaries (``.*.tmp*``) and writer buffers left anywhere under ``folder``."""
    folder = Path(folder)
    return sorted(str(p) for p in folder.rglob("*") if ".tmp" in p.name or p.suffix in (".npy", ".raw"))


def _read_all(paths):
    with Slide(paths["slide"]) as s:
        rgb = s.read_region(0, 0, *s.dimensions)
    return rgb, tifffile.imread(paths["whole"]), tifffile.imread(paths["viable"])


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


#: A slide with every nuisance switched on (focus blur, pen, folds, pale stroma and tumour).
BUSY = CaseSpec(
    "busy",
    1500,
    1300,
    True,
    4,
    blur=1.5,
    pen=2,
    folds=2,
    pale_tumor=0.5,
    pale_stroma=0.3,
    necrosis=0.3,
    lab=2,
    steatosis=0.4,
    mimics=0.8,
    fibrosis=0.8,
)


# ---------------------------------------------------------------------------------------------
# Determinism and seams
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


@pytest.mark.parametrize("spec", [CaseSpec("r", 1024, 1024, True, 3), BUSY], ids=["plain", "busy"])
def test_any_window_has_the_pixels_it_has_in_the_whole_slide(spec):
    """The writer renders strip by strip: windows must join without seams, bit for bit."""
    full = syn.render_region(syn.Scene(spec), 0, 0, spec.width, spec.height)
    again = syn.render_region(syn.Scene(spec), 0, 0, spec.width, spec.height)
    for a, b in zip(full, again):
        assert np.array_equal(a, b)
    scene = syn.Scene(spec)
    rng = np.random.default_rng(spec.seed)
    windows = [
        (128, 200, 256, 100),
        (0, 512, spec.width, 512),
        (333, 97, 501, 333),
        (1, 1, 7, 9),
        (spec.width - 40, spec.height - 30, 40, 30),
    ]
    for _ in range(8):
        x, y = rng.integers(0, spec.width - 8), rng.integers(0, spec.height - 8)
        windows.append((int(x), int(y), int(rng.integers(1, spec.width - x)), int(rng.integers(1, spec.height - y))))
    for x, y, w, h in windows:
        window = syn.render_region(scene, x, y, w, h)
        for whole_px, part, what in zip(full, window, ("rgb", "tissue", "whole", "viable")):
            assert np.array_equal(whole_px[y : y + h, x : x + w], part), f"{what} of window {(x, y, w, h)} differs"
    rgb = full[0]
    assert rgb.dtype == np.uint8 and rgb.shape == (spec.height, spec.width, 3)


def test_written_strips_match_the_render(tmp_path):
    """A slide taller than a strip: its masks equal one render of the whole slide, its pixels
    too up to JPEG error (so the strips were stitched in place)."""
    spec = CaseSpec("tall", 700, syn.STRIP * 2 + 77, True, 21, tumor_share=0.5)
    rgb, whole, viable = _read_all(write_case(spec, tmp_path))
    ref, _, ref_whole, ref_viable = syn.render_region(syn.Scene(spec), 0, 0, spec.width, spec.height)
    assert np.array_equal(whole, ref_whole.view(np.uint8)) and np.array_equal(viable, ref_viable.view(np.uint8))
    assert whole.max() == 1 and whole.min() == 0
    err = np.abs(box_reduce(rgb, 8).astype(int) - box_reduce(ref, 8).astype(int))
    assert err.mean() < 2 and err.max() < 25
    shifted = np.abs(box_reduce(rgb[8:], 8).astype(int) - box_reduce(ref[:-8], 8).astype(int))
    assert shifted.mean() > 3 * err.mean()


# ---------------------------------------------------------------------------------------------
# Masks and pixels come from the same fields
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", [BUSY, CaseSpec("free", 1200, 1000, False, 9, mimics=0.9, pale_stroma=0.3)], ids=["tumour", "tumour-free"]
)
def test_masks_nest_and_agree_with_pixels(spec):
    scene = syn.Scene(spec)
    rgb, tissue, whole, viable = syn.render_region(scene, 0, 0, spec.width, spec.height)
    assert not np.any(viable & ~whole) and not np.any(whole & ~tissue)
    if spec.tumor:
        assert viable.mean() > 0.05 and (whole & ~viable).mean() > 0.01  # viable tumour and necrosis
    else:
        assert not whole.any()
    # Glass (away from pen ink and from the tissue's edge) has the glass colour, tissue is darker.
    win = syn._Window(np.arange(spec.width), np.arange(spec.height), scene.grid_shape)
    inkless = win.field(scene.pen) < 0.01 if scene.pen is not None else np.ones(tissue.shape, bool)
    from scipy import ndimage

    glass = ~ndimage.binary_dilation(tissue, iterations=14) & inkless
    assert glass.mean() > 0.05
    assert np.abs(rgb[glass].astype(float) - scene.glass).mean() < 6
    assert np.median(to_gray(rgb)[tissue & inkless]) < np.median(to_gray(rgb)[glass]) - 15


def test_coverage_follows_the_spec():
    for share in (0.55, 0.8):
        for tumor_share in (0.2, 0.7):
            spec = CaseSpec("c", 3001, 2599, True, 5, tissue_share=share, tumor_share=tumor_share, necrosis=0.2)
            tissue, whole, viable = syn.Scene(spec).coverage(step=16)
            assert abs(tissue - share) < 0.05
            assert abs(whole - tumor_share) < 0.05
            assert abs(viable - tumor_share * 0.8) < 0.06
    assert syn.Scene(CaseSpec("g", 900, 800, False, 1, tissue_share=0.0)).coverage() == (0.0, 0.0, 0.0)


# ---------------------------------------------------------------------------------------------
# The look: stains, pale stroma, tumour, blur, ink
# ---------------------------------------------------------------------------------------------


def _render(spec):
    return syn.render_region(syn.Scene(spec), 0, 0, spec.width, spec.height)


def test_stain_families_differ():
    base = dict(case_id="s", width=1024, height=1024, tumor=False, seed=3, blur=0.0)
    means = [_render(CaseSpec(**base, lab=lab))[0].reshape(-1, 3).mean(0) for lab in range(4)]
    gaps = [np.abs(means[i] - means[j]).max() for i in range(4) for j in range(i + 1, 4)]
    assert min(gaps) > 4, means


def test_pale_stroma_is_nearly_as_bright_as_glass():
    spec = CaseSpec("p", 2000, 1800, False, 11, pale_stroma=0.35, blur=0.0)
    scene = syn.Scene(spec)
    rgb, tissue, _, _ = syn.render_region(scene, 0, 0, spec.width, spec.height)
    win = syn._Window(np.arange(spec.width), np.arange(spec.height), scene.grid_shape)
    loose = (win.field(scene.loose) > 0.8) & tissue
    gray = to_gray(rgb)
    assert loose.sum() > 0.15 * tissue.sum()
    assert 200 <= np.median(gray[loose]) <= 230
    assert np.median(gray[tissue & ~loose]) < np.median(gray[loose]) - 15
    assert 232 <= np.median(gray[~tissue]) <= 248


def test_tumour_is_darker_and_busier_than_liver_at_4x(small_dataset):
    whole = tifffile.imread(small_dataset / "tiny_t1_whole.tif").astype(bool)
    with Slide(small_dataset / "tiny_t1.svs") as s:
        rgb = s.read_region(0, 0, *s.dimensions)
    gray = box_reduce(to_gray(rgb)[..., None], 4)[..., 0].astype(float)
    w4 = box_reduce(whole[..., None].astype(np.uint8) * 255, 4)[..., 0] > 250
    tissue = gray < 215
    liver = tissue & ~(box_reduce(whole[..., None].astype(np.uint8) * 255, 4)[..., 0] > 0)
    assert np.mean(gray[w4] < 225) > 0.95  # tumour lies on stained tissue
    assert np.median(gray[w4]) < np.median(gray[liver]) - 5  # and is darker than the liver
    lap = np.abs(gray[1:-1, 1:-1] * 4 - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:])
    assert lap[w4[1:-1, 1:-1]].mean() > 1.2 * lap[liver[1:-1, 1:-1]].mean()


def test_focus_blur_softens_and_pen_inks():
    sharp = _render(CaseSpec("b", 1024, 1024, True, 2, blur=0.0))[0]
    soft = _render(CaseSpec("b", 1024, 1024, True, 2, blur=2.0))[0]
    g1, g2 = (to_gray(x).astype(float) for x in (sharp, soft))
    assert np.abs(np.diff(g2, axis=1)).mean() < 0.7 * np.abs(np.diff(g1, axis=1)).mean()
    inked = _render(CaseSpec("b", 1024, 1024, True, 2, blur=0.0, pen=2))[0]
    changed = np.abs(inked.astype(int) - sharp.astype(int)).max(-1) > 40
    assert 0.005 < changed.mean() < 0.5


# ---------------------------------------------------------------------------------------------
# The demo dataset's structure
# ---------------------------------------------------------------------------------------------


def test_demo_case_list_structure():
    cases = syn.demo_cases()
    assert [c.case_id for c in cases] == [f"demo_{i:02d}" for i in range(1, 46)]
    assert syn.demo_cases() == cases  # deterministic
    labels = [c.tumor for c in cases]
    assert sum(labels) == 27 and len(labels) - sum(labels) == 18
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True)
    assert sum(a != b for a, b in zip(labels, labels[1:])) > 10  # well mixed
    per_patient = Counter(c.patient_id for c in cases)
    assert len(per_patient) == 36 and Counter(per_patient.values()) == {1: 27, 2: 9}
    assert all(p.startswith("P") for p in per_patient)
    pairs = [[c for c in cases if c.patient_id == p] for p, n in per_patient.items() if n == 2]
    assert sum(a.tumor != b.tumor for a, b in pairs) >= 3  # tumour + background liver
    assert all(a.lab == b.lab for a, b in pairs)  # one lab per patient
    assert len({c.seed for c in cases}) == 45
    for c in cases:
        assert min(c.width, c.height) >= 4600 and max(c.width, c.height) <= 6200, c
        assert c.width != c.height and c.width % 64 and c.height % 64, c
    assert sum(c.width * c.height for c in cases) <= 1.2e9
    viable = [c.tumor_share * (1 - c.necrosis) for c in cases if c.tumor]
    assert min(viable) >= 0.14 and max(viable) <= 0.86
    assert sum(v > 0.5 for v in viable) >= len(viable) / 2
    assert all(c.tumor_share == 0 for c in cases if not c.tumor)
    biopsies = [c for c in cases if c.biopsy]
    assert 2 <= len(biopsies) <= 6 and any(c.tumor for c in biopsies) and any(not c.tumor for c in biopsies)
    # The nuisances are spread over the slides, not everywhere.
    for knob in ("pen", "pale_stroma", "pale_tumor", "folds"):
        n = sum(bool(getattr(c, knob)) for c in cases)
        assert 3 <= n <= 30, (knob, n)
    assert len({c.lab for c in cases}) == 4 and sum(c.blur >= 0.5 for c in cases) >= 5


def test_demo_slides_cover_what_their_specs_say():
    cases = syn.demo_cases()
    picked = [c for c in cases if c.biopsy][:2] + [c for c in cases if not c.biopsy][:6]
    for c in picked:
        tissue, whole, viable = syn.Scene(c).coverage(step=48)
        if c.biopsy:
            assert 0.05 < tissue < 0.45, c
        else:
            assert 0.5 < tissue < 0.9, c
        if c.tumor:
            assert abs(viable - c.tumor_share * (1 - c.necrosis)) < 0.08, c
            assert whole >= viable
        else:
            assert whole == 0


# ---------------------------------------------------------------------------------------------
# The small dataset on disk: what OpenSlide sees, masks, labels
# ---------------------------------------------------------------------------------------------


def test_small_dataset_masks_match_their_slides(small_dataset, small_cases):
    for spec in small_cases:
        with Slide(small_dataset / f"{spec.case_id}.svs") as s:
            assert s.dimensions == (spec.width, spec.height)
        for kind in ("whole", "viable"):
            m = tifffile.imread(small_dataset / f"{spec.case_id}_{kind}.tif")
            assert m.shape == (spec.height, spec.width)
            assert m.dtype == np.uint8
            assert set(np.unique(m).tolist()) <= {0, 1}


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
                assert d == pytest.approx(4**i, rel=1e-3), (spec.case_id, osr.level_downsamples)
        with Slide(path) as s:
            assert s.vendor == "aperio"
            assert s.mpp == pytest.approx((0.5, 0.5))
            assert s.objective_power == 20
            assert s.level_dimensions[1] == (spec.width // 4, spec.height // 4)


def test_demo_pyramid_level_matches_box_reduced_level0(small_dataset):
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


@pytest.mark.parametrize("case_id", ["tiny_t1", "tiny_t2"])
def test_viable_inside_whole_and_tumour_present(small_dataset, case_id):
    whole = tifffile.imread(small_dataset / f"{case_id}_whole.tif").astype(bool)
    viable = tifffile.imread(small_dataset / f"{case_id}_viable.tif").astype(bool)
    assert viable.sum() > 0.02 * viable.size, "a tumour case should have some viable tumour"
    assert not np.any(viable & ~whole), "viable tumour outside the whole-tumour area"
    assert whole.sum() >= viable.sum()
    with (
        Mask(small_dataset / f"{case_id}_whole.tif", whole.shape[::-1]) as w,
        Mask(small_dataset / f"{case_id}_viable.tif", whole.shape[::-1]) as v,
    ):
        res = check_viable_inside_whole(w, v, step=2)
    assert res["ok"] and not res["swapped"] and res["viable_outside"] == 0
    assert res["viable_px"] > 0


def test_tumour_free_case_has_empty_masks(small_dataset):
    for kind in ("whole", "viable"):
        m = tifffile.imread(small_dataset / f"tiny_n0_{kind}.tif")
        assert m.shape == (2048, 2048)
        assert m.max() == 0
    with Slide(small_dataset / "tiny_n0.svs") as s:
        gray = to_gray(s.read_region(0, 0, 512, 512, downsample=4))
    assert (gray < 210).mean() > 0.1, "the tumour-free case still has tissue"


def test_labels_csv_content(small_dataset, small_cases):
    rows = _csv(small_dataset / "labels.csv")
    assert rows[0] == ["slide_id", "label", "patient_id"]
    assert rows[1:] == [[c.case_id, str(int(c.tumor)), c.patient_id] for c in small_cases]
    lf = read_labels(small_dataset / "labels.csv")
    assert lf.labels == {"tiny_t1": 1, "tiny_n0": 0, "tiny_t2": 1} and lf.patients == {}
    cases = list_cases(small_dataset)
    assert [c.case_id for c in cases] == ["tiny_n0", "tiny_t1", "tiny_t2"]
    assert {c.case_id: c.label for c in cases} == {"tiny_t1": 1, "tiny_n0": 0, "tiny_t2": 1}
    for c in cases:
        assert c.whole == small_dataset / f"{c.case_id}_whole.tif"
        assert c.viable == small_dataset / f"{c.case_id}_viable.tif"


def test_labels_csv_names_patients(tmp_path):
    cases = [CaseSpec("a", 300, 260, True, 1, patient_id="P7"), CaseSpec("b", 300, 260, False, 2, patient_id="P7")]
    folder = ensure_demo_dataset(folder=tmp_path / "ds", cases=cases, workers=1, progress=False)
    assert _csv(folder / "labels.csv")[1:] == [["a", "1", "P7"], ["b", "0", "P7"]]
    assert {c.case_id: c.patient for c in list_cases(folder)} == {"a": "P7", "b": "P7"}


# ---------------------------------------------------------------------------------------------
# Manifest, cache reuse and atomicity
# ---------------------------------------------------------------------------------------------


def test_manifest_and_no_leftovers(small_dataset, small_cases):
    mf = json.loads((small_dataset / "manifest.json").read_text())
    assert mf["generator_version"] == syn.GENERATOR_VERSION
    assert [c["case_id"] for c in mf["cases"]] == [c.case_id for c in small_cases]
    assert _leftovers(small_dataset.parent) == []
    names = sorted(p.name for p in small_dataset.iterdir())
    expected = sorted(
        ["README.txt", "labels.csv", "manifest.json"]
        + [f"{c.case_id}{s}" for c in small_cases for s in (".svs", "_whole.tif", "_viable.tif")]
    )
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


# ---------------------------------------------------------------------------------------------
# The zoo
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """``{shape: folder}`` of the zoo shapes, each written once for the module when a test first
    asks for it (the fast lane writes only the small shapes)."""
    root = tmp_path_factory.mktemp("zoo")

    class Zoo(dict):
        def __missing__(self, shape):
            self[shape] = write_zoo_dataset(shape, root / shape)
            return self[shape]

    return Zoo()


def _names(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def _masks(folder, sid, suffix=".tif"):
    read = tifffile.imread if suffix == ".tif" else (lambda p: np.asarray(Image.open(p)))
    return read(folder / f"{sid}_whole{suffix}"), read(folder / f"{sid}_viable{suffix}")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*no microns per pixel:helpers.wsi.slides.SlideWarning")
def test_zoo_mixed(zoo):
    folder = zoo["mixed"]
    svs = ["mix_01", "mix_02", "mix_03", "mix_05", "mix_06", "mix_08", "mix_09", "mix_10"]
    expected = ["labels.csv", "manifest.json", "mix_04.png", "mix_04_viable.png", "mix_04_whole.png", "mix_07.jpg"] + [
        f"{s}{x}" for s in svs for x in (".svs", "_viable.tif", "_whole.tif")
    ]
    assert _names(folder) == sorted(expected)
    rows = _csv(folder / "labels.csv")
    assert rows[0] == ["slide_id", "label", "patient_id"]
    listed = {r[0]: (int(r[1]), r[2]) for r in rows[1:]}
    assert len(listed) == 9 and "mix_10" not in listed
    tumour_patients = {p for lab, p in listed.values() if lab == 1}
    free_patients = {p for lab, p in listed.values() if lab == 0} - tumour_patients
    assert len(tumour_patients) >= 3 and len(free_patients) >= 3
    assert max(Counter(p for _, p in listed.values()).values()) >= 2
    cases = {c.case_id: c for c in list_cases(folder)}
    assert len(cases) == 10 and cases["mix_07"].whole is None and cases["mix_04"].whole.suffix == ".png"
    sizes = {}
    for sid, c in cases.items():
        with Slide(c.slide) as s:
            sizes[sid] = s.dimensions
        if c.whole is None:
            continue
        whole, viable = _masks(folder, sid, c.whole.suffix)
        assert whole.shape == sizes[sid][::-1] and set(np.unique(whole)) <= {0, 1}
        assert not np.any(viable.astype(bool) & ~whole.astype(bool))
        assert bool(whole.any()) == (listed.get(sid, (0,))[0] == 1), sid
    assert sizes["mix_10"] == (100, 90) and sizes["mix_05"] == (700, 660)
    assert all(min(v) >= 600 for k, v in sizes.items() if k != "mix_10") and max(max(v) for v in sizes.values()) <= 3000
    assert sum(min(v) >= 2048 for v in sizes.values()) >= 3  # room for a 64x smoke patch
    with Slide(folder / "mix_08.svs") as s:  # the blank slide: glass only
        assert to_gray(s.read_region(0, 0, 300, 250, downsample=4)).min() > 200


def test_zoo_unannotated(zoo):
    folder = zoo["unannotated"]
    assert _names(folder) == ["manifest.json", "un_01.svs", "un_02.tif", "un_03.jpg", "un_04.svs"]
    with pytest.warns(SlideWarning, match="no microns per pixel"), Slide(folder / "un_02.tif") as s:
        assert s.mpp is None and s.vendor == "generic-tiff" and s.dimensions == (1500, 1800)
    with Slide(folder / "un_01.svs") as s:
        assert s.mpp == pytest.approx((0.5, 0.5))
    assert all(c.label is None and c.whole is None for c in list_cases(folder))


@pytest.mark.slow  # 200 slides to write
def test_zoo_many(zoo):
    folder = zoo["many"]
    rows = _csv(folder / "labels.csv")
    assert rows[0] == ["slide_id", "label", "case_id"] and len(rows) == 201
    patients = Counter(r[2] for r in rows[1:])
    assert 60 <= len(patients) <= 80 and min(patients.values()) >= 2
    assert {r[1] for r in rows[1:]} == {"0", "1"}
    svs = sorted(folder.glob("*.svs"))
    assert len(svs) == 200 and len(list(folder.glob("*_whole.tif"))) == 200
    for p in svs[::20]:
        with Slide(p) as s:
            assert all(288 <= d <= 1056 for d in s.dimensions)
    labels = {r[0]: int(r[1]) for r in rows[1:]}
    for sid in sorted(labels)[:30]:
        whole, viable = _masks(folder, sid)
        assert bool(whole.any()) == bool(labels[sid]) and not np.any(viable > whole)
    assert {c.patient for c in list_cases(folder)} == set(patients)


def test_zoo_nested(zoo):
    folder = zoo["nested"]
    assert _names(folder) == ["batch_1", "batch_2", "labels.csv", "manifest.json"]
    assert "rescans" in _names(folder / "batch_2")
    cases = list_cases(folder)
    assert [c.case_id for c in cases] == [f"ne_0{i}" for i in range(1, 7)]
    for c in cases:  # masks beside their slide, labels from the top
        assert c.whole.parent == c.slide.parent == c.viable.parent and c.label in (0, 1)
    assert sum(c.label for c in cases) == 3
    assert describe_cases(cases, folder)["folders"] == {"batch_1": 3, "batch_2": 2, "batch_2/rescans": 1}


def test_zoo_mixed_mpp_and_all_tumour(zoo):
    """Two scans of one tissue: the 40x one is the 20x one at twice the pixels, half the mpp;
    the all-tumour folder has tumour on every slide."""
    cases = {c.case_id: c for c in list_cases(zoo["mixed_mpp"])}
    assert len(cases) == 12 and {c.patient for c in cases.values()} == {f"M{i}" for i in range(1, 7)}
    with Slide(cases["mm_03_20x"].slide) as a, Slide(cases["mm_03_40x"].slide) as b:
        assert b.dimensions == (2 * a.dimensions[0], 2 * a.dimensions[1])
        assert (a.mpp[0], b.mpp[0], a.objective_power, b.objective_power) == (0.5, 0.25, 20, 40)
        ra = a.read_region(0, 0, 256, 256, downsample=8).astype(int)
        rb = b.read_region(0, 0, 256, 256, downsample=16).astype(int)
        assert np.abs(ra - rb).mean() < 4  # the same tissue
    whole20, _ = _masks(zoo["mixed_mpp"], "mm_03_20x")
    whole40, _ = _masks(zoo["mixed_mpp"], "mm_03_40x")
    assert np.array_equal(whole40[::2, ::2], whole20)
    at = list_cases(zoo["all_tumour"])
    assert len(at) == 6 and {c.label for c in at} == {1}
    for c in at:
        whole, _ = _masks(zoo["all_tumour"], c.case_id)
        assert 0 < whole.mean() < 0.9  # tumour beside tumour-free tissue


def test_zoo_case_labels_and_no_tumour(zoo):
    rows = _csv(zoo["case_labels"] / "labels.csv")
    assert rows[0] == ["case_id", "label"] and len(rows) == 6
    assert {r[1] for r in rows[1:]} == {"0", "1"}
    assert len(list(zoo["case_labels"].glob("*.svs"))) == 5 and len(list(zoo["case_labels"].glob("*_viable.tif"))) == 5
    rows = _csv(zoo["no_tumour"] / "labels.csv")
    assert rows[0] == ["slide_id", "label", "patient_id"] and [r[1] for r in rows[1:]] == ["0"] * 5
    for r in rows[1:]:
        whole, viable = _masks(zoo["no_tumour"], r[0])
        assert whole.shape == viable.shape and whole.max() == 0 and viable.max() == 0
        with Slide(zoo["no_tumour"] / f"{r[0]}.svs") as s:
            assert s.dimensions == whole.shape[::-1]
            assert (to_gray(s.read_region(0, 0, 256, 256, downsample=8)) < 215).mean() > 0.2  # tissue, though


@pytest.mark.slow
def test_zoo_is_deterministic_cached_and_checked(zoo, tmp_path, monkeypatch):
    again = write_zoo_dataset("case_labels", tmp_path / "again")
    for p in zoo["case_labels"].glob("*.svs"):
        with Slide(p) as a, Slide(again / p.name) as b:
            assert np.array_equal(a.read_region(0, 0, *a.dimensions), b.read_region(0, 0, *b.dimensions))
    other = write_zoo_dataset("no_tumour", tmp_path / "other", seed=1)
    with Slide(other / "nt_01.svs") as a, Slide(zoo["no_tumour"] / "nt_01.svs") as b:
        assert a.dimensions == b.dimensions
        assert not np.array_equal(a.read_region(0, 0, 256, 256), b.read_region(0, 0, 256, 256))
    # A matching manifest is reused without writing anything.
    monkeypatch.setattr(syn, "_write_all", lambda *a, **k: pytest.fail("rewrote a cached zoo folder"))
    assert write_zoo_dataset("case_labels", again) == again
    assert _leftovers(tmp_path) == []
    with pytest.raises(InputError, match="unknown zoo dataset shape 'huge'"):
        write_zoo_dataset("huge", tmp_path / "x")
