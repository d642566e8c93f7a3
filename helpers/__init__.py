"""Shared plumbing for the PAIP 2019 reproduction notebooks.

Layering: at module level, a module imports only modules listed before it (the one-call steps
of notebooks 03-05, such as ``train_classifiers``, import later ones inside the function).

- ``paths``, ``errors``, ``progress``: where things live, the one error type for bad input
  (and ``DiskFullError``), progress bars.
- ``atomic``, ``params``, ``provenance``: atomic writes, every notebook parameter checked in one
  place, provenance keys of derived results (content, never absolute paths).
- ``slides``, ``dataset``, ``synthetic``, ``tissue``: slide and mask I/O without holding a level,
  the dataset contract (slides, masks, labels, patients), the built-in demo data and dataset
  zoo, tissue detection (no torch in this group).
- ``parallel``, ``handles``, ``caches``, ``maskcounts``, ``patches``, ``splits``, ``augment``:
  ordered maps over threads or processes that never hang on a dead worker, per-process open
  files, patch caches and their keys, mask count maps, streaming patch extraction, splits by
  patient, the paper's augmentations.
- ``notebook``, ``distributed``, ``metrics``, ``train``, ``jobs``: notebook set-up (seeds,
  versions, the run), DDP on ``torch.distributed``, the paper's losses and metrics, the shared
  training loop (exact resume), training jobs as JSON specs.
- ``models``, ``unetpp``, ``segmentation``, ``inference``, ``classify``, ``voting``: the paper's
  networks (ImageNet weights failing fast offline), UNet++ with deep supervision, the data and
  steps of notebooks 03 and 04, whole-slide prediction stitched at a downscale, majority
  voting (eq. 3-5).
- ``figures``: plotting utilities and the guard that keeps a figure cell from ending a run.
- ``run``: the papermill runner that executes the numbered notebooks in order.
"""

__version__ = "0.1.0"
