"""Whole-slide segmentation: predict patch by patch over the tissue, stitch at a downscale.

The paper "extracts the patches from the whole slide images ... fed through the network ...
recombined" (section 4). Here the slide is read strip by strip at full resolution (a thread
reads the next strip while the model works on this one), glass is skipped with the same
per-patch Otsu test as extraction, each tissue patch's probability map is box-averaged down to
the output downscale and added into a canvas at that scale, and overlapping patches (``stride``
below the patch size) are averaged. The canvas is ``(H / d) x (W / d)`` floats: 39 MB for a
50,000 px slide at ``d = 16``, never a full-resolution array. Used by notebook 03.
"""

import queue
import threading
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_path
from .errors import InputError, check_positive
from .patches import ExtractionParams, grid_shape, to_gray, tissue_fractions
from .progress import progress_bar
from .slides import Slide


def _strips(slide, rows, cols, P, S, k, glass_level, tissue_threshold):
    """Yield ``(row, xs_kept, patches_kept)`` for each grid row, reading one row ahead."""
    q = queue.Queue(maxsize=2)
    width = (cols - 1) * S + P

    def reader():
        try:
            for r in range(rows):
                strip = slide.read_region(0, r * S, width, P)
                pats = np.stack([strip[:, c * S:c * S + P] for c in range(cols)])
                frac, _ = tissue_fractions(to_gray(pats[:, ::k, ::k]), glass_level)
                keep = frac >= tissue_threshold
                q.put((r, np.flatnonzero(keep) * S, pats[keep]))
        except BaseException as exc:  # hand the error to the consumer
            q.put(exc)
        q.put(None)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    while True:
        item = q.get()
        if item is None:
            break
        if isinstance(item, BaseException):
            raise item
        yield item


def predict_slide(model, slide_path, predict_fn, out_downsample=16, stride=224, patch_size=224,
                  batch_size=16, device=None, tissue=None, progress=True, input_size=None):
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
    with Slide(slide_path) as slide:
        W, H = slide.dimensions
        rows, cols = grid_shape((W, H), 1, patch_size, stride)
        acc = np.zeros((H // d + 1, W // d + 1), np.float32)
        cov = np.zeros_like(acc, dtype=np.uint16)
        n = 0
        bar = progress_bar(rows, f"segmenting {slide.name}", "row", progress)
        pending = []

        def flush():
            nonlocal n
            if not pending:
                return
            xs = np.concatenate([p[0] for p in pending])
            ys = np.concatenate([p[1] for p in pending])
            x = torch.from_numpy(np.concatenate([p[2] for p in pending])).permute(0, 3, 1, 2)
            with torch.no_grad():
                xin = x.to(device).float().div_(255)
                if input_size and input_size != patch_size:
                    xin = F.interpolate(xin, size=input_size, mode="area")
                prob = predict_fn(model(xin)).float()
                if prob.shape[-1] != patch_size:
                    prob = F.interpolate(prob, size=patch_size, mode="bilinear", align_corners=False)
                small = F.avg_pool2d(prob, d) if d > 1 else prob
            small = small[:, 0].cpu().numpy()
            e = patch_size // d
            for i in range(len(xs)):
                cy, cx = ys[i] // d, xs[i] // d
                acc[cy:cy + e, cx:cx + e] += small[i]
                cov[cy:cy + e, cx:cx + e] += 1
            n += len(xs)
            pending.clear()

        for r, xs, pats in _strips(slide, rows, cols, patch_size, stride, tissue.tissue_subsample,
                                   tissue.glass_level, tissue.tissue_threshold):
            for s0 in range(0, len(xs), batch_size):
                pending.append((xs[s0:s0 + batch_size], np.full(len(xs[s0:s0 + batch_size]), r * stride),
                                pats[s0:s0 + batch_size]))
                if sum(len(p[0]) for p in pending) >= batch_size:
                    flush()
            bar.update()
        flush()
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
