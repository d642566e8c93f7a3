"""Mask pixel counts per 16 x 16 block: the tumour fraction of any window, at any scale.

Every scale needs the tumour fraction of its patches' footprints (a 64x patch of 224 px covers
14,336 level-0 pixels a side): summing a map of mask pixels per 16 x 16 block, built once per
slide and mask, instead of re-reading the full-resolution mask at each scale, makes the mask's
cost of a scale fall with the scale as the image's does. The same map gives a slide's label
from its masks. Used by ``patches`` and notebook 02.
"""

import contextlib
from pathlib import Path

import numpy as np

from ..core.atomic import atomic_path
from ..core.parallel import ordered_map
from ..core.provenance import file_fingerprint, key_hash
from ..wsi.handles import open_cached
from ..wsi.slides import MASK_KINDS, Mask, Slide

#: Side of the blocks of a mask count map (level-0 pixels).
COUNT_BLOCK = 16
#: Mask pixels per worker task (a band of whole block rows): bounds a worker's memory.
BAND_PIXELS = 2**25


def count_map_path(case, kind, cache_root):
    """Where the ``kind`` mask's count map lives, keyed by the mask's content."""
    stamp = key_hash([file_fingerprint(case.mask_path(kind)), COUNT_BLOCK])
    return Path(cache_root) / case.case_id / f"{kind}_counts_b{COUNT_BLOCK}_{stamp}.npy"


def fractions_from_counts(counts, y, xs, footprint):
    """Tumour fractions of square windows (level-0 left edges ``xs``, top ``y``) from a count map."""
    b = COUNT_BLOCK
    band = np.asarray(counts[y // b : (y + footprint) // b]).sum(axis=0, dtype=np.int64)
    cs = np.concatenate([[0], np.cumsum(band)])
    c0 = np.clip(np.asarray(xs) // b, 0, band.size)
    c1 = np.clip((np.asarray(xs) + footprint) // b, 0, band.size)
    return (cs[c1] - cs[c0]) / float(footprint * footprint)


def _count_band_job(args):
    mask_path, slide_path, r0, r1 = args
    return r0, open_cached((mask_path, slide_path), "mask").block_counts(r0, r1, COUNT_BLOCK)


def mask_count_maps(case, cache_root, pool=None, workers=1):
    """The masks' pixel counts per 16 x 16 block, computed once (in parallel) and cached.

    Every scale needs the tumour fraction of its windows (a 64x patch covers 14,336 px a side):
    summing these maps instead of re-reading the full-resolution masks at each scale makes the
    mask cost of a scale fall with the scale. A map is small (two bytes per 256 mask pixels:
    20 MB for a 50,000 px slide). The bands of every mask are one stream of tasks (no wait
    between masks), and each map is streamed to disk band by band as the workers finish them,
    with plain writes (a full disk is an error at the write that hit it, never a SIGBUS), so
    memory holds only the bands in flight. Maps are saved atomically beside the caches, keyed by
    the mask's content.

    Returns:
        ``{kind: .npy path}`` for the masks the case has at level-0 size.
    """
    out, todo = {}, []
    with Slide(case.slide, verify=False) as s:
        for kind in MASK_KINDS:
            mp = case.mask_path(kind)
            if mp is None:
                continue
            with Mask(mp, s.dimensions) as m:
                if m.downsample != 1.0:
                    continue
                h, w = m.height, m.width
            out[kind] = dest = count_map_path(case, kind, cache_root)
            if not dest.exists():
                todo.append((mp, dest, -(-h // COUNT_BLOCK), -(-w // COUNT_BLOCK)))
    if not todo:
        return out
    tasks = []
    for mp, _, nby, nbx in todo:
        step = max(1, (BAND_PIXELS // (nbx * COUNT_BLOCK)) // COUNT_BLOCK)
        tasks += [(str(mp), str(case.slide), r, min(nby, r + step)) for r in range(0, nby, step)]
    jobs = map(_count_band_job, tasks) if pool is None else ordered_map(_count_band_job, tasks, workers, executor=pool)
    with contextlib.ExitStack() as stack:
        files = []
        for _, dest, nby, nbx in todo:
            f = stack.enter_context(open(stack.enter_context(atomic_path(dest, suffix=".npy")), "wb"))
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint16)), "fortran_order": False}
            np.lib.format.write_array_header_1_0(f, {**header, "shape": (nby, nbx)})
            files.append((f, nby))
        k = 0
        for r0, part in jobs:  # in order: each map's bands follow one another in its file
            f, nby = files[k]
            f.write(np.ascontiguousarray(part, np.uint16).data)
            if r0 + len(part) >= nby:
                k += 1
    return out


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
