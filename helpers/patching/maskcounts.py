"""Mask pixel counts per 16 x 16 block: the tumour fraction of any window, at any scale.

Every scale needs the tumour fraction of its patches' footprints (a 64x patch of 224 px covers
14,336 level-0 pixels a side): summing a map of mask pixels per 16 x 16 block, built once per
slide and mask, instead of re-reading the full-resolution mask at each scale, makes the mask's
cost of a scale fall with the scale as the image's does. The same map gives a slide's label
from its masks.

The first extraction of a slide builds its maps inside its row tasks: each task counts the band
of mask rows under its own rows (which it needs for its labels anyway) and writes it into the
map, so no step waits before the tasks (:func:`maps_being_built`, :func:`count_band`). Used by
``patches`` and notebook 02.
"""

import contextlib
import os
from pathlib import Path

import numpy as np

from ..core.atomic import atomic_path
from ..core.provenance import file_fingerprint, key_hash
from ..wsi.handles import count_map_layout, open_cached
from ..wsi.slides import MASK_KINDS, Mask, Slide

#: Side of the blocks of a mask count map (level-0 pixels).
COUNT_BLOCK = 16
#: Mask pixels counted at once (a band of whole block rows): bounds a worker's memory.
BAND_PIXELS = 2**25


def count_map_path(case, kind, cache_root):
    """Where the ``kind`` mask's count map lives, keyed by the mask's content."""
    stamp = key_hash([file_fingerprint(case.mask_path(kind)), COUNT_BLOCK])
    return Path(cache_root) / case.case_id / f"{kind}_counts_b{COUNT_BLOCK}_{stamp}.npy"


def fractions_from_counts(counts, y, xs, footprint, row0=0):
    """Tumour fractions of square windows (level-0 left edges ``xs``, top ``y``) from a count
    map, or from its block rows ``row0`` on (a band)."""
    b = COUNT_BLOCK
    band = np.asarray(counts[y // b - row0 : (y + footprint) // b - row0]).sum(axis=0, dtype=np.int64)
    cs = np.concatenate([[0], np.cumsum(band)])
    c0 = np.clip(np.asarray(xs) // b, 0, band.size)
    c1 = np.clip((np.asarray(xs) + footprint) // b, 0, band.size)
    return (cs[c1] - cs[c0]) / float(footprint * footprint)


def count_map_paths(case, cache_root):
    """The count maps of ``case``'s level-0 masks: ``({kind: path}, {kind: (rows, cols)})``, the
    second for those not built yet (masks at another downsample have none)."""
    paths, missing = {}, {}
    with Slide(case.slide, verify=False) as s:
        for kind in MASK_KINDS:
            mp = case.mask_path(kind)
            if mp is None:
                continue
            with Mask(mp, s.dimensions) as m:
                if m.downsample != 1.0:
                    continue
                shape = (-(-m.height // COUNT_BLOCK), -(-m.width // COUNT_BLOCK))
            paths[kind] = count_map_path(case, kind, cache_root)
            if not paths[kind].exists():
                missing[kind] = shape
    return paths, missing


@contextlib.contextmanager
def maps_being_built(paths, shapes):
    """Yield ``{kind: temporary path}`` of map files of ``shapes`` (``.npy``, counts not yet
    written) for :func:`write_band`; each is put in place at ``paths[kind]`` when the block
    ends without an error, removed otherwise (an interrupted run leaves no half-written map)."""
    with contextlib.ExitStack() as stack:
        tmps = {}
        for kind, shape in shapes.items():
            tmps[kind] = tmp = stack.enter_context(atomic_path(paths[kind], suffix=".npy"))
            with open(tmp, "wb") as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint16)), "fortran_order": False}
                np.lib.format.write_array_header_1_0(f, {**header, "shape": tuple(shape)})
                f.truncate(f.tell() + int(np.prod(shape)) * 2)  # sparse: each band written once
        yield {k: str(v) for k, v in tmps.items()}


def count_band(mask_path, slide_path, b0, b1):
    """Mask pixels per block for block rows ``b0`` to ``b1 - 1`` (uint16, one row per block
    row), decoded in parts of at most ``BAND_PIXELS`` mask pixels."""
    mask = open_cached((str(mask_path), str(slide_path)), "mask")
    return mask.block_counts(b0, b1, COUNT_BLOCK, max_pixels=BAND_PIXELS)


def write_band(map_path, b0, counts):
    """Write block rows ``b0 ...`` of a map being built (plain ``pwrite``: a full disk is an
    error at the write that hit it, never a SIGBUS)."""
    with open(map_path, "r+b") as f:
        shape, _, start = count_map_layout(f, map_path)
        view = memoryview(np.ascontiguousarray(counts, np.uint16)).cast("B")
        at = start + b0 * shape[1] * 2
        while len(view):
            n = os.pwrite(f.fileno(), view, at)
            at, view = at + n, view[n:]


def mask_count_maps(case, cache_root):
    """The masks' count maps, built in this process where missing (extraction builds them in
    its workers instead: :func:`helpers.patching.patches.extract_slide`).

    Returns:
        ``{kind: .npy path}`` for the masks the case has at level-0 size.
    """
    paths, missing = count_map_paths(case, cache_root)
    with maps_being_built(paths, missing) as tmps:
        for kind, tmp in tmps.items():
            write_band(tmp, 0, count_band(case.mask_path(kind), case.slide, 0, missing[kind][0]))
    return paths


def mask_label(case, cache_root=None, kind="whole"):
    """A slide's label from its masks: 1 when the ``kind`` mask (else the other) holds tumour,
    0 when its masks are empty, ``None`` when it has none (unlabelled, never 0).

    Reads the mask's count map from ``cache_root`` when extraction made one, else the mask
    itself in chunks (every 4th pixel).
    """
    kinds = [kind] + [k for k in MASK_KINDS if k != kind]
    for k in kinds:
        mp = case.mask_path(k)
        if mp is None:
            continue
        if cache_root is not None:
            cm = count_map_path(case, k, cache_root)
            if cm.exists():
                return int(np.load(cm, mmap_mode="r").max() > 0)
        with Slide(case.slide, verify=False) as s, Mask(mp, s.dimensions) as m:
            return int(m.count(step=4) > 0)
    return None
