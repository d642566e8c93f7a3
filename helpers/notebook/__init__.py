"""Notebook glue: the set-up cells (``session``: seeds, versions, the run) and ``figures``.

May import: every layer below (``core`` to ``paper``).
"""

#: The names notebooks 01-05 import from this layer, by module: their public face here
#: (``tests/test_layers.py`` keeps it exact). Everything else is the layer's own.
NOTEBOOK_API = {
    "figures": (
        "augmentation_curves",
        "figure4_panels",
        "figure_guard",
        "figure_saver",
        "heatmap_panels",
        "overlay_masks",
        "patch_grid",
        "thumbnail_grid",
    ),
    "session": (
        "load_run",
        "pick_example",
        "resolve_data_dir",
        "setup_notebook",
    ),
}
