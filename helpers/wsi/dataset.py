"""Dataset folders: which slides there are, their masks, labels and patients.

The dataset contract (README, "Your own data"):

- slides: ``<slide_id>.<ext>``, any format OpenSlide reads (``.svs``, ``.tif``, ``.ndpi`` ...)
  or a plain PNG/JPEG/TIFF image, in the folder or in any subfolder of it (hidden ones aside);
  a slide id names one slide in the whole tree;
- optional masks: ``<slide_id>_whole.<tif|tiff|png>`` and ``<slide_id>_viable.<...>`` (PAIP
  2019's whole-tumour and viable-tumour masks, level-0 size or an exact downsample), beside
  their slide;
- an optional ``labels.csv`` at the top of the folder with a slide column, a ``label`` column (0/1, normal/tumour; empty
  = unknown) and an optional patient column. Accepted headers:

  ====================================  ==================  ====================
  header                                slide column        patient column
  ====================================  ==================  ====================
  ``slide_id,label[,patient_id]``       ``slide_id``        ``patient_id``
  ``slide_id,label,case_id``            ``slide_id``        ``case_id`` (patient)
  ``case_id,label[,patient_id]``        ``case_id`` (slide) ``patient_id``
  ====================================  ==================  ====================

Slides may come from scanners of different resolutions (their mpp): :func:`resolution_warning`
says so when scales are level-0 downsamples, and ``scale_reference`` gives every scale one
resolution (:func:`helpers.wsi.slides.scale_downsample`).

A slide's label comes from ``labels.csv``; without a row there, notebook 02 derives it from the
masks (tumour when the mask holds tumour); a slide with neither is *unlabelled* (``None``),
never 0. A labels file that names no slide of the folder is an error (its ids are probably of
another naming scheme); rows naming some missing slides are counted and shown.

Used by notebooks 01-05 (through :func:`list_cases`).
"""

import csv
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import InputError
from .slides import MASK_KINDS, SLIDE_SUFFIXES, Mask, Slide, SlideWarning, check_viable_inside_whole

#: Slides whose level-0 microns per pixel differ by more than this share were scanned at
#: different magnifications (a 20x and a 40x scan differ by 100 %; one scanner's slides by < 1 %).
MPP_SPREAD = 0.10

#: Words accepted in the ``label`` column.
LABEL_WORDS = {
    "0": 0,
    "1": 1,
    "normal": 0,
    "non-tumor": 0,
    "non-tumour": 0,
    "benign": 0,
    "negative": 0,
    "tumor": 1,
    "tumour": 1,
    "cancer": 1,
    "positive": 1,
}


@dataclass(frozen=True)
class Case:
    """One slide of a dataset folder, with its masks, label and patient (``None`` when unknown).

    ``case_id`` is the slide's id (its file stem): one case is one slide.
    """

    case_id: str
    slide: Path
    whole: Path = None
    viable: Path = None
    label: int = None
    patient_id: str = None

    def mask_path(self, kind):
        """The ``whole`` or ``viable`` mask path (``None`` if the case has none)."""
        if kind not in MASK_KINDS:
            raise InputError(f"mask kind must be one of {MASK_KINDS}, got {kind!r}")
        return getattr(self, kind)

    @property
    def patient(self):
        """The patient id, or the slide id when no patient is given (a patient of one slide)."""
        return self.patient_id or self.case_id


@dataclass
class LabelFile:
    """A parsed ``labels.csv``.

    Attributes:
        path: the file.
        slide_column, patient_column: the header names used (patient: ``None`` if absent).
        labels: ``{slide_id: 0, 1 or None}``.
        patients: ``{slide_id: patient_id}`` for rows that give one.
    """

    path: Path
    slide_column: str
    patient_column: str = None
    labels: dict = field(default_factory=dict)
    patients: dict = field(default_factory=dict)


def read_labels(path):
    """Read a ``labels.csv`` in one of the accepted layouts (see the module docstring).

    Returns:
        A :class:`LabelFile`.

    Raises:
        InputError: no slide or label column, an unknown label word, a slide listed twice.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        rd = csv.DictReader(f)
        cols = [c.strip() for c in (rd.fieldnames or [])]
        rd.fieldnames = cols
        if "slide_id" in cols:
            slide_col = "slide_id"
            patient_col = "patient_id" if "patient_id" in cols else ("case_id" if "case_id" in cols else None)
        elif "case_id" in cols:
            slide_col, patient_col = "case_id", ("patient_id" if "patient_id" in cols else None)
        else:
            slide_col = patient_col = None
        if slide_col is None or "label" not in cols:
            raise InputError(
                f"{path}: needs a slide column and a label column, e.g. the header "
                f"slide_id,label,patient_id (got {cols}); see README, 'Your own data'"
            )
        out = LabelFile(path, slide_col, patient_col)
        for i, row in enumerate(rd, start=2):
            sid = (row.get(slide_col) or "").strip()
            if not sid:
                continue
            if sid in out.labels:
                raise InputError(f"{path}, line {i}: slide {sid!r} is listed twice; keep one row per slide")
            v = (row.get("label") or "").strip().lower()
            if v and v not in LABEL_WORDS:
                raise InputError(
                    f"{path}, line {i}: label {row['label']!r} is not 0/1 (or normal/tumour); "
                    "leave it empty for an unknown label"
                )
            out.labels[sid] = LABEL_WORDS[v] if v else None
            pid = (row.get(patient_col) or "").strip() if patient_col else ""
            if pid:
                out.patients[sid] = pid
    return out


def _find_mask(folder, slide_id, kind):
    for suf in (".tif", ".tiff", ".png"):
        p = folder / f"{slide_id}_{kind}{suf}"
        if p.exists():
            return p
    return None


def find_slides(folder):
    """The slide files under a folder, in it or in any subfolder (masks, hidden files and
    folders, and other suffixes left out), sorted by their path below ``folder``.

    Deliveries arrive in batches (``batch_1/``, ``batch_2/``, a hospital's export tree): a
    slide may sit anywhere below ``data_dir``, with its masks beside it.
    """
    folder = Path(folder)
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            p = Path(root) / name
            if name.startswith(".") or p.suffix.lower() not in SLIDE_SUFFIXES:
                continue
            if any(p.stem.endswith("_" + k) for k in MASK_KINDS):
                continue
            out.append(p)
    return sorted(out, key=lambda p: p.relative_to(folder).parts)


def slide_folder(case, data_dir):
    """The folder of a case's slide below ``data_dir`` (``"."`` for the top)."""
    rel = Path(case.slide).parent.relative_to(Path(data_dir))
    return rel.as_posix() if rel.parts else "."


def list_cases(data_dir):
    """List the slides of a dataset folder with their masks, labels and patients.

    Args:
        data_dir: the folder (see the module docstring for its layout).

    Returns:
        A list of :class:`Case`, sorted by the slide's path below ``data_dir`` (by file name in
        a flat folder).

    Raises:
        InputError: the folder is missing or holds no slide, two slides share an id, or its
            ``labels.csv`` is unreadable or names no slide of the folder.
    """
    folder = Path(data_dir)
    if not folder.exists():
        raise InputError(
            f"data_dir {folder}: no such folder; point data_dir at a folder of slides "
            "(or leave it empty for the built-in demo data)"
        )
    if not folder.is_dir():
        raise InputError(f"data_dir {folder}: is a file, not a folder of slides")
    slides = find_slides(folder)
    if not slides:
        raise InputError(
            f"data_dir {folder}: holds no slides ({', '.join(SLIDE_SUFFIXES[:4])}, ...), neither in it "
            "nor in its subfolders; put the slides (and their _whole/_viable masks) there"
        )
    ids = [p.stem for p in slides]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        where = [p.relative_to(folder).as_posix() for p in slides if p.stem == dup[0]]
        raise InputError(
            f"data_dir {folder}: several files share the slide id {dup[0]!r} ({', '.join(where)}); "
            "a slide id names one slide: keep one of them, or rename the others"
        )
    lf = LabelFile(folder / "labels.csv", "slide_id")
    if lf.path.exists():
        lf = read_labels(lf.path)
        matched = set(lf.labels) & set(ids)
        if not matched:
            raise InputError(
                f"{lf.path}: names no slide of {folder} (its {lf.slide_column} values look like "
                f"{sorted(lf.labels)[:3]}, the slides are {ids[:3]}); the {lf.slide_column} column "
                "must hold slide file names without their extension"
            )
        unknown = sorted(set(lf.labels) - set(ids))
        if unknown:
            warnings.warn(
                f"{lf.path}: {len(unknown)} rows name no slide file (e.g. {unknown[:3]}); they are ignored",
                SlideWarning,
                stacklevel=2,
            )
    return [
        Case(
            p.stem,
            p,
            _find_mask(p.parent, p.stem, "whole"),
            _find_mask(p.parent, p.stem, "viable"),
            lf.labels.get(p.stem),
            lf.patients.get(p.stem),
        )
        for p in slides
    ]


def describe_cases(cases, data_dir=None):
    """Counts of what a dataset holds, for notebook 01's first table.

    Returns:
        A dict: ``slides``, ``formats`` (``{suffix: n}``), ``both masks``, ``one mask``,
        ``no mask``, ``labelled`` (a label in labels.csv), ``patients``, ``slides per patient``
        (the most), and, with ``data_dir``, ``folders`` (``{folder below data_dir: n slides}``,
        ``"."`` for the top) and ``labels.csv rows without a slide``.
    """
    formats = {}
    for c in cases:
        formats[c.slide.suffix.lower()] = formats.get(c.slide.suffix.lower(), 0) + 1
    n_masks = [(c.whole is not None) + (c.viable is not None) for c in cases]
    per_patient = {}
    for c in cases:
        per_patient[c.patient] = per_patient.get(c.patient, 0) + 1
    out = {
        "slides": len(cases),
        "formats": formats,
        "both masks": n_masks.count(2),
        "one mask": n_masks.count(1),
        "no mask": n_masks.count(0),
        "labelled": sum(c.label is not None for c in cases),
        "patients": len(per_patient),
        "slides per patient (most)": max(per_patient.values(), default=0),
    }
    if data_dir is not None:
        out["folders"] = dict(Counter(slide_folder(c, data_dir) for c in cases))
    if data_dir is not None and (Path(data_dir) / "labels.csv").exists():
        lf = read_labels(Path(data_dir) / "labels.csv")
        out["labels.csv rows without a slide"] = len(set(lf.labels) - {c.case_id for c in cases})
    return out


def check_masks(cases, step=8):
    """Check the two masks of every slide that has both (viable inside whole) and compare the
    masks' tumour with ``labels.csv``; notebook 01's section 4.

    Args:
        cases: :class:`Case` objects.
        step: read every ``step``-th mask pixel.

    Returns:
        ``(table, problems)``: one row per slide with both masks (``viable outside whole %``,
        ``consistent``, ``label (mask)``, ``label (csv)``), and one line per inconsistent slide
        saying what is wrong and what to do.
    """
    import pandas as pd

    rows, problems = [], []
    for c in cases:
        if c.whole is None or c.viable is None:
            continue
        with Slide(c.slide) as s, Mask(c.whole, s.dimensions) as w, Mask(c.viable, s.dimensions) as v:
            r = check_viable_inside_whole(w, v, step=step, warn=False)
        rows.append(
            {
                "slide": c.case_id,
                "viable outside whole %": round(100 * r["viable_outside"], 2),
                "consistent": r["ok"],
                "label (mask)": int(r["whole_px"] > 0),
                "label (csv)": c.label,
            }
        )
        if not r["ok"]:
            problems.append(f"{c.case_id}: {r['message']}")
    columns = ["slide", "viable outside whole %", "consistent", "label (mask)", "label (csv)"]
    return pd.DataFrame(rows, columns=columns), problems


def slide_resolutions(cases):
    """``{case_id: level-0 um/px, or None where the file does not say}``."""

    out = {}
    for c in cases:
        with Slide(c.slide, verify=False) as s:
            out[c.case_id] = None if s.mpp is None else s.mpp[0]
    return out


def _one_resolution(mpps):
    """Whether resolutions (um/px, none missing) lie within :data:`MPP_SPREAD` of each other."""
    mpps = list(mpps)
    return max(mpps) <= min(mpps) * (1 + MPP_SPREAD)


def resolution_warning(mpps, scale_reference=0.0):
    """The one line saying that a run mixes magnifications, or ``None`` when it does not.

    With ``scale_reference`` 0 a scale is a level-0 downsample, so slides scanned at different
    resolutions (a 20x and a 40x cohort) would give one scale two meanings: that is said, naming
    slides of each resolution and the parameter that fixes it. With a ``scale_reference`` every
    scale has one resolution; a slide without mpp is then an error.

    Args:
        mpps: ``{case_id: um/px or None}`` (see :func:`slide_resolutions`).
        scale_reference: the run's parameter.

    Raises:
        InputError: ``scale_reference`` is set and a slide gives no mpp.
    """
    if scale_reference:
        missing = sorted(k for k, v in mpps.items() if v is None)
        if missing:
            raise InputError(
                f"{len(missing)} slide(s) give no microns per pixel (mpp), e.g. {', '.join(missing[:3])}, so "
                f"they cannot be read at scale_reference = {scale_reference:g} um/px; re-export them with "
                "their mpp, move them out of data_dir, or set scale_reference: 0"
            )
        return None
    known = {k: v for k, v in mpps.items() if v is not None}
    if not known or _one_resolution(known.values()):
        return None
    groups = {}
    for k, v in sorted(known.items()):
        groups.setdefault(round(v, 2), []).append(k)
    where = "; ".join(
        f"{len(ids)} at {m:g} um/px ({', '.join(ids[:2])}{', ...' if len(ids) > 2 else ''})"
        for m, ids in sorted(groups.items())
    )
    coarse = max(known.values())
    return (
        f"the slides were scanned at different resolutions ({where}): with scale_reference = 0 a scale is "
        f"a downsample of each slide's level 0, so 4x would mean {4 * min(known.values()):.2g} um/px on some "
        f"and {4 * coarse:.2g} on others; set scale_reference: {coarse:.2g} (um/px) to give each scale one "
        "resolution on every slide"
    )


def scale_resolution(mpps, scale, scale_reference=0.0):
    """The um/px that ``scale`` means on slides of resolutions ``mpps`` (``{case_id: um/px or
    None}``): ``scale * scale_reference``, or with level-0 scales ``scale`` times the slides'
    common mpp; ``None`` where that is unknown (a slide without mpp) or not one (they differ by
    more than :data:`MPP_SPREAD`)."""
    if scale_reference:
        return scale * scale_reference
    known = [v for v in mpps.values() if v is not None]
    if not known or len(known) < len(mpps) or not _one_resolution(known):
        return None
    return scale * sorted(known)[len(known) // 2]


def check_trained_resolution(trained, mpps, scale, scale_reference, checkpoint):
    """Stop a model trained at ``trained`` um/px (its checkpoint's ``um_per_px``) from being
    applied to slides read at another resolution (more than :data:`MPP_SPREAD` apart), naming
    both and the fix. Unknown on either side: nothing to compare."""
    here = scale_resolution(mpps, scale, scale_reference)
    if trained is None or here is None or abs(here - trained) <= MPP_SPREAD * trained:
        return
    raise InputError(
        f"{checkpoint} was trained on patches at {trained:.3g} um/px, but this run reads {scale}x at "
        f"{here:.3g} um/px; set scale_reference to {trained / scale:.3g} so that {scale}x means what it did"
    )
