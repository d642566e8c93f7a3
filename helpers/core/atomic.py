"""Atomic writes: an interrupted run never leaves a half-written file or cache behind.

Everything is written under a temporary name in the destination's folder and renamed into
place at the end (a rename within one file system is atomic). Used by ``synthetic``,
``patches`` and the runner.
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import DiskFullError, disk_full, is_disk_full


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dest, suffix=""):
    """Yield a temporary path beside ``dest``; on success rename it to ``dest``.

    On an exception the temporary file is removed and ``dest`` is left as it was; a full disk
    becomes one :class:`helpers.core.errors.DiskFullError` naming the folder.

    Args:
        dest: the final path.
        suffix: kept at the end of the temporary name (some writers pick the format by it).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp" + suffix, dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise disk_full(dest) from None
        raise


@contextlib.contextmanager
def atomic_dir(dest):
    """Yield a temporary folder beside ``dest``; on success it replaces ``dest`` as a whole.

    A reader sees either the old folder, or the complete new one: never a mix. A full disk
    becomes one :class:`helpers.core.errors.DiskFullError`, as for :func:`atomic_path`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise disk_full(dest) from None
        raise


def write_json(dest, obj):
    """Write ``obj`` as indented JSON to ``dest``, atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def remove_stale_temporaries(folder):
    """Delete temporaries that a killed run left in ``folder`` (names ``.*.tmp*``).

    Returns:
        The number of entries removed.
    """
    folder = Path(folder)
    n = 0
    if folder.is_dir():
        for p in folder.glob(".*.tmp*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
    return n
