"""The error raised for bad input, so that notebooks and the runner can show one clear line.

Used by every helper module.
"""


class InputError(ValueError):
    """Bad input from the user: a missing or unreadable file, a wrong parameter.

    The message names the file or parameter and says what to do about it.
    """


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
