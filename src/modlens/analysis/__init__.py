"""One network's analysis: what one call of :func:`analyze` does.

* :func:`analyze` (:mod:`~modlens.analysis.analyze`) is composed of the stages in
  :mod:`~modlens.analysis.stages` (capture, partition, lesion test, feature visualization,
  statistics), each reading only the fields of the validated :class:`AnalysisConfig`
  (:mod:`~modlens.analysis.config`) it needs; a study runs the same stages as cached tasks.
* :class:`AnalysisResult` and its folder format (:mod:`~modlens.analysis.result`, :func:`load_result`),
  its notebook display and the cells of the paper's tables (:mod:`~modlens.analysis.display`);
  :func:`combine` pools replicate networks.
* The statistics pipeline (:mod:`~modlens.analysis.statistics`: percentiles, Fisher, Bates,
  Benjamini-Hochberg per family, effects), :mod:`~modlens.analysis.diagnostics` (degenerate
  metrics), the printed table (:mod:`~modlens.analysis.text`) and the figures a result saves
  (:mod:`~modlens.analysis.figures`).
* :mod:`~modlens.analysis.storage`: canonical JSON and atomic file and folder writes, used by
  every layer above the torch boundary.
"""

from modlens.analysis.analyze import analyze, combine
from modlens.analysis.config import AnalysisConfig
from modlens.analysis.result import AnalysisResult, load_result, save_result

__all__ = ["analyze", "combine", "AnalysisConfig", "AnalysisResult", "save_result", "load_result"]
