"""Experiments on one network: each returns a tidy table or a small result object and writes no files.

Public modules (other packages import from these; the ``_``-prefixed ones are internal):

* :mod:`~modlens.experiments.partitioning`: :func:`partition`, :class:`Partitioner`, ``METHODS``;
* :mod:`~modlens.experiments.lesion_test`: the lesion test (importance, class coherence);
* :mod:`~modlens.experiments.feature_vis`: the feature-visualization test;
* :mod:`~modlens.experiments.correlation_maps`: the paper's Figures 1 and 6 maps;
* :mod:`~modlens.experiments.clusterability`: n-cut against shuffled-weight networks;
* :mod:`~modlens.experiments.train` and :mod:`~modlens.experiments.replicates`: the reference
  networks' training recipes, alone or as batched replicates.
"""
