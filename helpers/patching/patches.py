"""Patch extraction: the paper's grid cut from a slide strip by strip, in parallel, into caches.

The paper (section 3.3) cuts each (scaled) slide into 224 x 224 patches without overlap with
``patchify`` and drops the patches of white glass. Here the same grid is cut one strip of patch
rows at a time (``patchify`` on each strip), so memory stays at a few strips whatever the
slide's size, by worker processes that each take a few rows. For each patch: its tissue
fraction (:mod:`helpers.wsi.tissue`), and the tumour fractions of its level-0 footprint in the
``whole`` and ``viable`` masks, summed from a per-slide map of mask pixels per 16 x 16 block
(built once, shared by every scale). Kept patches are written to the slide's cache for that
scale (:mod:`helpers.patching.caches`), atomically.

Failures end in one line: a dead worker (:class:`helpers.core.parallel.WorkerDied`, naming the slide
and scale), a full disk (:class:`helpers.core.errors.DiskFullError`); finished caches stay reusable.
Used by notebooks 02 and 04.
"""

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from patchify import patchify

from ..core.atomic import atomic_dir, remove_stale_temporaries
from ..core.errors import DiskFullError, InputError, check_positive, disk_full, is_disk_full
from ..core.parallel import WorkerDied, ordered_map, usable_cpus
from ..core.progress import progress_bar
from ..wsi.handles import open_cached, reader_pool
from ..wsi.slides import MASK_KINDS, Mask, Slide
from ..wsi.tissue import slide_tissue_threshold, tissue_fractions, tissue_fractions_at, to_gray
from .caches import (
    TABLE_COLUMNS,
    ExtractionParams,
    PackedMasks,
    cache_bytes_estimate,
    cache_folder,
    check_scales,
    finish_table,
    grid_shape,
    load_patch_set,
    packed_width,
    stores_masks,
    too_small_reason,
)
from .maskcounts import (
    COUNT_BLOCK,
    count_band,
    count_map_paths,
    fractions_from_counts,
    maps_being_built,
    write_band,
)

#: At most this many grid rows per worker task (neighbouring rows share tile rows, so one
#: taller task decodes each tile once) ...
ROWS_PER_TASK_MAX = 8
#: ... at most this many scaled pixels per read (bounds a worker's strip buffer) ...
READ_PIXELS = 2**25
#: ... and per task (bounds the kept patches a task holds until the task before it hands on
#: their place in the cache).
TASK_PIXELS = 2**26


def _rows_within(pixels, width, params):
    """Grid rows (1 to ROWS_PER_TASK_MAX) of a level ``width`` px wide that fit ``pixels``."""
    return int(max(1, min(ROWS_PER_TASK_MAX, pixels // max(1, width * params.stride))))


def rows_per_read(width, params):
    """Grid rows read at once for a level ``width`` px wide (at the patch's scale)."""
    return _rows_within(READ_PIXELS, width, params)


def rows_per_task(width, params, period=1):
    """Grid rows per worker task, read in one or more reads: where it fits, a whole number of
    ``period`` rows (see :meth:`helpers.wsi.slides.Slide.aligned_rows`), so that no tile row is
    decoded by two tasks. At 1x on a 32k slide, 4-row tasks (3.5 tile rows of 256 px) made the
    other worker decode every other task's first tile row again: 14% more JPEG decoding."""
    n = _rows_within(TASK_PIXELS, width, params)
    return n // period * period if 1 < period <= n else n


def counts_align(downsample, params):
    """Whether a scale's windows (their tops, steps and sides in level-0 px) fall on the count
    maps' blocks, so that their tumour fractions can be summed from the maps."""
    S, P = params.stride, params.patch_size
    return isinstance(downsample, int) and (S * downsample) % COUNT_BLOCK == 0 and (P * downsample) % COUNT_BLOCK == 0


#: A worker's strip buffer, reused read after read (a fresh one costs zeroed pages each time).
_STRIP = [np.zeros(0, np.uint8)]


def _strip_buffer(shape):
    n = int(np.prod(shape))
    if _STRIP[0].size < n:
        _STRIP[0] = np.empty(n, np.uint8)
    return _STRIP[0][:n].reshape(shape)


def extract_rows(
    slide_path,
    scale,
    r0,
    r1,
    params,
    masks=None,
    count_maps=None,
    cache_dir=None,
    tissue_level=None,
    task=0,
    downsample=None,
    fill_maps=(),
):
    """Cut grid rows ``r0`` to ``r1 - 1``: read them as one strip, then for each row patchify,
    test tissue, measure tumour.

    Args:
        slide_path: the slide file.
        scale: the (nominal) downscale factor: 4 is 4x wherever a scale is named.
        r0, r1: the grid rows.
        params: :class:`helpers.patching.caches.ExtractionParams` (or its dict).
        masks: ``{"whole": path or None, "viable": path or None}``.
        count_maps: ``{kind: path}`` of count maps (:mod:`helpers.patching.maskcounts`), used
            where the windows align with their blocks (else the masks are read).
        cache_dir: the cache being written: the kept patches (and masks) go straight into its
            ``patches.u8`` (and ``masks.bits``) at the offset that task ``task - 1`` hands on
            (see :func:`_take_offsets`), and only the small per-row arrays are returned (a
            worker sends back little, and no byte of a patch is written twice).
        tissue_level: the slide's gray threshold for ``tissue_method = "slide"``.
        task: this task's number in the slide's grid order (with ``cache_dir``).
        downsample: the level-0 pixels per pixel that ``scale`` means on this slide (default:
            ``scale``; see :func:`helpers.wsi.slides.scale_downsample`).
        fill_maps: the kinds whose ``count_maps`` are being built (:func:`maps_being_built`):
            this task counts the mask's block rows under its grid rows (the last task: down to
            the mask's end), writes them into the map and takes its fractions from them.

    Returns:
        A list with, per row, a dict: ``row``, ``tissue_frac``, ``otsu``, ``kept``,
        ``whole_frac`` and ``viable_frac`` (NaN without masks), and, without ``cache_dir``, the
        kept ``patches`` and, at the mask scale, their ``masks`` (packed as stored: :class:`PackedMasks`).
    """
    p = params if isinstance(params, ExtractionParams) else ExtractionParams(**params)
    masks = masks or {}
    slide = open_cached(slide_path, "slide")
    P, S, k = p.patch_size, p.stride, p.tissue_subsample
    ds = scale if downsample is None else downsample
    rows, cols = grid_shape(slide.dimensions, ds, P, S)
    width = (cols - 1) * S + P
    xs = np.arange(cols) * S * ds
    footprint = P * ds
    aligned = counts_align(ds, p)
    per_read = rows_per_read(width, p)
    bands = {}
    for kind in fill_maps if aligned else ():
        bands[kind] = _fill_band(masks[kind], slide_path, count_maps[kind], r0, r1, rows, S * ds, footprint)
    results = []
    for row in range(r0, r1):
        if (row - r0) % per_read == 0:  # the next read: up to per_read rows, into the reused buffer
            at, h = row, (min(r1, row + per_read) - row - 1) * S + P
            big = slide.read_region(0, row * S * ds, width, h, downsample=ds, out=_strip_buffer((h, width, 3)))
        y = row * S * ds
        strip = big[(row - at) * S : (row - at) * S + P]
        patches = patchify(strip, (P, P, 3), step=S)[0, :, 0]  # (cols, P, P, 3) view
        gray = to_gray(strip[::k, ::k])
        gp = np.stack([gray[:, (c * S) // k : (c * S) // k + P // k] for c in range(cols)])
        if tissue_level is None:
            frac, otsu = tissue_fractions(gp, p.glass_level)  # the paper's per-patch Otsu
        else:
            frac, otsu = tissue_fractions_at(gp, tissue_level), np.full(cols, float(tissue_level))
        kept = frac >= p.tissue_threshold
        out = {
            "row": row,
            "tissue_frac": frac,
            "otsu": otsu,
            "kept": kept,
            "patches": np.ascontiguousarray(patches[kept]),
        }
        for kind in MASK_KINDS:
            mp = masks.get(kind)
            if mp is None:
                out[f"{kind}_frac"] = np.full(cols, np.nan)
                continue
            cmap = (count_maps or {}).get(kind) if aligned else None
            if kind in bands:
                out[f"{kind}_frac"] = fractions_from_counts(bands[kind][1], y, xs, footprint, row0=bands[kind][0])
            elif cmap is not None:
                out[f"{kind}_frac"] = fractions_from_counts(open_cached(cmap, "counts"), y, xs, footprint)
            else:
                out[f"{kind}_frac"] = open_cached((mp, slide_path), "mask").window_fractions(y, xs, footprint)
            if kind == p.label_mask and scale == p.mask_scale:
                out["masks"] = _mask_patches(mp, slide_path, y, xs, ds, p, kept, out[f"{kind}_frac"])
        results.append(out)
    if cache_dir is not None:
        _write_kept(cache_dir, task, results)
    return results


def _fill_band(mask_path, slide_path, map_path, r0, r1, rows, row_step, footprint):
    """Count the block rows under grid rows ``r0`` to ``r1 - 1`` (``row_step`` and
    ``footprint``: level-0 px), write this task's share into the map being built, and return
    ``(first block row, counts)`` for the task's fractions. A task's share starts at its first
    row and ends where the next task's begins (the last task's: at the mask's end)."""
    b0 = r0 * row_step // COUNT_BLOCK
    nby = open_cached((mask_path, slide_path), "mask").height
    nby = -(-nby // COUNT_BLOCK)
    share_end = nby if r1 >= rows else min(nby, r1 * row_step // COUNT_BLOCK)
    need_end = min(nby, max(share_end, ((r1 - 1) * row_step + footprint) // COUNT_BLOCK))
    counts = count_band(mask_path, slide_path, b0, need_end)
    write_band(map_path, b0, counts[: share_end - b0])
    return b0, counts


def _mask_patches(mask_path, slide_path, y, xs, downsample, p, kept, fractions):
    """The kept patches' mask pixels along one row, packed as stored (:class:`PackedMasks`).

    A patch all outside (fraction 0) or all inside (fraction 1) the tumour is filled without a
    read; only the patches across a boundary are read from the mask, window by window.
    """
    P = p.patch_size
    f, x = fractions[kept], np.asarray(xs)[kept]
    out = np.zeros((f.size, P, packed_width(P)), np.uint8)
    if not np.any(f > 0):
        return out
    mask = open_cached((mask_path, slide_path), "mask")
    footprint = P * downsample
    inside = (x + footprint <= mask.width * mask.downsample) & (y + footprint <= mask.height * mask.downsample)
    out[(f >= 1) & inside] = PackedMasks.pack(np.ones((1, P, P), np.uint8))[0]
    for i in np.flatnonzero((f > 0) & ~((f >= 1) & inside)):
        out[i] = PackedMasks.pack(mask.read(x[i], y, P, P, downsample=downsample)[None])[0]
    return out


# ---------------------------------------------------------------------------------------------
# Writing straight into the cache, in grid order, from several worker processes
# ---------------------------------------------------------------------------------------------
#
# Each task knows how many patches it keeps only once it has decoded its rows, so it cannot
# know where its patches go in the cache file until the task before it has counted its own.
# The tasks hand the offsets on: task i waits for a small file ``.handoff/<i>`` holding its
# offsets (task 0's is written by the parent), writes ``.handoff/<i + 1>`` at once, then
# writes its patches at its offsets. The pool hands tasks out in order, so task i - 1 has
# started whenever task i runs, and tasks of similar size wait little. A failed extraction
# leaves ``.handoff/abort`` (or removes the folder), which ends any task still waiting.

HANDOFF = ".handoff"


class ExtractionAborted(RuntimeError):
    """A row task found its extraction given up (another task failed first)."""


def _offsets_path(cache_dir, task):
    return Path(cache_dir) / HANDOFF / f"{task:07d}"


def _hand_on(cache_dir, task, offsets):
    """Publish task ``task``'s byte offsets ``(patches, masks)`` (atomically: rename)."""
    dest = _offsets_path(cache_dir, task)
    tmp = dest.with_name(dest.name + f".{os.getpid()}.tmp")
    tmp.write_text(f"{offsets[0]} {offsets[1]}\n")
    os.replace(tmp, dest)


def _take_offsets(cache_dir, task):
    """Wait for (and return) task ``task``'s offsets; raise when the extraction was given up."""
    path, delay = _offsets_path(cache_dir, task), 0.0005
    while True:
        try:
            return tuple(int(v) for v in path.read_text().split())
        except FileNotFoundError:
            pass
        if not path.parent.is_dir() or (path.parent / "abort").exists():
            raise ExtractionAborted(f"{cache_dir}: extraction given up before task {task}")
        time.sleep(delay)
        delay = min(2 * delay, 0.01)


def _write_at(path, offset, arrays):
    """Write ``arrays`` one after another at ``offset`` of an existing file (``pwrite``:
    plain writes, so a full disk is an error here, never a SIGBUS later)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for a in arrays:
            if not a.size:
                continue
            view = memoryview(np.ascontiguousarray(a)).cast("B")
            while len(view):
                n = os.pwrite(fd, view, offset)
                offset += n
                view = view[n:]
    finally:
        os.close(fd)


def _write_kept(cache_dir, task, results):
    """Write a task's kept patches (and masks) into the cache at its offsets, in grid order."""
    n = sum(int(out["kept"].sum()) for out in results)
    at_patches, at_masks = _take_offsets(cache_dir, task)
    pbytes = int(np.prod(results[0]["patches"].shape[1:]))  # (k, P, P, 3) uint8, k may be 0
    mbytes = int(np.prod(results[0]["masks"].shape[1:])) if "masks" in results[0] else 0
    _hand_on(cache_dir, task + 1, (at_patches + n * pbytes, at_masks + n * mbytes))
    folder = Path(cache_dir)
    _write_at(folder / "patches.u8", at_patches, [out.pop("patches") for out in results])
    if "masks" in results[0]:
        _write_at(folder / "masks.bits", at_masks, [out.pop("masks") for out in results])


def _extract_rows_job(args):
    try:
        return extract_rows(*args)
    except InputError:
        raise
    except Exception as exc:  # any error must survive pickling back to the parent
        if is_disk_full(exc):  # a full disk is the one DiskFullError, from a worker too
            raise disk_full(args[7] or args[0], f"the {args[1]}x patches of {Path(args[0]).stem}") from None
        raise InputError(f"{type(exc).__name__}: {exc}") from None


def _map(fn, tasks, pool, workers):
    """In order: in this process without a pool (a small job), else by the pool's processes."""
    return map(fn, tasks) if pool is None else ordered_map(fn, tasks, workers=workers, executor=pool)


def _check_files(case):
    for p in (case.slide, case.whole, case.viable):
        if p is not None and not Path(p).exists():
            raise InputError(f"{p}: no such file (case {case.case_id}); check the dataset folder")


def extract_slide(case, scale, cache_root, params=None, pool=None, progress=None, workers=1):
    """Extract (or load from the cache) the patches of one slide at one scale.

    Args:
        case: a :class:`helpers.wsi.dataset.Case`.
        scale: downscale factor (1, 4, 16, 64, ...).
        cache_root: the folder holding patch caches.
        params: :class:`helpers.patching.caches.ExtractionParams` (defaults: the paper's).
        pool: a shared :func:`helpers.wsi.handles.reader_pool` (see :func:`extract_dataset`);
            without one, ``workers`` processes are started when the job is large enough.
        progress: a tqdm bar to advance by one per grid row, or ``None``.
        workers: processes to use when no pool is given.

    Returns:
        ``(patch_set, from_cache)``.
    """
    params = (params or ExtractionParams()).validate()
    scale = check_scales([scale])[0]
    _check_files(case)
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
            if case.mask_path(kind) is not None:
                Mask(case.mask_path(kind), dims).close()
        level = slide_tissue_threshold(slide) if params.tissue_method == "slide" else None
        ds = slide.downsample_at(scale, params.scale_reference)
        period = slide.aligned_rows(ds, params.stride)
    rows, cols = grid_shape(dims, ds, params.patch_size, params.stride)
    step = rows_per_task((cols - 1) * params.stride + params.patch_size, params, period) if cols else 1
    own = None
    if pool is None and workers > 1 and -(-rows // step) >= 2 * workers:  # small jobs: this process
        pool = own = reader_pool(workers)
    t0 = time.perf_counter()
    try:
        with atomic_dir(folder) as tmp:
            table, n_kept = _write_cache(
                case, (scale, ds), cache_root, params, pool, workers, rows, cols, step, level, tmp, progress
            )
            table[TABLE_COLUMNS].to_csv(tmp / "table.csv", index=False)
            k = table[table["kept"]]
            meta = {
                "key": key,
                "grid_rows": rows,
                "grid_cols": cols,
                "n_grid": int(len(table)),
                "n_kept": n_kept,
                "n_pos": int((k["label"] == 1).sum()),
                "n_neg": int((k["label"] == 0).sum()),
                "n_ambiguous": int((k["label"] == -1).sum()),
                "tissue_level": level,
                "downsample": ds,
                "seconds": round(time.perf_counter() - t0, 2),
            }
            with open(tmp / "meta.json", "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
    except DiskFullError as exc:
        est = cache_bytes_estimate([dims], [scale], params, [ds])
        size = f"{est / 1e9:.1f} GB" if est >= 1e8 else f"{est / 1e6:.1f} MB"
        raise type(exc)(f"{exc} (the {scale}x cache of {case.case_id} takes up to {size})") from None
    except WorkerDied as exc:
        raise WorkerDied(
            f"{exc} while extracting the {scale}x patches of {case.case_id}; its partial cache was "
            "removed, finished caches are reused on a rerun"
        ) from None
    finally:
        if own is not None:
            own.shutdown(wait=True, cancel_futures=True)
        _STRIP[0] = np.zeros(0, np.uint8)  # this process's strip buffer (when it cut rows itself)
    return load_patch_set(folder), False


def _write_cache(case, scales, cache_root, params, pool, workers, rows, cols, step, level, tmp, progress):
    """Run the row tasks, which write their patches into ``tmp``; return ``(table, n_kept)``.

    ``scales``: the nominal scale and the level-0 downsample it means on this slide. The masks'
    count maps not built yet are built by these tasks, band by band, when this scale's windows
    align with their blocks (else a later scale builds them).
    """
    scale, ds = scales
    masks = {k: None if case.mask_path(k) is None else str(case.mask_path(k)) for k in MASK_KINDS}
    paths, missing = count_map_paths(case, cache_root) if rows and counts_align(ds, params) else ({}, {})
    with maps_being_built(paths, missing) as building:
        cmaps = {**{k: str(v) for k, v in paths.items()}, **building}
        tasks = [
            (str(case.slide), scale, r, min(rows, r + step), asdict(params), masks, cmaps, str(tmp), level, i, ds)
            + (tuple(building),)
            for i, r in enumerate(range(0, rows, step))
        ]
        return _run_tasks(tasks, case, scales, params, pool, workers, cols, tmp, progress)


def _run_tasks(tasks, case, scales, params, pool, workers, cols, tmp, progress):
    """The row tasks, run in the pool; their per-row results gathered into the slide's table."""
    scale, ds = scales
    store = stores_masks(case, scale, params)
    cols_out = {k: [] for k in ("row", "col", "tissue_frac", "otsu", "kept", "whole_frac", "viable_frac", "index")}
    n_kept = 0
    done = False
    try:
        for name in ("patches.u8", "masks.bits") if store else ("patches.u8",):
            (tmp / name).touch()
        (tmp / HANDOFF).mkdir()
        _hand_on(tmp, 0, (0, 0))
        for batch in _map(_extract_rows_job, tasks, pool, workers):
            for res in batch:
                kept = res["kept"]
                index = np.full(cols, -1, np.int64)
                index[kept] = np.arange(n_kept, n_kept + int(kept.sum()))
                n_kept += int(kept.sum())
                cols_out["row"].append(np.full(cols, res["row"]))
                cols_out["col"].append(np.arange(cols))
                for name in ("tissue_frac", "otsu", "kept", "whole_frac", "viable_frac"):
                    cols_out[name].append(res[name])
                cols_out["index"].append(index)
                if progress is not None:
                    progress.update(1)
        done = True
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(tmp, f"the {scale}x patches of {case.case_id}") from None
        raise
    finally:
        if not done and (tmp / HANDOFF).is_dir():
            (tmp / HANDOFF / "abort").touch()  # ends the tasks still waiting for their offsets
    shutil.rmtree(tmp / HANDOFF)
    _check_sizes(tmp, n_kept, params, store, case, scale)
    table = pd.DataFrame({k: (np.concatenate(v) if v else np.zeros(0)) for k, v in cols_out.items()})
    for name in ("tissue_frac", "whole_frac", "viable_frac"):
        table[name] = table[name].round(4)
    return finish_table(table, case.case_id, scale, params, ds), n_kept


def _check_sizes(tmp, n_kept, params, store, case, scale):
    """The cache files hold exactly the kept patches (a task that wrote short is a bug, not data)."""
    P = params.patch_size
    want = {"patches.u8": n_kept * P * P * 3, **({"masks.bits": n_kept * P * packed_width(P)} if store else {})}
    for name, size in want.items():
        have = (tmp / name).stat().st_size
        if have != size:
            raise RuntimeError(
                f"the {scale}x cache of {case.case_id}: {name} holds {have} bytes, expected {size}; "
                "it was not kept: rerun"
            )


def extract_dataset(cases, scales, cache_root, params=None, workers=None, progress=True, warn=True):
    """Extract every case at every scale, sharing one pool of worker processes.

    Slides without tissue, or too small for a patch at some scale, are not errors: they are
    counted in the summary (``note`` says why) and warned about once.

    Args:
        cases: :class:`helpers.wsi.dataset.Case` objects.
        scales: downscale factors, e.g. ``[1, 4, 16, 64]``.
        cache_root: the folder for patch caches.
        params: :class:`helpers.patching.caches.ExtractionParams`.
        workers: processes (default: the machine's cores).
        progress: show one progress bar over all grid rows (stderr).
        warn: warn about the skipped (slide, scale) pairs (a caller that shows the summary's
            ``note`` column itself passes ``False``).

    Returns:
        ``(summary, sets)``: a DataFrame with one row per case and scale (grid size, kept,
        positive, negative, ambiguous, seconds, from_cache, note) and
        ``{(case_id, scale): PatchSet}``.
    """
    params = (params or ExtractionParams()).validate()
    scales = check_scales(scales)
    if not cases:
        raise InputError("no cases to extract: the dataset folder is empty")
    workers = workers or usable_cpus()
    check_positive("workers", workers, integer=True)
    dims, ds = {}, {}
    for c in cases:  # a slide that cannot be read at some scale (no mpp ...) stops here, before any work
        with Slide(c.slide, verify=False) as s:  # extract_slide verifies each slide
            dims[c.case_id] = s.dimensions
            ds.update({(c.case_id, sc): s.downsample_at(sc, params.scale_reference) for sc in scales})
    total = sum(
        grid_shape(dims[c.case_id], ds[c.case_id, sc], params.patch_size, params.stride)[0]
        for c in cases
        for sc in scales
    )
    todo = [
        (dims[c.case_id], sc, ds[c.case_id, sc])
        for c in cases
        for sc in scales
        if not (cache_folder(cache_root, c, sc, params)[0] / "meta.json").exists()
    ]
    need = sum(cache_bytes_estimate([d], [sc], params, [f]) for d, sc, f in todo)
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache_root).free
    if need > free:
        warnings.warn(
            f"{len(todo)} patch caches to write into {cache_root} may take up to {need / 1e9:.1f} GB "
            f"(every grid position kept; tissue is usually a third to a half of it) and the disk has "
            f"{free / 1e9:.1f} GB free. If it fills up, extraction stops with a clear error and a rerun "
            "resumes after freeing space",
            stacklevel=2,
        )
    bar = progress_bar(total, "patch rows", "row", progress)
    pool = reader_pool(workers) if workers > 1 and len(todo) else None
    rows, sets = [], {}
    try:
        for c in cases:
            for sc in scales:
                ps, cached = extract_slide(c, sc, cache_root, params, pool=pool, progress=bar, workers=workers)
                sets[(c.case_id, sc)] = ps
                m = ps.meta
                note = too_small_reason(dims[c.case_id], sc, params.patch_size, ds[c.case_id, sc]) or (
                    "no tissue patch" if m["n_grid"] and not m["n_kept"] else ""
                )
                rows.append(
                    {
                        "case_id": c.case_id,
                        "scale": sc,
                        "downsample": ds[c.case_id, sc],
                        "grid": m["n_grid"],
                        "kept": m["n_kept"],
                        "pos": m["n_pos"],
                        "neg": m["n_neg"],
                        "ambiguous": m["n_ambiguous"],
                        "seconds": m["seconds"],
                        "from_cache": cached,
                        "note": note,
                    }
                )
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    summary = pd.DataFrame(rows)
    for what, sel in (
        ("fit no patch", summary["grid"] == 0),
        ("have no tissue patch", (summary["grid"] > 0) & (summary["kept"] == 0)),
    ):
        if warn and sel.any():
            warnings.warn(
                f"{int(sel.sum())} (slide, scale) pairs {what} and are skipped: "
                + ", ".join(f"{r.case_id}@{r.scale}x" for r in summary[sel].head(8).itertuples())
                + (" ..." if sel.sum() > 8 else "")
                + " (the summary's 'note' column says why)",
                stacklevel=2,
            )
    return summary, sets
