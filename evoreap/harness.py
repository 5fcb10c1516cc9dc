"""Run lm-eval-harness tasks on an unpruned, masked or exported model (the optional ``lm_eval`` extra).

The model is handed to lm-eval as an object (``HFLM(pretrained=model)``), so a masked allocation is evaluated under
the same router masks as evoreap's own numbers, and nothing is re-read from a hub. Task names may be lm-eval's own
(their data may need a hub), the bundled ``evoreap_demo*`` tasks, or tasks from ``include`` directories of YAML files
(``dataset_path: json`` with local ``data_files`` needs no hub).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evoreap.demo.harness_tasks import GROUP, demo_task_dir
from evoreap.errors import UsageError


INSTALL_HINT = 'pip install "evoreap[lm_eval]" (or: pip install lm-eval)'


@dataclass(frozen=True)
class HarnessSettings:
    tasks: tuple[str, ...]
    include: tuple[str, ...] = ()
    limit: int | None = None
    batch_size: int = 8
    seed: int = 0

    @property
    def uses_demo_tasks(self) -> bool:
        """Whether any task is a bundled one (built from the demo's held-out split)."""
        return any(t.startswith(GROUP) for t in self.tasks)


def parse_tasks(spec: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in spec.split(",") if t.strip())
    if not tasks:
        raise UsageError(f"--lm-eval {spec!r} names no task; pass comma-separated task names, e.g. evoreap_demo")
    return tasks


def task_manager(settings: HarnessSettings, cache_root: Path):
    """lm-eval's TaskManager with the demo tasks and the user's include directories; unknown names fail here, before
    any model work."""
    try:
        from lm_eval.tasks import TaskManager  # lazy: lm_eval is an optional extra (and slow to import)
    except ImportError:
        raise UsageError(f"--lm-eval needs the lm-eval package: {INSTALL_HINT}") from None

    include = []
    for d in settings.include:
        if not Path(d).is_dir():
            raise UsageError(f"--lm-eval-include {d} is not a directory; pass a directory of lm-eval task YAML files")
        include.append(str(Path(d).resolve()))
    if settings.uses_demo_tasks:
        include.insert(0, str(demo_task_dir(cache_root)))
    manager = TaskManager(include_path=include or None)
    unknown = [t for t in settings.tasks if not manager.match_tasks([t])]
    if unknown:
        raise UsageError(f"unknown lm-eval task {', '.join(unknown)}; list tasks with `lm-eval ls tasks`, or pass "
                         "the directory of your task YAMLs with --lm-eval-include DIR")
    return manager


def run_harness(model, tokenizer, settings: HarnessSettings, manager) -> dict[str, dict[str, float]]:
    """Metrics per task, e.g. ``{"evoreap_demo_math": {"acc": 0.91, "acc_stderr": 0.01, ...}}``."""
    import lm_eval  # lazy: an optional extra (and slow to import)
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size, device=str(model.device))
    out = lm_eval.simple_evaluate(model=lm, tasks=list(settings.tasks), task_manager=manager, limit=settings.limit,
                                  log_samples=False, random_seed=settings.seed, numpy_random_seed=settings.seed,
                                  torch_random_seed=settings.seed, fewshot_random_seed=settings.seed)
    return {task: _metrics(values) for task, values in out["results"].items()}


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """``"acc,none": 0.9`` -> ``"acc": 0.9``; the alias and "N/A" stderrs go."""
    metrics = {}
    for key, value in values.items():
        name, _, flt = key.partition(",")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            continue
        metrics[name if flt in ("", "none") else f"{name},{flt}"] = float(value)
    return metrics
