"""Whole-slide segmentation: predict patch by patch over the tissue, stitch at a downscale.

The paper "extracts the patches from the whole slide images ... fed through the network ...
recombined" (section 4). Here the slide is read strip by strip at the segmentation scale
(threads read the next strips while the model works on this batch, see
:mod:`helpers.parallel`), glass is skipped with the same tissue test as extraction, each tissue
patch's probability map is box-averaged down to the output downscale and added into a canvas at
that scale, and overlapping patches (``stride`` below the patch size) are averaged. The grid
reaches every edge of the slide. The canvas is ``(H / d) x (W / d)`` floats: 39 MB for a
50,000 px slide at ``d = 16``, never a full-resolution array. Used by notebook 03.
"""

import os
import threading
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_path
from .caches import ExtractionParams
from .errors import InputError, check_positive
from .parallel import ordered_map
from .progress import progress_bar
from .slides import Slide
from .tissue import slide_tissue_threshold, tissue_fractions, tissue_fractions_at, to_gray


def default_read_workers():
    """Reader threads for :func:`predict_slide`: half the cores, 1 to 8 (the rest feed the model).

    One thread decodes ~1,500 tissue patches of 224 px a second (2-core CPU, demo slides); a GPU
    segments ~4,700 (H200, bf16), so a GPU machine needs several.
    """
    return max(1, min(8, (os.cpu_count() or 2) // 2))


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


def _strips(slide_path, downsample, ys, xs, P, tissue, level, workers=1, band=4):
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

    The grid covers every pixel: where the regular grid stops short of the slide's right or
    bottom edge, one more column or row of patches is shifted inward to end there (margins are
    where the slide's tumour is often cut), and a slide smaller than one patch is read as one
    patch padded with glass.

    Args:
        model: a segmentation network (eval mode is set here).
        slide_path: the slide file.
        predict_fn: ``predict_fn(model_output)`` -> ``(n, 1, P, P)`` probabilities (e.g.
            :func:`helpers.unetpp.probabilities`).
        out_downsample: the canvas's downscale relative to level 0; a patch's footprint
            (``patch_size * scale``) and the stride's must be whole numbers of canvas cells.
        stride: grid step in pixels at ``scale``; ``patch_size`` = no overlap (the paper),
            smaller = overlapping patches averaged.
        patch_size: the patch side at ``scale`` (the network's training patches).
        batch_size: patches per forward pass.
        device: a ``torch.device`` (default: the model's).
        tissue: :class:`helpers.caches.ExtractionParams` for the glass test (default: its
            defaults); its ``tissue_method`` decides the test, as in extraction.
        progress: a progress bar over grid rows.
        input_size: the network's input side when it differs from ``patch_size``: patches are
            area-resized to it and the probabilities resized back.
        read_workers: threads reading and tiling the slide ahead of the model (default
            :func:`default_read_workers`).
        scale: the downscale the patches are read at (1 in the paper: full resolution).
        downsample: the level-0 pixels per pixel that ``scale`` means on this slide (default:
            ``scale``; see :func:`helpers.slides.scale_downsample`); ``out_downsample`` is then
            in the same units as ``scale``.

    Returns:
        A dict: ``prob`` (float32 canvas, 0 where no tissue patch was predicted), ``coverage``
        (patches covering each canvas cell), ``n_patches``, ``seconds``, ``downsample`` (the
        canvas's, in level-0 pixels per cell).
    """
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
    tissue = (tissue or ExtractionParams()).validate()
    device = device or next(model.parameters()).device
    model.eval()
    t0 = time.perf_counter()
    read_workers = default_read_workers() if read_workers is None else read_workers
    check_positive("read_workers", read_workers, integer=True)
    cuda = device.type == "cuda"
    # On a CPU, oneDNN's channels-last kernels ran this UNet++ 1.3x faster (506 against 381
    # patches/s at 32 px on a 2-core EPYC); the model is put back as it was at the end.
    fmt = torch.channels_last if device.type == "cpu" else None
    if fmt is not None:
        model.to(memory_format=fmt)
    with Slide(slide_path) as slide:
        W, H = slide.dimensions
        name = slide.name
        level = slide_tissue_threshold(slide) if tissue.tissue_method == "slide" else None
    ds = scale if downsample is None else downsample
    P, f = patch_size, d // scale  # f: scaled pixels per canvas cell
    hs, ws = int(H // ds), int(W // ds)  # the slide's size at the scale
    ys = grid_positions(hs, P, stride, f)
    xs = grid_positions(ws, P, stride, f)
    acc = np.zeros((max(hs // f, 1) + P // f + 1, max(ws // f, 1) + P // f + 1), np.float32)
    cov = np.zeros_like(acc, dtype=np.uint16)
    e = P // f
    n = 0
    bar = progress_bar(len(ys), f"segmenting {name}", "row", progress)
    pending, in_flight = [], []

    def launch():
        # Stack the waiting patches and start the model on them. On a GPU this returns before the
        # model has finished, so the host goes on reading and stacking the next batch meanwhile.
        if not pending:
            return
        xs_ = np.concatenate([p[0] for p in pending])
        ys_ = np.concatenate([p[1] for p in pending])
        x = torch.from_numpy(np.concatenate([p[2] for p in pending])).permute(0, 3, 1, 2)
        pending.clear()
        if cuda:
            x = x.pin_memory()
        with torch.no_grad():
            xin = x.to(device, non_blocking=True).float().div_(255)
            if input_size and input_size != P:
                xin = F.interpolate(xin, size=input_size, mode="area")
            if fmt is not None:
                xin = xin.contiguous(memory_format=fmt)
            prob = predict_fn(model(xin)).float()
            if prob.shape[-1] != P:
                prob = F.interpolate(prob, size=P, mode="bilinear", align_corners=False)
            small = F.avg_pool2d(prob, f) if f > 1 else prob
        in_flight.append((xs_, ys_, small[:, 0]))

    def land(keep=0):
        # Add finished batches into the canvas, leaving the newest ``keep`` still running.
        nonlocal n
        while len(in_flight) > keep:
            xs_, ys_, small = in_flight.pop(0)
            small = small.cpu().numpy()
            for i in range(len(xs_)):
                cy, cx = ys_[i] // f, xs_[i] // f
                acc[cy : cy + e, cx : cx + e] += small[i]
                cov[cy : cy + e, cx : cx + e] += 1
            n += len(xs_)

    for y, xk, pats in _strips(slide_path, ds, ys, xs, P, tissue, level, workers=read_workers):
        for s0 in range(0, len(xk), batch_size):
            pending.append(
                (xk[s0 : s0 + batch_size], np.full(len(xk[s0 : s0 + batch_size]), y), pats[s0 : s0 + batch_size])
            )
            if sum(len(p[0]) for p in pending) >= batch_size:
                launch()
                land(keep=1)
        bar.update()
    launch()
    land()
    bar.close()
    if fmt is not None:
        model.to(memory_format=torch.contiguous_format)
    if n == 0:
        warnings.warn(f"{slide_path}: no tissue patch found; the predicted mask is empty", stacklevel=2)
    h, w = hs // f, ws // f
    prob = np.where(cov > 0, acc / np.maximum(cov, 1), 0).astype(np.float32)[:h, :w]
    cell = f * ds  # the canvas's level-0 pixels per cell (d when scales are level-0 downsamples)
    seconds = time.perf_counter() - t0
    return {"prob": prob, "coverage": cov[:h, :w], "n_patches": n, "seconds": seconds, "downsample": cell}


def save_mask_tiff(path, mask, downsample):
    """Write a binary mask (0/1 uint8) as a tiled, deflate-compressed TIFF, atomically.

    The downsample is recorded in the TIFF description so the mask can be read back against
    its slide (``helpers.slides.Mask`` also infers it from the sizes).
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
