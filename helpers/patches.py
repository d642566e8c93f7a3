"""Patches: the paper's 224 px grid, background removal, patch labels and patch caches.

The paper (section 3.3) cuts each (scaled) slide into 224 x 224 patches without overlap with
``patchify`` and drops the patches of white glass by an "optimal threshold" per patch. Here the
same grid is cut from the slide one strip of patch rows at a time (``patchify`` on each strip),
so memory stays at a few strips whatever the slide's size, and the strips are shared between
processes. Each patch gets:

- a tissue fraction: Otsu's threshold on the patch's grayscale splits it in two classes; a class
  whose mean is brighter than ``glass_level`` is glass (white-glass rule: a patch of bare glass
  has an Otsu threshold too, and then both its classes are bright);
- tumour fractions of its level-0 footprint in the ``whole`` and ``viable`` masks, and a label:
  1 above ``pos_threshold``, 0 at or below ``neg_threshold``, -1 (ambiguous) between.

Kept patches go to a cache per slide and scale (uint8 arrays plus a table), written atomically
and keyed by every parameter that changes its content. Used by notebook 02 (and 03-05 load the
caches).
"""

import errno
import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from patchify import patchify

from .atomic import atomic_dir, remove_stale_temporaries
from .errors import InputError, check_fraction, check_positive, check_type
from .progress import progress_bar
from .slides import MASK_KINDS, Mask, Slide

#: Bump when extraction changes in a way that changes a cache's content.
EXTRACTOR_VERSION = 3

#: Side of the blocks of a mask count map (level-0 pixels); see :func:`mask_count_map`.
COUNT_BLOCK = 16

TABLE_COLUMNS = ["case_id", "scale", "row", "col", "x", "y", "footprint", "tissue_frac",
                 "otsu", "kept", "whole_frac", "viable_frac", "label", "index"]


@dataclass
class ExtractionParams:
    """Every parameter that decides a patch cache's content (its hash names the cache).

    Attributes:
        patch_size: patch side in pixels at the patch's scale (paper: 224).
        stride: grid step in pixels at the scale; ``patch_size`` = no overlap (paper).
        tissue_threshold: keep a patch when at least this fraction of it is tissue.
        glass_level: an Otsu class brighter than this gray level (0-255) counts as glass.
        tissue_subsample: the tissue test looks at every n-th pixel (in both directions).
        label_mask: ``whole`` or ``viable``: which PAIP mask counts as tumour for labels.
        pos_threshold: label 1 when the tumour fraction is at least this.
        neg_threshold: label 0 when the tumour fraction is at most this; between: -1.
        store_masks: at scale 1, also cache each patch's ``label_mask`` (for segmentation).
    """

    patch_size: int = 224
    stride: int = 224
    tissue_threshold: float = 0.5
    glass_level: int = 210
    tissue_subsample: int = 4
    label_mask: str = "viable"
    pos_threshold: float = 0.5
    neg_threshold: float = 0.05
    store_masks: bool = True

    def validate(self):
        """Raise :class:`InputError` naming the first bad parameter; return self."""
        check_positive("patch_size", self.patch_size, integer=True)
        check_positive("stride", self.stride, integer=True)
        check_fraction("tissue_threshold", self.tissue_threshold)
        check_type("glass_level", self.glass_level, int, "an integer gray level 0-255")
        if not 0 < self.glass_level < 255:
            raise InputError(f"parameter 'glass_level' must lie between 1 and 254, got {self.glass_level}")
        check_positive("tissue_subsample", self.tissue_subsample, integer=True)
        if self.patch_size % self.tissue_subsample:
            raise InputError(f"parameter 'tissue_subsample' ({self.tissue_subsample}) must divide "
                             f"patch_size ({self.patch_size})")
        if self.label_mask not in MASK_KINDS:
            raise InputError(f"parameter 'label_mask' must be one of {MASK_KINDS}, got {self.label_mask!r}")
        check_fraction("pos_threshold", self.pos_threshold)
        check_fraction("neg_threshold", self.neg_threshold)
        if self.neg_threshold >= self.pos_threshold:
            raise InputError(f"parameter 'neg_threshold' ({self.neg_threshold}) must be below "
                             f"'pos_threshold' ({self.pos_threshold})")
        check_type("store_masks", self.store_masks, bool)
        return self


def check_scales(scales):
    """Validate a list of downscale factors (paper: ``[4, 16, 64]``; 1 for segmentation).

    Returns:
        The scales as a list of ints.
    """
    if isinstance(scales, (int, float)) and not isinstance(scales, bool):
        scales = [scales]
    if not isinstance(scales, (list, tuple)) or not scales:
        raise InputError(f"parameter 'scales' must be a list of downscale factors like [4, 16, 64], got {scales!r}")
    out = []
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or s < 1 or float(s) != int(s):
            raise InputError(f"parameter 'scales': {s!r} is not a whole downscale factor >= 1 (e.g. 1, 4, 16, 64)")
        out.append(int(s))
    return out


# ---------------------------------------------------------------------------------------------
# Tissue detection: per-patch Otsu with the white-glass rule, vectorised over many patches
# ---------------------------------------------------------------------------------------------

def to_gray(rgb):
    """Luma (ITU-R BT.601 weights) of an RGB uint8 array, as uint8, with integer arithmetic."""
    rgb = np.asarray(rgb)
    g = rgb[..., 0].astype(np.uint16) * 77 + rgb[..., 1].astype(np.uint16) * 150 + rgb[..., 2].astype(np.uint16) * 29
    return (g >> 8).astype(np.uint8)


def otsu_thresholds(hist):
    """Otsu's threshold of each row of a ``(n, 256)`` histogram.

    Pixels at or below the threshold form the dark class (the same convention as
    ``skimage.filters.threshold_otsu``, which keeps pixels *above* it as foreground).

    Returns:
        ``(threshold, dark_fraction, dark_mean, bright_mean)``, each of length ``n``.
    """
    hist = np.asarray(hist, dtype=np.float64)
    n = hist.sum(axis=1, keepdims=True)
    p = hist / np.maximum(n, 1)
    levels = np.arange(256, dtype=np.float64)
    omega = np.cumsum(p, axis=1)
    mu = np.cumsum(p * levels, axis=1)
    mu_t = mu[:, -1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_t * omega - mu) ** 2 / (omega * (1 - omega))
    between = np.nan_to_num(between, nan=-1.0, posinf=-1.0)
    t = between.argmax(axis=1)
    rows = np.arange(hist.shape[0])
    w0 = omega[rows, t]
    m_t = mu_t[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        m0 = np.where(w0 > 0, mu[rows, t] / w0, m_t)
        m1 = np.where(w0 < 1, (m_t - mu[rows, t]) / (1 - w0), m_t)
    # A uniform patch has no split: its single class is both "dark" and "bright".
    uniform = between.max(axis=1) <= 0
    t = np.where(uniform, m_t, t)
    w0 = np.where(uniform, 1.0, w0)
    m0 = np.where(uniform, m_t, m0)
    m1 = np.where(uniform, m_t, m1)
    return t.astype(np.float64), w0, m0, m1


def tissue_fractions(gray_patches, glass_level=210):
    """Tissue fraction of each grayscale patch: per-patch Otsu plus the white-glass rule.

    - both Otsu classes brighter than ``glass_level``: bare glass, fraction 0;
    - only the bright class is glass: the dark class is tissue, fraction = its share;
    - neither class is glass (a patch full of tissue): fraction = share darker than glass.

    Args:
        gray_patches: ``(n, h, w)`` uint8 patches (often subsampled).
        glass_level: gray level above which a class mean counts as glass.

    Returns:
        ``(fractions, thresholds)``, float arrays of length ``n``.
    """
    g = np.asarray(gray_patches)
    n = g.shape[0]
    if n == 0:
        return np.zeros(0), np.zeros(0)
    flat = g.reshape(n, -1)
    idx = (np.arange(n, dtype=np.int64)[:, None] * 256 + flat).ravel()
    hist = np.bincount(idx, minlength=n * 256).reshape(n, 256)
    t, w0, m0, m1 = otsu_thresholds(hist)
    below_glass = np.cumsum(hist, axis=1)[:, glass_level] / flat.shape[1]
    frac = np.where(m0 >= glass_level, 0.0, np.where(m1 >= glass_level, w0, below_glass))
    return frac, t


# ---------------------------------------------------------------------------------------------
# The grid and one strip
# ---------------------------------------------------------------------------------------------

def grid_shape(dimensions, scale, patch_size=224, stride=224):
    """Rows and columns of the patch grid of a slide at a scale.

    Args:
        dimensions: the slide's level-0 ``(width, height)``.
        scale: downscale factor (1, 4, 16, 64, ...).

    Returns:
        ``(rows, cols)``; zero when no whole patch fits.
    """
    W, H = dimensions
    ws, hs = int(W // scale), int(H // scale)
    if ws < patch_size or hs < patch_size:
        return 0, 0
    return (hs - patch_size) // stride + 1, (ws - patch_size) // stride + 1


_WORKER_SLIDES = {}
_WORKER_PID = [os.getpid()]


def _forget_open_files():
    """Drop handles inherited from another process (a forked worker must open its own files:
    shared file positions would interleave reads) without closing the parent's."""
    _WORKER_SLIDES.clear()
    _WORKER_PID[0] = os.getpid()


def _close_open_files():
    for v in _WORKER_SLIDES.values():
        v.close()
    _WORKER_SLIDES.clear()


def _open_cached(path, kind):
    """Open a slide or mask once per process; reopened when the file on disk has changed."""
    if _WORKER_PID[0] != os.getpid():
        _forget_open_files()
    f = Path(path[0] if isinstance(path, tuple) else path)
    try:
        st = f.stat()
    except FileNotFoundError:
        raise InputError(f"{f}: no such file (was it moved or deleted during the run?)") from None
    key = (kind, str(path), st.st_size, st.st_mtime_ns)
    obj = _WORKER_SLIDES.get(key)
    if obj is None:
        if len(_WORKER_SLIDES) > 8:
            _close_open_files()
        if kind == "slide":
            obj = Slide(path, verify=False)  # verified once by the caller
        else:
            dims = _open_cached(path[1], "slide").dimensions
            obj = Mask(path[0], dims)
        _WORKER_SLIDES[key] = obj
    return obj


#: At most this many grid rows per worker task (neighbouring rows share tile rows, so one
#: taller read decodes each tile once) ...
ROWS_PER_TASK_MAX = 8
#: ... and at most this many scaled pixels per task (bounds a worker's memory).
TASK_PIXELS = 2 ** 25


def rows_per_task(width, params):
    """Grid rows per worker task for a level ``width`` px wide (at the patch's scale)."""
    per_row = max(1, width * params.stride)
    return int(max(1, min(ROWS_PER_TASK_MAX, TASK_PIXELS // per_row)))


def extract_rows(slide_path, scale, r0, r1, params, whole_path=None, viable_path=None, count_maps=None,
                 part_dir=None):
    """Cut grid rows ``r0`` to ``r1 - 1``: read them as one strip, then for each row patchify,
    test tissue, measure tumour.

    Tumour fractions come from the mask's block count map where one is given and the windows
    align with its blocks (a 16x16 block is one value to sum instead of 256 mask pixels), else
    from the level-0 mask band. At scale 1 the band of ``label_mask`` is also read for the
    stored mask patches.

    With ``part_dir``, the kept patches (and masks) of all the rows are written to a part file
    there instead of being returned: a worker then hands back only the small per-row arrays,
    and the main process splices the part files into the cache without copying them through
    its own memory.

    Returns:
        A list with, per row, a dict: ``row``, ``tissue_frac``, ``otsu``, ``kept`` (mask),
        ``whole_frac`` and ``viable_frac`` (NaN without masks), the kept ``patches`` (uint8,
        n x P x P x 3) and, with ``store_masks`` at scale 1, their ``masks`` (n x P x P); with
        ``part_dir``, instead of those two, the first row's dict names the ``part`` files.
    """
    p = params if isinstance(params, ExtractionParams) else ExtractionParams(**params)
    slide = _open_cached(slide_path, "slide")
    P, S, k = p.patch_size, p.stride, p.tissue_subsample
    rows, cols = grid_shape(slide.dimensions, scale, P, S)
    width = (cols - 1) * S + P
    big = slide.read_region(0, r0 * S * scale, width, (r1 - r0 - 1) * S + P, downsample=scale)
    xs = np.arange(cols) * S * scale
    footprint = P * scale
    results = []
    for row in range(r0, r1):
        y = row * S * scale
        strip = big[(row - r0) * S:(row - r0) * S + P]
        patches = patchify(strip, (P, P, 3), step=S)[0, :, 0]           # (cols, P, P, 3) view
        gray = to_gray(strip[::k, ::k])
        gp = patchify(gray, (P // k, P // k), step=S // k if S % k == 0 else max(1, S // k))[0]
        if gp.shape[0] != cols:  # a stride that the subsample does not divide: cut exactly
            gp = np.stack([gray[:, (c * S) // k:(c * S) // k + P // k] for c in range(cols)])
        frac, otsu = tissue_fractions(gp, p.glass_level)
        kept = frac >= p.tissue_threshold
        out = {"row": row, "tissue_frac": frac, "otsu": otsu, "kept": kept,
               "patches": np.ascontiguousarray(patches[kept])}
        for kind, mp in (("whole", whole_path), ("viable", viable_path)):
            if mp is None:
                out[f"{kind}_frac"] = np.full(cols, np.nan)
                continue
            cmap = (count_maps or {}).get(kind)
            mask = None
            if cmap is not None and (S * scale) % COUNT_BLOCK == 0 and footprint % COUNT_BLOCK == 0:
                out[f"{kind}_frac"] = _fractions_from_counts(cmap, y, xs, footprint)
            else:
                mask = _open_cached((mp, slide_path), "mask")
                out[f"{kind}_frac"] = mask.window_fractions(y, xs, footprint)
            if p.store_masks and kind == p.label_mask and scale == 1:
                mask = mask or _open_cached((mp, slide_path), "mask")
                mstrip = mask.read(0, y, width, P, downsample=scale)
                out["masks"] = np.ascontiguousarray(patchify(mstrip, (P, P), step=S)[0][kept])
        results.append(out)
    if part_dir is not None:
        base = Path(part_dir) / f"part-{r0:07d}"
        with open(f"{base}.u8", "wb") as f:
            for out in results:
                f.write(out.pop("patches").data)
        if any("masks" in out for out in results):
            with open(f"{base}.m.u8", "wb") as f:
                for out in results:
                    if "masks" in out:
                        f.write(out.pop("masks").data)
        results[0]["part"] = str(base)
    return results


def _splice(dst, src_path):
    """Append a file to an open file (in the kernel where the platform allows), then delete it."""
    with open(src_path, "rb") as src:
        n = os.fstat(src.fileno()).st_size
        dst.flush()
        done = 0
        try:
            while done < n:
                k = os.copy_file_range(src.fileno(), dst.fileno(), n - done)
                if k == 0:
                    break
                done += k
        except (AttributeError, OSError):
            src.seek(done)
            import shutil

            shutil.copyfileobj(src, dst, 16 << 20)
            done = n
        if done < n:
            src.seek(done)
            import shutil

            shutil.copyfileobj(src, dst, 16 << 20)
    os.remove(src_path)


def _portable_errors(fn, args):
    """Run ``fn(*args)`` in a worker; re-raise anything as an exception that survives pickling
    (an unpicklable one would leave the parent waiting forever)."""
    try:
        return fn(*args)
    except InputError:
        raise
    except Exception as exc:
        raise RuntimeError(f"{type(exc).__name__}: {exc}") from None


def _extract_row_job(args):
    return _portable_errors(extract_rows, args)


def _fractions_from_counts(cmap_path, y, xs, footprint):
    key = ("counts", str(cmap_path))
    m = _WORKER_SLIDES.get(key)
    if m is None:
        m = _WORKER_SLIDES[key] = _CountMap(cmap_path)
    b = COUNT_BLOCK
    band = np.asarray(m.counts[y // b:(y + footprint) // b]).sum(axis=0, dtype=np.int64)
    cs = np.concatenate([[0], np.cumsum(band)])
    c0 = np.clip(np.asarray(xs) // b, 0, band.size)
    c1 = np.clip((np.asarray(xs) + footprint) // b, 0, band.size)
    return (cs[c1] - cs[c0]) / float(footprint * footprint)


class _CountMap:
    def __init__(self, path):
        self.counts = np.load(path, mmap_mode="r")

    def close(self):
        self.counts = None


def _count_band(mask_path, slide_path, r0, r1):
    return r0, _open_cached((mask_path, slide_path), "mask").block_counts(r0, r1, COUNT_BLOCK)


def _count_band_job(args):
    return _portable_errors(_count_band, args)


def mask_count_map(case, kind, cache_root, pool):
    """The mask's pixel counts per 16 x 16 block, computed once (in parallel) and cached.

    Every scale needs the tumour fraction of its windows (a 64x patch covers 14,336 px a side):
    summing this map instead of re-reading the full-resolution mask at each scale makes the
    mask cost of a scale fall with the scale, like the cost of reading the image does. Kept
    beside the patch caches, keyed by the mask file; only for level-0 masks.

    Returns:
        The ``.npy`` path, or ``None`` when the case has no such mask or it is not level-0 size.
    """
    mp = case.mask_path(kind)
    if mp is None:
        return None
    with Slide(case.slide, verify=False) as s, Mask(mp, s.dimensions) as m:
        if m.downsample != 1.0:
            return None
        h, w = m.height, m.width
    stamp = hashlib.sha256(json.dumps([_file_stamp(mp), COUNT_BLOCK, EXTRACTOR_VERSION]).encode()).hexdigest()[:12]
    dest = Path(cache_root) / case.case_id / f"{kind}_counts_b{COUNT_BLOCK}_{stamp}.npy"
    if dest.exists():
        return dest
    from .atomic import atomic_path

    nby, nbx = -(-h // COUNT_BLOCK), -(-w // COUNT_BLOCK)
    step = max(1, (2 ** 25 // max(1, w)) // COUNT_BLOCK)
    tasks = [(str(mp), str(case.slide), r, min(nby, r + step)) for r in range(0, nby, step)]
    with atomic_path(dest, suffix=".npy") as tmp:
        arr = np.lib.format.open_memmap(tmp, "w+", np.uint16, (nby, nbx))
        for r0, part in pool.map(_count_band_job, tasks):
            arr[r0:r0 + part.shape[0]] = part
        arr.flush()
        del arr
    return dest


# ---------------------------------------------------------------------------------------------
# Caches
# ---------------------------------------------------------------------------------------------

def _file_stamp(path):
    if path is None:
        return None
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(case, scale, params):
    """The cache's identity: the files it came from, the scale and every parameter."""
    return {"extractor_version": EXTRACTOR_VERSION, "case_id": case.case_id, "scale": int(scale),
            "slide": _file_stamp(case.slide), "whole": _file_stamp(case.whole),
            "viable": _file_stamp(case.viable), "params": asdict(params)}


def cache_folder(cache_root, case, scale, params):
    """``<cache_root>/<case>/x<scale>_<hash>``: the hash covers :func:`cache_key`."""
    key = cache_key(case, scale, params)
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_root) / case.case_id / f"x{int(scale)}_{h}", key


@dataclass
class PatchSet:
    """A loaded patch cache.

    Attributes:
        folder: where it lives.
        meta: the cache's key and summary (``meta.json``).
        table: one row per grid position (kept or not), see :data:`TABLE_COLUMNS`.
        patches: ``(n_kept, P, P, 3)`` uint8, memory-mapped (row ``i`` is ``table.index == i``).
        masks: ``(n_kept, P, P)`` uint8 0/1, memory-mapped, or ``None``.
    """

    folder: Path
    meta: dict
    table: pd.DataFrame
    patches: np.ndarray
    masks: np.ndarray = None

    @property
    def kept(self):
        """The table's rows of kept (tissue) patches, in the order of :attr:`patches`."""
        return self.table[self.table["kept"]].sort_values("index")


def load_patch_set(folder):
    """Load a patch cache written by :func:`extract_slide` (arrays memory-mapped)."""
    folder = Path(folder)
    mf = folder / "meta.json"
    if not mf.exists():
        raise InputError(f"{folder}: not a patch cache (no meta.json); run notebook 02 to extract patches")
    meta = json.loads(mf.read_text())
    table = pd.read_csv(folder / "table.csv")
    table["kept"] = table["kept"].astype(bool)
    n, P = meta["n_kept"], meta["key"]["params"]["patch_size"]
    patches = (np.memmap(folder / "patches.u8", np.uint8, "r", shape=(n, P, P, 3)) if n
               else np.zeros((0, P, P, 3), np.uint8))
    masks = None
    if (folder / "masks.u8").exists():
        masks = (np.memmap(folder / "masks.u8", np.uint8, "r", shape=(n, P, P)) if n
                 else np.zeros((0, P, P), np.uint8))
    return PatchSet(folder, meta, table, patches, masks)


class _OrderedPool:
    """Map over tasks in order with at most ``window`` results in flight (bounded memory)."""

    def __init__(self, workers):
        self.workers = workers
        self.pool = None
        if workers > 1:
            import multiprocessing as mp

            # fork where the platform has it: no re-import of the caller's script (notebooks,
            # scripts without a __main__ guard); spawn elsewhere.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self.pool = mp.get_context(method).Pool(workers, initializer=_forget_open_files)

    def map(self, fn, tasks, window=None):
        if self.pool is None:
            for t in tasks:
                yield fn(t)
            return
        window = window or self.workers + 1
        pending = []
        it = iter(tasks)
        for t in it:
            pending.append(self.pool.apply_async(fn, (t,)))
            if len(pending) >= window:
                yield pending.pop(0).get()
        while pending:
            yield pending.pop(0).get()

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def extract_slide(case, scale, cache_root, params=None, pool=None, progress=None, workers=1):
    """Extract (or load from the cache) the patches of one slide at one scale.

    Args:
        case: a :class:`helpers.slides.Case`.
        scale: downscale factor (1, 4, 16, 64, ...).
        cache_root: the folder holding patch caches.
        params: :class:`ExtractionParams` (defaults: the paper's).
        pool: a shared worker pool (see :func:`extract_dataset`); else ``workers`` are started.
        progress: a tqdm bar to advance by one per grid row, or ``None``.
        workers: processes to use when no pool is given.

    Returns:
        ``(patch_set, from_cache)``.
    """
    params = (params or ExtractionParams()).validate()
    scale = check_scales([scale])[0]
    for p in (case.slide, case.whole, case.viable):
        if p is not None and not Path(p).exists():
            raise InputError(f"{p}: no such file (case {case.case_id}); check the dataset folder")
    folder, key = cache_folder(cache_root, case, scale, params)
    if (folder / "meta.json").exists():
        ps = load_patch_set(folder)
        if progress is not None:
            progress.update(ps.meta["grid_rows"])
        return ps, True
    remove_stale_temporaries(folder.parent)
    with Slide(case.slide) as slide:
        dims = slide.dimensions
        for kind in MASK_KINDS:  # open once here so that a bad mask fails before any work
            mp = case.mask_path(kind)
            if mp is not None:
                Mask(mp, dims).close()
    rows, cols = grid_shape(dims, scale, params.patch_size, params.stride)
    P = params.patch_size
    step = rows_per_task((cols - 1) * params.stride + P, params) if cols else 1
    own_pool = None
    if pool is None:
        # A job of a few tasks (a coarse scale, a small slide) is done sooner in this process
        # than by starting workers.
        n_tasks = -(-rows // step) if rows else 0
        pool = own_pool = _OrderedPool(workers if n_tasks >= 2 * workers else 1)
    t0 = time.perf_counter()
    try:
        with atomic_dir(folder) as tmp:
            cols_out = {k: [] for k in ("row", "col", "tissue_frac", "otsu", "kept", "whole_frac",
                                        "viable_frac", "index")}
            n_kept = 0
            store = params.store_masks and scale == 1 and case.mask_path(params.label_mask) is not None
            with open(tmp / "patches.u8", "wb") as fp, \
                    (open(tmp / "masks.u8", "wb") if store else open(os.devnull, "wb")) as fm:
                cmaps = {}
                if rows:
                    for kind in MASK_KINDS:
                        cm = mask_count_map(case, kind, cache_root, pool)
                        if cm is not None:
                            cmaps[kind] = str(cm)
                tasks = [(str(case.slide), scale, r, min(rows, r + step), asdict(params),
                          None if case.whole is None else str(case.whole),
                          None if case.viable is None else str(case.viable), cmaps, str(tmp))
                         for r in range(0, rows, step)]
                for batch in pool.map(_extract_row_job, tasks):
                    part = batch[0].get("part")
                    if part is not None:
                        fp.seek(0, os.SEEK_END)
                        _splice(fp, part + ".u8")
                        if Path(part + ".m.u8").exists():
                            if store:
                                fm.seek(0, os.SEEK_END)
                                _splice(fm, part + ".m.u8")
                            else:
                                os.remove(part + ".m.u8")
                    for res in batch:
                        kept = res["kept"]
                        index = np.full(cols, -1, np.int64)
                        index[kept] = np.arange(n_kept, n_kept + int(kept.sum()))
                        n_kept += int(kept.sum())
                        if part is None:
                            fp.write(res["patches"].data)
                            if store:
                                fm.write(res["masks"].data)
                        cols_out["row"].append(np.full(cols, res["row"]))
                        cols_out["col"].append(np.arange(cols))
                        for name in ("tissue_frac", "otsu", "kept", "whole_frac", "viable_frac"):
                            cols_out[name].append(res[name])
                        cols_out["index"].append(index)
                        if progress is not None:
                            progress.update(1)
            if not store:
                (tmp / "masks.u8").unlink(missing_ok=True)
            table = pd.DataFrame({k: (np.concatenate(v) if v else np.zeros(0)) for k, v in cols_out.items()})
            for name in ("tissue_frac", "whole_frac", "viable_frac"):
                table[name] = table[name].round(4)
            table = finish_table(table, case.case_id, scale, params)
            table[TABLE_COLUMNS].to_csv(tmp / "table.csv", index=False)
            kept_t = table[table["kept"]]
            meta = {"key": key, "grid_rows": rows, "grid_cols": cols, "n_grid": int(len(table)),
                    "n_kept": n_kept, "n_pos": int((kept_t["label"] == 1).sum()),
                    "n_neg": int((kept_t["label"] == 0).sum()),
                    "n_ambiguous": int((kept_t["label"] == -1).sum()),
                    "seconds": round(time.perf_counter() - t0, 2)}
            with open(tmp / "meta.json", "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        # atomic_dir has removed the partial cache by now: nothing half-written is left.
        raise InputError(
            f"the disk holding {Path(cache_root)} filled up while writing the {scale}x patches of "
            f"{case.case_id} (up to {cache_bytes_estimate([dims], [scale], params) / 1e9:.1f} GB for this slide); its "
            "partial cache was removed, the caches of other slides are kept. Free space, or put the run "
            "on a larger disk, then rerun: the caches already written are reused") from None
    finally:
        if own_pool is not None:
            own_pool.close()
    return load_patch_set(folder), False


def patch_bytes(params, scale):
    """Cache bytes per kept patch: the RGB patch, plus its mask at 1x when masks are stored."""
    P = params.patch_size
    return P * P * 3 + (P * P if params.store_masks and scale == 1 else 0)


def cache_bytes_estimate(dims, scales, params, tissue_share=1.0):
    """Bytes the patch caches of slides of level-0 ``dims`` take at ``scales``.

    With ``tissue_share`` 1 every grid position counts (the most a cache can take); real slides
    keep a share of them (about half on the demo slides).
    """
    total = 0
    for d in dims:
        for sc in scales:
            rows, cols = grid_shape(d, sc, params.patch_size, params.stride)
            total += rows * cols * patch_bytes(params, sc)
    return int(total * tissue_share)


def finish_table(table, case_id, scale, params):
    """Add level-0 coordinates, footprint and labels to a table of grid rows and columns."""
    S, P = params.stride, params.patch_size
    table = table.copy()
    table["case_id"] = case_id
    table["scale"] = int(scale)
    table["row"] = table["row"].astype(int)
    table["col"] = table["col"].astype(int)
    table["x"] = table["col"] * S * scale
    table["y"] = table["row"] * S * scale
    table["footprint"] = P * scale
    table["kept"] = table["kept"].astype(bool)
    table["label"] = label_patches(table[f"{params.label_mask}_frac"], params.pos_threshold, params.neg_threshold)
    return table


def label_patches(tumor_frac, pos_threshold=0.5, neg_threshold=0.05):
    """Patch labels from tumour fractions: 1 (tumour), 0 (non-tumour), -1 (ambiguous or unknown).

    Args:
        tumor_frac: fractions of each patch's footprint inside the tumour mask (NaN = no mask).
        pos_threshold: 1 when the fraction is at least this.
        neg_threshold: 0 when the fraction is at most this.
    """
    f = np.asarray(tumor_frac, dtype=np.float64)
    lab = np.full(f.shape, -1, np.int64)
    lab[f >= pos_threshold] = 1
    lab[f <= neg_threshold] = 0
    return lab


def extract_dataset(cases, scales, cache_root, params=None, workers=None, progress=True):
    """Extract every case at every scale, sharing one pool of worker processes.

    Slides without tissue, or too small for a patch at some scale, are not errors: they are
    warned about and counted in the summary.

    Args:
        cases: :class:`helpers.slides.Case` objects.
        scales: downscale factors, e.g. ``[1, 4, 16, 64]``.
        cache_root: the folder for patch caches.
        params: :class:`ExtractionParams`.
        workers: processes (default: the machine's cores).
        progress: show one progress bar over all grid rows (stderr).

    Returns:
        ``(summary, sets)``: a DataFrame with one row per case and scale (grid size, kept,
        positive, negative, ambiguous, seconds, from_cache) and ``{(case_id, scale): PatchSet}``.
    """
    params = (params or ExtractionParams()).validate()
    scales = check_scales(scales)
    if not cases:
        raise InputError("no cases to extract: the dataset folder is empty")
    workers = workers or os.cpu_count() or 1
    check_positive("workers", workers, integer=True)
    total = 0
    dims = {}
    for c in cases:
        with Slide(c.slide, verify=False) as s:  # extract_slide verifies each slide
            dims[c.case_id] = s.dimensions
        for sc in scales:
            total += grid_shape(dims[c.case_id], sc, params.patch_size, params.stride)[0]
    todo = [(dims[c.case_id], sc) for c in cases for sc in scales
            if not (cache_folder(cache_root, c, sc, params)[0] / "meta.json").exists()]
    need = sum(cache_bytes_estimate([d], [sc], params) for d, sc in todo)
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache_root).free
    if need > free:
        warnings.warn(f"{len(todo)} patch caches to write into {cache_root} may take up to {need / 1e9:.1f} GB "
                      f"(every grid position kept; tissue is usually a third to a half of it) and the disk has "
                      f"{free / 1e9:.1f} GB free. If it fills up, extraction stops with a clear error and a rerun "
                      "resumes after freeing space", stacklevel=2)
    bar = progress_bar(total, "patch rows", "row", progress)
    pool = _OrderedPool(workers)
    rows, sets = [], {}
    try:
        for c in cases:
            for sc in scales:
                ps, cached = extract_slide(c, sc, cache_root, params, pool=pool, progress=bar)
                sets[(c.case_id, sc)] = ps
                m = ps.meta
                rows.append({"case_id": c.case_id, "scale": sc, "grid": m["n_grid"], "kept": m["n_kept"],
                             "pos": m["n_pos"], "neg": m["n_neg"], "ambiguous": m["n_ambiguous"],
                             "seconds": m["seconds"], "from_cache": cached})
    finally:
        pool.close()
        bar.close()
    summary = pd.DataFrame(rows)
    none_fit = summary[summary["grid"] == 0]
    if len(none_fit):
        warnings.warn(f"{len(none_fit)} (slide, scale) pairs fit no {params.patch_size} px patch: "
                      + ", ".join(f"{r.case_id}@{r.scale}x" for r in none_fit.itertuples())
                      + "; they are skipped", stacklevel=2)
    no_tissue = summary[(summary["grid"] > 0) & (summary["kept"] == 0)]
    if len(no_tissue):
        warnings.warn(f"{len(no_tissue)} (slide, scale) pairs have no tissue patch: "
                      + ", ".join(f"{r.case_id}@{r.scale}x" for r in no_tissue.itertuples())
                      + "; they are skipped", stacklevel=2)
    return summary, sets


# ---------------------------------------------------------------------------------------------
# The run's extraction record: how notebooks 03-05 find the caches notebook 02 wrote
# ---------------------------------------------------------------------------------------------

RECORD_NAME = "extraction.json"


def save_extraction_record(run_folder, data_dir, scales, params):
    """Write ``<run>/extraction.json``: the dataset folder, scales and parameters of the caches.

    Notebook 02 writes it; notebooks 03-05 read it with :func:`load_extraction_record`, so
    the extraction parameters are set in one place and the later notebooks open exactly the
    caches notebook 02 made.
    """
    from .atomic import write_json

    write_json(Path(run_folder) / RECORD_NAME, {"data_dir": str(Path(data_dir).resolve()),
                                                "scales": [int(s) for s in scales],
                                                "params": asdict(params.validate())})


def load_extraction_record(run_folder, data_dir=None):
    """Read ``<run>/extraction.json`` back.

    Args:
        run_folder: the run's folder.
        data_dir: the dataset folder this notebook was given; an error when it is not the one
            the caches were made from.

    Returns:
        ``(data_dir, scales, params)``: a Path, a list of ints and an :class:`ExtractionParams`.

    Raises:
        InputError: no record (run notebook 02 first) or another dataset folder.
    """
    path = Path(run_folder) / RECORD_NAME
    if not path.exists():
        raise InputError(f"{path}: not found; run notebook 02 (patch extraction) for this run first "
                         f"(python -m helpers.run --only 02 --run-name {Path(run_folder).name})")
    rec = json.loads(path.read_text())
    folder = Path(rec["data_dir"])
    if data_dir is not None and Path(data_dir).resolve() != folder:
        raise InputError(f"run {Path(run_folder).name!r} extracted its patches from {folder}, not "
                         f"{Path(data_dir).resolve()}; use another run_name or rerun notebook 02 with this data_dir")
    return folder, list(rec["scales"]), ExtractionParams(**rec["params"]).validate()
