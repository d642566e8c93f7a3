"""Patch caches: the grid, patch labels, and the cache files notebooks 03-05 read.

- :class:`ExtractionParams`: every parameter that decides a cache's content.
- :func:`grid_shape`: the paper's patch grid at a scale; :func:`label_patches`: tumour (1),
  non-tumour (0) or ambiguous (-1) from a patch's tumour fraction (our reading: the paper does
  not define patch labels).
- A cache per slide and scale, ``<root>/<slide>/x<scale>_<key>/``: ``patches.u8`` (kept patches,
  uint8, memory-mapped on reading), ``masks.bits`` at the segmentation scale (8 mask pixels to a
  byte, unpacked as they are read: :class:`PackedMasks`), ``table.csv`` (one
  row per grid position), ``meta.json`` (its key and counts). The key (:func:`cache_key`)
  holds the content fingerprints of the slide and masks, the scale and every parameter: a
  cache is reused only for exactly those inputs, wherever the project or data folder lives.
- The run's extraction record (``extraction.json``) tells notebooks 03-05 which caches notebook
  02 made.

Used by ``patches`` (extraction), ``segmentation``, ``classification`` and notebooks 02-05.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.atomic import write_json
from ..core.errors import InputError, check_fraction, check_positive, check_type
from ..core.params import MAX_PATCH
from ..core.provenance import file_fingerprint, key_hash
from ..wsi.slides import MASK_KINDS

#: Bump when extraction changes in a way that changes a cache's content.
EXTRACTOR_VERSION = 6  # 6: mask patches stored 8 pixels to a byte (masks.bits)

TABLE_COLUMNS = [
    "case_id",
    "scale",
    "row",
    "col",
    "x",
    "y",
    "footprint",
    "tissue_frac",
    "otsu",
    "kept",
    "whole_frac",
    "viable_frac",
    "label",
    "index",
]


@dataclass
class ExtractionParams:
    """Every parameter that decides a patch cache's content (its hash names the cache).

    Attributes:
        patch_size: patch side in pixels at the patch's scale (paper: 224).
        stride: grid step in pixels at the scale; ``patch_size`` = no overlap (paper).
        tissue_method: ``otsu`` (the paper's per-patch Otsu with the white-glass rule) or
            ``slide`` (one threshold per slide from its thumbnail); see :mod:`helpers.wsi.tissue`.
        tissue_threshold: keep a patch when at least this fraction of it is tissue.
        glass_level: an Otsu class brighter than this gray level (0-255) counts as glass.
        tissue_subsample: the tissue test looks at every n-th pixel (in both directions).
        label_mask: ``whole`` or ``viable``: which PAIP mask counts as tumour for labels.
        pos_threshold: label 1 when the tumour fraction is at least this.
        neg_threshold: label 0 when the tumour fraction is at most this; between: -1.
        mask_scale: the scale whose cache also stores each patch's ``label_mask`` pixels (the
            segmentation scale: 1 in the paper); 0 = none.
        scale_reference: what a scale means: 0 = a downsample of level 0 (the paper's), else a
            downsample of this resolution in um/px, on every slide whatever its scanner (see
            :func:`helpers.wsi.slides.scale_downsample`).
    """

    patch_size: int = 224
    stride: int = 224
    tissue_method: str = "otsu"
    tissue_threshold: float = 0.5
    glass_level: int = 210
    tissue_subsample: int = 4
    label_mask: str = "viable"
    pos_threshold: float = 0.5
    neg_threshold: float = 0.05
    mask_scale: int = 1
    scale_reference: float = 0.0

    @classmethod
    def from_notebook(cls, values):
        """The parameters of notebook 02's ``parameters`` cell (``values``: its ``globals()``),
        validated; ``seg_scale`` there is ``mask_scale`` here."""
        names = [f for f in cls.__dataclass_fields__ if f != "mask_scale"]
        return cls(**{k: values[k] for k in names}, mask_scale=values["seg_scale"]).validate()

    def validate(self):
        """Raise :class:`InputError` naming the first bad parameter; return self."""
        check_positive("patch_size", self.patch_size, integer=True)
        if self.patch_size > MAX_PATCH:
            raise InputError(f"parameter 'patch_size' must be at most {MAX_PATCH} px, got {self.patch_size}")
        check_positive("stride", self.stride, integer=True)
        if self.tissue_method not in ("otsu", "slide"):
            raise InputError(f"parameter 'tissue_method' must be 'otsu' or 'slide', got {self.tissue_method!r}")
        check_fraction("tissue_threshold", self.tissue_threshold)
        check_type("glass_level", self.glass_level, int, "an integer gray level 0-255")
        if not 0 < self.glass_level < 255:
            raise InputError(f"parameter 'glass_level' must lie between 1 and 254, got {self.glass_level}")
        check_positive("tissue_subsample", self.tissue_subsample, integer=True)
        if self.patch_size % self.tissue_subsample:
            raise InputError(
                f"parameter 'tissue_subsample' ({self.tissue_subsample}) must divide patch_size ({self.patch_size})"
            )
        if self.label_mask not in MASK_KINDS:
            raise InputError(f"parameter 'label_mask' must be one of {MASK_KINDS}, got {self.label_mask!r}")
        check_fraction("pos_threshold", self.pos_threshold)
        check_fraction("neg_threshold", self.neg_threshold)
        if self.neg_threshold >= self.pos_threshold:
            raise InputError(
                f"parameter 'neg_threshold' ({self.neg_threshold}) must be below 'pos_threshold' ({self.pos_threshold})"
            )
        check_type("mask_scale", self.mask_scale, int)
        check_type("scale_reference", self.scale_reference, (int, float), "0 or a resolution in um/px like 0.5")
        if not 0 <= self.scale_reference <= 100:
            raise InputError(
                f"parameter 'scale_reference' must be 0 (level-0 downsamples) or a resolution in um/px "
                f"like 0.5, got {self.scale_reference!r}"
            )
        return self

    def key(self):
        """The parameters as a cache key: every field, ``scale_reference`` only when set (so the
        caches of level-0 scales keep the names they had before it existed)."""
        d = asdict(self)
        if not d["scale_reference"]:
            del d["scale_reference"]
        return d


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


def grid_shape(dimensions, scale, patch_size=224, stride=224):
    """Rows and columns of the patch grid of a slide at a scale.

    Args:
        dimensions: the slide's level-0 ``(width, height)``.
        scale: level-0 downsample (1, 4, 16, 64, ...; fractional where a physical scale asks,
            see :func:`helpers.wsi.slides.scale_downsample`).

    Returns:
        ``(rows, cols)``; zero when no whole patch fits.
    """
    W, H = dimensions
    ws, hs = int(W // scale), int(H // scale)
    if ws < patch_size or hs < patch_size:
        return 0, 0
    return (hs - patch_size) // stride + 1, (ws - patch_size) // stride + 1


def too_small_reason(dimensions, scale, patch_size, downsample=None):
    """Why a slide gives no patch at a scale (``None`` when one fits): the true cause, which no
    stride fixes. ``downsample``: the level-0 factor ``scale`` means on the slide (default:
    ``scale``)."""
    W, H = dimensions
    ds = scale if downsample is None else downsample
    if min(W, H) // ds >= patch_size:
        return None
    return (
        f"{W}x{H} px is smaller than one {patch_size} px patch at {scale}x "
        f"({round(patch_size * ds):,} px of the slide a side)"
    )


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


def finish_table(table, case_id, scale, params, downsample=None):
    """Add level-0 coordinates, footprint and labels to a table of grid rows and columns
    (``downsample``: the level-0 factor ``scale`` means on the slide; default ``scale``)."""
    S, P = params.stride, params.patch_size
    ds = scale if downsample is None else downsample
    table = table.copy()
    table["case_id"] = case_id
    table["scale"] = int(scale)
    table["row"] = table["row"].astype(int)
    table["col"] = table["col"].astype(int)
    table["x"] = np.round(table["col"] * S * ds).astype(np.int64)
    table["y"] = np.round(table["row"] * S * ds).astype(np.int64)
    table["footprint"] = round(P * ds)
    table["kept"] = table["kept"].astype(bool)
    table["label"] = label_patches(table[f"{params.label_mask}_frac"], params.pos_threshold, params.neg_threshold)
    return table


def stores_masks(case, scale, params):
    """Whether the cache of ``case`` at ``scale`` holds mask patches (segmentation scale, mask present)."""
    return scale == params.mask_scale and case.mask_path(params.label_mask) is not None


def patch_bytes(params, scale):
    """Cache bytes per kept patch: the RGB patch, plus its mask (packed) at the mask scale."""
    P = params.patch_size
    return P * P * 3 + (P * packed_width(P) if scale == params.mask_scale else 0)


def packed_width(patch_size):
    """Bytes per row of a packed mask patch: 8 pixels to a byte (``np.packbits`` along the row)."""
    return -(-int(patch_size) // 8)


class PackedMasks:
    """A cache's mask patches, stored 8 pixels to a byte, read as ``(n, P, P)`` uint8 0/1.

    A binary mask in a byte per pixel is 8 times the bytes it needs: at the paper's scale that
    made the 1x masks a quarter of a ~235 GB cache (packed: ~184 GB in all), and a quarter of
    what extraction writes. Indexing (an int, a slice, an
    array of rows) reads those rows from the memory-mapped file and unpacks them;
    ``np.asarray`` unpacks all of them.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, bits, patch_size):
        self.bits = bits  # (n, P, packed_width(P)) uint8, memory-mapped
        self.shape = (len(bits), int(patch_size), int(patch_size))

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, idx):
        b, P = np.asarray(self.bits[idx]), self.shape[2]
        if P % 8:  # rows end mid-byte
            return np.unpackbits(b, axis=-1, count=P)
        return np.unpackbits(b.reshape(-1)).reshape(b.shape[:-1] + (P,))  # 3x faster than along an axis

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)

    @staticmethod
    def pack(masks):
        """``(k, P, P)`` 0/1 uint8 -> ``(k, P, packed_width(P))``, as stored."""
        return np.packbits(masks, axis=-1)


def cache_bytes_estimate(dims, scales, params, downsamples=None, tissue_share=1.0):
    """Bytes the patch caches of slides of level-0 ``dims`` take at ``scales``.

    ``downsamples``: per scale, the level-0 factor it means (default: the scales themselves).
    With ``tissue_share`` 1 every grid position counts (the most a cache can take); real slides
    keep a share of them (about half on the demo slides).
    """
    total = 0
    for d in dims:
        for sc, ds in zip(scales, downsamples or scales):
            rows, cols = grid_shape(d, ds, params.patch_size, params.stride)
            total += rows * cols * patch_bytes(params, sc)
    return int(total * tissue_share)


# ---------------------------------------------------------------------------------------------
# Cache keys and folders
# ---------------------------------------------------------------------------------------------


def case_fingerprints(case):
    """Content fingerprints of a case's slide and masks (``None`` for a missing mask)."""
    return {
        "slide": file_fingerprint(case.slide),
        **{k: None if case.mask_path(k) is None else file_fingerprint(case.mask_path(k)) for k in MASK_KINDS},
    }


def cache_key(case, scale, params):
    """The cache's identity: the content of the files it came from, the scale, every parameter."""
    return {
        "extractor_version": EXTRACTOR_VERSION,
        "case_id": case.case_id,
        "scale": int(scale),
        "files": case_fingerprints(case),
        "params": params.key(),
    }


def cache_folder(cache_root, case, scale, params):
    """``(<cache_root>/<case>/x<scale>_<hash>, key)``: the hash covers :func:`cache_key`."""
    key = cache_key(case, scale, params)
    return Path(cache_root) / case.case_id / f"x{int(scale)}_{key_hash(key)}", key


@dataclass
class PatchSet:
    """A loaded patch cache.

    Attributes:
        folder: where it lives.
        meta: the cache's key and summary (``meta.json``).
        table: one row per grid position (kept or not), see :data:`TABLE_COLUMNS`.
        patches: ``(n_kept, P, P, 3)`` uint8, memory-mapped (row ``i`` is ``table.index == i``).
        masks: ``(n_kept, P, P)`` uint8 0/1 (:class:`PackedMasks`: unpacked as read), or ``None``.
    """

    folder: Path
    meta: dict
    table: pd.DataFrame
    patches: np.ndarray
    masks: PackedMasks = None

    @property
    def kept(self):
        """The table's rows of kept (tissue) patches, in the order of :attr:`patches`."""
        return self.table[self.table["kept"]].sort_values("index")

    @property
    def key(self):
        """The hash of the cache's key (what a downstream result records as its input)."""
        return key_hash(self.meta["key"])


def load_patch_set(folder):
    """Load a patch cache written by :func:`helpers.patching.patches.extract_slide` (arrays memory-mapped)."""
    folder = Path(folder)
    mf = folder / "meta.json"
    if not mf.exists():
        raise InputError(f"{folder}: not a patch cache (no meta.json); run notebook 02 to extract patches")
    meta = json.loads(mf.read_text())
    table = pd.read_csv(folder / "table.csv")
    table["kept"] = table["kept"].astype(bool)
    n, P = meta["n_kept"], meta["key"]["params"]["patch_size"]
    patches = (
        np.memmap(folder / "patches.u8", np.uint8, "r", shape=(n, P, P, 3)) if n else np.zeros((0, P, P, 3), np.uint8)
    )
    masks = None
    if (folder / "masks.bits").exists():
        shape = (n, P, packed_width(P))
        bits = np.memmap(folder / "masks.bits", np.uint8, "r", shape=shape) if n else np.zeros(shape, np.uint8)
        masks = PackedMasks(bits, P)
    return PatchSet(folder, meta, table, patches, masks)


def open_cache(cache_root, case, scale, params, fix):
    """The :class:`PatchSet` of ``case``'s finished cache at ``scale``, or one
    :class:`InputError` naming the case, the folder and ``fix`` (how to make it)."""
    folder, _ = cache_folder(cache_root, case, scale, params)
    if not (folder / "meta.json").exists():
        raise InputError(f"no {scale}x patch cache for {case.case_id} at {folder}: {fix}")
    return load_patch_set(folder)


def cache_keys(cases, scale, cache_root, params):
    """``{case_id: cache hash}`` of existing caches of ``cases`` at ``scale`` (what a model trained
    on them, or predictions made from them, record as their data)."""
    out = {}
    for c in cases:
        folder, key = cache_folder(cache_root, c, scale, params)
        out[c.case_id] = key_hash(key) if (folder / "meta.json").exists() else None
    return out


# ---------------------------------------------------------------------------------------------
# The run's extraction record: how notebooks 03-05 find the caches notebook 02 wrote
# ---------------------------------------------------------------------------------------------

RECORD_NAME = "extraction.json"


def save_extraction_record(run_folder, data_dir, scales, params, cases):
    """Write ``<run>/extraction.json``: the dataset, scales, parameters and cache keys.

    Notebook 02 writes it; notebooks 03-05 read it with :func:`load_extraction_record`, so the
    extraction parameters are set in one place and the later notebooks open exactly the caches
    notebook 02 made. The record's ``key`` covers every cache (their content keys): a later
    result computed from these caches records it.
    """
    caches = {sc: cache_keys(cases, sc, Path(run_folder) / "patches", params) for sc in scales}
    record = {
        "data_dir": str(Path(data_dir).resolve()),
        "scales": [int(s) for s in scales],
        "params": asdict(params.validate()),
        "caches": {str(sc): v for sc, v in caches.items()},
    }
    record["key"] = key_hash({"scales": record["scales"], "params": params.key(), "caches": record["caches"]})
    write_json(Path(run_folder) / RECORD_NAME, record)
    return record


def load_extraction_record(run_folder, data_dir=None):
    """Read ``<run>/extraction.json`` back.

    Args:
        run_folder: the run's folder.
        data_dir: the dataset folder this notebook was given; an error when its slides are not
            the ones the caches were made from (the same files in another folder are fine).

    Returns:
        A dict: ``data_dir`` (a Path), ``scales`` (ints), ``params`` (an
        :class:`ExtractionParams`), ``caches`` (``{scale: {case: hash}}``) and ``key``.

    Raises:
        InputError: no record (run notebook 02 first) or another dataset.
    """
    path = Path(run_folder) / RECORD_NAME
    if not path.exists():
        raise InputError(
            f"{path}: not found; run notebook 02 (patch extraction) for this run first "
            f"(python -m helpers.run --only 02 --run-name {Path(run_folder).name})"
        )
    rec = json.loads(path.read_text())
    if "key" not in rec:
        raise InputError(f"{path} was written by an older version of notebook 02; rerun notebook 02")
    folder = Path(rec["data_dir"])
    if data_dir is not None and Path(data_dir).resolve() != folder:
        from ..wsi.dataset import list_cases

        try:
            theirs = {c.case_id: file_fingerprint(c.slide) for c in list_cases(folder)} if folder.is_dir() else None
        except InputError:
            theirs = None
        ours = {c.case_id: file_fingerprint(c.slide) for c in list_cases(data_dir)}
        if theirs is not None and theirs != ours:
            raise InputError(
                f"run {Path(run_folder).name!r} extracted its patches from the slides of {folder}, "
                f"which differ from those of {Path(data_dir).resolve()}; use another run_name or "
                "rerun notebook 02 with this data_dir"
            )
        folder = Path(data_dir).resolve()
    return {
        "data_dir": folder,
        "scales": list(rec["scales"]),
        "params": ExtractionParams(**rec["params"]).validate(),
        "caches": {int(k): v for k, v in rec["caches"].items()},
        "key": rec["key"],
    }
