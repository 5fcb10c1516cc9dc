"""``export_pruned``: stream a pruned checkpoint into a new directory that appears only when it is complete."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evoreap.adapters import MoEAdapter
from evoreap.checkpoint.own_code import COUNTS_KEY, MODELING_FILE, OWN_AUTO_MAP, REMOTE_CLASS, render_modeling
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
    return out


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
    return adapter, build_plan(CheckpointIndex(src), adapter, kept)


def export_pruned(src: str | Path, out: str | Path, kept: dict[int, list[int]], *, meta: dict[str, Any] | None = None,
                  overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
                  trust_remote_code: bool = False, follow_external_links: bool = False) -> ExportResult:
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
    """
    t0 = time.perf_counter()
    src = real(src)
    if not src.is_dir():
        raise UsageError(f"model directory {src} does not exist")
    out = check_out(out, src, overwrite)
    raw = read_source_config(src, trust_remote_code)
    config = load_config(str(src), trust_remote_code=trust_remote_code)
    adapter = MoEAdapter(config)
    plan = build_plan(CheckpointIndex(src), adapter, kept)
    aux = {n: f for n in AUX_FILES if (f := aux_file(src, n, follow_external_links=follow_external_links))}
    meta = {"base_model": str(src), **(meta or {})}

    out.parent.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in out.parent.glob(f".{out.name}.tmp-*"))
    if stale:  # a killed export leaves its hidden temp dir; it never looks like a finished export
        log.warning("%s holds leftovers of interrupted exports (%s); delete them once no export is running",
                    out.parent, ", ".join(stale))
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        shareable(tmp, directory=True)  # mkdtemp makes it private; the export should get the usual permissions
        write_checkpoint(tmp, plan.tensors, max_shard_bytes=max_shard_bytes, progress=progress)
        cfg = new_config(raw, config, adapter, plan)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if not plan.uniform:
            (tmp / MODELING_FILE).write_text(render_modeling(adapter), encoding="utf-8")
        for name, f in aux.items():  # checked before writing (aux_file): never a symlink out of src, unless asked
            shutil.copyfile(f, tmp / name)
        elements_before = sum(t.source.numel for t in plan.tensors) + sum(t.numel for t in plan.dropped)
        elements_after = sum(_numel(t.shape) for t in plan.tensors)
        record = export_record(architecture=adapter.name, model_type=adapter.config.model_type,
                               num_experts=adapter.num_experts, kept=plan.kept, uniform=plan.uniform,
                               params={"before": elements_before, "after": elements_after}, meta=meta)
        (tmp / "evoreap.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(record), encoding="utf-8")
        _check_written_config(tmp, adapter, plan)
        _publish(tmp, out, src, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = ExportResult(out, plan.uniform, plan.counts, plan.kept, tuple(sorted(p.name for p in out.iterdir())),
                          len(plan.tensors), len(plan.dropped), plan.bytes_before, plan.bytes_after,
                          elements_before, elements_after, time.perf_counter() - t0)
    log.info("exported %s -> %s: %s, %d tensors (%d dropped), %.1f MB -> %.1f MB in %.1f s", src, out,
             "uniform" if plan.uniform else "non-uniform", result.tensors_written, result.tensors_dropped,
             plan.bytes_before / 1e6, plan.bytes_after / 1e6, result.seconds)
    return result


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
