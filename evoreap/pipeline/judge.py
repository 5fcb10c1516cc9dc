"""Evaluate a pruned model (a masked allocation or an exported directory) against the unpruned one on held-out text.

The contamination guard runs first: an allocation fitted to some data (its ``meta.calibration_data`` and
``meta.search_data``) is not judged on the same documents unless overlap is allowed.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evoreap.allocation import Allocation, meta_text, read_json
from evoreap.data import load_tokens
from evoreap.data.guard import check_overlap
from evoreap.data.loader import check_data, check_seq_len
from evoreap.errors import UsageError
from evoreap.harness import check_chat_template, harness_run  # imports lm_eval only when it runs
from evoreap.evaluation import METRICS, Candidate, as_row, generate, prompts_for, score
from evoreap.masking import masked
from evoreap.models import LoadedModel, load_config, load_model, load_tokenizer
from evoreap.pipeline.choose import choose_experts
from evoreap.pipeline.streaming import open_streamed, placement_memory, wants_streaming
from evoreap.proxies.streamed import StreamedEvaluator, streamed_reference_cached
from evoreap.observe.store import load_observation
from evoreap.recovery.store import Repair, applied
from evoreap.recovery.streamed_repair import applied_streamed, check_streamed
from evoreap.reference import reference_cached

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationResult:
    """Held-out metrics (``results[name]["overall" | "per_domain"]``: nll, ppl, kl, esap, top1) of the unpruned
    and the pruned model, greedy generations per domain, and lm-eval results when asked for."""

    model: str
    data: str
    tokens: int
    results: dict[str, Any]
    generations: dict[str, Any] = field(default_factory=dict)
    lm_eval: dict[str, Any] | None = None
    lm_eval_output: dict[str, Any] | None = field(default=None, repr=False)  # lm-eval's own document per model

    def as_dict(self) -> dict[str, Any]:
        out = {"model": self.model, "data": self.data, "tokens": self.tokens, "results": self.results,
               "generations": self.generations}
        if self.lm_eval is not None:
            out["lm_eval"] = self.lm_eval
        return out


def pruning_meta(allocation: Allocation | None, pruned: str | Path | None) -> tuple[dict[str, Any], str]:
    """The meta that names the model and the data the pruning was fitted to, and where it was read."""
    if allocation is not None:
        return allocation.meta, allocation.source or "allocation"
    info = Path(pruned) / "evoreap.json"
    if not info.is_file():
        raise UsageError(f"{pruned} has no evoreap.json; pass a directory written by evoreap export")
    record = read_json(info, "export record")
    meta = record.get("meta", record) if isinstance(record, dict) else None
    if not isinstance(meta, dict):
        raise UsageError(f"export record {info} is not a JSON object; export the model again")
    return meta, f"export record {info}"


def evaluate_pruned(model: str | LoadedModel | None, *, allocation: Allocation | None = None,
                    pruned: str | Path | None = None, data: Any = "demo", tokens: int = 32768, seq_len: int = 256,
                    batch_size: int = 8, reference_top_k: int = 64, criterion: str | None = None,
                    observation: str | None = None, cache_dir: str | None = None, generate_tokens: int = 0,
                    allow_overlap: bool = False, dtype: str = "float32", device: str = "cpu", seed: int = 0,
                    trust_remote_code: bool = False, harness: Any = None,
                    chat_template: str | Path | None = None, repair: Repair | None = None,
                    device_map: str | dict | None = None, max_memory: str | float | dict | None = None,
                    offload: bool = False) -> EvaluationResult:
    """Score the unpruned model and the pruned one (``allocation`` under router masks, or the export in ``pruned``)
    on ``data`` (split ``heldout``). ``harness`` is ``(settings, task manager)`` from :mod:`evoreap.harness`;
    ``chat_template`` a Jinja template file for chat records. The data, the observation and the model's config
    are checked before any weight is read. ``offload`` (or ``max_memory`` as a plain number of GB, without
    ``device_map``, below the weights' size) streams the model layer by layer from its shards instead of loading it
    (no generations nor lm-eval then: they need the whole model)."""
    if (allocation is None) == (pruned is None):
        raise UsageError("evaluate one pruned model: give an allocation or an exported directory, not both")
    meta, where = pruning_meta(allocation, pruned)
    fitted = {role: (meta_text(meta, key, where), split) for role, key, split in
              (("calibration", "calibration_data", "calibration"), ("search", "search_data", "search"))
              if meta_text(meta, key, where)}
    if fitted:
        check_overlap({**fitted, "evaluation": (data, "heldout")}, allow=allow_overlap)
        if harness and harness[0].uses_demo_tasks:
            check_overlap({**fitted, "lm-eval demo task": ("demo", "heldout")}, allow=allow_overlap)
    if observation is not None:  # a wrong key fails before the model is loaded
        load_observation(observation, cache_dir=cache_dir)
    if not isinstance(model, LoadedModel):
        model = model or meta_text(meta, "model", where)
        check_seq_len(seq_len, load_config(model, trust_remote_code=trust_remote_code))  # before any weight
        name = model
        check_data(data, "heldout", chat_template=chat_template,
                   tokenizer=lambda: load_tokenizer(name, trust_remote_code=trust_remote_code))
        if harness:  # --apply-chat-template on a tokenizer without a template: refused before any weight is read
            check_chat_template(harness[0], lambda: load_tokenizer(name, trust_remote_code=trust_remote_code))
        if wants_streaming(model, offload=offload, device_map=device_map, max_memory=max_memory, dtype=dtype,
                           trust_remote_code=trust_remote_code):
            return _evaluate_streamed(model, allocation=allocation, pruned=pruned, data=data, tokens=tokens,
                                      seq_len=seq_len, batch_size=batch_size, reference_top_k=reference_top_k,
                                      criterion=criterion, observation=observation, cache_dir=cache_dir,
                                      generate_tokens=generate_tokens, dtype=dtype, device=device, seed=seed,
                                      trust_remote_code=trust_remote_code, harness=harness,
                                      chat_template=chat_template, repair=repair)
        model = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                           device_map=device_map, max_memory=placement_memory(max_memory, device_map))
    loaded = model
    if harness:  # a model loaded by the caller: still refused before any scoring
        check_chat_template(harness[0], lambda: loaded.tokenizer)
    if allocation is not None:  # a bad allocation fails before any reference is computed and cached
        chosen = choose_experts(allocation, loaded.adapter, loaded, criterion=criterion, observation=observation,
                                cache_dir=cache_dir)
        masks = _masks(loaded, chosen.kept)
        if repair is not None:  # refused before any reference is built if fitted to other experts or weights
            repair.check(loaded.model, chosen.kept)
        # a repaired candidate computes with other weights than the reference's model: exported=True checks data only
        cand = Candidate("pruned (masked, repaired)" if repair is not None else "pruned (masked)", loaded.model,
                         loaded.adapter, masks, exported=repair is not None)
    else:
        other = load_model(str(pruned), dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                           device_map=device_map, max_memory=placement_memory(max_memory, device_map))
        cand = Candidate("pruned (exported)", other.model, other.adapter, exported=True)
    tok = loaded.tokenizer
    held = load_tokens(data, tok, split="heldout", seq_len=seq_len, tokens=tokens, seed=seed,
                       model_config=loaded.adapter.config, chat_template=chat_template)
    reference = reference_cached(loaded.model, held, top_k=reference_top_k, cache_dir=cache_dir,
                                 batch_size=batch_size)
    full = Candidate("unpruned", loaded.model, loaded.adapter)

    def under(c: Candidate):  # the repaired parameters, for the masked pruned candidate only
        return applied(loaded.model, repair, check=False) if c is cand and repair is not None else nullcontext()

    rows = {}
    for c in (full, cand):
        with under(c):
            rows[c.name] = as_row(score(c, held, reference, batch_size, progress=True))
    gens = {}
    if generate_tokens > 0:
        for domain, prompt in prompts_for(held, tok).items():
            gens[domain] = {"prompt": prompt}
            for c in (full, cand):
                with under(c):
                    gens[domain][c.name] = generate(c, tok, prompt, generate_tokens)
    runs = _lm_eval((full, cand), tok, *harness, under=under) if harness else None
    lm = {name: r.metrics for name, r in runs.items()} if runs else None
    output = {name: r.output for name, r in runs.items()} if runs else None
    spec = data if isinstance(data, str) else "dataset"
    return EvaluationResult(str(loaded.path), spec, held.num_tokens, rows, gens, lm, output)


def _evaluate_streamed(model: str, *, allocation: Allocation | None, pruned: str | Path | None, data: Any,
                       tokens: int, seq_len: int, batch_size: int, reference_top_k: int, criterion: str | None,
                       observation: str | None, cache_dir: str | None, generate_tokens: int, dtype: str, device: str,
                       seed: int, trust_remote_code: bool, harness: Any, chat_template: str | Path | None,
                       repair: Repair | None) -> EvaluationResult:
    """:func:`evaluate_pruned` with the model streamed from its shards: the unpruned and the pruned model scored in
    one layer-by-layer pass (a masked allocation), or each from its own shards (an export)."""
    if harness:
        raise UsageError("--lm-eval runs the whole model, which is streamed here (--offload / --max-memory); drop "
                         "one of them")
    if generate_tokens > 0:
        log.info("no generations: they need the whole model, which is streamed here")
    streamed = open_streamed(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                             cache_dir=cache_dir)
    loaded = streamed.loaded
    held = load_tokens(data, loaded.tokenizer, split="heldout", seq_len=seq_len, tokens=tokens, seed=seed,
                       model_config=loaded.adapter.config, chat_template=chat_template)
    if allocation is not None:
        chosen = choose_experts(allocation, loaded.adapter, str(loaded.path), criterion=criterion,
                                observation=observation, cache_dir=cache_dir, dtype=dtype, device=device,
                                trust_remote_code=trust_remote_code)
        if repair is not None:  # refused before any reference is built if fitted to other experts or weights
            check_streamed(repair, streamed.seq, chosen.kept, cache_dir)
    reference = streamed_reference_cached(streamed.seq, held, top_k=reference_top_k, cache_dir=cache_dir,
                                          batch_size=batch_size)
    ev = StreamedEvaluator(streamed.seq, held, reference=reference, batch_size=batch_size, cache_dir=cache_dir)
    if allocation is not None and repair is not None:
        # the repaired values go into every layer read, so the pruned candidate gets a pass of its own
        name = "pruned (masked, repaired)"
        (full,) = ev.score([None], proxies=METRICS)
        with applied_streamed(streamed.seq, repair):
            (cand,) = StreamedEvaluator(streamed.seq, held, reference=reference, batch_size=batch_size,
                                        other_model=True).score([_masks(loaded, chosen.kept)], proxies=METRICS)
    elif allocation is not None:
        name = "pruned (masked)"
        full, cand = ev.score([None, _masks(loaded, chosen.kept)], proxies=METRICS)
    else:
        name = "pruned (exported)"
        (full,) = ev.score([None], proxies=METRICS)
        other = open_streamed(str(pruned), dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                              cache_dir=cache_dir)
        (cand,) = StreamedEvaluator(other.seq, held, reference=reference, batch_size=batch_size,
                                    other_model=True).score([None], proxies=METRICS)
    rows = {"unpruned": as_row(full), name: as_row(cand)}
    spec = data if isinstance(data, str) else "dataset"
    return EvaluationResult(str(loaded.path), spec, held.num_tokens, rows)


def _masks(loaded: LoadedModel, kept: dict[int, list[int]]) -> dict[int, torch.Tensor]:
    e = loaded.adapter.num_experts
    return {layer: torch.zeros(e, dtype=torch.bool).index_fill_(0, torch.tensor(idx, dtype=torch.long), True)
            for layer, idx in kept.items() if len(idx) < e}


def _lm_eval(candidates, tokenizer, settings, manager, under=lambda c: nullcontext()) -> dict:
    """lm-eval metrics per task, for each candidate (a masked one under its masks, and ``under(candidate)``)."""
    results = {}
    for cand in candidates:
        log.info("lm-eval %s on %s", ",".join(settings.tasks), cand.name)
        with under(cand), masked(cand.model, cand.adapter, cand.masks or {}):
            results[cand.name] = harness_run(cand.model, tokenizer, settings, manager)
    return results
