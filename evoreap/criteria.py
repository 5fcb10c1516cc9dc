"""Saliency criteria: map one layer's observed statistics to one score per expert (higher = keep).

A criterion is a function ``fn(stats: LayerStats, min_count: int) -> Tensor[E]``, registered under a name::

    from evoreap.criteria import register_criterion

    @register_criterion("gate_x_count", "mean gate weight times routed count")
    def gate_x_count(stats, min_count):
        return stats.gate_sum

A criterion may also accept a keyword ``seed`` (e.g. a random baseline). Packages can ship criteria through the
Python entry-point group ``evoreap.criteria``: each entry point names such a function (registered under the entry
point's name, described by its docstring's first line) or a module that registers its criteria on import. A name
is registered once: a second registration raises :class:`~evoreap.errors.RegistryError`, and a plugin whose name
is taken (by a built-in or another plugin) is skipped with a warning.

Two rules hold for every criterion, enforced by :func:`score_experts`:

* experts never routed (count 0) rank last, below every routed expert;
* the scores are float64 and finite.

``min_count`` (default :data:`DEFAULT_MIN_COUNT`) is the fewest routed tokens for which a per-token *mean* (``reap``,
``ean``) is trusted. An expert routed fewer times is "untrusted": it ranks below every trusted expert (ordered by its
mean among the untrusted), because a mean over a handful of tokens is mostly noise and rare experts with one loud
output otherwise score highest (measured on tiny models, design/testbed.md §4.5). ``min_count=0`` disables it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

import torch

from evoreap.errors import RegistryError, UsageError
from evoreap.observe.stats import ExpertStats, LayerStats
from evoreap.registry import Registry

log = logging.getLogger(__name__)

DEFAULT_MIN_COUNT = 10
# The one default criterion of observe, search, export and evaluate: it ranked best on the demo (README).
DEFAULT_CRITERION = "reap_x_frequency"
ENTRY_POINT_GROUP = "evoreap.criteria"

CriterionFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Criterion:
    name: str
    description: str
    fn: CriterionFn
    takes_seed: bool
    unit: str = ""  # what one score measures, for people reading ``observe --show``


CRITERIA: Registry[Criterion] = Registry("criterion", hint="evoreap observe --list-criteria describes them",
                                        cutoff=0.5)
_REGISTRY = CRITERIA  # the name tests and older code use
_entry_points_loaded = False


def register_criterion(name: str, description: str, unit: str = "") -> Callable[[CriterionFn], CriterionFn]:
    """Decorator: register ``fn(stats: LayerStats, min_count: int[, seed: int]) -> Tensor[E]`` (higher = keep);
    ``unit`` says what one score measures (shown by ``observe --show``). A name that is taken or not a word raises
    :class:`~evoreap.errors.RegistryError`."""
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise RegistryError(f"criterion name {name!r} must be a non-empty word (letters, digits, _ or -)")

    def deco(fn: CriterionFn) -> CriterionFn:
        takes_seed = "seed" in inspect.signature(fn).parameters
        CRITERIA.add(name, Criterion(name, description, fn, takes_seed, unit))
        return fn

    return deco


def _load_entry_points() -> None:
    """Register the criteria of the ``evoreap.criteria`` entry points, once. A plugin that cannot be loaded, or
    whose name is taken, is skipped with a warning: a plugin never breaks evoreap nor replaces a criterion."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()  # a module that registers its criteria on import may collide here
        except RegistryError as e:
            log.warning("criterion plugin %s (%s) skipped: %s", ep.name, ep.value, e)
            continue
        except Exception as e:  # a broken plugin must not break evoreap
            log.warning("cannot load criterion plugin %s (%s): %s", ep.name, ep.value, e)
            continue
        if not callable(obj):
            continue  # a module: it registered its criteria on import
        taken = CRITERIA.find(ep.name)
        if taken is not None:
            if taken.fn is not obj:  # (its own module may have registered it under this name already)
                log.warning("criterion plugin %s (%s) skipped: the name %r is taken by %s", ep.name, ep.value,
                            ep.name, getattr(taken.fn, "__module__", "?"))
            continue
        doc = (inspect.getdoc(obj) or f"from {ep.value}").splitlines()[0]
        register_criterion(ep.name, doc)(obj)


def list_criteria() -> list[tuple[str, str]]:
    """``(name, description)`` of every registered criterion, built-ins first."""
    _load_entry_points()
    return [(c.name, c.description) for c in CRITERIA.values()]


def get_criterion(name: str) -> Criterion:
    _load_entry_points()
    return CRITERIA.get(name)


def _trusted_mean(total: torch.Tensor, count: torch.Tensor, min_count: int) -> torch.Tensor:
    """``total / count``, with experts routed fewer than ``min_count`` times moved below every trusted one."""
    mean = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
    if min_count <= 0:  # trust every mean; never-routed experts (mean 0) still rank last (_finalise)
        return mean
    untrusted = count < min_count
    if untrusted.any() and not untrusted.all():
        # shift the untrusted block rigidly below the lowest trusted mean (keeps their order among themselves)
        span = mean.max() - mean.min() + 1.0
        mean = torch.where(untrusted, mean - span, mean)
    return mean


@register_criterion("reap", "REAP: mean of gate * ||expert output|| over routed tokens (count < min_count: last)",
                    "gate weight x L2 norm of the expert output, mean over the tokens routed to the expert")
def reap(stats: LayerStats, min_count: int) -> torch.Tensor:
    return _trusted_mean(stats.gate_norm_sum, stats.count, min_count)


@register_criterion("frequency", "routed-token count (hard frequency)", "tokens routed to the expert")
def frequency(stats: LayerStats, min_count: int) -> torch.Tensor:
    return stats.count.clone()


@register_criterion("gate_mass", "router probability mass over all tokens (soft frequency)",
                    "router probability summed over all tokens (tokens)")
def gate_mass(stats: LayerStats, min_count: int) -> torch.Tensor:
    return stats.prob_mass.clone()


@register_criterion("ean", "EAN: mean ||expert output|| over routed tokens (count < min_count: last)",
                    "L2 norm of the expert output, mean over the tokens routed to the expert")
def ean(stats: LayerStats, min_count: int) -> torch.Tensor:
    return _trusted_mean(stats.norm_sum, stats.count, min_count)


@register_criterion("reap_x_frequency", "REAP times frequency: sum of gate * ||expert output|| over routed tokens",
                    "gate weight x L2 norm of the expert output, summed over the tokens routed to the expert")
def reap_x_frequency(stats: LayerStats, min_count: int) -> torch.Tensor:
    return stats.gate_norm_sum.clone()


@register_criterion("max_activation", "largest ||expert output|| over routed tokens",
                    "largest L2 norm of the expert output over its routed tokens")
def max_activation(stats: LayerStats, min_count: int) -> torch.Tensor:
    return stats.max_norm.clone()


@register_criterion("random", "seeded random baseline (never-routed experts still last)",
                    "uniform random number in [0, 1), no unit")
def random_scores(stats: LayerStats, min_count: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + stats.index)
    return torch.rand(stats.num_experts, generator=g, dtype=torch.float64)


def _finalise(name: str, raw: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    scores = torch.as_tensor(raw).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if scores.numel() != stats.num_experts:
        raise UsageError(f"criterion {name!r} returned {scores.numel()} scores for layer {stats.index}, which has "
                         f"{stats.num_experts} experts")
    if not torch.isfinite(scores).all():
        raise UsageError(f"criterion {name!r} returned non-finite scores for layer {stats.index}")
    dead = stats.count.cpu() == 0
    if dead.any():
        floor = scores[~dead].min() if (~dead).any() else scores.new_tensor(0.0)
        scores = scores.clone()
        scores[dead] = floor - 1.0 - scores.max().abs()  # below every routed expert, ties broken by index
    return scores


def criterion_values(stats: ExpertStats, criterion: str, *, seed: int = 0) -> dict[int, torch.Tensor]:
    """``{decoder layer index: float64 values [E]}``: what the criterion measures, in its own unit, before ranking
    moves anything. :func:`score_experts` shifts experts below ``min_count`` (and never-routed ones) under every
    trusted expert, so its scores may be negative and order experts rather than measure them; these are the
    measurements (the criterion with ``min_count=0``; a per-token mean of a never-routed expert is 0)."""
    c = get_criterion(criterion)
    out = {}
    for i in stats.layers:
        view = stats.layer(i)
        raw = c.fn(view, 0, seed=seed) if c.takes_seed else c.fn(view, 0)
        out[i] = torch.as_tensor(raw).detach().to(device="cpu", dtype=torch.float64).reshape(-1).clone()
    return out


def score_experts(stats: ExpertStats, criterion: str, *, min_count: int = DEFAULT_MIN_COUNT, seed: int = 0
                  ) -> dict[int, torch.Tensor]:
    """``{decoder layer index: float64 scores [E]}`` (higher = keep) for every observed layer."""
    if min_count < 0:
        raise UsageError(f"--min-count must be >= 0, got {min_count}")
    c = get_criterion(criterion)
    out = {}
    for i in stats.layers:
        view = stats.layer(i)
        raw = c.fn(view, min_count, seed=seed) if c.takes_seed else c.fn(view, min_count)
        out[i] = _finalise(c.name, raw, view)
    return out
