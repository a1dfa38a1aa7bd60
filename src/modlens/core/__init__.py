"""Layer 0: the framework-free core (graphs, spectral clustering, statistics).

Nothing in this package imports torch or matplotlib; everything works on NumPy arrays
and SciPy sparse matrices, and performs no I/O.
"""
