"""Files a worker process keeps open between its tasks (a slide, its masks, count maps).

Extraction's workers each read many strips of one slide: opening the slide once per process
instead of once per task saves the header parsing. A forked worker must not use the handles it
inherited (file positions shared with the parent would interleave reads): it forgets them
(:func:`forget_inherited`, the worker pool's initializer) and opens its own; :func:`reader_pool`
makes such a pool. Used by ``patches`` and ``maskcounts``.
"""

import os
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.parallel import process_pool
from .slides import Mask, Slide

#: Files a process keeps open at most (a slide's handles: itself, two masks, two count maps).
KEPT_OPEN = 8
_OPEN = {}
_OPEN_PID = [os.getpid()]


def forget_inherited():
    """Drop handles inherited from another process, without closing the parent's."""
    _OPEN.clear()
    _OPEN_PID[0] = os.getpid()


def load_readers():
    """Load the slide readers' libraries (tifffile, the JPEG and deflate codecs, OpenSlide) now,
    once per process, instead of at the first slide read."""
    try:
        import imagecodecs
        import openslide  # noqa: F401
        import tifffile  # noqa: F401

        imagecodecs.jpeg8_decode, imagecodecs.deflate_decode  # noqa: B018 (codecs load on first access)
    except ImportError:  # the reader that needs one says which (Slide's own message)
        pass


def reader_pool(workers):
    """A pool of ``workers`` processes for slide work. The readers' libraries are loaded first
    (:func:`load_readers`), so the forked workers share them instead of each loading them at its
    first task (~50 ms of a fresh 4x extraction's 0.7 s)."""
    load_readers()
    return process_pool(workers, forget_inherited)


def open_cached(path, kind):
    """Open a ``slide``, a ``mask`` (``path`` = ``(mask, slide)``) or ``counts`` (a count
    map's rows, see :class:`CountRows`) once per process; reopened when the
    file has changed on disk."""
    if _OPEN_PID[0] != os.getpid():
        forget_inherited()
    f = Path(path[0] if isinstance(path, tuple) else path)
    try:
        st = f.stat()
    except FileNotFoundError:
        raise InputError(f"{f}: no such file (was it moved or deleted during the run?)") from None
    key = (kind, str(path), st.st_size, st.st_mtime_ns)
    obj = _OPEN.pop(key, None)  # put back last: the least recently used is closed first
    if obj is None:
        while len(_OPEN) >= KEPT_OPEN:  # a task uses a few (its slide, masks, maps): never these
            getattr(_OPEN.pop(next(iter(_OPEN))), "close", lambda: None)()
        if kind == "slide":
            obj = Slide(path, verify=False)  # verified once by the caller
        elif kind == "mask":
            obj = Mask(path[0], open_cached(path[1], "slide").dimensions)
        else:
            obj = CountRows(path)
    _OPEN[key] = obj
    return obj


def count_map_layout(f, path):
    """``(shape, dtype, offset of the first count)`` of the count map open as ``f`` (a 2-D
    C-ordered ``.npy``), from its header."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if fortran or len(shape) != 2:
        raise InputError(f"{path}: not a count map (a 2-D C-ordered array); delete it, it is rebuilt")
    return shape, dtype, f.tell()


class CountRows:
    """Rows of a count map (a 2-D ``.npy``) read with plain reads, not a memory map: a map read
    band after band by a worker must not stay mapped (its pages would count in the worker's
    memory and grow with the slide)."""

    def __init__(self, path):
        self._f = open(path, "rb")  # noqa: SIM115 (kept open between reads, closed by close())
        try:
            self.shape, self.dtype, self._start = count_map_layout(self._f, path)
        except InputError:
            self._f.close()
            raise

    def __getitem__(self, rows):
        """``counts[r0:r1]`` as an array (rows clipped to the map)."""
        r0, r1, _ = rows.indices(self.shape[0])
        n = max(0, r1 - r0) * self.shape[1]
        buf = os.pread(
            self._f.fileno(), n * self.dtype.itemsize, self._start + r0 * self.shape[1] * self.dtype.itemsize
        )
        return np.frombuffer(buf, self.dtype).reshape(-1, self.shape[1])

    def close(self):
        self._f.close()


def close_all():
    """Close every handle this process keeps (tests call it between tests)."""
    for v in _OPEN.values():
        getattr(v, "close", lambda: None)()
    _OPEN.clear()
