"""Reading whole-slide images, their masks and dataset folders (no torch in this layer).

``slides`` (slide and mask I/O without holding a level), ``handles`` (per-process open files),
``dataset`` (the dataset contract: slides, masks, labels, patients), ``tissue`` (tissue
detection). May import: ``core``, ``demo``.
"""
