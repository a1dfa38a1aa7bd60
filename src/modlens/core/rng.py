"""Kept for compatibility: the seed helpers live in :mod:`modlens.core.seeds`."""

from modlens.core.seeds import as_generator, int_seed

__all__ = ["as_generator", "int_seed"]
