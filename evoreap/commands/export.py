"""``evoreap export``: write a pruned checkpoint (streamed shard by shard) that loads with transformers."""

from __future__ import annotations

import argparse
from pathlib import Path

from evoreap.adapters import MoEAdapter
from evoreap.allocation import Allocation
from evoreap.api import export, source_dir
from evoreap.checkpoint.quant import quant_label
from evoreap.commands.common import add_model_arguments
from evoreap.criteria import DEFAULT_CRITERION
from evoreap.errors import UsageError
from evoreap.export import plan_export
from evoreap.export.writer import split_shards
from evoreap.models import load_config
from evoreap.pipeline.choose import choose_experts

NAME = "export"
HELP = ("write a pruned checkpoint: uniform allocations give a stock config (transformers, vLLM); non-uniform ones "
        "give per-layer counts plus evoreap's bundled modeling code (load with trust_remote_code=True)")
EXAMPLE = ("evoreap export --model ./Qwen3-30B-A3B --allocation runs/NAME/best_allocation.json "
           "--out ./Qwen3-30B-A3B-pruned")

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Model")
    add_model_arguments(g)
    g = p.add_argument_group("Allocation")
    g.add_argument("--allocation", required=True, type=Path,
                   help='allocation JSON ({"layers": {"3": 12, ...}}); with "experts": {"3": [0, 4, ...]} the kept '
                        "original indices are taken from it, otherwise they are chosen by --criterion scores")
    g.add_argument("--criterion", default=None,
                   help="saliency criterion that picks the kept experts; None: the allocation's meta.criterion, "
                        f"else {DEFAULT_CRITERION}")
    g.add_argument("--observation", default=None, metavar="KEY",
                   help="observation key whose statistics the criterion scores; None: the allocation's "
                        "meta.observation_key, else the model is observed on the default calibration data (once)")
    g.add_argument("--cache-dir", default=None, help="observation cache; None means $EVOREAP_CACHE or ~/.cache/evoreap")
    g = p.add_argument_group("Output")
    g.add_argument("--out", required=True, type=Path, help="output directory (must not exist or be empty)")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new export is done")
    g.add_argument("--copy-external-links", action="store_true",
                   help="copy tokenizer/license files that are symlinks leading out of the model directory (as real "
                        "files); without it such a link is refused")
    g.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB")
    g.add_argument("--base-model", default=None, metavar="HUB_ID",
                   help="hub id the model card names as base model (e.g. Qwen/Qwen3-30B-A3B); None: the source "
                        "config's _name_or_path or hub cache folder when they name one")
    g.add_argument("--quantize", default=None, metavar="SCHEME",
                   help="quantize the pruned model's projection weights with compressed-tensors (W4A16, W4A16_ASYM, "
                        "W8A16, FP8_DYNAMIC, FP8_BLOCK; routers, embeddings and lm_head stay unquantized; fused "
                        "experts become per-expert Linear weights; a quantized source is dequantized first) and write "
                        "a compressed-tensors checkpoint; needs the quant extra. Static-activation schemes (FP8, "
                        "NVFP4) are refused: they need calibration")
    g.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="group size (or NxN block for FP8_BLOCK) of --quantize instead of the preset's 128")
    g.add_argument("--dry-run", action="store_true",
                   help="validate and print the plan (tensors kept/sliced/dropped, bytes before/after); write nothing")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--repair", default=None, type=Path, metavar="FILE",
                   help="repaired parameters to write (None: the allocation's NAME.repair.safetensors if present)")
    g.add_argument("--no-repair", action="store_true", help="ignore a repair file beside the allocation")


def parse_size(text: str) -> int:
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _SIZE_UNITS or value <= 0:
        raise UsageError(f"--max-shard-size {text!r} is not a size; use e.g. 5GB, 500MB or 2GiB")
    return int(value * _SIZE_UNITS[unit])


def _fmt_bytes(n: int) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def print_plan(adapter, plan, max_shard: int, quantize: str | None = None) -> None:
    acts = plan.action_counts()
    counts = plan.counts
    print(f"architecture      {adapter.name} ({adapter.config.model_type}), {adapter.num_experts} experts per layer")
    print(f"allocation        {'uniform' if plan.uniform else 'non-uniform'}: "
          + ", ".join(f"L{layer}:{n}" for layer, n in counts.items()))
    print(f"tensors           {len(plan.tensors)} written: {acts['copy']} copied, {acts['slice']} sliced, "
          f"{acts['renumber']} renumbered; {acts['drop']} dropped")
    print(f"bytes             {_fmt_bytes(plan.bytes_before)} -> {_fmt_bytes(plan.bytes_after)} "
          f"({100 * plan.bytes_after / max(plan.bytes_before, 1):.1f}%)")
    print(f"shards            {len(split_shards(plan.tensors, max_shard))} (max {_fmt_bytes(max_shard)})")
    loads = "stock transformers / vLLM" if plan.uniform else "trust_remote_code=True (bundled modeling_evoreap.py)"
    if quantize is not None and not adapter.spec.disk_expert_names:
        # written per expert, which transformers has no conversion for on a fused-only architecture (GPT-OSS)
        loads = "evoreap only (evoreap.models.load_model): per-expert quantized weights of a fused architecture"
    print(f"loads with        {loads}")
    quant = quant_label(adapter.config)
    if quantize is not None:
        source = f", from {quant} dequantized" if quant is not None else ""
        print(f"quantization      compressed-tensors {quantize.upper()} (--quantize{source}); routers and lm_head "
              "unquantized")
    elif quant is not None:
        print(f"quantization      {quant}: kept experts' quantized tensors and scales copied byte for byte")


def run(args: argparse.Namespace) -> int:
    max_shard = parse_size(args.max_shard_size)
    if args.dry_run:
        allocation = Allocation.load(args.allocation)
        src = source_dir(args.model, allocation)
        adapter = MoEAdapter(load_config(src, trust_remote_code=args.trust_remote_code))
        chosen = choose_experts(allocation, adapter, src, criterion=args.criterion, observation=args.observation,
                                cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code)
        if args.quantize is not None:  # a scheme that would be refused is refused here too
            from evoreap.export.quantize import make_scheme  # compressed-tensors: only imported when asked for

            g = args.group_size
            make_scheme(args.quantize, group_size=g, block=(g, g) if g else None)
        adapter, plan = plan_export(src, chosen.kept, trust_remote_code=args.trust_remote_code)
        print_plan(adapter, plan, max_shard, quantize=args.quantize)
        return 0
    result = export(args.allocation, args.out, model=args.model, criterion=args.criterion,
                    observation=args.observation, cache_dir=args.cache_dir, overwrite=args.overwrite,
                    max_shard_bytes=max_shard, progress=not args.no_progress,
                    trust_remote_code=args.trust_remote_code, copy_external_links=args.copy_external_links,
                    base_model=args.base_model, repair=False if args.no_repair else args.repair,
                    quantize=args.quantize, quantize_group_size=args.group_size)
    kind = "uniform (stock config)" if result.uniform else "non-uniform (load with trust_remote_code=True)"
    shards = sum(f.endswith(".safetensors") for f in result.files)
    print(f"wrote {result.out}: {kind}, {result.tensors_written} tensors in {shards} shard(s), "
          f"{_fmt_bytes(result.bytes_before)} -> {_fmt_bytes(result.bytes_after)}, "
          f"{result.elements_before:,} -> {result.elements_after:,} weights, {result.seconds:.1f} s")
    return 0
