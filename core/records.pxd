# cython: language_level=3
"""C-level declarations of records.pyx (none beyond its Python function)."""
