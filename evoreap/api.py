"""evoreap's Python API: the four things the CLI does, callable from a notebook.

    import evoreap

    obs = evoreap.observe("path/to/Qwen3-30B-A3B", data="demo", tokens=65536)
    result = evoreap.search("path/to/Qwen3-30B-A3B", budget=0.5)
    evoreap.export(result.allocation, "pruned/")
    report = evoreap.evaluate("path/to/Qwen3-30B-A3B", allocation=result.allocation)

``model`` is a local directory, a hub id, None (the bundled demo) or an already-loaded transformers model (then
pass its ``tokenizer`` too); ``data`` is a data spec as on the command line or a ``datasets.Dataset``. Every
command of the CLI is a thin layer over these functions.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from evoreap.adapters import MoEAdapter
from evoreap.allocation import Allocation
from evoreap.data import load_tokens
from evoreap.data.spec import dataset_source
from evoreap.errors import SettingError, UsageError
from evoreap.export import ExportResult, export_pruned
from evoreap.export.core import check_out
from evoreap.export.writer import DEFAULT_MAX_SHARD_BYTES
from evoreap.models import LoadedModel, load_config, load_model, load_tokenizer, resolve_model
from evoreap.observe.sequential import observe_offloaded_cached
from evoreap.observe.store import Observation, load_observation, observe_cached
from evoreap.pipeline.choose import choose_experts
from evoreap.pipeline.config import SearchConfig
from evoreap.pipeline.judge import EvaluationResult, evaluate_pruned
from evoreap.pipeline.session import SearchResult, run_search

__all__ = ["evaluate", "export", "observe", "search"]

ModelLike = str | Path | LoadedModel | torch.nn.Module | None


def as_loaded(model: ModelLike, *, tokenizer: Any = None, dtype: str = "float32", device: str = "cpu",
              trust_remote_code: bool = False) -> LoadedModel:
    """A :class:`LoadedModel` from a path, a hub id, None (the demo), or a transformers model object."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, torch.nn.Module):
        path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
        if tokenizer is None:
            if not path or not Path(path).is_dir():
                raise UsageError("a model object without a local directory needs its tokenizer: pass tokenizer=...")
            tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        return LoadedModel(model.eval(), tokenizer, str(path or "<in-memory model>"), MoEAdapter.for_model(model))
    return load_model(None if model is None else str(model), dtype=dtype, device=device,
                      trust_remote_code=trust_remote_code)


def observe(model: ModelLike = None, data: Any = "demo", *, tokens: int | None = 65536, samples: int | None = None,
            seq_len: int = 256, batch_size: int = 8, seed: int = 0, cache_dir: str | None = None,
            dtype: str = "float32", device: str = "cpu", tokenizer: Any = None, trust_remote_code: bool = False,
            offload: bool = False, max_memory_gb: float | None = None, checkpoint_every: int | None = None,
            progress: bool = True) -> Observation:
    """Record saliency statistics of ``model`` on ``data`` (split ``calibration``) into the cache, or find them
    there; returns the verified :class:`~evoreap.observe.store.Observation` (``.key``, ``.stats``, ``.manifest``).
    ``offload`` (or ``max_memory_gb``) streams one decoder layer at a time from the model directory's shards."""
    if offload or max_memory_gb is not None:
        if not isinstance(model, (str, Path)) and model is not None:
            raise UsageError("offloaded observation reads the model's shards: pass its directory, not a model object")
        key, _ = observe_offloaded_cached(None if model is None else str(model), data, dtype=dtype, device=device,
                                          seq_len=seq_len, tokens=tokens, samples=samples, seed=seed,
                                          cache_dir=cache_dir, batch_size=batch_size,
                                          trust_remote_code=trust_remote_code, checkpoint_every=checkpoint_every,
                                          progress=progress, max_hidden_bytes=int((max_memory_gb or 2.0) * 2**30))
        return load_observation(key, cache_dir=cache_dir)
    loaded = as_loaded(model, tokenizer=tokenizer, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    data_tokens = load_tokens(data, loaded.tokenizer, split="calibration", seq_len=seq_len, tokens=tokens,
                              samples=samples, seed=seed, model_config=loaded.adapter.config)
    key, _ = observe_cached(loaded, data_tokens, cache_dir=cache_dir, batch_size=batch_size, progress=progress,
                            seed=seed, checkpoint_every=checkpoint_every or 16)
    return load_observation(key, cache_dir=cache_dir)


def search(model: ModelLike = None, budget: float | None = 0.5, *, config: SearchConfig | None = None,
           data: Any = None, calib_data: Any = None, heldout_data: Any = None, tokenizer: Any = None,
           **settings: Any) -> SearchResult:
    """Search per-layer keep counts under ``budget`` (a fraction of routed-expert parameters; pass
    ``budget=None`` with ``budget_params=...`` or ``budget_gb=..., bits=...`` instead). ``settings`` are
    :class:`~evoreap.pipeline.config.SearchConfig` fields (``generations=``, ``proxy=``, ``export=``, ...), on top
    of ``config`` if given. Returns the best allocation, the held-out table and the run directory."""
    known = {f.name for f in dataclasses.fields(SearchConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UsageError(f"unknown search setting(s) {', '.join(unknown)}; see evoreap.SearchConfig")
    base = config or SearchConfig()
    changes: dict[str, Any] = dict(settings)
    if budget is not None or config is None:
        changes["budget"] = budget
    loaded = None
    if isinstance(model, (LoadedModel, torch.nn.Module)):
        loaded = as_loaded(model, tokenizer=tokenizer)
        changes["model"] = loaded.path
    elif model is not None:
        changes["model"] = str(model)
    datasets = {}
    for name, value in (("data", data), ("calib_data", calib_data), ("heldout_data", heldout_data)):
        if value is None:
            continue
        if isinstance(value, str):
            changes[name] = value
        else:  # an in-memory dataset: the config records its fingerprint, the session reads the object
            source = dataset_source(value, name="dataset")
            changes[name] = source.location
            datasets[name] = value
    cfg = base.replace(**changes)
    if (loaded is not None or datasets) and cfg.workers > 1:
        raise SettingError("workers", "{name} > 1 replays the run in other processes, which cannot see an "
                                      "in-memory model or dataset; pass paths or use one worker")
    return run_search(cfg, loaded=loaded, datasets=datasets)


def export(allocation: Allocation | str | Path, out: str | Path, *, model: str | Path | None = None,
           criterion: str | None = None, observation: str | None = None, cache_dir: str | None = None,
           overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
           trust_remote_code: bool = False, copy_external_links: bool = False) -> ExportResult:
    """Write the pruned checkpoint of ``allocation`` (an :class:`Allocation` or its file) to ``out``, streaming the
    model directory ``model`` (default: the one the allocation names, else the demo) shard by shard."""
    alloc = allocation if isinstance(allocation, Allocation) else Allocation.load(allocation)
    src = source_dir(model, alloc)
    check_out(out, src, overwrite)  # a bad destination fails before any expert is scored or observed
    adapter = MoEAdapter(load_config(src, trust_remote_code=trust_remote_code))
    chosen = choose_experts(alloc, adapter, src, criterion=criterion, observation=observation, cache_dir=cache_dir,
                            trust_remote_code=trust_remote_code)
    return export_pruned(src, out, chosen.kept, meta=record_meta(alloc, chosen.criterion, chosen.observation_key),
                         overwrite=overwrite, max_shard_bytes=max_shard_bytes, progress=progress,
                         trust_remote_code=trust_remote_code, follow_external_links=copy_external_links)


def source_dir(model: str | Path | None, allocation: Allocation) -> str:
    """The model directory an export reads: ``model``, else the one the allocation names, else the demo."""
    src = resolve_model(str(model) if model is not None else allocation.meta_text("model"))
    if not Path(src).is_dir():
        raise UsageError(f"export reads safetensors files from a local directory, and {src} is not one; download the "
                         "model first (e.g. hf download ID --local-dir DIR)")
    return src


def record_meta(alloc: Allocation, criterion: str | None, key: str | None) -> dict[str, Any]:
    """Provenance for the export's ``evoreap.json`` and model card."""
    meta = alloc.meta
    proxy = meta.get("proxy", meta.get("proxy_values"))
    if proxy is None:
        proxy = {k: meta[k] for k in ("kl", "nll", "loss", "ppl", "score") if k in meta} or None
    return {"criterion": criterion, "observation_key": key, "budget": meta.get("budget"), "proxy": proxy,
            "allocation_meta": meta,
            "allocation_file": str(Path(alloc.source).resolve()) if alloc.source else None,
            "command": shlex.join(["evoreap", *sys.argv[1:]])}


def evaluate(model: ModelLike = None, *, allocation: Allocation | str | Path | None = None,
             pruned: str | Path | None = None, data: Any = "demo", tokens: int = 32768, seq_len: int = 256,
             batch_size: int = 8, reference_top_k: int = 64, criterion: str | None = None,
             observation: str | None = None, cache_dir: str | None = None, generate: int = 0,
             allow_overlap: bool = False, dtype: str = "float32", device: str = "cpu", seed: int = 0,
             tokenizer: Any = None, trust_remote_code: bool = False) -> EvaluationResult:
    """Held-out NLL, perplexity, KL, ESAP and top-1 agreement of the pruned model (``allocation`` under router
    masks, or the export in ``pruned``) beside the unpruned ``model``."""
    alloc = Allocation.load(allocation) if isinstance(allocation, (str, Path)) else allocation
    if isinstance(model, (LoadedModel, torch.nn.Module)):
        model = as_loaded(model, tokenizer=tokenizer)
    return evaluate_pruned(None if model is None else model if isinstance(model, LoadedModel) else str(model),
                           allocation=alloc, pruned=pruned, data=data, tokens=tokens, seq_len=seq_len,
                           batch_size=batch_size, reference_top_k=reference_top_k, criterion=criterion,
                           observation=observation, cache_dir=cache_dir, generate_tokens=generate,
                           allow_overlap=allow_overlap, dtype=dtype, device=device, seed=seed,
                           trust_remote_code=trust_remote_code)
