"""The paper's tables and figures, and the self-contained HTML report, from saved results.

* :func:`write_report`: ``report.html`` for a study folder (with its tables and figures) or for
  one saved analysis result (:mod:`~modlens.report.outputs`).
* :mod:`~modlens.report.paper`: Benjamini-Hochberg per table family, bold effects, and the
  paper's own reported values (packaged in ``_paper/``) beside measured ones.
* :mod:`~modlens.report.tables` (Tables 1-5), :mod:`~modlens.report.plots` (Figures 3, 5, 7),
  :mod:`~modlens.report.correlation` (Figures 1 and 6), :mod:`~modlens.report.html` (the page).

The report reads files (a study folder's ``study.json`` and ``study_rows``, saved results); it
never runs an analysis.
"""

from modlens.report.outputs import write_report, write_result_report, write_study_outputs

__all__ = ["write_report", "write_result_report", "write_study_outputs"]
