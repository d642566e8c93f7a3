"""The error raised for bad input, so that notebooks and the runner can show one clear line.

Used by every helper module.
"""


class InputError(ValueError):
    """Bad input from the user: a missing or unreadable file, a wrong parameter.

    The message names the file or parameter and says what to do about it.
    """


class DiskFullError(InputError, OSError):
    """The disk filled up while a result was written; nothing half-written was left behind."""


def disk_full(path, what=None):
    """The one error for a full disk, whatever was being written (cache, map, checkpoint, figure).

    Args:
        path: the file or folder being written.
        what: optional words for it (e.g. "the 4x patches of demo_03").
    """
    import shutil
    from pathlib import Path

    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = f"{shutil.disk_usage(folder).free / 1e9:.2f} GB free now"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        f"the disk holding {folder} is full ({free}) while writing {what or Path(path).name}; "
        "nothing half-written was kept and finished results stay reusable: free space (or "
        "set PAIP_REPRO_RUNS to a larger disk) and rerun"
    )


def is_disk_full(exc):
    """Whether an exception is the operating system saying the disk (or quota) is full, or was
    raised while handling that: torch's zip writer turns a write's ``ENOSPC`` into its own
    ``RuntimeError: ... unexpected pos`` (the ``OSError`` left only as its ``__context__``)."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def check_type(name, value, types, what=None):
    """Raise :class:`InputError` unless ``value`` is an instance of ``types``.

    Args:
        name: the parameter's name, as the user wrote it.
        value: the value received.
        types: a type or tuple of types that are accepted.
        what: optional words for the accepted types (default: the type names).

    Returns:
        ``value``, unchanged.
    """
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        if what is None:
            tt = types if isinstance(types, tuple) else (types,)
            what = " or ".join(t.__name__ for t in tt)
        raise InputError(f"parameter {name!r} must be {what}, got {value!r} ({type(value).__name__})")
    return value


def check_positive(name, value, integer=False):
    """Raise :class:`InputError` unless ``value`` is a positive number (an int if ``integer``).

    Returns:
        ``value``, unchanged.
    """
    check_type(name, value, int if integer else (int, float), "a positive integer" if integer else "a positive number")
    if not value > 0:
        raise InputError(f"parameter {name!r} must be positive, got {value!r}")
    return value


def check_fraction(name, value):
    """Raise :class:`InputError` unless ``value`` is a number in [0, 1].

    Returns:
        ``value`` as a float.
    """
    check_type(name, value, (int, float), "a number between 0 and 1")
    if not 0.0 <= value <= 1.0:
        raise InputError(f"parameter {name!r} must lie between 0 and 1, got {value!r}")
    return float(value)
