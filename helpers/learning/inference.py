"""Whole-slide segmentation: predict patch by patch over the tissue, stitch at a downscale.

The paper "extracts the patches from the whole slide images ... fed through the network ...
recombined" (section 4). Here the slide is read strip by strip at the segmentation scale
(threads read the next strips while the model works on this batch, see
:mod:`helpers.core.parallel`), glass is skipped with the same tissue test as extraction, each tissue
patch's probability map is box-averaged down to the output downscale and added into a canvas at
that scale, and overlapping patches (``stride`` below the patch size) are averaged. The grid
reaches every edge of the slide. The canvas is ``(H / d) x (W / d)`` floats: 39 MB for a
50,000 px slide at ``d = 16``, never a full-resolution array. Used by notebook 03.
"""

import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.atomic import atomic_path
from ..core.errors import InputError, check_positive
from ..core.parallel import ordered_map, usable_cpus
from ..core.progress import progress_bar
from ..patching.caches import ExtractionParams
from ..wsi.slides import Slide
from ..wsi.tissue import slide_tissue_threshold, tissue_fractions, tissue_fractions_at, to_gray


def default_read_workers():
    """Reader threads for :func:`predict_slide`: half the cores, 1 to 8 (the rest feed the model).

    One thread decodes ~1,500 tissue patches of 224 px a second (2-core CPU, demo slides); a GPU
    segments ~4,700 (H200, bf16), so a GPU machine needs several.
    """
    return max(1, min(8, usable_cpus() // 2))


def grid_positions(length, patch, stride, align=1):
    """Patch starts along one side so that every pixel is covered: the regular grid, plus one
    last patch shifted inward (to a multiple of ``align``) when the grid stops short of the end.

    A side shorter than one patch gets one patch at 0 (read with glass beyond the slide's edge).
    """
    if length <= patch:
        return np.zeros(1, np.int64)
    pos = np.arange(0, length - patch + 1, stride, dtype=np.int64)
    last = (length - patch) // align * align
    if pos[-1] + patch < length and last > pos[-1]:
        pos = np.append(pos, last)
    return pos


def tissue_strips(slide_path, downsample, ys, xs, P, tissue, level, workers=1, band=4):
    """``(y, xs_kept, patches_kept)`` for each grid row (level-0 ``y``, scaled ``xs``), in order,
    read ahead by threads.

    Each thread reads bands of ``band`` consecutive grid rows (neighbouring rows share JPEG
    tile rows, which the reader keeps decoded) through a slide handle of its own, since a handle
    is not safe to share between threads.
    """
    width = int(xs[-1]) + P
    k = tissue.tissue_subsample
    local, opened, lock = threading.local(), [], threading.Lock()

    def read_band(i0):
        slide = getattr(local, "slide", None)
        if slide is None:
            slide = local.slide = Slide(slide_path, verify=False)
            with lock:
                opened.append(slide)
        out = []
        for y in ys[i0 : i0 + band]:
            strip = slide.read_region(0, int(y) * downsample, width, P, downsample=downsample)
            pats = np.stack([strip[:, x : x + P] for x in xs])
            del strip
            gray = to_gray(pats[:, ::k, ::k])
            frac = tissue_fractions(gray, tissue.glass_level)[0] if level is None else tissue_fractions_at(gray, level)
            keep = frac >= tissue.tissue_threshold
            out.append((int(y), xs[keep], pats[keep]))
        return out

    bands = ordered_map(read_band, range(0, len(ys), band), workers=workers, ahead=1)
    try:
        for rows_read in bands:
            yield from rows_read
    finally:
        bands.close()  # stops the threads before their handles are closed
        for slide in opened:
            slide.close()


def _check_canvas(out_downsample, stride, patch_size, scale):
    """Raise :class:`InputError` unless a patch's footprint and the stride's are whole numbers of
    canvas cells (``out_downsample`` a multiple of ``scale`` dividing both)."""
    check_positive("out_downsample", out_downsample, integer=True)
    check_positive("stride", stride, integer=True)
    check_positive("scale", scale, integer=True)
    d = out_downsample
    if d % scale or (patch_size * scale) % d or (stride * scale) % d:
        ok = [
            v
            for v in range(scale, patch_size * scale + 1, scale)
            if (patch_size * scale) % v == 0 and (stride * scale) % v == 0
        ]
        raise InputError(
            f"parameter 'out_downsample' ({d}) must be a multiple of the scale ({scale}) that divides "
            f"the patch footprint ({patch_size * scale} px) and the stride's ({stride * scale} px); "
            f"e.g. one of {ok[:8]}"
        )


@dataclass
class _SlideGrid:
    """The patch grid of one slide at the segmentation scale, and the canvas it is stitched on.

    Attributes:
        path: the slide file.
        name: the slide's name (for the progress bar).
        tissue: the :class:`helpers.patching.caches.ExtractionParams` of the glass test.
        level: the slide's own tissue threshold (``tissue_method`` ``slide``), else ``None``.
        downsample: level-0 pixels per pixel at the scale.
        patch: the patch side at the scale.
        cell: pixels at the scale per canvas cell.
        height, width: the slide's size at the scale.
        ys, xs: the patches' starts along each side, at the scale.
    """

    path: object
    name: str
    tissue: ExtractionParams
    level: object
    downsample: float
    patch: int
    cell: int
    height: int
    width: int
    ys: np.ndarray
    xs: np.ndarray

    @classmethod
    def of(cls, slide_path, tissue, patch, stride, cell, downsample):
        """The grid of ``slide_path`` read at ``downsample`` (see :func:`predict_slide`)."""
        with Slide(slide_path) as slide:
            W, H = slide.dimensions
            name = slide.name
            level = slide_tissue_threshold(slide) if tissue.tissue_method == "slide" else None
        hs, ws = int(H // downsample), int(W // downsample)  # the slide's size at the scale
        ys = grid_positions(hs, patch, stride, cell)
        xs = grid_positions(ws, patch, stride, cell)
        return cls(slide_path, name, tissue, level, downsample, patch, cell, hs, ws, ys, xs)

    def strips(self, workers):
        """``(y, xs_kept, patches_kept)`` for each grid row, read ahead by ``workers`` threads."""
        return tissue_strips(self.path, self.downsample, self.ys, self.xs, self.patch, self.tissue, self.level, workers)


class _Stitcher:
    """Runs the model on batches of tissue patches and adds their probabilities, box-averaged to
    canvas cells, into a canvas; overlapping patches are averaged at the end.

    A batch is landed in the canvas only once the next one is launched: on a GPU the model works
    on one batch while the host reads and stacks the next.

    Args:
        model: the network (put in eval mode; channels-last on a CPU until :meth:`finish`).
        predict_fn: as for :func:`predict_slide`.
        device: a ``torch.device`` (default: the model's).
        input_size: the network's input side, when it differs from the patch side.
        grid: the slide's :class:`_SlideGrid`.
        batch_size: patches per forward pass.
    """

    def __init__(self, model, predict_fn, device, input_size, grid, batch_size):
        self.model, self.predict_fn, self.input_size, self.grid = model, predict_fn, input_size, grid
        self.device = device or next(model.parameters()).device
        self.batch_size = batch_size
        model.eval()
        # On a CPU, oneDNN's channels-last kernels ran this UNet++ 1.3x faster (506 against 381
        # patches/s at 32 px on a 2-core EPYC); the model is put back as it was at the end.
        self.fmt = torch.channels_last if self.device.type == "cpu" else None
        if self.fmt is not None:
            model.to(memory_format=self.fmt)
        P, f = grid.patch, grid.cell
        self.acc = np.zeros((max(grid.height // f, 1) + P // f + 1, max(grid.width // f, 1) + P // f + 1), np.float32)
        self.cov = np.zeros_like(self.acc, dtype=np.uint16)
        self.n = 0  # patches added
        self.pending, self.in_flight = [], []

    def put(self, xs, y, patches):
        """Queue a grid row's tissue patches (``xs``: their starts, ``y``: the row's), running
        the model on every full batch."""
        b = self.batch_size
        for s0 in range(0, len(xs), b):
            self.pending.append((xs[s0 : s0 + b], np.full(len(xs[s0 : s0 + b]), y), patches[s0 : s0 + b]))
            if sum(len(p[0]) for p in self.pending) >= b:
                self._launch()
                self._land(keep=1)

    def finish(self):
        """Run the model on what is still queued, land everything, put the model back."""
        self._launch()
        self._land()
        if self.fmt is not None:
            self.model.to(memory_format=torch.contiguous_format)

    def _launch(self):
        # Stack the waiting patches and start the model on them. On a GPU this returns before the
        # model has finished, so the host goes on reading and stacking the next batch meanwhile.
        if not self.pending:
            return
        pending, P, f = self.pending, self.grid.patch, self.grid.cell
        xs_ = np.concatenate([p[0] for p in pending])
        ys_ = np.concatenate([p[1] for p in pending])
        x = torch.from_numpy(np.concatenate([p[2] for p in pending])).permute(0, 3, 1, 2)
        pending.clear()
        if self.device.type == "cuda":
            x = x.pin_memory()
        with torch.no_grad():
            xin = x.to(self.device, non_blocking=True).float().div_(255)
            if self.input_size and self.input_size != P:
                xin = F.interpolate(xin, size=self.input_size, mode="area")
            if self.fmt is not None:
                xin = xin.contiguous(memory_format=self.fmt)
            prob = self.predict_fn(self.model(xin)).float()
            if prob.shape[-1] != P:
                prob = F.interpolate(prob, size=P, mode="bilinear", align_corners=False)
            small = F.avg_pool2d(prob, f) if f > 1 else prob
        self.in_flight.append((xs_, ys_, small[:, 0]))

    def _land(self, keep=0):
        # Add finished batches into the canvas, leaving the newest ``keep`` still running.
        f, e = self.grid.cell, self.grid.patch // self.grid.cell
        while len(self.in_flight) > keep:
            xs_, ys_, small = self.in_flight.pop(0)
            small = small.cpu().numpy()
            for i in range(len(xs_)):
                cy, cx = ys_[i] // f, xs_[i] // f
                self.acc[cy : cy + e, cx : cx + e] += small[i]
                self.cov[cy : cy + e, cx : cx + e] += 1
            self.n += len(xs_)

    def result(self, t0):
        """:func:`predict_slide`'s dict, ``seconds`` counted from ``t0``."""
        f, cov = self.grid.cell, self.cov
        h, w = self.grid.height // f, self.grid.width // f
        prob = np.where(cov > 0, self.acc / np.maximum(cov, 1), 0).astype(np.float32)[:h, :w]
        cell = f * self.grid.downsample  # the canvas's level-0 pixels per cell (d when scales are level-0 downsamples)
        seconds = time.perf_counter() - t0
        return {"prob": prob, "coverage": cov[:h, :w], "n_patches": self.n, "seconds": seconds, "downsample": cell}


def predict_slide(
    model,
    slide_path,
    predict_fn,
    out_downsample=16,
    stride=224,
    patch_size=224,
    batch_size=16,
    device=None,
    tissue=None,
    progress=True,
    input_size=None,
    read_workers=None,
    scale=1,
    downsample=None,
):
    """Predict a slide's mask probabilities and stitch them at ``out_downsample``.

    The grid covers every pixel (see :func:`grid_positions`; margins are where the slide's
    tumour is often cut).

    Args:
        model: a segmentation network (eval mode is set here).
        slide_path: the slide file.
        predict_fn: ``predict_fn(model_output)`` -> ``(n, 1, P, P)`` probabilities (e.g.
            :func:`helpers.learning.unetpp.probabilities`).
        out_downsample: the canvas's downscale relative to level 0; a patch's footprint
            (``patch_size * scale``) and the stride's must be whole numbers of canvas cells.
        stride: grid step in pixels at ``scale``; ``patch_size`` = no overlap (the paper),
            smaller = overlapping patches averaged.
        patch_size: the patch side at ``scale`` (the network's training patches).
        batch_size: patches per forward pass.
        device: a ``torch.device`` (default: the model's).
        tissue: :class:`helpers.patching.caches.ExtractionParams` for the glass test (default: its
            defaults); its ``tissue_method`` decides the test, as in extraction.
        progress: a progress bar over grid rows.
        input_size: the network's input side when it differs from ``patch_size``: patches are
            area-resized to it and the probabilities resized back.
        read_workers: threads reading and tiling the slide ahead of the model (default
            :func:`default_read_workers`).
        scale: the downscale the patches are read at (1 in the paper: full resolution).
        downsample: the level-0 pixels per pixel that ``scale`` means on this slide (default:
            ``scale``; see :func:`helpers.wsi.slides.scale_downsample`); ``out_downsample`` is then
            in the same units as ``scale``.

    Returns:
        A dict: ``prob`` (float32 canvas, 0 where no tissue patch was predicted), ``coverage``
        (patches covering each canvas cell), ``n_patches``, ``seconds``, ``downsample`` (the
        canvas's, in level-0 pixels per cell).
    """
    _check_canvas(out_downsample, stride, patch_size, scale)
    tissue = (tissue or ExtractionParams()).validate()
    t0 = time.perf_counter()
    read_workers = default_read_workers() if read_workers is None else read_workers
    check_positive("read_workers", read_workers, integer=True)
    f = out_downsample // scale  # scaled pixels per canvas cell
    grid = _SlideGrid.of(slide_path, tissue, patch_size, stride, f, scale if downsample is None else downsample)
    stitch = _Stitcher(model, predict_fn, device, input_size, grid, batch_size)
    bar = progress_bar(len(grid.ys), f"segmenting {grid.name}", "row", progress)
    for y, xk, pats in grid.strips(read_workers):
        stitch.put(xk, y, pats)
        bar.update()
    stitch.finish()
    bar.close()
    if stitch.n == 0:
        warnings.warn(f"{slide_path}: no tissue patch found; the predicted mask is empty", stacklevel=2)
    return stitch.result(t0)


def save_mask_tiff(path, mask, downsample):
    """Write a binary mask (0/1 uint8) as a tiled, deflate-compressed TIFF, atomically.

    The downsample is recorded in the TIFF description so the mask can be read back against
    its slide (``helpers.wsi.slides.Mask`` also infers it from the sizes).
    """
    import tifffile

    m = (np.asarray(mask) > 0).astype(np.uint8)
    with atomic_path(path, suffix=".tif") as tmp:
        tifffile.imwrite(
            tmp,
            m,
            tile=(256, 256),
            compression="zlib",
            photometric="minisblack",
            description=f"predicted mask, downsample {downsample}",
            metadata=None,
        )
    return path
