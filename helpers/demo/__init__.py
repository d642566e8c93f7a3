"""The built-in demo data and the dataset zoo (``synthetic``): PAIP-like slides, masks and labels.

May import: ``core``.
"""
