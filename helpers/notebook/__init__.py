"""Notebook glue: the set-up cells (``session``: seeds, versions, the run) and ``figures``.

May import: every layer below (``core`` to ``paper``).
"""
