"""What an export says about itself: ``evoreap.json`` (for machines) and a ``README.md`` model card (for people)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from evoreap.version import __version__

FORMAT = "evoreap-export"

# keys of ``meta`` that export_pruned knows; anything else is kept under "extra"
META_KEYS = ("base_model", "base_model_id", "command", "criterion", "observation_key", "budget", "proxy",
             "allocation_meta", "allocation_file", "calibration")


def export_record(*, architecture: str, model_type: str, num_experts: int, kept: dict[int, tuple[int, ...]],
                  uniform: bool, params: dict[str, int], meta: dict[str, Any]) -> dict[str, Any]:
    """The ``evoreap.json`` document: kept original expert indices per layer and where they came from."""
    extra = {k: v for k, v in meta.items() if k not in META_KEYS}
    record = {
        "format": FORMAT,
        "version": 1,
        "evoreap_version": __version__,
        "base_model": meta.get("base_model"),
        "base_model_id": meta.get("base_model_id"),
        "architecture": architecture,
        "model_type": model_type,
        "num_experts": num_experts,
        "uniform": uniform,
        "experts_per_layer": {str(layer): len(k) for layer, k in sorted(kept.items())},
        "kept_experts": {str(layer): list(k) for layer, k in sorted(kept.items())},
        "criterion": meta.get("criterion"),
        "observation_key": meta.get("observation_key"),
        "budget": meta.get("budget"),
        "proxy": meta.get("proxy"),
        "params": params,
        "command": meta.get("command"),
        "allocation_file": meta.get("allocation_file"),
        "allocation_meta": meta.get("allocation_meta") or {},
        "calibration": meta.get("calibration"),
    }
    if extra:
        record["extra"] = extra
    return record


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v, sort_keys=True) + "`"
    return str(v)


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def hub_id(name: Any) -> str | None:
    """``name`` if it reads as a hub model id (``owner/name``) and is not a local path, else None."""
    if not isinstance(name, str) or not _HUB_ID.match(name) or name.startswith((".", "/")) or Path(name).exists():
        return None
    return name


def base_model_id(record: dict[str, Any], source_config: dict[str, Any] | None) -> str | None:
    """The hub id of the base model: ``--base-model``, else the source config's ``_name_or_path`` when it names
    one (transformers writes the id a model was loaded from there), else the repo of a hub cache snapshot
    directory (``models--OWNER--NAME/snapshots/...``), else None."""
    cached = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", str(record.get("base_model") or ""))
    return hub_id(record.get("base_model_id")) or hub_id((source_config or {}).get("_name_or_path")) or (
        f"{cached.group(1)}/{cached.group(2)}" if cached else None)  # a hub cache snapshot names its repo


def source_license(source_dir: Path | None) -> str | None:
    """The license in the source model's own card (its README.md front matter), if any."""
    readme = source_dir / "README.md" if source_dir is not None else None
    if readme is None or not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data.license
    except Exception:  # a hand-written README without front matter, or a malformed one: no license carried
        return None


def _size(n: int) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _eval_results(record: dict[str, Any], name: str) -> list[Any]:
    """The held-out values a search recorded (``meta.heldout``), as model-index eval results."""
    from huggingface_hub import EvalResult

    meta = record.get("allocation_meta") or {}
    heldout = meta.get("heldout")
    if not isinstance(heldout, dict):
        return []
    data = str(meta.get("heldout_data") or "demo")
    out = []
    for metric, value in heldout.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append(EvalResult(task_type="text-generation", dataset_type=f"evoreap/{data}",
                                  dataset_name=f"held-out split of {data}", dataset_split="heldout",
                                  metric_type=metric, metric_value=round(float(value), 6),
                                  metric_name=f"{metric} vs the unpruned model" if metric in ("kl", "esap")
                                  else metric))
    return out


def model_card(record: dict[str, Any], source_dir: str | Path | None = None,
               source_config: dict[str, Any] | None = None) -> str:
    """The README.md model card, built with huggingface_hub's ``ModelCard``/``ModelCardData``: base model (as a hub
    id where one is known), the source card's license, tags, calibration data, the full observation key, the
    budget as fraction, parameters and bytes, the allocation table, held-out results (model-index) and the command
    that reproduces it."""
    from huggingface_hub import ModelCard, ModelCardData

    src = Path(source_dir) if source_dir is not None else None
    base_id = base_model_id(record, source_config)
    base = base_id or record["base_model"] or "unknown"
    e = record["num_experts"]
    counts = record["experts_per_layer"]
    total_kept, total = sum(counts.values()), e * len(counts)
    params = record["params"]
    name = f"{str(base).rstrip('/').split('/')[-1]}-evoreap-{100 * total_kept / max(total, 1):.0f}pct"
    calibration = record.get("calibration") or {}
    datasets = sorted({s["spec"][3:].split("?")[0].split("@")[0] for s in calibration.get("sources", [])
                       if isinstance(s, dict) and str(s.get("spec", "")).startswith("hf:")})
    data = ModelCardData(base_model=base_id, license=source_license(src), library_name="transformers",
                         pipeline_tag="text-generation", model_name=name,
                         tags=["moe", "expert-pruning", "reap", "evoreap",
                               "uniform" if record["uniform"] else "non-uniform-experts"],
                         datasets=datasets or None, eval_results=_eval_results(record, name) or None)
    if record["uniform"]:
        load = ("All MoE layers keep the same number of experts, so the config is a stock one: it loads with plain "
                "`AutoModelForCausalLM.from_pretrained(path)` (and in vLLM/SGLang) without remote code.")
        snippet = "model = AutoModelForCausalLM.from_pretrained(path)"
    else:
        load = ("MoE layers keep different numbers of experts (`evoreap_experts_per_layer` in config.json). "
                "Stock transformers cannot size such layers, so the folder bundles `modeling_evoreap.py`, a thin "
                "subclass of the stock model generated by evoreap (read it: about 60 lines) that only resizes each "
                "layer's router and experts before the weights load. Without `trust_remote_code=True` stock "
                "transformers refuses the folder with a size MISMATCH report. vLLM/SGLang need uniform counts.")
        snippet = "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"
    loads_with = (record.get("extra") or {}).get("loads_with")
    if loads_with:  # a quantized export that only evoreap's loader reads correctly (see export_pruned)
        load = f"Loads with {loads_with}."
        snippet = "import evoreap.models\nmodel = evoreap.models.load_model(path).model"
    meta = record.get("allocation_meta") or {}
    budget = record.get("budget")
    bytes_line = (f"{_size(params['bytes_before'])} -> {_size(params['bytes_after'])} "
                  f"({100 * params['bytes_after'] / max(params['bytes_before'], 1):.1f}%)"
                  if "bytes_before" in params else "n/a")
    calib_lines = [f"- `{s.get('spec')}`: {s.get('rows')} records read, {s.get('sequences')} sequences, "
                   f"{s.get('tokens'):,} tokens, content sha256 `{s.get('fingerprint') or 'n/a (streamed)'}`"
                   for s in calibration.get("sources", []) if isinstance(s, dict) and isinstance(s.get("tokens"), int)]
    if not calib_lines:
        spec = meta.get("calibration_data")
        tokens = calibration.get("tokens")
        calib_lines = [f"- `{spec}`" if spec else f"- {tokens:,} tokens (this observation did not record its sources)"
                       if isinstance(tokens, int) else "- n/a (the allocation lists its experts)"]
    results = [f"| {r.metric_type} | {r.metric_value} |" for r in data.eval_results or []]
    content = "\n".join([
        f"# {name}",
        "",
        f"Routed experts of **{base}** ({record['architecture']}) pruned by evoreap {record['evoreap_version']}: "
        f"{total_kept} of {total} routed experts kept ({100 * total_kept / max(total, 1):.1f}%).",
        "",
        "## Budget",
        "",
        "| | before | after |",
        "| --- | ---: | ---: |",
        f"| routed experts | {total} | {total_kept} ({100 * total_kept / max(total, 1):.1f}%) |",
        f"| parameters (all stored weights) | {params['before']:,} | {params['after']:,} "
        f"({100 * params['after'] / max(params['before'], 1):.1f}%) |",
        f"| bytes | {_size(params['bytes_before']) if 'bytes_before' in params else 'n/a'} | "
        f"{_size(params['bytes_after']) if 'bytes_after' in params else 'n/a'} |",
        "",
        f"Search budget: {_fmt(budget) if budget is not None else 'none (a hand-written allocation)'}; "
        f"bytes {bytes_line}.",
        "",
        "## Loading",
        "",
        load,
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        snippet,
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "```",
        "",
        "## Allocation",
        "",
        "| layer | kept | original |",
        "| ---: | ---: | ---: |",
        *(f"| {layer} | {k} | {e} |" for layer, k in counts.items()),
        "",
        "The original indices of the kept experts are in `evoreap.json` (`kept_experts`); kept experts are "
        "renumbered 0..k-1 in that order.",
        "",
        "## Calibration data",
        "",
        *calib_lines,
        "",
        *(["## Held-out results", "", "| metric | value |", "| --- | ---: |", *results, ""] if results else []),
        "## How it was made",
        "",
        f"- base model: {base}" + (f" (local copy: `{record['base_model']}`)" if base_id else ""),
        f"- criterion: {_fmt(record['criterion'])}",
        f"- observation key: `{record['observation_key'] or 'n/a'}`",
        f"- proxy values: {_fmt(record['proxy'])}",
        f"- evoreap version: {record['evoreap_version']}",
        "",
        "Reproduce:",
        "",
        "```bash",
        record["command"] or "(made through the Python API: evoreap.export.export_pruned)",
        "```",
        "",
        "Upload with the `hf` CLI (huggingface_hub): `hf upload YOUR_NAME/" + name + " PATH .`",
        "",
    ])
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n{{ content }}\n",
                                   content=content).content
