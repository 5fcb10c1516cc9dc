"""Re-injection: put back the pruned experts that carry a domain.

Candidates are ranked by the domain's own saliency (the REAP numerator summed over that domain's routed tokens,
``domain_gate_norm_sum`` in the observation), then confirmed by masked evaluation: each of the best-ranked
candidates is added alone and the domain's search-split loss measured; the ``n`` that lower it most (and only ones
that lower it) are put back together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from evoreap.adapters import MoEAdapter
from evoreap.data import TokenData
from evoreap.errors import UsageError
from evoreap.observe.stats import ExpertStats
from evoreap.proxies import evaluate
from evoreap.reference import Reference

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReinjectResult:
    """The kept experts after re-injection, what was added (layer -> experts), and the domain's search-split loss
    before and after; ``tried``: each confirmed candidate's loss change alone."""

    kept: dict[int, list[int]]
    added: dict[int, list[int]]
    before: float
    after: float
    tried: list[dict]


def saliency(stats: ExpertStats, domain: str | None = None) -> dict[int, torch.Tensor]:
    """Per layer ``[E]``: the REAP numerator summed over ``domain``'s routed tokens (all tokens when None)."""
    if domain is None:
        return {i: stats.gate_norm_sum[i] for i in stats.layers}
    if domain not in stats.domains:
        raise UsageError(f"the observation has no domain {domain!r} (it has {', '.join(stats.domains) or 'none'}); "
                         "observe data that includes it")
    if not stats.domain_gate_norm_sum:
        raise UsageError("the observation has no per-domain saliency; observe again with this evoreap")
    d = stats.domains.index(domain)
    return {i: stats.domain_gate_norm_sum[i][d] for i in stats.layers}


def ranked_candidates(kept: dict[int, list[int]], scores: dict[int, torch.Tensor], num_experts: int
                      ) -> list[tuple[int, int, float]]:
    """Pruned ``(layer, expert, score)``, highest score first (ties: lower layer, then lower expert)."""
    out = [(layer, e, float(scores[layer][e])) for layer, idx in kept.items() for e in range(num_experts)
           if e not in set(idx)]
    return sorted(out, key=lambda c: (-c[2], c[0], c[1]))


def _masks(kept: dict[int, list[int]], e: int) -> dict[int, torch.Tensor]:
    return {i: torch.zeros(e, dtype=torch.bool).index_fill_(0, torch.tensor(k, dtype=torch.long), True)
            for i, k in kept.items() if len(k) < e}


def _loss(model, adapter, kept, data, reference, proxy, batch_size) -> float:
    r = evaluate(model, adapter, _masks(kept, adapter.num_experts), data, proxies=(proxy,), reference=reference,
                 batch_size=batch_size)
    return r.values[proxy]


def reinject(model: torch.nn.Module, adapter: MoEAdapter, kept: dict[int, list[int]], scores: dict[int, torch.Tensor],
             n: int, data: TokenData, *, reference: Reference | None = None, proxy: str = "nll",
             pool: int | None = None, confirm: bool = True, batch_size: int = 8,
             progress: bool = True) -> ReinjectResult:
    """Add back ``n`` pruned experts of ``kept``, ranked by ``scores`` (e.g. :func:`saliency` of a domain) and,
    with ``confirm``, chosen among the ``pool`` best-ranked (default ``3 n``) by the loss on ``data`` (the
    domain's search split) when each is added alone. ``proxy`` ``kl`` needs ``reference`` (of ``data``)."""
    if n < 1:
        raise UsageError(f"re-inject at least one expert, got {n}")
    if adapter.n_group > 1:
        raise UsageError("re-injection adds single experts; group-limited routing (n_group > 1) needs the same count "
                         "in every group")
    e = adapter.num_experts
    candidates = ranked_candidates(kept, scores, e)
    if len(candidates) < n:
        raise UsageError(f"only {len(candidates)} experts are pruned; cannot re-inject {n}")
    before = _loss(model, adapter, kept, data, reference, proxy, batch_size)
    tried: list[dict] = []
    if confirm:
        pool = min(len(candidates), pool or 3 * n)
        for layer, expert, score in tqdm(candidates[:pool], desc="re-inject: confirm", unit="expert",
                                         disable=not progress):
            trial = {**kept, layer: sorted([*kept[layer], expert])}
            value = _loss(model, adapter, trial, data, reference, proxy, batch_size)
            tried.append({"layer": layer, "expert": expert, "saliency": score, "delta": value - before})
        chosen = [t for t in sorted(tried, key=lambda t: (t["delta"], t["layer"], t["expert"])) if t["delta"] < 0][:n]
        if len(chosen) < n:
            log.warning("only %d of the %d best-ranked pruned experts lower the loss on their own; adding those",
                        len(chosen), pool)
        picks = [(t["layer"], t["expert"]) for t in chosen]
    else:
        picks = [(layer, expert) for layer, expert, _ in candidates[:n]]
    added: dict[int, list[int]] = {}
    for layer, expert in picks:
        added.setdefault(layer, []).append(expert)
    new = {layer: sorted([*idx, *added.get(layer, [])]) for layer, idx in kept.items()}
    after = _loss(model, adapter, new, data, reference, proxy, batch_size) if picks else before
    return ReinjectResult(new, {k: sorted(v) for k, v in sorted(added.items())}, before, after, tried)
