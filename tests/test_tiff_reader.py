"""The tifffile fast path for tiled JPEG slides returns exactly OpenSlide's pixels."""

import numpy as np
import openslide

from helpers.wsi.slides import Slide


def _openslide_rgb(o, x, y, level, w, h):
    b = np.asarray(o.read_region((x, y), level, (w, h))).astype(np.int32)
    return (b[..., :3] + 255 - b[..., 3:]).clip(0, 255).astype(np.uint8)  # premultiplied on white


def _compare(path, n=12):
    s = Slide(path)
    o = openslide.OpenSlide(str(path))
    assert s._tiff is not None, "a tiled JPEG slide should use the tile reader"
    rng = np.random.default_rng(0)
    for lv, ds in enumerate(s.level_downsamples):
        W, H = s.level_dimensions[lv]
        for _ in range(n):
            w, h = int(rng.integers(1, 500)), int(rng.integers(1, 500))
            x, y = int(rng.integers(-60, W)), int(rng.integers(-60, H))  # some windows cross the border
            got = s.read_region(int(x * ds), int(y * ds), w, h, downsample=ds)
            want = _openslide_rgb(o, int(x * ds), int(y * ds), lv, w, h)
            assert np.array_equal(got, want), (path, lv, x, y, w, h)
    s.close()
    o.close()


def test_tile_reader_matches_openslide_on_real_aperio(cmu_slide):
    _compare(cmu_slide)


def test_tile_reader_matches_openslide_on_demo_pyramid(small_dataset):
    _compare(small_dataset / "tiny_t1.svs")


def test_downsampled_reads_agree_with_openslide_path(cmu_slide, monkeypatch):
    s = Slide(cmu_slide)
    fast = s.read_region(100, 200, 300, 250, downsample=4)
    monkeypatch.setattr(s, "_tiff", None)  # force OpenSlide
    slow = s.read_region(100, 200, 300, 250, downsample=4)
    monkeypatch.undo()  # the tile reader back, so that close() closes it
    s.close()
    assert np.array_equal(fast, slow)
