"""Which engine runs a model: resident (loaded whole, or placed by accelerate with ``--device-map``) or streamed
layer by layer from its shards (``--offload``, or ``--max-memory GB`` without ``--device-map`` when the weights
exceed it). The streamed model is a :class:`~evoreap.observe.sequential.SequentialModel` on the meta device; search
and evaluate score it with :class:`~evoreap.proxies.streamed.StreamedEvaluator` and never hold the whole model."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch

from evoreap.data import TokenData
from evoreap.errors import UsageError
from evoreap.models import LoadedModel, load_config, parse_dtype, resolve_model
from evoreap.observe.sequential import SequentialModel, describe_checkpoint
from evoreap.observe.store import observe_cached

log = logging.getLogger(__name__)

def memory_limit_gb(max_memory: str | float | None, device_map: Any) -> float | None:
    """``--max-memory`` as a plain number of GB when it selects the streamed engine (no ``--device-map``); None when
    it is absent, or a placement for accelerate (``DEVICE=SIZE`` pairs, or any form with ``--device-map``)."""
    if max_memory is None or device_map is not None or isinstance(max_memory, dict):
        return None
    text = str(max_memory).strip().lower()
    if "=" in text or "," in text:  # DEVICE=SIZE pairs: accelerate's placement, as before
        return None
    try:
        gb = float(re.sub(r"\s*(gib|gb|g)$", "", text))
    except ValueError:
        raise UsageError(f"--max-memory {max_memory!r} is not a size; give GB (2 or 2.5GB), or DEVICE=SIZE pairs "
                         "with --device-map") from None
    if not 0 < gb < float("inf"):
        raise UsageError(f"--max-memory must be a positive number of GB, got {max_memory}")
    return gb


def placement_memory(max_memory: str | float | None, device_map: Any) -> str | float | None:
    """What accelerate gets as ``max_memory``: nothing when the number chose between the engines."""
    return None if memory_limit_gb(max_memory, device_map) is not None else max_memory


def weights_bytes(model: str | None, dtype: str = "float32", trust_remote_code: bool = False) -> int:
    """Bytes of the model's parameters and buffers in the compute dtype, from its config alone (a meta model)."""
    from transformers import AutoModelForCausalLM  # lazy: transformers' auto classes take ~1.7 s to import

    config = load_config(resolve_model(model), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype))
    seen: set[int] = set()
    total = 0
    for t in [*meta.parameters(), *meta.buffers()]:
        if id(t) not in seen:  # tied weights count once
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def wants_streaming(model: str | None, *, offload: bool, device_map: Any, max_memory: str | float | None,
                    dtype: str = "float32", trust_remote_code: bool = False) -> bool:
    """``--offload``, or ``--max-memory GB`` (without ``--device-map``) smaller than the weights in ``dtype``."""
    if offload:
        if device_map is not None:
            raise UsageError("--offload streams layers from the shards and --device-map places the model through "
                             "accelerate; give one of them")
        return True
    limit = memory_limit_gb(max_memory, device_map)
    if limit is None:
        return False
    size = weights_bytes(model, dtype, trust_remote_code)
    stream = size > limit * 2**30
    log.info("the model's weights take %.2f GB in %s: %s (--max-memory %g)", size / 2**30, dtype,
             "streamed layer by layer from the shards" if stream else "loaded whole", limit)
    return stream


@dataclass
class Streamed:
    """A model streamed from its shards: the meta-device model, its observation identity and a LoadedModel view
    (``loaded.model`` is on meta: nothing of it may be run whole)."""

    seq: SequentialModel
    info: dict[str, Any]
    loaded: LoadedModel


def open_streamed(model: str | None, *, dtype: str = "float32", device: str = "cpu",
                  trust_remote_code: bool = False, cache_dir: str | None = None) -> Streamed:
    """The checkpoint checked (tokenizer, unused tensors, finite routers) and described without loading a layer."""
    seq, tokenizer, info = describe_checkpoint(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                               cache_dir=cache_dir)
    log.info("streaming %s layer by layer from its shards (%d decoder layers)", info["path"], len(seq.decoder.layers))
    return Streamed(seq, info, LoadedModel(seq.model, tokenizer, info["path"], seq.adapter))


def observe_streamed(streamed: Streamed, data: TokenData, *, cache_dir: str | None = None, batch_size: int = 8,
                     progress: bool = True) -> tuple[str, Any]:
    """The observation of ``data`` through the cache, made layer by layer when missing (the same key as the resident
    model's, so either mode reuses the other's)."""
    seq = streamed.seq

    def runner(initial, lo, hi):
        return seq.observe(data, batch_size=batch_size, initial=initial, start_batch=lo, stop_batch=hi,
                           progress=progress)

    return observe_cached(streamed.loaded, data, cache_dir=cache_dir, batch_size=batch_size, progress=False,
                          checkpoint_every=data.num_batches(batch_size), model_info=streamed.info, runner=runner)
