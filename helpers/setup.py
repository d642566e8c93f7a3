"""Notebook set-up: seeds, figure defaults, library versions, the dataset folder.

Every notebook's third cell calls :func:`setup_notebook`; used by notebooks 01-05.
"""

import importlib.metadata
import os
import platform
import random
from pathlib import Path

import numpy as np

from .errors import InputError, check_type
from .paths import REPO_ROOT

#: Libraries whose versions each notebook prints (and checkpoints record).
LIBRARIES = ("numpy", "openslide-python", "openslide-bin", "tifffile", "imagecodecs", "patchify",
             "scikit-image", "pandas", "matplotlib", "torch", "torchvision", "timm",
             "segmentation-models-pytorch", "papermill")


def library_versions(names=LIBRARIES):
    """``{package: version}`` for the installed packages among ``names`` (absent ones skipped)."""
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            pass
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


def setup_notebook(seed, show_versions=True):
    """Seed everything, set figure defaults, and print library versions on one short block.

    Returns:
        The versions dict (also recorded in run outputs).
    """
    import warnings

    import matplotlib as mpl

    # tqdm.auto warns on import when ipywidgets is absent (libraries import it lazily, so the
    # warning would land in whichever cell first builds a model, with a machine-specific path).
    warnings.filterwarnings("ignore", message="IProgress not found")
    seed_everything(seed)
    mpl.rcParams.update({"figure.dpi": 90, "savefig.dpi": 110, "font.size": 9,
                         "axes.titlesize": 9, "image.interpolation": "nearest"})
    v = library_versions()
    if show_versions:
        items = [f"{k} {val}" for k, val in v.items()]
        for i in range(0, len(items), 4):
            print(" | ".join(items[i:i + 4]))
    return v


def resolve_data_dir(data_dir, progress=True):
    """The dataset folder: the built-in demo data (generated if missing) when ``data_dir`` is
    empty, else the user's folder (a relative path is taken from the repository root).

    Args:
        data_dir: ``""`` for the demo, or a folder laid out like PAIP 2019.
        progress: progress bar while the demo data is generated.

    Returns:
        A :class:`pathlib.Path`.
    """
    check_type("data_dir", data_dir, (str, os.PathLike), "a folder path (or '' for the demo data)")
    if str(data_dir) == "":
        from .synthetic import ensure_demo_dataset

        return ensure_demo_dataset(progress=progress)
    p = Path(data_dir).expanduser()
    if not p.is_absolute():
        p = REPO_ROOT / p
    if not p.is_dir():
        raise InputError(f"data_dir {p}: no such folder; pass the folder that holds your slides "
                         "(or '' for the built-in demo data)")
    return p
