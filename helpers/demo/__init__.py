"""The built-in demo data and the dataset zoo (``synthetic``): PAIP-like slides, masks and labels.

May import: ``core``.
"""

#: The names notebooks 01-05 import from this layer (none: the notebooks reach it through
#: the layers above; ``tests/test_layers.py`` keeps it exact).
NOTEBOOK_API = {}
