"""Whole-slide inference: stitching at a downscale, overlap blending, glass skipped, bad input."""

import warnings

import numpy as np
import pytest
import torch

from helpers.core.errors import InputError
from helpers.learning.inference import predict_slide, save_mask_tiff
from helpers.wsi.dataset import list_cases
from helpers.wsi.slides import Mask, Slide


class Purple(torch.nn.Module):
    """A stand-in segmenter: 'tumour' where a pixel is dark purple (tumour nuclei/stroma)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        r, g = x[:, 0:1], x[:, 1:2]
        return ((r < 0.85) & (g < 0.55)).float() + 0 * self.w


def _ident(out):
    return out


@pytest.fixture(scope="module")
def t1(small_dataset):
    return [c for c in list_cases(small_dataset) if c.case_id == "tiny_t1"][0]


def test_stitched_canvas_shape_and_coverage(t1):
    res = predict_slide(Purple(), t1.slide, _ident, out_downsample=16, progress=False)
    with Slide(t1.slide) as s:
        W, H = s.dimensions
    assert res["prob"].shape == (H // 16, W // 16) and res["prob"].dtype == np.float32
    assert res["n_patches"] > 0
    assert res["prob"].min() >= 0 and res["prob"].max() <= 1
    # Covered cells are those of the predicted (tissue) patches: at most n_patches of them.
    assert 0 < (res["coverage"] > 0).sum() <= res["n_patches"] * (224 // 16) ** 2


def test_prediction_follows_the_tumour_mask(t1):
    res = predict_slide(Purple(), t1.slide, _ident, out_downsample=16, progress=False)
    with Slide(t1.slide) as s, Mask(t1.viable, s.dimensions) as m:
        gt = m.read(0, 0, res["prob"].shape[1], res["prob"].shape[0], downsample=16).astype(bool)
    covered = res["coverage"] > 0
    inside = res["prob"][gt & covered].mean()
    outside = res["prob"][~gt & covered].mean()
    assert inside > outside + 0.1


def test_overlap_is_blended_consistently(t1):
    a = predict_slide(Purple(), t1.slide, _ident, out_downsample=16, stride=224, progress=False)
    b = predict_slide(Purple(), t1.slide, _ident, out_downsample=16, stride=112, progress=False)
    both = (a["coverage"] > 0) & (b["coverage"] > 0)
    # A pixel-local model gives the same probability whichever patches cover a cell.
    np.testing.assert_allclose(a["prob"][both], b["prob"][both], atol=1e-5)
    assert b["coverage"].max() > 1


def test_tissue_free_slide_warns_and_gives_empty_mask(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((500, 700, 3), 246, np.uint8)).save(tmp_path / "glass.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no mpp for a PNG
        with pytest.warns(UserWarning, match="no tissue"):
            res = predict_slide(Purple(), tmp_path / "glass.png", _ident, out_downsample=4, progress=False)
    assert res["n_patches"] == 0 and not res["prob"].any()


def test_bad_downsample_is_refused(t1):
    with pytest.raises(InputError, match="out_downsample"):
        predict_slide(Purple(), t1.slide, _ident, out_downsample=10, progress=False)


def test_mask_tiff_round_trip(tmp_path, t1):
    res = predict_slide(Purple(), t1.slide, _ident, out_downsample=16, progress=False)
    p = save_mask_tiff(tmp_path / "pred.tif", res["prob"] > 0.5, 16)
    with Slide(t1.slide) as s, Mask(p, s.dimensions) as m:
        assert m.downsample == pytest.approx(16, rel=0.01)
        assert np.array_equal(m.read_native(0, 0, m.width, m.height), (res["prob"] > 0.5).astype(np.uint8))
    assert not list(tmp_path.glob(".*tmp*"))


def test_resized_input_gives_the_same_map_for_a_smooth_model(t1):
    class Mean(torch.nn.Module):  # depends only on the patch's mean colour: resize-invariant
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return x.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 1, x.shape[2], x.shape[3]) + 0 * self.w

    a = predict_slide(Mean(), t1.slide, _ident, out_downsample=16, progress=False)
    b = predict_slide(Mean(), t1.slide, _ident, out_downsample=16, progress=False, input_size=128)
    np.testing.assert_allclose(a["prob"], b["prob"], atol=2e-3)


def test_reader_threads_give_the_same_map_and_stop_when_the_model_fails(t1):
    import threading

    one = predict_slide(Purple(), t1.slide, _ident, out_downsample=16, batch_size=5, progress=False, read_workers=1)
    three = predict_slide(Purple(), t1.slide, _ident, out_downsample=16, batch_size=5, progress=False, read_workers=3)
    np.testing.assert_array_equal(one["prob"], three["prob"])
    np.testing.assert_array_equal(one["coverage"], three["coverage"])
    assert one["n_patches"] == three["n_patches"] > 0

    class Fails(Purple):
        def forward(self, x):
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        predict_slide(Fails(), t1.slide, _ident, out_downsample=16, progress=False, read_workers=3)
    assert not [t for t in threading.enumerate() if t.name.startswith("read-ahead") and t.is_alive()]
    with pytest.raises(InputError, match="read_workers"):
        predict_slide(Purple(), t1.slide, _ident, progress=False, read_workers=0)


@pytest.mark.parametrize("size,scale", [((1000, 730), 1), ((150, 90), 1), ((2300, 1500), 4)])
def test_every_tissue_pixel_is_predicted_up_to_the_edges(tmp_path, size, scale):
    """A slide whose sides are not multiples of the patch (or smaller than one patch): the
    last row and column of patches are shifted inward, so tissue in the margins is predicted."""
    from PIL import Image

    W, H = size
    img = np.full((H, W, 3), 120, np.uint8)  # tissue everywhere, dark purple
    img[..., 1] = 40
    Image.fromarray(img).save(tmp_path / "edge.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no mpp for a PNG
        res = predict_slide(
            Purple(),
            tmp_path / "edge.png",
            _ident,
            out_downsample=4 * scale,
            patch_size=64,
            stride=64,
            progress=False,
            scale=scale,
        )
    assert res["prob"].shape == (H // (4 * scale), W // (4 * scale))
    assert (res["coverage"] > 0).all(), "some canvas cells (the right/bottom margins) were never predicted"
    assert res["prob"].min() == 1.0


def test_grid_positions_reach_the_end():
    from helpers.learning.inference import grid_positions

    assert grid_positions(1000, 224, 224).tolist() == [0, 224, 448, 672, 776]
    assert grid_positions(896, 224, 224).tolist() == [0, 224, 448, 672]  # exact: nothing added
    assert grid_positions(1000, 224, 224, align=16).tolist() == [0, 224, 448, 672, 768]
    assert grid_positions(100, 224, 224).tolist() == [0]
