"""What every notebook's set-up cell does: seeds, figure defaults, versions, the run it belongs to.

- :func:`setup_notebook`: seeds Python, numpy and torch, sets figure defaults, prints library
  versions (notebooks 01-05).
- :func:`resolve_data_dir`: the dataset folder (the built-in demo data, generated on first use,
  when ``data_dir`` is empty).
- :func:`pick_example`: the case a notebook shows step by step (01, 02).
- :func:`load_run`: everything notebooks 03-05 need from notebook 02 (dataset, caches, split),
  checked to belong together.
"""

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import InputError, check_type
from ..core.parallel import cap_torch_threads
from ..core.paths import REPO_ROOT, run_dir
from ..core.provenance import key_hash, read_stamp
from ..core.seeding import library_versions, seed_everything


def setup_notebook(seed, show_versions=True):
    """Seed everything, set figure defaults, and print library versions in one short block.

    Returns:
        The versions dict (also recorded in run outputs).
    """
    import warnings

    import matplotlib as mpl

    # tqdm.auto warns on import when ipywidgets is absent (libraries import it lazily, so the
    # warning would land in whichever cell first builds a model, with a machine-specific path).
    warnings.filterwarnings("ignore", message="IProgress not found")
    # Warnings as one line, without the kernel's temporary file and line (they change per run,
    # and nbval compares the outputs of checked cells).
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"{category.__name__}: {message}\n"
    seed_everything(seed)
    cap_torch_threads()  # under a CPU quota (a container), as many threads as CPUs to run them
    mpl.rcParams.update(
        {"figure.dpi": 72, "savefig.dpi": 110, "font.size": 9, "axes.titlesize": 9, "image.interpolation": "nearest"}
    )
    v = library_versions()
    if show_versions:
        items = [f"{k} {val}" for k, val in v.items()]
        for i in range(0, len(items), 4):
            print(" | ".join(items[i : i + 4]))
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
        from ..demo.synthetic import ensure_demo_dataset

        return ensure_demo_dataset(progress=progress)
    p = Path(data_dir).expanduser()
    if not p.is_absolute():
        p = REPO_ROOT / p
    if not p.is_dir():
        raise InputError(
            f"data_dir {p}: no such folder; pass the folder that holds your slides (or '' for the built-in demo data)"
        )
    return p


def pick_example(cases, example_case="", need_masks=False):
    """The case a notebook shows step by step.

    Args:
        cases: :class:`helpers.wsi.dataset.Case` objects.
        example_case: a slide id the user asked for (an error when it is not in ``cases``), or
            ``""``: the largest slide labelled tumour (or with masks), else the largest slide.
        need_masks: prefer slides with a ``viable`` mask.

    Returns:
        The :class:`helpers.wsi.dataset.Case`.
    """
    from ..wsi.slides import Slide

    if example_case:
        by_id = {c.case_id: c for c in cases}
        if example_case not in by_id:
            raise InputError(
                f"parameter 'example_case': {example_case!r} is not a slide of this dataset; pick one "
                f"of {sorted(by_id)[:8]}{' ...' if len(by_id) > 8 else ''}"
            )
        return by_id[example_case]

    def area(c):
        with Slide(c.slide, verify=False) as s:
            return s.dimensions[0] * s.dimensions[1]

    preferred = [c for c in cases if c.label == 1 or (need_masks and c.viable is not None)]
    return max(preferred or cases, key=area)


@dataclass
class Run:
    """What notebooks 03-05 read of a run: the dataset, notebook 02's caches and split.

    Attributes:
        name, folder: the run's name and folder.
        data_dir: the dataset folder.
        scales: the scales notebook 02 cut.
        params: the :class:`helpers.patching.caches.ExtractionParams` of its caches.
        extraction_key: the key of the extraction record (all caches).
        split: the split table (``case_id, patient_id, label, split``).
        split_key: the key of the split.
        cases: ``{slide id: Case}``.
        by_split: ``{"train"|"val"|"test": [Case, ...]}``.
    """

    name: str
    folder: Path
    data_dir: Path
    scales: list
    params: object
    extraction_key: str
    caches: dict
    split: object
    split_key: str
    cases: dict
    by_split: dict = field(default_factory=dict)

    @property
    def cache_root(self):
        """The patch caches' folder."""
        return self.folder / "patches"

    @functools.cached_property
    def mpps(self):
        """``{slide id: level-0 um/px or None}``, read from the slides once per run."""
        from ..wsi.dataset import slide_resolutions

        return slide_resolutions(self.cases.values())

    def resolution(self, scale, splits=None):
        """The um/px ``scale`` means on this run's slides (those of ``splits``; default all), or
        ``None`` where unknown (see :func:`helpers.wsi.dataset.scale_resolution`)."""
        from ..wsi.dataset import scale_resolution

        ids = self.cases if splits is None else [c.case_id for s in splits for c in self.by_split[s]]
        return scale_resolution({k: self.mpps[k] for k in ids}, scale, self.params.scale_reference)

    def check_model_resolution(self, meta, checkpoint):
        """Refuse a model trained at another um/px than this run reads its scale at (see
        :func:`helpers.wsi.dataset.check_trained_resolution`)."""
        from ..wsi.dataset import check_trained_resolution

        scale = int(meta.get("scale", 0))
        check_trained_resolution(meta.get("um_per_px"), self.mpps, scale, self.params.scale_reference, checkpoint)

    def data_key(self, scale, splits=("train", "val"), params=None):
        """What a model trained (or predictions made) on ``splits`` at ``scale`` records as its
        data: the split's key and the content key of every slide's cache."""
        from ..patching.caches import cache_keys

        p = params or self.params
        return {
            "split": self.split_key,
            "scale": scale,
            "caches": {s: cache_keys(self.by_split[s], scale, self.cache_root, p) for s in splits},
        }


def load_run(run_name, data_dir):
    """Load what notebook 02 wrote for ``run_name`` and check that it belongs together.

    Args:
        run_name: the run.
        data_dir: this notebook's ``data_dir`` parameter (``""``: the demo data).

    Returns:
        A :class:`Run`.

    Raises:
        InputError: notebook 02 has not run for this run, ran on other slides, or its split no
            longer matches the dataset (rerun notebook 02).
    """
    import pandas as pd

    from ..patching.caches import load_extraction_record
    from ..wsi.dataset import list_cases

    folder = run_dir(run_name)
    rec = load_extraction_record(folder, resolve_data_dir(data_dir, progress=False))
    split_path = folder / "split.csv"
    stamp = read_stamp(split_path)
    if not split_path.exists() or stamp is None or stamp.get("extraction") != rec["key"]:
        raise InputError(
            f"{split_path}: missing, or not made with this run's patch caches; rerun notebook 02 "
            f"(python -m helpers.run --only 02 --run-name {run_name})"
        )
    split = pd.read_csv(split_path, dtype={"case_id": str, "patient_id": str})
    cases = {c.case_id: c for c in list_cases(rec["data_dir"])}
    missing = sorted(set(split.case_id) - set(cases))
    if missing:
        raise InputError(
            f"{split_path} names slides that are no longer in {rec['data_dir']} ({missing[:3]}); rerun notebook 02"
        )
    by_split = {s: [cases[i] for i in split.case_id[split.split == s]] for s in ("train", "val", "test")}

    return Run(
        run_name,
        folder,
        rec["data_dir"],
        rec["scales"],
        rec["params"],
        rec["key"],
        rec["caches"],
        split,
        key_hash(stamp),
        cases,
        by_split,
    )
