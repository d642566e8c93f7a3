"""Slides, masks and dataset folders: reading what a WSI holds without holding a whole level.

- :class:`Slide` opens anything OpenSlide reads (``.svs``, ``.tif``, ``.ndpi``, ...) and also
  plain PNG/JPEG/TIFF images as single-level slides; it reads regions at any downscale factor
  from the best pyramid level.
- :class:`Mask` reads a binary mask (level-0 size, or a known downsample of it) window by
  window, checks its values and its size against the slide.

Dataset folders (which slides, masks, labels, patients) are :mod:`helpers.wsi.dataset`'s. Used by
every notebook. No torch here.
"""

import math
import numbers
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.errors import InputError

#: Suffixes opened through OpenSlide (tried first) or, failing that, as plain images.
SLIDE_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".vms",
    ".vmu",
    ".bif",
    ".svslide",
    ".dcm",
    ".png",
    ".jpg",
    ".jpeg",
)
#: Formats that only OpenSlide reads: never opened as plain images (a truncated .svs would be).
WSI_ONLY_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm")
#: The largest plain image opened (loaded whole): 16,384 x 16,384 px.
MAX_PLAIN_PIXELS = 2**28
#: Relative difference under which a pyramid level's downsample counts as the one asked for.
LEVEL_TOLERANCE = 0.005
#: A scale's level-0 downsample within this share of a whole number is taken as that number
#: (physical scales, :func:`scale_downsample`): a 40x Aperio scan at 0.2527 um/px read at
#: 0.5 um/px is 1.979 times smaller, and reading it 2 times smaller is 1 % off in microns but
#: uses the pyramid's own levels and the extraction's aligned fast path.
SNAP_TOLERANCE = 0.02
#: The largest region read at once (1 Gpx, 3 GB of RGB): a bigger one is a parameter mistake.
MAX_READ_PIXELS = 2**30
#: Name endings of PAIP 2019 mask files, which are never taken for slides.
MASK_KINDS = ("whole", "viable")

Image.MAX_IMAGE_PIXELS = None  # plain-image slides can be large; they are the user's own files


class SlideWarning(UserWarning):
    """Something about a slide or mask that the run can go on with (no mpp, a suspect mask)."""


def _import_openslide():
    try:
        import openslide
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise InputError(
            f"openslide could not be imported; install it with `pip install openslide-python openslide-bin` ({exc})"
        ) from exc
    return openslide


_WARNED = set()


def _warn_once(path, message):
    """A :class:`SlideWarning` about ``path``, once per file and process (a slide is opened
    by many workers and threads during one run)."""
    key = (str(Path(path).resolve()), message)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"{Path(path).name}: {message}", SlideWarning, stacklevel=3)


def _float_pair(props, kx, ky):
    try:
        return float(props[kx]), float(props[ky])
    except (KeyError, ValueError):
        return None


def _open_any(path):
    """``(handle, vendor)``: an OpenSlide handle, or an ImageSlide for a plain image.

    Raises:
        InputError: naming the file and the likely cause (not a slide, truncated, too large).
    """
    openslide = _import_openslide()
    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except Exception:
        fmt = None
    try:
        if fmt is not None:
            return openslide.OpenSlide(str(path)), fmt
        if path.suffix.lower() in WSI_ONLY_SUFFIXES:
            with open(path, "rb") as f:
                head = f.read(4)
            why = (
                "it looks like a TIFF but OpenSlide cannot parse it: probably truncated or damaged, copy it again"
                if head[:2] in (b"II", b"MM")
                else "its content is not a whole-slide image format; check that the file is the slide"
            )
            raise InputError(f"{path}: cannot be read as a slide ({why})")
        img = Image.open(path)
        if img.width * img.height > MAX_PLAIN_PIXELS:
            raise InputError(
                f"{path}: a plain (non-pyramidal) image of {img.width}x{img.height} px would be "
                "loaded whole; convert it to a tiled pyramidal TIFF (e.g. with vips tiffsave "
                "--tile --pyramid) so it can be read window by window"
            )
        img.load()
        return openslide.ImageSlide(img), "image"
    except InputError:
        raise
    except MemoryError:
        raise InputError(
            f"{path}: not enough memory to open it as a plain image; convert it to a tiled pyramidal TIFF"
        ) from None
    except (openslide.OpenSlideError, OSError, ValueError, SyntaxError) as exc:
        if fmt is None and path.suffix.lower() not in SLIDE_SUFFIXES:
            raise InputError(
                f"{path}: not a slide nor an image that can be read (OpenSlide does not "
                f"recognise it: {exc}); pass a .svs/.tif/.ndpi/... slide or a PNG/JPEG/TIFF "
                "image"
            ) from None
        raise InputError(
            f"{path}: cannot be read ({type(exc).__name__}: {exc}); the file may be truncated or damaged: copy it again"
        ) from None


class Slide:
    """A whole-slide image (or a plain image) with level-0 coordinates throughout.

    Args:
        path: the slide file.
        verify: decode the smallest pyramid level on opening, so that a truncated or damaged
            file fails here with a clear message rather than halfway through a run.
        tile_reader: read Aperio and generic tiled TIFFs with this module's own tile reader
            (the default, faster for strips); ``False`` reads every region through OpenSlide.

    Attributes:
        path, name: the file and its stem (the case id in PAIP naming).
        dimensions: level-0 ``(width, height)``.
        level_dimensions, level_downsamples: the pyramid.
        mpp: ``(x, y)`` micrometres per pixel, or ``None`` when the file does not say.
        objective_power: the scanner's objective (e.g. 20 or 40), or ``None``.
        vendor: the format OpenSlide detected (``aperio``, ``generic-tiff``, ...) or ``image``.

    Example:
        >>> with Slide("data/demo/demo_01.svs") as s:          # doctest: +SKIP
        ...     patch = s.read_region(0, 0, 224, 224, downsample=16)
    """

    def __init__(self, path, verify=True, tile_reader=True):
        self.path = Path(path)
        self.name = self.path.stem
        if not self.path.exists():
            raise InputError(f"{self.path}: no such slide file; check the path (or data_dir)")
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a folder, not a slide file")
        self._osr, self.vendor = _open_any(self.path)
        osr = self._osr
        self.dimensions = tuple(int(v) for v in osr.dimensions)
        self.level_count = int(osr.level_count)
        self.level_dimensions = [tuple(int(v) for v in d) for d in osr.level_dimensions]
        self.level_downsamples = [float(d) for d in osr.level_downsamples]
        self.properties = dict(osr.properties)
        self.mpp = _float_pair(self.properties, "openslide.mpp-x", "openslide.mpp-y")
        if self.mpp is None:
            _warn_once(
                self.path,
                "the file gives no microns per pixel (mpp); sizes in micrometres are "
                "unknown, pixel-based processing goes on",
            )
        power = _float_pair(self.properties, "openslide.objective-power", "openslide.objective-power")
        self.objective_power = None if power is None else power[0]
        self._tiff = self._tiff_levels() if tile_reader and self.vendor in ("aperio", "generic-tiff") else None
        if verify:
            self._verify()

    def _verify(self):
        """Decode the smallest level: a truncated file often opens fine and fails on its last
        tiles, and the smallest level is usually written last, so this is a cheap, telling check."""
        import openslide

        lw, lh = self.level_dimensions[-1]
        if lw * lh > 4096 * 4096:
            return
        try:
            self._osr.read_region((0, 0), self.level_count - 1, (lw, lh))
        except openslide.OpenSlideError as exc:
            self.close()
            raise InputError(
                f"{self.path}: cannot be decoded ({exc}); the file is probably truncated or damaged: copy it again"
            ) from None

    def _tiff_levels(self):
        """Tile readers for every level when each is a tiled 8-bit RGB JPEG page, else ``None``."""
        try:
            import tifffile

            tif = tifffile.TiffFile(self.path)
        except Exception:
            return None
        pages = [
            p
            for p in tif.pages
            if p.is_tiled
            and p.compression == 7
            and p.samplesperpixel == 3
            and p.dtype == np.uint8
            and p.planarconfig == 1
        ]
        levels = []
        for w, h in self.level_dimensions:
            match = [p for p in pages if tuple(p.shape[:2]) == (h, w)]
            if not match:
                tif.close()
                return None
            levels.append(_TiffWindows(page=match[0], tif=tif, fill=255))
        return levels

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Release the file handle."""
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            self._osr = None
        if getattr(self, "_tiff", None):
            self._tiff[0].close()
            self._tiff = None

    def __repr__(self):
        w, h = self.dimensions
        return f"Slide({self.name!r}, {w}x{h}, levels={self.level_count}, vendor={self.vendor!r})"

    # -- metadata ----------------------------------------------------------------------------
    def info(self):
        """A flat dict of what a reader wants to know first (used in notebook 01's table)."""
        w, h = self.dimensions
        return {
            "case": self.name,
            "vendor": self.vendor,
            "width": w,
            "height": h,
            "levels": self.level_count,
            "downsamples": ", ".join(f"{d:g}" for d in self.level_downsamples),
            "mpp": None if self.mpp is None else round(self.mpp[0], 4),
            "objective": self.objective_power,
            "file_MB": round(self.path.stat().st_size / 2**20, 1),
        }

    def best_level(self, downsample):
        """The pyramid level to read for ``downsample``: the coarsest that is not coarser.

        A level within :data:`LEVEL_TOLERANCE` of the wanted factor counts as that factor: a
        scanner's level 1 of a slide whose side does not divide by 4 is 4.002 times smaller, not
        4, and reading level 0 instead would decode 16 times more pixels for the same patch.

        Args:
            downsample: the wanted downscale factor relative to level 0 (>= 1).
        """
        downsample = float(downsample)
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + LEVEL_TOLERANCE):
                best = i
        return best

    def downsample_at(self, scale, scale_reference=0.0):
        """Level-0 pixels per pixel at ``scale`` (see :func:`scale_downsample`)."""
        return scale_downsample(scale, None if self.mpp is None else self.mpp[0], scale_reference, self.path)

    # -- pixels ------------------------------------------------------------------------------
    def read_region(self, x, y, width, height, downsample=1.0, out=None):
        """Read an RGB region at a downscale factor.

        Pixels outside the slide come back white (glass).

        Args:
            x, y: top-left corner in level-0 pixels.
            width, height: size of the returned image, in pixels *at the downsample*.
            downsample: factor relative to level 0 (1 = full resolution; 4, 16, 64 = the
                paper's classification scales). Read from the best pyramid level and, where the
                level is finer than asked, reduced with a box filter.
            out: a C-ordered ``(height, width, 3)`` uint8 array to read into, reused between
                reads (a fresh array of a strip's size costs the kernel's zeroed pages at every
                read: about a third of the time of copying the strip's tiles into it). Used
                where the region is a tiled level's own pixels; elsewhere a new array is made.

        Returns:
            A ``(height, width, 3)`` uint8 array (``out`` when it was used).
        """
        if self._osr is None:
            raise InputError(f"{self.path}: slide is closed")
        if not (isinstance(downsample, numbers.Real) and not isinstance(downsample, bool) and downsample >= 1):
            raise InputError(f"downsample must be a number >= 1, got {downsample!r}")
        width, height = int(width), int(height)
        if out is not None and (out.shape != (height, width, 3) or out.dtype != np.uint8 or not out.flags.c_contiguous):
            raise InputError(f"out must be a C-ordered ({height}, {width}, 3) uint8 array, got {out.shape} {out.dtype}")
        level = self.best_level(downsample)
        f = downsample / self.level_downsamples[level]
        k = round(f)
        if k >= 1 and abs(f - k) <= LEVEL_TOLERANCE * f:
            f = k  # a level a fraction of a percent off: its pixels are the patch's (< 1 px over 224)
        lw, lh = math.ceil(width * f - 1e-6), math.ceil(height * f - 1e-6)
        integral = abs(f - k) < 1e-6 and lw == width * k and lh == height * k
        if lw * lh > MAX_READ_PIXELS:
            raise InputError(
                f"{self.path}: a region of {lw}x{lh} px of level {level} is too large to read at "
                f"once (over {MAX_READ_PIXELS:,} px); read smaller windows (a smaller patch_size)"
            )
        try:
            if self._tiff is not None:
                ds = self.level_downsamples[level]
                lx, ly = int(math.floor(x / ds + 1e-9)), int(math.floor(y / ds + 1e-9))
                into = out if (lw, lh) == (width, height) else None
                rgb = self._tiff[level].window(ly, ly + lh, lx, lx + lw, out=into)
            else:
                rgb = rgba_to_rgb(np.asarray(self._osr.read_region((int(x), int(y)), level, (lw, lh))))
        except MemoryError:
            raise InputError(
                f"{self.path}: not enough memory to read a region of {lw}x{lh} px at level {level}; "
                "read smaller windows (a smaller patch_size, fewer workers)"
            ) from None
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"{self.path}: cannot decode level {level} near ({x}, {y}) ({type(exc).__name__}: "
                f"{exc}); the file may be damaged: copy it again"
            ) from None
        if (lw, lh) != (width, height):
            if integral:
                rgb = box_reduce(rgb, k)
            else:
                rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((width, height), Image.BOX))
        return rgb

    def aligned_rows(self, downsample, step):
        """The fewest reads of ``step`` rows (at ``downsample``) that together end on a tile
        row of the level read: reads split there decode no tile twice. 1 where the level is
        not read tile by tile (or the period would pass 32 reads)."""
        level = self.best_level(downsample)
        k = downsample / self.level_downsamples[level]
        if self._tiff is None or abs(k - round(k)) > 1e-6:
            return 1
        th = self._tiff[level].th
        period = th // math.gcd(int(step) * round(k), th)
        return period if period <= 32 else 1

    def thumbnail(self, max_size=1024):
        """An RGB thumbnail whose longer side is at most ``max_size`` pixels.

        Returns:
            ``(image, downsample)``: the uint8 array and its downsample relative to level 0.
        """
        w, h = self.dimensions
        ds = max(w, h) / max_size
        ds = max(ds, 1.0)
        return self.read_region(0, 0, max(1, int(w / ds)), max(1, int(h / ds)), downsample=ds), ds


def scale_downsample(scale, mpp, scale_reference=0.0, path="slide"):
    """Level-0 pixels per pixel at ``scale``: what a scale means on one slide.

    With ``scale_reference`` 0 (the paper's: PAIP 2019 slides share one scanner) a scale is a
    downsample of level 0, whatever the slide's resolution. With ``scale_reference`` in um/px, a
    scale is a downsample of that resolution: ``scale_reference: 0.5`` makes 4x 2 um/px on every
    slide, so a 40x scan (0.25 um/px) is read 8 times smaller and a 20x scan 4 times. A result
    within :data:`SNAP_TOLERANCE` of a whole number is that number.

    Args:
        scale: the nominal downscale factor (1, 4, 16, 64 ...).
        mpp: the slide's level-0 microns per pixel, or ``None`` when the file does not say.
        scale_reference: 0, or the reference resolution in um/px.
        path: the slide, named in errors.

    Returns:
        An int where whole (always with ``scale_reference`` 0), else a float >= 1.

    Raises:
        InputError: a physical scale asked of a slide without mpp, or one finer than the slide.
    """
    if not scale_reference:
        return scale
    if mpp is None or not mpp > 0:
        raise InputError(
            f"{path}: the file gives no microns per pixel (mpp), so it cannot be read at "
            f"scale_reference = {scale_reference:g} um/px; re-export it with its mpp, move it out of "
            "data_dir, or set scale_reference: 0 (scales as level-0 downsamples)"
        )
    ds = scale * scale_reference / mpp
    k = round(ds)
    if k >= 1 and abs(ds - k) <= SNAP_TOLERANCE * ds:
        return int(k)
    if ds < 1:
        raise InputError(
            f"{path}: at {mpp:.4g} um/px it cannot be read at {scale}x of {scale_reference:g} um/px "
            f"({scale * scale_reference:.4g} um/px would need upsampling); use scale_reference >= "
            f"{mpp / scale:.4g} or drop scale {scale}"
        )
    return float(ds)


def box_reduce(rgb, k):
    """Box-average an ``(h, w, c)`` uint8 image by an integer factor ``k`` (h, w multiples of k)."""
    h, w, c = rgb.shape[0] // k, rgb.shape[1] // k, rgb.shape[2]
    s = rgb[: h * k, : w * k].reshape(h, k, w, k, c).sum(axis=(1, 3), dtype=np.uint32)
    return ((s + k * k // 2) // (k * k)).astype(np.uint8)


def _premultiplied_on_white(rgb, alpha):
    """OpenSlide's premultiplied pixels composited on white (transparent = outside the slide)."""
    return (rgb.astype(np.uint16) + (255 - alpha[..., None].astype(np.uint16))).clip(0, 255).astype(np.uint8)


def rgba_to_rgb(arr):
    """RGBA from OpenSlide to RGB, with transparent pixels (outside the slide) made white."""
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 3:
        return arr
    rgb = np.ascontiguousarray(arr[..., :3])
    alpha = arr[..., 3]
    if alpha.min() < 255:
        rgb = _premultiplied_on_white(rgb, alpha)
    return rgb


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def _fast_inflate(page):
    """libdeflate's decoder for a tiled deflate page without predictor or bit tricks, else None."""
    try:
        import imagecodecs

        plain = page.predictor == 1 and page.fillorder == 1 and page.bitspersample == 8 * page.dtype.itemsize
        if page.is_tiled and int(page.compression) in (8, 32946) and plain and imagecodecs.DEFLATE.available:
            return imagecodecs.deflate_decode
    except (ImportError, AttributeError):
        pass
    return None


#: The most decoded tiles one open TIFF page keeps for the next read (bytes).
TILE_CACHE_BYTES = 64 << 20


class _TiffWindows:
    """Window reads of one TIFF page, decoding only the tiles (or strips) they touch.

    Used for masks (the first page of a mask TIFF) and for the levels of tiled JPEG slides,
    where decoding tiles with tifffile/imagecodecs is several times faster than OpenSlide's
    ``read_region`` and gives the same pixels. Keeps the most recently decoded tiles (one row of
    them and a few more), since a strip read after another starts on the tile row the other
    ended on. ``reader[y0:y1, x0:x1]``
    returns a numpy array; pixels outside the page are ``fill``.
    """

    def __init__(self, path=None, page=None, tif=None, fill=0):
        import tifffile

        self.tif = tif if tif is not None else tifffile.TiffFile(path)
        self.page = page = page if page is not None else self.tif.pages[0]
        self.fill = fill
        self.shape = tuple(page.shape)
        self.dtype = page.dtype
        ch = page.chunks
        self.th, self.tw = int(ch[0]), int(ch[1]) if len(ch) > 1 and page.is_tiled else self.shape[1]
        if not page.is_tiled:
            self.th, self.tw = int(page.rowsperstrip or self.shape[0]), self.shape[1]
        self.ntx = -(-self.shape[1] // self.tw)
        self.nty = -(-self.shape[0] // self.th)
        self.samples = int(page.samplesperpixel)
        self.dtype = np.dtype(self.dtype)
        self._inflate = _fast_inflate(page)
        self._cache = {}
        # One row of tiles and a few more: full-width strips read top to bottom (extraction,
        # whole-slide inference) find the last row of the strip before in it. At most
        # TILE_CACHE_BYTES: memory must not grow with the slide's width (a 100,000 px level has
        # 400 tiles a row). Two rows (before 2026-12-06) cost 26 MB more per worker at 32k.
        tile_bytes = self.th * self.tw * self.samples * self.dtype.itemsize
        self._cap = max(4, min(self.ntx + 4, TILE_CACHE_BYTES // max(1, tile_bytes)))
        # Highly compressed tiles (a mask's background or tumour interior) repeat the same bytes:
        # decoded once, shared read-only.
        self._same = {}

    def close(self):
        self.tif.close()

    def repeats(self, data):
        """Whether compressed tile bytes are so short that the tile is near-uniform (a mask's
        background or tumour interior): such tiles repeat the same bytes across the page, so
        their decoding (and anything computed from it) is worth keeping by those bytes."""
        return len(data) * 64 < self.th * self.tw * self.samples

    def raw_tile(self, idx):
        """The compressed bytes of tile ``idx`` (``b""`` for a tile the file leaves out)."""
        n = self.page.databytecounts[idx]
        if n == 0:
            return b""
        fh = self.tif.filehandle
        fh.seek(self.page.dataoffsets[idx])
        return fh.read(n)

    def raw_tiles(self, i0, i1):
        """The compressed bytes of tiles ``i0`` to ``i1 - 1``: one read where they lie one after
        another in the file (as writers store a tile row), else tile by tile."""
        off = np.asarray(self.page.dataoffsets[i0:i1], np.int64)
        cnt = np.asarray(self.page.databytecounts[i0:i1], np.int64)
        if not len(off) or not (cnt > 0).all() or not np.array_equal(off[1:], off[:-1] + cnt[:-1]):
            return [self.raw_tile(i) for i in range(i0, i1)]
        fh = self.tif.filehandle
        fh.seek(int(off[0]))
        blob = fh.read(int(off[-1] + cnt[-1] - off[0]))
        ends = np.cumsum(cnt)
        return [blob[a:b] for a, b in zip((ends - cnt).tolist(), ends.tolist())]

    def decode_tile(self, idx, data, out=None):
        """Tile ``idx`` decoded from its compressed ``data`` (zeros for an empty tile).

        Deflate tiles without a predictor (PAIP's masks) are inflated with libdeflate, about
        twice as fast as the zlib path tifffile takes; the bytes are the same. ``out``: a
        contiguous array of the tile's bytes that libdeflate may inflate into (saves a copy).
        """
        if not data:
            return np.zeros((self.th, self.tw, self.samples), self.dtype)
        if self._inflate is not None:
            size = self.th * self.tw * self.samples * self.dtype.itemsize
            into = out.reshape(-1).view(np.uint8) if out is not None and out.nbytes == size else size
            raw = self._inflate(data, out=into)
            return np.frombuffer(raw, self.dtype).reshape(self.th, self.tw, self.samples)
        seg, _, _ = self.page.decode(data, idx, jpegtables=self.page.jpegtables)
        return np.asarray(seg).reshape(-1, self.tw, self.samples)

    def _tile(self, ty, tx):
        idx = ty * self.ntx + tx
        t = self._cache.get(idx)
        if t is None:
            data = self.raw_tile(idx)
            if self.repeats(data):
                t = self._same.get(data)
                if t is None:
                    t = self.decode_tile(idx, data)
                    t.flags.writeable = False
                    if len(self._same) >= 64:
                        self._same.pop(next(iter(self._same)))
                    self._same[data] = t
            else:
                t = self.decode_tile(idx, data)
            if len(self._cache) >= self._cap:
                self._cache.pop(next(iter(self._cache)))
            self._cache[idx] = t
        return t

    def __getitem__(self, key):
        ys, xs = key
        return self.window(ys.start, ys.stop, xs.start, xs.stop)

    def window(self, y0, y1, x0, x1, out=None):
        """Pixels ``[y0:y1, x0:x1]`` (outside the page: ``fill``), into ``out`` when given (a
        C-ordered array of that shape and the page's dtype, with the samples axis)."""
        H, W = self.shape[:2]
        inside = y0 >= 0 and x0 >= 0 and y1 <= H and x1 <= W
        shape = (y1 - y0, x1 - x0, self.samples)
        if out is None:
            out = (np.empty if inside else np.full)(shape, *(() if inside else (self.fill,)), dtype=self.dtype)
        elif not inside:
            out[...] = self.fill
        for ty in range(max(0, y0) // self.th, (min(y1, H) - 1) // self.th + 1):
            for tx in range(max(0, x0) // self.tw, (min(x1, W) - 1) // self.tw + 1):
                t = self._tile(ty, tx)
                ty0, tx0 = ty * self.th, tx * self.tw
                a0, a1 = max(y0, ty0), min(y1, ty0 + t.shape[0], H)
                b0, b1 = max(x0, tx0), min(x1, tx0 + self.tw, W)
                out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = t[a0 - ty0 : a1 - ty0, b0 - tx0 : b1 - tx0]
        return out[..., 0] if self.samples == 1 else out


#: Block counts of mask tiles already counted, by their compressed bytes, per tile layout: a
#: mask is mostly tiles of all background or all tumour, which compress to the same few byte
#: strings, and the whole- and viable-tumour masks share most tiles where their edges agree
#: (PAIP's viable tumour is the whole tumour less its necrosis): such tiles are decoded once.
_TILE_COUNTS = {}
#: ... at most this many of them (per layout; oldest dropped first: a band's tiles, both masks).
TILE_COUNTS_KEPT = 4096


def _block_sums(a, nby, nbx, block):
    """Sums of a 0/1 uint8 array over ``block`` x ``block`` blocks, zero-padded to
    ``(nby, nbx)`` blocks, as uint16.

    For blocks 8, 16 or 24 px wide (16: the count maps'), the 8-byte words of a block's rows
    are added first (each byte then holds a column's sum, at most ``block``), and then each
    word's bytes are summed with one multiplication (``x * 0x0101010101010101 >> 56`` is the
    sum of ``x``'s bytes while that sum stays below 256): several times faster than a reduction
    over two axes.
    """
    if a.shape == (nby * block, nbx * block) and a.flags.c_contiguous:
        pad = a
    else:
        pad = np.zeros((nby * block, nbx * block), np.uint8)
        pad[: a.shape[0], : a.shape[1]] = a
    if block % 8 or 8 * block > 255:
        return pad.reshape(nby, block, nbx, block).sum(axis=(1, 3), dtype=np.uint16)
    cols = pad.view(np.uint64).reshape(nby, block, nbx * block // 8).sum(axis=1, dtype=np.uint64)
    words = ((cols * np.uint64(0x0101010101010101)) >> np.uint64(56)).reshape(nby, nbx, block // 8)
    out = words[..., 0].astype(np.uint16)
    for k in range(1, block // 8):  # added one by one: numpy is slow on short reduction axes
        out += words[..., k].astype(np.uint16)
    return out


class Mask:
    """A binary mask aligned to a slide, read window by window.

    PAIP 2019 masks are uint8 TIFFs at level-0 size with values 0/1; 0/255 and masks at a
    known downsample of the slide (e.g. a PNG drawn on a thumbnail) are accepted too.

    Args:
        path: the mask file (TIFF: read lazily, tile by tile; PNG/JPEG: loaded whole).
        slide_dimensions: the slide's level-0 ``(width, height)``.

    Attributes:
        downsample: level-0 pixels per mask pixel (1.0 for a level-0 mask).
    """

    def __init__(self, path, slide_dimensions):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: no such mask file")
        self._arr = None
        self._store = None
        suffix = self.path.suffix.lower()
        try:
            if suffix in (".tif", ".tiff"):
                self._store = self._arr = _TiffWindows(self.path)
            else:
                self._arr = np.asarray(Image.open(self.path))
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{self.path}: cannot be read as a mask ({type(exc).__name__}: {exc})") from None
        try:
            self._check_shape(slide_dimensions)
        except InputError:
            self.close()  # a refused mask leaves no open file behind
            raise

    def _check_shape(self, slide_dimensions):
        shape = tuple(self._arr.shape)
        if len(shape) == 3 and shape[2] in (1, 3, 4):
            self._channels = shape[2]
            shape = shape[:2]
        elif len(shape) == 2:
            self._channels = 0
        else:
            raise InputError(f"{self.path}: a mask must be a single-channel image, got shape {shape}")
        self.height, self.width = int(shape[0]), int(shape[1])
        W, H = slide_dimensions
        if (self.width, self.height) == (W, H):
            self.downsample = 1.0
        else:
            d = W / self.width
            if not (d > 1 and abs(W / d - self.width) <= 1 and abs(H / d - self.height) <= 1.0 + H * 1e-3 / d):
                raise InputError(
                    f"{self.path}: mask is {self.width}x{self.height} but the slide is {W}x{H}; a "
                    "mask must be level-0 size or an exact downsample of it (same aspect ratio). "
                    "Check that the mask belongs to this slide"
                )
            self.downsample = float(d)

    def __repr__(self):
        return f"Mask({self.path.name!r}, {self.width}x{self.height}, downsample={self.downsample:g})"

    def close(self):
        """Release the file handle."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read_native(self, x0, y0, x1, y1):
        """Mask pixels of a window in the mask's own pixel grid, as 0/1 uint8 (values checked).

        Raises:
            InputError: when the window holds values other than 0/1 or 0/255.
        """
        x0, y0 = max(0, int(x0)), max(0, int(y0))
        x1, y1 = min(self.width, int(x1)), min(self.height, int(y1))
        if x1 <= x0 or y1 <= y0:
            return np.zeros((max(0, y1 - y0), max(0, x1 - x0)), np.uint8)
        try:
            a = np.asarray(self._arr[y0:y1, x0:x1])
        except Exception as exc:
            raise InputError(
                f"{self.path}: cannot decode rows {y0}-{y1} of the mask ({type(exc).__name__}: "
                f"{exc}); the file is damaged or truncated: copy it again"
            ) from None
        return self._binary(a, f"rows {y0}-{y1}")

    def _binary(self, a, where):
        """``a`` (mask pixels as stored) as 0/1 uint8, or one clear error naming ``where``."""
        if self._channels:
            if self._channels >= 3 and not (
                np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
            ):
                raise InputError(
                    f"{self.path}: mask has colour channels that differ; save it as a single-channel 0/1 image"
                )
            a = a[..., 0]
        if a.dtype == bool:
            return a.view(np.uint8)
        m = a.max() if a.size else 0
        if m > 1:
            if m != 255 or np.any((a != 0) & (a != 255)):
                bad = np.unique(a)[:8].tolist()
                raise InputError(
                    f"{self.path}: mask values must be 0/1 (or 0/255), found {bad} in {where}; binarise the mask first"
                )
            a = (a > 0).view(np.uint8) if a.dtype == np.uint8 else (a > 0).astype(np.uint8)
        return a.astype(np.uint8, copy=False)

    def read(self, x, y, width, height, downsample=1.0):
        """The mask over a level-0 region, at ``downsample``, as 0/1 uint8 (nearest sampling).

        Args:
            x, y: top-left corner in level-0 pixels.
            width, height: output size in pixels at ``downsample``.
            downsample: as :meth:`Slide.read_region`.
        """
        d = self.downsample
        x0, y0 = int(x / d), int(y / d)
        x1 = int(math.ceil((x + width * downsample) / d))
        y1 = int(math.ceil((y + height * downsample) / d))
        native = self.read_native(x0, y0, x1, y1)
        k = downsample / d
        if k == int(k) and x0 * d == x and y0 * d == y and native.shape == (height * int(k), width * int(k)):
            k = int(k)
            return np.ascontiguousarray(native[k // 2 :: k, k // 2 :: k]) if k > 1 else native
        # Nearest sample at the centre of each output pixel.
        ys = ((y + (np.arange(height) + 0.5) * downsample) / d).astype(np.int64) - y0
        xs = ((x + (np.arange(width) + 0.5) * downsample) / d).astype(np.int64) - x0
        out = np.zeros((height, width), np.uint8)
        oky = (ys >= 0) & (ys < native.shape[0])
        okx = (xs >= 0) & (xs < native.shape[1])
        if oky.any() and okx.any():
            out[np.ix_(oky, okx)] = native[np.ix_(ys[oky], xs[okx])]
        return out

    def window_fractions(self, y, xs, footprint, max_pixels=2**25):
        """Fraction of mask pixels inside square windows along one row.

        Reads the mask band ``[y, y + footprint)`` in chunks of at most ``max_pixels`` pixels,
        so a 64x patch row of a 50,000 px slide (a 14,336 px high band) is never in memory.

        Args:
            y: level-0 top of the windows.
            xs: level-0 left edges of the windows (any spacing; overlap allowed).
            footprint: level-0 side of each window.
            max_pixels: the largest chunk read at once.

        Returns:
            A float array, one fraction per window.
        """
        d = self.downsample
        xs = np.asarray(xs, dtype=np.float64)
        r0, r1 = int(y / d), min(self.height, int(math.ceil((y + footprint) / d)))
        colsum = np.zeros(self.width, np.int64)
        step = max(1, max_pixels // max(1, self.width))
        for r in range(r0, r1, step):
            colsum += self.read_native(0, r, self.width, min(r1, r + step)).sum(axis=0, dtype=np.int64)
        cs = np.concatenate([[0], np.cumsum(colsum)])
        c0 = np.clip((xs / d).astype(np.int64), 0, self.width)
        c1 = np.clip(np.ceil((xs + footprint) / d).astype(np.int64), 0, self.width)
        area = np.maximum(1, (c1 - c0)) * max(1, r1 - r0)
        return (cs[c1] - cs[c0]) / area

    def block_counts(self, r0, r1, block=16, max_pixels=2**25):
        """Mask pixels per ``block`` x ``block`` block, for block rows ``r0`` to ``r1``.

        A map of these counts (see :mod:`helpers.patching.maskcounts`) answers the tumour
        fraction of any block-aligned window without decoding the full-resolution mask again:
        at 16x, one map cell stands for 256 mask pixels.

        A tiled TIFF mask (PAIP's) is counted tile by tile, in parts of at most ``max_pixels``
        pixels (whole tile rows), and each distinct tile is decoded and counted once, by its
        compressed bytes (see ``_TILE_COUNTS``): only the tiles on a boundary are decoded, and
        those the whole- and viable-tumour masks share, once for both. Other masks are read in
        chunks of at most ``max_pixels`` pixels.

        Returns:
            A uint16 array of shape ``(r1 - r0, ceil(width / block))``.
        """
        st = self._store
        if st is not None and st.page.is_tiled and st.th % block == 0 and st.tw % block == 0:
            per = st.th // block  # block rows per tile row: parts start on tile rows
            step = max(1, max_pixels // (st.th * st.ntx * st.tw)) * per
            parts = range(r0 // step * step, r1, step)
            return np.concatenate(
                [self._tile_block_counts(max(r0, b), min(r1, b + step), block) for b in parts]
                or [np.zeros((0, -(-self.width // block)), np.uint16)]
            )
        nbx = -(-self.width // block)
        out = np.zeros((r1 - r0, nbx), np.uint16)
        rows = max(1, (max_pixels // max(1, self.width)) // block)
        for b in range(r0, r1, rows):
            b1 = min(r1, b + rows)
            a = self.read_native(0, b * block, self.width, min(self.height, b1 * block))
            out[b - r0 : b1 - r0] = _block_sums(a, b1 - b, nbx, block)
        return out

    def _tile_block_counts(self, r0, r1, block):
        st = self._store
        nbx = -(-self.width // block)
        per_ty, per_tx = st.th // block, st.tw // block
        ty0, ty1 = (r0 * block) // st.th, min(st.nty, -(-(r1 * block) // st.th))
        out = np.zeros((r1 - r0, nbx), np.uint16)
        if ty1 <= ty0:
            return out
        # Each distinct tile once, by its bytes (and, for a tile cut at the mask's edge, its
        # size): the same bytes hold the same pixels, whichever mask and band they are in.
        first, n = ty0 * st.ntx, (ty1 - ty0) * st.ntx
        keys = st.raw_tiles(first, first + n)
        h = np.minimum(st.th, self.height - np.arange(ty0, ty1) * st.th)
        w = np.minimum(st.tw, self.width - np.arange(st.ntx) * st.tw)
        if h[-1] < st.th or w[-1] < st.tw:  # edge tiles: their size is part of what they hold
            cut = [(hy, wx) for hy in h.tolist() for wx in w.tolist()]
            keys = [k if c == (st.th, st.tw) else (k, c) for k, c in zip(keys, cut)]
        slot_of = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        slots = np.fromiter((slot_of[k] for k in keys), np.int64, count=n)
        page = st.page  # what, besides its bytes, decides what a tile holds
        layout = (st.th, st.tw, st.samples, st.dtype.str, self._channels, block)
        codec = (int(page.compression), int(page.predictor), int(page.fillorder), page.jpegtables)
        memo = _TILE_COUNTS.setdefault(layout + codec, {})
        table = np.empty((len(slot_of), per_ty, per_tx), np.uint16)
        todo = []
        for k, j in slot_of.items():
            c = memo.get(k)
            if c is None:
                todo.append((j, k))
            else:
                table[j] = c
        if todo:
            at = first + np.unique(slots, return_index=True)[1]  # the first tile of each slot
            counts = self._counted_tiles([(int(at[j]), k if isinstance(k, bytes) else k[0]) for j, k in todo], block)
            for (j, k), c in zip(todo, counts):
                table[j] = c
                memo[k] = c
            while len(memo) > TILE_COUNTS_KEPT:  # oldest first
                memo.pop(next(iter(memo)))
        counts = table[slots]  # (tiles, per_ty, per_tx), grid order
        grid = counts.reshape(ty1 - ty0, st.ntx, per_ty, per_tx).swapaxes(1, 2)
        grid = grid.reshape((ty1 - ty0) * per_ty, st.ntx * per_tx)[r0 - ty0 * per_ty :, :nbx]
        out[: grid.shape[0]] = grid[: r1 - r0]
        return out

    def _counted_tiles(self, tiles, block):
        """Block counts of decoded tiles ``[(idx, compressed bytes), ...]``, counted together
        (one pass of numpy over all of them, not a few small calls per tile); a tile's part
        outside the mask counts nothing."""
        st = self._store
        stack = np.empty((len(tiles), st.th, st.tw), np.uint8)
        plain = not self._channels and st.dtype == np.uint8
        for i, (idx, data) in enumerate(tiles):
            try:
                t = st.decode_tile(idx, data, out=stack[i] if plain else None)
            except Exception as exc:
                raise InputError(
                    f"{self.path}: cannot decode tile {idx} of the mask ({type(exc).__name__}: {exc}); "
                    "the file is damaged or truncated: copy it again"
                ) from None
            ty, tx = divmod(idx, st.ntx)
            h, w = min(st.th, self.height - ty * st.th), min(st.tw, self.width - tx * st.tw)
            if plain:
                if not np.shares_memory(t, stack[i]):
                    stack[i, :h, :w] = t[:h, :w, 0]
            else:
                stack[i, :h, :w] = self._binary(t[:h, :w] if self._channels else t[:h, :w, 0], f"tile {idx}")
            if h < st.th or w < st.tw:
                stack[i, h:], stack[i, :, w:] = 0, 0  # an edge tile's part outside the mask
        if stack.size and stack.max() > 1:  # 0/255, or values a mask must not hold: tile by tile
            for i, (idx, _) in enumerate(tiles):
                stack[i] = self._binary(stack[i], f"tile {idx}")
        n, per_ty, per_tx = len(tiles), st.th // block, st.tw // block
        return _block_sums(stack.reshape(n * st.th, st.tw), n * per_ty, per_tx, block).reshape(n, per_ty, per_tx)

    def count(self, step=1, max_pixels=2**25):
        """Number of mask pixels (every ``step``-th row and column), read in chunks."""
        n = 0
        rows = max(step, (max_pixels // max(1, self.width)) // step * step)
        for r in range(0, self.height, rows):
            n += int(self.read_native(0, r, self.width, min(self.height, r + rows))[::step, ::step].sum())
        return n


def check_viable_inside_whole(whole, viable, step=4, tolerance=0.01, max_pixels=2**25, warn=True):
    """Check that the viable-tumour mask lies inside the whole-tumour mask.

    PAIP 2019 has one training case (01_01_0107) whose two files are swapped; this catches it.
    Reads both masks in chunks, every ``step``-th pixel.

    Args:
        whole, viable: :class:`Mask` objects of one slide.
        step: sampling step in mask pixels (1 = every pixel).
        tolerance: the largest fraction of viable pixels allowed outside whole.
        warn: also warn (:class:`SlideWarning`) when the masks are not consistent.

    Returns:
        A dict: ``whole_px``, ``viable_px`` (sampled counts), ``viable_outside`` (fraction of
        viable pixels outside whole), ``ok``, ``swapped`` (whole looks inside viable) and
        ``message`` (what is wrong and what to do; empty when ok).
    """
    if (whole.width, whole.height) != (viable.width, viable.height):
        raise InputError(
            f"{whole.path.name} is {whole.width}x{whole.height} but {viable.path.name} is "
            f"{viable.width}x{viable.height}; the two masks of a case must match"
        )
    rows = max(step, (max_pixels // max(1, whole.width)) // step * step)
    nw = nv = outside = whole_outside = 0
    for r in range(0, whole.height, rows):
        r1 = min(whole.height, r + rows)
        w = whole.read_native(0, r, whole.width, r1)[::step, ::step].astype(bool)
        v = viable.read_native(0, r, viable.width, r1)[::step, ::step].astype(bool)
        nw += int(w.sum())
        nv += int(v.sum())
        outside += int((v & ~w).sum())
        whole_outside += int((w & ~v).sum())
    frac = outside / nv if nv else 0.0
    ok = frac <= tolerance
    swapped = (not ok) and nw > 0 and whole_outside / nw <= tolerance
    message = ""
    if not ok:
        hint = (
            "the two files look swapped (as PAIP 2019 case 01_01_0107): swap them or pass label_mask accordingly"
            if swapped
            else "check the annotation"
        )
        message = f"{viable.path.name}: {frac:.1%} of viable-tumour pixels lie outside {whole.path.name}; {hint}"
        if warn:
            warnings.warn(message, SlideWarning, stacklevel=2)
    return {
        "whole_px": nw,
        "viable_px": nv,
        "viable_outside": round(frac, 4),
        "ok": ok,
        "swapped": swapped,
        "message": message,
    }
