"""``evoreap export``: write a pruned checkpoint (streamed shard by shard) that loads with transformers."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from evoreap.allocation import Allocation
from evoreap.commands.common import add_model_arguments
from evoreap.errors import EvoreapError, UsageError


NAME = "export"
HELP = ("write a pruned checkpoint: uniform allocations give a stock config (transformers, vLLM); non-uniform ones "
        "give per-layer counts plus evoreap's bundled modeling code (load with trust_remote_code=True)")
EXAMPLE = ("evoreap export --model ./Qwen3-30B-A3B --allocation runs/x/candidates/best_allocation.json "
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
                   help="saliency criterion that picks the kept experts; falls back to the allocation's meta.criterion")
    g.add_argument("--observation", default=None, metavar="KEY",
                   help="observation key whose statistics the criterion scores; falls back to the allocation's "
                        "meta.observation_key")
    g.add_argument("--cache-dir", default=None, help="observation cache; None means $EVOREAP_CACHE or ~/.cache/evoreap")
    g = p.add_argument_group("Output")
    g.add_argument("--out", required=True, type=Path, help="output directory (must not exist or be empty)")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new export is done")
    g.add_argument("--copy-external-links", action="store_true",
                   help="copy tokenizer/license files that are symlinks leading out of the model directory (as real "
                        "files); without it such a link is refused")
    g.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB")
    g.add_argument("--dry-run", action="store_true",
                   help="validate and print the plan (tensors kept/sliced/dropped, bytes before/after); write nothing")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


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


def _check_observation_routers(src: str, adapter, observation) -> None:
    from evoreap.export.plan import router_tensor_infos
    from evoreap.export.reader import CheckpointIndex, read_tensor
    from evoreap.observe.store import check_routers

    infos = router_tensor_infos(CheckpointIndex(src), adapter)
    check_routers(observation, {name: read_tensor(info) for name, info in infos.items()}, src)


def _scored_experts(args: argparse.Namespace, src: str, allocation: Allocation, adapter
                    ) -> tuple[dict[int, list[int]], str, str]:
    """Kept experts chosen by a criterion's scores on a stored observation."""
    criterion = args.criterion or allocation.meta_text("criterion")
    key = args.observation or allocation.meta_text("observation_key")
    if not criterion or not key:
        raise UsageError("the allocation does not list its kept experts; pass --observation KEY and --criterion NAME "
                         "(see evoreap observe) so that export can choose them")
    try:
        from evoreap.allocation import kept_experts
        from evoreap.criteria import score_experts
        from evoreap.observe.store import load_observation
    except ImportError as e:
        raise EvoreapError(f"choosing experts by criterion needs the observation store, which this install lacks "
                           f"({e}); list the kept experts in the allocation's \"experts\" field instead") from None
    kwargs = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    observation = load_observation(key, **kwargs,
                                   expect_experts={i: adapter.num_experts for i in adapter.moe_layer_indices})
    _check_observation_routers(src, adapter, observation)
    scores = score_experts(observation.stats, criterion)
    missing = sorted(set(allocation.layers) - set(scores))
    if missing:
        raise UsageError(f"observation {key} has no statistics for MoE layers {missing}; was it made for this model?")
    return kept_experts(allocation, adapter, scores), criterion, key


def resolve_kept(args: argparse.Namespace, src: str, adapter
                 ) -> tuple[dict[int, list[int]], Allocation, dict[str, Any]]:
    """The kept original expert indices per MoE layer, the allocation and the provenance for the export record."""
    from evoreap.allocation import kept_experts

    path = args.allocation
    allocation = Allocation.load(path).validate(adapter)  # the one reader and validator (evaluate uses the same)
    if allocation.experts is not None:
        kept = kept_experts(allocation, adapter)
        criterion = args.criterion or allocation.meta_text("criterion")
        key = args.observation or allocation.meta_text("observation_key")
    else:
        kept, criterion, key = _scored_experts(args, src, allocation, adapter)
    meta = allocation.meta
    proxy = meta.get("proxy", meta.get("proxy_values"))
    if proxy is None:
        proxy = {k: meta[k] for k in ("kl", "nll", "loss", "ppl", "score") if k in meta} or None
    record = {"criterion": criterion, "observation_key": key, "budget": meta.get("budget"), "proxy": proxy,
              "allocation_meta": meta, "allocation_file": str(Path(path).resolve()),
              "command": shlex.join(["evoreap", *sys.argv[1:]])}
    return kept, allocation, record


def _fmt_bytes(n: int) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def print_plan(adapter, plan, max_shard: int) -> None:
    from evoreap.export.writer import split_shards

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
    print(f"loads with        {loads}")


def run(args: argparse.Namespace) -> int:
    from evoreap.adapters import MoEAdapter
    from evoreap.export import export_pruned, plan_export
    from evoreap.export.core import check_out, read_source_config
    from evoreap.models import load_config, resolve_model

    src = resolve_model(args.model)
    if not Path(src).is_dir():
        raise UsageError(f"export reads safetensors files from a local directory, and {src} is not one; download the "
                         "model first (e.g. hf download ID --local-dir DIR) and pass --model DIR")
    max_shard = parse_size(args.max_shard_size)
    if not args.dry_run:  # a bad --out fails before any weight is read or scored
        check_out(args.out, src, args.overwrite)
    read_source_config(Path(src), args.trust_remote_code)  # refuse custom code before running any of it
    adapter = MoEAdapter(load_config(src, trust_remote_code=args.trust_remote_code))
    kept, allocation, meta = resolve_kept(args, src, adapter)
    if args.dry_run:
        adapter, plan = plan_export(src, kept, trust_remote_code=args.trust_remote_code)
        print_plan(adapter, plan, max_shard)
        return 0
    result = export_pruned(src, args.out, kept, meta=meta, overwrite=args.overwrite, max_shard_bytes=max_shard,
                           progress=not args.no_progress, trust_remote_code=args.trust_remote_code,
                           follow_external_links=args.copy_external_links)
    kind = "uniform (stock config)" if result.uniform else "non-uniform (load with trust_remote_code=True)"
    shards = sum(f.endswith(".safetensors") for f in result.files)
    print(f"wrote {result.out}: {kind}, {result.tensors_written} tensors in {shards} shard(s), "
          f"{_fmt_bytes(result.bytes_before)} -> {_fmt_bytes(result.bytes_after)}, "
          f"{result.elements_before:,} -> {result.elements_after:,} weights, {result.seconds:.1f} s")
    return 0
