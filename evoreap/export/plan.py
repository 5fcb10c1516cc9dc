"""The export plan: what happens to every source tensor (copy, take some experts' rows, renumber, drop).

Which tensors are routers and experts comes from :class:`~evoreap.checkpoint.layout.KeyLayout` (the architecture's
checkpoint key layout); the plan handles both on-disk expert layouts and writes the one the source has:

* per-expert tensors: kept experts are renumbered ``0..k-1`` in kept order, the others dropped;
* fused expert tensors (experts on dim 0): the kept rows are taken;
* router tensors (experts on dim 0): the kept rows are taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from evoreap.adapters import MoEAdapter
from evoreap.checkpoint.layout import KeyLayout
from evoreap.checkpoint.reader import CheckpointIndex, TensorInfo
from evoreap.errors import EvoreapError, UsageError

COPY, SLICE, RENUMBER = "copy", "slice", "renumber"


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: ``ranges`` of ``source``'s bytes written back to back under ``name``."""

    name: str
    source: TensorInfo
    action: str  # COPY | SLICE | RENUMBER
    shape: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]
    # Applied to the planned tensor (after slicing) before it is written: repaired routers, norms and expert
    # scales (evoreap.recovery); same dtype and shape out as in. None: the bytes are copied as they are.
    transform: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.ranges)

    @property
    def dtype(self) -> str:
        return self.source.dtype


@dataclass(frozen=True)
class ExportPlan:
    """Every output tensor in write order, the dropped source tensors, and the per-layer expert counts."""

    tensors: tuple[TensorPlan, ...]
    dropped: tuple[TensorInfo, ...]
    num_experts: int
    kept: dict[int, tuple[int, ...]]  # every MoE layer -> ascending original indices kept

    @property
    def counts(self) -> dict[int, int]:
        return {layer: len(k) for layer, k in self.kept.items()}

    @property
    def uniform(self) -> bool:
        return len(set(self.counts.values())) <= 1

    @property
    def bytes_before(self) -> int:
        return sum(t.source.nbytes for t in self.tensors) + sum(t.nbytes for t in self.dropped)

    @property
    def bytes_after(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def action_counts(self) -> dict[str, int]:
        out = {COPY: 0, SLICE: 0, RENUMBER: 0, "drop": len(self.dropped)}
        for t in self.tensors:
            out[t.action] += 1
        return out


def check_kept(adapter: MoEAdapter, kept: dict[int, list[int]]) -> dict[int, tuple[int, ...]]:
    """Validate ``kept`` (layer -> original indices) against the model; returns every MoE layer's kept tuple."""
    e, moe = adapter.num_experts, adapter.moe_layer_indices
    unknown = sorted(set(kept) - set(moe))
    if unknown:
        raise UsageError(f"layers {unknown} are not MoE layers of this model (MoE layers: {moe})")
    out = {}
    for layer in moe:
        idx = [int(i) for i in kept.get(layer, range(e))]
        if idx != sorted(set(idx)) or (idx and not 0 <= idx[0] <= idx[-1] < e):
            raise UsageError(f"layer {layer}: kept experts must be distinct ascending indices in 0..{e - 1}, "
                             f"got {idx}")
        adapter.check_keep_count(layer, len(idx))
        if adapter.n_group > 1:
            size = e // adapter.n_group
            per = [sum(1 for i in idx if i // size == g) for g in range(adapter.n_group)]
            if len(set(per)) > 1:
                raise UsageError(f"layer {layer}: group-limited routing (n_group={adapter.n_group}) needs the same "
                                 f"number of kept experts in every group of {size}, got {per} per group; pruning "
                                 "unevenly would re-form the groups and change the routing")
        out[layer] = tuple(idx)
    return out


def build_plan(index: CheckpointIndex, adapter: MoEAdapter, kept: dict[int, list[int]]) -> ExportPlan:
    """Map every tensor of ``index`` to its fate; raises if a pruned layer's router or experts are not found."""
    kept_t = check_kept(adapter, kept)
    e = adapter.num_experts
    pruned = {layer: k for layer, k in kept_t.items() if len(k) < e}
    new_index = {layer: {old: new for new, old in enumerate(k)} for layer, k in pruned.items()}
    layout = KeyLayout.of(adapter)
    tensors: list[TensorPlan] = []
    dropped: list[TensorInfo] = []
    found_router: set[int] = set()
    found_experts: dict[int, set[int] | None] = {}  # layer -> per-expert indices seen, None for fused
    for t in index:
        key = layout.parse(t.name)
        layer = key.layer if key else -1
        if layer not in pruned:
            tensors.append(TensorPlan(t.name, t, COPY, t.shape, ((t.start, t.nbytes),)))
            continue
        rows = list(pruned[layer])
        if key.is_router:
            if not t.shape or t.shape[0] != e:
                raise EvoreapError(f"{t.name} has shape {list(t.shape)}, expected {e} experts on dim 0; the "
                                   "checkpoint does not match its config")
            found_router.add(layer)
            tensors.append(TensorPlan(t.name, t, SLICE, (len(rows), *t.shape[1:]), tuple(t.row_ranges(rows))))
            continue
        per_expert = key.expert()
        if per_expert:
            old = per_expert[0]
            if old >= e:
                raise EvoreapError(f"{t.name} names expert {old} but the config has {e} experts")
            seen = found_experts.setdefault(layer, set())
            if seen is None:
                raise EvoreapError(f"layer {layer} stores experts both fused and per expert ({t.name})")
            seen.add(old)
            if old in new_index[layer]:
                tensors.append(TensorPlan(key.renumbered(new_index[layer][old]), t, RENUMBER, t.shape,
                                          ((t.start, t.nbytes),)))
            else:
                dropped.append(t)
            continue
        if not t.shape or t.shape[0] != e:
            raise EvoreapError(f"{t.name} has shape {list(t.shape)}; evoreap expects fused expert tensors to have the "
                               f"{e} experts on dim 0")
        if found_experts.setdefault(layer, None) is not None:
            raise EvoreapError(f"layer {layer} stores experts both fused and per expert ({t.name})")
        tensors.append(TensorPlan(t.name, t, SLICE, (len(rows), *t.shape[1:]), tuple(t.row_ranges(rows))))
    for layer in pruned:
        if layer not in found_router:
            raise EvoreapError(f"no router weight found for MoE layer {layer} (looked for "
                               f"{layout.where(layer, adapter.spec.router_attr)}); is the checkpoint the "
                               "architecture its config.json names?")
        if layer not in found_experts:
            raise EvoreapError(f"no expert weights found for MoE layer {layer} (looked for "
                               f"{layout.where(layer, adapter.spec.experts_attr)})")
        seen = found_experts[layer]
        if seen is not None and seen != set(range(e)):
            missing = sorted(set(range(e)) - seen)
            raise EvoreapError(f"layer {layer}: the checkpoint lacks experts {missing[:8]}; it is incomplete")
    return ExportPlan(tuple(tensors), tuple(dropped), e, kept_t)
