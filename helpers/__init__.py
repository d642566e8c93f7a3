"""Shared plumbing for the PAIP 2019 reproduction notebooks.

Layering (imports only point down):

- ``paths``, ``errors``: where things live, and the one error type for bad input.
- ``synthetic``, ``slides``: the built-in demo data and slide/mask I/O (no torch).
- ``patches``, ``splits``, ``augment``: streaming patch extraction, caches, slide-level
  splits, the paper's augmentations.
- ``metrics``, ``train``: the paper's Dice loss and Dice/Jaccard conventions, classification
  metrics; the shared training loop (checkpoints, resume, plateau schedule, early stop).
- ``unetpp``, ``inference``: the paper's UNet++ with deep supervision; whole-slide
  prediction stitched at a downscale.
- ``models``: the paper's networks; ImageNet weights from the hub or a local file, failing
  fast and clearly offline.
- ``figures``, ``setup``, ``progress``: plotting utilities, notebook set-up (seeds,
  versions), progress bars.
- ``run``: the papermill runner that executes the numbered notebooks in order.
"""

__version__ = "0.1.0"
