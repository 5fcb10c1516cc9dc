"""Sequential (layer-by-layer) observation for models larger than memory (``evoreap observe --offload``).

The model is built on the meta device (no memory). For a chunk of calibration batches:

1. the embeddings (and final norm, rotary tables) are materialised and every decoder layer is replaced by a stub
   that records the arguments the decoder hands it (attention mask of its type, rotary embeddings, positions), so
   one cheap decoder pass per batch yields layer 0's input and each layer's own arguments;
2. each decoder layer in turn is read from the safetensors shards (evoreap's one checkpoint reader,
   :class:`~evoreap.checkpoint.CheckpointIndex`: validated headers, plain reads; the checkpoint names come from the
   key layout, :class:`~evoreap.checkpoint.KeyLayout`, and per-expert checkpoint tensors such as
   ``mlp.experts.N.gate_proj.weight`` are fused into the 3-D layout, as transformers' loader does), run on
   every batch of the chunk -- MoE layers through the same recorder as in-memory observation -- and freed; the
   hidden states between layers stay in memory, or in a temporary directory of safetensors files when larger than
   ``max_hidden_bytes``.

Only one decoder layer's weights (plus the embeddings during step 1) are resident at a time. The statistics equal
the in-memory ones (same layer code on the same inputs; tested). Resumable checkpoints are per chunk of batches
(``--checkpoint-every``); each chunk reads every layer once.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from evoreap import preflight
from evoreap.adapters import MoEAdapter
from evoreap.checkpoint.layout import ROUTER_TENSORS, KeyLayout, router_key, split_router_key
from evoreap.checkpoint.quant import open_quantized
from evoreap.checkpoint.reader import INDEX_NAME, CheckpointIndex, read_tensor
from evoreap.data import load_tokens
from evoreap.errors import EvoreapError, UsageError
from evoreap.fingerprint import checkpoint_fingerprint
from evoreap.models import (LoadedModel, load_config, load_tokenizer, model_class, parse_dtype,
                            release_freed_memory, resolve_model)
from evoreap.observe.recorder import Recorder, recording
from evoreap.observe.stats import ExpertStats
from evoreap.observe.store import model_info, observe_cached

log = logging.getLogger(__name__)


class CheckpointReader:
    """Tensors of a local safetensors checkpoint (single file or sharded with an index), read lazily by name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / INDEX_NAME).is_file() and not any(self.path.glob("*.safetensors")):
            raise UsageError(f"{self.path} has no safetensors files; --offload reads weights from local "
                             "safetensors shards (save the model with save_pretrained)")
        # the one checkpoint reader: validated headers, shards inside the directory, index matching its shards
        self.index = CheckpointIndex(self.path)
        # a pre-quantized checkpoint is read as the full-precision one it encodes, dequantized tensor by tensor
        self.quant = open_quantized(self.path, self.index)

    def __contains__(self, name: str) -> bool:
        return name in self.quant if self.quant is not None else name in self.index.tensors

    def names(self) -> list[str]:
        return self.quant.names() if self.quant is not None else list(self.index.tensors)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read with plain reads (no memory map stays behind); dequantized when stored quantized."""
        if self.quant is not None:
            return self.quant.get(name)
        return read_tensor(self.index.tensors[name])

    def close(self) -> None:
        """Nothing stays open between reads (kept for callers that release the reader after each layer)."""


class LayerBuffers:
    """The tensors one decoder layer is loaded into, kept for the next one (the layers of a decoder share names,
    shapes and dtypes). Streaming reads every layer once per stage; writing each into memory that is already mapped
    spares the page faults of fresh allocations, which cost several times the copy itself (a 256 MB float32
    tensor: 0.22 s fresh, 0.04 s reused, one thread). The owner must release a layer (``layer.to("meta")``)
    before the next one is loaded with the same buffers: only one layer is live at a time."""

    def __init__(self) -> None:
        self.held: dict[tuple[str, tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor, device: torch.device) -> torch.Tensor:
        key = (name, tuple(like.shape), like.dtype, device)
        t = self.held.get(key)
        if t is None:
            t = self.held[key] = torch.empty(like.shape, dtype=like.dtype, device=device)
        return t

    def clear(self) -> None:
        self.held.clear()


class LayerLoader:
    """Maps a module's parameter names to checkpoint tensors (through the architecture's key layout, fusing
    per-expert tensors) and materialises it."""

    def __init__(self, reader: CheckpointReader, adapter: MoEAdapter, decoder_prefix: str):
        self.reader, self.adapter, self.prefix = reader, adapter, decoder_prefix
        self.layout = KeyLayout.of(adapter)

    def _stored(self, name: str) -> str | None:
        """The checkpoint name holding model-side name ``name``, None when the checkpoint has none."""
        return next((c for c in self.layout.candidates(name) if c in self.reader), None)

    def tensor(self, full: str, like: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The checkpoint tensor for model parameter ``full`` (e.g. ``model.layers.3.mlp.experts.down_proj``), in
        ``like``'s dtype; written into ``out`` (``like``'s shape and dtype) when one is given."""
        stored = self._stored(full)
        if stored is not None:
            t = self._shaped(full, self.reader.get(stored), like)
            return t.contiguous().to(like.dtype) if out is None else out.copy_(t)  # copy_ converts on the way
        per_expert = self.layout.per_expert_parts(full, like.shape[0]) if like.dim() else None
        if per_expert is not None:
            # each expert's rows go straight into their place in the fused tensor, converted on the way: no
            # stacked copy in the stored dtype, and no second one in the model's
            if out is None:
                out = torch.empty(like.shape, dtype=like.dtype)
            for e, names in enumerate(per_expert):
                parts = []
                for name in names:
                    stored = self._stored(name)
                    if stored is None:
                        raise EvoreapError(f"checkpoint {self.reader.path} has no tensor {name!r} for {full}; is "
                                           "it complete and does it match config.json?")
                    parts.append(self.reader.get(stored))
                row = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
                if tuple(row.shape) != tuple(out.shape[1:]):
                    if row.dim() == 2 and tuple(row.t().shape) == tuple(out.shape[1:]):
                        row = row.t()  # per-expert [out, in] stacked for a transposed fused layout
                    else:
                        raise EvoreapError(f"checkpoint tensors for {full} have per-expert shape {tuple(row.shape)}, "
                                           f"the model expects {tuple(like.shape)}; does the checkpoint match "
                                           "config.json?")
                out[e].copy_(row)
            return out
        raise EvoreapError(f"checkpoint {self.reader.path} has no tensor for {full} (looked for "
                           f"{', '.join(self.layout.candidates(full))}); is it complete and does it match "
                           "config.json?")

    def sources(self, full: str, like: torch.Tensor) -> list[str]:
        """The checkpoint tensors :meth:`tensor` reads for model parameter ``full`` (names only, nothing is read)."""
        stored = self._stored(full)
        if stored is not None:
            return [stored]
        per_expert = self.layout.per_expert_parts(full, like.shape[0]) if like.dim() else None
        if per_expert is None:
            return []
        return [c for names in per_expert for name in names for c in self.layout.candidates(name) if c in self.reader]

    @staticmethod
    def _shaped(full: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``t`` in ``like``'s shape (a view; the dtype is left to the caller)."""
        if tuple(t.shape) != tuple(like.shape):
            if t.dim() == 3 and tuple(t.transpose(1, 2).shape) == tuple(like.shape):
                return t.transpose(1, 2)  # per-expert [out, in] stacked for a transposed fused layout
            raise EvoreapError(f"checkpoint tensor for {full} has shape {tuple(t.shape)}, the model expects "
                               f"{tuple(like.shape)}; does the checkpoint match config.json?")
        return t

    def materialise(self, module: torch.nn.Module, prefix: str, device: torch.device,
                    buffers: LayerBuffers | None = None) -> None:
        """Load ``module``'s parameters and persistent buffers (named ``prefix + name`` in the model) onto
        ``device``, into ``buffers``' tensors when given (see :class:`LayerBuffers`)."""
        device = torch.device(device)
        if buffers is None:
            state = {name: self.tensor(prefix + name, like).to(device)
                     for name, like in module.state_dict(keep_vars=True).items()}
        else:
            state = {name: self.tensor(prefix + name, like, buffers.get(name, like, device))
                     for name, like in module.state_dict(keep_vars=True).items()}
        self.reader.close()
        preflight.check_finite(((prefix + name, t) for name, t in state.items()), str(self.reader.path))
        module.load_state_dict(state, strict=True, assign=True)
        left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if left:
            raise EvoreapError(f"{prefix}: {', '.join(left)} cannot be read from the checkpoint (non-persistent "
                               "buffers); --offload does not support this architecture")


class LayerCapture(torch.nn.Module):
    """Stands in for decoder layer ``index`` in one pass of the decoder: records ``(hidden_states, args, kwargs)`` it
    is called with and passes the hidden states through (masks and rotary tables do not depend on earlier layers'
    outputs, so layer 0's record holds the embeddings and every layer's record its attention arguments). Shared with
    the population evaluator in ``evoreap.proxies``."""

    def __init__(self, index: int, original: torch.nn.Module, sink: dict[int, tuple]):
        super().__init__()
        self.index, self.sink = index, sink
        object.__setattr__(self, "_original", original)  # not a submodule

    def __getattr__(self, name: str):  # e.g. `attention_type`, read by some decoders' loops
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, hidden_states, *args, **kwargs):
        self.sink[self.index] = (hidden_states, args, kwargs)
        return hidden_states


class _HiddenStore:
    """Per-batch hidden states between layers: in memory, or in safetensors files under a temporary directory."""

    def __init__(self, on_disk: bool):
        self.mem: dict[int, torch.Tensor] = {}
        self.dir = tempfile.TemporaryDirectory(prefix="evoreap-hidden-") if on_disk else None

    def put(self, b: int, t: torch.Tensor) -> None:
        if self.dir is None:
            self.mem[b] = t
        else:
            save_file({"h": t.detach().cpu().contiguous()}, os.path.join(self.dir.name, f"{b}.safetensors"))

    def get(self, b: int, device: torch.device) -> torch.Tensor:
        if self.dir is None:
            return self.mem[b]
        return load_file(os.path.join(self.dir.name, f"{b}.safetensors"))["h"].to(device)

    def close(self) -> None:
        self.mem.clear()
        if self.dir is not None:
            self.dir.cleanup()


class SequentialModel:
    """A model on the meta device plus its checkpoint: observes layer by layer (see the module docstring)."""

    def __init__(self, path: str, config: Any, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 max_hidden_bytes: int = 2 << 30):
        self.path, self.device, self.max_hidden_bytes = path, torch.device(device), max_hidden_bytes
        self.adapter = MoEAdapter(config)
        cls = model_class(path, config)  # evoreap's own class for its non-uniform exports, as load_model's
        with torch.device("meta"):
            self.model = cls.from_config(config, dtype=dtype) if hasattr(cls, "from_config") else \
                cls._from_config(config, dtype=dtype)
        self.model.eval()
        self.decoder = self.model.get_decoder()
        self.prefix = next(n for n, m in self.model.named_modules() if m is self.decoder)
        self.prefix = f"{self.prefix}." if self.prefix else ""
        self.reader = CheckpointReader(path)
        self.loader = LayerLoader(self.reader, self.adapter, self.prefix)

    # -- fingerprints without loading the model -----------------------------------------------------------------------
    def router_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer in self.adapter.layers(self.model):
            for name in ROUTER_TENSORS:
                like = getattr(layer.router, name, None)
                if isinstance(like, torch.Tensor):
                    full = self.loader.layout.router_param(self.prefix, layer.index, name)
                    out[router_key(layer.index, name)] = self.loader.tensor(full, like)
        return out

    def unused_tensors(self) -> list[str]:
        """Checkpoint tensors that no parameter or buffer of the model is read from, less those transformers itself
        ignores on loading (the model class's ``_keys_to_ignore_on_load_unexpected``, e.g. DeepSeek-V3's MTP layer,
        and old checkpoints' rotary ``inv_freq`` and ``position_ids``)."""
        used: set[str] = set()
        for full, like in self.model.state_dict(keep_vars=True).items():
            used.update(self.loader.sources(full, like))
        patterns = {r"rotary_emb\.inv_freq", r"(^|\.)position_ids$",
                    *(getattr(self.model, "_keys_to_ignore_on_load_unexpected", None) or ())}
        ignored = re.compile("|".join(f"({p})" for p in patterns))
        return sorted(n for n in self.reader.names() if n not in used and not ignored.search(n))

    # -- the non-layer parts ------------------------------------------------------------------------------------------
    def _materialise_outer(self) -> None:
        for name, child in self.decoder.named_children():
            if name == "layers":
                continue
            nonpersistent = any(m._non_persistent_buffers_set for m in child.modules())
            if nonpersistent:  # rotary tables: computed from the config, not stored
                fresh = type(child)(config=self.decoder.config)
                setattr(self.decoder, name, fresh.to(self.device))
                child = fresh
            self.loader.materialise(child, f"{self.prefix}{name}.", self.device)

    def _free_outer(self) -> None:
        for name, child in self.decoder.named_children():
            if name != "layers":
                child.to("meta")

    def observe(self, data, *, batch_size: int = 8, initial: ExpertStats | None = None, start_batch: int = 0,
                stop_batch: int | None = None, progress: bool = True) -> ExpertStats:
        """Observe batches ``[start_batch, stop_batch)`` of ``data`` layer by layer (same contract as
        :func:`evoreap.observe.observe`)."""
        n_batches = data.num_batches(batch_size)
        stop = n_batches if stop_batch is None else min(stop_batch, n_batches)
        batches = list(range(start_batch, stop))
        moe = {layer.index: layer for layer in self.adapter.layers(self.model)}
        # sums live where the layers run (index_add_ needs its indices on the same device); the layers are still
        # on the meta device here, so the device is named
        recorder = Recorder(self.adapter, list(moe.values()), data.domains, initial=initial, device=self.device)
        first_moe = min(moe)
        rows = min(len(data), stop * batch_size) - start_batch * batch_size
        elem = torch.empty((), dtype=next(self.model.parameters()).dtype).element_size()
        on_disk = rows * data.seq_len * self.model.config.hidden_size * elem > self.max_hidden_bytes
        hidden = _HiddenStore(on_disk)
        layers = self.decoder.layers
        args_of: dict[int, dict[int, tuple]] = {}

        try:
            with torch.inference_mode():
                # 1. embeddings and each layer's arguments
                self._materialise_outer()
                stubs: dict[int, tuple] = {}
                self.decoder.layers = torch.nn.ModuleList(
                    LayerCapture(i, layer, stubs) for i, layer in enumerate(layers))
                try:
                    for b in batches:
                        ids, mask, _ = data.batch(b, batch_size)
                        emb = {}
                        h = self.decoder.embed_tokens.register_forward_hook(
                            lambda m, a, out: emb.__setitem__("h", out))
                        try:
                            self.decoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                         use_cache=False)
                        finally:
                            h.remove()
                        hidden.put(b, emb["h"])
                        args_of[b] = dict(stubs)
                        stubs.clear()
                finally:
                    self.decoder.layers = layers
                    self._free_outer()
                # 2. one decoder layer at a time
                buffers = LayerBuffers()
                for i, layer in enumerate(tqdm(layers, disable=not progress, desc="observe (offload)",
                                               unit="layer")):
                    self.loader.materialise(layer, f"{self.prefix}layers.{i}.", self.device, buffers)
                    try:
                        observed = [moe[i]] if i in moe else []
                        with recording(self.model, recorder, observed):
                            for b in batches:
                                _, mask, dom = data.batch(b, batch_size)
                                recorder.begin_batch(mask, dom, count_tokens=(i == first_moe))
                                _, a, kw = args_of[b][i]
                                out = layer(hidden.get(b, self.device), *a, **kw)
                                hidden.put(b, out[0] if isinstance(out, tuple) else out)
                    finally:
                        layer.to("meta")
                        release_freed_memory()  # free heap pages back: memory flat over the layers
        finally:
            hidden.close()
        return recorder.result()


def describe_checkpoint(model: str | None, *, dtype: str = "float32", device: str = "cpu",
                        trust_remote_code: bool = False, max_hidden_bytes: int = 2 << 30,
                        cache_dir: str | None = None) -> tuple[SequentialModel, Any, dict[str, Any]]:
    """A local checkpoint's observation identity (:func:`~evoreap.observe.store.model_info`, equal to that of the
    model loaded in ``dtype``) from its config, tokenizer and router tensors alone; with the meta-device model and
    the tokenizer, for observing it layer by layer."""
    path = resolve_model(model)
    if not Path(path).is_dir():
        raise UsageError(f"--offload reads local safetensors files; {path} is not a local directory (download it "
                         "first)")
    config = load_config(path, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    seq = SequentialModel(path, config, dtype=parse_dtype(dtype), device=device, max_hidden_bytes=max_hidden_bytes)
    # preflight before any observing: a real tokenizer, every stored tensor used, finite routers (each layer's other
    # weights are checked as the layer is read)
    preflight.check_tokenizer(tokenizer, getattr(seq.adapter.config, "vocab_size", None), path)
    preflight.check_unused(seq.unused_tensors(), path, seq.adapter.config)
    routers = seq.router_tensors()
    preflight.check_finite(((seq.loader.layout.router_param(seq.prefix, *split_router_key(k)), t)
                            for k, t in routers.items()), path)
    return seq, tokenizer, model_info(path, seq.adapter, routers, tokenizer, parse_dtype(dtype),
                                      checkpoint_fingerprint(path, cache_dir))


def observe_offloaded_cached(model: str | None, data_spec: str, *, dtype: str = "float32", device: str = "cpu",
                             seq_len: int = 256, tokens: int | None = None, samples: int | None = None,
                             seed: int = 0, cache_dir: str | None = None, batch_size: int = 8,
                             trust_remote_code: bool = False, checkpoint_every: int | None = None,
                             progress: bool = True, split: str = "calibration", max_hidden_bytes: int = 2 << 30,
                             chat_template: str | Path | None = None) -> tuple[str, ExpertStats]:
    """``evoreap observe --offload``: like :func:`evoreap.observe.store.observe_cached`, without ever holding more
    than one decoder layer. The cache key equals the in-memory one, so either mode reuses the other's result."""
    seq, tokenizer, info = describe_checkpoint(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                               max_hidden_bytes=max_hidden_bytes, cache_dir=cache_dir)
    path = info["path"]
    data = load_tokens(data_spec, tokenizer, split=split, seq_len=seq_len, tokens=tokens, samples=samples, seed=seed,
                       model_config=seq.adapter.config, chat_template=chat_template)
    n_batches = data.num_batches(batch_size)
    loaded = LoadedModel(seq.model, tokenizer, path, seq.adapter)

    def runner(initial, lo, hi):
        return seq.observe(data, batch_size=batch_size, initial=initial, start_batch=lo, stop_batch=hi,
                           progress=progress)

    return observe_cached(loaded, data, cache_dir=cache_dir, batch_size=batch_size, progress=False, seed=seed,
                          checkpoint_every=checkpoint_every or n_batches, model_info=info, runner=runner)
