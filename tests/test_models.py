"""Networks build offline, pretrained weights fail fast and clearly, local weights load."""

import time

import pytest
import torch

from helpers.core.errors import InputError
from helpers.learning import models


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
@pytest.mark.parametrize("arch", models.CLASSIFIERS)
def test_classifier_from_scratch_shapes(arch):
    m = models.build_classifier(arch, num_classes=2).eval()
    with torch.no_grad():
        assert m(torch.zeros(2, 3, 224, 224)).shape == (2, 2)


@pytest.mark.parametrize("arch", models.CLASSIFIERS)
def test_pretrained_offline_fails_fast_and_names_the_ways_out(arch, offline):
    t = time.perf_counter()
    with pytest.raises(InputError) as e:
        models.build_classifier(arch, pretrained=True)
    assert time.perf_counter() - t < 5
    msg = str(e.value)
    assert arch in msg and "pretrained=False" in msg and "weights_path" in msg


def test_unreachable_host_is_detected_quickly(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t = time.perf_counter()
    assert models.hub_reachable(hosts=(("127.0.0.1", 9),), timeout=0.5) is False  # discard port: closed
    assert time.perf_counter() - t < 2


def test_local_weights_load_and_keep_our_head(tmp_path):
    src = models.build_classifier("resnet50", num_classes=1000)  # an "ImageNet-shaped" model
    torch.save(src.state_dict(), tmp_path / "r50.pt")
    m = models.build_classifier("resnet50", num_classes=2, weights_path=tmp_path / "r50.pt")
    assert torch.equal(m.conv1.weight, src.conv1.weight)
    assert m.fc.weight.shape == (2, 2048)


def test_local_weights_that_do_not_fit_are_refused(tmp_path):
    torch.save(models.build_classifier("efficientnet_b0").state_dict(), tmp_path / "b0.pt")
    with pytest.raises(InputError, match="does not fit"):
        models.build_classifier("resnet50", weights_path=tmp_path / "b0.pt")
    with pytest.raises(InputError, match="no such file"):
        models.build_classifier("resnet50", weights_path=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not torch")
    with pytest.raises(InputError, match="cannot be read"):
        models.build_classifier("resnet50", weights_path=tmp_path / "junk.pt")


@pytest.mark.parametrize("arch,stages", [("efficientnet_b0", 7), ("resnet50", 4)])
def test_freezing_early_stages(arch, stages):
    full = sum(p.numel() for p in models.build_classifier(arch).parameters())
    m = models.build_classifier(arch, frozen_stages=2)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert 0 < trainable < full
    head = m.classifier if arch == "efficientnet_b0" else m.fc
    assert all(p.requires_grad for p in head.parameters())
    with pytest.raises(InputError, match="frozen_stages"):
        models.build_classifier(arch, frozen_stages=stages + 1)


def test_bad_arch_and_types():
    with pytest.raises(InputError, match="arch"):
        models.build_classifier("vgg16")
    with pytest.raises(InputError, match="pretrained"):
        models.build_classifier("resnet50", pretrained="yes")


@pytest.mark.slow
def test_smp_unetpp_offline_and_from_scratch(offline):
    with pytest.raises(InputError, match="efficientnet-b0"):
        models.build_smp_unetpp(pretrained=True)
    m = models.build_smp_unetpp().eval()
    with torch.no_grad():
        assert m(torch.zeros(1, 3, 224, 224)).shape == (1, 1, 224, 224)
