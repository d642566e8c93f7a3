"""The paper's augmentations (rotation, flipping, blurring, scaling, shifting) and class balance.

Written in torch on whole batches so that the same code runs on the GPU in the training loops
of notebooks 03 and 04 (no per-patch Python on the hot path); notebook 02 shows samples.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import InputError, check_fraction


def _gaussian_kernels(sigmas, radius):
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigmas.device)
    k = torch.exp(-(x[None, :] ** 2) / (2 * sigmas[:, None] ** 2))
    return k / k.sum(dim=1, keepdim=True)


def _uniform(n, lo, hi, generator, device):
    """``n`` draws, uniform in ``[lo, hi)``."""
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def _random_grid(x, generator, rotation, flip, scale, shift):
    """The sampling grid of one random affine warp per image of ``x`` (rotation, flips, zoom,
    shift; see :func:`augment_batch`), for ``grid_sample``."""
    n, dev, g = x.shape[0], x.device, generator
    ang = _uniform(n, -rotation, rotation, g, dev) * (math.pi / 180)
    s = _uniform(n, *scale, g, dev)
    fx = torch.where(torch.rand(n, generator=g, device=dev) < flip, -1.0, 1.0)
    fy = torch.where(torch.rand(n, generator=g, device=dev) < flip, -1.0, 1.0)
    tx, ty = _uniform(n, -shift, shift, g, dev) * 2, _uniform(n, -shift, shift, g, dev) * 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos * fx, -sin * fy, tx], 1), torch.stack([sin * fx, cos * fy, ty], 1)], 1)
    return F.affine_grid(theta, list(x.shape), align_corners=False)


def _random_blur(out, generator, blur_p, blur_sigma):
    """Blur each image of ``out`` with probability ``blur_p``, with a sigma drawn in
    ``blur_sigma``: a separable Gaussian, as a grouped convolution over (image, channel) pairs."""
    n, dev = out.shape[0], out.device
    do_blur = torch.rand(n, generator=generator, device=dev) < blur_p
    if not (blur_p > 0 and bool(do_blur.any())):
        return out
    sig = _uniform(n, *blur_sigma, generator, dev)
    radius = int(math.ceil(3 * blur_sigma[1]))
    k = _gaussian_kernels(sig, radius)  # (n, 2r+1)
    c = out.shape[1]
    kk = k.repeat_interleave(c, 0)  # (n*c, 2r+1)
    y = out.reshape(1, n * c, *out.shape[2:])
    y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kk[:, None, None, :], groups=n * c)
    y = F.conv2d(y, kk[:, None, :, None], groups=n * c)
    y = y.reshape(out.shape)
    return torch.where(do_blur[:, None, None, None], y, out)


def augment_batch(
    x,
    generator=None,
    masks=None,
    rotation=180.0,
    flip=0.5,
    scale=(0.9, 1.1),
    shift=0.05,
    blur_p=0.3,
    blur_sigma=(0.3, 1.5),
    color=0.0,
):
    """Randomly rotate, flip, scale, shift and blur a batch of images (and their masks alike).

    Geometry is one affine warp per image (``affine_grid`` + ``grid_sample``, borders
    reflected), so rotation, flips, scaling and shifting cost one resampling; blur is a
    separable Gaussian with a per-image sigma, applied to images only.

    Args:
        x: ``(n, c, h, w)`` tensor, uint8 (0-255) or float (0-1).
        generator: a ``torch.Generator`` (on ``x``'s device) for reproducible draws.
        masks: optional ``(n, 1, h, w)`` or ``(n, h, w)`` masks warped with the same geometry
            (nearest sampling), for segmentation.
        rotation: largest rotation in degrees (either way).
        flip: probability of a horizontal and (independently) a vertical flip.
        scale: range of the zoom factor.
        shift: largest shift as a fraction of the image size.
        blur_p: probability that an image is blurred.
        blur_sigma: range of the blur's sigma, in pixels.
        color: largest per-channel shift of the colours (a fraction of the range, either way;
            0 = none, the paper's list). A stand-in for stain variation between slides: with
            few training slides a network otherwise learns each slide's tint.

    Returns:
        The float images in [0, 1] (and the masks, as float 0/1, when given).
    """
    if x.ndim != 4:
        raise InputError(f"augment_batch expects an (n, c, h, w) batch, got shape {tuple(x.shape)}")
    check_fraction("flip", flip)
    check_fraction("blur_p", blur_p)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    grid = _random_grid(x, generator, rotation, flip, scale, shift)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    out = _random_blur(out, generator, blur_p, blur_sigma)
    n, dev = x.shape[0], x.device
    if color:
        check_fraction("color", color)
        shift_rgb = (torch.rand(n, out.shape[1], generator=generator, device=dev) * 2 - 1) * color
        out = out + shift_rgb[:, :, None, None]
    out = out.clamp_(0, 1)
    if masks is None:
        return out
    m = masks if masks.ndim == 4 else masks[:, None]
    m = F.grid_sample(m.float(), grid, mode="nearest", padding_mode="reflection", align_corners=False)
    return out, m


def balance_indices(labels, seed=0):
    """Indices that balance two or more classes by repeating the minority (to be augmented).

    The paper balances its classes by augmenting the minority class; here each class is
    repeated (cycling through a seeded permutation) up to the majority's count, and every
    repeat gets its own random augmentation at training time.

    Args:
        labels: a 1-D array of class labels (ambiguous patches, -1, are left out).
        seed: the permutation seed.

    Returns:
        A shuffled int array of indices into ``labels``.
    """
    labels = np.asarray(labels)
    classes = [c for c in np.unique(labels) if c >= 0]
    if len(classes) < 2:
        raise InputError(f"cannot balance classes: only {classes} present; each class needs patches")
    rng = np.random.default_rng(seed)
    target = max(int((labels == c).sum()) for c in classes)
    parts = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        reps = np.concatenate([rng.permutation(idx) for _ in range(-(-target // len(idx)))])[:target]
        parts.append(reps)
    out = np.concatenate(parts)
    rng.shuffle(out)
    return out
