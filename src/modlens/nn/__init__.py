"""The torch boundary of modlens, built around one captured graph per model and input shape.

Public names (other packages import these, never a private ``modlens.nn._module``):

* :class:`NetworkAdapter`: captures a model (``torch.export`` at the data's shape, torch.fx as the
  fallback), finds its neuron layers by the operation registry, builds weight-graph blocks and
  reads values by layer name (:meth:`~NetworkAdapter.values`, :meth:`~NetworkAdapter.record`).
* Lesion engines behind one interface (:class:`LesionEngine`): :class:`IncrementalLesions` (the
  fast path) and :class:`PlainLesions` (the oracle, weight surgery on a copy), made by
  :func:`lesion_engine`.
* Inputs at the boundary: :func:`as_tensors`, :func:`as_inputs`, :func:`batches`,
  :func:`check_labels`, :func:`to_model`; :func:`device_dtype` and :func:`eval_mode` for models;
  :func:`prefer_channels_last`, :func:`to_channels_last` and :func:`conv_weights_channels_last` for
  the channels-last layout of conv nets on the CPU.
* Language models (:mod:`modlens.nn.tokens`, :mod:`modlens.nn.token_lesion`): :class:`TokenData`
  and :func:`as_token_data` (next-token data: ids, targets, token classes, position labels), the
  next-token lesion engines :class:`IncrementalTokenLesions` and :class:`PlainTokenLesions` made by
  :func:`token_lesion_engine`.
* :func:`spearman_graph_torch`: the activation graph computed on the model's device.
* The graph options owned here: :data:`ACT_REDUCTIONS` (row 2 of the notes) and :data:`BN_FOLDS`
  (row 3).

The reference architectures live in :mod:`modlens.nn.models`, safe saving and loading of model
folders in :mod:`modlens.nn.io`.

Inside: :mod:`~modlens.nn._capture` (capture), :mod:`~modlens.nn._registry` (one handler per
operation family), :mod:`~modlens.nn._structure` (the walk over the graph),
:mod:`~modlens.nn._conv` (edges of conv and scale layers), :mod:`~modlens.nn._transformer`
(residual-stream parts), :mod:`~modlens.nn._decoder_capture` and :mod:`~modlens.nn._decoder_ops`
(patterns of decoder language models), :mod:`~modlens.nn._plan` and :mod:`~modlens.nn._skip` (the
incremental lesion engine's plan), :mod:`~modlens.nn._spearman`, :mod:`~modlens.nn._gpt` (the
reference decoder).
"""

from modlens.nn._conv import ACT_REDUCTIONS, BN_FOLDS
from modlens.nn._fx import device_dtype, eval_mode
from modlens.nn._layout import conv_weights_channels_last, prefer_channels_last, to_channels_last
from modlens.nn._spearman import spearman_graph_torch
from modlens.nn.adapter import ModelTraceError, NetworkAdapter, NeuronLayer, UnsupportedModelError
from modlens.nn.inputs import as_inputs, as_tensors, batches, check_labels, to_model
from modlens.nn.lesion import (ENGINES, IncrementalLesions, LesionEngine, PlainLesions, correct_counts_plain,
                               lesion_engine)
from modlens.nn.token_lesion import TOKEN_ENGINES, IncrementalTokenLesions, PlainTokenLesions, token_lesion_engine
from modlens.nn.tokens import TokenData, as_token_data

__all__ = ["NetworkAdapter", "NeuronLayer", "UnsupportedModelError", "ModelTraceError", "LesionEngine",
           "IncrementalLesions", "PlainLesions", "ENGINES", "lesion_engine", "correct_counts_plain", "as_inputs",
           "as_tensors", "batches", "check_labels", "to_model", "device_dtype", "eval_mode",
           "conv_weights_channels_last", "prefer_channels_last", "to_channels_last", "spearman_graph_torch",
           "ACT_REDUCTIONS", "BN_FOLDS", "TokenData", "as_token_data", "IncrementalTokenLesions", "PlainTokenLesions",
           "TOKEN_ENGINES", "token_lesion_engine"]
