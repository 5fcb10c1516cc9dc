"""Model preflight: checks that a model can be observed meaningfully, run before any observing or scoring starts.

Each check raises one :class:`~evoreap.errors.EvoreapError` (exit 1) that says what is wrong and what to do:

* top-k (``num_experts_per_tok``) is a whole number in ``1..num_experts``: checked by
  :class:`~evoreap.adapters.MoEAdapter` itself (:func:`evoreap.adapters.adapter.check_top_k`), before any weight
  is read;
* :func:`check_tokenizer` -- the tokenizer is real: transformers returns an almost empty tokenizer (one token) when
  the tokenizer files are missing, and the model would then be observed on end-of-text tokens only;
* :func:`check_unused` -- every stored tensor is used (or ignored by transformers' own rules): a config that declares
  fewer layers than the weights hold would otherwise silently observe and prune a truncated model;
* :func:`check_finite` -- weights (routers and experts included) hold no NaN or inf.

:func:`evoreap.models.load_model` checks the tokenizer before reading weights and the rest on the loaded model
(:func:`check_loaded`); the offloaded observation (:mod:`evoreap.observe.sequential`) checks the tokenizer, unused
tensors and routers before observing, and each layer's weights as it reads them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from evoreap.checkpoint.layout import is_fused_experts
from evoreap.errors import EvoreapError

# A real tokenizer has at least this many tokens, and at least this share of the model's vocabulary (embeddings are
# often padded beyond the tokenizer, e.g. Qwen3: 151,669 tokens for vocab_size 151,936, but never by 100x).
MIN_TOKENS = 16
MIN_VOCAB_SHARE = 0.01
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. def main(): return 42"


def check_tokenizer(tokenizer: Any, vocab_size: int | None, path: str) -> None:
    """Refuse a missing or broken tokenizer: fewer than :data:`MIN_TOKENS` tokens or than :data:`MIN_VOCAB_SHARE`
    of ``vocab_size``, a plain sentence that encodes to nothing but special or unknown tokens, or ids beyond the
    model's embeddings."""
    fix = ("check that the model directory has its tokenizer files (tokenizer.json, tokenizer_config.json, ...) "
           "and copy them from the original model if not")
    n = len(tokenizer)
    floor = max(MIN_TOKENS, int(MIN_VOCAB_SHARE * vocab_size) if vocab_size else 0)
    if n < floor:
        raise EvoreapError(f"the tokenizer of {path} has only {n} tokens for a model vocabulary of {vocab_size}; "
                           f"{fix}")
    ids = list(tokenizer.encode(PROBE_TEXT, add_special_tokens=False))
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None:
        special.add(unk)
    if not [i for i in ids if i not in special]:
        raise EvoreapError(f"the tokenizer of {path} encodes plain text to no ordinary tokens (only special or "
                           f"unknown ones: {ids[:8]}); {fix}")
    if vocab_size and max(ids) >= vocab_size:
        raise EvoreapError(f"the tokenizer of {path} gives token id {max(ids)}, beyond the model's {vocab_size} "
                           "embeddings; the tokenizer belongs to another model: use the model's own tokenizer files")


def check_unused(unused: Iterable[str], path: str, config: Any) -> None:
    """Refuse stored tensors the model does not use (after transformers' own ignore rules)."""
    unused = sorted(unused)
    if unused:
        layers = getattr(config, "num_hidden_layers", None)
        raise EvoreapError(f"{len(unused)} tensor(s) of the checkpoint {path} are not used by the model its "
                           f"config.json describes (num_hidden_layers={layers}), e.g. {unused[0]}; fix config.json "
                           "or the checkpoint so that they match")


def _finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or inf. Fast path: a NaN or inf makes the (float32-accumulated) sum non-finite, and
    one pass of summing costs a fraction of ``isfinite(t).all()`` (which writes a bool per element); only a
    non-finite sum, which finite values can also give by overflowing, is confirmed element by element."""
    try:
        total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    except (RuntimeError, TypeError):  # dtypes without a sum kernel (float8): element by element
        return bool(torch.isfinite(t.float()).all())
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], path: str) -> None:
    """Refuse a floating-point weight holding NaN or inf (one reduction per tensor, no copy of the weights)."""
    for name, t in tensors:
        if t.is_floating_point() and not _finite(t):
            where = ""
            if is_fused_experts(name, t.dim()):  # name the expert (dim 0)
                where = f" (expert {int((~torch.isfinite(t)).flatten(1).any(1).nonzero()[0])})"
            raise EvoreapError(f"weight {name}{where} of {path} is not finite (it holds NaN or inf values); the "
                               "checkpoint is corrupt: re-download or repair it")


def weights(model: torch.nn.Module, adapter: Any) -> list[tuple[str, torch.Tensor]]:
    """Every parameter of ``model`` plus the buffers of its routers and experts (e.g. DeepSeek-V3's
    ``e_score_correction_bias``), under their model names; other buffers (masks, rotary tables) are not weights."""
    out = list(model.named_parameters())
    names = {id(t): n for n, t in model.named_buffers()}
    for layer in adapter.layers(model):
        for module in (layer.router, layer.experts):
            out += [(names.get(id(t), f"layers.{layer.index}"), t) for t in module.buffers()]
    return out


def check_loaded(model: torch.nn.Module, adapter: Any, loading_info: dict, path: str) -> None:
    """The weights preflight of a model loaded with ``output_loading_info=True``: no stored tensor left unused
    (transformers' ``unexpected_keys``, already filtered by its ignore rules) and finite weights (routers, experts
    and every other parameter: one fast reduction each, a few percent of the load time)."""
    check_unused(loading_info.get("unexpected_keys") or (), path, adapter.config)
    with torch.no_grad():
        check_finite(weights(model, adapter), path)
