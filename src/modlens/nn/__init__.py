"""The torch boundary of modlens, built around one captured graph per model and input shape.

* :mod:`~modlens.nn._capture`: ``torch.export`` (non-strict, at the data's shape) with torch.fx as
  the fallback; weight layers and normalizations become modules named by the user's module paths.
* :mod:`~modlens.nn._registry`: one handler per operation family (what it does to a layer's
  channels, to weight edges, to lesions); :mod:`~modlens.nn._structure` walks the graph with it.
* :mod:`~modlens.nn.adapter`: layers, weight graph (:mod:`~modlens.nn._conv`), activation
  summaries and pre-activation modules, all from the one captured graph; device and dtype once.
* :mod:`~modlens.nn._plan`, :mod:`~modlens.nn.lesion`, :mod:`~modlens.nn._skip`: the incremental
  lesion engine and its oracle (a deep copy with weight surgery, independent of the plan).
"""
