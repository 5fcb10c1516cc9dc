"""Allocations: how many routed experts each MoE layer keeps, and which ones.

On disk an allocation is JSON::

    {"format": "evoreap-allocation", "version": 1, "num_experts": 32, "top_k": 4,
     "layers": {"0": 16, "1": 12, ...}, "meta": {...}}

``layers`` maps each MoE decoder-layer index to its keep count. ``meta`` is free-form (budget, criterion, proxy
values, ...).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evoreap.adapters import MoEAdapter
from evoreap.errors import UsageError
from evoreap.files import write_json_atomic, write_text_atomic  # noqa: F401  (re-exported)

FORMAT = "evoreap-allocation"


@dataclass(frozen=True)
class Allocation:
    """Keep counts per MoE layer: ``counts[i]`` experts are kept in decoder layer ``layers[i]``."""

    layers: tuple[int, ...]
    counts: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.counts):
            raise UsageError(f"allocation has {len(self.layers)} layers but {len(self.counts)} counts")

    @classmethod
    def uniform(cls, adapter: MoEAdapter, keep: int) -> Allocation:
        layers = tuple(adapter.moe_layer_indices)
        return cls(layers, (keep,) * len(layers))

    @classmethod
    def full(cls, adapter: MoEAdapter) -> Allocation:
        return cls.uniform(adapter, adapter.num_experts)

    def as_dict(self) -> dict[int, int]:
        return dict(zip(self.layers, self.counts))

    @property
    def total(self) -> int:
        return sum(self.counts)

    def routed_params(self, adapter: MoEAdapter) -> int:
        return self.total * adapter.expert_params()

    def fraction(self, adapter: MoEAdapter) -> float:
        """Fraction of routed-expert parameters kept."""
        return self.total / (adapter.num_experts * len(adapter.moe_layer_indices))

    def validate(self, adapter: MoEAdapter) -> Allocation:
        """Check layers and counts against the model; raise :class:`UsageError` naming the first problem."""
        expected = tuple(adapter.moe_layer_indices)
        if self.layers != expected:
            raise UsageError(f"allocation names layers {list(self.layers)} but the model's MoE layers are "
                             f"{list(expected)} ({len(expected)} layers); was it made for another model?")
        for layer, keep in zip(self.layers, self.counts):
            adapter.check_keep_count(layer, keep)
        return self

    # -- files ------------------------------------------------------------------------------------------------------
    def to_json(self, adapter: MoEAdapter | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "version": 1}
        if adapter is not None:
            out.update(num_experts=adapter.num_experts, top_k=adapter.top_k,
                       kept_fraction=round(self.fraction(adapter), 6))
        out["layers"] = {str(k): int(v) for k, v in zip(self.layers, self.counts)}
        out["meta"] = self.meta
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "allocation") -> Allocation:
        if not isinstance(data, dict) or not isinstance(data.get("layers"), dict) or not data["layers"]:
            raise UsageError(f"{where} is not an evoreap allocation: expected a JSON object with a non-empty "
                             '"layers" mapping like {"layers": {"0": 16, "1": 12}}')
        pairs = []
        for k, v in data["layers"].items():
            if not (str(k).isascii() and str(k).isdigit()) or isinstance(v, bool) or not isinstance(v, int):
                raise UsageError(f"{where}: layer {k!r} -> {v!r} is not a layer index mapped to a whole count")
            if v < 0:
                raise UsageError(f"{where}: layer {k} has a negative keep count ({v})")
            pairs.append((int(k), v))
        pairs.sort()
        if len({p[0] for p in pairs}) != len(pairs):  # "1" and "01" name the same layer
            raise UsageError(f"{where}: a layer is named twice ({', '.join(map(repr, data['layers']))}); give each "
                             "layer index once")
        return cls(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), dict(data.get("meta") or {}))

    def save(self, path: str | Path, adapter: MoEAdapter | None = None) -> None:
        write_json_atomic(path, self.to_json(adapter))

    @classmethod
    def load(cls, path: str | Path) -> Allocation:
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"allocation file {path} does not exist") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"allocation file {path} is not valid JSON ({e})") from None
        return cls.from_json(data, str(path))


def select_experts(adapter: MoEAdapter, scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` highest-scored experts of one layer.

    Ties go to the lower index. With group-limited routing the same number is kept in every group, so that the
    pruned model's contiguous groups are the original groups minus the cut experts.
    """
    scores = scores.detach().double().cpu()
    e = scores.numel()
    groups = adapter.n_group
    if groups > 1:
        per, size = keep // groups, e // groups
        chosen = [g * size + _top(scores[g * size:(g + 1) * size], per) for g in range(groups)]
        return torch.cat(chosen).sort().values
    return _top(scores, keep).sort().values


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    # stable descending sort: equal scores keep their index order
    order = torch.sort(-scores, stable=True).indices
    return order[:k]


def keep_masks(adapter: MoEAdapter, allocation: Allocation, scores: dict[int, torch.Tensor]
               ) -> dict[int, torch.Tensor]:
    """Bool ``[E]`` masks of the kept experts per MoE layer (layers keeping everything are left out)."""
    out = {}
    for layer, keep in zip(allocation.layers, allocation.counts):
        if keep >= adapter.num_experts:
            continue
        mask = torch.zeros(adapter.num_experts, dtype=torch.bool)
        mask[select_experts(adapter, scores[layer], keep)] = True
        out[layer] = mask
    return out


def uniform_keep_for_fraction(adapter: MoEAdapter, fraction: float) -> int:
    """The uniform per-layer count closest to ``fraction`` of the experts that the model can represent."""
    if not (0 < fraction <= 1) or math.isnan(fraction):
        raise UsageError(f"budget must be a fraction in (0, 1], got {fraction}")
    step = adapter.n_group if adapter.n_group > 1 else 1
    keep = int(round(adapter.num_experts * fraction / step)) * step
    return max(adapter.min_keep(), min(adapter.num_experts, keep))
