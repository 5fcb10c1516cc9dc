"""Streaming export of pruned checkpoints (see :func:`export_pruned`).

Uniform allocations give a stock checkpoint with a smaller expert count; non-uniform ones give a folder whose config
carries the per-layer counts and whose bundled ``modeling_evoreap.py`` (evoreap's own template) builds each layer at
its size, loaded with ``trust_remote_code=True``. Reading the source checkpoint (headers, byte ranges, names) is
:mod:`evoreap.checkpoint`'s.
"""

from evoreap.export.core import ExportResult, export_pruned, plan_export, render_modeling
from evoreap.export.plan import ExportPlan, TensorPlan, build_plan, check_kept

__all__ = ["ExportPlan", "ExportResult", "TensorPlan", "build_plan", "check_kept", "export_pruned", "plan_export",
           "render_modeling"]
