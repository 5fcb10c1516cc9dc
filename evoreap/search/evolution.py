"""Budget-preserving variation and seed allocations (pure functions of their inputs and an RNG).

* Level-switch mutation (EvoPress/EvoESAP): move ``delta`` experts from a donor layer to a recipient layer; the total
  never changes, so every child is feasible by construction.
* Saliency-guided moves: with probability ``guided`` the donor is drawn in proportion to how little saliency mass
  its last kept experts carry, the recipient in proportion to the mass of its best cut experts.
* Seeds: the uniform allocation, shape patterns (EvoESAP-style ramps and bumps), and an analytic allocation that
  greedily keeps the largest share of per-layer saliency mass.
"""

from __future__ import annotations

import math
import random

import torch

from evoreap.search.space import SearchSpace

Alloc = tuple[int, ...]


def layer_mass_curves(space: SearchSpace, mass: dict[int, torch.Tensor]) -> list[list[float]]:
    """Per layer, the cumulative share of saliency mass kept when keeping the best 0..E experts."""
    curves = []
    for layer in space.layers:
        m = mass[layer].double().clamp(min=0).sort(descending=True).values
        total = float(m.sum()) or 1.0
        curves.append([0.0] + (m.cumsum(0) / total).tolist())
    return curves


def marginal_gain(curve: list[float], k: int, step: int) -> float:
    """Mass share gained by keeping ``step`` more experts than ``k``."""
    return curve[min(k + step, len(curve) - 1)] - curve[k]


def marginal_loss(curve: list[float], k: int, step: int) -> float:
    return curve[k] - curve[max(k - step, 0)]


def analytic_seed(space: SearchSpace, curves: list[list[float]]) -> Alloc:
    """Start from the floors and hand out steps to the layer whose next step keeps the most mass share."""
    c = list(space.lower)
    if not space.equal_sizes:  # gain per parameter decides, while the step still fits the budget
        while True:
            room = space.budget.params - space.routed_params(tuple(c))
            options = [(marginal_gain(curves[i], c[i], space.step) / space.params_per_expert[i], -i)
                       for i in range(len(c)) if c[i] + space.step <= space.upper[i]
                       and space.step * space.params_per_expert[i] <= room]
            if not options:
                return tuple(c)
            c[-max(options)[1]] += space.step
    left = space.total - sum(c)
    while left > 0:
        best = max((marginal_gain(curves[i], c[i], space.step), -i) for i in range(len(c))
                   if c[i] + space.step <= space.upper[i])
        c[-best[1]] += space.step
        left -= space.step
    return tuple(c)


def pattern_seeds(space: SearchSpace) -> dict[str, Alloc]:
    """Shape patterns over depth x in [0, 1], scaled to the budget and repaired to the bounds."""
    n = len(space.layers)
    xs = [i / max(n - 1, 1) for i in range(n)]
    shapes = {
        "ramp_down": [1.5 - x for x in xs],
        "ramp_up": [0.5 + x for x in xs],
        "middle_heavy": [1.0 + 0.6 * math.sin(math.pi * x) for x in xs],
        "ends_heavy": [1.6 - 0.6 * math.sin(math.pi * x) for x in xs],
        "front_heavy": [1.5 if x < 0.25 else 0.9 for x in xs],
        "back_heavy": [1.5 if x > 0.75 else 0.9 for x in xs],
    }
    out = {}
    for name, w in shapes.items():
        scale = space.total / sum(w)
        cand = space.repair([round(v * scale) for v in w])
        if cand != space.uniform and cand not in out.values():
            out[name] = cand
    return out


def mutate(parent: Alloc, space: SearchSpace, rng: random.Random, curves: list[list[float]] | None = None,
           guided: float = 0.5, max_delta: int | None = None) -> Alloc:
    """A child of ``parent`` by 1-3 level switches (fewer moves are likelier, as in EvoPress)."""
    step = space.step
    max_delta = max(step, max_delta or max(step, (max(space.upper) // 8) // step * step))
    c = list(parent)
    moves = min(rng.randint(1, 3), rng.randint(1, 3))
    n = len(c)
    grown: set[int] = set()
    for _ in range(moves):
        delta = step * rng.randint(1, max_delta // step)
        donors = [i for i in range(n) if c[i] - delta >= space.lower[i]]
        takers = [i for i in range(n) if c[i] + delta <= space.upper[i]]
        if not donors or not takers or (len(donors) == 1 and donors == takers):
            continue
        if curves is not None and rng.random() < guided:
            # weak marginal experts give, strong cut experts take
            a = rng.choices(donors, [1.0 / (marginal_loss(curves[i], c[i], delta) + 1e-4) for i in donors])[0]
            rest = [i for i in takers if i != a]
            if not rest:
                continue
            b = rng.choices(rest, [marginal_gain(curves[i], c[i], delta) + 1e-4 for i in rest])[0]
        else:
            a = rng.choice(donors)
            rest = [i for i in takers if i != a]
            if not rest:
                continue
            b = rng.choice(rest)
        c[a] -= delta
        c[b] += delta
        grown.add(b)
    # unequal expert sizes: a switch can break or under-use the parameter budget; fit it again
    return tuple(c) if space.equal_sizes else space.fit(c, rng, frozenset(grown))


def offspring(parents: list[Alloc], space: SearchSpace, rng: random.Random, count: int, seen: set[Alloc],
              curves: list[list[float]] | None, guided: float) -> list[Alloc]:
    """``count`` distinct children not in ``seen`` (fewer if the neighbourhood is exhausted)."""
    out: list[Alloc] = []
    tries = 0
    while len(out) < count and tries < 50 * count:
        tries += 1
        child = mutate(rng.choice(parents), space, rng, curves, guided)
        if child not in seen and child not in out and space.is_feasible(child):
            out.append(child)
    return out
