"""Provenance keys: every derived result records what produced it, and is reused only then.

A stale result is worse than a crash: a patch cache cut with another threshold, a checkpoint
trained on other patches, predictions of another model. So each artefact of a run (patch
cache, split, checkpoint, predicted masks, prediction table, metrics, report) carries a *key*:
a canonical JSON description of its inputs (the content of the slide and mask files, the keys
of the artefacts it was computed from, the parameters that change it, the weights' hash for
predictions). A later notebook recomputes what the key would be now and reuses the artefact
only when it matches; otherwise it recomputes it, or refuses with a message naming what
changed. Keys never contain absolute paths, so a project or dataset moved to another folder
keeps its caches.

Used by ``patches`` (cache keys), notebook 02 (split), ``train`` (checkpoint identities through
their ``meta``), ``segmentation`` and notebooks 03-05.
"""

import hashlib
import json
from pathlib import Path

from .atomic import write_json
from .errors import InputError

#: Bytes hashed at the start, middle and end of a file for its fingerprint.
SAMPLE = 1 << 20

_FINGERPRINTS = {}


def file_fingerprint(path):
    """A content fingerprint of a (possibly huge) file: its size and a SHA-256 over three 1 MiB
    samples (start, middle, end), 16 hex digits.

    Sampling keeps this fast on 2 GB slides while catching a replaced, re-exported, truncated or
    re-scanned file (JPEG tiles change everywhere); it does not catch an edit confined to bytes
    outside the samples. Cached per process by path, size and modification time.
    """
    p = Path(path)
    st = p.stat()
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    got = _FINGERPRINTS.get(memo)
    if got is None:
        h = hashlib.sha256(str(st.st_size).encode())
        with open(p, "rb") as f:
            for off in sorted({0, max(0, st.st_size // 2 - SAMPLE // 2), max(0, st.st_size - SAMPLE)}):
                f.seek(off)
                h.update(f.read(SAMPLE))
        got = _FINGERPRINTS[memo] = f"{st.st_size}:{h.hexdigest()[:16]}"
    return got


def file_sha256(path, chunk=1 << 20):
    """SHA-256 of a whole file (weights, small tables), read in chunks."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    return h.hexdigest()


def key_hash(obj, n=12):
    """The first ``n`` hex digits of the SHA-256 of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def stamp_path(artefact):
    """Where an artefact's key lives: ``<artefact>.key.json`` beside it."""
    a = Path(artefact)
    return a.with_name(a.name + ".key.json")


def write_stamp(artefact, key):
    """Record ``key`` (a JSON-able dict) as what produced ``artefact`` (written atomically,
    after the artefact itself, so a stamp never describes a half-written artefact)."""
    write_json(stamp_path(artefact), {"key": key, "hash": key_hash(key)})


def read_stamp(artefact):
    """The key recorded for ``artefact``, or ``None`` (no stamp: made by older code, or never)."""
    p = stamp_path(artefact)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())["key"]
    except (json.JSONDecodeError, KeyError, OSError):
        return None
