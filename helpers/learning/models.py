"""The paper's networks, and ImageNet weights that fail fast and clearly when offline.

- :func:`build_classifier`: EfficientNet-B0 or ResNet-50 (timm) for the patch classifiers of
  notebook 04, with the early stages frozen on request ("we fine-tune its final layers").
- :func:`build_smp_unetpp`: segmentation-models-pytorch's stock UNet++ with an EfficientNet-B0
  encoder, the comparison model of notebook 03.
- :func:`load_weights`: a local weights file, or the model hub (checked for reachability in a
  couple of seconds instead of the hub client's ~30 s of retries).

Training from scratch (``pretrained=False``) needs no network; the demo and the tests do that.
"""

import os
import socket
from pathlib import Path

import torch

from ..core.errors import InputError, check_type

#: Classifier architectures of the paper (section 3.5), by timm name.
CLASSIFIERS = ("efficientnet_b0", "resnet50")
#: Where timm and segmentation-models-pytorch fetch ImageNet weights from.
HUB_HOSTS = (("huggingface.co", 443),)


def hub_reachable(hosts=HUB_HOSTS, timeout=2.0):
    """Whether the model hub answers a TCP connection within ``timeout`` seconds.

    ``HF_HUB_OFFLINE=1`` (the hub client's own switch) counts as unreachable.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    for host, port in hosts:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            continue
    return False


def offline_error(what):
    return InputError(
        f"ImageNet weights for {what} come from the model hub, which cannot be reached from here. "
        "Either train from scratch (pretrained=False, as the demo profile does), or download the "
        "weights once where there is internet and pass weights_path=<file> (a state dict saved "
        "with torch.save(model.state_dict(), file))."
    )


def load_weights(model, weights_path, what):
    """Load a state dict from a local file into ``model`` (strict, with a clear error).

    Args:
        model: the freshly built network.
        weights_path: a ``.pt``/``.pth`` file holding a state dict (or a checkpoint dict with
            a ``model`` or ``state_dict`` entry).
        what: the model's name, for messages.
    """
    p = Path(weights_path).expanduser()
    if not p.is_file():
        raise InputError(f"weights_path {p}: no such file; pass a saved state dict for {what}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"weights_path {p}: cannot be read as torch weights ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
    own = model.state_dict()
    # Classifier heads differ from ImageNet's 1000 classes: keep our freshly initialised head.
    skip = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in skip}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skip]
    if unexpected or missing:
        raise InputError(
            f"weights_path {p}: does not fit {what} ({len(missing)} missing keys, e.g. "
            f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    return model


def freeze_early_stages(model, arch, frozen_stages):
    """Freeze the stem and the first ``frozen_stages`` stages of a classifier.

    EfficientNet-B0 has 7 stages (``blocks``), ResNet-50 4 (``layer1``-``layer4``); the stem is
    frozen whenever ``frozen_stages`` > 0. Returns the number of trainable parameters.
    """
    check_type("frozen_stages", frozen_stages, int, "an integer number of stages")
    if arch == "efficientnet_b0":
        stem, stages = [model.conv_stem, model.bn1], list(model.blocks)
    else:
        stem, stages = [model.conv1, model.bn1], [model.layer1, model.layer2, model.layer3, model.layer4]
    if not 0 <= frozen_stages <= len(stages):
        raise InputError(
            f"parameter 'frozen_stages' must lie between 0 and {len(stages)} for {arch}, got {frozen_stages}"
        )
    if frozen_stages:
        for m in stem + stages[:frozen_stages]:
            for prm in m.parameters():
                prm.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_classifier(arch, num_classes=2, pretrained=False, weights_path=None, frozen_stages=0):
    """A patch classifier of the paper: ``efficientnet_b0`` or ``resnet50`` from timm.

    Args:
        arch: one of :data:`CLASSIFIERS`.
        num_classes: output classes (tumour / non-tumour: 2).
        pretrained: ImageNet weights from the model hub (fails fast, clearly, when offline).
        weights_path: a local weights file instead of the hub (wins over ``pretrained``).
        frozen_stages: stages kept frozen while fine-tuning (see :func:`freeze_early_stages`).

    Returns:
        The ``torch.nn.Module``.
    """
    import timm

    if arch not in CLASSIFIERS:
        raise InputError(f"parameter 'arch' must be one of {CLASSIFIERS}, got {arch!r}")
    check_type("pretrained", pretrained, bool)
    use_hub = pretrained and weights_path is None
    if use_hub and not hub_reachable():
        raise offline_error(arch)
    model = timm.create_model(arch, pretrained=use_hub, num_classes=num_classes)
    # A new head starts at zero: timm initialises EfficientNet's linear layers uniformly in
    # +-1/sqrt(out_features), i.e. +-0.71 for two classes, so a fresh network starts with logits
    # of about +-10 and a cross-entropy of 4-7 (measured) that takes epochs to come down.
    head = model.get_classifier()
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    if weights_path is not None:
        load_weights(model, weights_path, arch)
    freeze_early_stages(model, arch, frozen_stages)
    return model


def build_smp_unetpp(pretrained=False, weights_path=None, encoder="efficientnet-b0"):
    """segmentation-models-pytorch's stock UNet++ (one sigmoid output) with the paper's encoder.

    Args:
        pretrained: ImageNet weights for the encoder from the hub (fails fast when offline).
        weights_path: a local weights file for the whole network instead.
        encoder: the smp encoder name.
    """
    import segmentation_models_pytorch as smp

    check_type("pretrained", pretrained, bool)
    use_hub = pretrained and weights_path is None
    if use_hub and not hub_reachable():
        raise offline_error(f"the {encoder} encoder")
    model = smp.UnetPlusPlus(encoder_name=encoder, encoder_weights="imagenet" if use_hub else None, classes=1)
    if weights_path is not None:
        load_weights(model, weights_path, f"UNet++/{encoder}")
    return model
