"""``evoreap inspect``: the MoE structure and parameter budget of a model, read from its config (no weights)."""

from __future__ import annotations

import argparse
import json

import torch

from evoreap.adapters import MoEAdapter
from evoreap.checkpoint.layout import KeyLayout
from evoreap.checkpoint.quant import WEIGHT, detect, open_quantized
from evoreap.checkpoint.reader import local_checkpoint
from evoreap.checkpoint.trust import needs_trust
from evoreap.commands.common import add_model_arguments
from evoreap.models import load_config, model_class, resolve_model

NAME = "inspect"
HELP = "show a model's MoE layers, experts, routing and parameter counts"
EXAMPLE = "evoreap inspect ./Qwen3-30B-A3B --json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, positional=True)
    p.add_argument("--json", action="store_true", help="print JSON for machines")


def stored_bytes(path: str) -> tuple[int, dict[str, int]] | None:
    """Bytes of all tensors of a local checkpoint (from its validated safetensors headers) and bytes by dtype; None
    for a hub id or a directory without safetensors weights."""
    index = local_checkpoint(path)
    if index is None:
        return None
    by_dtype: dict[str, int] = {}
    for t in index:
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
    return sum(by_dtype.values()), by_dtype


def bytes_by_part(path: str, adapter: MoEAdapter, config) -> dict[str, int]:
    """Stored bytes of routed experts, routers and the rest; for a quantized checkpoint the scales (and packed shapes,
    zero points) of each part apart from its weights (``expert_scales``, ``other_scales``)."""
    index = local_checkpoint(path)
    quant = open_quantized(path, index, config)
    roles = quant.role_of() if quant is not None else {}
    layout = KeyLayout.of(adapter)
    out = {"experts": 0, "routers": 0, "other": 0}
    if quant is not None:
        out |= {"expert_scales": 0, "other_scales": 0}
    for t in index:
        key = layout.parse(t.name)
        part = "routers" if key is not None and key.is_router else "experts" if key is not None else "other"
        if roles.get(t.name, WEIGHT) != WEIGHT and part != "routers":
            part = "expert_scales" if part == "experts" else "other_scales"
        out[part] += t.nbytes
    return out


def describe(name: str | None, trust_remote_code: bool = False) -> dict:
    from transformers import AutoModelForCausalLM  # lazy: ~1.7 s to import, and `evoreap --help` imports this module

    path = resolve_model(name)
    trust_remote_code = needs_trust(path, trust_remote_code)
    config = load_config(path, trust_remote_code=trust_remote_code)
    adapter = MoEAdapter(config)
    with torch.device("meta"):  # shapes only: inspecting a 1 TB model costs nothing
        cls = model_class(path, config)  # evoreap's own class for its non-uniform exports: no directory code
        model = (AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
                 if cls is AutoModelForCausalLM else cls._from_config(config))
    layers = adapter.layers(model)
    params = adapter.param_summary(model)
    info = {
        "model": path,
        "architecture": adapter.name,
        "model_type": config.model_type,
        "decoder_layers": config.num_hidden_layers,
        "moe_layers": [layer.index for layer in layers],
        "experts_per_layer": {str(layer.index): layer.num_experts for layer in layers},
        "top_k": adapter.top_k,
        "router": adapter.router_description,
        "shared_experts": list(adapter.spec.shared_attrs),
        "params": params,
    }
    disk = stored_bytes(path)
    quant = detect(config)
    if quant is not None:
        info["quantization"] = quant.describe()
        kv = quant.config.get("kv_cache_scheme")
        if kv:  # calibrated KV-cache scales (k_scale / v_scale), copied as they are by export
            info["quantization"]["kv_cache_scheme"] = kv
    if disk is not None:
        info["stored_bytes"], info["stored_bytes_by_dtype"] = disk
        info["stored_bytes_by_part"] = bytes_by_part(path, adapter, config)
    else:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
        size = torch.empty((), dtype=getattr(torch, str(dtype).replace("torch.", ""))).element_size()
        info["stored_bytes"] = params["total"] * size
    return info


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def run(args: argparse.Namespace) -> int:
    info = describe(args.model, args.trust_remote_code)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    p = info["params"]
    counts = sorted(set(info["experts_per_layer"].values()))
    experts = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]} (non-uniform)"
    moe = info["moe_layers"]
    dense = info["decoder_layers"] - len(moe)
    rows = [
        ("model", info["model"]),
        ("architecture", f"{info['architecture']} ({info['model_type']})"),
        ("layers", f"{info['decoder_layers']} decoder layers, {len(moe)} MoE ({moe[0]}..{moe[-1]}), {dense} dense"),
        ("experts per layer", experts),
        ("top-k", str(info["top_k"])),
        ("router", info["router"]),
        ("shared experts", ", ".join(info["shared_experts"]) or "none"),
        ("params per expert", f"{p['per_expert']:,}"),
        ("params total", f"{p['total']:,} ({_fmt(p['total'])})"),
        ("routed experts", f"{p['routed_experts']:,} ({100 * p['routed_experts'] / p['total']:.1f}% of total)"),
        ("shared experts params", f"{p['shared_experts']:,}"),
        ("active per token", f"{p['active_per_token']:,} ({_fmt(p['active_per_token'])})"),
        ("stored size", f"{info['stored_bytes']:,} bytes ({_fmt(info['stored_bytes'])}B)"),
    ]
    if "stored_bytes_by_part" in info:
        rows.append(("stored by part", ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}B"
                                                  for k, v in info["stored_bytes_by_part"].items())))
    q = info.get("quantization")
    if q is not None:
        block = "x".join(str(b) for b in q["block"]) if q.get("block") else "none"
        extra = f", {'; '.join(q['scheme'])}" if q.get("scheme") else ""
        rows.append(("quantization", f"{q['method']}: {q['format']}, block {block}{extra}"))
        kv = q.get("kv_cache_scheme")
        if kv:
            kv_text = (kv if not isinstance(kv, dict) else
                       f"{kv.get('type', '')}{kv.get('num_bits', '')} {kv.get('strategy', '')} "
                       f"{'dynamic' if kv.get('dynamic') else 'static'}")
            rows.append(("kv cache", f"{kv_text} (k_scale / v_scale stored)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
