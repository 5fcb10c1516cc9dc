"""Virtual pruning: make experts unreachable by masking the router, without touching any weight.

Inside ``with masked(model, adapter, masks):`` every router of a masked layer routes as if its cut experts had been
deleted: they are never chosen and take no part in any normalisation (softmax, top-k renormalisation, sigmoid
group scores). On exit the hooks are removed and the model is exactly as before, also when the body raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from evoreap.adapters import MoEAdapter, MoELayer
from evoreap.errors import UsageError


def _router_hook(adapter: MoEAdapter, layer: MoELayer, keep: torch.Tensor):
    def hook(module, args, output):
        # Recompute the routing with the cut experts excluded; the stock output is discarded.
        if getattr(module, "_hf_hook", None) is not None:  # a device-mapped model (accelerate): the router's
            from accelerate.utils import align_module_device  # offloaded weights are back on meta after its forward

            with align_module_device(module):
                return adapter.route(layer, args[0], keep)
        return adapter.route(layer, args[0], keep)

    return hook


def _check_groups(layer: MoELayer, keep: torch.Tensor) -> None:
    """Group-limited routers (n_group > 1): only the same count in every group matches a model that can be exported
    (its contiguous groups re-form after deletion); each group needs two survivors for its group score, and the
    ``topk_group`` chosen groups must hold top-k survivors, or a cut expert would be chosen."""
    groups = int(getattr(layer.router, "num_group", 1) or 1)
    if groups <= 1:
        return
    per_group = keep.view(groups, -1).sum(dim=1).tolist()
    if len(set(per_group)) > 1 or per_group[0] < 2 or per_group[0] * layer.router.topk_group < layer.top_k:
        raise UsageError(f"layer {layer.index} keeps {per_group} experts in its {groups} routing groups; "
                         f"group-limited routing needs the same count (>= 2, and >= top-k {layer.top_k} over "
                         f"topk_group={layer.router.topk_group} groups) in every group; use allocation.select_experts")


@contextmanager
def masked(model: torch.nn.Module, adapter: MoEAdapter, masks: dict[int, torch.Tensor]) -> Iterator[None]:
    """Route ``model`` with only the experts in ``masks[layer]`` (bool ``[E]``) reachable; other layers untouched."""
    by_index = {layer.index: layer for layer in adapter.layers(model)}
    unknown = sorted(set(masks) - set(by_index))
    if unknown:
        raise UsageError(f"layers {unknown} are not MoE layers of this model ({sorted(by_index)})")
    handles = []
    try:
        for index, keep in masks.items():
            layer = by_index[index]
            device = layer.router.weight.device
            keep = keep.to(device=device if device.type != "meta" else "cpu", dtype=torch.bool)  # meta: offloaded
            if int(keep.sum()) < layer.top_k:
                raise UsageError(f"layer {index} keeps {int(keep.sum())} experts, fewer than top-k {layer.top_k}")
            _check_groups(layer, keep)
            handles.append(layer.router.register_forward_hook(_router_hook(adapter, layer, keep)))
        yield
    finally:
        for h in handles:
            h.remove()
