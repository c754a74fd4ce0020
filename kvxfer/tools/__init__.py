"""Command-line tools built on kvxfer (``kvxfer-bench``).

Layer: above the public API; nothing in the library imports from here.
"""
