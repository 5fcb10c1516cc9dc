"""Routing maths per router kind: reproduces the model's own top-k choice and gate weights, optionally with experts
excluded (``keep``), exactly as a model whose excluded experts were physically deleted would route.

The gate weight ``g`` returned is the one the model multiplies each expert's output by:

* ``softmax_topk``: softmax over all (surviving) experts, top-k, renormalised over the k when ``norm_topk_prob`` (or
  always, for Mixtral). With ``norm_topk_prob=False`` (Qwen3/OLMoE default) ``g`` is the plain softmax probability.
* ``sigmoid_group``: the sigmoid score of the chosen expert, *without* ``e_score_correction_bias`` (the bias only
  steers the choice), renormalised when ``norm_topk_prob``, times ``routed_scaling_factor``.
* ``topk_softmax``: softmax over the k chosen logits (router bias included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evoreap.adapters.spec import ArchSpec

NEG_INF = float("-inf")


def _exclude(scores: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return scores if keep is None else scores.masked_fill(~keep.to(scores.device), NEG_INF)


def route(spec: ArchSpec, router: torch.nn.Module, hidden: torch.Tensor,
          keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route ``hidden [T, H]`` through ``router``; returns ``(logits [T, E], weights [T, K], indices [T, K])``.

    ``keep`` is a bool ``[E]`` mask of the experts still present; the others are never chosen and take no part in
    any normalisation.
    """
    hidden = hidden.reshape(-1, router.weight.shape[1])
    if spec.router_kind == "softmax_topk":
        logits = F.linear(hidden, router.weight)
        probs = F.softmax(_exclude(logits, keep), dim=-1, dtype=torch.float)
        top, idx = torch.topk(probs, router.top_k, dim=-1)
        if spec.always_renormalise or getattr(router, "norm_topk_prob", False):
            top = top / top.sum(dim=-1, keepdim=True)
        # Mixtral hands float32 weights to its experts; the Qwen/OLMoE routers cast back to the logits dtype.
        return logits, (top if spec.always_renormalise else top.to(logits.dtype)), idx

    if spec.router_kind == "sigmoid_group":
        logits = F.linear(hidden.float(), router.weight.float())
        scores = logits.sigmoid()
        choice = _exclude(scores + router.e_score_correction_bias, keep)
        n_group, e = router.num_group, router.num_experts
        group_scores = choice.view(-1, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, e // n_group).reshape(-1, e)
        choice = choice.masked_fill(~score_mask.bool(), NEG_INF)
        idx = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, idx)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, weights * router.routed_scaling_factor, idx

    if spec.router_kind == "topk_softmax":
        logits = F.linear(hidden, router.weight, router.bias)
        top, idx = torch.topk(_exclude(logits, keep), router.top_k, dim=-1)
        return logits, F.softmax(top, dim=1, dtype=top.dtype), idx

    raise ValueError(f"unknown router kind {spec.router_kind!r}")


def expert_forward(experts: torch.nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Output of expert ``e`` alone (before its gate weight) for tokens ``x [N, H]``, from the fused weights.

    Honours the flags that transformers' ``use_experts_implementation`` puts on every fused experts module
    (``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm``) and the module's own ``_apply_gate``
    (GPT-OSS overrides it with an interleaved, clamped SwiGLU).
    """
    transposed = getattr(experts, "is_transposed", False)
    has_bias = getattr(experts, "has_bias", False)
    if getattr(experts, "has_gate", True):
        w, b = experts.gate_up_proj[e], (experts.gate_up_proj_bias[e] if has_bias else None)
    else:
        w, b = experts.up_proj[e], (experts.up_proj_bias[e] if has_bias else None)
    h = x @ w if transposed else F.linear(x, w)
    if b is not None:
        h = h + b
    h = experts._apply_gate(h) if getattr(experts, "has_gate", True) else experts.act_fn(h)
    out = h @ experts.down_proj[e] if transposed else F.linear(h, experts.down_proj[e])
    if has_bias:
        out = out + experts.down_proj_bias[e]
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    return out
