"""Scoring a candidate: one masked forward pass per batch, every requested proxy from the same log-probs.

Fidelity control for racing: :func:`token_order` is a fixed, seeded, domain-stratified permutation of the rows;
``evaluate(..., order=order, n_tokens=n)`` scores the shortest prefix of it that covers ``n`` scored tokens, so a
larger ``n`` with the same order scores a superset (paired comparisons across stages). Fresh minibatches are a
different seed's order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from evoreap.adapters import MoEAdapter
from evoreap.data import TokenData
from evoreap.errors import UsageError
from evoreap.masking import masked
from evoreap.proxies.registry import Proxy, ProxyInputs, get_proxy
from evoreap.reference import Reference, next_token_logits, scored_positions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProxyResult:
    """Proxy values of one candidate.

    Attributes:
        values: proxy -> token-weighted mean over all scored tokens.
        per_domain: domain -> {proxy -> mean over that domain's scored tokens} (domains with no scored token in
            the evaluated rows are absent).
        tokens: scored tokens (positions whose token and next token are both real).
        domain_tokens: domain -> scored tokens.
    """

    values: dict[str, float]
    per_domain: dict[str, dict[str, float]]
    tokens: int
    domain_tokens: dict[str, int] = field(default_factory=dict)


def token_order(data: TokenData, seed: int = 0) -> torch.Tensor:
    """A seeded permutation of row indices, stratified by domain: every prefix holds each domain in about its share
    of the rows, so a small token budget still sees all domains."""
    g = torch.Generator().manual_seed(seed)
    n = len(data)
    perm = torch.randperm(n, generator=g)
    jitter = torch.rand(n, generator=g, dtype=torch.float64)
    key = torch.empty(n, dtype=torch.float64)
    domain_of = data.domain_ids[perm]
    for d in domain_of.unique():
        rows = perm[domain_of == d]  # this domain's rows in shuffled order
        key[rows] = (torch.arange(len(rows), dtype=torch.float64) + jitter[rows]) / len(rows)
    return torch.argsort(key, stable=True)


def select_sequences(data: TokenData, order: torch.Tensor | None = None, n_tokens: int | None = None
                     ) -> torch.Tensor:
    """Rows to score: the shortest prefix of ``order`` (default: row order) with at least ``n_tokens`` scored
    tokens, or all of it."""
    order = torch.arange(len(data)) if order is None else torch.as_tensor(order, dtype=torch.long)
    if order.numel() and (order.min() < 0 or order.max() >= len(data)):
        raise UsageError(f"token order holds row indices outside 0..{len(data) - 1}; was it made for other data?")
    if n_tokens is None:
        return order
    if n_tokens <= 0:
        raise UsageError(f"n_tokens must be positive, got {n_tokens}")
    cum = scored_positions(data.attention_mask)[order].sum(dim=1).cumsum(0)
    if cum.numel() == 0 or int(cum[-1]) < n_tokens:
        log.warning("asked for %d tokens but the data has only %d scored tokens; using all of it", n_tokens,
                    int(cum[-1]) if cum.numel() else 0)
        return order
    return order[: int(torch.searchsorted(cum, n_tokens)) + 1]


def check_inputs(model: torch.nn.Module, data: TokenData, proxies: Sequence[str] | str,
                 reference: Reference | None, batch_size: int, other_model: bool = False) -> list[Proxy]:
    """The requested proxies' specs, after checking the batch size and that a reference made from this model and
    these data is there when a proxy needs one."""
    if isinstance(proxies, str):
        proxies = (proxies,)
    specs = [get_proxy(name) for name in dict.fromkeys(proxies)]
    if not specs:
        raise UsageError("no proxy requested; name at least one of nll, kl, esap")
    if batch_size <= 0:
        raise UsageError(f"batch size must be positive, got {batch_size}")
    needs_ref = [s.name for s in specs if s.needs_reference]
    if needs_ref:
        if reference is None:
            raise UsageError(f"proxy {', '.join(needs_ref)} compares against the unpruned model and needs its "
                             "reference distributions: pass reference=reference_cached(model, data, top_k=...)")
        reference.check(model=None if other_model else model, data=data)
    return specs


class Tally:
    """Per-domain sums of every proxy over the scored positions of the batches added so far."""

    def __init__(self, specs: Sequence[Proxy], data: TokenData, reference: Reference | None):
        self.specs, self.data, self.reference = list(specs), data, reference
        self.needs_ref = any(s.needs_reference for s in self.specs)
        self.sums = {s.name: torch.zeros(len(data.domains), dtype=torch.float64) for s in self.specs}
        self.counts = torch.zeros(len(data.domains), dtype=torch.float64)

    def add(self, index: torch.Tensor, chunks: Iterator[tuple[int, int, torch.Tensor]]) -> None:
        """Add the rows ``index`` of the data, whose logits ``chunks`` yields (see ``next_token_logits``)."""
        data = self.data
        ids, mask, domains = data.input_ids[index], data.attention_mask[index], data.domain_ids[index]
        values: dict[str, torch.Tensor] = {}
        valid_all = targets_all = ref_all = None
        for s, e, logits in chunks:
            if valid_all is None:  # on the device of the logits (a device-mapped model's last layer)
                device = logits.device
                valid_all = scored_positions(mask).to(device)
                targets_all = ids[:, 1:].to(device, torch.long)
                ref_all = self.reference.rows(index, device) if self.needs_ref else None
                values = {spec.name: torch.zeros(valid_all.shape, dtype=torch.float64, device=device)
                          for spec in self.specs}
            chunk = ProxyInputs(logits, targets_all[:, s:e], valid_all[:, s:e],
                                {k: v[:, s:e] for k, v in ref_all.items()} if ref_all is not None else None)
            for spec in self.specs:
                values[spec.name][:, s:e] = spec.fn(chunk)
        if valid_all is None:
            return
        # summed once per batch: the chunks are small (a few positions) so that their vocabulary passes stay in cache
        self.counts.index_add_(0, domains, valid_all.sum(1).double().cpu())
        for name, v in values.items():
            per_row = torch.where(valid_all, v, torch.zeros_like(v)).sum(1)
            self.sums[name].index_add_(0, domains, per_row.cpu())

    def result(self) -> ProxyResult:
        counts, domains = self.counts, self.data.domains
        total = int(counts.sum())
        if total == 0:
            raise UsageError("the selected rows hold no scored token (every row is padding or a single token)")
        values = {name: float(v.sum() / counts.sum()) for name, v in self.sums.items()}
        per_domain = {domains[d]: {name: float(v[d] / counts[d]) for name, v in self.sums.items()}
                      for d in range(len(domains)) if counts[d] > 0}
        domain_tokens = {domains[d]: int(counts[d]) for d in range(len(domains)) if counts[d] > 0}
        return ProxyResult(values, per_domain, total, domain_tokens)


def evaluate(model: torch.nn.Module, adapter: MoEAdapter, masks: dict[int, torch.Tensor] | None, data: TokenData,
             *, proxies: Sequence[str] = ("kl",), reference: Reference | None = None,
             order: torch.Tensor | None = None, n_tokens: int | None = None, batch_size: int = 8,
             progress: bool | Callable[[int, int], None] = False, other_model: bool = False) -> ProxyResult:
    """Score the model with only ``masks``' experts reachable (None: unpruned) on the rows chosen by ``order`` and
    ``n_tokens``; every proxy in ``proxies`` comes from the same forward pass.

    ``reference`` must come from :func:`evoreap.reference.build_reference` on this model and these ``data``
    (checked) when a proxy needs one (kl, esap). ``other_model=True`` says that ``model`` is deliberately not the
    reference's (a physically pruned copy compared with its unpruned source): only the data are then checked.
    ``progress``: True shows a bar of scored tokens; a callable is called with ``(tokens done, tokens in all)``
    after every batch.
    """
    specs = check_inputs(model, data, proxies, reference, batch_size, other_model)
    rows = select_sequences(data, order, n_tokens)
    tally = Tally(specs, data, reference)
    report = token_progress(data, rows, progress, "score")
    with torch.inference_mode(), masked(model, adapter, masks or {}):
        for start in range(0, len(rows), batch_size):
            index = rows[start:start + batch_size]
            tally.add(index, next_token_logits(model, data.input_ids[index], data.attention_mask[index]))
            report(index)
    report(None)
    return tally.result()


def token_progress(data: TokenData, rows: torch.Tensor, progress: bool | Callable[[int, int], None], desc: str
                   ) -> Callable[[torch.Tensor | None], None]:
    """A function to call with each scored batch's rows (None at the end) that reports scored tokens: through a
    tqdm bar (``progress=True``), a callback ``(done, total)``, or not at all."""
    per_row = scored_positions(data.attention_mask).sum(1)
    total = int(per_row[rows].sum())
    done = 0
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, leave=False) if progress is True else None

    def report(index: torch.Tensor | None) -> None:
        nonlocal done
        if index is None:
            if bar is not None:
                bar.close()
            return
        n = int(per_row[index].sum())
        done += n
        if bar is not None:
            bar.update(n)
        elif callable(progress):
            progress(done, total)

    return report
