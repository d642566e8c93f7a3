"""The paper's steps of notebooks 03-05, on top of the layers below.

In import order: ``segmentation_data`` and ``classification_data`` (patches, batches, device
pipelines, evaluators), ``jobs`` (training jobs as JSON specs, built from those), then
``segmentation`` and ``classification`` (notebooks 03 and 04: plans, training through jobs,
prediction), ``voting`` (notebook 05: majority voting, eq. 3-5) and ``report`` (the paper's
Table 1 and the reproduction report). May import: ``core`` to ``learning``.
"""

#: The names notebooks 01-05 import from this layer, by module: their public face here
#: (``tests/test_layers.py`` keeps it exact). Everything else is the layer's own.
NOTEBOOK_API = {
    "classification": (
        "augmentation_comparison",
        "classification_plan",
        "predict_classifiers",
        "train_classifiers",
    ),
    "classification_data": (
        "class_batches",
        "class_prepare",
    ),
    "report": ("reproduction_report",),
    "segmentation": (
        "segment_with",
        "segmentation_plan",
        "train_segmenter",
    ),
    "segmentation_data": (
        "load_segmentation_patches",
        "segmentation_batches",
        "segmentation_prepare",
    ),
    "voting": (
        "assign_units",
        "choose_threshold",
        "combine_votes",
        "load_predictions",
        "one_class",
        "one_class_note",
        "provenance",
        "region_labels",
        "region_sides",
        "save_voting",
        "segmentation_areas",
        "unit_score",
        "vote_units",
    ),
}
