"""Built-in demo data: PAIP 2019-like liver slides, rendered deterministically, and a dataset zoo.

What the demo holds
    :func:`demo_cases` lists 45 slides of 36 patients (27 with hepatocellular carcinoma, 18
    tumour-free; nine patients give two slides, often a tumour slide and a background-liver
    slide), 4,600-6,200 px a side. Each slide is ``<id>.svs`` (a pyramidal, tiled JPEG TIFF with
    an Aperio description, so OpenSlide reads its mpp and objective power) with
    ``<id>_whole.tif`` and ``<id>_viable.tif`` (0/1 masks at level-0 size, tiled and deflated,
    as in PAIP 2019); the folder also has ``labels.csv`` (``slide_id,label,patient_id``, label 1
    = tumour slide) and ``manifest.json``. :func:`write_zoo_dataset` writes small, odd dataset
    folders (mixed formats, no masks, no labels, many slides, old label files) for robustness
    tests.

Why it looks the way it does
    A demo where tumour is "dark blobs on pink, the same stain everywhere" teaches nothing:
    every classifier scores 100 %. Here tumour differs from liver the way hepatocellular
    carcinoma does, by degree: more and larger, more variable and darker nuclei (higher N:C
    ratio), thicker trabeculae with pseudoglandular spaces and unpaired arteries, no portal
    tracts; well-differentiated tumours are close to normal. Normal liver has hepatocyte cords
    with sinusoids, portal tracts (bile ducts, vessels, lymphocytes), central veins and fat
    vacuoles; tumour-free tissue also holds look-alikes (regenerative nodules with mild
    crowding, dense lymphocytic infiltrates, ductular reaction, fibrous septa), and some tumours
    stain pale. On top come the nuisances of real slides, drawn per slide: the lab's stain (hue
    and strength of haematoxylin and eosin), the glass's white balance, section thickness,
    folds, focus, pen marks, scanner stripes and pale loose stroma that is nearly as bright as
    the glass. So colour alone does not separate the classes (a colour-histogram baseline
    stays near 80 % at 4x, a texture model does better), coarse scales see less than fine ones,
    and a model trained on some labs' stains has other labs' stains to generalise to.

How it is drawn
    Coarse fields (one value per ``GRID`` px) decide where tissue, tumour, necrosis, fibrous
    stroma, inflammation, fat and so on are; per-cell hashed random numbers place nuclei, fat
    vacuoles and glands (so any window gets the same objects whatever strip it is drawn in);
    pixels are the Beer-Lambert transmission of haematoxylin and eosin densities built from
    those, ``RGB = glass * exp(-(d_H * v_H + d_E * v_E + d_pen * v_pen))``. The masks come from
    the same fields as the pixels, so they agree exactly, and the writer never holds more than
    a strip of rows.

Used by notebook 01 (generated on first use), the runner, the tests and ``bench/``. No torch.
"""

import csv
import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage

from ..core.atomic import atomic_dir, atomic_path, remove_stale_temporaries
from ..core.errors import InputError
from ..core.parallel import usable_cpus
from ..core.paths import demo_data_dir
from ..core.progress import progress_bar

#: Bump when the drawing changes, so cached demo data is regenerated.
GENERATOR_VERSION = 7

#: Micrometres per pixel and objective power written into every demo slide (PAIP 2019 slides
#: were scanned at 20x, about 0.5 um per pixel).
DEMO_MPP = 0.5
DEMO_MAGNIFICATION = 20

GRID = 16  # level-0 pixels per cell of the coarse fields
STEP = 4  # the fields are interpolated once per STEP x STEP block of pixels
TILE = 256  # TIFF tile size
STRIP = 512  # rows rendered at once (a multiple of TILE and of STEP)
PAD = 12  # rows and columns drawn around a region: the focus blur's reach
CHUNK = 32  # rows of per-pixel arithmetic at a time (their arrays stay in cache)
TEX = 1024  # side of the periodic textures
_MARGIN = 18  # farthest a stamped object reaches from its centre (px)


@dataclass(frozen=True)
class CaseSpec:
    """One synthetic slide: its id, size, whether it has tumour, its seed and its style.

    The first five fields are positional (``CaseSpec("a", 2048, 1536, True, 7)``); the rest
    shape the slide and default to an ordinary resection. Everything not given here (stain
    hue, where the folds and pen strokes run, ...) is drawn from ``seed``.

    Attributes:
        case_id: the slide id (file stem).
        width, height: level-0 size in pixels.
        tumor: whether the slide has carcinoma (else its masks are empty).
        seed: the slide's random seed.
        patient_id: the patient (``""``: unknown, the slide is its own patient).
        biopsy: needle-biopsy cores instead of a resection specimen.
        tissue_share: share of the slide covered by tissue (resections; 0 = bare glass).
        tumor_share: share of the tissue inside the whole-tumour area (tumour slides).
        necrosis: share of the whole-tumour area that is necrotic (not viable).
        grade: 0 = well differentiated (close to liver) ... 1 = poorly differentiated.
        lab: stain family 0-3 (slides of one lab share hue and strength, up to jitter).
        pale_stroma: share of the non-tumour tissue that is pale, loose fibrous stroma.
        pale_tumor: 0-1, how much paler some tumour areas stain.
        mimics: 0-1, amount of benign look-alikes (regenerative nodules, inflammation, ductules).
        steatosis: 0-1, fat vacuoles in the liver.
        fibrosis: 0-1, fibrous septa (cirrhosis) and tumour capsule.
        blur: 0-2, focus trouble (0 sharp; 1 soft; out-of-focus patches grow with it).
        folds: number of tissue folds.
        pen: number of pen strokes.
        magnify: 1 = a 20x scan (``DEMO_MPP``); 2 = the same tissue scanned at 40x (an ``.svs``
            twice ``width`` x ``height``, at half the microns per pixel).
    """

    case_id: str
    width: int
    height: int
    tumor: bool
    seed: int
    patient_id: str = ""
    biopsy: bool = False
    tissue_share: float = 0.7
    tumor_share: float = 0.45
    necrosis: float = 0.1
    grade: float = 0.5
    lab: int = 0
    pale_stroma: float = 0.0
    pale_tumor: float = 0.0
    mimics: float = 0.3
    steatosis: float = 0.15
    fibrosis: float = 0.3
    blur: float = 0.2
    folds: int = 0
    pen: int = 0
    magnify: int = 1


def demo_cases(seed=2019):
    """The 45 slides of the built-in demo dataset, shaped like the paper's data.

    36 patients: 27 give one slide (15 tumour, 12 tumour-free), 6 give a tumour slide and a
    background-liver slide, 3 give two tumour slides; 27 tumour and 18 tumour-free slides in a
    shuffled order, slides of one patient from one lab. Slides are 4,600-6,200 px a side
    (about 1.2 Gpx in all), never square nor a multiple of 64. Resections cover 55-85 % of
    their slide with tissue, four biopsies less; viable tumour covers 15-85 % of a tumour
    slide's tissue, more than half on 14 of the 27 (so that 64x windows, which cover most of
    a slide, can be positive).

    Args:
        seed: the dataset seed; every slide's seed and style derive from it.

    Returns:
        A list of :class:`CaseSpec`, ``demo_01`` ... ``demo_45``.
    """
    rng = np.random.default_rng(seed)
    groups = [(True,)] * 15 + [(False,)] * 12 + [(True, False)] * 6 + [(True, True)] * 3
    labs = rng.integers(0, 4, len(groups))
    slides = [(g, tumor) for g in range(len(groups)) for tumor in groups[g]]
    slides = [slides[i] for i in rng.permutation(len(slides))]
    pid = {}
    for g, _ in slides:
        pid.setdefault(g, f"P{len(pid) + 1:02d}")
    with_t = [i for i, (_, t) in enumerate(slides) if t]
    without = [i for i, (_, t) in enumerate(slides) if not t]
    high = {int(i) for i in rng.choice(with_t, 14, replace=False)}
    biopsy = {int(i) for i in rng.choice(sorted(set(with_t) - high), 2, replace=False)}
    biopsy |= {int(i) for i in rng.choice(without, 2, replace=False)}
    out = []
    for i, (g, tumor) in enumerate(slides):
        short = int(rng.integers(4600, 4900)) | 1  # odd: never a multiple of 64
        long_ = int(min(6199, short * rng.uniform(1.03, 1.3))) | 1
        w, h = (short, long_) if rng.random() < 0.5 else (long_, short)
        viable = rng.uniform(0.52, 0.85) if i in high else rng.uniform(0.15, 0.45)
        necrosis = rng.uniform(0.03, 0.25) if rng.random() < 0.7 else 0.0
        r = rng.random(11)
        out.append(
            CaseSpec(
                f"demo_{i + 1:02d}",
                w,
                h,
                tumor,
                seed * 1000 + i,
                patient_id=pid[g],
                biopsy=i in biopsy,
                tissue_share=round(0.55 + 0.3 * r[0], 3),
                tumor_share=round(min(0.95, viable / (1 - necrosis)), 3) if tumor else 0.0,
                necrosis=round(necrosis, 3) if tumor else 0.0,
                grade=round(0.05 + 0.9 * r[1], 3) if tumor else 0.5,
                lab=int(labs[g]),
                pale_stroma=round(0.15 + 0.2 * r[2], 3) if r[3] < 0.3 else 0.0,
                pale_tumor=round(0.3 + 0.3 * r[4], 3) if tumor and r[5] < 0.35 else 0.0,
                mimics=round(0.1 + 0.5 * r[6] if tumor else 0.35 + 0.6 * r[6], 3),
                steatosis=round(0.6 * r[7] ** 1.5, 3),
                fibrosis=round(r[8], 3),
                blur=round(0.25 * r[9] if r[10] < 0.7 else 0.5 + 0.9 * r[9], 3),
                folds=int(rng.choice(3, p=[0.55, 0.35, 0.1])),
                pen=int(rng.choice(3, p=[0.75, 0.15, 0.1])),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Random numbers that depend only on where they are: hashed per lattice cell
# ---------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _mix(z):
    """SplitMix64's finaliser on a uint64 array (a bijection that scatters bits)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _gauss(u1, u2):
    """About standard-normal numbers from two uniforms (a scaled triangular distribution)."""
    return (u1 + u2 - 1) * np.float32(2.45)


def _key(seed, stream):
    """A 64-bit key for one stream of one slide."""
    return (int(seed) * 0x9E3779B97F4A7C15 + int(stream) * 0xC2B2AE3D27D4EB4F + 0x165667B19E3779F9) & _MASK64


def _cell_uniforms(key, iy, ix, n):
    """``n`` uniform numbers in [0, 1) for each lattice cell ``(iy, ix)``: shape ``(n, cells)``.

    A pure function of the key and the cell, so a cell gets the same numbers in every window.
    """
    with np.errstate(over="ignore"):
        base = (
            np.uint64(key)
            + iy.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)
            + ix.astype(np.uint64) * np.uint64(0xABC98388FB8FAC03)
        )
        base = _mix(base)
        out = np.empty((n, base.size), np.float32)
        for j in range(n):
            z = _mix(base + np.uint64((j + 1) * 0x632BE59BD9B4E019 & _MASK64))
            out[j] = (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)
    return out


# ---------------------------------------------------------------------------------------------
# Periodic textures (shared by all slides; each slide reads them at its own offsets)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _textures():
    """Unit-variance periodic textures, ``TEX`` x ``TEX``, made once per process.

    ``fibre``: thin horizontal streaks (collagen); ``cords``: the band-limited field whose zero
    lines are the sinusoids between hepatocyte plates; ``blobs``: clumps (cytoplasm grain,
    chromatin, red cells, ragged tissue edges); ``grain``: white scanner noise. ``*_t`` are the
    transposes (the other orientation).
    """
    rng = np.random.default_rng(0x5EED)

    def band(sigma):
        t = ndimage.gaussian_filter(rng.standard_normal((TEX, TEX)).astype(np.float32), sigma, mode="wrap")
        return (t - t.mean()) / t.std()

    tex = {
        "fibre": band((0.7, 4.0)),
        "cords": band((2.4, 4.2)),
        "blobs": band(2.0),
        "grain": rng.standard_normal((TEX, TEX)).astype(np.float32),
    }
    for name in ("fibre", "cords"):
        tex[name + "_t"] = np.ascontiguousarray(tex[name].T)
    return tex


# ---------------------------------------------------------------------------------------------
# Stamps: anti-aliased discs and ellipses, drawn many at a time
# ---------------------------------------------------------------------------------------------

_ROUND_R = np.arange(1.0, 16.01, 0.5)  # radii of the round stamps
_LONG_R = np.arange(1.5, 4.51, 0.5)  # radii of the elongated ones (4 orientations each)


def _make_stamps():
    """All stamps' pixels, flattened: ``(dy, dx, alpha, start, length)``.

    Round stamps first (by radius), then elongated ones (aspect 2.2, same area as the disc of
    that radius) at 0, 45, 90 and 135 degrees.
    """
    shapes = [(r, 1.0, 0.0) for r in _ROUND_R]
    shapes += [(r, 2.2, k * np.pi / 4) for r in _LONG_R for k in range(4)]
    dy, dx, al, start, length = [], [], [], [], []
    n = 0
    for r, aspect, angle in shapes:
        a, b = r * math.sqrt(aspect), r / math.sqrt(aspect)
        reach = int(math.ceil(a)) + 1
        yy, xx = np.mgrid[-reach : reach + 1, -reach : reach + 1].astype(np.float64)
        u = xx * math.cos(angle) + yy * math.sin(angle)
        v = -xx * math.sin(angle) + yy * math.cos(angle)
        d = np.hypot(u / a, v / b)
        alpha = np.clip((1 - d) * b + 0.5, 0, 1)
        keep = alpha > 0.02
        dy.append(yy[keep].astype(np.int64))
        dx.append(xx[keep].astype(np.int64))
        al.append(alpha[keep])
        start.append(n)
        length.append(int(keep.sum()))
        n += int(keep.sum())
    return (
        np.concatenate(dy),
        np.concatenate(dx),
        np.concatenate(al).astype(np.float64),
        np.array(start),
        np.array(length),
    )


_ST_DY, _ST_DX, _ST_A, _ST_START, _ST_LEN = _make_stamps()


def _round_stamp(r):
    """Stamp ids of round stamps nearest to radii ``r``."""
    return np.clip(np.rint((np.asarray(r) - _ROUND_R[0]) / 0.5), 0, len(_ROUND_R) - 1).astype(np.int64)


def _long_stamp(r, orient):
    """Stamp ids of elongated stamps of radii ``r`` and orientation index ``orient`` (0-3)."""
    i = np.clip(np.rint((np.asarray(r) - _LONG_R[0]) / 0.5), 0, len(_LONG_R) - 1).astype(np.int64)
    return len(_ROUND_R) + 4 * i + np.asarray(orient, np.int64) % 4


def _stamp(shape, ys, xs, ids, weights):
    """Sum of stamps ``ids`` centred at ``(ys, xs)`` (canvas pixels), scaled by ``weights``.

    Each pixel's sum is taken in the order the stamps are given, so windows that list the
    same stamps in the same relative order get bit-identical pixels.

    Returns:
        A float64 array of ``shape``.
    """
    h, w = shape
    if len(ids) == 0:
        return np.zeros(shape)
    ln = _ST_LEN[ids]
    rep = np.repeat(np.arange(len(ids)), ln)
    k = np.arange(rep.size) - np.repeat(np.cumsum(ln) - ln, ln) + _ST_START[ids][rep]
    py = ys[rep] + _ST_DY[k]
    px = xs[rep] + _ST_DX[k]
    ok = (py >= 0) & (py < h) & (px >= 0) & (px < w)
    flat = py[ok] * w + px[ok]
    return np.bincount(flat, weights=(_ST_A[k] * weights[rep])[ok], minlength=h * w).reshape(shape)


def _rings(cx, cy, radius, count, phase):
    """Centres of ``count`` nuclei around each ring (ducts, arteries), ring by ring."""
    count = np.asarray(count, np.int64)
    rep = np.repeat(np.arange(len(cx)), count)
    j = np.arange(rep.size) - np.repeat(np.cumsum(count) - count, count)
    ang = phase[rep] + 2 * np.pi * j / count[rep]
    return (
        np.rint(cx[rep] + radius[rep] * np.cos(ang)).astype(np.int64),
        np.rint(cy[rep] + radius[rep] * np.sin(ang)).astype(np.int64),
        rep,
    )


# ---------------------------------------------------------------------------------------------
# Coarse fields and their interpolation
# ---------------------------------------------------------------------------------------------


def _smooth_noise(rng, shape, scale):
    """A smooth random field on the coarse grid, mean 0 and variance 1.

    Args:
        rng: a numpy Generator.
        shape: the grid's shape.
        scale: correlation length in level-0 pixels.
    """
    k = max(scale / GRID / 3.0, 1.0)
    small = (int(shape[0] / k) + 4, int(shape[1] / k) + 4)
    n = ndimage.gaussian_filter(rng.standard_normal(small), 1.0, mode="wrap")
    f = ndimage.zoom(n, k, order=3, grid_mode=True, mode="grid-wrap")[: shape[0], : shape[1]]
    return ((f - f.mean()) / (f.std() + 1e-9)).astype(np.float32)


def _axis(coords, n):
    """Interpolation of one axis: coarse index, weight and, per pixel, its STEP block."""
    q = np.asarray(coords) // STEP
    uq, inv = np.unique(q, return_inverse=True)
    p = (uq * STEP + STEP / 2) / GRID - 0.5
    i = np.minimum(np.maximum(np.floor(p).astype(np.int64), 0), n - 2)
    f = np.minimum(np.maximum(p - i, 0), 1).astype(np.float32)
    return i, f, inv


class _Window:
    """A rectangle of level-0 pixels (rows ``ys`` x columns ``xs``) and how to read fields on it."""

    def __init__(self, xs, ys, grid_shape, xaxis=None):
        self.xs, self.ys = np.asarray(xs, np.int64), np.asarray(ys, np.int64)
        self.shape = (len(self.ys), len(self.xs))
        self._x = xaxis if xaxis is not None else _axis(self.xs, grid_shape[1])
        self._y = _axis(self.ys, grid_shape[0])

    def field(self, f):
        """Bilinear interpolation of a coarse field, one value per STEP x STEP block."""
        iy, fy, invy = self._y
        ix, fx, invx = self._x
        rows = f[iy] * (1 - fy)[:, None] + f[iy + 1] * fy[:, None]
        v = rows[:, ix] * (1 - fx) + rows[:, ix + 1] * fx
        return v.take(invy, axis=0).take(invx, axis=1)

    def texture(self, name, offset, zoom=1):
        """A periodic texture read at ``offset``, magnified ``zoom`` times."""
        tex = _textures()[name]
        rows = tex.take(((self.ys + offset[1]) // zoom) % TEX, axis=0)
        cols = (self.xs + offset[0]) // zoom
        if self.xs[-1] - self.xs[0] != len(self.xs) - 1:
            return rows.take(cols % TEX, axis=1)
        # Contiguous columns: copy whole runs of the texture's columns, then magnify.
        lo, n = int(cols[0]), int(cols[-1] - cols[0]) + 1
        parts, at = [], lo % TEX
        while n > 0:
            parts.append(rows[:, at : at + n])
            n -= parts[-1].shape[1]
            at = 0
        out = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        if zoom > 1:
            out = np.repeat(out, zoom, axis=1)[:, int(self.xs[0] + offset[0]) - zoom * lo :][:, : len(self.xs)]
        return out


def _field_at(f, xs, ys):
    """The values :meth:`_Window.field` gives at pixels ``(xs, ys)`` (same arithmetic)."""
    py = ((ys // STEP) * STEP + STEP / 2) / GRID - 0.5
    px = ((xs // STEP) * STEP + STEP / 2) / GRID - 0.5
    iy = np.minimum(np.maximum(np.floor(py).astype(np.int64), 0), f.shape[0] - 2)
    ix = np.minimum(np.maximum(np.floor(px).astype(np.int64), 0), f.shape[1] - 2)
    fy = np.minimum(np.maximum(py - iy, 0), 1).astype(np.float32)
    fx = np.minimum(np.maximum(px - ix, 0), 1).astype(np.float32)
    a = f[iy, ix] * (1 - fy) + f[iy + 1, ix] * fy
    b = f[iy, ix + 1] * (1 - fy) + f[iy + 1, ix + 1] * fy
    return a * (1 - fx) + b * fx


class _Points(dict):
    """What a scene is at some pixels (candidate centres): each value computed when first used.

    Keys: ``tissue``, ``whole``, ``necro`` (booleans), ``a`` (atypia), ``fib`` and ``loose``.
    """

    def __init__(self, scene, x, y):
        super().__init__()
        self.scene, self.x, self.y = scene, x, y

    def __missing__(self, key):
        sc, x, y = self.scene, self.x, self.y
        if key == "tissue":
            v = _field_at(sc.tissue, x, y) > 0
        elif key == "whole":
            v = _field_at(sc.tumor, x, y) > 0
        elif key == "necro":
            v = self["whole"] & (_field_at(sc.necrosis, x, y) > 0)
        elif key == "a":
            v = np.where(self["whole"], _field_at(sc.atyp_t, x, y), _field_at(sc.atyp_n, x, y))
        elif key == "fib":
            v = np.minimum(np.maximum(_field_at(sc.fib, x, y), 0), 1)
        elif key == "loose":
            v = _field_at(sc.loose, x, y)
        else:
            raise KeyError(key)
        self[key] = v
        return v


def _texture_at(name, xs, ys, offset, zoom=1):
    """The values :meth:`_Window.texture` gives at pixels ``(xs, ys)``."""
    return _textures()[name][((ys + offset[1]) // zoom) % TEX, ((xs + offset[0]) // zoom) % TEX]


def _blob(X, Y, cx, cy, rx, ry, angle=0.0, power=1):
    """A bump on the coarse grid's level-0 coordinates: Gaussian, or flat-topped for power > 1."""
    c, s = math.cos(angle), math.sin(angle)
    u = ((X - cx) * c + (Y - cy) * s) / rx
    v = (-(X - cx) * s + (Y - cy) * c) / ry
    return np.exp(-((u * u + v * v) ** power))


def _quantile_shift(f, where, share):
    """``f`` minus its ``1 - share`` quantile over ``where``: positive on about ``share`` of it."""
    if share <= 0 or not where.any():
        return np.full_like(f, -1.0)
    return (f - np.quantile(f[where], 1 - min(share, 0.999))).astype(np.float32)


# Stain families: haematoxylin and eosin optical-density vectors (R, G, B), their strengths,
# and the glass's colour. Family 0 is the usual reference stain; 1 bluer haematoxylin and weak
# eosin; 2 purple, strong eosin; 3 faded, on yellowish glass.
_LABS = (
    ((0.56, 0.72, 0.41), (0.22, 0.80, 0.56), 1.00, 1.00, (242, 240, 244)),
    ((0.70, 0.66, 0.27), (0.20, 0.84, 0.50), 1.15, 0.72, (236, 239, 246)),
    ((0.50, 0.78, 0.38), (0.30, 0.82, 0.48), 0.90, 1.30, (244, 238, 241)),
    ((0.60, 0.70, 0.40), (0.18, 0.76, 0.62), 0.70, 0.80, (246, 243, 236)),
)
_INKS = {"blue": (1.05, 0.62, 0.12), "green": (0.95, 0.22, 0.78), "black": (1.0, 1.0, 0.92)}


class _Stamps:
    """The objects of one window of a scene (see ``Scene._objects``), gathered before they are
    stamped: each kind of cell lies on a jittered grid of its own random stream.

    Attributes:
        scene: the :class:`Scene`.
        X0, Y0, x1, y1: the window's level-0 bounds (``x1``, ``y1`` excluded).
        shape: the window's ``(height, width)``.
        nuclei, clear: ``(x, y, stamp ids, weights)`` parts of the nuclei and the clear spaces.
    """

    def __init__(self, scene, X0, Y0, shape):
        self.scene, self.X0, self.Y0, self.shape = scene, X0, Y0, shape
        self.x1, self.y1 = X0 + shape[1], Y0 + shape[0]
        self.nuclei, self.clear = [], []

    def grid(self, stream, spacing, nvals, jitter, offset=0.0):
        """Candidate centres of grid cells of ``spacing`` px reaching the window (offset by
        ``offset`` cells), each jittered by ``jitter`` cells.

        Returns:
            ``(x, y, u, c)``: the centres, ``nvals`` uniforms per cell from ``stream`` (the
            first two placed the centre) and the scene at the centres (:class:`_Points`).
        """

        def span(lo, hi):
            return np.arange(
                math.floor((lo - _MARGIN) / spacing - offset), math.floor((hi + _MARGIN) / spacing - offset) + 1
            )

        CY, CX = np.meshgrid(span(self.Y0, self.y1), span(self.X0, self.x1), indexing="ij")
        CY, CX = CY.ravel(), CX.ravel()
        u = _cell_uniforms(_key(self.scene.spec.seed, stream), CY, CX, nvals)
        x = np.rint((CX + offset + 0.5 + jitter * (u[0] - 0.5)) * spacing).astype(np.int64)
        y = np.rint((CY + offset + 0.5 + jitter * (u[1] - 0.5)) * spacing).astype(np.int64)
        return x, y, u, _Points(self.scene, x, y)

    @staticmethod
    def add(parts, x, y, ids, weight, keep):
        """Add the objects ``keep`` selects to ``parts`` (``nuclei`` or ``clear``)."""
        parts.append((x[keep], y[keep], ids[keep], weight[keep].astype(np.float64)))

    def total(self, parts):
        """The window's float32 sum of the stamps of ``parts``."""
        if not parts:
            return np.zeros(self.shape, np.float32)
        x, y, ids, wt = (np.concatenate(p) for p in zip(*parts))
        return _stamp(self.shape, y - self.Y0, x - self.X0, ids, wt).astype(np.float32)


class Scene:
    """Everything that defines one slide: coarse fields, objects and drawing constants.

    Fields live on a grid of ``GRID`` px cells (cell ``i`` centred at ``(i + 0.5) * GRID``);
    ``tissue``, ``tumor`` and ``necrosis`` are shifted so that a pixel is tissue, whole tumour
    or necrotic where its interpolated value is above 0.
    """

    def __init__(self, spec):
        self.spec = spec
        W, H = spec.width, spec.height
        self.grid_shape = gh, gw = H // GRID + 3, W // GRID + 3
        self._Y, self._X = np.meshgrid((np.arange(gh) + 0.5) * GRID, (np.arange(gw) + 0.5) * GRID, indexing="ij")
        self._size = max(W, H, 64)
        # Each aspect draws from its own random stream: changing one knob leaves the others alone.
        rng = [np.random.default_rng([spec.seed, i]) for i in range(8)]
        self._draw_look(rng[0])
        self._draw_tissue(rng[1])
        capsule, depth = self._draw_tumour(rng[2])
        self._draw_atypia(rng[3])
        fib, infl = self._draw_lobules(rng[4], capsule)
        self._draw_infiltrates(rng[5], fib, infl)
        self._draw_optics(rng[6], depth)
        self._draw_pen(rng[7])

    def _noise(self, rng, scale):
        """A smooth random field on this slide's grid (see :func:`_smooth_noise`)."""
        return _smooth_noise(rng, self.grid_shape, scale)

    def _draw_look(self, r):
        """Stain vectors and strengths, glass colour, texture offsets, scanner noise and stripes."""
        s = self.spec
        hv, ev, sh, se, glass = _LABS[s.lab % len(_LABS)]
        hv = np.clip(np.array(hv) + r.normal(0, 0.04, 3), 0.05, None)
        ev = np.clip(np.array(ev) + r.normal(0, 0.05, 3), 0.05, None)
        self.h_vec = (hv / np.linalg.norm(hv) * sh * math.exp(r.normal(0, 0.18))).astype(np.float32)
        self.e_vec = (ev / np.linalg.norm(ev) * se * math.exp(r.normal(0, 0.18))).astype(np.float32)
        self.glass = np.clip(np.array(glass) + r.normal(0, 2.0, 3), 228, 250).astype(np.float32)
        self.offsets = {
            k: tuple(int(v) for v in r.integers(0, TEX, 2))
            for k in ("fibre", "fibre2", "cords_a", "cords_b", "cords_t", "blobs", "grain")
        }
        self.sinus_open = float(r.uniform(0.45, 0.95))
        self.noise_gray = float(r.uniform(1.2, 2.6))
        stripe = int(r.integers(700, 1600))
        self.stripes = (stripe, (1 + r.normal(0, 0.008, s.width // stripe + 2)).astype(np.float32))
        self.gland_rate = float(0.05 + 0.35 * s.grade * r.uniform(0.3, 1.0))
        self.tumor_fat = float(r.choice([0.1, 0.4, 1.0], p=[0.5, 0.3, 0.2]))  # steatohepatitic HCC

    def _draw_tissue(self, r):
        """The section: a resection filling ``tissue_share`` of the slide, or biopsy cores."""
        s, X, Y = self.spec, self._X, self._Y
        W, H = s.width, s.height
        if s.tissue_share <= 0:
            tissue = np.full(self.grid_shape, -1.0, np.float32)
        elif s.biopsy:
            tissue = self._cores(r, X, Y, W, H, self._noise(r, 0.05 * self._size))
        else:
            cx, cy = W * (0.5 + r.uniform(-0.05, 0.05)), H * (0.5 + r.uniform(-0.05, 0.05))
            t = 0.5 * self._noise(r, 0.25 * self._size) + 2.0 * _blob(
                X, Y, cx, cy, W * r.uniform(0.38, 0.5), H * r.uniform(0.38, 0.5), power=1.5
            )
            t += 0.12 * self._noise(r, 0.04 * self._size)
            win = np.clip(np.minimum.reduce([X, W - X, Y, H - Y]) / (0.05 * min(W, H) + 1), 0, 1)
            t = t * win - 3 * (1 - win)  # glass along the slide's border
            for _ in range(int(r.integers(1, 5))):  # large vessels and tears
                hx, hy = r.uniform(0.2, 0.8) * W, r.uniform(0.2, 0.8) * H
                hr = r.uniform(0.006, 0.02) * self._size
                t -= 4 * _blob(X, Y, hx, hy, hr * r.uniform(1, 2.5), hr, r.uniform(0, np.pi))
            tissue = _quantile_shift(t, (X < W) & (Y < H), s.tissue_share)
        self.tissue = tissue.astype(np.float32)
        self._on = (self.tissue > 0) & (X < W) & (Y < H)

    def _draw_tumour(self, r):
        """Tumour nodules covering ``tumor_share`` of the tissue, necrosis inside, capsule around.

        Returns:
            ``(capsule, depth)``: the capsule's fibrous band and how deep inside the tumour a cell
            lies (0 at the edge, 1 in the middle), coarse fields.
        """
        s, X, Y, on, size = self.spec, self._X, self._Y, self._on, self._size
        tumor = np.full(self.grid_shape, -1.0, np.float32)
        necrosis = np.full(self.grid_shape, -1.0, np.float32)
        depth = np.zeros(self.grid_shape, np.float32)
        if s.tumor and on.any():
            ys_, xs_ = np.nonzero(on)
            area = on.sum() * GRID * GRID * max(s.tumor_share, 0.05)
            k = int(r.integers(1, 4))
            f = np.zeros(self.grid_shape, np.float32)
            for j in range(k):
                if j == 0 and not s.biopsy:  # the main nodule near the tissue's middle
                    cx, cy = X[on].mean() + r.normal(0, 0.08 * s.width), Y[on].mean() + r.normal(0, 0.08 * s.height)
                else:
                    pick = int(r.integers(0, len(xs_)))
                    cx, cy = X[ys_[pick], xs_[pick]], Y[ys_[pick], xs_[pick]]
                rad = math.sqrt(area / k / np.pi) * (1.2 if j == 0 else r.uniform(0.5, 0.9))
                f = np.maximum(
                    f,
                    _blob(
                        X,
                        Y,
                        cx,
                        cy,
                        rad * r.uniform(0.8, 1.25),
                        rad * r.uniform(0.8, 1.25),
                        r.uniform(0, np.pi),
                        power=2,
                    ),
                )
            for _ in range(int(r.integers(0, 4))):  # satellite nodules
                pick = int(r.integers(0, len(xs_)))
                rad = r.uniform(60, 200)
                f = np.maximum(f, _blob(X, Y, X[ys_[pick], xs_[pick]], Y[ys_[pick], xs_[pick]], rad, rad, power=2))
            f += 0.18 * self._noise(r, 0.05 * size) + 0.03 * self._noise(r, 0.012 * size)
            tumor = _quantile_shift(f, on, s.tumor_share)
            intum = on & (tumor > 0)
            if intum.any():
                depth = np.clip(tumor / (np.abs(tumor[intum]).max() + 1e-6), 0, 1)
            if s.necrosis > 0 and intum.any():  # one to three confluent necrotic areas
                ys_, xs_ = np.nonzero(intum)
                nf = 0.35 * self._noise(r, 0.03 * size) + 0.1 * self._noise(r, 0.01 * size)
                k = int(r.integers(1, 4))
                rad = math.sqrt(intum.sum() * GRID * GRID * s.necrosis / k / np.pi)
                for _ in range(k):
                    pick = int(r.integers(0, len(xs_)))
                    nf += _blob(
                        X,
                        Y,
                        X[ys_[pick], xs_[pick]],
                        Y[ys_[pick], xs_[pick]],
                        rad,
                        rad * r.uniform(0.6, 1.4),
                        r.uniform(0, np.pi),
                    )
                necrosis = _quantile_shift(nf, intum, s.necrosis)
        self.tumor = tumor.astype(np.float32)
        self.necrosis = necrosis.astype(np.float32)
        gy, gx = np.gradient(self.tumor, GRID)
        self._edge = self.tumor / (np.hypot(gx, gy) + 1e-6)  # about the distance to the tumour's edge, px
        cap_w = r.uniform(15, 45) * s.fibrosis if r.random() < 0.7 else 0.0
        capsule = np.zeros(self.grid_shape, np.float32)
        if cap_w:
            capsule = np.clip(1 - np.abs(self._edge + cap_w / 2) / (cap_w / 2), 0, 1) * (self._edge < 0)
        return capsule, depth

    def _draw_atypia(self, r):
        """Atypia (0 liver ... 1 poorly differentiated carcinoma) inside and outside the tumour.

        Outside, regenerative or dysplastic-looking nodules reach up to ~0.45, where
        well-differentiated tumour starts.
        """
        s, X, Y = self.spec, self._X, self._Y
        wobble = 0.08 * self._noise(r, 0.1 * self._size)
        self.atyp_t = np.clip(0.4 + 0.5 * s.grade + wobble, 0.3, 1.0).astype(np.float32)
        regen = np.zeros(self.grid_shape, np.float32)
        for _ in range(int(round(2 + 10 * s.mimics))):
            cx, cy = r.uniform(0, s.width), r.uniform(0, s.height)
            rad = r.uniform(100, 380)
            regen = np.maximum(regen, _blob(X, Y, cx, cy, rad, rad * r.uniform(0.7, 1.3)))
        self.atyp_n = np.clip((0.15 + 0.3 * s.mimics) * np.clip(regen * 1.6 - 0.3, 0, 1), 0, 0.48).astype(np.float32)

    def _draw_lobules(self, r, capsule):
        """Fibrous septa (cirrhosis) and the lobules' landmarks: portal tracts and central veins.

        Portal tracts and central veins sit on a jittered lattice, alternating, only in liver.
        Fills :attr:`lumens` (vessel lumens) and :attr:`rings` (bile ducts as rings of nuclei).

        Returns:
            ``(fib, infl)``: the fibrous-stroma field and the lymphocyte density so far.
        """
        s, X, Y = self.spec, self._X, self._Y
        in_t = self.tumor > 0
        fib = np.zeros(self.grid_shape, np.float32)
        if s.fibrosis > 0.05:
            fib = self._septa(r, X, Y, r.uniform(280, 560), 6 + 28 * s.fibrosis) * min(1.0, 0.4 + s.fibrosis)
        fib = np.maximum(np.where(in_t, 0.25 * fib, fib), capsule)
        lumens, rings = [], []
        spacing = r.uniform(380, 480)
        portal = np.zeros(self.grid_shape, np.float32)
        gh, gw = self.grid_shape
        for i in range(int(s.height / spacing) + 1):
            for j in range(int(s.width / spacing) + 1):
                cx = (j + 0.5 + r.uniform(-0.3, 0.3)) * spacing
                cy = (i + 0.5 + r.uniform(-0.3, 0.3)) * spacing
                u = r.random(12)
                gi, gj = min(int(cy // GRID), gh - 1), min(int(cx // GRID), gw - 1)
                if not (cx < s.width and cy < s.height and self.tissue[gi, gj] > 0.15 and self.tumor[gi, gj] < -0.15):
                    continue
                if (i + j) % 2:  # central vein
                    lumens.append((cx, cy, 10 + 22 * u[0], 1 + 0.5 * u[1], np.pi * u[2], 0.6 * u[3]))
                    continue
                R = 30 + 50 * u[0]  # portal tract: vein, one or two bile ducts
                portal = np.maximum(portal, self._irregular_disc(X, Y, cx, cy, R, u[1:5]))
                a = 2 * np.pi * u[5]
                lumens.append(
                    (
                        cx + 0.35 * R * math.cos(a),
                        cy + 0.35 * R * math.sin(a),
                        5 + 0.25 * R * u[6],
                        1 + 0.6 * u[7],
                        np.pi * u[8],
                        0.5 * u[9],
                    )
                )
                for k in range(1 + int(u[10] < 0.5)):
                    b = a + np.pi * (0.7 + 0.6 * k + 0.3 * u[11])
                    rings.append(
                        (
                            cx + 0.45 * R * math.cos(b),
                            cy + 0.45 * R * math.sin(b),
                            7 + 3 * u[11],
                            int(8 + 4 * u[11]),
                            2.6,
                            1.15,
                            2.5 + 2 * u[11],
                        )
                    )
        self.lumens = np.array(lumens, np.float64).reshape(-1, 6)  # x, y, radius, aspect, angle, blood
        self.rings = np.array(rings, np.float64).reshape(-1, 7)  # x, y, ring radius, nuclei, r, dark, lumen r
        infl = np.maximum(np.float32(0.015), (0.25 + 0.4 * s.mimics) * portal)
        return np.maximum(fib, 0.9 * portal), infl

    def _draw_infiltrates(self, r, fib, infl):
        """Lymphocytic infiltrates, ductular reaction, steatosis and pale loose stroma."""
        s, X, Y = self.spec, self._X, self._Y
        in_t = self.tumor > 0
        for _ in range(int(round(1 + 9 * s.mimics))):
            cx, cy = r.uniform(0, s.width), r.uniform(0, s.height)
            rad = r.uniform(40, 200)
            infl = np.maximum(
                infl,
                r.uniform(0.45, 0.85)
                * np.clip(1.6 * _blob(X, Y, cx, cy, rad, rad * r.uniform(0.5, 1.5), r.uniform(0, np.pi)) - 0.2, 0, 1),
            )
        rim = np.clip(1 - np.abs(self._edge + 60) / 60, 0, 1) * (self._edge < 0)  # a cuff around the tumour
        infl = np.maximum(infl, 0.3 * s.mimics * rim)
        self.infl = np.where(in_t, np.minimum(infl, 0.06), infl).astype(np.float32)
        edge_band = np.clip(1 - np.abs(ndimage.uniform_filter(fib, 5) - 0.35) / 0.3, 0, 1)
        self.duct = (0.35 * s.mimics * edge_band * ~in_t).astype(np.float32)
        self.steat = np.clip(s.steatosis * (1 + 0.9 * self._noise(r, 0.15 * self._size)), 0, 0.9).astype(np.float32)
        loose = np.zeros(self.grid_shape, np.float32)
        healthy = self._on & (self.tumor < -0.1)
        if s.pale_stroma > 0 and healthy.any():  # mostly towards the section's edges
            score = self._noise(r, 0.08 * self._size) - 1.5 * np.clip(self.tissue / self.tissue[self._on].max(), 0, 1)
            loose = np.clip(_quantile_shift(score, healthy, s.pale_stroma) * 4 + 0.5, 0, 1) * (self.tumor < -0.1)
        self.loose = loose.astype(np.float32)
        self.fib = np.clip(fib * (1 - loose), 0, 1).astype(np.float32)

    def _draw_optics(self, r, depth):
        """Section thickness (with folds and pale tumour areas) and focus, as coarse fields."""
        s, X, Y, size = self.spec, self._X, self._Y, self._size
        od = r.uniform(0.85, 1.2) * (1 + 0.12 * self._noise(r, 0.35 * size))
        focus = np.full(self.grid_shape, 0.7 * s.blur if s.blur >= 0.4 else 0.0, np.float32)
        if s.blur > 0:  # out-of-focus patches
            focus += (0.3 + s.blur) * np.clip(self._noise(r, 0.12 * size) - 1.0, 0, 1)
        for _ in range(s.folds):  # tissue lying double along a band
            a = r.uniform(0, np.pi)
            ox, oy = r.uniform(0.3, 0.7) * s.width, r.uniform(0.3, 0.7) * s.height
            d = (X - ox) * math.sin(a) - (Y - oy) * math.cos(a)
            along = (X - ox) * math.cos(a) + (Y - oy) * math.sin(a)
            half = r.uniform(25, 110)
            length = r.uniform(0.15, 0.45) * size
            band = np.clip((half - np.abs(d + 12 * self._noise(r, 0.1 * size))) / GRID + 0.5, 0, 1)
            band *= np.clip((length - np.abs(along)) / (4 * GRID), 0, 1)
            od = od * (1 + 0.9 * band)
            focus += 0.5 * band
        if s.pale_tumor > 0:
            od = od * (1 - s.pale_tumor * np.clip(self._noise(r, 0.08 * size) + 0.3, 0, 1) * np.clip(depth * 6, 0, 1))
        self.od = od.astype(np.float32)
        self.focus = np.clip(focus, 0, 2).astype(np.float32)
        self.orient = np.clip(0.5 + 0.8 * self._noise(r, 0.12 * size), 0, 1).astype(np.float32)

    def _draw_pen(self, r):
        """Pen strokes (one ink per slide) as an ink-density field, or ``None``."""
        s = self.spec
        self.pen = None
        if s.pen:
            ink = np.zeros(self.grid_shape, bool)
            for _ in range(s.pen):
                ink |= self._stroke(r, self.grid_shape, s.width, s.height)
            dist = ndimage.distance_transform_edt(~ink) * GRID
            width = r.uniform(25, 90)
            self.pen = (r.uniform(0.8, 1.3) * np.clip((width - dist) / GRID + 0.5, 0, 1)).astype(np.float32)
            self.ink = np.array(_INKS[("blue", "green", "black")[int(r.integers(0, 3))]], np.float32)

    # -- building blocks ---------------------------------------------------------------------------
    @staticmethod
    def _cores(r, X, Y, W, H, wiggle):
        """Two to four needle-biopsy cores, roughly parallel, some broken."""
        t = np.full(X.shape, -1.0, np.float32)
        k = int(r.integers(2, 5))
        for i in range(k):
            yc = H * (0.15 + 0.7 * (i + 0.5) / k) + r.normal(0, 0.03 * H)
            a = r.normal(0, 0.12)
            length = W * r.uniform(0.5, 0.85)
            x0 = r.uniform(0.06 * W, 0.94 * W - length)
            along = (X - x0) * math.cos(a) + (Y - yc) * math.sin(a)
            across = -(X - x0) * math.sin(a) + (Y - yc) * math.cos(a) + 35 * wiggle
            half = r.uniform(80, 150)
            core = np.minimum.reduce([half - np.abs(across), along, length - along]) / half
            if r.random() < 0.5:  # a break in the core
                at = r.uniform(0.3, 0.7) * length
                core = np.minimum(core, (np.abs(along - at) - r.uniform(10, 40)) / half)
            t = np.maximum(t, core)
        return t

    @staticmethod
    def _septa(r, X, Y, spacing, width):
        """Fibrous septa: the edges of a jittered Voronoi tessellation (1 on a septum, 0 off)."""
        ny, nx = int(Y.max() / spacing) + 3, int(X.max() / spacing) + 3
        py = (np.arange(ny)[:, None] - 1 + 0.5 + r.uniform(-0.4, 0.4, (ny, nx))) * spacing
        px = (np.arange(nx)[None, :] - 1 + 0.5 + r.uniform(-0.4, 0.4, (ny, nx))) * spacing
        iy = np.clip((Y // spacing).astype(int) + 1, 1, ny - 2)
        ix = np.clip((X // spacing).astype(int) + 1, 1, nx - 2)
        d = np.stack([np.hypot(X - px[iy + a, ix + b], Y - py[iy + a, ix + b]) for a in (-1, 0, 1) for b in (-1, 0, 1)])
        d.partition(1, axis=0)
        return np.clip(1 - (d[1] - d[0]) / width, 0, 1)

    @staticmethod
    def _irregular_disc(X, Y, cx, cy, R, u):
        """A soft disc whose radius wobbles with the angle (portal tracts)."""
        ang = np.arctan2(Y - cy, X - cx)
        rr = R * (1 + 0.25 * np.cos(2 * ang + 6.28 * u[0]) + 0.15 * np.cos(3 * ang + 6.28 * u[1]))
        return np.clip((rr - np.hypot(X - cx, Y - cy)) / GRID + 0.5, 0, 1)

    @staticmethod
    def _stroke(r, shape, W, H):
        """Cells under one pen stroke: a curve across the slide or a loop around a region."""
        t = np.linspace(0, 1, 400)
        if r.random() < 0.5:
            p0 = np.array([r.uniform(0, W), 0 if r.random() < 0.5 else H])
            p2 = np.array([r.uniform(0, W), r.uniform(0.3, 0.7) * H])
            p1 = (p0 + p2) / 2 + r.normal(0, 0.15, 2) * (W, H)
            pts = (1 - t)[:, None] ** 2 * p0 + 2 * ((1 - t) * t)[:, None] * p1 + t[:, None] ** 2 * p2
        else:
            c = np.array([r.uniform(0.2, 0.8) * W, r.uniform(0.2, 0.8) * H])
            rad = np.array([r.uniform(0.1, 0.3) * W, r.uniform(0.1, 0.3) * H])
            a = 2 * np.pi * t * r.uniform(0.8, 1.05) + r.uniform(0, 6.3)
            pts = c + rad * np.stack([np.cos(a), np.sin(a)], 1) * (1 + 0.05 * np.sin(5 * a))[:, None]
        out = np.zeros(shape, bool)
        iy = np.clip((pts[:, 1] // GRID).astype(int), 0, shape[0] - 1)
        ix = np.clip((pts[:, 0] // GRID).astype(int), 0, shape[1] - 1)
        out[iy, ix] = True
        return out

    # -- what the slide is at each pixel -----------------------------------------------------------
    def regions(self, win):
        """Tissue, whole-tumour and viable-tumour maps of a window (booleans), and the blob texture."""
        blobs = win.texture("blobs", self.offsets["blobs"])
        tissue = win.field(self.tissue) + 0.05 * blobs > 0
        if self.spec.tumor:
            whole = tissue & (win.field(self.tumor) > 0)
            viable = whole & ~(win.field(self.necrosis) > 0)
        else:
            whole = viable = np.zeros(win.shape, bool)
        return tissue, whole, viable, blobs

    def coverage(self, step=32):
        """Shares of the slide that are tissue, and of the tissue that is whole and viable tumour.

        Evaluated on every ``step``-th pixel with the same arithmetic as the masks.
        """
        win = _Window(np.arange(0, self.spec.width, step), np.arange(0, self.spec.height, step), self.grid_shape)
        tissue, whole, viable, _ = self.regions(win)
        n = max(int(tissue.sum()), 1)
        return float(tissue.mean()), float(whole.sum() / n), float(viable.sum() / n)

    def _cords(self, a, orient, ta, tb, tt):
        """The plate field: its near-zero band is sinusoid; plates thicken with atypia ``a``."""
        tn = ta + orient * (tb - ta)
        m = np.clip((a - 0.3) * 2.5, 0, 1)
        return tn + m * (tt - tn), np.float32(0.24) * (1 - 0.35 * m)

    def _cords_at(self, a, x, y):
        """:meth:`_cords` at the points ``(x, y)`` of atypia ``a``: ``(plate field, half-width)``."""
        ta = _texture_at("cords", x, y, self.offsets["cords_a"])
        tb = _texture_at("cords_t", x, y, self.offsets["cords_b"])
        tt = _texture_at("cords", x, y, self.offsets["cords_t"], zoom=2)
        return self._cords(a, _field_at(self.orient, x, y), ta, tb, tt)

    def _objects(self, X0, Y0, shape):
        """Nuclei and clear spaces stamped over a window.

        Returns:
            ``(nuclei, clear)``: haematoxylin density of the nuclei and the clear fraction
            (fat vacuoles, glands, duct lumens), float32 arrays of ``shape``.
        """
        st = _Stamps(self, X0, Y0, shape)
        self._parenchyma(st)
        self._lymphocytes(st)
        self._spindles(st)
        if self.spec.tumor and self.spec.necrosis > 0:
            self._debris(st)
        self._ring_nuclei(st)
        self._fat(st)
        if self.spec.tumor:
            self._pseudoglands(st)
        return st.total(st.nuclei), st.total(st.clear)

    def _parenchyma(self, st):
        """Parenchymal cells: hepatocytes, or tumour cells (crowded, large, dark, variable)."""
        for stream, offset, jitter in ((10, 0.0, 0.5), (11, 0.5, 0.9)):
            x, y, u, c = st.grid(stream, 13, 7, jitter, offset)
            a = c["a"]
            t, wsin = self._cords_at(a, x, y)
            pres = (0.62 + 0.33 * a) if offset == 0 else np.clip(1.2 * a - 0.35, 0.04, 0.7)
            pres = pres * (1 - c["fib"]) * (1 - c["loose"]) * (np.abs(t) > wsin)
            keep = c["tissue"] & (u[2] < pres)
            r = 3.2 + 1.6 * a + (0.22 + 0.8 * a * a) * _gauss(u[3], u[4])
            dark = (0.7 + 0.25 * a) * (0.85 + 0.3 * u[5]) * np.where(c["necro"], 0.2, 1.0)  # ghosts in necrosis
            st.add(st.nuclei, x, y, _round_stamp(np.clip(r, 2.0, 8.5)), dark, keep)

    def _lymphocytes(self, st):
        """Lymphocytes: small, round, very dark; dense in infiltrates and portal tracts."""
        x, y, u, c = st.grid(12, 7, 5, 0.9)
        keep = c["tissue"] & ~c["necro"] & (u[2] < _field_at(self.infl, x, y))
        st.add(st.nuclei, x, y, _round_stamp(2.3 + 0.3 * _gauss(u[3], u[4])), 1.1 + 0.2 * u[3], keep)

    def _spindles(self, st):
        """Spindle nuclei of stroma (fibroblasts) and sinusoid lining cells."""
        x, y, u, c = st.grid(13, 11, 6, 0.9)
        t, wsin = self._cords_at(c["a"], x, y)
        pres = 0.5 * c["fib"] + 0.08 * c["loose"] + 0.25 * (np.abs(t) < wsin) * (1 - c["fib"]) * (1 - c["loose"])
        keep = c["tissue"] & ~c["necro"] & (u[2] < pres)
        st.add(st.nuclei, x, y, _long_stamp(2.0 + u[3], (4 * u[4]).astype(np.int64)), 0.9 + 0.3 * u[5], keep)

    def _debris(self, st):
        """Necrosis: karyorrhectic debris."""
        x, y, u, c = st.grid(14, 8, 5, 1.0)
        keep = c["necro"] & (u[2] < 0.3)
        st.add(st.nuclei, x, y, _round_stamp(1.0 + u[3]), 1.0 + 0.8 * u[4], keep)

    def _ring_nuclei(self, st):
        """Rings of nuclei around a lumen: bile ducts (portal tracts), ductules (ductular
        reaction) and, in tumour, unpaired arteries; the lumens are clear spaces."""
        x, y, u, c = st.grid(15, 40, 5, 0.8)
        duct = c["tissue"] & ~c["whole"] & (u[2] < _field_at(self.duct, x, y))
        artery = c["tissue"] & c["whole"] & ~c["necro"] & (u[2] < 0.05)

        def rows(keep, *shape):  # ring radius, nuclei, nucleus radius, darkness, lumen radius
            return np.column_stack([x[keep], y[keep]] + [np.full(int(keep.sum()), v) for v in shape])

        reach = _MARGIN + 20
        near = (
            (self.rings[:, 0] > st.X0 - reach)
            & (self.rings[:, 0] < st.x1 + reach)
            & (self.rings[:, 1] > st.Y0 - reach)
            & (self.rings[:, 1] < st.y1 + reach)
        )
        ring = np.concatenate(
            [self.rings[near], rows(duct, 5.5, 6, 2.3, 1.1, 1.8), rows(artery, 6.0, 9, 2.2, 1.3, 2.5)]
        )
        if len(ring):
            phase = np.concatenate([np.zeros(int(near.sum())), u[3][duct] * 6.28, u[3][artery] * 6.28])
            rx, ry, idx = _rings(ring[:, 0], ring[:, 1], ring[:, 2], ring[:, 3].astype(np.int64), phase)
            st.add(st.nuclei, rx, ry, _round_stamp(ring[idx, 4]), ring[idx, 5], np.ones(len(idx), bool))
            cx, cy = np.rint(ring[:, 0]).astype(np.int64), np.rint(ring[:, 1]).astype(np.int64)
            st.add(st.clear, cx, cy, _round_stamp(ring[:, 6]), np.ones(len(ring)), np.ones(len(ring), bool))

    def _fat(self, st):
        """Fat vacuoles (steatosis), mostly in the liver."""
        x, y, u, c = st.grid(16, 30, 5, 0.8)
        pres = _field_at(self.steat, x, y) * np.where(c["whole"], self.tumor_fat, 1.0)
        pres *= (1 - c["fib"]) * (1 - c["loose"])
        keep = c["tissue"] & ~c["necro"] & (u[2] < pres)
        st.add(st.clear, x, y, _round_stamp(4.0 + 10.0 * u[3] ** 1.5), np.ones(len(x)), keep)

    def _pseudoglands(self, st):
        """Pseudoglands in tumour."""
        x, y, u, c = st.grid(17, 24, 5, 0.8)
        keep = c["whole"] & ~c["necro"] & (u[2] < self.gland_rate)
        st.add(st.clear, x, y, _round_stamp(2.5 + 4.5 * u[3]), np.ones(len(x)), keep)

    def _lumens(self, X0, Y0, shape):
        """Vessel lumens (portal veins, central veins) over a window: ``(clear, blood)``."""
        clear = np.zeros(shape, np.float32)
        blood = np.zeros(shape, np.float32)
        h, w = shape
        for cx, cy, rad, aspect, angle, fill in self.lumens:
            reach = int(rad * aspect) + 2
            a0, a1 = max(int(cy) - reach - Y0, 0), min(int(cy) + reach + 1 - Y0, h)
            b0, b1 = max(int(cx) - reach - X0, 0), min(int(cx) + reach + 1 - X0, w)
            if a0 >= a1 or b0 >= b1:
                continue
            yy = (np.arange(a0, a1) + Y0 - cy)[:, None]
            xx = (np.arange(b0, b1) + X0 - cx)[None, :]
            u = xx * math.cos(angle) + yy * math.sin(angle)
            v = -xx * math.sin(angle) + yy * math.cos(angle)
            d = np.hypot(u / aspect, v)
            alpha = np.clip(rad - d + 0.5, 0, 1).astype(np.float32)
            np.maximum(clear[a0:a1, b0:b1], alpha, out=clear[a0:a1, b0:b1])
            np.maximum(blood[a0:a1, b0:b1], alpha * np.float32(fill), out=blood[a0:a1, b0:b1])
        return clear, blood

    def _pixels(self, win, nuclei, clear, lumen, blood):
        """The per-pixel stage of a window: masks, dye densities and focus (no neighbours needed).

        Returns:
            ``(tissue, whole, viable, eosin, haematoxylin, focus)``.
        """
        off = self.offsets
        tissue, whole, viable, blobs = self.regions(win)
        necro = (whole & ~viable).view(np.uint8)
        an = win.field(self.atyp_n)
        a = an + whole.view(np.uint8) * (win.field(self.atyp_t) - an)
        orient = win.field(self.orient)
        fibre = win.texture("fibre", off["fibre"])
        fibre += orient * (win.texture("fibre_t", off["fibre2"]) - fibre)
        t, wsin = self._cords(
            a,
            orient,
            win.texture("cords", off["cords_a"]),
            win.texture("cords_t", off["cords_b"]),
            win.texture("cords", off["cords_t"], zoom=2),
        )
        fib = np.clip(3 * win.field(self.fib) - 1 + 0.35 * fibre, 0, 1)
        loose = np.clip(3 * win.field(self.loose) - 1 + 0.3 * blobs, 0, 1) * ~whole
        clear = np.minimum(np.maximum(clear, lumen), 1)
        # Sinusoids: slits between the plates, interrupted, partly open.
        sinus = np.clip((wsin - np.abs(t)) * (1 / 0.08), 0, 1) * np.clip(0.9 + blobs, 0, 1)
        sinus *= self.sinus_open * (1 - fib)
        # Parenchyma (granular cytoplasm), then fibrous stroma, loose stroma and necrosis over it.
        E = (0.56 - 0.10 * a) * (1 + 0.08 * blobs) * (1 - 0.7 * sinus)
        Hd = (0.03 + 0.06 * a) * (1 - sinus)
        E += fib * (0.62 * (1 + 0.3 * fibre) - E)
        Hd += fib * (0.025 - Hd)
        E += loose * (np.maximum(0.14 * (1 + 0.8 * fibre), 0.01) - E)
        Hd += loose * (0.012 - Hd)
        E += necro * (0.66 * (1 + 0.1 * blobs) - E)
        Hd += necro * (0.06 * (1 + 0.5 * fibre) - Hd)
        keep = 1 - clear
        E *= keep
        Hd += nuclei * (1 + 0.25 * blobs)  # chromatin texture
        Hd *= keep
        E += 1.1 * np.clip(blood * 2.2 - 0.6 + 0.5 * blobs, 0, 1) * blood
        scale = win.field(self.od) * tissue
        E *= scale
        Hd *= scale
        return tissue, whole, viable, E, Hd, win.field(self.focus)

    @staticmethod
    def _defocus(dyes, focus):
        """Blur the dye maps in place where ``focus`` > 0: towards sigma 1.5 px (focus 1), 3.3 px (2).

        Only the rectangle around out-of-focus pixels is filtered; the filters reach 11 px, less
        than ``PAD``, so a window's pixels do not depend on where the window ends.
        """
        out = focus > 0.02
        rows, cols = np.flatnonzero(out.any(1)), np.flatnonzero(out.any(0))
        if rows.size == 0:
            return
        r0, r1 = max(rows.min() - PAD, 0), rows.max() + PAD + 1
        c0, c1 = max(cols.min() - PAD, 0), cols.max() + PAD + 1
        f = focus[r0:r1, c0:c1]
        f1 = np.clip(f, 0, 1) * (f > 0.02)  # exactly 0 where the window may not have filtered
        f2 = np.clip(f - 1, 0, 1) if f.max() > 1 else None
        for d in dyes:
            d = d[r0:r1, c0:c1]
            b1 = ndimage.gaussian_filter(d, 1.5, truncate=3.0)  # reach 5 px
            b2 = ndimage.gaussian_filter(b1, 2.9, truncate=2.2) if f2 is not None else None  # reach 5 + 6 px
            d += f1 * (b1 - d)
            if b2 is not None:
                d += f2 * (b2 - d)

    def _colour(self, win, E, Hd, out):
        """Beer-Lambert colour of a window's dye maps, with ink, glass tint, stripes and noise."""
        pen = (
            win.field(self.pen) * (0.85 + 0.15 * win.texture("blobs", self.offsets["blobs"]))
            if self.pen is not None
            else None
        )
        gain = self.stripes[1][np.clip(win.xs // self.stripes[0], 0, len(self.stripes[1]) - 1)]
        grain = self.noise_gray * win.texture("grain", self.offsets["grain"])
        for ch in range(3):
            od = Hd * -self.h_vec[ch]
            od -= E * self.e_vec[ch]
            if pen is not None:
                od -= pen * self.ink[ch]
            np.exp(od, out=od)
            od *= self.glass[ch] * gain
            od += grain
            np.clip(od, 0, 255, out=od)
            out[..., ch] = np.rint(od)

    def render(self, x0, y0, w, h):
        """Level-0 pixels of a region; see :func:`render_region`.

        Draws the region with a margin of ``PAD`` px (for the focus blur), row chunks at a time
        so that the per-pixel arithmetic stays in the processor's cache.
        """
        X0, Y0 = x0 - PAD, y0 - PAD
        xs, ys = np.arange(X0, x0 + w + PAD), np.arange(Y0, y0 + h + PAD)
        shape = (len(ys), len(xs))
        nuclei, clear = self._objects(X0, Y0, shape)
        lumen, blood = self._lumens(X0, Y0, shape)
        E, Hd, focus = (np.empty(shape, np.float32) for _ in range(3))
        masks = [np.empty(shape, bool) for _ in range(3)]
        xaxis = _axis(xs, self.grid_shape[1])
        for r0 in range(0, shape[0], CHUNK):
            rs = slice(r0, r0 + CHUNK)
            win = _Window(xs, ys[rs], self.grid_shape, xaxis)
            *m, E[rs], Hd[rs], focus[rs] = self._pixels(win, nuclei[rs], clear[rs], lumen[rs], blood[rs])
            for dst, src in zip(masks, m):
                dst[rs] = src
        self._defocus((E, Hd), focus)
        rgb = np.empty((h, w, 3), np.uint8)
        cols = slice(PAD, PAD + w)
        for r0 in range(0, h, CHUNK):
            rs = slice(PAD + r0, PAD + min(r0 + CHUNK, h))
            win = _Window(xs[cols], ys[rs], self.grid_shape)
            self._colour(win, E[rs, cols], Hd[rs, cols], rgb[r0 : r0 + CHUNK])
        return (rgb, *(m[PAD : PAD + h, cols] for m in masks))


def render_region(scene, x0, y0, w, h):
    """Render level-0 pixels of a region of a slide.

    Any region gives the pixels that region has in the whole slide (the writer draws strips).

    Args:
        scene: the slide (a :class:`Scene`).
        x0, y0: top-left corner, level-0 pixels.
        w, h: size, level-0 pixels.

    Returns:
        ``(rgb, tissue, whole, viable)``: an ``(h, w, 3)`` uint8 image and three boolean maps.
    """
    return scene.render(x0, y0, w, h)


# ---------------------------------------------------------------------------------------------
# Writing slides and masks tile by tile
# ---------------------------------------------------------------------------------------------


def _shrink4(rgb):
    """Box-average an RGB strip by 4 (rows and columns a multiple of 4 are used), rounded like
    :func:`helpers.wsi.slides.box_reduce`, by adding strided slices (several times faster)."""
    h, w = rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4
    a = rgb[:h, :w].astype(np.uint16)
    rows = a[0::4] + a[1::4] + a[2::4] + a[3::4]
    s = rows[:, 0::4] + rows[:, 1::4] + rows[:, 2::4] + rows[:, 3::4]
    return ((s + 8) >> 4).astype(np.uint8)


def _pad_tile(a, tile=TILE):
    """A full ``tile`` x ``tile`` tile from a smaller edge piece (RGB padded white, masks 0)."""
    if a.shape[0] == tile and a.shape[1] == tile:
        return a
    out = np.full((tile, tile) + a.shape[2:], 255 if a.ndim == 3 else 0, a.dtype)
    out[: a.shape[0], : a.shape[1]] = a
    return out


def _tiles_of(strip, tile=TILE):
    """The tiles of a strip of ``tile`` rows, left to right."""
    for x in range(0, strip.shape[1], tile):
        yield _pad_tile(strip[:, x : x + tile], tile)


def _aperio_description(w, h, level_w=None, level_h=None, magnify=1):
    """An Aperio ImageDescription: level 0 (with AppMag and MPP) or a lower level."""
    # 'helpers.synthetic' is a fixed name in the slides' bytes (their hashes key the demo's caches),
    # not this module's path
    head = f"Aperio Image Library v10.0.50 (synthetic demo, helpers.synthetic v{GENERATOR_VERSION})\r\n"
    if level_w is None:
        return (
            head + f"{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) JPEG/RGB Q=90"
            f"|AppMag = {DEMO_MAGNIFICATION * magnify}|MPP = {DEMO_MPP / magnify:.4f}|Filename = synthetic"
        )
    return head + f"{w}x{h} -> {level_w}x{level_h} - ({TILE}x{TILE}) JPEG/RGB Q=90"


def _reserved_memmap(path, shape):
    """A uint8 ``.npy`` memory map whose disk blocks are reserved up front: a full disk is then an
    ``OSError`` here, not a SIGBUS that kills the process halfway through writing the map."""
    arr = np.lib.format.open_memmap(path, "w+", np.uint8, shape)
    with open(path, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    return arr


class _Pyramid:
    """One slide's levels while :func:`write_case` writes them.

    Level 0 is rendered strip by strip; each lower level (downsamples 4, 16, 64, as long as it
    is at least 64 px) is kept in an on-disk buffer, filled by shrinking the level above it as
    that one is written; the mask strips wait on disk until the slide is written.

    Args:
        spec: the slide.
        scene: its :class:`Scene`.
        tmp_slide: the temporary slide file (the buffers and mask strips lie beside it).
        quality: JPEG quality of the slide's tiles.
        masks: keep the masks, for :meth:`write_masks`.
    """

    def __init__(self, spec, scene, tmp_slide, quality, masks):
        self.spec, self.scene, self.tmp, self.quality, self.masks = spec, scene, tmp_slide, quality, masks
        mag = spec.magnify
        self.W, self.H = W, H = spec.width * mag, spec.height * mag
        self.dims = [(W, H)]
        while min(self.dims[-1]) // 4 >= 64 and len(self.dims) < 4:
            self.dims.append((self.dims[-1][0] // 4, self.dims[-1][1] // 4))
        self.bufs, self.mask_files = [], {}

    def write_slide(self):
        """Write the slide's every level into the temporary slide file."""
        W, H, mag = self.W, self.H, self.spec.magnify
        for i, (lw, lh) in enumerate(self.dims[1:]):
            self.bufs.append(_reserved_memmap(f"{self.tmp}.l{i + 1}.npy", (lh, lw, 3)))
        res = (1e4 * mag / DEMO_MPP, 1e4 * mag / DEMO_MPP)
        with tifffile.TiffWriter(self.tmp, bigtiff=W * H * 3 > 2**31) as tw:
            self._write_level(
                tw,
                self._level0_tiles(),
                (W, H),
                _aperio_description(W, H, magnify=mag),
                resolution=res,
                resolutionunit="CENTIMETER",
            )
            for f in self.mask_files.values():
                f.close()
            for lvl, (lw, lh) in enumerate(self.dims[1:], start=1):
                self._write_level(tw, self._level_tiles(lvl), (lw, lh), _aperio_description(W, H, lw, lh))

    def _write_level(self, tw, tiles, size, description, **extra):
        """One level of ``size`` ``(w, h)`` from its ``tiles``, JPEG-compressed."""
        tw.write(
            tiles,
            shape=(size[1], size[0], 3),
            dtype=np.uint8,
            tile=(TILE, TILE),
            compression="jpeg",
            compressionargs={"level": self.quality},
            photometric="rgb",
            description=description,
            **extra,
            metadata=None,
        )

    def _level0_tiles(self):
        """Level 0's tiles, rendered strip by strip; each strip also fills the next level's
        buffer and, with masks, the mask strips on disk."""
        spec, mag, bufs = self.spec, self.spec.magnify, self.bufs
        for y0 in range(0, spec.height, STRIP):
            y, h = y0 * mag, min(STRIP, spec.height - y0) * mag
            rgb, _, whole, viable = (
                np.repeat(np.repeat(a, mag, axis=0), mag, axis=1) if mag > 1 else a
                for a in render_region(self.scene, 0, y0, spec.width, h // mag)
            )
            if self.masks:  # mask strips wait on disk until the slide is written
                for name, m in (("whole", whole), ("viable", viable)):
                    if name not in self.mask_files:
                        self.mask_files[name] = open(f"{self.tmp}.{name}.raw", "wb")  # noqa: SIM115 (closed in write_slide)
                    self.mask_files[name].write(m.view(np.uint8).tobytes())
            if bufs:
                r = _shrink4(rgb)
                bufs[0][y // 4 : y // 4 + r.shape[0], : r.shape[1]] = r
            for ty in range(0, h, TILE):
                yield from _tiles_of(rgb[ty : ty + TILE])

    def _level_tiles(self, level):
        """The tiles of ``level`` (1, 2 ...) from its buffer, filling the next level's."""
        bufs = self.bufs
        src = bufs[level - 1]
        for y in range(0, src.shape[0], STRIP):
            strip = np.asarray(src[y : y + STRIP])
            if level < len(bufs):
                r = _shrink4(strip)
                bufs[level][y // 4 : y // 4 + r.shape[0], : r.shape[1]] = r
            for ty in range(0, strip.shape[0], TILE):
                yield from _tiles_of(strip[ty : ty + TILE])

    def write_masks(self, paths):
        """Write the masks kept on disk to ``paths["whole"]`` and ``paths["viable"]``."""
        W, H = self.W, self.H
        for name in ("whole", "viable"):
            raw = np.memmap(f"{self.tmp}.{name}.raw", np.uint8, "r", shape=(H, W))
            _write_mask(paths[name], lambda raw=raw: (np.asarray(raw[y : y + TILE]) for y in range(0, H, TILE)), (H, W))
            del raw

    def remove_buffers(self):
        """Delete the level buffers and the mask strips (after success or failure)."""
        for b in self.bufs:
            fn = b.filename
            del b
            Path(fn).unlink(missing_ok=True)
        self.bufs.clear()
        for name in ("whole", "viable"):
            Path(f"{self.tmp}.{name}.raw").unlink(missing_ok=True)


def write_case(spec, folder, quality=90, masks=True):
    """Write one slide (and its masks) into ``folder``, each file atomically.

    The slide gets levels at downsamples 1, 4, 16 and 64 (as long as a level is at least 64
    px); each level is built from the one above it, strip by strip, through a small on-disk
    buffer, so memory stays at a few strips whatever the slide's size.

    Args:
        spec: the slide.
        folder: destination folder.
        quality: JPEG quality of the slide's tiles.
        masks: also write ``_whole.tif`` and ``_viable.tif``.

    Returns:
        The paths written: ``{"slide": ..., "whole": ..., "viable": ...}`` (no masks: only
        ``slide``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scene = Scene(spec)
    paths = {"slide": folder / f"{spec.case_id}.svs"}
    if masks:
        paths.update(whole=folder / f"{spec.case_id}_whole.tif", viable=folder / f"{spec.case_id}_viable.tif")
    with atomic_path(paths["slide"], suffix=".svs") as tmp_slide:
        pyramid = _Pyramid(spec, scene, tmp_slide, quality, masks)
        try:
            pyramid.write_slide()
            if masks:
                pyramid.write_masks(paths)
        finally:
            pyramid.remove_buffers()
    return paths


def _write_mask(path, strips, shape):
    """Write a 0/1 uint8 mask as a tiled, deflated TIFF (atomically) from row strips of TILE rows."""
    H, W = shape

    def tiles():
        for strip in strips():
            yield from _tiles_of(strip, TILE)

    with atomic_path(path, suffix=".tif") as tmp, tifffile.TiffWriter(tmp, bigtiff=W * H > 2**31) as tw:
        tw.write(
            tiles(),
            shape=(H, W),
            dtype=np.uint8,
            tile=(TILE, TILE),
            compression="zlib",
            compressionargs={"level": 1},
            photometric="minisblack",
            metadata=None,
        )


def _write_plain(spec, folder, kind, masks):
    """Write a small slide as a plain image (``png``/``jpg``) or a generic tiled TIFF (``tif``).

    PNG masks go beside a PNG slide (``_whole.png``); other kinds get TIFF masks. The generic
    TIFF has no Aperio description and no resolution: readers find no microns per pixel.
    """
    folder = Path(folder)
    rgb, _, whole, viable = render_region(Scene(spec), 0, 0, spec.width, spec.height)
    path = folder / f"{spec.case_id}.{kind}"
    with atomic_path(path, suffix=f".{kind}") as tmp:
        if kind == "tif":
            tifffile.imwrite(
                tmp,
                rgb,
                tile=(TILE, TILE),
                compression="jpeg",
                compressionargs={"level": 90},
                photometric="rgb",
                metadata=None,
            )
        else:
            Image.fromarray(rgb).save(
                tmp, format="PNG" if kind == "png" else "JPEG", **({"quality": 90} if kind == "jpg" else {})
            )
    out = {"slide": path}
    for name, m in (("whole", whole), ("viable", viable)) if masks else ():
        m = m.view(np.uint8)
        if kind == "png":
            out[name] = folder / f"{spec.case_id}_{name}.png"
            with atomic_path(out[name], suffix=".png") as tmp:
                Image.fromarray(m).save(tmp, format="PNG")
        else:
            out[name] = folder / f"{spec.case_id}_{name}.tif"
            _write_mask(out[name], lambda m=m: (m[y : y + TILE] for y in range(0, m.shape[0], TILE)), m.shape)
    return out


def _write_job(args):
    """Write one ``(kind, spec, folder, masks)`` job; return the slide id and the seconds taken."""
    kind, spec, folder, masks = args
    t = time.perf_counter()
    if kind != "svs" and spec.magnify != 1:
        raise InputError(f"{spec.case_id}: only .svs slides can be written at magnify {spec.magnify}")
    if kind == "svs":
        write_case(spec, folder, masks=masks)
    else:
        _write_plain(spec, folder, kind, masks)
    return spec.case_id, time.perf_counter() - t


def _write_all(jobs, workers, desc, progress):
    """Run ``(kind, spec, folder, masks)`` jobs, largest first, in ``workers`` processes."""
    jobs = sorted(jobs, key=lambda j: -j[1].width * j[1].height)
    bar = progress_bar(len(jobs), desc, "slide", progress)
    try:
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                for _ in pool.imap_unordered(_write_job, jobs):
                    bar.update()
        else:
            for j in jobs:
                _write_job(j)
                bar.update()
    finally:
        bar.close()


def _write_labels(path, header, rows):
    """Write a ``labels.csv`` with ``header`` and ``rows``."""
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(header)
        wr.writerows(rows)


def _manifest(cases):
    """What a demo folder's ``manifest.json`` holds: the generator version and the cases."""
    return {"generator_version": GENERATOR_VERSION, "cases": [asdict(c) for c in cases]}


def _cached(folder, want):
    """Whether ``folder`` holds a dataset whose manifest is ``want``."""
    mf = Path(folder) / "manifest.json"
    try:
        return json.loads(mf.read_text()) == want
    except (OSError, json.JSONDecodeError):
        return False


def ensure_demo_dataset(folder=None, cases=None, workers=None, progress=True):
    """Return the demo dataset's folder, generating it first if it is missing or stale.

    The dataset is written into a temporary folder and renamed into place at the end, so an
    interrupted generation leaves nothing half-written; a manifest (generator version and the
    case list) decides whether a cached dataset can be reused.

    Args:
        folder: where the dataset lives (default :func:`helpers.core.paths.demo_data_dir`).
        cases: the cases to write (default :func:`demo_cases`).
        workers: processes to use (default: all cores, at most one per case).
        progress: show a progress bar (stderr).

    Returns:
        The dataset folder (a :class:`pathlib.Path`).
    """

    folder = Path(folder) if folder is not None else demo_data_dir()
    cases = list(cases) if cases is not None else demo_cases()
    want = _manifest(cases)
    if _cached(folder, want):
        return folder
    remove_stale_temporaries(folder.parent)
    workers = workers or min(len(cases), usable_cpus())
    with atomic_dir(folder) as tmp:
        _write_all([("svs", c, tmp, True) for c in cases], workers, "demo slides", progress)
        _write_labels(
            tmp / "labels.csv",
            ["slide_id", "label", "patient_id"],
            [[c.case_id, int(c.tumor), c.patient_id] for c in cases],
        )
        (tmp / "manifest.json").write_text(json.dumps(want, indent=2) + "\n")
        (tmp / "README.txt").write_text(
            "Synthetic PAIP 2019-like demo slides written by helpers.demo.synthetic; regenerate with\n"
            "python -c 'import helpers.demo.synthetic as s; s.ensure_demo_dataset()'.\n"
        )
    return folder


# ---------------------------------------------------------------------------------------------
# The dataset zoo: small, odd folders for robustness tests
# ---------------------------------------------------------------------------------------------


def _zoo_spec(rng, case_id, w, h, tumor, patient="", **style):
    """A small slide with a random but plausible style."""
    base = dict(
        patient_id=patient,
        tumor_share=float(rng.uniform(0.3, 0.7)) if tumor else 0.0,
        grade=float(rng.uniform(0.2, 0.9)),
        lab=int(rng.integers(0, 4)),
        necrosis=float(rng.uniform(0, 0.2)),
        mimics=float(rng.uniform(0.1, 0.7)),
        fibrosis=float(rng.uniform(0, 0.8)),
        tissue_share=float(rng.uniform(0.5, 0.8)),
        blur=float(rng.uniform(0, 0.4)),
    )
    base.update(style)
    return CaseSpec(case_id, int(w), int(h), bool(tumor), int(rng.integers(0, 2**31)), **base)


def _zoo_mixed(rng, folder):
    """The ``mixed`` shape: writes ``labels.csv``, returns the slides' write jobs."""
    rows = [  # id, kind, w, h, tumour, patient, masks, listed, style
        ("mix_01", "svs", 2900, 2300, True, "Q01", True, True, {}),
        ("mix_02", "svs", 2200, 2700, False, "Q01", True, True, {}),
        ("mix_03", "svs", 2600, 2150, True, "Q02", True, True, {"pen": 1}),
        ("mix_04", "png", 1500, 1200, True, "Q03", True, True, {}),
        ("mix_05", "svs", 700, 660, True, "Q03", True, True, {}),
        ("mix_06", "svs", 2400, 2100, True, "Q04", True, True, {"pale_tumor": 0.5}),
        ("mix_07", "jpg", 1800, 1400, False, "Q05", False, True, {}),
        ("mix_08", "svs", 1200, 1000, False, "Q06", True, True, {"tissue_share": 0.0}),
        ("mix_09", "svs", 2300, 2500, False, "Q07", True, True, {"pale_stroma": 0.3}),
        ("mix_10", "svs", 100, 90, False, "Q08", True, False, {}),
    ]
    jobs, labels = [], []
    for sid, kind, w, h, tumor, patient, masks, listed, style in rows:
        jobs.append((kind, _zoo_spec(rng, sid, w, h, tumor, patient, **style), folder, masks))
        if listed:
            labels.append([sid, int(tumor), patient])
    _write_labels(folder / "labels.csv", ["slide_id", "label", "patient_id"], labels)
    return jobs


def _zoo_unannotated(rng, folder):
    """The ``unannotated`` shape's write jobs (no labels, no masks)."""
    rows = [
        ("un_01", "svs", 2000, 1600, True),
        ("un_02", "tif", 1500, 1800, False),
        ("un_03", "jpg", 1400, 1100, True),
        ("un_04", "svs", 2400, 2000, False),
    ]
    return [(kind, _zoo_spec(rng, sid, w, h, t), folder, False) for sid, kind, w, h, t in rows]


def _zoo_many(rng, folder):
    """The ``many`` shape: writes ``labels.csv`` (patients in ``case_id``), returns the jobs."""
    jobs, labels = [], []
    patient_tumor = rng.random(70) < 0.45
    slides_of = np.bincount(rng.integers(0, 70, 200 - 140), minlength=70) + 2  # 2+ slides each, 200 in all
    i = 0
    for p in range(70):
        first = True
        for _ in range(slides_of[p]):
            i += 1
            tumor = bool(patient_tumor[p] and (first or rng.random() < 0.6))
            first = False
            w, h = rng.integers(288, 1057, 2)
            spec = _zoo_spec(rng, f"many_{i:03d}", w, h, tumor, f"C{p + 1:03d}")
            jobs.append(("svs", spec, folder, True))
            labels.append([spec.case_id, int(tumor), spec.patient_id])
    _write_labels(folder / "labels.csv", ["slide_id", "label", "case_id"], labels)
    return jobs


def _zoo_case_labels(rng, folder):
    """The ``case_labels`` shape: writes the old ``case_id,label`` file, returns the jobs."""
    rows = [
        ("cl_01", 2200, 1800, True),
        ("cl_02", 1600, 2100, False),
        ("cl_03", 2500, 2300, True),
        ("cl_04", 1900, 1500, False),
        ("cl_05", 2100, 2600, True),
    ]
    _write_labels(folder / "labels.csv", ["case_id", "label"], [[sid, int(t)] for sid, _, _, t in rows])
    return [("svs", _zoo_spec(rng, sid, w, h, t), folder, True) for sid, w, h, t in rows]


def _zoo_no_tumour(rng, folder):
    """The ``no_tumour`` shape: writes ``labels.csv`` (all 0), returns the jobs."""
    rows = [
        ("nt_01", 2400, 2000, "N1"),
        ("nt_02", 1500, 1900, "N1"),
        ("nt_03", 2600, 2200, "N2"),
        ("nt_04", 1800, 1300, "N3"),
        ("nt_05", 2100, 2500, "N4"),
    ]
    _write_labels(folder / "labels.csv", ["slide_id", "label", "patient_id"], [[sid, 0, p] for sid, _, _, p in rows])
    return [("svs", _zoo_spec(rng, sid, w, h, False, p), folder, True) for sid, w, h, p in rows]


def _zoo_nested(rng, folder):
    """The ``nested`` shape: a delivery in subfolders, each slide with its masks beside it, and
    ``labels.csv`` at the top; returns the jobs."""
    rows = [  # id, subfolder, w, h, tumour, patient
        ("ne_01", "batch_1", 2200, 1800, True, "P1"),
        ("ne_02", "batch_1", 1700, 2000, False, "P2"),
        ("ne_03", "batch_1", 2100, 1900, False, "P3"),
        ("ne_04", "batch_2", 2400, 2100, True, "P4"),
        ("ne_05", "batch_2", 1900, 1600, False, "P5"),
        ("ne_06", "batch_2/rescans", 2000, 2300, True, "P6"),
    ]
    _write_labels(
        folder / "labels.csv", ["slide_id", "label", "patient_id"], [[sid, int(t), p] for sid, _, _, _, t, p in rows]
    )
    jobs = []
    for sid, sub, w, h, t, p in rows:
        (folder / sub).mkdir(parents=True, exist_ok=True)
        jobs.append(("svs", _zoo_spec(rng, sid, w, h, t, p), folder / sub, True))
    return jobs


def _zoo_mixed_mpp(rng, folder):
    """The ``mixed_mpp`` shape: six tissues, each scanned at 20x (``<id>_20x.svs``, 0.5 um/px) and
    at 40x (``<id>_40x.svs``, 0.25 um/px, twice the pixels a side); writes ``labels.csv`` (a
    patient's two scans share a patient) and returns the jobs."""
    rows = [  # id, w, h (at 20x), tumour, patient
        ("mm_01", 2300, 2100, True, "M1"),
        ("mm_02", 2100, 2400, False, "M2"),
        ("mm_03", 2500, 2100, True, "M3"),
        ("mm_04", 2100, 2200, True, "M4"),
        ("mm_05", 2200, 2100, False, "M5"),
        ("mm_06", 2400, 2300, True, "M6"),
    ]
    jobs, labels = [], []
    for sid, w, h, t, p in rows:
        spec = _zoo_spec(rng, sid, w, h, t, p)
        for m, mag in ((1, "20x"), (2, "40x")):
            jobs.append(("svs", replace(spec, case_id=f"{sid}_{mag}", magnify=m), folder, True))
            labels.append([f"{sid}_{mag}", int(t), p])
    _write_labels(folder / "labels.csv", ["slide_id", "label", "patient_id"], labels)
    return jobs


def _zoo_all_tumour(rng, folder):
    """The ``all_tumour`` shape (PAIP 2019's, in small): writes ``labels.csv`` (all 1), returns
    the jobs."""
    rows = [("at_01", 2400, 2000), ("at_02", 1700, 2100), ("at_03", 2600, 2200)]
    rows += [("at_04", 2000, 1500), ("at_05", 2200, 2500), ("at_06", 1900, 2300)]
    patients = [f"T{i + 1}" for i in range(len(rows))]
    _write_labels(
        folder / "labels.csv", ["slide_id", "label", "patient_id"], [[r[0], 1, p] for r, p in zip(rows, patients)]
    )
    return [
        ("svs", _zoo_spec(rng, sid, w, h, True, p, tumor_share=0.4), folder, True)
        for (sid, w, h), p in zip(rows, patients)
    ]


_ZOO = {
    "mixed": _zoo_mixed,
    "unannotated": _zoo_unannotated,
    "many": _zoo_many,
    "case_labels": _zoo_case_labels,
    "no_tumour": _zoo_no_tumour,
    "nested": _zoo_nested,
    "mixed_mpp": _zoo_mixed_mpp,
    "all_tumour": _zoo_all_tumour,  # last: a shape's seed is its place in this list
}

#: The shapes :func:`write_zoo_dataset` knows.
ZOO_SHAPES = tuple(_ZOO)


def write_zoo_dataset(shape, folder, seed=0):
    """Write (or reuse) a small dataset folder of an odd shape, for robustness tests.

    Sizes suit a "smoke" run at patch size 32 and scales 4x, 16x, 64x (footprints 128, 512
    and 2,048 level-0 px). Like :func:`ensure_demo_dataset`, the folder is written atomically
    and reused while its manifest (generator version, shape, seed) matches. Shapes:

    - ``mixed``: a messy user folder of 10 slides, 100-2,900 px, 8 patients (``Q01``-``Q08``):
      ``.svs`` slides with ``_whole.tif``/``_viable.tif`` masks; ``mix_04.png`` with
      ``_whole.png``/``_viable.png`` masks; ``mix_07.jpg`` without masks; ``mix_08.svs`` blank
      (glass only, empty masks); ``mix_10.svs`` tiny (100 x 90 px, no patch at any scale);
      ``mix_05.svs`` of 700 x 660 px (a patch at 4x only); patients with several slides (one
      with a tumour and a tumour-free slide). ``labels.csv`` (``slide_id,label,patient_id``)
      lists all but ``mix_10``: 5 tumour slides of 4 patients, 4 tumour-free slides, 3
      patients of them tumour-free.
    - ``unannotated``: 4 slides, no masks, no ``labels.csv``: two ``.svs``, ``un_02.tif`` (a
      generic tiled TIFF without microns per pixel) and ``un_03.jpg``.
    - ``many``: 200 ``.svs`` slides of 288-1,056 px a side with masks, 70 patients of two or
      more slides (about three; 45 % of the patients have tumour); ``labels.csv`` is
      ``slide_id,label,case_id`` with the patient in ``case_id``.
    - ``case_labels``: 5 ``.svs`` slides with masks and the older ``labels.csv`` format
      ``case_id,label`` (one case = one slide).
    - ``no_tumour``: 5 annotated ``.svs`` slides whose masks are all empty, labels all 0
      (``slide_id,label,patient_id``, 4 patients).
    - ``nested``: 6 ``.svs`` slides with masks in ``batch_1/``, ``batch_2/`` and
      ``batch_2/rescans/`` (3 tumour, 3 tumour-free, 6 patients), ``labels.csv`` at the top.
    - ``mixed_mpp``: a two-scanner cohort: 6 tissues (4 tumour, 6 patients), each as a 20x
      scan ``mm_0k_20x.svs`` (0.5 um/px, 2,100-2,500 px) and a 40x scan ``mm_0k_40x.svs``
      (0.25 um/px, twice the pixels a side), with masks.
    - ``all_tumour``: PAIP 2019's shape in small: 6 annotated ``.svs`` slides of 6 patients,
      1,500-2,600 px, every one with tumour beside tumour-free tissue (``labels.csv`` all 1).

    Args:
        shape: one of :data:`ZOO_SHAPES`.
        folder: the folder to write (replaced as a whole if stale).
        seed: varies the slides' content (for ``many`` also their sizes, patients and labels);
            the other shapes' files, sizes and labels stay the same.

    Returns:
        The folder (a :class:`pathlib.Path`).

    Raises:
        InputError: an unknown shape.
    """
    if shape not in _ZOO:
        raise InputError(f"unknown zoo dataset shape {shape!r}; choose one of {', '.join(ZOO_SHAPES)}")
    folder = Path(folder)
    want = {"generator_version": GENERATOR_VERSION, "zoo": shape, "seed": int(seed)}
    if _cached(folder, want):
        return folder
    remove_stale_temporaries(folder.parent)
    with atomic_dir(folder) as tmp:
        rng = np.random.default_rng([int(seed), ZOO_SHAPES.index(shape)])
        jobs = _ZOO[shape](rng, tmp)
        _write_all(jobs, usable_cpus() if len(jobs) > 20 else 1, f"zoo {shape}", False)
        (tmp / "manifest.json").write_text(json.dumps(want, indent=2) + "\n")
    return folder
