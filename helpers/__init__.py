"""Shared plumbing for the PAIP 2019 reproduction notebooks.

Layering (imports only point down):

- ``paths``, ``errors``: where things live, and the one error type for bad input.
- ``synthetic``, ``slides``: the built-in demo data and slide/mask I/O (no torch).
- ``patches``, ``splits``, ``augment``: streaming patch extraction, caches, slide-level
  splits, the paper's augmentations.
- ``figures``, ``setup``: plotting utilities and notebook set-up (seeds, versions).
- ``run``: the papermill runner that executes the numbered notebooks in order.
"""

__version__ = "0.1.0"
