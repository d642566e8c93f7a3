"""Seeds and library versions: what a notebook's set-up cell and a training run record.

- :func:`seed_everything`: seeds Python, numpy and (if imported) torch; deterministic cuDNN.
- :func:`library_versions`: the installed versions of :data:`LIBRARIES`.
"""

import contextlib
import importlib.metadata
import os
import platform
import random

import numpy as np

from .errors import check_type

#: Libraries whose versions each notebook prints (and checkpoints record).
LIBRARIES = (
    "numpy",
    "openslide-python",
    "openslide-bin",
    "tifffile",
    "imagecodecs",
    "patchify",
    "scikit-image",
    "pandas",
    "matplotlib",
    "torch",
    "torchvision",
    "timm",
    "segmentation-models-pytorch",
    "papermill",
)


def library_versions(names=LIBRARIES):
    """``{package: version}`` for the installed packages among ``names`` (absent ones skipped)."""
    out = {"python": platform.python_version()}
    for n in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[n] = importlib.metadata.version(n)
    return out


def seed_everything(seed):
    """Seed Python, numpy and (if imported) torch; make cuDNN deterministic.

    Args:
        seed: an int, recorded by the notebook that sets it.
    """
    check_type("seed", seed, int, "an integer")
    random.seed(seed)
    np.random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.manual_seed(seed)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
