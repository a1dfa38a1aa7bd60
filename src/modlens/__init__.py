"""modlens: is this trained network modular, and which groups of its neurons are the modules?

Public entry points (imported on first use, so that ``import modlens.core`` stays free of torch):

* :func:`partition` - spectral partitions of any network's neurons (MLP units, conv channels,
  transformer MLP units), from its weights or its activations.
* :func:`analyze` - lesion (and feature-visualization) tests of partitions against random
  controls, with statistics; :func:`combine` pools replicate networks.
* :class:`AnalysisConfig` - every option of an analysis, validated; :class:`AnalysisResult` - what
  ``analyze`` returns.
* :class:`Partition` - integer cluster labels per analysed layer.
* :func:`load_model` - any model by name (``pkg.module:factory``, ``timm:NAME``, ``torchvision:NAME``,
  ``hf:REPO_OR_FOLDER``, a modlens model folder) with its weights, and the record of where it came from.
* :func:`load_result` - a saved result read back (it displays itself in a notebook, as results do);
  :func:`open_study` - a study folder, with its tables and figures.

The packages, lowest layer first: ``core`` (numpy/scipy), ``nn`` and ``data`` (the torch
boundary), ``experiments``, ``analysis``, ``report``, ``study``, ``cli``.
"""

from modlens._version import __version__

__all__ = ["partition", "analyze", "combine", "AnalysisConfig", "AnalysisResult", "Partition", "load_model",
           "load_result", "open_study", "__version__"]


def __getattr__(name):
    if name == "partition":
        from modlens.experiments.partitioning import partition

        return partition
    if name == "load_model":
        from modlens.nn.sources import load_model

        return load_model
    if name in ("analyze", "combine", "AnalysisConfig", "AnalysisResult", "load_result"):
        import modlens.analysis

        return getattr(modlens.analysis, name)
    if name == "open_study":
        from modlens.study.results import open_study

        return open_study
    if name == "Partition":
        from modlens.core.partition import Partition

        return Partition
    raise AttributeError(f"module 'modlens' has no attribute {name!r}")
