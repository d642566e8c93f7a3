"""Patches: the grid and its caches, extraction, splits and augmentation.

``caches`` (the patch grid, labels, cache folders and keys), ``maskcounts`` (mask count maps),
``patches`` (streaming parallel extraction), ``splits`` (train/val/test by patient), ``augment``
(the paper's augmentations). May import: ``core``, ``demo``, ``wsi``.
"""

#: The names notebooks 01-05 import from this layer, by module: their public face here
#: (``tests/test_layers.py`` keeps it exact). Everything else is the layer's own.
NOTEBOOK_API = {
    "augment": (
        "augment_batch",
        "balance_indices",
    ),
    "caches": (
        "ExtractionParams",
        "grid_shape",
        "save_extraction_record",
    ),
    "maskcounts": ("mask_label",),
    "patches": ("extract_dataset",),
    "splits": (
        "save_split",
        "split_cases",
    ),
}
