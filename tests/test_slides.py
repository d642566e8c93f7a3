"""helpers.wsi.slides: the real CMU slide, plain images as slides, masks."""

import warnings

import numpy as np
import pytest
from conftest import reference_block_counts, write_png, write_tiff_mask
from PIL import Image

from helpers.core.errors import InputError
from helpers.wsi.slides import Mask, Slide, SlideWarning, box_reduce, check_viable_inside_whole, rgba_to_rgb

CMU_DIMS = (2220, 2967)


@pytest.fixture
def cmu(cmu_slide):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlideWarning)  # the CMU slide has mpp: no warning
        s = Slide(cmu_slide)
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------
# The real CMU-1-Small-Region.svs
# ---------------------------------------------------------------------------------------------


def test_cmu_metadata(cmu):
    assert cmu.dimensions == CMU_DIMS
    assert cmu.level_count == 1
    assert cmu.level_dimensions == [CMU_DIMS]
    assert cmu.level_downsamples == [1.0]
    assert cmu.mpp == pytest.approx((0.499, 0.499), abs=1e-3)
    assert cmu.objective_power == 20
    assert cmu.vendor == "aperio"
    assert cmu.name == "CMU-1-Small-Region"
    info = cmu.info()
    assert info["width"] == 2220 and info["height"] == 2967 and info["vendor"] == "aperio"
    assert info["mpp"] == pytest.approx(0.499, abs=1e-3)
    assert "aperio" in repr(cmu) and "2220x2967" in repr(cmu)


@pytest.mark.parametrize("ds", [1, 2, 4, 7.5])
def test_cmu_read_region_shapes(cmu, ds):
    a = cmu.read_region(1100, 1300, 150, 100, downsample=ds)
    assert a.shape == (100, 150, 3)
    assert a.dtype == np.uint8
    assert a.std() > 5, "a tissue region is not flat"


def test_cmu_downsample_agrees_with_box_reduced_full_read(cmu):
    x, y = 1000, 1300
    full = cmu.read_region(x, y, 800, 800, downsample=1)
    d4 = cmu.read_region(x, y, 200, 200, downsample=4)
    ref = box_reduce(full, 4)
    assert np.abs(d4.astype(int) - ref.astype(int)).mean() < 1.0
    # A shifted read does not agree: the comparison is not vacuous.
    shifted = cmu.read_region(x + 400, y, 200, 200, downsample=4)
    assert np.abs(shifted.astype(int) - ref.astype(int)).mean() > 5
    # A non-integral factor is a box resize of the full read.
    d75 = cmu.read_region(x, y, 100, 100, downsample=7.5)
    ref75 = np.asarray(Image.fromarray(cmu.read_region(x, y, 750, 750)).resize((100, 100), Image.BOX))
    assert np.abs(d75.astype(int) - ref75.astype(int)).mean() < 1.0


def test_cmu_downsample2_mean_colour(cmu):
    full = cmu.read_region(0, 0, 1000, 1000)
    d2 = cmu.read_region(0, 0, 500, 500, downsample=2)
    assert np.abs(full.reshape(-1, 3).mean(0) - d2.reshape(-1, 3).mean(0)).max() < 0.5


def test_cmu_thumbnail(cmu):
    img, ds = cmu.thumbnail(512)
    assert max(img.shape[:2]) == 512
    assert img.shape == (512, int(2220 / ds), 3)
    assert ds == pytest.approx(2967 / 512)
    assert img.dtype == np.uint8
    # Thumbnail of a slide smaller than max_size is level 0.
    img2, ds2 = cmu.thumbnail(4000)
    assert ds2 == 1.0 and img2.shape == (2967, 2220, 3)


def test_cmu_region_outside_is_white(cmu):
    # Bottom edge: rows below y = 2967 lie outside; the rows above hold tissue.
    a = cmu.read_region(800, 2867, 300, 200)
    assert a.shape == (200, 300, 3)
    assert (a[100:] == 255).all()
    assert a[:100].mean() < 230
    # Left of x = 0, and at a downsample.
    b = cmu.read_region(-400, 2567, 100, 200, downsample=4)
    assert b.shape == (200, 100, 3)
    assert (b[:, :100] == 255).all()  # x < 0: all 100 columns (400 level-0 px)
    b = cmu.read_region(-300, 1300, 300, 100, downsample=4)
    assert (b[:, :75] == 255).all()  # x < 0: 300 level-0 px = 75 px at 4x
    assert b[:, 75:].min() < 200  # inside: tissue
    b = cmu.read_region(400, 2567, 100, 200, downsample=4)
    assert (b[100:] == 255).all()  # rows past the bottom edge (y >= 2967)
    assert b[:100].mean() < 240
    # Entirely outside: all white.
    c = cmu.read_region(5000, 5000, 32, 32)
    assert (c == 255).all()


def test_best_level_and_bad_downsample(cmu):
    assert cmu.best_level(1) == 0 and cmu.best_level(64) == 0
    for bad in (0.5, 0, -1, "4", None):
        with pytest.raises(InputError, match="downsample"):
            cmu.read_region(0, 0, 10, 10, downsample=bad)


def test_closed_slide_read_raises(cmu_slide):
    s = Slide(cmu_slide)
    s.close()
    with pytest.raises(InputError, match="closed"):
        s.read_region(0, 0, 4, 4)


def test_pyramid_best_level(small_dataset):
    with Slide(small_dataset / "tiny_t1.svs") as s:
        assert s.level_downsamples == [1.0, 4.0, 16.0]
        assert [s.best_level(d) for d in (1, 2, 3.9, 3.99, 4, 7.5, 16, 64)] == [0, 0, 0, 1, 1, 1, 2, 2]
        # A read at 7.5 (level 1, factor 1.875) agrees with a reduced level-0 read.
        a = s.read_region(512, 512, 64, 64, downsample=7.5)
        ref = np.asarray(Image.fromarray(s.read_region(512, 512, 480, 480)).resize((64, 64), Image.BOX))
        assert a.shape == (64, 64, 3)
        assert np.abs(box_reduce(a, 8).astype(int) - box_reduce(ref, 8).astype(int)).mean() < 3


def test_pyramid_region_outside_is_white(small_dataset):
    with Slide(small_dataset / "tiny_n0.svs") as s:  # 2048 x 2048, levels 1, 4, 16
        a = s.read_region(1848, 1848, 100, 100, downsample=4)  # 200 level-0 px inside = 50 px
        assert a.shape == (100, 100, 3)
        assert (a[50:] == 255).all() and (a[:, 50:] == 255).all()
        b = s.read_region(-512, 0, 64, 64, downsample=16)  # 32 px left of the slide at 16x
        assert (b[:, :32] == 255).all()
        assert not (b[:, 32:] == 255).all()


# ---------------------------------------------------------------------------------------------
# A plain image as a slide
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def png_image(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 200, (480, 640, 3), dtype=np.uint8)
    return write_png(tmp_path / "plain.png", a), a


def test_png_as_slide(png_image):
    path, a = png_image
    with pytest.warns(SlideWarning, match="plain.png.*mpp"):
        s = Slide(path)
    with s:
        assert s.vendor == "image"
        assert s.mpp is None and s.objective_power is None
        assert s.dimensions == (640, 480) and s.level_count == 1
        assert np.array_equal(s.read_region(0, 0, 640, 480), a)
        assert np.array_equal(s.read_region(100, 50, 30, 20), a[50:70, 100:130])
        d2 = s.read_region(0, 0, 320, 240, downsample=2)
        assert np.abs(d2.astype(int) - box_reduce(a, 2).astype(int)).max() <= 1
        assert s.read_region(0, 0, 100, 60, downsample=7.5).shape == (60, 100, 3)
        r = s.read_region(600, 450, 100, 100)
        assert (r[30:] == 255).all() and (r[:, 40:] == 255).all()
        assert np.array_equal(r[:30, :40], a[450:, 600:])
        r = s.read_region(-10, -20, 50, 50)
        assert (r[:20] == 255).all() and (r[:, :10] == 255).all()
        assert np.array_equal(r[20:, 10:], a[:30, :40])
        img, ds = s.thumbnail(100)
        assert img.shape == (75, 100, 3) and ds == pytest.approx(6.4)


def test_gray_and_rgba_images_read_as_rgb(tmp_path):
    g = np.tile(np.arange(256, dtype=np.uint8), (64, 1))
    with pytest.warns(SlideWarning):
        s = Slide(write_png(tmp_path / "g.png", g))
    out = s.read_region(0, 0, 256, 64)
    assert out.shape == (64, 256, 3)
    assert np.array_equal(out[..., 0], g) and np.array_equal(out[..., 2], g)


def test_rgba_to_rgb_composites_on_white():
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 0] = (10, 20, 30, 255)  # opaque
    arr[0, 1] = (0, 0, 0, 0)  # transparent: white
    arr[1, 0] = (50, 50, 50, 128)  # premultiplied half: 50 + 127
    arr[1, 1] = (255, 255, 255, 255)
    rgb = rgba_to_rgb(arr)
    assert rgb.tolist() == [[[10, 20, 30], [255, 255, 255]], [[177, 177, 177], [255, 255, 255]]]
    assert rgba_to_rgb(np.zeros((2, 3), np.uint8)).shape == (2, 3, 3)


def test_box_reduce():
    a = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    r = box_reduce(a, 2)
    assert r.shape == (2, 3, 3)
    ref = np.floor(a.astype(float).reshape(2, 2, 3, 2, 3).mean(axis=(1, 3)) + 0.5)  # half up
    assert np.array_equal(r, ref.astype(np.uint8))
    assert r[0, 0, 0] == 11  # (0 + 3 + 18 + 21) / 4 = 10.5 -> 11


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------

W, H = 1024, 768


def _blob_mask():
    """A level-0 0/1 mask that is constant on 4 x 4 blocks (so its 4x downsample is exact)."""
    yy, xx = np.mgrid[0 : H // 4, 0 : W // 4]
    small = (((xx - 120) / 70.0) ** 2 + ((yy - 90) / 50.0) ** 2 < 1).astype(np.uint8)
    small[150:170, 10:60] = 1
    return np.kron(small, np.ones((4, 4), np.uint8)), small


def test_level0_mask(tmp_path):
    m0, _ = _blob_mask()
    path = write_tiff_mask(tmp_path / "c_whole.tif", m0, tile=128)
    with Mask(path, (W, H)) as m:
        assert m.downsample == 1.0 and (m.width, m.height) == (W, H)
        assert np.array_equal(m.read(0, 0, W, H), m0)
        assert np.array_equal(m.read(300, 200, 111, 77), m0[200:277, 300:411])
        assert np.array_equal(m.read(0, 0, W // 4, H // 4, downsample=4), m0[2::4, 2::4])
        # Non-aligned windows and windows partly outside the mask.
        assert np.array_equal(m.read(5, 7, 50, 60, downsample=3), m0[7 + 1 : 7 + 180 : 3, 5 + 1 : 5 + 150 : 3])
        out = m.read(W - 10, H - 10, 20, 20)
        assert out.shape == (20, 20) and out[10:].max() == 0 and out[:, 10:].max() == 0
        assert m.count() == int(m0.sum())
        assert m.count(step=2) == int(m0[::2, ::2].sum())
        fr = m.window_fractions(224, np.array([0, 224, 448, 800]), 224)
        want = [m0[224:448, x : x + 224].mean() for x in (0, 224, 448, 800)]
        assert fr == pytest.approx(want, abs=1e-9)
        assert fr.max() > 0.2  # the blob is there
        # Chunked reads give the same fractions.
        assert m.window_fractions(224, np.array([0, 224, 448, 800]), 224, max_pixels=W * 7) == pytest.approx(want)
    with Mask(path, (W, H)) as m:
        assert "c_whole.tif" in repr(m)


def test_downsampled_png_mask(tmp_path):
    m0, small = _blob_mask()
    path = write_png(tmp_path / "c_whole.png", small * 255)
    with Mask(path, (W, H)) as m:
        assert m.downsample == 4.0
        assert np.array_equal(m.read(0, 0, W, H), m0)
        assert np.array_equal(m.read(0, 0, W // 4, H // 4, downsample=4), small)
        assert np.array_equal(m.read(100, 40, 64, 64, downsample=2), m0[40:168:2, 100:228:2])
        fr = m.window_fractions(224, np.array([0, 224, 448]), 224)
        assert fr == pytest.approx([m0[224:448, x : x + 224].mean() for x in (0, 224, 448)])


def test_rgb_mask_with_equal_channels_is_accepted(tmp_path):
    m0, _ = _blob_mask()
    path = write_png(tmp_path / "rgb.png", np.dstack([m0 * 255] * 3))
    with Mask(path, (W, H)) as m:
        assert np.array_equal(m.read(0, 0, W, H), m0)
    bad = np.dstack([m0 * 255, m0 * 255, np.zeros_like(m0)])
    with pytest.raises(InputError, match="rgb_bad.png.*colour channels"):
        Mask(write_png(tmp_path / "rgb_bad.png", bad), (W, H)).read(0, 0, W, H)


@pytest.mark.parametrize("hi", [1, 255])
def test_mask_values_0_1_and_0_255_accepted(tmp_path, hi):
    m0, _ = _blob_mask()
    path = write_tiff_mask(tmp_path / f"m{hi}.tif", m0 * hi)
    with Mask(path, (W, H)) as m:
        out = m.read(0, 0, W, H)
    assert out.dtype == np.uint8 and set(np.unique(out).tolist()) == {0, 1}
    assert np.array_equal(out, m0)


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_mask_values_0_1_2_rejected(tmp_path, suffix):
    m0, _ = _blob_mask()
    bad = m0.copy()
    bad[400:420, 400:420] = 2
    path = tmp_path / f"case_viable{suffix}"
    write_tiff_mask(path, bad) if suffix == ".tif" else write_png(path, bad)
    with Mask(path, (W, H)) as m:
        with pytest.raises(InputError) as ei:
            m.read(0, 0, W, H)
        msg = str(ei.value)
        assert str(path) in msg and "0/1" in msg and "2" in msg
        with pytest.raises(InputError, match="case_viable"):
            m.count()
        # A window without the bad values is fine (the check is per window read).
        assert m.read(0, 0, 100, 100).max() <= 1


def test_mask_wrong_size_rejected(tmp_path):
    m0, _ = _blob_mask()
    path = write_tiff_mask(tmp_path / "other_whole.tif", m0)
    for dims in [(W + 37, H), (W, H * 2), (W // 2, H // 2), (2 * W, 3 * H)]:
        with pytest.raises(InputError) as ei:
            Mask(path, dims)
        assert str(path) in str(ei.value) and f"{W}x{H}" in str(ei.value)
    # An exact downsample with rounding is accepted (a mask drawn on a thumbnail).
    with Mask(path, (4 * W, 4 * H)) as m:
        assert m.downsample == 4.0


def test_mask_missing_or_unreadable(tmp_path):
    with pytest.raises(InputError, match="nope_whole.tif"):
        Mask(tmp_path / "nope_whole.tif", (W, H))
    junk = tmp_path / "junk_whole.tif"
    junk.write_text("not a tiff")
    with pytest.raises(InputError, match="junk_whole.tif"):
        Mask(junk, (W, H))


def test_check_viable_inside_whole_detects_swap(tmp_path):
    yy, xx = np.mgrid[0:H, 0:W]
    whole = (((xx - 500) / 300.0) ** 2 + ((yy - 380) / 250.0) ** 2 < 1).astype(np.uint8)
    viable = whole & (((xx - 500) / 150.0) ** 2 + ((yy - 380) / 120.0) ** 2 < 1).astype(np.uint8)
    pw = write_tiff_mask(tmp_path / "c_whole.tif", whole)
    pv = write_tiff_mask(tmp_path / "c_viable.tif", viable)
    with Mask(pw, (W, H)) as w, Mask(pv, (W, H)) as v:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            good = check_viable_inside_whole(w, v, step=1)
        assert good["ok"] and not good["swapped"] and good["viable_outside"] == 0
        assert good["whole_px"] == whole.sum() and good["viable_px"] == viable.sum()
        with pytest.warns(SlideWarning, match="swapped"):
            bad = check_viable_inside_whole(v, w, step=2)
        assert bad["swapped"] is True and bad["ok"] is False
        assert bad["viable_outside"] > 0.5
    # Not swapped, just wrong: a viable region that sticks out of whole.
    other = np.zeros_like(whole)
    other[:100, :100] = 1
    po = write_tiff_mask(tmp_path / "c2_viable.tif", other | viable)
    with Mask(pw, (W, H)) as w, Mask(po, (W, H)) as v:
        with pytest.warns(SlideWarning, match="check the annotation"):
            res = check_viable_inside_whole(w, v)
        assert res["ok"] is False and res["swapped"] is False


def test_check_viable_inside_whole_size_mismatch(tmp_path):
    a = write_tiff_mask(tmp_path / "a_whole.tif", np.zeros((H, W), np.uint8))
    b = write_png(tmp_path / "a_viable.png", np.zeros((H // 4, W // 4), np.uint8))
    with Mask(a, (W, H)) as ma, Mask(b, (W, H)) as mb, pytest.raises(InputError, match="a_whole.tif.*a_viable.png"):
        check_viable_inside_whole(ma, mb)


def test_missing_mpp_is_warned_once_per_slide(tmp_path):
    p = write_png(tmp_path / "img.png", np.full((40, 50, 3), 200, np.uint8))
    with pytest.warns(SlideWarning, match="no microns per pixel") as rec:
        for _ in range(5):
            Slide(p).close()
    assert len([w for w in rec if "microns" in str(w.message)]) == 1


def test_an_impossibly_large_read_is_refused_as_a_parameter_problem(cmu):
    with pytest.raises(InputError, match="too large to read at once.*smaller patch_size"):
        cmu.read_region(0, 0, 100_000, 100_000)


def test_read_region_into_a_reused_buffer(small_dataset):
    from helpers.patching.caches import ExtractionParams
    from helpers.patching.patches import rows_per_read, rows_per_task

    with Slide(small_dataset / "tiny_t1.svs") as s:
        want = s.read_region(100, 300, 500, 230)
        buf = np.zeros((230, 500, 3), np.uint8)
        got = s.read_region(100, 300, 500, 230, out=buf)
        assert got is buf and np.array_equal(got, want)
        edge = s.read_region(s.dimensions[0] - 50, 0, 100, 20)  # half outside: glass
        assert np.array_equal(
            s.read_region(s.dimensions[0] - 50, 0, 100, 20, out=np.zeros((20, 100, 3), np.uint8)), edge
        )
        with pytest.raises(InputError, match="out must be"):
            s.read_region(0, 0, 10, 10, out=np.zeros((10, 11, 3), np.uint8))
        # 224 px rows on 256 px tiles: 8 rows end on a tile row; tasks are cut there
        assert s._tiff[0].th == 256 and s.aligned_rows(1, 224) == 8
    p = ExtractionParams()
    assert rows_per_task(32704, p, 8) == 8 and rows_per_read(32704, p) == 4  # 2**26 px a task, 2**25 a read
    assert rows_per_task(65472, p, 8) == 4 and rows_per_task(8000, p, 3) == 6 and rows_per_task(200, p, 15) == 8


def test_levels_a_fraction_of_a_percent_off_are_read_as_the_scale(small_dataset, tmp_path):
    """A slide whose side does not divide by 4 has a level 1 at 4.002x, not 4x: a 4x read must
    come from level 1 (not decode level 0, 16 times the pixels), and match it pixel for pixel."""
    from helpers.demo.synthetic import CaseSpec, write_case

    paths = write_case(CaseSpec("odd", 2050, 1030, True, 5), tmp_path)
    with Slide(paths["slide"]) as s:
        ds1 = s.level_downsamples[1]
        assert 4 < ds1 < 4.01
        assert s.best_level(4) == 1
        x, y = 400, 240  # level-1 pixel (99.85, 59.9): the read starts at level-1 pixel (99, 59)
        a = s.read_region(x, y, 64, 48, downsample=4)
        # level 1's own pixels, decoded tile by tile: no resampling
        np.testing.assert_array_equal(a, s.read_region(0, 0, 512, 257, downsample=ds1)[59:107, 99:163])


@pytest.mark.parametrize("hi", [1, 255])
def test_tiled_block_counts_decode_each_distinct_tile_once_and_match_the_definition(tmp_path, hi, monkeypatch):
    # 1000 x 700: edge tiles are cut on both sides; the mask has uniform tiles (background, and
    # a tumour square covering whole tiles) and boundary tiles (the blob)
    w, h = 1000, 700
    m0 = np.zeros((h, w), np.uint8)
    m0[128:512, 128:512] = 1
    yy, xx = np.mgrid[0:h, 0:w]
    m0[((xx - 760) / 150.0) ** 2 + ((yy - 500) / 120.0) ** 2 < 1] = 1
    m0[h - 3 :, w - 5 :] = 1  # tumour in the corner tile's part inside the mask
    path = write_tiff_mask(tmp_path / "t_whole.tif", m0 * hi, tile=128)
    with Mask(path, (w, h)) as m:
        store = m._store
        decoded = []
        real_decode = store.decode_tile
        monkeypatch.setattr(
            store, "decode_tile", lambda idx, data, **kw: decoded.append(idx) or real_decode(idx, data, **kw)
        )
        want = reference_block_counts(m0, 16)
        got = m.block_counts(0, want.shape[0])
        assert got.dtype == np.uint16 and np.array_equal(got, want)
        n_tiles = store.ntx * store.nty
        assert len(decoded) < n_tiles // 2, (len(decoded), n_tiles)  # uniform tiles decoded once
        # A band that starts and ends inside tile rows.
        assert np.array_equal(m.block_counts(5, 37), want[5:37])
        assert np.array_equal(m.block_counts(0, 3, block=32), reference_block_counts(m0, 32)[:3])


def test_tiles_the_two_masks_share_are_decoded_once_for_both(tmp_path, monkeypatch):
    """Where the viable tumour's edge is the whole tumour's (no necrosis there), the two masks
    hold tiles of the same bytes: counted once, for both, and the counts stay right."""
    import helpers.wsi.slides as hs

    monkeypatch.setattr(hs, "_TILE_COUNTS", {})
    w, h = 1024, 768
    yy, xx = np.mgrid[0:h, 0:w]
    whole = ((((xx - 500) / 400.0) ** 2 + ((yy - 380) / 300.0) ** 2) < 1).astype(np.uint8)
    viable = whole.copy()
    viable[:, 512:] &= ((xx[:, 512:] + yy[:, 512:]) % 7 > 2).astype(np.uint8)  # necrosis on the right
    decoded, raw = [], set()
    paths = write_tiff_mask(tmp_path / "w.tif", whole, 128), write_tiff_mask(tmp_path / "v.tif", viable, 128)
    with Mask(paths[0], (w, h)) as mw, Mask(paths[1], (w, h)) as mv:
        for m in (mw, mv):
            st, real = m._store, m._store.decode_tile
            raw |= set(st.raw_tiles(0, st.ntx * st.nty))
            monkeypatch.setattr(st, "decode_tile", lambda i, d, real=real, **kw: decoded.append(d) or real(i, d, **kw))
        got_w, got_v = mw.block_counts(0, h // 16), mv.block_counts(0, h // 16)
    assert np.array_equal(got_w, reference_block_counts(whole, 16))
    assert np.array_equal(got_v, reference_block_counts(viable, 16))
    assert len(decoded) == len(set(decoded)) == len(raw)  # each distinct tile once, both masks together
    assert len(raw) < 2 * 48 * 0.75  # the left half's tiles are shared


def test_tiled_block_counts_refuse_bad_values_naming_the_file(tmp_path):
    m0, _ = _blob_mask()
    bad = m0.copy()
    bad[400:420, 400:420] = 2
    path = write_tiff_mask(tmp_path / "case_viable.tif", bad, tile=128)
    with Mask(path, (W, H)) as m, pytest.raises(InputError) as ei:
        m.block_counts(0, H // 16)
    assert str(path) in str(ei.value) and "0/1" in str(ei.value)
