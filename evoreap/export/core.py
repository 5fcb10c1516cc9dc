"""``export_pruned``: stream a pruned checkpoint into a new directory that appears only when it is complete."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from evoreap.adapters import MoEAdapter
from evoreap.checkpoint.layout import KeyLayout
from evoreap.checkpoint.own_code import COUNTS_KEY, MODELING_FILE, OWN_AUTO_MAP, REMOTE_CLASS, render_modeling
from evoreap.checkpoint.quant import open_quantized
from evoreap.checkpoint.reader import CheckpointIndex, aux_file
from evoreap.checkpoint.trust import needs_trust
from evoreap.errors import EvoreapError, UsageError
from evoreap.export.card import FORMAT as EXPORT_FORMAT
from evoreap.export.card import export_record, model_card
from evoreap.export.plan import ExportPlan, build_plan
from evoreap.export.writer import DEFAULT_MAX_SHARD_BYTES, write_checkpoint
from evoreap.files import check_destination, check_writable_dir, real, shareable
from evoreap.models import load_config

log = logging.getLogger(__name__)

# Files besides weights and config that a model folder needs; copied verbatim when present. No code is ever copied.
AUX_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
             "chat_template.json", "LICENSE", "LICENSE.txt", "NOTICE")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_pruned` wrote."""

    out: Path
    uniform: bool
    experts_per_layer: dict[int, int]
    kept: dict[int, tuple[int, ...]]
    files: tuple[str, ...]
    tensors_written: int
    tensors_dropped: int
    bytes_before: int
    bytes_after: int
    elements_before: int
    elements_after: int
    seconds: float


def read_source_config(src: Path, trust_remote_code: bool) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise UsageError(f"{src} has no config.json; pass the directory that save_pretrained wrote")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvoreapError(f"{path} is not valid JSON ({e})") from None
    needs_trust(src, trust_remote_code)  # refuses custom code (the export never copies it) unless allowed
    if COUNTS_KEY in raw:
        raise UsageError(f"{src} is already a non-uniform evoreap export; prune the original model instead")
    return raw


def _expert_count_keys(config: Any, key: str) -> set[str]:
    """``key`` and its aliases through the config class's attribute_map (e.g. num_local_experts/n_routed_experts)."""
    names = {key}
    amap = getattr(type(config), "attribute_map", {}) or {}
    for _ in range(2):
        names |= {b for a, b in amap.items() if a in names} | {a for a, b in amap.items() if b in names}
    return names


def new_config(raw: dict[str, Any], config: Any, adapter: MoEAdapter, plan: ExportPlan) -> dict[str, Any]:
    """The exported config.json: stock with the new count (uniform), or per-layer counts + auto_map (non-uniform)."""
    # lazy: transformers' auto modules take seconds to import, and only an export needs them
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = json.loads(json.dumps(raw))
    target = out["text_config"] if "text_config" in out and adapter.config is not config else out
    counts = plan.counts
    width = max(counts.values()) if counts else adapter.num_experts
    keys = _expert_count_keys(adapter.config, adapter.spec.num_experts_key) & set(target)
    for k in keys or {getattr(type(adapter.config), "attribute_map", {}).get(adapter.spec.num_experts_key,
                                                                             adapter.spec.num_experts_key)}:
        target[k] = width
    out.pop("auto_map", None)
    if plan.uniform:
        # the class name from the name table: importing the modeling code would cost seconds and 100 MB
        stock = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if stock:
            out["architectures"] = [stock]
    else:
        target[COUNTS_KEY] = {str(layer): n for layer, n in sorted(counts.items())}
        out["auto_map"] = dict(OWN_AUTO_MAP)
        out["architectures"] = [REMOTE_CLASS]
    holder = out if "quantization_config" in out else target
    if isinstance(holder.get("quantization_config"), dict):
        holder["quantization_config"] = pruned_quantization_config(holder["quantization_config"], adapter, plan)
    return out


def _renamed(names: list[Any], layout: KeyLayout, plan: ExportPlan) -> list[Any]:
    """Module names of a quantization config after pruning: a per-expert module of a pruned layer takes its new
    index, or disappears with its expert; patterns (``re:``, ``*``) and every other name stay as they are."""
    out = []
    for n in names:
        key = layout.parse(n) if isinstance(n, str) and not n.startswith("re:") and "*" not in n else None
        e = key.expert() if key is not None else None
        kept = plan.kept.get(key.layer) if e is not None else None
        if e is None or kept is None or len(kept) == plan.num_experts:
            out.append(n)
        elif e[0] in kept:
            out.append(key.renumbered(kept.index(e[0])))
    return out


def pruned_quantization_config(qc: dict[str, Any], adapter: MoEAdapter, plan: ExportPlan) -> dict[str, Any]:
    """The source's ``quantization_config``, kept (the quantized tensors are copied as they are) and corrected where
    it names modules: ``ignore`` / ``modules_to_not_convert`` / exact ``targets``. A non-uniform compressed-tensors
    export also declares its per-layer counts in compressed-tensors' ``moe_sparsity_config`` (>= 0.20)."""
    qc = json.loads(json.dumps(qc))
    layout = KeyLayout.of(adapter)
    for key in ("ignore", "modules_to_not_convert"):
        if isinstance(qc.get(key), list):
            qc[key] = _renamed(qc[key], layout, plan)
    for group in (qc.get("config_groups") or {}).values():
        if isinstance(group, dict) and isinstance(group.get("targets"), list):
            group["targets"] = _renamed(group["targets"], layout, plan)
    if qc.get("quant_method") == "compressed-tensors":
        if plan.uniform:
            qc.pop("moe_sparsity_config", None)
        else:
            counts = plan.counts
            qc["moe_sparsity_config"] = {"method": "prune", "num_experts": [
                counts.get(i) for i in range(adapter.config.num_hidden_layers)]}
    return qc


def check_out(out: str | Path, src: str | Path, overwrite: bool, *, what: str = "--out") -> Path:
    """The real path of a usable export destination; refuses (UsageError) one that is or overlaps the model
    directory ``src`` (compared as real paths: ``..``, trailing slashes and symlinks cannot hide it), is a symlink or
    a file, cannot be created, or is not empty, unless ``overwrite`` and it is an earlier evoreap export: evoreap
    never deletes a directory it did not write. ``what`` names the destination in messages (``--export`` for
    search's export)."""
    out = check_destination(out, sources={"model directory": src}, what=what)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{what} {out} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"{what} {out} exists and is not empty; pass --overwrite to replace an earlier export "
                             "or choose a new path")
        if not _is_export(out):
            raise UsageError(f"{what} {out} is not empty and is not an evoreap export (no evoreap.json); evoreap "
                             "replaces only its own exports: empty it yourself or choose a new path")
    check_writable_dir(out, what)
    return out


def _is_export(path: Path) -> bool:
    try:
        record = json.loads((path / "evoreap.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and record.get("format") == EXPORT_FORMAT


def plan_export(src: str | Path, kept: dict[int, list[int]], *, trust_remote_code: bool = False
                ) -> tuple[MoEAdapter, ExportPlan]:
    """Validate ``kept`` against the model in ``src`` and plan every tensor; reads only headers and config."""
    src = Path(src)
    read_source_config(src, trust_remote_code)
    adapter = MoEAdapter(load_config(str(src), trust_remote_code=trust_remote_code))
    index = CheckpointIndex(src)
    open_quantized(src, index)  # a quantized source's scales are checked against its weights
    return adapter, build_plan(index, adapter, kept)


def export_pruned(src: str | Path, out: str | Path, kept: dict[int, list[int]], *, meta: dict[str, Any] | None = None,
                  overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
                  trust_remote_code: bool = False, follow_external_links: bool = False,
                  edits: Mapping[str, Callable[[Any], Any]] | None = None, quantize: str | None = None,
                  quantize_group_size: int | None = None) -> ExportResult:
    """Write the model in ``src`` with only the ``kept`` experts to ``out``.

    Args:
        src: local model directory with safetensors weights and config.json.
        out: output directory; it appears (by rename) only once everything is written.
        kept: MoE decoder-layer index -> ascending original expert indices to keep (absent layers keep all).
        meta: provenance for evoreap.json and the model card: ``base_model``, ``command``, ``criterion``,
            ``observation_key``, ``budget``, ``proxy``, ``allocation_meta`` (other keys are kept under "extra").
        overwrite: replace a non-empty ``out`` (only after the new export is complete).
        max_shard_bytes: largest output shard.
        progress: show a tqdm bar over the bytes written.
        trust_remote_code: accept a source folder with custom code (which is still never copied).
        follow_external_links: copy auxiliary files (tokenizer, license, ...) that are symlinks leading out of
            ``src`` (as real files); without it such a file is refused before anything is written.
        edits: source tensor name -> function applied to that tensor as planned (sliced to the kept experts) before
            it is written, same dtype and shape (repaired parameters, :mod:`evoreap.recovery`); a name that is not
            written is an error.
        quantize: a compressed-tensors scheme (:data:`evoreap.export.quantize.SCHEMES`) that the pruned model's
            projection weights are quantized with (a quantized source is dequantized first; fused experts are
            quantized as per-expert Linear views); None copies the source's bytes.
        quantize_group_size: the scheme's group size (or square block) instead of its preset's 128.
    """
    t0 = time.perf_counter()
    src = real(src)
    if not src.is_dir():
        raise UsageError(f"model directory {src} does not exist")
    out = check_out(out, src, overwrite)
    raw = read_source_config(src, trust_remote_code)
    config = load_config(str(src), trust_remote_code=trust_remote_code)
    adapter = MoEAdapter(config)
    index = CheckpointIndex(src)
    quant = open_quantized(src, index, raw)  # every scale checked against its weight before anything is written
    scheme = None
    if quantize is not None:
        from evoreap.export.quantize import make_scheme  # compressed-tensors: only imported when asked for

        g = quantize_group_size
        scheme = make_scheme(quantize, group_size=g, block=(g, g) if g else None)
    plan = build_plan(index, adapter, kept)
    if edits:
        plan = _with_edits(plan, edits)
    aux = {n: f for n in AUX_FILES if (f := aux_file(src, n, follow_external_links=follow_external_links))}
    meta = {"base_model": str(src), **(meta or {})}
    if quant is not None and quantize is None:
        meta.setdefault("quantization", quant.format.label())
    if quantize is not None:
        source = f", from {quant.format.label()} dequantized" if quant is not None else ""
        meta.setdefault("quantization", f"compressed-tensors {quantize.upper()} (evoreap export --quantize{source})")
        if not adapter.spec.disk_expert_names:
            # GPT-OSS: checkpoints are stored fused, so transformers (5.24) has no conversion that stacks per-expert
            # tensors into its fused experts: it would report them unexpected and leave the experts random
            meta["loads_with"] = (f"evoreap only (evoreap.models.load_model): the {adapter.name} experts are written "
                                  "as per-expert compressed Linear weights, which transformers' loader has no "
                                  "conversion for (stock from_pretrained reports them UNEXPECTED and initialises "
                                  "the fused experts at random)")
            log.warning("%s: the %s experts are written per expert (compressed-tensors quantizes 2-D Linear "
                        "weights); load the export with evoreap, not stock transformers", out, adapter.name)

    out.parent.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in out.parent.glob(f".{out.name}.tmp-*"))
    if stale:  # a killed export leaves its hidden temp dir; it never looks like a finished export
        log.warning("%s holds leftovers of interrupted exports (%s); delete them once no export is running",
                    out.parent, ", ".join(stale))
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        shareable(tmp, directory=True)  # mkdtemp makes it private; the export should get the usual permissions
        written = plan.bytes_after
        if scheme is None:
            write_checkpoint(tmp, plan.tensors, max_shard_bytes=max_shard_bytes, progress=progress)
        else:
            from evoreap.export import quantize as q

            kv = q.kv_cache_scheme(quant)
            if quant is not None and quant.kv_cache and kv is None:
                log.warning("%s stores KV-cache scales without a compressed-tensors kv_cache_scheme; the quantized "
                            "export leaves them out", src)
            written = q.write_quantized(tmp, plan, scheme, max_shard_bytes=max_shard_bytes, progress=progress,
                                        spec=adapter.spec, quant=quant, dense_dtype=_dense_dtype(raw),
                                        skip=set() if kv or quant is None else set(quant.kv_cache))[1]
        cfg = new_config(raw, config, adapter, plan)
        if scheme is not None:
            counts = None if plan.uniform else [plan.counts.get(i) for i in range(adapter.config.num_hidden_layers)]
            cfg["quantization_config"] = q.quantization_config(scheme, q.quantized_ignore(plan), counts, kv)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if not plan.uniform:
            (tmp / MODELING_FILE).write_text(render_modeling(adapter), encoding="utf-8")
        for name, f in aux.items():  # checked before writing (aux_file): never a symlink out of src, unless asked
            shutil.copyfile(f, tmp / name)
        elements_before = sum(t.source.numel for t in plan.tensors) + sum(t.numel for t in plan.dropped)
        elements_after = sum(_numel(t.shape) for t in plan.tensors)
        record = export_record(architecture=adapter.name, model_type=adapter.config.model_type,
                               num_experts=adapter.num_experts, kept=plan.kept, uniform=plan.uniform,
                               params={"before": elements_before, "after": elements_after,
                                       "bytes_before": plan.bytes_before, "bytes_after": written}, meta=meta)
        (tmp / "evoreap.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(record, src, raw), encoding="utf-8")
        _check_written_config(tmp, adapter, plan)
        _publish(tmp, out, src, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = ExportResult(out, plan.uniform, plan.counts, plan.kept, tuple(sorted(p.name for p in out.iterdir())),
                          len(plan.tensors), len(plan.dropped), plan.bytes_before, written,
                          elements_before, elements_after, time.perf_counter() - t0)
    log.info("exported %s -> %s: %s, %d tensors (%d dropped), %.1f MB -> %.1f MB in %.1f s", src, out,
             "uniform" if plan.uniform else "non-uniform", result.tensors_written, result.tensors_dropped,
             plan.bytes_before / 1e6, written / 1e6, result.seconds)
    return result


def _dense_dtype(raw: dict[str, Any]):
    """The dtype a source's config names for its unquantized weights (bf16 when it names none)."""
    import torch

    name = raw.get("dtype") or raw.get("torch_dtype") or (raw.get("text_config") or {}).get("dtype") or "bfloat16"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16


def _with_edits(plan: ExportPlan, edits: Mapping[str, Callable[[Any], Any]]) -> ExportPlan:
    missing = sorted(set(edits) - {t.source.name for t in plan.tensors})
    if missing:
        raise EvoreapError(f"cannot apply edits to {', '.join(missing[:4])}: not written by this export (a dropped "
                           "expert, or a name the checkpoint does not have)")
    tensors = tuple(replace(t, transform=edits[t.source.name]) if t.source.name in edits else t
                    for t in plan.tensors)
    return replace(plan, tensors=tensors)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_written_config(tmp: Path, adapter: MoEAdapter, plan: ExportPlan) -> None:
    """Read the new config back as transformers will (no remote code) and check the expert counts it implies."""
    from transformers import AutoConfig  # lazy: transformers' auto classes take ~1.7 s to import

    cfg = AutoConfig.from_pretrained(str(tmp))
    got = MoEAdapter(cfg)
    if plan.uniform and plan.counts and got.num_experts != next(iter(plan.counts.values())):
        raise EvoreapError(f"the exported config reads back with {got.num_experts} experts instead of "
                           f"{next(iter(plan.counts.values()))}; please report this")
    if not plan.uniform:
        per_layer = {int(k): v for k, v in getattr(got.config, COUNTS_KEY).items()}
        if per_layer != plan.counts:
            raise EvoreapError("the exported config does not read back with the planned per-layer counts")


def _publish(tmp: Path, out: Path, src: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed last."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        check_out(out, src, overwrite)  # it may have appeared while we wrote
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "prev")
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old / "prev", out)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, out)
