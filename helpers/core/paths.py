"""Where things live, resolved from the repository root (never from the kernel's folder).

papermill runs a notebook in the shell's folder, nbval in the notebook's folder: every path a
helper builds starts from :data:`REPO_ROOT` so both work. Used by every notebook.
"""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_root():
    """Folder for generated data (the demo dataset): ``$PAIP_REPRO_DATA`` or ``<repo>/data``."""
    return Path(os.environ.get("PAIP_REPRO_DATA", REPO_ROOT / "data"))


def demo_data_dir():
    """The built-in demo dataset's folder (generated on first use by notebook 01 or the runner)."""
    return data_root() / "demo"


def runs_root():
    """The parent folder of all runs: ``$PAIP_REPRO_RUNS`` or ``<repo>/runs``."""
    return Path(os.environ.get("PAIP_REPRO_RUNS", REPO_ROOT / "runs"))


def run_dir(run_name):
    """Working folder of one run: caches, checkpoints, tables, figures and executed notebooks.

    Args:
        run_name: a short name (``demo``, ``paper`` or a user's own) under :func:`runs_root`.

    Returns:
        The folder, created if missing.
    """
    if not isinstance(run_name, str) or not run_name or "/" in run_name or run_name.startswith("."):
        raise ValueError(f"run_name must be a plain folder name, got {run_name!r}")
    d = runs_root() / run_name
    d.mkdir(parents=True, exist_ok=True)
    return d


def figures_dir(run_name):
    """Where ``save_fig`` writes: ``runs/<run_name>/figures`` (a run never touches the repository's
    committed ``figures/``, which ``make refresh-committed`` updates from a demo run)."""
    d = run_dir(run_name) / "figures"
    d.mkdir(parents=True, exist_ok=True)
    return d
