"""Studies: many networks trained or loaded, analysed and reported as one resumable run.

* :mod:`~modlens.study.spec` (TOML specs, checked at load) and :mod:`~modlens.study.builtin` (the
  paper's studies);
* :mod:`~modlens.study.runner`: the task graph train -> partition -> lesion / visualization ->
  statistics, and the study's outputs; :mod:`~modlens.study.tasks` (the cache: keys, atomic task
  folders) and :mod:`~modlens.study.task_kinds` (what each kind of task computes, a table of
  functions); :mod:`~modlens.study.executors` (inline, process pool, Ray) and
  :mod:`~modlens.study.progress`;
* :mod:`~modlens.study.commands`: the runs behind ``modlens train``, ``analyze``, ``demo`` and
  ``correlation-maps``.
"""
