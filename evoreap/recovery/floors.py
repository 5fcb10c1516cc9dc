"""Per-domain floors for the search: ``tools:esap=0.95,code:kl=0.2`` says that the ``tools`` domain must keep an
ESAP of at least 0.95 and ``code`` a KL of at most 0.2 (the bound's direction is the proxy's: at least for a proxy
where higher is better, at most otherwise).

A candidate's violation of a floor is ``bound - value`` (at-least floors) or ``value - bound`` (at-most floors):
``<= 0`` is feasible, as Optuna's constraints read it. Infeasible candidates lose to every feasible one
(:func:`penalized`), and among themselves the one closest to its floors wins.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from evoreap.errors import UsageError
from evoreap.proxies import get_proxy
from evoreap.recovery.reinject import saliency
from evoreap.search.evolution import analytic_seed, layer_mass_curves

log = logging.getLogger(__name__)

PENALTY = 1e6  # added to an infeasible candidate's value: larger than any proxy value


@dataclass(frozen=True)
class Floor:
    """One per-domain bound on one proxy."""

    domain: str
    proxy: str
    bound: float
    at_least: bool

    @property
    def name(self) -> str:
        return f"floor:{self.domain}:{self.proxy}"

    def describe(self) -> str:
        return f"{self.domain} {self.proxy} {'>=' if self.at_least else '<='} {self.bound:g}"

    def violation(self, per_domain: dict[str, dict[str, float]]) -> float:
        values = per_domain.get(self.domain)
        if values is None or self.proxy not in values:
            raise UsageError(f"floor {self.describe()}: the scored data has no {self.domain!r} tokens; name a domain "
                             "of the search data")
        v = float(values[self.proxy])
        return (self.bound - v) if self.at_least else (v - self.bound)


def parse_floors(text: str | None) -> tuple[Floor, ...]:
    """``DOMAIN:PROXY=BOUND`` items, comma-separated; the proxy must be registered."""
    if not text:
        return ()
    out = []
    for item in (p.strip() for p in str(text).split(",")):
        head, eq, value = item.partition("=")
        domain, colon, proxy = head.partition(":")
        try:
            bound = float(value)
        except ValueError:
            bound = math.nan
        if not (eq and colon and domain.strip() and proxy.strip()) or not math.isfinite(bound):
            raise UsageError(f"--floor item {item!r} is not DOMAIN:PROXY=BOUND (e.g. tools:esap=0.95,code:kl=0.2)")
        spec = get_proxy(proxy.strip())  # an unknown proxy is refused with a suggestion
        out.append(Floor(domain.strip(), spec.name, bound, spec.higher_is_better))
    names = [f.name for f in out]
    if len(set(names)) != len(names):
        raise UsageError(f"--floor names the same domain and proxy twice: {text}")
    return tuple(out)


def constraints(floors: tuple[Floor, ...], per_domain: dict[str, dict[str, float]]) -> dict[str, float]:
    """Floor name -> violation (<= 0 feasible), Optuna's constraint values."""
    return {f.name: f.violation(per_domain) for f in floors}


def penalized(value: float, violations: dict[str, float]) -> float:
    """``value`` when every floor holds, else :data:`PENALTY` plus the total violation (so infeasible candidates
    rank after every feasible one, closest to feasible first)."""
    excess = sum(max(0.0, v) for v in violations.values())
    return value if excess <= 0 else PENALTY + excess


def floor_proxies(floors: tuple[Floor, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(f.proxy for f in floors))


def domain_seeds(space: Any, stats: Any, floors: tuple[Floor, ...]) -> dict[str, tuple[int, ...]]:
    """One seed allocation per floored domain: the analytic (saliency-mass) allocation computed from that domain's
    own saliency, so that the search starts from allocations that favour what the floors protect."""
    out = {}
    for domain in dict.fromkeys(f.domain for f in floors):
        mass: dict[int, torch.Tensor] = saliency(stats, domain)
        out[f"floor:{domain}"] = analytic_seed(space, layer_mass_curves(space, mass))
    return out


def ranked_curves(space: Any, mass: dict[int, torch.Tensor], scores: dict[int, torch.Tensor]) -> list[list[float]]:
    """Per layer, the share of ``mass`` (a domain's saliency, over all layers) kept by the top 0..E experts in
    ``scores``' order, the experts a keep count actually keeps (stable descending sort, as
    :func:`evoreap.allocation.kept_experts`). Shares of the whole, not of each layer: moving a step between layers
    trades one layer's saliency against another's."""
    total = float(sum(mass[layer].double().clamp(min=0).sum() for layer in space.layers)) or 1.0
    curves = []
    for layer in space.layers:
        m = mass[layer].double().clamp(min=0)
        order = torch.sort(-scores[layer].double(), stable=True).indices
        curves.append([0.0] + (m[order].cumsum(0) / total).tolist())
    return curves


@dataclass(frozen=True)
class FloorRepair:
    """A seed moved towards its floors: the counts, their violations (floor name -> <= 0 feasible), the moves made
    (``(from layer position, to layer position)``) and the evaluations spent."""

    counts: tuple[int, ...]
    violations: dict[str, float]
    moves: tuple[tuple[int, int], ...]
    evaluations: int

    @property
    def excess(self) -> float:
        return sum(max(0.0, v) for v in self.violations.values())


def repair_for_floors(space: Any, counts: tuple[int, ...], curves: list[list[float]],
                      violations: Callable[[tuple[int, ...]], dict[str, float]], *, start: dict[str, float] | None
                      = None, tries: int = 4, max_evaluations: int = 32) -> FloorRepair:
    """Move keep-count steps between layers until the floors hold or no move helps.

    ``curves`` rank the moves: per layer, the floored domain's saliency share kept at each count
    (:func:`ranked_curves`). A move takes one step from the layer whose last step carries the least of that share
    and gives it to the layer whose next step carries the most, so the budget stays what it was. The ``tries``
    best-ranked feasible moves are measured (``violations``, at the seed's fidelity) in order, and the first that
    lowers the total violation is kept; when none does, or ``max_evaluations`` are spent, the repair stops. The
    saliency only ranks: every kept move was measured to help."""
    c = tuple(counts)
    current = dict(start) if start is not None else violations(c)
    spent = 0 if start is not None else 1
    moves: list[tuple[int, int]] = []

    def excess(v: dict[str, float]) -> float:
        return sum(max(0.0, x) for x in v.values())

    seen = {c}
    while excess(current) > 0 and spent < max_evaluations:
        ranked = []
        for d in range(len(c)):
            for r in range(len(c)):
                if d == r:
                    continue
                n = list(c)
                n[d] -= space.step
                n[r] += space.step
                cand = tuple(n)
                if cand in seen or not space.is_feasible(cand):
                    continue
                loss = curves[d][c[d]] - curves[d][c[d] - space.step]
                gain = curves[r][min(c[r] + space.step, len(curves[r]) - 1)] - curves[r][c[r]]
                ranked.append((gain - loss, -d, -r, cand))
        ranked.sort(reverse=True)
        improved = False
        for _, nd, nr, cand in ranked[:tries]:
            if spent >= max_evaluations:
                break
            seen.add(cand)
            v = violations(cand)
            spent += 1
            if excess(v) < excess(current) - 1e-12:
                c, current, improved = cand, v, True
                moves.append((-nd, -nr))
                break
        if not improved:
            break
    return FloorRepair(c, current, tuple(moves), spent)
