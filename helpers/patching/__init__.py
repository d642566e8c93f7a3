"""Patches: the grid and its caches, extraction, splits and augmentation.

``caches`` (the patch grid, labels, cache folders and keys), ``maskcounts`` (mask count maps),
``patches`` (streaming parallel extraction), ``splits`` (train/val/test by patient), ``augment``
(the paper's augmentations). May import: ``core``, ``demo``, ``wsi``.
"""
