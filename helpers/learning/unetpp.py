"""The paper's segmentation network: UNet++ with an EfficientNet-B0 encoder (section 3.4, Fig. 3).

UNet++ (Zhou et al., 2018) fills the gap between a U-Net's encoder and decoder with nested,
dense skip pathways. Write ``X[i][j]`` for the node at depth ``i`` (resolution halves with
``i``) and column ``j``:

- ``X[i][0]`` are the encoder's feature maps (EfficientNet-B0 stages at 1/2 ... 1/32);
- ``X[i][j] = conv(concat(X[i][0], ..., X[i][j-1], up(X[i+1][j-1])))``: every node sees all
  earlier nodes of its row plus the upsampled node below, where ``up`` is a transposed
  convolution (the paper's upsampling);
- every top-row node ``X[0][j]`` (j = 1..4) gets its own head: a transposed convolution back to
  full resolution and a 1 x 1 convolution. Each head's sigmoid is trained with the loss (deep
  supervision) and the final mask is the average of the four.

:meth:`UNetPlusPlus.node_shapes` lists every node's shape, which notebook 03 prints to show the
wiring. Used by notebook 03 (built through :func:`build_segmenter`).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import InputError, check_type
from .metrics import soft_dice_loss


def _block(cin, cout):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNetPlusPlus(nn.Module):
    """UNet++ over an smp encoder, with transposed-convolution upsampling and deep supervision.

    Args:
        encoder: an smp encoder whose ``out_channels`` are (input, 1/2, 1/4, 1/8, 1/16, 1/32).
        decoder_channels: channels of the nodes at depths 0-3 (depth 4 is the encoder's).
        head_channels: channels of each head's upsampling layer.

    ``forward`` returns the list of the four heads' logits (full resolution, 1 channel);
    :func:`probabilities` averages their sigmoids.
    """

    def __init__(self, encoder, decoder_channels=(32, 48, 64, 128), head_channels=16):
        super().__init__()
        self.encoder = encoder
        enc = list(encoder.out_channels[1:6])  # X[i][0], i = 0..4
        dec = list(decoder_channels) + [enc[4]]
        self.depth = 4
        self.up = nn.ModuleDict()
        self.node = nn.ModuleDict()
        for j in range(1, self.depth + 1):
            for i in range(0, self.depth - j + 1):
                below = enc[i + 1] if j == 1 else dec[i + 1]
                self.up[f"{i}_{j}"] = nn.ConvTranspose2d(below, dec[i], 2, stride=2)
                cin = enc[i] + (j - 1) * dec[i] + dec[i]
                self.node[f"{i}_{j}"] = _block(cin, dec[i])
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.ConvTranspose2d(dec[0], head_channels, 2, stride=2),
                nn.BatchNorm2d(head_channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(head_channels, 1, 1),
            )
            for _ in range(self.depth)
        )

    def nodes(self, x):
        """All nodes ``{(i, j): tensor}`` for an input batch (for inspection)."""
        feats = self.encoder(x)[1:6]
        X = {(i, 0): f for i, f in enumerate(feats)}
        for j in range(1, self.depth + 1):
            for i in range(0, self.depth - j + 1):
                up = self.up[f"{i}_{j}"](X[(i + 1, j - 1)])
                row = [X[(i, k)] for k in range(j)]
                if up.shape[-2:] != row[0].shape[-2:]:  # odd sizes: align to the skip
                    up = F.interpolate(up, size=row[0].shape[-2:], mode="nearest")
                X[(i, j)] = self.node[f"{i}_{j}"](torch.cat(row + [up], dim=1))
        return X

    def forward(self, x):
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise InputError(
                f"UNet++ input sides must be multiples of 32 (the encoder halves 5 times), got {tuple(x.shape[-2:])}"
            )
        X = self.nodes(x)
        return [head(X[(0, j)]) for j, head in zip(range(1, self.depth + 1), self.heads)]

    def node_shapes(self, size=224):
        """``{"X[i][j]": (channels, height, width)}`` for one ``size`` x ``size`` input."""
        was = self.training
        self.eval()
        with torch.no_grad():
            X = self.nodes(torch.zeros(1, 3, size, size, device=next(self.parameters()).device))
        self.train(was)
        return {
            f"X[{i}][{j}]": tuple(t.shape[1:]) for (i, j), t in sorted(X.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        }


def as_head_list(outputs):
    """A model's output as a list of logit maps (smp's UNet++ returns one tensor)."""
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def probabilities(outputs):
    """The final mask probabilities: the average of the heads' sigmoids (paper, section 3.4)."""
    heads = as_head_list(outputs)
    return torch.stack([torch.sigmoid(h.float()) for h in heads]).mean(0)


def deep_supervision_dice_loss(outputs, target, per_image=True):
    """Soft Dice loss (eq. 1, corrected) on every head, averaged: each head is supervised.

    ``per_image=False`` pools each head's Dice over the whole batch (see
    :func:`helpers.learning.metrics.soft_dice_loss`).
    """
    t = target.float()
    if t.ndim == 3:
        t = t[:, None]
    heads = as_head_list(outputs)
    return sum(soft_dice_loss(torch.sigmoid(h.float()), t, per_image=per_image) for h in heads) / len(heads)


def build_segmenter(variant="paper", pretrained=False, weights_path=None):
    """The segmentation network: ``paper`` (this module's UNet++) or ``smp`` (smp's stock one).

    Args:
        variant: ``paper`` or ``smp``.
        pretrained: ImageNet weights for the EfficientNet-B0 encoder (needs the model hub; fails
            fast and clearly offline).
        weights_path: a local state dict for the whole network instead.
    """
    from . import models

    check_type("pretrained", pretrained, bool)
    if variant == "smp":
        return models.build_smp_unetpp(pretrained=pretrained, weights_path=weights_path)
    if variant != "paper":
        raise InputError(f"parameter 'variant' must be 'paper' or 'smp', got {variant!r}")
    import segmentation_models_pytorch as smp

    use_hub = pretrained and weights_path is None
    if use_hub and not models.hub_reachable():
        raise models.offline_error("the efficientnet-b0 encoder")
    enc = smp.encoders.get_encoder("efficientnet-b0", in_channels=3, depth=5, weights="imagenet" if use_hub else None)
    model = UNetPlusPlus(enc)
    if weights_path is not None:
        models.load_weights(model, weights_path, "UNet++ (paper)")
    return model
