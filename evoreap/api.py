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
from evoreap.data.loader import check_data
from evoreap.data.spec import dataset_source
from evoreap.errors import EvoreapError, SettingError, UsageError
from evoreap.export import ExportResult, export_pruned
from evoreap.export.core import check_out
from evoreap.export.writer import DEFAULT_MAX_SHARD_BYTES
from evoreap.models import LoadedModel, load_config, load_model, load_tokenizer, parse_dtype, resolve_model
from evoreap.observe.sequential import observe_offloaded_cached
from evoreap.observe.store import Observation, load_observation, observe_cached
from evoreap.pipeline.choose import choose_experts
from evoreap.pipeline.config import SearchConfig
from evoreap.pipeline.judge import EvaluationResult, evaluate_pruned
from evoreap.pipeline.session import SearchResult, run_search
from evoreap.pipeline.streaming import memory_limit_gb, open_streamed, wants_streaming
from evoreap.models import DTYPES as DTYPE_BY_NAME
from evoreap.recovery.reinject import ReinjectResult
from evoreap.recovery.reinject import reinject as reinject_experts
from evoreap.recovery.reinject import saliency as domain_saliency
from evoreap.recovery.repair import FIT_TOKENS, RepairResult, RepairSettings, fit_repair, settings_for_source
from evoreap.recovery.streamed_repair import fit_repair_streamed
from evoreap.recovery.store import Repair, export_edits, repair_path, resolve_repair, storage_dtype
from evoreap.recovery.store import allocation_fingerprint as allocation_fp
from evoreap.fingerprint import checkpoint_fingerprint
from evoreap.reference import reference_cached

__all__ = ["evaluate", "export", "observe", "reinject", "repair", "search"]

ModelLike = str | Path | LoadedModel | torch.nn.Module | None


def as_loaded(model: ModelLike, *, tokenizer: Any = None, dtype: str = "float32", device: str = "cpu",
              trust_remote_code: bool = False, device_map: str | dict | None = None) -> LoadedModel:
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
                      trust_remote_code=trust_remote_code, device_map=device_map)


def observe(model: ModelLike = None, data: Any = "demo", *, tokens: int | None = 65536, samples: int | None = None,
            seq_len: int = 256, batch_size: int = 8, seed: int = 0, cache_dir: str | None = None,
            dtype: str = "float32", device: str = "cpu", tokenizer: Any = None, trust_remote_code: bool = False,
            offload: bool = False, max_memory_gb: float | None = None, checkpoint_every: int | None = None,
            progress: bool = True, chat_template: str | Path | None = None,
            device_map: str | dict | None = None) -> Observation:
    """Record saliency statistics of ``model`` on ``data`` (split ``calibration``) into the cache, or find them
    there; returns the verified :class:`~evoreap.observe.store.Observation` (``.key``, ``.stats``, ``.manifest``).
    ``offload`` (or ``max_memory_gb``) streams one decoder layer at a time from the model directory's shards.
    ``chat_template`` is a Jinja template file for chat records (else the tokenizer's own). The data is checked
    (paths, first records, a template where chats need one) before the model is loaded."""
    def early_tokenizer() -> Any:  # only loaded when the data holds chats and no template file is given
        if isinstance(model, (LoadedModel, torch.nn.Module)):
            return tokenizer or as_loaded(model).tokenizer
        return load_tokenizer(None if model is None else str(model), trust_remote_code=trust_remote_code)

    check_data(data, "calibration", chat_template=chat_template, tokenizer=early_tokenizer)
    if offload or max_memory_gb is not None:
        if not isinstance(model, (str, Path)) and model is not None:
            raise UsageError("offloaded observation reads the model's shards: pass its directory, not a model object")
        key, _ = observe_offloaded_cached(None if model is None else str(model), data, dtype=dtype, device=device,
                                          seq_len=seq_len, tokens=tokens, samples=samples, seed=seed,
                                          cache_dir=cache_dir, batch_size=batch_size,
                                          trust_remote_code=trust_remote_code, checkpoint_every=checkpoint_every,
                                          progress=progress, max_hidden_bytes=int((max_memory_gb or 2.0) * 2**30),
                                          chat_template=chat_template)
        return load_observation(key, cache_dir=cache_dir)
    loaded = as_loaded(model, tokenizer=tokenizer, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                       device_map=device_map)
    data_tokens = load_tokens(data, loaded.tokenizer, split="calibration", seq_len=seq_len, tokens=tokens,
                              samples=samples, seed=seed, model_config=loaded.adapter.config,
                              chat_template=chat_template)
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
           trust_remote_code: bool = False, copy_external_links: bool = False,
           base_model: str | None = None, repair: Repair | str | Path | bool | None = None,
           quantize: str | None = None, quantize_group_size: int | None = None) -> ExportResult:
    """Write the pruned checkpoint of ``allocation`` (an :class:`Allocation` or its file) to ``out``, streaming the
    model directory ``model`` (default: the one the allocation names, else the demo) shard by shard.
    ``base_model`` is the hub id the model card names as base model (else found from the source, if it can be).
    ``repair``: repaired parameters to write (a :class:`~evoreap.recovery.Repair` or its file); by default the
    allocation file's ``NAME.repair.safetensors`` when there is one, ``False`` for none."""
    alloc = allocation if isinstance(allocation, Allocation) else Allocation.load(allocation)
    src = source_dir(model, alloc)
    check_out(out, src, overwrite)  # a bad destination fails before any expert is scored or observed
    adapter = MoEAdapter(load_config(src, trust_remote_code=trust_remote_code))
    chosen = choose_experts(alloc, adapter, src, criterion=criterion, observation=observation, cache_dir=cache_dir,
                            trust_remote_code=trust_remote_code)
    meta = record_meta(alloc, chosen.criterion, chosen.observation_key, cache_dir=cache_dir)
    if base_model is not None:
        meta["base_model_id"] = base_model
    edits = None
    rep = resolve_repair(None if isinstance(allocation, Allocation) else allocation, repair)
    if rep is not None:
        if allocation_fp(chosen.kept) != rep.meta["allocation_fingerprint"]:
            raise UsageError("the repair was fitted to other kept experts than this allocation's; run evoreap repair "
                             "again for it (or pass --no-repair)")
        if checkpoint_fingerprint(src, cache_dir) != rep.meta["model_fingerprint"]:
            raise UsageError(f"the repair was fitted to another model than {src}; run evoreap repair again for it")
        edits = export_edits(rep, src, adapter, chosen.kept)
        meta["repair"] = {k: rep.meta[k] for k in ("params", "objective", "accepted", "search")}
    return export_pruned(src, out, chosen.kept, meta=meta,
                         overwrite=overwrite, max_shard_bytes=max_shard_bytes, progress=progress,
                         trust_remote_code=trust_remote_code, follow_external_links=copy_external_links, edits=edits,
                         quantize=quantize, quantize_group_size=quantize_group_size)


def source_dir(model: str | Path | None, allocation: Allocation) -> str:
    """The model directory an export reads: ``model``, else the one the allocation names, else the demo."""
    src = resolve_model(str(model) if model is not None else allocation.meta_text("model"))
    if not Path(src).is_dir():
        raise UsageError(f"export reads safetensors files from a local directory, and {src} is not one; download the "
                         "model first (e.g. hf download ID --local-dir DIR)")
    return src


def record_meta(alloc: Allocation, criterion: str | None, key: str | None, cache_dir: str | None = None
                ) -> dict[str, Any]:
    """Provenance for the export's ``evoreap.json`` and model card: the observation under its full key, and the
    calibration data it was made on (per source: spec, fingerprint, rows, sequences, tokens)."""
    calibration = None
    if key:
        try:
            obs = load_observation(key, cache_dir=cache_dir)
        except EvoreapError:  # the allocation listed its experts and names an observation no longer cached
            obs = None
        if obs is not None:
            key = obs.key
            data = obs.manifest.get("data", {})
            calibration = {"sources": data.get("sources", []), "sequences": data.get("sequences"),
                           "seq_len": data.get("seq_len"), "tokens": obs.stats.tokens}
    meta = alloc.meta
    proxy = meta.get("proxy", meta.get("proxy_values"))
    if proxy is None:
        proxy = {k: meta[k] for k in ("kl", "nll", "loss", "ppl", "score") if k in meta} or None
    return {"criterion": criterion, "observation_key": key, "budget": meta.get("budget"), "proxy": proxy,
            "calibration": calibration,
            "allocation_meta": meta,
            "allocation_file": str(Path(alloc.source).resolve()) if alloc.source else None,
            "command": shlex.join(["evoreap", *sys.argv[1:]])}


def evaluate(model: ModelLike = None, *, allocation: Allocation | str | Path | None = None,
             pruned: str | Path | None = None, data: Any = "demo", tokens: int = 32768, seq_len: int = 256,
             batch_size: int = 8, reference_top_k: int = 64, criterion: str | None = None,
             observation: str | None = None, cache_dir: str | None = None, generate: int = 0,
             allow_overlap: bool = False, dtype: str = "float32", device: str = "cpu", seed: int = 0,
             tokenizer: Any = None, trust_remote_code: bool = False,
             chat_template: str | Path | None = None,
             repair: Repair | str | Path | bool | None = None, device_map: str | dict | None = None,
             max_memory: str | float | dict | None = None, offload: bool = False) -> EvaluationResult:
    """Held-out NLL, perplexity, KL, ESAP and top-1 agreement of the pruned model (``allocation`` under router
    masks, or the export in ``pruned``) beside the unpruned ``model``. ``repair`` as for :func:`export` (masked
    allocations only: an export already holds its repair). ``offload`` (or ``max_memory`` in GB, without
    ``device_map``, below the weights' size) streams a model directory layer by layer from its shards."""
    alloc = Allocation.load(allocation) if isinstance(allocation, (str, Path)) else allocation
    rep = resolve_repair(None if isinstance(allocation, Allocation) else allocation, repair) \
        if alloc is not None else None
    if isinstance(model, (LoadedModel, torch.nn.Module)):
        model = as_loaded(model, tokenizer=tokenizer)
    return evaluate_pruned(None if model is None else model if isinstance(model, LoadedModel) else str(model),
                           allocation=alloc, pruned=pruned, data=data, tokens=tokens, seq_len=seq_len,
                           batch_size=batch_size, reference_top_k=reference_top_k, criterion=criterion,
                           observation=observation, cache_dir=cache_dir, generate_tokens=generate,
                           allow_overlap=allow_overlap, dtype=dtype, device=device, seed=seed,
                           trust_remote_code=trust_remote_code, chat_template=chat_template, repair=rep,
                           device_map=device_map, max_memory=max_memory, offload=offload)


def repair(model: ModelLike = None, allocation: Allocation | str | Path | None = None, *,
           params: str | None = None, objective: str = RepairSettings.objective,
           out: str | Path | None = None, data: Any = None, stop_data: Any = None, fit_tokens: int = FIT_TOKENS,
           stop_tokens: int = 8192, seq_len: int = 256, batch_size: int = RepairSettings.batch_size,
           lr: float = RepairSettings.lr, epochs: int = RepairSettings.epochs,
           evals_per_epoch: int = RepairSettings.evals_per_epoch, patience: int = RepairSettings.patience,
           schedule: str = RepairSettings.schedule, seed: int = 0, reference_top_k: int = 64,
           rank: int = RepairSettings.rank, guard: bool = RepairSettings.guard,
           guard_tolerance: float = RepairSettings.guard_tolerance,
           criterion: str | None = None, observation: str | None = None,
           cache_dir: str | None = None, dtype: str = "float32", device: str = "cpu", tokenizer: Any = None,
           trust_remote_code: bool = False, progress: bool = True, offload: bool = False,
           max_memory: str | float | None = None) -> RepairResult:
    """Fit repaired parameters (``params``: router, router+norm, router+scale, router+norm+scale,
    router+norm+scale+lowrank with a rank-``rank`` update of each kept expert's down projection; None: the latter,
    or router+norm+scale for a quantized checkpoint, whose experts cannot take the merged update) of the pruned
    ``allocation`` so that it matches the unpruned model again (``objective``: ``kl`` end to end, or ``local`` per
    MoE block), on ``data`` (split ``calibration``; default: the allocation's calibration data, else the demo) with
    early stopping on ``stop_data`` (split ``search``). Written to ``out`` (default: beside the allocation file,
    ``NAME.repair.safetensors``), where :func:`evaluate` and :func:`export` find it. Re-running after an
    interruption continues from the last checkpoint. ``guard``: reject a repair that makes one domain's search-split
    KL worse by more than ``guard_tolerance`` (relative); without it such domains are only reported.
    ``offload`` (or ``max_memory`` in GB smaller than the weights) streams the model from its directory's shards one
    decoder layer at a time (``objective="local"`` only: each layer is fitted while it is read, with the resident
    fit's result; resumable after every layer)."""
    if allocation is None:
        raise UsageError("repair needs an allocation (a file or an Allocation)")
    settings = RepairSettings(params=params or RepairSettings.params, objective=objective, lr=lr, epochs=epochs,
                              batch_size=batch_size,
                              evals_per_epoch=evals_per_epoch, patience=patience, schedule=schedule,
                              seed=seed, rank=rank, guard=guard, guard_tolerance=guard_tolerance).check()
    alloc = allocation if isinstance(allocation, Allocation) else Allocation.load(allocation)
    if out is None:
        if isinstance(allocation, Allocation):
            raise UsageError("an in-memory allocation has no file to put the repair beside: pass out=PATH")
        out = repair_path(allocation)
    out = Path(out)
    if out.exists() and not out.is_file():
        raise UsageError(f"repair output {out} is not a file; pass a file path")
    source = model if model is not None else alloc.meta_text("model")
    settings = settings_for_source(settings, source, explicit=params is not None)
    if max_memory is not None and memory_limit_gb(max_memory, None) is None:
        raise UsageError(f"--max-memory {max_memory!r}: repair takes one number of GB (the weights above it are "
                         "streamed from the shards), not a placement over devices")
    if offload or max_memory is not None:
        if not (source is None or isinstance(source, (str, Path))):
            raise UsageError("--offload / --max-memory stream a model directory from its shards; this model is "
                             "already in memory: pass its directory instead")
        if wants_streaming(None if source is None else str(source), offload=offload, device_map=None,
                           max_memory=max_memory, dtype=dtype, trust_remote_code=trust_remote_code):
            return _repair_streamed(None if source is None else str(source), alloc, out, settings, data=data,
                                    stop_data=stop_data, fit_tokens=fit_tokens, stop_tokens=stop_tokens,
                                    seq_len=seq_len, seed=seed, reference_top_k=reference_top_k,
                                    criterion=criterion, observation=observation, cache_dir=cache_dir, dtype=dtype,
                                    device=device, trust_remote_code=trust_remote_code, progress=progress,
                                    explicit=params is not None)
    loaded = as_loaded(source, tokenizer=tokenizer, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    settings = settings_for_source(settings, loaded.path, explicit=params is not None)
    chosen = choose_experts(alloc, loaded.adapter, loaded, criterion=criterion, observation=observation,
                            cache_dir=cache_dir)
    tok, cfg = loaded.tokenizer, loaded.adapter.config
    fit = load_tokens(data or alloc.meta_text("calibration_data") or "demo", tok, split="calibration",
                      seq_len=seq_len, tokens=fit_tokens, seed=seed, model_config=cfg)
    stop = load_tokens(stop_data or alloc.meta_text("search_data") or "demo", tok, split="search", seq_len=seq_len,
                       tokens=stop_tokens, seed=seed, model_config=cfg)
    stop_ref = reference_cached(loaded.model, stop, top_k=reference_top_k, cache_dir=cache_dir,
                                batch_size=batch_size, progress=progress)
    fit_ref = reference_cached(loaded.model, fit, top_k=reference_top_k, cache_dir=cache_dir, batch_size=batch_size,
                               progress=progress) if settings.objective == "kl" else None
    param_dtype = next(loaded.model.parameters()).dtype
    rep = fit_repair(loaded.model, loaded.adapter, chosen.kept, fit, stop, stop_reference=stop_ref,
                     fit_reference=fit_ref, settings=settings,
                     storage_dtype=storage_dtype(loaded.path, loaded.adapter, param_dtype),
                     checkpoint=out.with_name(f".{out.name}.partial"), progress=progress)
    rep.save(out)
    search = rep.meta["search"]
    return RepairResult(rep, out, rep.accepted, search["kl_before"], search["kl_after"], rep.meta["seconds"])


def _repair_streamed(model: str | None, alloc: Allocation, out: Path, settings: RepairSettings, *, data: Any,
                     stop_data: Any, fit_tokens: int, stop_tokens: int, seq_len: int, seed: int, reference_top_k: int,
                     criterion: str | None, observation: str | None, cache_dir: str | None, dtype: str, device: str,
                     trust_remote_code: bool, progress: bool, explicit: bool) -> RepairResult:
    """:func:`repair` with the model streamed from its shards (the layer-local objective, fitted layer by layer)."""
    if settings.objective != "local":
        raise UsageError(f"the model is streamed from its shards here (--offload / --max-memory), and only the local "
                         f"objective fits layer by layer; pass --objective local (not {settings.objective})")
    streamed = open_streamed(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                             cache_dir=cache_dir)
    loaded = streamed.loaded
    settings = settings_for_source(settings, loaded.path, explicit=explicit)
    chosen = choose_experts(alloc, loaded.adapter, str(loaded.path), criterion=criterion, observation=observation,
                            cache_dir=cache_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    tok, cfg = loaded.tokenizer, loaded.adapter.config
    fit = load_tokens(data or alloc.meta_text("calibration_data") or "demo", tok, split="calibration",
                      seq_len=seq_len, tokens=fit_tokens, seed=seed, model_config=cfg)
    stop = load_tokens(stop_data or alloc.meta_text("search_data") or "demo", tok, split="search", seq_len=seq_len,
                       tokens=stop_tokens, seed=seed, model_config=cfg)
    rep = fit_repair_streamed(streamed.seq, chosen.kept, fit, stop, settings=settings,
                              reference_top_k=reference_top_k,
                              storage_dtype=storage_dtype(loaded.path, loaded.adapter, parse_dtype(dtype)),
                              checkpoint=out.with_name(f".{out.name}.streamed.partial"), progress=progress,
                              cache_dir=cache_dir)
    rep.save(out)
    search = rep.meta["search"]
    return RepairResult(rep, out, rep.accepted, search["kl_before"], search["kl_after"], rep.meta["seconds"])


def reinject(model: ModelLike = None, allocation: Allocation | str | Path | None = None, domain: str = "", *,
             experts: int | None = None, budget_gb: float | None = None, out: str | Path | None = None,
             tokens: int = 8192, proxy: str = "nll", pool: int | None = None, confirm: bool = True,
             seq_len: int = 256, batch_size: int = 8, seed: int = 0, reference_top_k: int = 64,
             criterion: str | None = None, observation: str | None = None, cache_dir: str | None = None,
             dtype: str = "float32", device: str = "cpu", tokenizer: Any = None, trust_remote_code: bool = False,
             progress: bool = True) -> tuple[Allocation, ReinjectResult, Path | None]:
    """Put back the pruned experts of ``allocation`` that carry ``domain`` (a data source of its calibration data,
    e.g. ``tools``): ``experts`` of them, or as many as ``budget_gb`` more gigabytes hold at the checkpoint's dtype.
    Ranked by the domain's saliency, confirmed by the domain's search-split ``proxy`` (``nll`` or ``kl``). Writes
    the new allocation to ``out`` (default: ``NAME.<domain>.json`` beside the allocation file) and returns it, the
    :class:`~evoreap.recovery.reinject.ReinjectResult` and the path written."""
    if allocation is None or not domain:
        raise UsageError("reinject needs an allocation and a domain (e.g. --domain tools)")
    if (experts is None) == (budget_gb is None):
        raise UsageError("give the number of experts to put back (--experts N) or the size they may take "
                         "(--budget-gb G), one of them")
    alloc = allocation if isinstance(allocation, Allocation) else Allocation.load(allocation)
    loaded = as_loaded(model if model is not None else alloc.meta_text("model"), tokenizer=tokenizer, dtype=dtype,
                       device=device, trust_remote_code=trust_remote_code)
    adapter = loaded.adapter
    if budget_gb is not None:
        bits = torch.finfo(DTYPE_BY_NAME[storage_dtype(loaded.path, adapter, torch.float32)]).bits
        experts = int(budget_gb * 1e9 // (adapter.expert_params() * bits / 8))
        if experts < 1:
            raise UsageError(f"--budget-gb {budget_gb} holds no expert ({adapter.expert_params() * bits / 8e9:.4g} GB "
                             "each); give more")
    chosen = choose_experts(alloc, adapter, loaded, criterion=criterion, observation=observation,
                            cache_dir=cache_dir)
    defaults = SearchConfig()
    calib = load_tokens(alloc.meta_text("calibration_data") or defaults.calib_data, loaded.tokenizer,
                        split="calibration", seq_len=defaults.seq_len, tokens=defaults.calib_tokens,
                        seed=defaults.seed, model_config=adapter.config)
    _, stats = observe_cached(loaded, calib, cache_dir=cache_dir, batch_size=defaults.batch_size, progress=progress)
    scores = domain_saliency(stats, domain)
    data = load_tokens(domain, loaded.tokenizer, split="search", seq_len=seq_len, tokens=tokens, seed=seed,
                       model_config=adapter.config)
    ref = reference_cached(loaded.model, data, top_k=reference_top_k, cache_dir=cache_dir, batch_size=batch_size,
                           progress=progress) if proxy != "nll" else None
    result = reinject_experts(loaded.model, adapter, chosen.kept, scores, experts, data, reference=ref, proxy=proxy,
                              pool=pool, confirm=confirm, batch_size=batch_size, progress=progress)
    meta = dict(alloc.meta) | {"reinjected": {"domain": domain, "added": {str(k): v for k, v in result.added.items()},
                                              "proxy": proxy, "search_before": result.before,
                                              "search_after": result.after}}
    if chosen.criterion and "criterion" not in meta:
        meta["criterion"] = chosen.criterion
    new = Allocation(tuple(sorted(result.kept)), tuple(len(result.kept[i]) for i in sorted(result.kept)),
                     meta).with_experts(result.kept)
    path = Path(out) if out is not None else (
        None if isinstance(allocation, Allocation) else Path(allocation).with_suffix(f".{domain}.json"))
    if path is not None:
        new.save(path, adapter)
    return new, result, path
