"""Architecture specs: everything evoreap knows about one MoE family, as data.

This module and :mod:`evoreap.adapters.routing` are the only places that know architectures. Adding a family that
follows a known router kind and the transformers 5.x fused-experts layout means adding one :class:`ArchSpec` here
(or calling :func:`register_architecture` with it). Specs are kept in :data:`BY_MODEL_TYPE`, a registry keyed by
``config.model_type`` that refuses a model type registered twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evoreap.errors import RegistryError
from evoreap.registry import Registry

# Router kinds (the maths lives in routing.py):
#   softmax_topk  softmax over all experts -> top-k -> renormalise if `norm_topk_prob` (Qwen2/3-MoE, OLMoE, Mixtral)
#   sigmoid_group sigmoid scores; choice on scores + e_score_correction_bias, group-limited (n_group, topk_group);
#                 weights are the unbiased scores, renormalised if norm_topk_prob, times routed_scaling_factor
#                 (DeepSeek-V3, GLM-4.5)
#   topk_softmax  logits + router bias -> top-k -> softmax over the k chosen logits (GPT-OSS)
ROUTER_KINDS = ("softmax_topk", "sigmoid_group", "topk_softmax")


@dataclass(frozen=True)
class ArchSpec:
    """How one MoE architecture is laid out.

    Attributes:
        name: human name, e.g. ``"Qwen3-MoE"``.
        model_types: ``config.model_type`` values this spec serves.
        router_kind: one of :data:`ROUTER_KINDS`.
        router_attr: router attribute on the MoE block (``gate`` or ``router``).
        experts_attr: fused experts attribute on the MoE block.
        shared_attrs: shared-expert modules on the block (never pruned).
        num_experts_key: config key of the routed-expert count.
        top_k_key: config key of the experts chosen per token.
        expert_width_key: config key of the expert intermediate size.
        always_renormalise: the router renormalises the top-k weights whatever ``norm_topk_prob`` says (Mixtral).
        dense_rule: how the config says which decoder layers are dense: ``"none"`` (all MoE),
            ``"first_k_dense_replace"``, or ``"sparse_step"`` (``decoder_sparse_step`` + ``mlp_only_layers``).
        disk_block: the MoE block's name in checkpoint keys (Mixtral checkpoints keep ``block_sparse_moe``).
        disk_expert_names: per-expert tensor names in checkpoints that store one tensor per expert, in the
            order gate, up, down; empty when the checkpoint stores fused experts (GPT-OSS).
        expert_bias: experts carry biases on both projections (GPT-OSS).
        fused_gate_up: how the fused ``gate_up_proj`` holds the two projections along its output axis: ``"concat"``
            (gate then up, transformers 5's stacking of per-expert checkpoints) or ``"interleave"`` (gate on even,
            up on odd columns: GPT-OSS).
        fused_transposed: the fused expert tensors are ``[E, in, out]`` (GPT-OSS) rather than ``[E, out, in]``.
        moe_norm_attr: the norm on the decoder layer that feeds its MoE block (router repair may refit it).
        attention_attr: the decoder layer's attention module: candidates that differ first in this layer's MoE block
            share its output (the population engines compute it once for them).
    """

    name: str
    model_types: tuple[str, ...]
    router_kind: str
    router_attr: str = "gate"
    experts_attr: str = "experts"
    shared_attrs: tuple[str, ...] = ()
    num_experts_key: str = "num_local_experts"
    top_k_key: str = "num_experts_per_tok"
    expert_width_key: str = "moe_intermediate_size"
    always_renormalise: bool = False
    dense_rule: str = "none"
    disk_block: str = "mlp"
    disk_expert_names: tuple[str, ...] = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
    expert_bias: bool = False
    fused_gate_up: str = "concat"
    fused_transposed: bool = False
    moe_norm_attr: str = "post_attention_layernorm"
    attention_attr: str = "self_attn"

    def moe_layer_indices(self, config: Any) -> list[int]:
        """Decoder layers whose MLP is a routed MoE block, from the config alone (no weights needed)."""
        n = config.num_hidden_layers
        if self.dense_rule == "first_k_dense_replace":
            return [i for i in range(n) if i >= getattr(config, "first_k_dense_replace", 0)]
        if self.dense_rule == "sparse_step":
            step = getattr(config, "decoder_sparse_step", 1) or 1
            dense = set(getattr(config, "mlp_only_layers", None) or [])
            return [i for i in range(n) if i not in dense and (i + 1) % step == 0]
        return list(range(n))

    @property
    def linear_expert_names(self) -> tuple[str, str, str]:
        """Per-expert Linear weight names (gate, up, down): the checkpoint's own, or for a fused-on-disk family the
        ones llm-compressor's per-expert Linear views (and so compressed-tensors checkpoints of it) use."""
        return self.disk_expert_names or ("gate_proj.weight", "up_proj.weight", "down_proj.weight")

    def num_experts(self, config: Any) -> int:
        return int(getattr(config, self.num_experts_key))

    def top_k(self, config: Any) -> int:
        return int(getattr(config, self.top_k_key))


DENSE_RULES = ("none", "first_k_dense_replace", "sparse_step")
FUSED_GATE_UP = ("concat", "interleave")

BY_MODEL_TYPE: Registry[ArchSpec] = Registry("model type")


def register_architecture(spec: ArchSpec) -> ArchSpec:
    """Add ``spec`` under each of its model types; a model type already registered (or an unknown router kind or
    dense rule) raises :class:`~evoreap.errors.RegistryError` and registers nothing."""
    if not spec.model_types:
        raise RegistryError(f"architecture {spec.name!r} names no model type")
    if spec.router_kind not in ROUTER_KINDS:
        raise RegistryError(f"architecture {spec.name!r}: unknown router kind {spec.router_kind!r}; use one of "
                            f"{', '.join(ROUTER_KINDS)}")
    if spec.dense_rule not in DENSE_RULES:
        raise RegistryError(f"architecture {spec.name!r}: unknown dense rule {spec.dense_rule!r}; use one of "
                            f"{', '.join(DENSE_RULES)}")
    if spec.fused_gate_up not in FUSED_GATE_UP:
        raise RegistryError(f"architecture {spec.name!r}: unknown fused_gate_up {spec.fused_gate_up!r}; use one of "
                            f"{', '.join(FUSED_GATE_UP)}")
    for t in spec.model_types:
        taken = BY_MODEL_TYPE.find(t)
        if taken is not None:
            raise RegistryError(f"model type {t!r} is already registered (by {taken.name}); an architecture is "
                                "registered once")
    for t in spec.model_types:
        BY_MODEL_TYPE.add(t, spec)
    return spec


def specs() -> tuple[ArchSpec, ...]:
    """Every registered architecture, in registration order (the built-ins first)."""
    return tuple(dict.fromkeys(BY_MODEL_TYPE.values()))


# The built-in architectures, registered below.
SPECS: tuple[ArchSpec, ...] = (
    ArchSpec("Qwen3-MoE", ("qwen3_moe",), "softmax_topk", dense_rule="sparse_step"),
    ArchSpec("Qwen2-MoE", ("qwen2_moe",), "softmax_topk", shared_attrs=("shared_expert", "shared_expert_gate"),
             num_experts_key="num_experts",
             dense_rule="sparse_step"),
    ArchSpec("Mixtral", ("mixtral",), "softmax_topk", expert_width_key="intermediate_size", always_renormalise=True,
             disk_block="block_sparse_moe", disk_expert_names=("w1.weight", "w3.weight", "w2.weight")),
    ArchSpec("OLMoE", ("olmoe",), "softmax_topk", expert_width_key="intermediate_size"),
    ArchSpec("DeepSeek-V3", ("deepseek_v3",), "sigmoid_group", shared_attrs=("shared_experts",),
             dense_rule="first_k_dense_replace"),
    ArchSpec("GLM-4.5-MoE", ("glm4_moe",), "sigmoid_group", shared_attrs=("shared_experts",),
             dense_rule="first_k_dense_replace"),
    ArchSpec("GPT-OSS", ("gpt_oss",), "topk_softmax", router_attr="router", expert_width_key="intermediate_size",
             disk_expert_names=(), expert_bias=True, fused_gate_up="interleave", fused_transposed=True),
)

for _spec in SPECS:
    register_architecture(_spec)
