"""Networks, losses and the training loop, independent of the paper's notebooks.

``metrics`` (losses and metrics), ``models`` (the classifiers, ImageNet weights failing fast
offline), ``unetpp`` (UNet++ with deep supervision), ``distributed`` (DDP on
``torch.distributed``), ``train`` (the shared training loop, exact resume), ``inference``
(whole-slide prediction stitched at a downscale). May import: ``core`` to ``patching``.
"""
