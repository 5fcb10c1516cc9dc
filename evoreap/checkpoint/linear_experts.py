"""Per-expert Linear views of fused expert tensors, and back.

transformers 5 holds a layer's experts fused (``experts.gate_up_proj`` ``[E, 2I, H]``, ``experts.down_proj``
``[E, H, I]``; GPT-OSS ``[E, in, out]`` with gate and up interleaved, plus ``*_bias``), while quantizers work on one
Linear at a time: compressed-tensors stores one ``weight_packed``/``weight_scale`` per 2-D weight. As llm-compressor
linearizes fused experts before quantizing (its ``LinearExperts2D``: ``experts.{e}.gate_proj``/``up_proj``/
``down_proj`` Linear modules with their biases), :func:`split_fused` gives those views of a fused tensor, named as
llm-compressor's saved checkpoints name them (:attr:`~evoreap.adapters.ArchSpec.linear_expert_names`), and
:class:`FusedView` reads such per-expert tensors back as the fused parameters of a family whose checkpoints are
fused on disk (GPT-OSS), which transformers' own loader has no conversion for.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from evoreap.adapters import ArchSpec
from evoreap.errors import EvoreapError

FUSED = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


def _bias(weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0] + ".bias"


def _split_gate_up(t: torch.Tensor, spec: ArchSpec, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.fused_gate_up == "interleave":
        idx = torch.arange(t.shape[dim])
        return t.index_select(dim, idx[0::2]), t.index_select(dim, idx[1::2])
    return t.chunk(2, dim=dim)


def split_fused(spec: ArchSpec, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The per-expert Linear weights (``[out, in]``) or biases of fused expert tensor ``name`` (experts on dim 0),
    keyed ``<...experts>.{e}.gate_proj.weight`` etc.; None when ``name`` is not a fused expert tensor."""
    head, _, leaf = name.rpartition(".")
    if leaf not in FUSED or not head.endswith(f".{spec.experts_attr}") or tensor.dim() != (3 if "bias" not in leaf
                                                                                            else 2):
        return None
    gate, up, down = spec.linear_expert_names
    out: dict[str, torch.Tensor] = {}
    if leaf in ("gate_up_proj", "down_proj"):
        w = tensor.transpose(1, 2) if spec.fused_transposed else tensor  # -> [E, out, in]
        parts = dict(zip((gate, up), _split_gate_up(w, spec, 1))) if leaf == "gate_up_proj" else {down: w}
    else:
        parts = (dict(zip((_bias(gate), _bias(up)), _split_gate_up(tensor, spec, 1))) if leaf == "gate_up_proj_bias"
                 else {_bias(down): tensor})
    for e in range(tensor.shape[0]):
        for tail, t in parts.items():
            out[f"{head}.{e}.{tail}"] = t[e].contiguous()
    return out


def fuse(spec: ArchSpec, leaf: str, experts: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The fused tensor ``leaf`` (:data:`FUSED`) from each expert's Linear tensors (tail -> tensor): the inverse
    of :func:`split_fused`."""
    gate, up, down = spec.linear_expert_names
    if leaf in ("gate_up_proj", "gate_up_proj_bias"):
        g_name, u_name = (gate, up) if leaf == "gate_up_proj" else (_bias(gate), _bias(up))
        g = torch.stack([x[g_name] for x in experts])
        u = torch.stack([x[u_name] for x in experts])
        if spec.fused_gate_up == "interleave":
            w = torch.stack((g, u), dim=2).flatten(1, 2)  # rows g0 u0 g1 u1 ...
        else:
            w = torch.cat((g, u), dim=1)
    else:
        w = torch.stack([x[down if leaf == "down_proj" else _bias(down)] for x in experts])
    if leaf in ("gate_up_proj", "down_proj") and spec.fused_transposed:
        w = w.transpose(1, 2)
    return w.contiguous()


class FusedView:
    """Fused expert parameters (``...experts.gate_up_proj`` etc.) of a family stored fused on disk, read from a
    checkpoint that holds per-expert Linear tensors instead (a compressed-tensors export of GPT-OSS)."""

    def __init__(self, spec: ArchSpec, names: list[str]):
        gate, up, down = spec.linear_expert_names
        tails = {gate: "gate_up_proj", up: "gate_up_proj", down: "down_proj",
                 _bias(gate): "gate_up_proj_bias", _bias(up): "gate_up_proj_bias", _bias(down): "down_proj_bias"}
        pattern = re.compile(rf"^(?P<head>.*\.{re.escape(spec.experts_attr)})\.(?P<e>\d+)\.(?P<tail>.+)$")
        self.spec = spec
        self.members: dict[str, dict[int, dict[str, str]]] = {}  # fused name -> expert -> tail -> stored name
        for n in names:
            m = pattern.match(n)
            if m is None or m["tail"] not in tails:
                continue
            fused = f"{m['head']}.{tails[m['tail']]}"
            self.members.setdefault(fused, {}).setdefault(int(m["e"]), {})[m["tail"]] = n

    def consumed(self) -> set[str]:
        return {n for per in self.members.values() for x in per.values() for n in x.values()}

    def names(self) -> list[str]:
        return list(self.members)

    def parts(self, name: str) -> list[str]:
        return [n for _, x in sorted(self.members[name].items()) for n in x.values()]

    def get(self, name: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        per = self.members[name]
        experts = sorted(per)
        if experts != list(range(len(experts))):
            raise EvoreapError(f"{name}: the checkpoint's per-expert tensors are not numbered 0..{len(experts) - 1} "
                               f"(found {experts[:8]}); it is incomplete")
        return fuse(self.spec, name.rpartition(".")[2], [{t: read(n) for t, n in per[e].items()} for e in experts])
