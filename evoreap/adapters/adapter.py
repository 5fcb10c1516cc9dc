"""The adapter: binds an :class:`ArchSpec` to a config (and optionally a resident model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from evoreap.adapters import routing
from evoreap.adapters.spec import BY_MODEL_TYPE, ArchSpec, specs
from evoreap.errors import EvoreapError, UnsupportedModelError, UsageError

# Config keys that mean "this model has routed experts" in some family (used for the error message only).
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class MoELayer:
    """One routed MoE block of a resident model."""

    index: int  # decoder layer index
    block: torch.nn.Module
    router: torch.nn.Module
    experts: torch.nn.Module
    num_experts: int
    top_k: int


def text_config(config: Any) -> Any:
    """The language-model part of a (possibly multimodal) config."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def find_spec(config: Any) -> ArchSpec:
    """The spec for ``config`` or an :class:`UnsupportedModelError` that names what was not found."""
    config = text_config(config)
    model_type = getattr(config, "model_type", None)
    spec = BY_MODEL_TYPE.find(model_type)
    if spec is not None:
        return spec
    supported = ", ".join(f"{s.name} ({'/'.join(s.model_types)})" for s in specs())
    experts = {k: getattr(config, k) for k in _EXPERT_KEYS if getattr(config, k, None)}
    if experts:
        k, v = next(iter(experts.items()))
        raise UnsupportedModelError(
            f"model type {model_type!r} has routed experts ({k}={v}) but evoreap has no adapter for it; "
            f"supported: {supported}. Add an ArchSpec in evoreap/adapters/spec.py if it follows one of these layouts")
    raise UnsupportedModelError(
        f"model type {model_type!r} is not a Mixture-of-Experts model: its config has none of "
        f"{', '.join(_EXPERT_KEYS)} and no router; evoreap prunes routed experts of: {supported}")


def check_top_k(adapter: MoEAdapter) -> None:
    """``num_experts_per_tok`` (or the family's key) must be an integer in ``1..num_experts`` (a preflight check,
    run by :class:`MoEAdapter` before any weight is read)."""
    key = adapter.spec.top_k_key
    top_k = getattr(adapter.config, key, None)
    try:
        experts = adapter.num_experts
    except (AttributeError, TypeError, ValueError):  # a missing or non-numeric expert count: named below as unknown
        experts = None
    if type(top_k) is not int or top_k < 1 or (experts is not None and top_k > experts):
        where = f"the {experts} experts per layer" if experts is not None else "the number of experts per layer"
        raise EvoreapError(f"config.json sets {key}={top_k!r}; top-k must be a whole number from 1 to {where}: "
                           "fix config.json")


class MoEAdapter:
    """Architecture knowledge for one model: MoE layers, routing, expert forward and parameter accounting."""

    def __init__(self, config: Any):
        self.config = text_config(config)
        self.spec = find_spec(self.config)
        check_top_k(self)  # an impossible top-k fails here, before any weight is read

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> MoEAdapter:
        return cls(model.config)

    # -- structure from the config alone --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_experts(self) -> int:
        return self.spec.num_experts(self.config)

    @property
    def top_k(self) -> int:
        return self.spec.top_k(self.config)

    @property
    def moe_layer_indices(self) -> list[int]:
        return self.spec.moe_layer_indices(self.config)

    @property
    def n_group(self) -> int:
        """Expert groups of group-limited routing (1 when the router has none)."""
        return int(getattr(self.config, "n_group", 1) or 1) if self.spec.router_kind == "sigmoid_group" else 1

    @property
    def router_description(self) -> str:
        c, kind = self.config, self.spec.router_kind
        if kind == "softmax_topk":
            renorm = self.spec.always_renormalise or getattr(c, "norm_topk_prob", False)
            return f"softmax -> top-{self.top_k}" + (" -> renormalise" if renorm else "")
        if kind == "sigmoid_group":
            return (f"sigmoid + e_score_correction_bias -> group-limited top-{self.top_k} "
                    f"(n_group={self.n_group}, topk_group={getattr(c, 'topk_group', 1)}), "
                    f"norm_topk_prob={getattr(c, 'norm_topk_prob', False)}, "
                    f"routed_scaling_factor={getattr(c, 'routed_scaling_factor', 1.0)}")
        return f"logits + bias -> top-{self.top_k} -> softmax over the {self.top_k}"

    def expert_params(self) -> int:
        """Parameters of one routed expert (all experts of a family have the same shape)."""
        h, i = self.config.hidden_size, getattr(self.config, self.spec.expert_width_key)
        return 3 * h * i + ((2 * i + h) if self.spec.expert_bias else 0)

    def expert_params_per_layer(self, model: torch.nn.Module) -> tuple[int, ...]:
        """Parameters of one routed expert in each MoE layer, read from the modules (works on a meta model)."""
        return tuple(sum(p.numel() for p in layer.experts.parameters()) // layer.num_experts
                     for layer in self.layers(model))

    def min_keep(self) -> int:
        """The fewest experts a layer may keep: top-k, and for group-limited routing at least two per group (the
        group score sums each group's best two) and enough per group that the ``topk_group`` chosen groups hold
        top-k survivors."""
        floor = self.top_k
        if self.n_group > 1:
            topk_group = int(getattr(self.config, "topk_group", 1) or 1)
            per_group = max(2, -(-self.top_k // topk_group))
            floor = max(floor, per_group * self.n_group)
        return floor

    def check_keep_count(self, layer: int, keep: int) -> None:
        """Raise a clear error if ``keep`` experts cannot be kept in ``layer``."""
        e = self.num_experts
        if not self.min_keep() <= keep <= e:
            raise UsageError(f"layer {layer}: keeping {keep} experts is not possible; it must lie between "
                             f"{self.min_keep()} (top-k{' and two per group' if self.n_group > 1 else ''}) and {e}")
        if self.n_group > 1 and keep % self.n_group:
            raise UsageError(f"layer {layer}: keeping {keep} experts with n_group={self.n_group} group-limited "
                             f"routing needs a multiple of {self.n_group} (the same count in every group)")

    # -- a resident model -------------------------------------------------------------------------------------------
    def layers(self, model: torch.nn.Module) -> list[MoELayer]:
        """The routed MoE blocks of ``model``, checked against what the config says."""
        decoder_layers = model.get_decoder().layers
        out = []
        for i in self.moe_layer_indices:
            block = decoder_layers[i].mlp
            router = getattr(block, self.spec.router_attr, None)
            experts = getattr(block, self.spec.experts_attr, None)
            if router is None or experts is None:
                raise UnsupportedModelError(
                    f"{self.name}: decoder layer {i} should be MoE by its config but its mlp "
                    f"({type(block).__name__}) has no '{self.spec.router_attr}' router or "
                    f"'{self.spec.experts_attr}' experts; is this transformers 5.x?")
            out.append(MoELayer(i, block, router, experts, int(router.weight.shape[0]), int(router.top_k)))
        return out

    def moe_norm(self, model: torch.nn.Module, layer: int) -> torch.nn.Module:
        """The norm module whose output feeds decoder layer ``layer``'s MoE block."""
        norm = getattr(model.get_decoder().layers[layer], self.spec.moe_norm_attr, None)
        if norm is None:
            raise UnsupportedModelError(f"{self.name}: decoder layer {layer} has no '{self.spec.moe_norm_attr}' norm "
                                        "before its MoE block; set moe_norm_attr in its ArchSpec")
        return norm

    def route(self, layer: MoELayer, hidden: torch.Tensor, keep: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, gate weights, indices)`` for ``hidden`` as the model routes it (see routing.route)."""
        return routing.route(self.spec, layer.router, hidden, keep)

    @staticmethod
    def expert_output(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
        return routing.expert_forward(layer.experts, e, x)

    def param_summary(self, model: torch.nn.Module) -> dict[str, int]:
        """Total, routed-expert, shared-expert and active-per-token parameter counts (works on a meta model)."""
        total = sum(p.numel() for p in model.parameters())
        routed = shared = 0
        for layer in self.layers(model):
            routed += sum(p.numel() for p in layer.experts.parameters())
            for attr in self.spec.shared_attrs:
                shared += sum(p.numel() for p in getattr(layer.block, attr).parameters())
        per_expert = self.expert_params()
        active = total - routed + per_expert * self.top_k * len(self.moe_layer_indices)
        return {"total": total, "routed_experts": routed, "shared_experts": shared, "active_per_token": active,
                "per_expert": per_expert}
