"""Tissue detection: which pixels of a patch are tissue, and which patches are kept.

Section 3.3 of the paper drops the patches of white background with an "optimal threshold for
each patch". Two ways to choose that threshold live here:

- **per patch** (the paper, as NOTES.md item 7 reads it): Otsu's threshold on each patch's
  grayscale plus the white-glass rule (:func:`tissue_fractions`). On a patch that is mostly
  tissue, Otsu splits the dark nuclei from the pale stroma; when the pale class is brighter than
  ``glass_level`` it is counted as glass, and real tissue is dropped;
- **per slide** (:func:`slide_tissue_threshold`, then :func:`tissue_fractions_at`): one
  threshold per slide, measured once on a small thumbnail just below the slide's own glass (the
  brightest clear peak of its gray histogram); a patch's tissue fraction is then its share of
  pixels at or below that threshold. Pale stroma lies between the nuclei and the glass, so it
  stays tissue, and glass stays glass whatever else the patch holds. TIAToolbox's Otsu tissue
  masker and CLAM also decide tissue once per slide on a thumbnail (Otsu on the grayscale,
  resp. a threshold on the saturation); ``method="otsu"`` here is that variant.

For measurement only, :func:`reference_tissue_mask` marks tissue by colour (optical density or
saturation, a rule that uses neither Otsu nor a gray threshold) and :func:`compare_methods`
scores methods against it, or against an exact tissue map, over a slide's patch grid.

Used by notebook 02, ``helpers.patching.patches`` and ``bench/tissue_benchmark.py``.
"""

import time

import numpy as np
from scipy import ndimage

#: At most about this many pyramid-level pixels are read at once for a slide's thumbnail.
READ_PIXELS = 2**24

# ---------------------------------------------------------------------------------------------
# Per patch: Otsu with the white-glass rule (the paper), vectorised over many patches
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


def otsu_tissue_masks(gray_patches, glass_level=210):
    """The tissue pixels behind :func:`tissue_fractions` (their mean is its fraction).

    Args:
        gray_patches: ``(n, h, w)`` uint8 patches.
        glass_level: as :func:`tissue_fractions`.

    Returns:
        ``(n, h, w)`` bool masks: the dark Otsu class where only the bright class is glass,
        the pixels at or below ``glass_level`` where neither class is, nothing on bare glass.
    """
    g = np.asarray(gray_patches)
    if g.shape[0] == 0:
        return np.zeros(g.shape, bool)
    n = g.shape[0]
    idx = (np.arange(n, dtype=np.int64)[:, None] * 256 + g.reshape(n, -1)).ravel()
    hist = np.bincount(idx, minlength=n * 256).reshape(n, 256)  # as tissue_fractions
    t, _, m0, m1 = otsu_thresholds(hist)
    # Per patch, the gray level at or below which a pixel is tissue (-1: none is).
    cut = np.where(m0 >= glass_level, -1, np.where(m1 >= glass_level, t, glass_level))
    return g <= cut[:, None, None]


# ---------------------------------------------------------------------------------------------
# Per slide: one threshold just below the slide's own glass, measured on a thumbnail
# ---------------------------------------------------------------------------------------------


def find_glass(hist, min_glass=200, min_share=0.01):
    """The glass of a slide: the brightest clear peak of its gray histogram.

    Glass is the brightest thing on a brightfield slide and very even, so it makes a narrow
    peak at the top of the histogram; tissue, pale or not, lies below it.

    Args:
        hist: a 256-bin histogram of gray levels (e.g. of a thumbnail).
        min_glass: glass is never darker than this.
        min_share: a peak needs this share of all pixels within 2 gray levels of it.

    Returns:
        ``(level, spread)``: the peak's gray level and its noise (the distance above the peak
        holding 68 % of the pixels there: one standard deviation for Gaussian noise; the side
        above the peak is used because tissue never lies there), or ``None`` when the slide
        shows no glass (all tissue, or empty input).
    """
    hist = np.asarray(hist, dtype=np.float64)
    if hist.sum() == 0:
        return None
    h = hist.copy()
    h[254:] = 0  # saturated white (the outside of a scan) is not glass
    near = np.convolve(h, np.ones(5), mode="same")  # pixels within +-2 levels
    padded = np.pad(near, 1, constant_values=-1)
    peak = (near >= padded[:-2]) & (near >= padded[2:]) & (near >= min_share * hist.sum())
    levels = np.flatnonzero(peak[min_glass:]) + min_glass
    if levels.size == 0:
        return None
    level = int(levels[-1])
    upper = np.cumsum(h[level:]) / max(1.0, h[level:].sum())
    spread = float(np.searchsorted(upper, 0.683))
    return level, spread


def threshold_from_histogram(hist, method="glass", bounds=(200, 240), margin=10, spread_factor=4, min_glass=200):
    """A slide's tissue threshold from the gray histogram of its thumbnail.

    Args:
        hist: 256-bin histogram of the slide's gray levels.
        method: ``"glass"``: just below the glass, ``level - max(margin, spread_factor *
            spread)`` (see :func:`find_glass`); ``"otsu"``: Otsu's threshold of the whole
            image (TIAToolbox's way), never above the glass cut.
        bounds: ``(low, high)`` limits of the result: below 200, stained tissue would be
            called glass; above 240, the glass of most scanners would count as tissue.
        margin: the smallest distance below the glass peak (gray levels). A thumbnail averages
            the scanner's noise away, so the floor has to cover full-resolution noise.
        spread_factor: how many noise spreads below the glass the cut lies at least.
        min_glass: passed to :func:`find_glass`.

    Returns:
        The threshold (float): a pixel at or below it is tissue. ``bounds[1]`` when the image
        shows no glass (everything not as bright as glass is tissue).
    """
    hist = np.asarray(hist)
    glass = find_glass(hist, min_glass)
    cap = bounds[1] if glass is None else glass[0] - max(margin, spread_factor * glass[1])
    if method == "glass":
        t = cap
    elif method == "otsu":
        t = min(otsu_thresholds(hist[None])[0][0], cap) if hist.sum() else cap
    else:
        raise ValueError(f"method must be 'glass' or 'otsu', got {method!r}")
    return float(np.clip(t, *bounds))


def slide_tissue_threshold(slide, method="glass", thumbnail_size=1024, **kwargs):
    """A slide's tissue threshold, measured once on its thumbnail (see :func:`threshold_from_histogram`).

    The thumbnail (at most ``thumbnail_size`` pixels a side, as ``Slide.thumbnail``) is read
    with ``Slide.read_region`` in bands of rows from the coarsest pyramid level that serves it,
    and only its gray histogram is kept, so even a slide without a pyramid is never held in
    memory whole. A slide smaller than the thumbnail is read at full resolution.

    Args:
        slide: a :class:`helpers.wsi.slides.Slide`, or a slide path (opened and closed here).
        method: ``"glass"`` (the default) or ``"otsu"``.
        thumbnail_size: the thumbnail's longer side.
        **kwargs: passed to :func:`threshold_from_histogram` (``bounds``, ``margin``, ...).

    Returns:
        The gray level (float) at or below which a pixel is tissue; pass it to
        :func:`tissue_fractions_at`.
    """
    from .slides import Slide

    own = not isinstance(slide, Slide)
    s = Slide(slide) if own else slide
    try:
        W, H = s.dimensions
        ds = max(1.0, max(W, H) / thumbnail_size)
        w, h = max(1, int(W / ds)), max(1, int(H / ds))
        f = ds / s.level_downsamples[s.best_level(ds)]  # pyramid-level pixels per thumbnail pixel
        band = max(1, int(READ_PIXELS // (w * f * f)))  # thumbnail rows per read
        hist = np.zeros(256, np.int64)
        for y in range(0, h, band):
            rgb = s.read_region(0, y * ds, w, min(band, h - y), downsample=ds)
            hist += np.bincount(to_gray(rgb).ravel(), minlength=256)
    finally:
        if own:
            s.close()
    return threshold_from_histogram(hist, method, **kwargs)


def tissue_fractions_at(gray_patches, threshold):
    """Tissue fraction of each grayscale patch at a fixed threshold (e.g. the slide's).

    Args:
        gray_patches: ``(n, h, w)`` uint8 patches (often subsampled).
        threshold: a pixel at or below this gray level is tissue.

    Returns:
        A float array of length ``n`` (empty for no patches).
    """
    g = np.asarray(gray_patches)
    if g.shape[0] == 0:
        return np.zeros(0)
    # Gray levels are whole numbers: "<= 232.7" is "<= 232", and an integer compare is fast.
    t = int(np.clip(np.floor(threshold), -1, 255))
    tissue = g <= t if t >= 0 else np.zeros(g.shape, bool)
    return np.count_nonzero(tissue.reshape(g.shape[0], -1), axis=1) / max(1, g[0].size)


# ---------------------------------------------------------------------------------------------
# For measurement: a reference mask by colour, and a comparison over a slide's patch grid
# ---------------------------------------------------------------------------------------------


def background_colour(rgb, share=0.05):
    """The slide's illumination (the glass's colour): per channel, the median of its brightest pixels.

    Takes the ``share`` brightest pixels (by R + G + B), leaving out pure white (all channels at
    254-255: the outside of a scan), so tinted glass (bluish or yellowish scanners) is measured
    rather than assumed white. On a slide without glass this is its palest tissue.

    Args:
        rgb: ``(..., 3)`` uint8 image of the slide, e.g. its thumbnail.
        share: the brightest share of pixels used.

    Returns:
        A float array ``(R, G, B)``; white (255, 255, 255) for empty input.
    """
    px = np.asarray(rgb).reshape(-1, 3)
    px = px[px.min(axis=1) < 254]
    if len(px) == 0:
        return np.full(3, 255.0)
    total = px.sum(axis=1, dtype=np.int32)
    bright = px[total >= np.quantile(total, 1 - share)]
    return np.median(bright, axis=0).astype(np.float64)


def reference_tissue_mask(rgb, background=None, od_threshold=0.15, saturation_threshold=0.03, radius=1):
    """Tissue by colour, independent of both methods above (measurement only).

    The image is first divided by the slide's illumination (``background``, the glass's
    colour, as the incident light ``I0`` of Beer-Lambert's law), so glass becomes neutral
    white whatever the scanner's white balance. Then a pixel is tissue when it absorbs light
    or is coloured:

    - its optical density ``OD = -log10((I + 1) / 256)`` exceeds ``od_threshold`` in any
      channel. Macenko et al. (2009, "A method for normalizing histology slides for
      quantitative analysis", ISBI) drop pixels below an OD of beta = 0.15 as transparent
      background before estimating stains; here that cut marks the stained pixels. OD > 0.15
      means a channel at or below 180, so very pale stroma falls under it, hence:
    - or its HSV saturation ``(max - min) / max`` exceeds ``saturation_threshold``: eosin
      colours pale stroma pink while balanced glass is grey. CLAM (Lu et al. 2021) segments
      tissue by the same test, saturation above 8 of 255 (~0.03) on a median-filtered
      thumbnail; on CMU-1-Small-Region fewer than 0.05 % of glass pixels pass it.

    Then a small morphological opening (drops isolated noisy pixels) and closing (fills
    one-pixel gaps), each with a ``(2 radius + 1)`` square, on an edge-padded copy so the
    image's border is not eroded.

    Args:
        rgb: ``(h, w, 3)`` uint8 image.
        background: the glass's ``(R, G, B)`` (see :func:`background_colour`); ``None``: white.
        od_threshold, saturation_threshold, radius: as above (``radius=0``: no clean-up).

    Returns:
        ``(h, w)`` bool mask.
    """
    rgb = np.asarray(rgb)
    if background is not None:  # white balance, channel by channel through a lookup table
        lut = np.clip(np.round(np.arange(256)[:, None] * 255.0 / np.maximum(background, 1)), 0, 255)
        rgb = np.stack([lut[rgb[..., c], c] for c in range(3)], axis=-1).astype(np.uint8)
    lo = rgb.min(axis=-1).astype(np.int16)
    hi = rgb.max(axis=-1).astype(np.int16)
    # The darkest channel has the largest OD: OD > t  <=>  I + 1 < 256 * 10^-t.
    mask = (lo + 1 < 256 * 10**-od_threshold) | (hi - lo > saturation_threshold * hi)
    if radius > 0 and mask.size:
        r = radius
        box = np.ones((2 * r + 1, 2 * r + 1), bool)
        padded = np.pad(mask, 2 * r, mode="edge")
        padded = ndimage.binary_closing(ndimage.binary_opening(padded, box), box)
        mask = padded[2 * r : -2 * r, 2 * r : -2 * r]
    return mask


def _iou(inter, union):
    """Intersection over union; 1.0 when both sets are empty (they agree)."""
    return float(inter / union) if union else 1.0


def _as_patches(strip, P, k, cols):
    """A strip of one grid row, ``(P, >= cols * P)``, as its ``cols`` patches seen at every
    ``k``-th pixel: ``(cols, P / k, P / k)``."""
    q = P // k
    return strip[::k, ::k][:, : cols * q].reshape(q, cols, q).transpose(1, 0, 2)


class _MethodTally:
    """What :func:`compare_methods` counts, row by row of the grid, for each method against each
    of the others (the reference, and the truth when there is one).

    Args:
        methods: ``{name: function}`` as for :func:`compare_methods`.
        with_truth: whether a truth is scored too (the reference is then scored against it).
        tissue_threshold: a patch is kept when at least this share of it is tissue.
    """

    def __init__(self, methods, with_truth, tissue_threshold):
        self.methods, self.tissue_threshold = methods, tissue_threshold
        self.names = list(methods) + (["reference"] if with_truth else [])
        self.against = ["reference"] + (["truth"] if with_truth else [])
        self.inter = {(m, a): 0 for m in self.names for a in self.against}
        self.union = dict(self.inter)
        self.keep = {m: [] for m in self.names}
        self.ref_keep = {a: [] for a in self.against}
        self.seconds = {m: 0.0 for m in self.names}

    def add_row(self, gray, others):
        """Run every method on a row's ``gray`` patches (timed) and count them against
        ``others`` (``{"reference": masks, "truth": masks}``)."""
        masks = {}
        for m, fn in self.methods.items():
            t0 = time.perf_counter()
            masks[m] = np.asarray(fn(gray), bool)
            self.seconds[m] += time.perf_counter() - t0
        if "truth" in others:
            masks["reference"] = others["reference"]
        for a, ref in others.items():
            self.ref_keep[a].append(ref.mean(axis=(1, 2)) >= self.tissue_threshold)
            for m, mk in masks.items():
                if m == a:
                    continue
                self.inter[m, a] += int(np.count_nonzero(mk & ref))
                self.union[m, a] += int(np.count_nonzero(mk | ref))
        for m, mk in masks.items():
            self.keep[m].append(mk.mean(axis=(1, 2)) >= self.tissue_threshold)

    def results(self, patches):
        """:func:`compare_methods`'s list of dicts, for a grid of ``patches`` patches."""

        def cat(parts):
            return np.concatenate(parts) if parts else np.zeros(0, bool)

        out = []
        for a in self.against:
            r = cat(self.ref_keep[a])
            for m in self.names:
                if m == a:
                    continue
                kp = cat(self.keep[m])
                out.append(
                    {
                        "method": m,
                        "against": a,
                        "patches": patches,
                        "pixel_iou": _iou(self.inter[m, a], self.union[m, a]),
                        "kept": int(kp.sum()),
                        "ref_kept": int(r.sum()),
                        "kept_iou": _iou(int((kp & r).sum()), int((kp | r).sum())),
                        "tissue_lost": int((r & ~kp).sum()),
                        "glass_kept": int((kp & ~r).sum()),
                        "seconds": self.seconds[m],
                    }
                )
        return out


def compare_methods(slide, methods, scale=1, patch_size=224, tissue_threshold=0.5, tissue_subsample=4, truth=None):
    """Score tissue methods over a slide's patch grid against the reference mask (and a truth).

    The grid is extraction's (``patch_size`` at ``scale``, no overlap), read one row of patches
    at a time. Each method sees every ``tissue_subsample``-th pixel of each grayscale patch,
    as extraction does; the reference (:func:`reference_tissue_mask`, made on the full strip,
    balanced by the :func:`background_colour` of a 1024 px thumbnail) and the truth are
    sampled at the same pixels.

    Args:
        slide: a :class:`helpers.wsi.slides.Slide` or a slide path.
        methods: ``{name: function}``; each function takes ``(n, h, w)`` uint8 gray patches
            and returns ``(n, h, w)`` bool tissue masks, e.g.
            ``lambda g: otsu_tissue_masks(g, 210)`` or ``lambda g: g <= threshold``.
        scale: level-0 downscale factor of the grid (1, 4, 16, 64; fractional at a physical scale).
        patch_size: patch side at the scale.
        tissue_threshold: a patch is kept when at least this share of it is tissue.
        tissue_subsample: must divide ``patch_size``.
        truth: optional exact tissue map (a :class:`helpers.wsi.slides.Mask`); the methods and the
            reference itself are scored against it too.

    Returns:
        A list of dicts, one per method and ``against`` (``"reference"`` or ``"truth"``):
        ``patches`` (grid size), ``pixel_iou`` (tissue pixels of the method vs the other,
        over all grid patches), ``kept`` (patches kept), ``ref_kept`` (patches the other
        says hold at least ``tissue_threshold`` tissue), ``kept_iou`` (IoU of those two
        sets), ``tissue_lost`` (tissue patches dropped), ``glass_kept`` (patches kept that
        the other says hold less tissue than that), ``seconds`` (time in the function).
    """
    from .slides import Slide

    P, k = int(patch_size), int(tissue_subsample)
    if P % k:
        raise ValueError(f"tissue_subsample ({k}) must divide patch_size ({P})")
    own = not isinstance(slide, Slide)
    s = Slide(slide) if own else slide
    W, H = s.dimensions
    rows, cols = int(H // scale) // P, int(W // scale) // P
    background = background_colour(s.thumbnail(1024)[0])
    tally = _MethodTally(methods, truth is not None, tissue_threshold)
    try:
        for row in range(rows):
            y = row * P * scale
            rgb = s.read_region(0, y, cols * P, P, downsample=scale)
            others = {"reference": _as_patches(reference_tissue_mask(rgb, background), P, k, cols)}
            if truth is not None:
                others["truth"] = _as_patches(truth.read(0, y, cols * P, P, downsample=scale).astype(bool), P, k, cols)
            tally.add_row(_as_patches(to_gray(rgb), P, k, cols), others)
    finally:
        if own:
            s.close()
    return tally.results(rows * cols)
