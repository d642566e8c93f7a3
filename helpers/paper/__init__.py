"""The paper's steps of notebooks 03-05, on top of the layers below.

In import order: ``segmentation_data`` and ``classification_data`` (patches, batches, device
pipelines, evaluators), ``jobs`` (training jobs as JSON specs, built from those), then
``segmentation`` and ``classification`` (notebooks 03 and 04: plans, training through jobs,
prediction), ``voting`` (notebook 05: majority voting, eq. 3-5) and ``report`` (the paper's
Table 1 and the reproduction report). May import: ``core`` to ``learning``.
"""
