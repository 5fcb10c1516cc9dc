"""Run lm-eval-harness tasks on an unpruned, masked or exported model (the optional ``lm_eval`` extra).

The model is handed to lm-eval as an object (``HFLM(pretrained=model)``), so a masked allocation is evaluated under
the same router masks as evoreap's own numbers, and nothing is re-read from a hub. Task names may be lm-eval's own
(their data may need a hub), the bundled ``evoreap_demo*`` tasks, or tasks from ``include`` directories of YAML files
(``dataset_path: json`` with local ``data_files`` needs no hub).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
    num_fewshot: int | None = None  # None: each task's own
    apply_chat_template: bool = False  # render prompts with the tokenizer's (or chat_template's) chat template
    chat_template: str | None = field(default=None, repr=False)  # template text from --chat-template

    @property
    def uses_demo_tasks(self) -> bool:
        """Whether any task is a bundled one (built from the demo's held-out split)."""
        return any(t.startswith(GROUP) for t in self.tasks)


@dataclass(frozen=True)
class HarnessRun:
    """One model's lm-eval run: evoreap's flat metrics per task, and lm-eval's own results document (JSON-ready:
    results, versions, n-shot, task configs), saved next to evoreap's table by ``evaluate --out``."""

    metrics: dict[str, dict[str, float]]
    output: dict[str, Any]


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
    # Indexing lm-eval's thousands of built-in task files takes 10-20 s; the bundled demo tasks alone need none of
    # them (a user's include directory may name built-in tasks in its groups, so it keeps the full index).
    demo_only = not include and all(t.startswith(GROUP) for t in settings.tasks)
    if settings.uses_demo_tasks:
        include.insert(0, str(demo_task_dir(cache_root)))
    manager = TaskManager(include_path=include or None, include_defaults=not demo_only)
    unknown = [t for t in settings.tasks if not manager.match_tasks([t])]
    if unknown:
        raise UsageError(f"unknown lm-eval task {', '.join(unknown)}; list tasks with `lm-eval ls tasks`, or pass "
                         "the directory of your task YAMLs with --lm-eval-include DIR")
    return manager


def check_chat_template(settings: HarnessSettings, tokenizer: Callable[[], Any]) -> None:
    """``apply_chat_template`` needs a template: ``settings.chat_template`` or the tokenizer's own. ``tokenizer``
    is called only then, so that callers can check before any weight is read (a tokenizer loads alone, cheaply)."""
    if settings.apply_chat_template and settings.chat_template is None and \
            not getattr(tokenizer(), "chat_template", None):
        raise UsageError("--apply-chat-template needs a chat template and the model's tokenizer has none; pass "
                         "--chat-template FILE")


def run_harness(model, tokenizer, settings: HarnessSettings, manager) -> dict[str, dict[str, float]]:
    """Metrics per task, e.g. ``{"evoreap_demo_math": {"acc": 0.91, "acc_stderr": 0.01, ...}}``."""
    return harness_run(model, tokenizer, settings, manager).metrics


def harness_run(model, tokenizer, settings: HarnessSettings, manager) -> HarnessRun:
    """Run the tasks on ``model``: evoreap's metrics and lm-eval's own results document."""
    import lm_eval  # lazy: an optional extra (and slow to import)
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable

    check_chat_template(settings, lambda: tokenizer)
    if settings.chat_template is not None:  # a copy: the caller's tokenizer keeps its own template
        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = settings.chat_template
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size, device=str(model.device))
    with _quiet_git():
        out = lm_eval.simple_evaluate(model=lm, tasks=list(settings.tasks), task_manager=manager,
                                      limit=settings.limit, num_fewshot=settings.num_fewshot,
                                      apply_chat_template=settings.apply_chat_template, log_samples=False,
                                      random_seed=settings.seed, numpy_random_seed=settings.seed,
                                      torch_random_seed=settings.seed, fewshot_random_seed=settings.seed)
    output = json.loads(json.dumps(out, default=handle_non_serializable))
    return HarnessRun({task: _metrics(values) for task, values in out["results"].items()}, output)


@contextlib.contextmanager
def _quiet_git() -> Iterator[None]:
    """lm-eval records ``git describe`` of the current directory (the user's, not lm-eval's), and git prints
    "fatal: not a git repository" on stderr outside one. Unless lm-eval's logger shows warnings (``evoreap -v``;
    also when nothing configured logging),
    lm-eval's own fallback (reading a .git directory, silently) stands in for the subprocess. The CLI sets the
    level; this library only reads it."""
    if logging.getLogger("lm_eval").isEnabledFor(logging.WARNING):
        yield
        return
    from lm_eval import evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = lambda: get_commit_from_path(os.getcwd())
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """``"acc,none": 0.9`` -> ``"acc": 0.9``; the alias and "N/A" stderrs go."""
    metrics = {}
    for key, value in values.items():
        name, _, flt = key.partition(",")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            continue
        metrics[name if flt in ("", "none") else f"{name},{flt}"] = float(value)
    return metrics
