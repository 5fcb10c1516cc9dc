"""Checkpoint key layout: how the tensor names of a checkpoint map to MoE routers and experts, per architecture.

The one place that reads meaning into checkpoint tensor names (export plans, observe ``--offload``, the preflight and
the observation store's canonical router names all go through it). What varies by architecture comes from its
:class:`~evoreap.adapters.ArchSpec` (``disk_block``, ``router_attr``, ``experts_attr``, ``disk_expert_names``):

* MoE tensors are ``<prefix>layers.{i}.{block}.{router_attr|experts_attr}.<rest>``, where ``block`` is the spec's
  ``disk_block`` (Mixtral checkpoints keep ``block_sparse_moe``) or ``mlp`` (the transformers 5 module name);
* experts are stored per expert, ``...experts.{e}.<tail>`` (Qwen/OLMoE/DeepSeek/GLM, Mixtral's legacy ``w1/w2/w3``,
  quantisation scales too), or fused with the experts on dim 0, ``...experts.<name>`` (GPT-OSS, transformers 5
  fused saves); a per-expert checkpoint fills the model's fused ``gate_up_proj`` / ``down_proj`` from the spec's
  ``disk_expert_names`` (gate, up, down), as transformers' loader does;
* router tensors are ``...{router_attr}.<name>`` with the experts on dim 0 (``weight``, ``bias``,
  ``e_score_correction_bias``); the observation store names them ``"<layer>.<name>"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from evoreap.adapters import ArchSpec, MoEAdapter
from evoreap.checkpoint.reader import CheckpointIndex, TensorInfo

# The router tensors evoreap reads (fingerprints, observation checks), where a router has them.
ROUTER_TENSORS = ("weight", "bias", "e_score_correction_bias")
# The fused expert parameters of transformers 5 MoE blocks that per-expert checkpoints are stacked into.
FUSED_EXPERT_PARAMS = ("gate_up_proj", "down_proj")
MODEL_BLOCK = "mlp"  # the MoE block's attribute name in transformers' modules


def router_key(layer: int, name: str) -> str:
    """The canonical (observation store) name of router tensor ``name`` of decoder layer ``layer``."""
    return f"{layer}.{name}"


def split_router_key(key: str) -> tuple[int, str]:
    """``(layer, name)`` of a canonical router name (:func:`router_key`)."""
    layer, name = key.split(".", 1)
    return int(layer), name


def is_fused_experts(name: str, ndim: int) -> bool:
    """Whether the tensor ``name`` (model or checkpoint name) of ``ndim`` dims holds experts fused on dim 0."""
    return ".experts." in f"{name}." and ndim == 3


@dataclass(frozen=True)
class MoEKey:
    """A checkpoint tensor name inside an MoE block, split into its parts."""

    prefix: str  # everything before ``.{layer}``, ending in ``layers``
    layer: int
    block: str
    part: str  # the spec's router_attr or experts_attr
    rest: str  # after ``{part}.``: a tensor name (router, fused experts) or ``{e}.<tail>`` (per expert)
    is_router: bool

    def expert(self) -> tuple[int, str] | None:
        """``(expert index, tail)`` of a per-expert tensor, None for a router or fused tensor."""
        m = _PER_EXPERT.match(self.rest)
        return (int(m["e"]), m["tail"]) if m and not self.is_router else None

    def renumbered(self, new: int) -> str:
        """This per-expert tensor's name with the expert index ``new``."""
        _, tail = self.expert()
        return f"{self.prefix}.{self.layer}.{self.block}.{self.part}.{new}.{tail}"


_PER_EXPERT = re.compile(r"^(?P<e>\d+)\.(?P<tail>.+)$")


class KeyLayout:
    """The checkpoint names of one architecture (:class:`~evoreap.adapters.ArchSpec`)."""

    def __init__(self, spec: ArchSpec):
        self.spec = spec
        blocks = "|".join(re.escape(b) for b in dict.fromkeys((spec.disk_block, MODEL_BLOCK)))
        self._pattern = re.compile(
            rf"^(?P<pre>(?:.*\.)?layers)\.(?P<layer>\d+)\.(?P<block>{blocks})\."
            rf"(?P<part>{re.escape(spec.router_attr)}|{re.escape(spec.experts_attr)})\.(?P<rest>.+)$")

    @classmethod
    def of(cls, adapter: MoEAdapter) -> KeyLayout:
        return cls(adapter.spec)

    # -- checkpoint names ---------------------------------------------------------------------------------------------
    def parse(self, name: str) -> MoEKey | None:
        """The parts of a checkpoint name inside an MoE block's router or experts; None for any other tensor."""
        m = self._pattern.match(name)
        if m is None:
            return None
        return MoEKey(m["pre"], int(m["layer"]), m["block"], m["part"], m["rest"],
                      m["part"] == self.spec.router_attr)

    def where(self, layer: int, part: str) -> str:
        """How the names of a layer's router or experts look, for error messages."""
        return f"layers.{layer}.{self.spec.disk_block}.{part}.*"

    def router_tensor_infos(self, index: CheckpointIndex, moe_layers: list[int]) -> dict[str, TensorInfo]:
        """The checkpoint's router tensors of ``moe_layers`` under their canonical names (:func:`router_key`)."""
        moe = set(moe_layers)
        out = {}
        for t in index:
            k = self.parse(t.name)
            if k is not None and k.is_router and k.layer in moe and "." not in k.rest:
                out[router_key(k.layer, k.rest)] = t
        return out

    # -- model parameter names -> checkpoint names ---------------------------------------------------------------------
    def candidates(self, param: str) -> list[str]:
        """The checkpoint names that may hold model parameter ``param`` (the MoE block under its disk name too)."""
        out = [param]
        if self.spec.disk_block != MODEL_BLOCK and f".{MODEL_BLOCK}." in param:
            out.append(param.replace(f".{MODEL_BLOCK}.", f".{self.spec.disk_block}.", 1))
        return out

    def per_expert_parts(self, param: str, num_experts: int) -> list[tuple[str, ...]] | None:
        """For a fused expert parameter (``...experts.gate_up_proj`` / ``down_proj``) of an architecture whose
        checkpoints store one tensor per expert: per expert, the model-side names of the tensors that are
        concatenated (dim 0) into its row, e.g. ``(...experts.3.gate_proj.weight, ...experts.3.up_proj.weight)``
        (resolve each with :meth:`candidates`). None for any other parameter."""
        head, _, leaf = param.rpartition(".")
        if leaf not in FUSED_EXPERT_PARAMS or not head.endswith(f".{self.spec.experts_attr}") or \
                not self.spec.disk_expert_names:
            return None
        gate, up, down = self.spec.disk_expert_names
        leaves = (gate, up) if leaf == "gate_up_proj" else (down,)
        return [tuple(f"{head}.{i}.{p}" for p in leaves) for i in range(num_experts)]

    def router_param(self, prefix: str, layer: int, name: str) -> str:
        """The model parameter name of router tensor ``name`` of decoder layer ``layer`` (``prefix``: the decoder's
        name with a trailing dot, e.g. ``model.``)."""
        return f"{prefix}layers.{layer}.{MODEL_BLOCK}.{self.spec.router_attr}.{name}"


def router_tensor_infos(index: CheckpointIndex, adapter: MoEAdapter) -> dict[str, TensorInfo]:
    """The checkpoint's router tensors under the observation store's canonical names ``"<layer>.<name>"``."""
    return KeyLayout.of(adapter).router_tensor_infos(index, adapter.moe_layer_indices)
