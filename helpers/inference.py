"""Whole-slide segmentation: predict patch by patch over the tissue, stitch at a downscale.

The paper "extracts the patches from the whole slide images ... fed through the network ...
recombined" (section 4). Here the slide is read strip by strip at full resolution (threads
read the next strips while the model works on this batch, see :mod:`helpers.prefetch`), glass is skipped with the same
per-patch Otsu test as extraction, each tissue patch's probability map is box-averaged down to
the output downscale and added into a canvas at that scale, and overlapping patches (``stride``
below the patch size) are averaged. The canvas is ``(H / d) x (W / d)`` floats: 39 MB for a
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
from .errors import InputError, check_positive
from .patches import ExtractionParams, grid_shape, to_gray, tissue_fractions
from .prefetch import ordered_map
from .progress import progress_bar
from .slides import Slide


def default_read_workers():
    """Reader threads for :func:`predict_slide`: half the cores, 1 to 8 (the rest feed the model).

    One thread decodes ~1,500 tissue patches of 224 px a second (2-core CPU, demo slides); a GPU
    segments ~4,700 (H200, bf16), so a GPU machine needs several.
    """
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def _strips(slide_path, rows, cols, P, S, k, glass_level, tissue_threshold, workers=1, band=4):
    """``(row, xs_kept, patches_kept)`` for each grid row, in order, read ahead by threads.

    Each thread reads bands of ``band`` consecutive grid rows (neighbouring rows share JPEG
    tile rows, which the reader keeps decoded) through a slide handle of its own, since a handle
    is not safe to share between threads.
    """
    width = (cols - 1) * S + P
    local, opened, lock = threading.local(), [], threading.Lock()

    def read_band(r0):
        slide = getattr(local, "slide", None)
        if slide is None:
            slide = local.slide = Slide(slide_path)
            with lock:
                opened.append(slide)
        out = []
        for r in range(r0, min(rows, r0 + band)):
            strip = slide.read_region(0, r * S, width, P)
            pats = np.stack([strip[:, c * S:c * S + P] for c in range(cols)])
            del strip
            frac, _ = tissue_fractions(to_gray(pats[:, ::k, ::k]), glass_level)
            keep = frac >= tissue_threshold
            out.append((r, np.flatnonzero(keep) * S, pats[keep]))
        return out

    bands = ordered_map(read_band, range(0, rows, band), workers=workers, ahead=1)
    try:
        for rows_read in bands:
            yield from rows_read
    finally:
        bands.close()          # stops the threads before their handles are closed
        for slide in opened:
            slide.close()


def predict_slide(model, slide_path, predict_fn, out_downsample=16, stride=224, patch_size=224,
                  batch_size=16, device=None, tissue=None, progress=True, input_size=None, read_workers=None):
    """Predict a slide's mask probabilities and stitch them at ``out_downsample``.

    Args:
        model: a segmentation network (eval mode is set here).
        slide_path: the slide file.
        predict_fn: ``predict_fn(model_output)`` -> ``(n, 1, P, P)`` probabilities (e.g.
            :func:`helpers.unetpp.probabilities`).
        out_downsample: the canvas's downscale; must divide ``patch_size`` and ``stride``.
        stride: grid step at full resolution; ``patch_size`` = no overlap (the paper), smaller
            = overlapping patches averaged.
        patch_size: the network's input side.
        batch_size: patches per forward pass.
        device: a ``torch.device`` (default: the model's).
        tissue: :class:`helpers.patches.ExtractionParams` for the glass test (default: its
            defaults).
        progress: a progress bar over grid rows.
        input_size: the network's input side when it was trained on resized patches (e.g. 128
            for a CPU demo): patches are area-resized to it and the probabilities resized back.
        read_workers: threads reading and tiling the slide ahead of the model (default
            :func:`default_read_workers`).

    Returns:
        A dict: ``prob`` (float32 canvas, 0 where no tissue patch was predicted), ``coverage``
        (patches covering each canvas cell), ``n_patches``, ``seconds``, ``downsample``.
    """
    check_positive("out_downsample", out_downsample, integer=True)
    check_positive("stride", stride, integer=True)
    if patch_size % out_downsample or stride % out_downsample:
        raise InputError(f"parameter 'out_downsample' ({out_downsample}) must divide patch_size ({patch_size}) "
                         f"and stride ({stride}); e.g. 1, 2, 4, 8, 16, 28, 56, 112 or 224 for 224 px patches")
    tissue = (tissue or ExtractionParams()).validate()
    device = device or next(model.parameters()).device
    model.eval()
    d = out_downsample
    t0 = time.perf_counter()
    read_workers = default_read_workers() if read_workers is None else read_workers
    check_positive("read_workers", read_workers, integer=True)
    cuda = device.type == "cuda"
    with Slide(slide_path) as slide:
        W, H = slide.dimensions
        name = slide.name
    rows, cols = grid_shape((W, H), 1, patch_size, stride)
    acc = np.zeros((H // d + 1, W // d + 1), np.float32)
    cov = np.zeros_like(acc, dtype=np.uint16)
    e = patch_size // d
    n = 0
    bar = progress_bar(rows, f"segmenting {name}", "row", progress)
    pending, in_flight = [], []

    def launch():
        # Stack the waiting patches and start the model on them. On a GPU this returns before the
        # model has finished, so the host goes on reading and stacking the next batch meanwhile.
        if not pending:
            return
        xs = np.concatenate([p[0] for p in pending])
        ys = np.concatenate([p[1] for p in pending])
        x = torch.from_numpy(np.concatenate([p[2] for p in pending])).permute(0, 3, 1, 2)
        pending.clear()
        if cuda:
            x = x.pin_memory()
        with torch.no_grad():
            xin = x.to(device, non_blocking=True).float().div_(255)
            if input_size and input_size != patch_size:
                xin = F.interpolate(xin, size=input_size, mode="area")
            prob = predict_fn(model(xin)).float()
            if prob.shape[-1] != patch_size:
                prob = F.interpolate(prob, size=patch_size, mode="bilinear", align_corners=False)
            small = F.avg_pool2d(prob, d) if d > 1 else prob
        in_flight.append((xs, ys, small[:, 0]))

    def land(keep=0):
        # Add finished batches into the canvas, leaving the newest ``keep`` still running.
        nonlocal n
        while len(in_flight) > keep:
            xs, ys, small = in_flight.pop(0)
            small = small.cpu().numpy()
            for i in range(len(xs)):
                cy, cx = ys[i] // d, xs[i] // d
                acc[cy:cy + e, cx:cx + e] += small[i]
                cov[cy:cy + e, cx:cx + e] += 1
            n += len(xs)

    for r, xs, pats in _strips(slide_path, rows, cols, patch_size, stride, tissue.tissue_subsample,
                               tissue.glass_level, tissue.tissue_threshold, workers=read_workers):
        for s0 in range(0, len(xs), batch_size):
            pending.append((xs[s0:s0 + batch_size], np.full(len(xs[s0:s0 + batch_size]), r * stride),
                            pats[s0:s0 + batch_size]))
            if sum(len(p[0]) for p in pending) >= batch_size:
                launch()
                land(keep=1)
        bar.update()
    launch()
    land()
    bar.close()
    if n == 0:
        warnings.warn(f"{slide_path}: no tissue patch found; the predicted mask is empty", stacklevel=2)
    prob = np.where(cov > 0, acc / np.maximum(cov, 1), 0).astype(np.float32)[: H // d, : W // d]
    return {"prob": prob, "coverage": cov[: H // d, : W // d], "n_patches": n,
            "seconds": time.perf_counter() - t0, "downsample": d}


def save_mask_tiff(path, mask, downsample):
    """Write a binary mask (0/1 uint8) as a tiled, deflate-compressed TIFF, atomically.

    The downsample is recorded in the TIFF description so the mask can be read back against
    its slide (``helpers.slides.Mask`` also infers it from the sizes).
    """
    import tifffile

    m = (np.asarray(mask) > 0).astype(np.uint8)
    with atomic_path(path, suffix=".tif") as tmp:
        tifffile.imwrite(tmp, m, tile=(256, 256), compression="zlib", photometric="minisblack",
                         description=f"predicted mask, downsample {downsample}", metadata=None)
    return path
