"""Shared plumbing for the PAIP 2019 reproduction notebooks.

Layers, lowest first; a module imports modules of its own layer and of the layers below it,
never one above, and no import circles (``tests/test_layers.py`` checks every import, inside
functions too):

1. ``core``: paths, errors, progress bars, atomic writes, parameters, provenance keys, parallel
   maps, seeding.
2. ``demo``: the built-in demo data and the dataset zoo.
3. ``wsi``: slides, masks, dataset folders, tissue detection.
4. ``patching``: the patch grid and caches, extraction, splits, augmentation.
5. ``learning``: metrics, networks, DDP, the training loop, whole-slide inference.
6. ``paper``: the steps of notebooks 03-05 (segmentation, classification, training jobs,
   voting, the report).
7. ``notebook``: the notebooks' set-up cells and figures.
8. ``run``: the papermill runner (``python -m helpers.run``) that executes the notebooks in order.
"""

__version__ = "0.1.0"
