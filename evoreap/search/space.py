"""The search space: per-layer bounds, step, budget, and the feasibility checks that run before any work.

A search-space file (``search_spaces/*.yaml``) holds these keys, all optional::

    min_keep_fraction: 0.125   # each layer keeps at least this fraction of its experts ...
    min_keep: null             # ... and at least this many (never fewer than top-k; default top-k)
    max_keep: null             # at most this many (default: all experts)
    step: 1                    # keep counts are multiples of this (4 or 8 for expert-parallel serving)
    max_deviation: null        # |k_l - uniform| <= this fraction of the uniform count (null: unbounded)

Group-limited routers (``n_group`` > 1) add their own divisibility: ``step`` is raised to a multiple of ``n_group``.
"""

from __future__ import annotations

import importlib.resources
import math
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from evoreap.adapters import MoEAdapter
from evoreap.errors import UsageError


def _shipped_spaces_dir() -> Path:
    """The shipped search spaces: ``evoreap/search_spaces/`` in an installed wheel (setup.py maps the repository's
    ``search_spaces/`` there), else the repository's own ``search_spaces/`` (source checkout, editable install)."""
    try:
        installed = Path(str(importlib.resources.files("evoreap") / "search_spaces"))
    except (ImportError, TypeError):  # pragma: no cover - evoreap without a file-system location
        installed = None
    if installed is not None and installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[2] / "search_spaces"


SPACES_DIR = _shipped_spaces_dir()


@dataclass(frozen=True)
class SpaceSettings:
    """The user-facing settings of a search-space file."""

    min_keep_fraction: float = 0.125
    min_keep: int | None = None
    max_keep: int | None = None
    step: int = 1
    max_deviation: float | None = None

    @classmethod
    def from_mapping(cls, data: Any, where: str) -> SpaceSettings:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UsageError(f"{where}: a search space is a YAML mapping of settings, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(repr, set(data) - known))  # YAML keys may be numbers or hold newlines
        if unknown:
            raise UsageError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        s = cls(**data)
        checks = [
            (isinstance(s.min_keep_fraction, (int, float)) and 0 <= s.min_keep_fraction <= 1,
             "min_keep_fraction must be a number in [0, 1]"),
            (s.min_keep is None or _whole(s.min_keep) and s.min_keep >= 1, "min_keep must be a whole >= 1"),
            (s.max_keep is None or _whole(s.max_keep) and s.max_keep >= 1, "max_keep must be a whole >= 1"),
            (isinstance(s.step, int) and not isinstance(s.step, bool) and s.step >= 1, "step must be a whole >= 1"),
            (s.max_deviation is None or isinstance(s.max_deviation, (int, float)) and not isinstance(
                s.max_deviation, bool) and math.isfinite(s.max_deviation) and s.max_deviation >= 0,
             "max_deviation must be a finite fraction >= 0 or null"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(f"{where}: {msg}")
        return s


def load_space_settings(name_or_path: str) -> SpaceSettings:
    """Load ``search_spaces/NAME.yaml`` or a YAML path."""
    p = Path(name_or_path)
    if not p.suffix:
        p = SPACES_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        available = ", ".join(sorted(f.stem for f in SPACES_DIR.glob("*.yaml")))
        raise UsageError(f"search space {name_or_path} not found; use one of {available} or a YAML file path")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise UsageError(f"search space {p} is not valid YAML: {(str(e).splitlines() or ['?'])[0]}") from None
    return SpaceSettings.from_mapping(data, str(p))


@dataclass(frozen=True)
class Budget:
    """Routed-expert parameters the pruned model may keep, and how the user asked for it."""

    params: int
    described: str

    @classmethod
    def resolve(cls, adapter: MoEAdapter, *, fraction: float | None = None, params: int | None = None,
                gb: float | None = None, bits: float | None = None,
                params_per_expert: tuple[int, ...] | None = None, stored_bits: float | None = None) -> Budget:
        """``params_per_expert`` (one per MoE layer, read from the modules) replaces the config's one expert size
        where layers differ, so that a fraction is of the real routed-expert total. ``stored_bits``: bits per
        routed-expert parameter as a pre-quantized source stores them (weights plus scales); ``--budget-gb`` then
        counts those bytes and ``--bits`` is refused."""
        sizes = params_per_expert or (adapter.expert_params(),) * len(adapter.moe_layer_indices)
        full = adapter.num_experts * sum(sizes)
        given = [x is not None for x in (fraction, params, gb)]
        if sum(given) != 1:
            raise UsageError("give exactly one of --budget F, --budget-params N, or --budget-gb G (with --bits B)")
        if fraction is not None:
            if not isinstance(fraction, (int, float)) or math.isnan(fraction) or not 0 < fraction <= 1:
                raise UsageError(f"--budget must be a fraction of routed-expert parameters in (0, 1], got {fraction}")
            return cls(int(math.floor(fraction * full + 1e-6)), f"{fraction:g} of routed-expert parameters")
        if params is not None:
            if params <= 0:
                raise UsageError(f"--budget-params must be positive, got {params}")
            return cls(cls._within(int(params), full, "--budget-params"), f"{params:,} routed-expert parameters")
        if stored_bits is not None:
            if bits is not None:
                raise UsageError(f"the model is stored quantized ({stored_bits:.2f} bits per routed-expert weight "
                                 "with its scales); --budget-gb counts its stored bytes, so drop --bits")
            if not gb > 0 or not math.isfinite(gb):
                raise UsageError("--budget-gb needs a positive size, e.g. --budget-gb 12")
            return cls(cls._within(int(gb * 1e9 * 8 / stored_bits), full, "--budget-gb"),
                       f"{gb:g} GB of routed experts as stored ({stored_bits:.2f} bits per weight with scales)")
        if bits is None or not bits > 0 or not gb > 0 or not math.isfinite(gb * bits):
            raise UsageError("--budget-gb needs a positive size and a positive --bits, e.g. --budget-gb 12 --bits 4")
        # Target size of the routed experts after quantisation to `bits` bits per weight (1 GB = 1e9 bytes).
        return cls(cls._within(int(gb * 1e9 * 8 / bits), full, "--budget-gb"),
                   f"{gb:g} GB of routed experts at {bits:g} bits")

    @staticmethod
    def _within(params: int, full: int, flag: str) -> int:
        # a budget above the model keeps every expert: almost certainly a unit mistake, not a wish to prune nothing
        if params > full:
            raise UsageError(f"{flag} asks for {params:,} routed-expert parameters but the model has only {full:,}; "
                             "give a smaller budget (or --budget F as a fraction)")
        return params


@dataclass(frozen=True)
class SearchSpace:
    """Resolved bounds for one model: allocation vectors are tuples of keep counts in MoE-layer order."""

    layers: tuple[int, ...]
    lower: tuple[int, ...]
    upper: tuple[int, ...]
    step: int
    params_per_expert: tuple[int, ...]
    budget: Budget
    total: int  # experts kept in all (every candidate keeps exactly this many)
    uniform: tuple[int, ...]

    @classmethod
    def build(cls, adapter: MoEAdapter, settings: SpaceSettings, budget: Budget,
              params_per_expert: tuple[int, ...] | None = None) -> SearchSpace:
        """Bounds and the uniform allocation for ``adapter``'s MoE layers. ``params_per_expert`` (one per MoE
        layer; default: the architecture's one expert size) lets layers of unequal expert size share the budget:
        the budget is always in parameters."""
        e, layers = adapter.num_experts, tuple(adapter.moe_layer_indices)
        step = settings.step
        if adapter.n_group > 1:
            step = math.lcm(step, adapter.n_group)
        floor = max(adapter.min_keep(), settings.min_keep or 0, math.ceil(settings.min_keep_fraction * e))
        lo = _round_up(floor, step)
        hi = min(e, settings.max_keep or e)
        hi -= hi % step
        if lo > e:
            raise UsageError(f"the per-layer floor of {floor} experts rounded up to step {step} is {lo}, more than "
                             f"the {e} experts a layer has; lower min_keep/min_keep_fraction or the step")
        if hi < lo:
            raise UsageError(f"per-layer bounds are empty: floor {lo} > ceiling {hi} (max_keep {settings.max_keep}, "
                             f"step {step}); fix the search space")
        ppe = tuple(params_per_expert) if params_per_expert else (adapter.expert_params(),) * len(layers)
        if len(ppe) != len(layers):
            raise UsageError(f"{len(ppe)} expert sizes given for {len(layers)} MoE layers")
        if len(set(ppe)) > 1:
            return cls._build_unequal(layers, lo, hi, step, ppe, budget, settings)
        # The most experts the budget allows, in whole steps per layer.
        total = min(budget.params // ppe[0], hi * len(layers))
        total -= total % step
        need = lo * len(layers)
        if total < need:
            raise UsageError(
                f"budget {budget.described} = {budget.params:,} params keeps at most {budget.params // ppe[0]} "
                f"experts, below the floor of {lo} per layer x {len(layers)} layers = {need} experts "
                f"({need * ppe[0]:,} params); raise the budget or lower the floor (min_keep_fraction, step)")
        uniform = _even_split(total, len(layers), step)
        if settings.max_deviation is not None:
            dev = settings.max_deviation
            lows = tuple(max(lo, _round_up(math.ceil(u * (1 - dev) - 1e-9), step)) for u in uniform)
            highs = tuple(min(hi, _round_down(math.floor(u * (1 + dev) + 1e-9), step)) for u in uniform)
        else:
            lows, highs = (lo,) * len(layers), (hi,) * len(layers)
        if any(u < a or u > b for u, a, b in zip(uniform, lows, highs)):
            raise UsageError(f"the uniform allocation {uniform[0]} per layer does not fit the bounds {lo}..{hi} "
                             f"with step {step}; widen the search space")
        return cls(layers, lows, highs, step, ppe, budget, total, uniform)

    @classmethod
    def _build_unequal(cls, layers: tuple[int, ...], lo: int, hi: int, step: int, ppe: tuple[int, ...],
                       budget: Budget, settings: SpaceSettings) -> SearchSpace:
        """Unequal expert sizes: candidates keep routed params within the budget (not a fixed expert count); the
        uniform allocation keeps the same count in every layer, the largest whose params fit."""
        need = lo * sum(ppe)
        if need > budget.params:
            raise UsageError(f"budget {budget.described} = {budget.params:,} params is below the floor of {lo} "
                             f"experts in every layer ({need:,} params); raise the budget or lower the floor")
        k = min(hi, _round_down(budget.params // sum(ppe), step))
        uniform = (k,) * len(layers)
        if settings.max_deviation is not None:
            dev = settings.max_deviation
            lows = (max(lo, _round_up(math.ceil(k * (1 - dev) - 1e-9), step)),) * len(layers)
            highs = (min(hi, _round_down(math.floor(k * (1 + dev) + 1e-9), step)),) * len(layers)
        else:
            lows, highs = (lo,) * len(layers), (hi,) * len(layers)
        return cls(layers, lows, highs, step, ppe, budget, k * len(layers), uniform)

    @property
    def equal_sizes(self) -> bool:
        return len(set(self.params_per_expert)) <= 1

    def fit(self, counts: list[int], rng: random.Random | None = None, protect: frozenset[int] = frozenset()
            ) -> tuple[int, ...]:
        """Unequal sizes: drop steps until the budget holds, then add steps where they still fit, so the budget is
        used. Without ``rng`` (repair) the largest experts give first and the smallest take first; with it (mutation)
        the layers are picked at random, never trimming ``protect`` (the layers a move just grew) while another
        can give, so that fitting does not drift every child towards the small-expert layers."""
        c = list(counts)
        by_size = sorted(range(len(c)), key=lambda j: (-self.params_per_expert[j], j))

        def pick(options: list[int]) -> int | None:
            if not options:
                return None
            return rng.choice(options) if rng is not None else options[0]

        while self.routed_params(tuple(c)) > self.budget.params:
            can = [j for j in by_size if c[j] - self.step >= self.lower[j]]
            j = pick([j for j in can if j not in protect] or can)
            if j is None:
                break
            c[j] -= self.step
        while True:
            room = self.budget.params - self.routed_params(tuple(c))
            j = pick([j for j in reversed(by_size)
                      if c[j] + self.step <= self.upper[j] and self.step * self.params_per_expert[j] <= room])
            if j is None:
                return tuple(c)
            c[j] += self.step

    def routed_params(self, counts: tuple[int, ...]) -> int:
        return sum(k * p for k, p in zip(counts, self.params_per_expert))

    def is_feasible(self, counts: tuple[int, ...]) -> bool:
        return (len(counts) == len(self.layers) and (sum(counts) == self.total or not self.equal_sizes)
                and all(a <= k <= b and k % self.step == 0 for k, a, b in zip(counts, self.lower, self.upper))
                and self.routed_params(counts) <= self.budget.params)

    def repair(self, counts: list[int]) -> tuple[int, ...]:
        """Clip to bounds and steps, then move single steps until the total is exact (a feasible neighbour)."""
        c = [min(b, max(a, _round_down(k, self.step))) for k, a, b in zip(counts, self.lower, self.upper)]
        if not self.equal_sizes:
            return self.fit(c)
        diff = self.total - sum(c)
        i = 0
        order = sorted(range(len(c)), key=lambda j: -counts[j]) if diff > 0 else \
            sorted(range(len(c)), key=lambda j: counts[j])
        while diff != 0:
            j = order[i % len(order)]
            if diff > 0 and c[j] + self.step <= self.upper[j]:
                c[j] += self.step
                diff -= self.step
            elif diff < 0 and c[j] - self.step >= self.lower[j]:
                c[j] -= self.step
                diff += self.step
            i += 1
            if i > 100 * len(c) * (1 + abs(diff)):
                raise RuntimeError("repair could not meet the total; the bounds are inconsistent")
        return tuple(c)

    def describe(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "lower": list(self.lower), "upper": list(self.upper), "step": self.step,
                "total_experts_kept": self.total, "budget_params": self.budget.params,
                "budget": self.budget.described, "uniform": list(self.uniform)}


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _round_up(x: int, step: int) -> int:
    return -(-x // step) * step


def _round_down(x: int, step: int) -> int:
    return x - x % step


def _even_split(total: int, n: int, step: int) -> tuple[int, ...]:
    """``total`` split over ``n`` layers as evenly as steps allow (the 'uniform' allocation)."""
    units, rem = divmod(total // step, n)
    # extra steps go to evenly spaced layers so the shape stays flat
    extra = {round((i + 0.5) * n / rem - 0.5) for i in range(rem)} if rem else set()
    return tuple((units + (1 if i in extra else 0)) * step for i in range(n))
