"""One way to load a trained model (``helpers.learning.train.trained_network``): every helper that applies
a checkpoint goes through it, and it gives one error naming the file and the fix for a missing
file, an unreadable one, settings that must agree and do not, and weights that do not fit."""

import re
from pathlib import Path

import pytest
import torch

from helpers.core.errors import InputError
from helpers.learning.models import build_classifier
from helpers.learning.train import checkpoint_meta, read_trained, trained_network
from helpers.paper.classification import ClassificationPlan, _load_classifier
from helpers.paper.segmentation import trained_segmenter

HELPERS = Path(__file__).resolve().parent.parent / "helpers"


def _checkpoint(path, model, meta):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "epoch": 1, "identity": {"meta": meta}}, path)
    return path


def _conv(meta):
    return torch.nn.Conv2d(3, meta["out"], 1)


def test_the_network_is_built_from_the_checkpoints_own_settings(tmp_path):
    src = torch.nn.Conv2d(3, 2, 1)
    ck_path = _checkpoint(tmp_path / "best.pt", src, {"out": 2, "patch_size": 32, "scale": 4})
    model, ck = trained_network(_conv, ck_path)
    assert torch.equal(model.weight, src.weight) and checkpoint_meta(ck)["scale"] == 4
    # Only the keys named must agree; a key the checkpoint does not record is not compared.
    here = {"patch_size": 32, "scale": 16, "stride": 8}
    trained_network(_conv, ck_path, here, keys=("patch_size", "stride"))
    with pytest.raises(InputError) as err:
        trained_network(_conv, ck_path, here, keys=("patch_size", "scale"), fix="apply another run's model")
    msg = str(err.value)
    assert msg.startswith(f"{ck_path} was trained with other settings: scale 4 (here 16)")
    assert msg.endswith("; apply another run's model") and "patch_size" not in msg
    # Without keys, the whole meta must be the same.
    with pytest.raises(InputError, match="out 2 .here None."):
        read_trained(ck_path, {"patch_size": 32, "scale": 4})


def test_missing_unreadable_and_misfitting_checkpoints_are_one_error_each(tmp_path):
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'none.pt'}: no checkpoint; train first")):
        trained_network(_conv, tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_text("not torch")
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'junk.pt'}: cannot be read as a checkpoint")):
        trained_network(_conv, tmp_path / "junk.pt")
    torch.save(torch.nn.Conv2d(3, 2, 1).state_dict(), tmp_path / "weights_only.pt")  # no checkpoint of fit
    with pytest.raises(InputError, match="weights_only.pt: cannot be read as a checkpoint .it holds no model"):
        trained_network(_conv, tmp_path / "weights_only.pt")
    ck_path = _checkpoint(tmp_path / "best.pt", torch.nn.Conv2d(3, 2, 1), {"out": 3})  # names another network
    with pytest.raises(InputError, match=re.escape(f"{ck_path}: its weights do not fit the network built")):
        trained_network(_conv, ck_path)


def test_a_classifier_folder_must_hold_that_classifier(tmp_path):
    b0 = build_classifier("efficientnet_b0")
    meta = {"arch": "efficientnet_b0", "scale": 4, "input_size": 48}
    _checkpoint(tmp_path / "efficientnet_b0_x4" / "best.pt", b0, meta)
    _checkpoint(tmp_path / "resnet50_x4" / "best.pt", b0, meta)  # copied into the wrong folder
    plan = ClassificationPlan("apply", [], [], [], {}, {k: tmp_path / k for k in ("efficientnet_b0_x4", "resnet50_x4")})
    model, size = _load_classifier(plan, "efficientnet_b0_x4", 224)
    assert size == 48 and torch.equal(model.conv_stem.weight, b0.conv_stem.weight)
    with pytest.raises(InputError, match=r"resnet50_x4.best\.pt was trained with other settings: arch"):
        _load_classifier(plan, "resnet50_x4", 224)


def test_a_segmenter_checkpoint_of_another_network_is_named(tmp_path):
    _checkpoint(tmp_path / "best.pt", torch.nn.Conv2d(3, 1, 1), {"variant": "paper"})
    with pytest.raises(InputError, match=r"best\.pt: its weights do not fit"):
        trained_segmenter(tmp_path)


def test_checkpoints_are_read_only_through_the_one_loader():
    """``load_checkpoint`` (the raw reader) is used by resuming and by the loader, in train.py
    alone, and no helper loads a checkpoint's weights by itself."""
    for path in sorted(HELPERS.rglob("*.py")):
        text = path.read_text()
        if path.name != "train.py":
            assert "load_checkpoint" not in text, path.name
            assert not re.search(r"load_state_dict\(ck\b", text), path.name
