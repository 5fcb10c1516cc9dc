"""Per-expert routing statistics: raw float64 sums and counts, exactly mergeable.

Everything is stored as a *sum* (or a max), never as a mean, so that two observations of disjoint token sets merge
into exactly what one observation of their union gives; criteria turn the sums into scores later
(:mod:`evoreap.criteria`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from evoreap.errors import UsageError

# Per-expert fields, all float64 ``[E]`` (the per-domain ones are ``[D, E]``).
SUM_FIELDS = ("count", "gate_sum", "norm_sum", "gate_norm_sum", "prob_mass")
MAX_FIELDS = ("max_norm",)
DOMAIN_FIELDS = ("domain_count", "domain_gate_norm_sum")
FIELDS = SUM_FIELDS + MAX_FIELDS + DOMAIN_FIELDS


@dataclass(frozen=True)
class LayerStats:
    """One MoE layer's statistics, the view a criterion scores (see :mod:`evoreap.criteria`).

    Attributes (``E`` experts, ``D`` domains, all float64):
        index: decoder layer index.
        count: tokens routed to each expert (the model's own top-k; padding excluded).
        gate_sum: sum over routed tokens of the gate weight the model applies to the expert's output.
        norm_sum: sum over routed tokens of ``||f_e(x_t)||_2``, the expert's own output before the gate.
        gate_norm_sum: sum over routed tokens of ``g_te * ||f_e(x_t)||_2`` (the REAP numerator).
        max_norm: largest ``||f_e(x_t)||_2`` over routed tokens (0 when never routed).
        prob_mass: router probability mass over all (non-padding) tokens (soft frequency).
        domain_count: ``[D, E]`` routed-token counts per data domain.
        domain_gate_norm_sum: ``[D, E]`` the REAP numerator (``gate_norm_sum``) per data domain, for domain-specific
            saliency (re-injection, per-domain floors).
        tokens: non-padding tokens observed.
        domains: domain names, indexing ``domain_count``'s rows.
    """

    index: int
    count: torch.Tensor
    gate_sum: torch.Tensor
    norm_sum: torch.Tensor
    gate_norm_sum: torch.Tensor
    max_norm: torch.Tensor
    prob_mass: torch.Tensor
    domain_count: torch.Tensor
    tokens: int
    domains: tuple[str, ...]
    domain_gate_norm_sum: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return int(self.count.numel())


@dataclass(frozen=True)
class ExpertStats:
    """Routing statistics of every MoE layer of one model over one token set.

    Each per-expert field maps a decoder layer index to a float64 tensor (see :class:`LayerStats` for the meaning
    of each field). ``tokens`` counts the non-padding tokens observed and ``domain_tokens[d]`` those of domain ``d``.

    Router probabilities (``prob_mass``) are the model's own router probabilities over all experts:
    softmax of the logits for softmax routers (Qwen2/3-MoE, Mixtral, OLMoE); softmax of all logits *including the
    router bias* for GPT-OSS (the bias is part of its logits; the model's own softmax over the chosen k is a
    renormalisation of exactly this distribution); and for sigmoid routers (DeepSeek-V3, GLM-4.5) the per-expert
    **sigmoid scores** without ``e_score_correction_bias``: those are the values the model's gate weights are made
    of, and each expert's score is independent of the others, so a softmax over the logits would describe a router
    the model does not have. Sigmoid mass per token therefore does not sum to 1.
    """

    count: dict[int, torch.Tensor]
    gate_sum: dict[int, torch.Tensor]
    norm_sum: dict[int, torch.Tensor]
    gate_norm_sum: dict[int, torch.Tensor]
    max_norm: dict[int, torch.Tensor]
    prob_mass: dict[int, torch.Tensor]
    domain_count: dict[int, torch.Tensor]
    domains: tuple[str, ...]
    tokens: int
    domain_tokens: tuple[int, ...] = field(default=())
    domain_gate_norm_sum: dict[int, torch.Tensor] = field(default_factory=dict)

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def zeros(cls, experts_per_layer: dict[int, int], domains: tuple[str, ...]) -> ExpertStats:
        """Empty statistics (fresh float64 accumulators) for the given layers."""
        def per_layer(shape_of) -> dict[int, torch.Tensor]:
            return {i: torch.zeros(shape_of(e), dtype=torch.float64) for i, e in experts_per_layer.items()}

        d = max(1, len(domains))
        return cls(**{f: per_layer(lambda e: (e,)) for f in SUM_FIELDS + MAX_FIELDS},
                   **{f: per_layer(lambda e: (d, e)) for f in DOMAIN_FIELDS}, domains=tuple(domains), tokens=0,
                   domain_tokens=(0,) * len(domains))

    # -- access ---------------------------------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.count))

    def layer(self, index: int) -> LayerStats:
        if index not in self.count:
            raise KeyError(f"layer {index} is not an observed MoE layer ({list(self.layers)})")
        return LayerStats(index=index, **{f: getattr(self, f).get(index) for f in FIELDS}, tokens=self.tokens,
                          domains=self.domains)

    # -- algebra --------------------------------------------------------------------------------------------------
    def merge(self, other: ExpertStats) -> ExpertStats:
        """Statistics of both token sets together: sums add, maxima take the max (exact for counts; the float64
        sums are the same additions an observation of the concatenation would do)."""
        if self.layers != other.layers:
            raise UsageError(f"cannot merge statistics of different layers: {self.layers} vs {other.layers}")
        if self.domains != other.domains:
            raise UsageError(f"cannot merge statistics of different domains: {self.domains} vs {other.domains}")
        for i in self.layers:
            if self.count[i].shape != other.count[i].shape:
                raise UsageError(f"cannot merge statistics of different models: layer {i} has "
                                 f"{self.count[i].numel()} vs {other.count[i].numel()} experts")
        out = {f: {i: getattr(self, f)[i] + getattr(other, f)[i] for i in self.layers}
               for f in SUM_FIELDS + DOMAIN_FIELDS}
        out["max_norm"] = {i: torch.maximum(self.max_norm[i], other.max_norm[i]) for i in self.layers}
        dt = tuple(a + b for a, b in zip(self.domain_tokens, other.domain_tokens))
        return ExpertStats(**out, domains=self.domains, tokens=self.tokens + other.tokens, domain_tokens=dt)

    def first_non_finite(self) -> tuple[int, int, list[str]] | None:
        """``(layer, expert, fields)`` of the first expert (in layer, then expert order) with a NaN or infinite
        statistic, and which fields are; None when all are finite."""
        for i in self.layers:
            bad = {f: ~torch.isfinite(getattr(self, f)[i]) for f in FIELDS}
            for f in DOMAIN_FIELDS:
                bad[f] = bad[f].reshape(-1, self.count[i].numel()).any(0)
            per_expert = torch.stack([bad[f] for f in FIELDS]).any(0)
            if bool(per_expert.any()):
                e = int(per_expert.nonzero()[0, 0])
                return i, e, [f for f in FIELDS if bool(bad[f][e])]
        return None

    def allclose(self, other: ExpertStats, rtol: float = 1e-12, atol: float = 0.0) -> bool:
        return (self.layers == other.layers and self.tokens == other.tokens and self.domains == other.domains
                and all(torch.allclose(getattr(self, f)[i], getattr(other, f)[i], rtol=rtol, atol=atol)
                        for f in FIELDS for i in self.layers))

    # -- serialisation (safetensors-friendly: flat name -> tensor) -----------------------------------------------------
    def layer_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """One layer's raw sums, keyed by field name (what one per-layer safetensors file holds)."""
        return {f: getattr(self, f)[index].contiguous() for f in FIELDS}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """All statistics as ``{"<layer>.<field>": tensor}`` plus ``tokens`` and ``domain_tokens`` (int64)."""
        out = {f"{i}.{k}": v for i in self.layers for k, v in self.layer_tensors(i).items()}
        out["tokens"] = torch.tensor(self.tokens, dtype=torch.int64)
        out["domain_tokens"] = torch.tensor(self.domain_tokens, dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], domains: tuple[str, ...] | list[str]) -> ExpertStats:
        """Inverse of :meth:`to_tensors` (``domains`` is stored beside the tensors, e.g. in a manifest)."""
        per: dict[str, dict[int, torch.Tensor]] = {f: {} for f in FIELDS}
        for name, t in tensors.items():
            if name in ("tokens", "domain_tokens"):
                continue
            layer, _, f = name.partition(".")
            if f not in per or not layer.isdigit():
                raise ValueError(f"unexpected statistics tensor {name!r}")
            per[f][int(layer)] = t.to(torch.float64)
        layers = set(per["count"])
        for f, d in per.items():
            if set(d) != layers:
                raise ValueError(f"statistics field {f!r} is missing for layers {sorted(layers - set(d))}")
        dt = tuple(int(x) for x in tensors["domain_tokens"].tolist()) if "domain_tokens" in tensors else ()
        return cls(**per, domains=tuple(domains), tokens=int(tensors["tokens"]), domain_tokens=dt)
