"""Held-out evaluation of a pruned model against the unpruned one: per-domain NLL/perplexity, KL, ESAP, top-1
agreement, and greedy generations side by side. Works on a masked allocation and on an exported directory alike."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from evoreap.adapters import MoEAdapter
from evoreap.data import TokenData
from evoreap.masking import masked
from evoreap.proxies import ProxyResult, evaluate
from evoreap.reference import Reference

METRICS = ("nll", "kl", "esap", "top1")  # proxies of evoreap.proxies.registry


@dataclass(frozen=True)
class Candidate:
    """What is evaluated: a resident model with optional router masks (virtual pruning) or a pruned model."""

    name: str
    model: torch.nn.Module
    adapter: MoEAdapter
    masks: dict[int, torch.Tensor] | None = None
    exported: bool = False  # a physically pruned model, not the reference's own model under masks


def score(candidate: Candidate, data: TokenData, reference: Reference, batch_size: int = 8,
          progress: bool = False) -> ProxyResult:
    """All :data:`METRICS` of ``candidate`` on every row of ``data``; ``progress`` shows a bar of scored tokens
    named after the candidate."""
    bar = tqdm(desc=f"score {candidate.name}", unit="tok", unit_scale=True, disable=not progress)

    def advance(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        # A physically pruned model has other weights than the model the reference was built with; comparing it
        # to that reference is the point here, so only the data are checked for it.
        return evaluate(candidate.model, candidate.adapter, candidate.masks, data, proxies=METRICS,
                        reference=reference, batch_size=batch_size, other_model=candidate.exported,
                        progress=advance)
    finally:
        bar.close()


def as_row(result: ProxyResult) -> dict[str, Any]:
    def metrics(v: dict[str, float]) -> dict[str, float]:
        return {**v, "ppl": math.exp(v["nll"])}

    return {"overall": metrics(result.values), "per_domain": {d: metrics(v) for d, v in result.per_domain.items()},
            "tokens": result.tokens}


@torch.inference_mode()
def generate(candidate: Candidate, tokenizer: Any, prompt: str, max_new_tokens: int = 40) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with masked(candidate.model, candidate.adapter, candidate.masks or {}):
        out = candidate.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def prompts_for(data: TokenData, tokenizer: Any, tokens: int = 24) -> dict[str, str]:
    """One prompt per domain: the first ``tokens`` tokens of its first held-out sequence."""
    out = {}
    for d, name in enumerate(data.domains):
        rows = (data.domain_ids == d).nonzero().flatten()
        if len(rows):
            out[name] = tokenizer.decode(data.input_ids[rows[0], :tokens])
    return out
