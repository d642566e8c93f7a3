"""Networks, losses and the training loop, independent of the paper's notebooks.

``metrics`` (losses and metrics), ``models`` (the classifiers, ImageNet weights failing fast
offline), ``unetpp`` (UNet++ with deep supervision), ``distributed`` (DDP on
``torch.distributed``), ``train`` (the shared training loop, exact resume), ``inference``
(whole-slide prediction stitched at a downscale). May import: ``core`` to ``patching``.
"""

#: The names notebooks 01-05 import from this layer, by module: their public face here
#: (``tests/test_layers.py`` keeps it exact). Everything else is the layer's own.
NOTEBOOK_API = {
    "metrics": (
        "classification_report",
        "dice_jaccard",
        "jaccard_from_dice",
    ),
    "models": ("build_classifier",),
    "train": ("select_device",),
    "unetpp": ("build_segmenter",),
}
