"""The lowest layer: plumbing every other layer uses; imports no other helpers layer.

``paths`` (where data and runs live), ``errors`` (the one error type for bad input, and
``DiskFullError``), ``progress`` (progress bars), ``atomic`` (atomic writes), ``provenance``
(content keys of derived results, never absolute paths), ``params`` (every notebook parameter
checked in one place), ``parallel`` (ordered maps over threads or processes that never hang on
a dead worker; the CPUs a process may use under a container's quota), ``seeding`` (seeds and library versions).
"""

#: The names notebooks 01-05 import from this layer, by module: their public face here
#: (``tests/test_layers.py`` keeps it exact). Everything else is the layer's own.
NOTEBOOK_API = {
    "params": ("check_parameters",),
    "paths": ("run_dir",),
}
