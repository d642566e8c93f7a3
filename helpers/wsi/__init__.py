"""Reading whole-slide images, their masks and dataset folders (no torch in this layer).

``slides`` (slide and mask I/O without holding a level), ``handles`` (per-process open files),
``dataset`` (the dataset contract: slides, masks, labels, patients), ``tissue`` (tissue
detection). May import: ``core``, ``demo``.
"""

#: The names notebooks 01-05 import from this layer, by module: their public face here
#: (``tests/test_layers.py`` keeps it exact). Everything else is the layer's own.
NOTEBOOK_API = {
    "dataset": (
        "MPP_SPREAD",
        "check_masks",
        "describe_cases",
        "list_cases",
        "resolution_warning",
    ),
    "slides": (
        "Mask",
        "Slide",
        "scale_downsample",
    ),
    "tissue": (
        "compare_methods",
        "otsu_thresholds",
        "otsu_tissue_masks",
        "slide_tissue_threshold",
        "tissue_fractions",
        "tissue_fractions_at",
        "to_gray",
    ),
}
