"""Files a worker process keeps open between its tasks (a slide, its masks, count maps).

Extraction's workers each read many strips of one slide: opening the slide once per process
instead of once per task saves the header parsing. A forked worker must not use the handles it
inherited (file positions shared with the parent would interleave reads): it forgets them
(:func:`forget_inherited`, the worker pool's initializer) and opens its own. Used by
``patches`` and ``maskcounts``.
"""

import os
from pathlib import Path

import numpy as np

from .errors import InputError
from .slides import Mask, Slide

_OPEN = {}
_OPEN_PID = [os.getpid()]


def forget_inherited():
    """Drop handles inherited from another process, without closing the parent's."""
    _OPEN.clear()
    _OPEN_PID[0] = os.getpid()


def open_cached(path, kind):
    """Open a ``slide``, a ``mask`` (``path`` = ``(mask, slide)``) or ``counts`` (an ``.npy``
    memory map) once per process; reopened when the file has changed on disk."""
    if _OPEN_PID[0] != os.getpid():
        forget_inherited()
    f = Path(path[0] if isinstance(path, tuple) else path)
    try:
        st = f.stat()
    except FileNotFoundError:
        raise InputError(f"{f}: no such file (was it moved or deleted during the run?)") from None
    key = (kind, str(path), st.st_size, st.st_mtime_ns)
    obj = _OPEN.get(key)
    if obj is None:
        if len(_OPEN) > 8:
            close_all()
        if kind == "slide":
            obj = Slide(path, verify=False)  # verified once by the caller
        elif kind == "mask":
            obj = Mask(path[0], open_cached(path[1], "slide").dimensions)
        else:
            obj = np.load(path, mmap_mode="r")
        _OPEN[key] = obj
    return obj


def close_all():
    """Close every handle this process keeps (tests call it between tests)."""
    for v in _OPEN.values():
        getattr(v, "close", lambda: None)()
    _OPEN.clear()
