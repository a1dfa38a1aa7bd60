"""modlens: is this trained network modular, and which groups of its neurons are the modules?

Public entry points (imported lazily, so that ``modlens.core`` stays free of torch):

* :func:`partition` - spectral partitions of an MLP's hidden neurons.
* :func:`analyze` - lesion tests of partitions against random controls, with statistics.
* :class:`Partition` - integer cluster labels per hidden layer.
"""

from modlens._version import __version__

__all__ = ["partition", "analyze", "combine", "Partition", "__version__"]


def __getattr__(name):
    if name == "partition":
        from modlens.experiments.partitioning import partition

        return partition
    if name in ("analyze", "combine"):
        from modlens.study import analyze as _analyze

        return getattr(_analyze, name)
    if name == "Partition":
        from modlens.core.partition import Partition

        return Partition
    raise AttributeError(f"module 'modlens' has no attribute {name!r}")
