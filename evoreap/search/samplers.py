"""The search's samplers: evoreap's evolution (the default) and Optuna's own samplers over a repaired continuous
encoding, in one registry (:data:`SAMPLERS`: ``evolution``, ``tpe``, ``cmaes``, ``random``).

With an Optuna sampler each trial suggests one weight ``w_l`` in [0, 1] per MoE layer; the allocation is
``lower + w * (upper - lower)`` scaled to the exact expert total and repaired to the bounds and steps. Every candidate
is scored at the top fidelity (these samplers do not race). The first trial is the uniform allocation (all weights
equal).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from evoreap.errors import UsageError
from evoreap.registry import Registry
from evoreap.search.driver import EvolutionSettings, SearchLimits, Scorer, candidate_key
from evoreap.search.space import SearchSpace

log = logging.getLogger(__name__)

EVOLUTION = "evolution"


@dataclass(frozen=True)
class Sampler:
    """A search strategy. ``optuna`` builds the Optuna sampler from a seed; None for evoreap's own evolution."""

    name: str
    description: str
    optuna: Callable[[int], optuna.samplers.BaseSampler] | None = None


SAMPLERS: Registry[Sampler] = Registry("sampler")


def register_sampler(name: str, description: str,
                     factory: Callable[[int], optuna.samplers.BaseSampler] | None = None) -> Sampler:
    """Add a sampler (``factory(seed)`` builds an Optuna sampler); a name already taken raises
    :class:`~evoreap.errors.RegistryError`."""
    return SAMPLERS.add(name, Sampler(name, description, factory))


register_sampler(EVOLUTION, "evoreap's evolutionary search: budget-preserving mutations, racing on growing token "
                            "counts (the default)")
register_sampler("tpe", "Optuna's TPE sampler over a repaired continuous encoding",
                 lambda seed: optuna.samplers.TPESampler(seed=seed))
register_sampler("cmaes", "Optuna's CMA-ES sampler over a repaired continuous encoding",
                 lambda seed: optuna.samplers.CmaEsSampler(seed=seed))
register_sampler("random", "Optuna's random sampler over a repaired continuous encoding",
                 lambda seed: optuna.samplers.RandomSampler(seed=seed))


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler registered as ``name``, seeded; an unknown name (or the evolution, which is not an Optuna
    sampler) raises :class:`~evoreap.errors.UsageError`."""
    sampler = SAMPLERS.get(name)
    if sampler.optuna is None:
        raise UsageError(f"sampler {name!r} is evoreap's own search, not an Optuna sampler; run it with "
                         "evoreap.search.driver.Leader")
    return sampler.optuna(seed)


def decode(space: SearchSpace, weights: list[float]) -> tuple[int, ...]:
    raw = [lo + w * (hi - lo) for w, lo, hi in zip(weights, space.lower, space.upper)]
    scale = space.total / sum(raw) if sum(raw) else 1.0
    return space.repair([int(math.floor(r * scale)) for r in raw])


def optuna_sampler_search(study: optuna.Study, space: SearchSpace, scorer: Scorer, sampler: str,
                          settings: EvolutionSettings, limits: SearchLimits,
                          on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    top = settings.fidelities[-1]
    budget = settings.generations * (settings.offspring // 2 + 1)  # comparable top-fidelity token spend
    study.sampler = make_sampler(sampler, settings.seed)
    names = [f"w{layer}" for layer in space.layers]
    if not study.trials:
        study.enqueue_trial({n: 0.5 for n in names}, user_attrs={"origin": "seed:uniform"})
    scored: dict[tuple[int, ...], float] = {}
    history, spent = [], 0
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        counts = tuple(t.user_attrs["counts"])
        scored[counts] = t.value
    while len([t for t in study.trials if t.state.is_finished()]) < budget:
        if limits.reached(len(history), spent):
            break
        with warnings.catch_warnings():  # we drive trials with ask/tell on purpose; heartbeats still record
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask()
        counts = decode(space, [trial.suggest_float(n, 0.0, 1.0) for n in names])
        trial.set_user_attr("counts", list(counts))
        trial.set_user_attr("key", candidate_key(counts, top))
        trial.set_user_attr("tokens", top)
        trial.set_constraint("budget", float(space.routed_params(counts) - space.budget.params))
        if counts in scored:
            value = scored[counts]
        else:
            value, attrs = scorer(counts, top)
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
            spent += top
        study.tell(trial, value)
        scored[counts] = value
        history.append({"counts": list(counts), "tokens": top, "value": value, "stage": 3,
                        "generation": trial.number, "origin": sampler, "tokens_spent": spent})
        if on_progress and trial.number % max(1, settings.offspring // 2) == 0:
            on_progress({"generation": trial.number, "best": min(scored.values()), "tokens": spent,
                         "trials": len(history)})
    if space.uniform not in scored:
        scored[space.uniform], _ = scorer(space.uniform, top)
    best = min(scored, key=lambda c: (scored[c], c != space.uniform))
    return {"best": best, "best_value": scored[best], "uniform_value": scored[space.uniform],
            "generations": len(history), "stopped_by": "trials", "tokens_spent": spent, "history": history,
            "correlations": [], "scored_top": {"-".join(map(str, c)): v for c, v in scored.items()}}
