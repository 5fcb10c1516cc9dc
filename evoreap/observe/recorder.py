"""Recording per-expert statistics during the model's own forward pass.

Mechanism: a custom *experts implementation* registered with transformers' ``ExpertsInterface`` (the fused experts
of every supported family dispatch their forward through it). It receives exactly what the model's MoE block hands
its experts -- the token states, the model's own top-k indices and the gate weights it applies (so sigmoid scoring,
router bias, ``e_score_correction_bias``, group-limited routing, renormalisation and ``routed_scaling_factor`` are all
already in them) -- computes each routed (token, expert) output once, returns the real MoE output and accumulates the
statistics from the same tensors. A forward hook on each router adds the router probability mass.

The gate ``g`` recorded is therefore the weight the model multiplies the expert's output by:

* softmax routers (Qwen2/3-MoE, OLMoE): the softmax probability over all experts, renormalised over the top-k when
  ``norm_topk_prob`` (always for Mixtral);
* sigmoid routers (DeepSeek-V3, GLM-4.5): the expert's sigmoid score without the correction bias (the bias only steers
  the choice), renormalised when ``norm_topk_prob``, times ``routed_scaling_factor``;
* GPT-OSS: the softmax over the k chosen logits (router bias included).

This is REAP's ``g_j(x)`` as the model really applies it; upstream REAP instead uses a softmax over the raw logits for
every router kind, which is not what sigmoid or biased routers compute.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from evoreap.adapters import MoEAdapter, MoELayer
from evoreap.adapters.routing import expert_forward
from evoreap.errors import EvoreapError
from evoreap.observe.stats import FIELDS, ExpertStats

log = logging.getLogger(__name__)

IMPLEMENTATION = "evoreap_observe"

# id(experts module) -> (recorder, layer) for the modules being observed right now.
_ACTIVE: dict[int, tuple[Recorder, MoELayer]] = {}


class Recorder:
    """float64 accumulators for a set of MoE layers, fed one batch at a time.

    Call :meth:`begin_batch` with the batch's attention mask (and domain ids) before each forward: padding tokens
    (mask 0) are routed and computed like any other (the model's output must not change) but never counted.
    """

    def __init__(self, adapter: MoEAdapter, layers: list[MoELayer], domains: tuple[str, ...] = (),
                 initial: ExpertStats | None = None, device: torch.device | str | None = None):
        self.adapter = adapter
        self.domains = tuple(domains)
        self.num_domains = max(1, len(self.domains))
        start = initial if initial is not None else ExpertStats.zeros(
            {layer.index: layer.num_experts for layer in layers}, self.domains)
        if initial is not None and (set(initial.layers) != {layer.index for layer in layers}
                                    or initial.domains != self.domains):
            raise ValueError("initial statistics do not match the observed layers or domains")
        # Accumulate on each layer's device (or `device`); copies so that `initial` is never modified.
        def where(layer: MoELayer) -> torch.device:
            if device is not None:
                return torch.device(device)
            at = layer.experts.down_proj.device
            if at.type == "meta":  # offloaded by accelerate (a device map): where its hook runs the layer
                hook = getattr(layer.experts, "_hf_hook", None)
                at = torch.device(getattr(hook, "execution_device", None) or "cpu")
            return at

        self.acc = {f: {layer.index: getattr(start, f)[layer.index].to(where(layer), copy=True)
                        for layer in layers} for f in FIELDS}
        self.tokens = start.tokens
        self.domain_tokens = list(start.domain_tokens) or [0] * len(self.domains)
        self._mask: torch.Tensor | None = None
        self._domain: torch.Tensor | None = None

    # -- per batch ------------------------------------------------------------------------------------------------
    def begin_batch(self, attention_mask: torch.Tensor, domain_ids: torch.Tensor | None = None,
                    count_tokens: bool = True) -> None:
        """Set the token mask ``[B, L]`` (and per-sequence domains ``[B]``) of the next forward; ``count_tokens``
        False when the same batch passes again through other layers (sequential mode)."""
        mask = attention_mask.reshape(attention_mask.shape[0], -1).bool()
        dom = (torch.zeros(mask.shape[0], dtype=torch.long) if domain_ids is None else domain_ids.long())
        self._mask = mask.reshape(-1)
        self._domain = dom.to(mask.device)[:, None].expand_as(mask).reshape(-1)
        if not count_tokens:
            return
        self.tokens += int(self._mask.sum())
        if self.domains:
            per = torch.bincount(dom.cpu(), weights=mask.sum(1).double().cpu(), minlength=len(self.domains))
            self.domain_tokens = [a + int(b) for a, b in zip(self.domain_tokens, per.tolist())]

    def _token_mask(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._mask is None:
            raise EvoreapError("internal: the observer got a forward pass without begin_batch()")
        if self._mask.numel() != n:
            raise EvoreapError(f"the MoE block saw {n} tokens but the batch has {self._mask.numel()}; observation "
                               "needs one full forward per batch (no generation cache)")
        return self._mask.to(device), self._domain.to(device)

    # -- called from the router hook and the experts implementation --------------------------------------------------
    def record_router(self, layer: MoELayer, logits: torch.Tensor) -> None:
        """Add the router probability mass of the batch's non-padding tokens (see ExpertStats for the choice)."""
        logits = logits.reshape(-1, logits.shape[-1])
        mask, _ = self._token_mask(logits.shape[0], logits.device)
        kind = self.adapter.spec.router_kind
        probs = logits.float().sigmoid() if kind == "sigmoid_group" else F.softmax(logits.float(), dim=-1)
        self.acc["prob_mass"][layer.index] += probs[mask].double().sum(0).to(self.acc["prob_mass"][layer.index].device)

    def experts_forward(self, layer: MoELayer, experts: torch.nn.Module, hidden: torch.Tensor,
                        top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """The experts' output for ``hidden [T, H]`` (as the stock implementation computes it), recording stats."""
        t, k = top_k_index.shape
        e = layer.num_experts
        mask, dom = self._token_mask(t, hidden.device)
        ids = top_k_index.reshape(-1)
        weights = top_k_weights.reshape(-1)
        order = torch.argsort(ids, stable=True)  # pair positions grouped by expert
        per_expert = torch.bincount(ids, minlength=e + 1).tolist()  # index e: expert-parallel sentinel, skipped
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)  # bf16/fp16 models: sum the k slots in fp32
        out = torch.zeros(t * k, hidden.shape[-1], dtype=acc_dtype, device=hidden.device)
        norms = torch.zeros(t * k, dtype=torch.float64, device=hidden.device)
        start = 0
        for j, n in enumerate(per_expert[:e]):
            if n:
                pos = order[start:start + n]
                y = expert_forward(experts, j, hidden[pos // k])
                norms[pos] = torch.linalg.vector_norm(y.float(), dim=-1).double()
                out[pos] = y.to(acc_dtype) * weights[pos, None].to(acc_dtype)
            start += n
        # Statistics over real (non-padding) routed pairs.
        keep = mask[torch.arange(t, device=hidden.device).repeat_interleave(k)] & (ids < e)
        eid, g, nrm = ids[keep], weights[keep].double(), norms[keep]
        a = self.acc
        i = layer.index
        a["count"][i].index_add_(0, eid, torch.ones_like(g))
        a["gate_sum"][i].index_add_(0, eid, g)
        a["norm_sum"][i].index_add_(0, eid, nrm)
        a["gate_norm_sum"][i].index_add_(0, eid, g * nrm)
        a["max_norm"][i].scatter_reduce_(0, eid, nrm, reduce="amax", include_self=True)
        tok_dom = dom.repeat_interleave(k)[keep]
        a["domain_count"][i].view(-1).index_add_(0, tok_dom * e + eid, torch.ones_like(g))
        a["domain_gate_norm_sum"][i].view(-1).index_add_(0, tok_dom * e + eid, g * nrm)
        # Same reduction as the stock grouped implementation: sum over the k slots of each token.
        return out.view(t, k, -1).sum(dim=1).to(hidden.dtype)

    def result(self) -> ExpertStats:
        cpu = {f: {i: v.detach().cpu() for i, v in d.items()} for f, d in self.acc.items()}
        return ExpertStats(**cpu, domains=self.domains, tokens=self.tokens, domain_tokens=tuple(self.domain_tokens))


def _experts_implementation(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    entry = _ACTIVE.get(id(self))
    if entry is None:  # a module not under observation: behave exactly like the stock default
        from transformers.integrations.moe import grouped_mm_experts_forward  # lazy: ~2.7 s to import

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    recorder, layer = entry
    return recorder.experts_forward(layer, self, hidden_states, top_k_index, top_k_weights)


def _register_implementation() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # lazy: ~2.7 s to import, only when observing

    if ALL_EXPERTS_FUNCTIONS.get(IMPLEMENTATION) is not _experts_implementation:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _experts_implementation)


def _set_implementation(model: torch.nn.Module, name: str) -> None:
    setter = getattr(model, "set_experts_implementation", None)
    if callable(setter):
        setter(name)
    if model.config._experts_implementation != name:  # e.g. a bare module tree: set the dispatch attribute itself
        model.config._experts_implementation_internal = name


@contextmanager
def recording(model: torch.nn.Module, recorder: Recorder, layers: list[MoELayer]) -> Iterator[Recorder]:
    """Route ``layers``' experts through the recorder for the duration of the block.

    On exit (also on an exception) the router hooks are removed and the model's previous experts implementation is
    restored, so the model is exactly as before.
    """
    _register_implementation()
    previous = model.config._experts_implementation
    handles = []
    busy = [layer.index for layer in layers if id(layer.experts) in _ACTIVE]
    if busy:
        raise EvoreapError(f"layers {busy} are already being observed; observations cannot be nested")
    try:
        for layer in layers:
            _ACTIVE[id(layer.experts)] = (recorder, layer)
            handles.append(layer.router.register_forward_hook(
                lambda module, args, output, layer=layer: recorder.record_router(layer, output[0])))
        _set_implementation(model, IMPLEMENTATION)
        yield recorder
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            _ACTIVE.pop(id(layer.experts), None)
        _set_implementation(model, previous)


def input_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def observe(model: torch.nn.Module, adapter: MoEAdapter, data, *, batch_size: int = 8, progress: bool = True,
            initial: ExpertStats | None = None, start_batch: int = 0, stop_batch: int | None = None) -> ExpertStats:
    """Run ``data`` (a :class:`~evoreap.data.TokenData`) through ``model`` and return the routing statistics.

    One forward pass per batch of ``batch_size`` sequences; padding tokens never count. ``initial``, ``start_batch``
    and ``stop_batch`` continue an earlier partial observation (batches ``[start_batch, stop_batch)`` are added to
    ``initial``'s sums in the same order an uninterrupted run adds them, so the result is bit-identical).
    """
    if batch_size <= 0:
        raise EvoreapError(f"batch size must be positive, got {batch_size}")
    layers = adapter.layers(model)
    recorder = Recorder(adapter, layers, data.domains, initial=initial)
    n_batches = data.num_batches(batch_size)
    stop = n_batches if stop_batch is None else min(stop_batch, n_batches)
    device = input_device(model)
    decoder = model.get_decoder()  # the LM head is not needed: skip its [B, L, vocab] logits
    with torch.inference_mode(), recording(model, recorder, layers):
        for ids, mask, dom in tqdm(data.batches(batch_size, start_batch, stop), total=max(0, stop - start_batch),
                                   disable=not progress, desc="observe", unit="batch"):
            recorder.begin_batch(mask, dom)
            decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return recorder.result()
