"""Every notebook parameter, its type and its valid range, checked in one place.

papermill passes parameters unchecked (a mistyped value only fails, if at all, deep inside a
notebook after minutes of work). Each notebook's set-up cell calls
``check_parameters(globals())`` and the runner calls it on a run's merged parameters before any
notebook starts, so a bad value stops everything with one line naming the parameter, the value
and what is accepted. Used by notebooks 01-05 and ``helpers.run``.
"""

import numbers
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

#: The largest patch side accepted: a patch row at this size is already ~100 MB per 4,000 px.
MAX_PATCH = 4096


@dataclass(frozen=True)
class Spec:
    """What one parameter accepts.

    Attributes:
        kind: ``int``, ``float``, ``bool``, ``str``, ``ints``, ``floats`` or ``strs`` (lists).
        lo, hi: inclusive bounds for numbers (and list items).
        choices: the allowed values of a ``str`` (or of ``strs`` items).
        positive: numbers must be > 0 (``lo`` is then only a floor for the message).
        example: shown in the message.
    """

    kind: str
    lo: float = None
    hi: float = None
    choices: tuple = None
    positive: bool = False
    example: str = ""

    def check(self, name, value):
        """Return ``value`` (ints accepted for floats) or raise :class:`InputError`."""
        if self.kind in ("ints", "floats", "strs"):
            if not isinstance(value, (list, tuple)) or not value:
                raise InputError(f"parameter {name!r} must be a non-empty list{self._eg()}, got {value!r}")
            item = Spec(self.kind[:-1], self.lo, self.hi, self.choices, self.positive)
            return [item._one(name, v, list_item=True) for v in value]
        return self._one(name, value)

    def _eg(self):
        return f" (e.g. {self.example})" if self.example else ""

    def _one(self, name, v, list_item=False):
        what = f"{'every item of ' if list_item else ''}parameter {name!r}"
        if self.kind == "bool":
            if not isinstance(v, bool):
                raise InputError(f"{what} must be True or False, got {v!r}")
            return v
        if self.kind == "str":
            if not isinstance(v, str):
                raise InputError(f"{what} must be a string{self._eg()}, got {v!r} ({type(v).__name__})")
            if self.choices is not None and v not in self.choices:
                raise InputError(f"{what} must be one of {list(self.choices)}, got {v!r}")
            return v
        integer = self.kind == "int"
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or (integer and not isinstance(v, numbers.Integral)):
            raise InputError(
                f"{what} must be {'an integer' if integer else 'a number'}{self._eg()}, got {v!r} ({type(v).__name__})"
            )
        if (
            (self.positive and not v > 0)
            or (self.lo is not None and v < self.lo)
            or (self.hi is not None and v > self.hi)
        ):
            lo = (
                "> 0"
                if self.positive and (self.lo is None or self.lo <= 0)
                else (f">= {self.lo:g}" if self.lo is not None else "")
            )
            hi = f"<= {self.hi:g}" if self.hi is not None else ""
            raise InputError(f"{what} must be {' and '.join(x for x in (lo, hi) if x)}{self._eg()}, got {v!r}")
        return int(v) if integer else float(v)


def _i(lo=None, hi=None, positive=False, example=""):
    return Spec("int", lo, hi, positive=positive, example=example)


def _f(lo=None, hi=None, positive=False, example=""):
    return Spec("float", lo, hi, positive=positive, example=example)


FRACTION = Spec("float", 0, 1)
BOOL = Spec("bool")
TEXT = Spec("str")
DEVICES = ("auto", "cpu", "cuda")

#: Every parameter of notebooks 01-05 (a notebook declares a subset in its ``parameters`` cell).
SPECS = {
    # all notebooks
    "run_name": TEXT,
    "data_dir": TEXT,
    "seed": _i(0, 2**32 - 1),
    "models_from": TEXT,
    # 01
    "thumbnail_size": _i(16, 8192, example="768"),
    "example_case": TEXT,
    "figure1_scales": Spec("ints", 1, 1024, example="[4, 16, 64]"),
    "crop_size": _i(8, MAX_PATCH),
    "mask_check_step": _i(1, 1024),
    "max_thumbnails": _i(1, 200),
    # 02
    "scales": Spec("ints", 1, 1024, example="[1, 4, 16, 64]"),
    "patch_size": _i(8, MAX_PATCH, example="224"),
    "stride": _i(1, MAX_PATCH, example="224"),
    "seg_scale": _i(1, 1024, example="1"),
    "scale_reference": _f(0, 100, example="0.5"),
    "tissue_method": Spec("str", choices=("otsu", "slide")),
    "tissue_threshold": FRACTION,
    "glass_level": _i(1, 254, example="210"),
    "tissue_subsample": _i(1, 64, example="4"),
    "label_mask": Spec("str", choices=("viable", "whole")),
    "pos_threshold": FRACTION,
    "neg_threshold": FRACTION,
    "split_fractions": Spec("floats", 0, 1, example="[0.6, 0.2, 0.2]"),
    "workers": _i(0, 512),
    # 03
    "variant": Spec("str", choices=("paper", "smp")),
    "pretrained": BOOL,
    "seg_weights_path": TEXT,
    "seg_input_size": _i(32, MAX_PATCH, example="224"),
    "seg_batch_size": _i(1, 4096),
    "seg_epochs": _i(1, 100000),
    "seg_steps_per_epoch": _i(0, 10**7),
    "seg_optimizer": Spec("str", choices=("adam", "sgd")),
    "seg_lr": _f(positive=True, hi=10),
    "seg_weight_decay": _f(0, 1),
    "seg_lr_patience": _i(0, 100000),
    "seg_early_stop_patience": _i(0, 100000),
    "class_early_stop_patience": _i(0, 100000),
    "tumour_share": FRACTION,
    "color_jitter": FRACTION,
    "dice_per_image": BOOL,
    "val_max_patches": _i(1, 10**7),
    "bn_batches": _i(0, 100000),
    "infer_stride": _i(0, MAX_PATCH),
    "out_downsample": _i(1, 1024),
    "threshold": FRACTION,
    "infer_batch_size": _i(1, 4096),
    "device": Spec("str", choices=DEVICES),
    "target_dice": FRACTION,
    "gpus": _i(0, 1024),
    "cpu_jobs": _i(1, 64),
    # 04
    "models": Spec("strs", choices=("efficientnet_b0", "resnet50")),
    "class_scales": Spec("ints", 1, 1024, example="[4, 16, 64]"),
    "class_strides": Spec("ints", 1, MAX_PATCH, example="[224, 224, 224]"),
    "effnet_weights_path": TEXT,
    "resnet_weights_path": TEXT,
    "effnet_frozen_stages": _i(0, 7),
    "effnet_input_size": _i(16, MAX_PATCH),
    "resnet_input_size": _i(16, MAX_PATCH),
    "class_batch_size": _i(1, 4096),
    "class_color_jitter": FRACTION,
    "class_steps_per_epoch": _i(0, 10**7),
    "effnet_epochs": _i(1, 100000),
    "effnet_lr": _f(positive=True, hi=10),
    "effnet_lr_patience": _i(0, 100000),
    "effnet_weight_decay": _f(0, 1),
    "effnet_momentum": _f(0, 1),
    "resnet_epochs": _i(1, 100000),
    "resnet_lr": _f(positive=True, hi=10),
    "resnet_lr_patience": _i(0, 100000),
    "balance": BOOL,
    "compare_augmentation": BOOL,
    "target_accuracy": FRACTION,
    # 05
    "vote_share": FRACTION,
    "tie": Spec("str", choices=("non-tumour", "tumour")),
    "region_size": _i(0, 10**7),
    "region_min_tumour": FRACTION,
}


def _run_name_ok(v):
    if not v or "/" in v or "\\" in v or v.startswith(".") or v.strip() != v:
        raise InputError(f"parameter 'run_name' must be a plain folder name (letters, digits, - and _), got {v!r}")


def _file_ok(name, v):
    if v and not Path(v).expanduser().is_file():
        raise InputError(f"parameter {name!r}: {v} is no such file; pass a saved state dict, or '' for none")


def check_parameters(values, check_files=True):
    """Check every known parameter in ``values`` and the rules that tie several together.

    Args:
        values: a mapping of parameter names to values, e.g. a notebook's ``globals()`` (names
            that are not parameters are ignored) or the runner's merged parameters.
        check_files: also check that ``data_dir`` and weights files exist.

    Returns:
        ``{name: value}`` of the checked parameters (ints turned into floats where a float is
        expected).

    Raises:
        InputError: naming the first bad parameter, its value and what is accepted.
    """
    out = {k: spec.check(k, values[k]) for k, spec in SPECS.items() if k in values}
    if "run_name" in out:
        _run_name_ok(out["run_name"])
    g = out.get
    if (
        g("pos_threshold") is not None
        and g("neg_threshold") is not None
        and not g("neg_threshold") < g("pos_threshold")
    ):
        raise InputError(
            f"parameter 'neg_threshold' ({g('neg_threshold')}) must be below 'pos_threshold' "
            f"({g('pos_threshold')}): patches between the two are left out as ambiguous"
        )
    if "split_fractions" in out:
        check_fractions(out["split_fractions"])
    if "patch_size" in out and "tissue_subsample" in out and out["patch_size"] % out["tissue_subsample"]:
        raise InputError(
            f"parameter 'tissue_subsample' ({out['tissue_subsample']}) must divide 'patch_size' ({out['patch_size']})"
        )
    if "seg_scale" in out and "scales" in out and out["seg_scale"] not in out["scales"]:
        raise InputError(
            f"parameter 'seg_scale' ({out['seg_scale']}) must be one of 'scales' {out['scales']}: "
            "segmentation trains on the patches cut at that scale"
        )
    if "class_scales" in out and "class_strides" in out and len(out["class_scales"]) != len(out["class_strides"]):
        raise InputError(
            f"parameter 'class_strides' needs one stride per scale: {len(out['class_scales'])} scales "
            f"{out['class_scales']}, {len(out['class_strides'])} strides {out['class_strides']}"
        )
    if "seg_input_size" in out and out["seg_input_size"] % 32:
        raise InputError(
            f"parameter 'seg_input_size' must be a multiple of 32 (the encoder halves the image 5 "
            f"times), got {out['seg_input_size']}"
        )
    if check_files:
        dd = out.get("data_dir")
        if dd:
            p = Path(os.path.expanduser(dd))
            if not p.is_dir():
                raise InputError(
                    f"parameter 'data_dir': {dd} is no such folder; pass the folder that holds your "
                    "slides (or '' for the built-in demo data)"
                )
        for k in ("seg_weights_path", "effnet_weights_path", "resnet_weights_path"):
            if k in out:
                _file_ok(k, out[k])
    return out


def check_fractions(fractions):
    """Raise :class:`InputError` unless ``fractions`` are three non-negative shares summing to 1
    with a positive training share; return them as a tuple of floats."""
    ok = (
        isinstance(fractions, (list, tuple))
        and len(fractions) == 3
        and all(isinstance(f, (int, float)) and not isinstance(f, bool) and f >= 0 for f in fractions)
    )
    if not ok or abs(sum(fractions) - 1) > 1e-6 or fractions[0] <= 0:
        raise InputError(
            f"parameter 'split_fractions' must be three shares (train, val, test) summing to 1 "
            f"with train above 0, e.g. [0.6, 0.2, 0.2]; got {fractions!r}"
        )
    return tuple(float(f) for f in fractions)
