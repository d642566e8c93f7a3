"""Built-in demo data: small slides laid out like PAIP 2019, generated deterministically.

Each case is ``<id>.svs`` (a pyramidal, tiled JPEG TIFF with an Aperio-style description, so
OpenSlide reads it as an Aperio slide with mpp and objective power), ``<id>_whole.tif`` and
``<id>_viable.tif`` (binary 0/1 masks at level-0 size, tiled and deflate-compressed, like the
challenge's), plus a ``labels.csv`` with slide-level labels.

The tissue is drawn procedurally: coarse random fields decide where tissue, tumour, necrosis
and folds are; every pixel is then rendered from those fields, so the masks and the image agree
exactly and the writer never needs more than one strip of rows in memory. Normal liver has
small, evenly spaced nuclei in cords; carcinoma has larger, darker, crowded nuclei in clusters
on a more purple stroma; necrosis (inside the whole-tumour area, outside viable tumour) is pale
with nuclear debris. Some cases have no tumour at all, so slide labels vary.

Used by notebook 01 (generated on first use), the runner, the tests and ``bench/``. No torch.
"""

import csv
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from .atomic import atomic_dir, atomic_path, remove_stale_temporaries
from .errors import InputError
from .progress import progress_bar
from .slides import box_reduce

#: Bump when the drawing changes, so cached demo data is regenerated.
GENERATOR_VERSION = 6

#: Micrometres per pixel and objective power written into every demo slide (PAIP 2019 slides
#: were scanned at 20x, about 0.5 um per pixel).
DEMO_MPP = 0.5
DEMO_MAGNIFICATION = 20

GRID = 64          # level-0 pixels per cell of the coarse fields
TILE = 256         # TIFF tile size
STRIP = 512        # rows rendered at once (a multiple of TILE and of the nucleus cell)
CELL = 128         # level-0 pixels per nucleus cell
_MAXR = 8          # largest nucleus radius drawn


@dataclass(frozen=True)
class CaseSpec:
    """One synthetic case: its id, level-0 size, whether it has tumour, and its seed."""

    case_id: str
    width: int
    height: int
    tumor: bool
    seed: int


def demo_cases(seed=2019):
    """The ten cases of the built-in demo dataset.

    Seven have tumour and three do not; two are large enough (16,384 px) to hold a 224 px
    patch at 64x (64 x 224 = 14,336 level-0 pixels), the rest are 5-8 k px a side.

    Args:
        seed: the dataset seed; each case's seed derives from it.

    Returns:
        A list of :class:`CaseSpec`.
    """
    sizes = [(16384, 16384), (16384, 15360), (8192, 6144), (7168, 7168), (6144, 8192),
             (8192, 7168), (6144, 6144), (7168, 6144), (6144, 7168), (8192, 8192)]
    tumor = [True, False, True, True, True, False, True, True, False, True]
    return [CaseSpec(f"demo_{i + 1:02d}", w, h, t, seed * 1000 + i)
            for i, ((w, h), t) in enumerate(zip(sizes, tumor))]


# ---------------------------------------------------------------------------------------------
# The coarse fields that define a slide
# ---------------------------------------------------------------------------------------------

def _smooth_noise(rng, shape, sigma):
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-6)


class _Scene:
    """Coarse fields (one value per GRID x GRID block) and drawing constants of one slide."""

    def __init__(self, spec):
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        gh, gw = spec.height // GRID + 2, spec.width // GRID + 2
        yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
        yy /= gh
        xx /= gw
        # Tissue: smooth noise plus a central bump, thresholded; a window keeps the border glass.
        t = _smooth_noise(rng, (gh, gw), sigma=max(gh, gw) / 14)
        t += 1.4 * np.exp(-(((xx - 0.5) / 0.33) ** 2 + ((yy - 0.5) / 0.33) ** 2))
        win = np.clip(np.minimum.reduce([xx, 1 - xx, yy, 1 - yy]) / 0.08, 0, 1)
        t = t * win - 2.0 * (1 - win)
        # Holes (vessels, fat) punched into the tissue.
        for _ in range(int(rng.integers(3, 7))):
            cy, cx = rng.uniform(0.2, 0.8, 2)
            r = rng.uniform(0.015, 0.035)
            t -= 3.0 * np.exp(-(((xx - cx) / r) ** 2 + ((yy - cy) / r) ** 2))
        self.tissue = t
        self.tissue_thr = np.float32(np.quantile(t, 0.55))
        # Tumour: one to three blobs, distorted by noise.
        tum = np.zeros((gh, gw), np.float32)
        if spec.tumor:
            warp = 0.35 * _smooth_noise(rng, (gh, gw), sigma=max(gh, gw) / 30)
            for _ in range(int(rng.integers(2, 4))):
                cy, cx = rng.uniform(0.3, 0.7, 2)
                ry, rx = rng.uniform(0.17, 0.28, 2)
                tum = np.maximum(tum, np.exp(-(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)))
            tum = tum + warp * (tum > 0.05)
        self.tumor = tum
        # Necrosis inside the tumour (whole but not viable).
        self.necrosis = _smooth_noise(rng, (gh, gw), sigma=max(gh, gw) / 40)
        self.necrosis_thr = np.float32(1.1)
        # A fold: a narrow band across the slide where tissue lies double.
        a = rng.uniform(0, np.pi)
        off = rng.uniform(-0.15, 0.15)
        d = (xx - 0.5) * np.sin(a) - (yy - 0.5) * np.cos(a) - off
        self.fold = np.exp(-((d / 0.012) ** 2)).astype(np.float32)
        # A periodic fibre texture for the stroma, and per-slide stain variation.
        tex = rng.standard_normal((1024, 1024)).astype(np.float32)
        tex = ndimage.gaussian_filter(tex, (1.0, 6.0), mode="wrap")
        self.texture = (tex / (tex.std() + 1e-6)).astype(np.float32)
        self.grain = rng.standard_normal((1024, 1024)).astype(np.float32)
        self.stain = rng.uniform(-12, 12, 3).astype(np.float32)

    # -- per-pixel values --------------------------------------------------------------------
    @staticmethod
    def _bilinear(field, x0, y0, w, h, step=4):
        """Bilinear interpolation of a coarse field, evaluated every ``step`` pixels and held.

        Evaluating at 4 px steps (then repeating) costs a sixteenth of a per-pixel evaluation;
        at GRID = 64 the steps are invisible once the fibre texture is added.
        """
        ax, ay = x0 - x0 % step, y0 - y0 % step
        nw, nh = -(-(x0 + w - ax) // step), -(-(y0 + h - ay) // step)
        ys = (ay + step * np.arange(nh, dtype=np.float32) + step / 2) / GRID - 0.5
        xs = (ax + step * np.arange(nw, dtype=np.float32) + step / 2) / GRID - 0.5
        iy = np.clip(np.floor(ys).astype(np.int64), 0, field.shape[0] - 2)
        ix = np.clip(np.floor(xs).astype(np.int64), 0, field.shape[1] - 2)
        fy = np.clip(ys - iy, 0, 1)[:, None]
        fx = np.clip(xs - ix, 0, 1)[None, :]
        rows = field[iy] * (1 - fy) + field[iy + 1] * fy          # (nh, gw): cheap
        v = rows[:, ix] * (1 - fx) + rows[:, ix + 1] * fx          # (nh, nw)
        v = np.broadcast_to(v[:, None, :, None], (nh, step, nw, step)).reshape(nh * step, nw * step)
        return v[y0 - ay: y0 - ay + h, x0 - ax: x0 - ax + w]

    @staticmethod
    def _periodic(tex, x0, y0, w, h):
        n = tex.shape[0]
        rows = np.take(tex, np.arange(y0, y0 + h) % n, axis=0)
        return np.take(rows, np.arange(x0, x0 + w) % n, axis=1)

    def regions(self, x0, y0, w, h):
        """Boolean tissue, whole-tumour and viable-tumour maps, and the fibre texture."""
        tex = self._periodic(self.texture, x0, y0, w, h)
        tissue = self._bilinear(self.tissue, x0, y0, w, h) + 0.025 * tex > self.tissue_thr
        if self.spec.tumor:
            whole = tissue & (self._bilinear(self.tumor, x0, y0, w, h) > 0.5)
            viable = whole & (self._bilinear(self.necrosis, x0, y0, w, h) < self.necrosis_thr)
        else:
            whole = np.zeros_like(tissue)
            viable = whole
        return tissue, whole, viable, tex

    def _at(self, field, xs, ys):
        """Field values at level-0 points (nearest coarse cell; used for nucleus placement)."""
        return field[np.clip(ys // GRID, 0, field.shape[0] - 1), np.clip(xs // GRID, 0, field.shape[1] - 1)]

    def nuclei(self, cx, cy):
        """Nuclei of one CELL x CELL cell: level-0 centres, radii, darkness and tumour flag."""
        rng = np.random.default_rng([self.spec.seed, cx, cy])
        x0, y0 = cx * CELL, cy * CELL
        # Normal liver: hepatocyte nuclei on a jittered lattice (cords), a few lymphocytes.
        g = np.arange(8, CELL, 22)
        ny, nx = np.meshgrid(g, g, indexing="ij")
        nx = (nx.ravel() + x0 + rng.normal(0, 3.5, nx.size)).astype(np.int64)
        ny = (ny.ravel() + y0 + rng.normal(0, 3.5, ny.size)).astype(np.int64)
        keep = rng.random(nx.size) < 0.8
        nx, ny = nx[keep], ny[keep]
        nr = rng.integers(3, 5, nx.size)
        na = rng.uniform(0.55, 0.75, nx.size)
        nt = np.zeros(nx.size, bool)
        nl = rng.integers(2, 6)
        lx = x0 + rng.integers(0, CELL, nl)
        ly = y0 + rng.integers(0, CELL, nl)
        # Carcinoma: crowded clusters of larger, darker, pleomorphic nuclei.
        k = rng.integers(4, 7)
        ccx = x0 + rng.uniform(0, CELL, k)
        ccy = y0 + rng.uniform(0, CELL, k)
        m = rng.integers(9, 15, k)
        tx = (np.repeat(ccx, m) + rng.normal(0, 11, m.sum())).astype(np.int64)
        ty = (np.repeat(ccy, m) + rng.normal(0, 11, m.sum())).astype(np.int64)
        xs = np.concatenate([nx, lx, tx])
        ys = np.concatenate([ny, ly, ty])
        rs = np.concatenate([nr, np.full(nl, 2), rng.integers(5, _MAXR + 1, tx.size)])
        al = np.concatenate([na, np.full(nl, 0.85), rng.uniform(0.8, 0.95, tx.size)])
        tt = np.concatenate([nt, np.zeros(nl, bool), np.ones(tx.size, bool)])
        # Decide from the coarse fields which of the candidates belong where they stand.
        if self.spec.tumor:
            in_tumor = self._at(self.tumor, xs, ys) > 0.5
            necrotic = in_tumor & (self._at(self.necrosis, xs, ys) >= self.necrosis_thr)
        else:
            in_tumor = np.zeros(xs.size, bool)
            necrotic = in_tumor
        keep = np.where(tt, in_tumor & ~necrotic, ~in_tumor)
        # Necrosis keeps a sparse debris of small dark fragments.
        debris = necrotic & (rng.random(xs.size) < 0.15)
        rs = np.where(debris, 2, rs)
        keep |= debris
        return xs[keep], ys[keep], rs[keep], al[keep], tt[keep]


_DISCS = {r: np.argwhere(np.hypot(*np.mgrid[-r:r + 1, -r:r + 1]) <= r + 0.3) - r for r in range(1, _MAXR + 1)}

_GLASS = np.array([243, 242, 246], np.float32)
_STROMA = np.array([232, 168, 200], np.float32)       # normal liver: pink cytoplasm and stroma
_TUMOR_STROMA = np.array([208, 140, 190], np.float32)  # carcinoma: more basophilic
_NECROSIS = np.array([240, 196, 214], np.float32)      # pale eosinophilic necrosis
_NUC = np.array([96, 58, 142], np.float32)
_TUMOR_NUC = np.array([62, 32, 112], np.float32)


def render_region(scene, x0, y0, w, h):
    """Render level-0 pixels of a region of a slide.

    Args:
        scene: the slide's fields (from :func:`_Scene`).
        x0, y0: top-left corner, level-0 pixels.
        w, h: size, level-0 pixels.

    Returns:
        ``(rgb, tissue, whole, viable)``: an ``(h, w, 3)`` uint8 image and three boolean maps.
    """
    tissue, whole, viable, tex = scene.regions(x0, y0, w, h)
    # Region index: 0 glass, 1 normal tissue, 2 viable tumour, 3 necrosis; colours by lookup.
    idx = tissue.view(np.uint8) + whole.view(np.uint8) + (whole & ~viable).view(np.uint8)
    pal = np.stack([_GLASS, _STROMA + scene.stain, _TUMOR_STROMA + scene.stain, _NECROSIS + scene.stain])
    shade = (1.0 + 0.05 * tex) * (1 - 0.28 * scene._bilinear(scene.fold, x0, y0, w, h))
    shade = np.where(tissue, shade, np.float32(1.0)).astype(np.float32)
    base = pal[idx]
    base *= shade[..., None]
    # Nuclei: stamp discs into an alpha map on a padded canvas.
    P = _MAXR
    alpha = np.zeros((h + 2 * P, w + 2 * P), np.float32)
    tum = np.zeros_like(alpha, dtype=bool)
    for cy in range(max(0, (y0 - P) // CELL), (y0 + h + P) // CELL + 1):
        for cx in range(max(0, (x0 - P) // CELL), (x0 + w + P) // CELL + 1):
            xs, ys, rs, al, tt = scene.nuclei(cx, cy)
            ok = (xs >= x0 - P) & (xs < x0 + w + P) & (ys >= y0 - P) & (ys < y0 + h + P)
            if not ok.any():
                continue
            xs, ys, rs, al, tt = xs[ok] - x0 + P, ys[ok] - y0 + P, rs[ok], al[ok], tt[ok]
            for r in np.unique(rs):
                sel = rs == r
                d = _DISCS[int(r)]
                py = np.clip(ys[sel, None] + d[None, :, 0], 0, h + 2 * P - 1)
                px = np.clip(xs[sel, None] + d[None, :, 1], 0, w + 2 * P - 1)
                alpha[py, px] = al[sel, None]
                tum[py, px] = tt[sel, None]
    alpha = alpha[P:P + h, P:P + w]
    tum = tum[P:P + h, P:P + w]
    alpha *= tissue
    alpha *= 0.85 + 0.15 * np.abs(tex)
    nuc = np.stack([_NUC, _TUMOR_NUC])[tum.view(np.uint8)]
    nuc -= base
    nuc *= alpha[..., None]
    base += nuc
    # Fine grain (scanner noise), from a second periodic texture.
    base += 3.0 * scene._periodic(scene.grain, x0 + 311, y0 + 173, w, h)[..., None]
    np.clip(base, 0, 255, out=base)
    return base.astype(np.uint8), tissue, whole, viable


# ---------------------------------------------------------------------------------------------
# Writing slides and masks tile by tile
# ---------------------------------------------------------------------------------------------

def _pad_tile(a, tile=TILE):
    if a.shape[0] == tile and a.shape[1] == tile:
        return a
    out = np.full((tile, tile) + a.shape[2:], 255 if a.ndim == 3 else 0, a.dtype)
    out[:a.shape[0], :a.shape[1]] = a
    return out


def _tiles_of(strip, tile=TILE):
    for x in range(0, strip.shape[1], tile):
        yield _pad_tile(strip[:, x:x + tile], tile)


def _aperio_description(w, h, level_w=None, level_h=None):
    head = f"Aperio Image Library v10.0.50 (synthetic demo, helpers.synthetic v{GENERATOR_VERSION})\r\n"
    if level_w is None:
        return (head + f"{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) JPEG/RGB Q=90"
                f"|AppMag = {DEMO_MAGNIFICATION}|MPP = {DEMO_MPP:.4f}|Filename = synthetic")
    return head + f"{w}x{h} -> {level_w}x{level_h} - ({TILE}x{TILE}) JPEG/RGB Q=90"


def write_case(spec, folder, quality=90):
    """Write one case's slide and masks into ``folder`` (each file atomically).

    The slide gets levels at downsamples 1, 4, 16 and 64 (as long as a level is at least one
    tile); each level is built from the one above it, strip by strip, through a small on-disk
    buffer, so memory stays at a few strips whatever the slide's size.

    Args:
        spec: the case.
        folder: destination folder.
        quality: JPEG quality of the slide's tiles.

    Returns:
        The paths written: ``{"slide": ..., "whole": ..., "viable": ...}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scene = _Scene(spec)
    W, H = spec.width, spec.height
    paths = {"slide": folder / f"{spec.case_id}.svs",
             "whole": folder / f"{spec.case_id}_whole.tif",
             "viable": folder / f"{spec.case_id}_viable.tif"}
    # Levels below level 0: box-averaged from the level above, buffered in memmaps on disk.
    dims = [(W, H)]
    while min(dims[-1]) // 4 >= 64 and len(dims) < 4:
        dims.append((dims[-1][0] // 4, dims[-1][1] // 4))
    bufs = []
    with atomic_path(paths["slide"], suffix=".svs") as tmp_slide, \
            atomic_path(paths["whole"], suffix=".tif") as tmp_whole, \
            atomic_path(paths["viable"], suffix=".tif") as tmp_viable:
        try:
            for i, (lw, lh) in enumerate(dims[1:]):
                bufs.append(np.lib.format.open_memmap(f"{tmp_slide}.l{i + 1}.npy", "w+", np.uint8, (lh, lw, 3)))
            mask_files = {}

            def level0_tiles():
                for y in range(0, H, STRIP):
                    h = min(STRIP, H - y)
                    rgb, _, whole, viable = render_region(scene, 0, y, W, h)
                    # Keep the mask strips on disk until the mask files are written.
                    for name, m in (("whole", whole), ("viable", viable)):
                        if name not in mask_files:
                            mask_files[name] = open(f"{tmp_slide}.{name}.raw", "wb")
                        mask_files[name].write(m.view(np.uint8).tobytes())
                    if bufs:
                        r = box_reduce(rgb[: h - h % 4], 4)
                        bufs[0][y // 4: y // 4 + r.shape[0], : r.shape[1]] = r
                    for ty in range(0, h, TILE):
                        yield from _tiles_of(rgb[ty:ty + TILE])

            def level_tiles(level):
                src = bufs[level - 1]
                lh = src.shape[0]
                for y in range(0, lh, STRIP):
                    strip = np.asarray(src[y:y + STRIP])
                    if level < len(bufs):
                        r = box_reduce(strip[: strip.shape[0] - strip.shape[0] % 4], 4)
                        bufs[level][y // 4: y // 4 + r.shape[0], : r.shape[1]] = r
                    for ty in range(0, strip.shape[0], TILE):
                        yield from _tiles_of(strip[ty:ty + TILE])

            res = (1e4 / DEMO_MPP, 1e4 / DEMO_MPP)
            with tifffile.TiffWriter(tmp_slide, bigtiff=W * H * 3 > 2 ** 31) as tw:
                tw.write(level0_tiles(), shape=(H, W, 3), dtype=np.uint8, tile=(TILE, TILE),
                         compression="jpeg", compressionargs={"level": quality}, photometric="rgb",
                         description=_aperio_description(W, H), resolution=res,
                         resolutionunit="CENTIMETER", metadata=None)
                for f in mask_files.values():
                    f.close()
                for lvl, (lw, lh) in enumerate(dims[1:], start=1):
                    tw.write(level_tiles(lvl), shape=(lh, lw, 3), dtype=np.uint8, tile=(TILE, TILE),
                             compression="jpeg", compressionargs={"level": quality}, photometric="rgb",
                             description=_aperio_description(W, H, lw, lh), metadata=None)
            for name, tmp in (("whole", tmp_whole), ("viable", tmp_viable)):
                raw = np.memmap(f"{tmp_slide}.{name}.raw", np.uint8, "r", shape=(H, W))

                def mask_tiles(raw=raw):
                    for y in range(0, H, TILE):
                        yield from _tiles_of(np.asarray(raw[y:y + TILE]), TILE)

                with tifffile.TiffWriter(tmp, bigtiff=W * H > 2 ** 31) as tw:
                    tw.write(mask_tiles(), shape=(H, W), dtype=np.uint8, tile=(TILE, TILE),
                             compression="zlib", compressionargs={"level": 1}, photometric="minisblack", metadata=None)
                del raw
        finally:
            for b in bufs:
                fn = b.filename
                del b
                Path(fn).unlink(missing_ok=True)
            bufs.clear()
            for name in ("whole", "viable"):
                Path(f"{tmp_slide}.{name}.raw").unlink(missing_ok=True)
    return paths


def _write_case_job(args):
    spec, folder = args
    t = time.perf_counter()
    write_case(spec, folder)
    return spec.case_id, time.perf_counter() - t


def _manifest(cases):
    return {"generator_version": GENERATOR_VERSION, "cases": [asdict(c) for c in cases]}


def ensure_demo_dataset(folder=None, cases=None, workers=None, progress=True):
    """Return the demo dataset's folder, generating it first if it is missing or stale.

    The dataset is written into a temporary folder and renamed into place at the end, so an
    interrupted generation leaves nothing half-written; a manifest (generator version and the
    case list) decides whether a cached dataset can be reused.

    Args:
        folder: where the dataset lives (default :func:`helpers.paths.demo_data_dir`).
        cases: the cases to write (default :func:`demo_cases`).
        workers: processes to use (default: all cores, at most one per case).
        progress: show a progress bar (stderr).

    Returns:
        The dataset folder (a :class:`pathlib.Path`).
    """
    from .paths import demo_data_dir

    folder = Path(folder) if folder is not None else demo_data_dir()
    cases = list(cases) if cases is not None else demo_cases()
    want = _manifest(cases)
    mf = folder / "manifest.json"
    if mf.exists():
        try:
            if json.loads(mf.read_text()) == want:
                return folder
        except json.JSONDecodeError:
            pass
    remove_stale_temporaries(folder.parent)
    workers = workers or min(len(cases), os.cpu_count() or 1)
    jobs = sorted(cases, key=lambda c: -c.width * c.height)  # largest first: better packing
    with atomic_dir(folder) as tmp:
        bar = progress_bar(len(jobs), "demo slides", "slide", progress)
        if workers > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                for _ in pool.imap_unordered(_write_case_job, [(c, tmp) for c in jobs]):
                    bar.update()
        else:
            for c in jobs:
                _write_case_job((c, tmp))
                bar.update()
        bar.close()
        with open(tmp / "labels.csv", "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["case_id", "label"])
            for c in cases:
                wr.writerow([c.case_id, int(c.tumor)])
        (tmp / "manifest.json").write_text(json.dumps(want, indent=2) + "\n")
        (tmp / "README.txt").write_text(
            "Synthetic PAIP 2019-like demo slides written by helpers.synthetic; regenerate with\n"
            "python -c 'import helpers.synthetic as s; s.ensure_demo_dataset()'.\n")
    return folder


def file_sha256(path, chunk=1 << 20):
    """SHA-256 of a file, read in chunks (used to verify downloaded test data)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    return h.hexdigest()
