"""Diagnostics: what the engine reports about itself; nothing here changes a result.

- ``watchdog.py`` and ``hang_report.py``: every collective under a deadline, and the report that
  names the stalled rank when one passes.
- ``accounting.py``: bytes held per kind (params, grads, masters, optimizer state, host, NVMe).
- ``labels.py``: the ``hf_zero::...`` profiler labels of each phase of a step.
"""
