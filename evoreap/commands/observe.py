"""``evoreap observe``: record per-expert routing statistics on calibration data (cached), show scores, list
criteria."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from evoreap import api, models  # models.load_model is looked up at call time (tests replace it to catch early loads)
from evoreap.commands.common import DEFAULTS, add_chat_template_argument, add_data_arguments, add_model_arguments, \
    add_placement_arguments, add_runtime_arguments
from evoreap.criteria import DEFAULT_CRITERION, DEFAULT_MIN_COUNT, criterion_values, get_criterion, list_criteria, \
    score_experts
from evoreap.data.loader import check_seq_len
from evoreap.errors import UsageError
from evoreap.files import cache_root, check_writable_dir
from evoreap.models import load_config, resolve_model
from evoreap.observe.sequential import describe_checkpoint
from evoreap.observe.store import describe_model, load_observation, observations_dir

NAME = "observe"
HELP = "record per-expert routing statistics (REAP and others) on calibration data"
EXAMPLE = "evoreap observe --model ./Qwen3-30B-A3B --data code:0.5,tools:0.5 --tokens 200000"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_runtime_arguments(p)
    add_placement_arguments(p, max_memory=False)  # observe's --max-memory streams layers (below)
    add_data_arguments(p, default_split="calibration", tokens=DEFAULTS.calib_tokens)
    add_chat_template_argument(p)
    p.add_argument("--cache-dir", default=None,
                   help="where observations are stored (unset: $EVOREAP_CACHE, else ~/.cache/evoreap)")
    p.add_argument("--min-count", type=int, default=DEFAULT_MIN_COUNT,
                   help="routed tokens below which an expert's mean (reap, ean) is not trusted: it ranks after "
                        "every trusted expert; 0 trusts every routed expert")
    p.add_argument("--offload", action="store_true",
                   help="sequential mode for models larger than memory: load one decoder layer at a time from the "
                        "safetensors files")
    p.add_argument("--max-memory", type=float, default=None, metavar="GIB",
                   help="implies --offload; hidden states between layers beyond this many GiB go to a temporary "
                        "directory on disk (2 GiB when only --offload is given)")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="batches between resumable checkpoints of an interrupted observation (unset: 16, or with "
                        "--offload a single pass, since every chunk reads every layer again)")
    p.add_argument("--show", metavar="KEY", default=None,
                   help="print the per-layer expert scores of a stored observation (key, key prefix or directory)")
    p.add_argument("--criterion", default=DEFAULT_CRITERION,
                   help="criterion for --show and the summary's top expert")
    p.add_argument("--json", action="store_true", help="with --show: print JSON")
    p.add_argument("--list-criteria", action="store_true", help="list the expert-scoring criteria and exit")


def _list_criteria() -> int:
    items = list_criteria()
    width = max(len(n) for n, _ in items)
    for name, desc in items:
        print(f"{name:<{width}}  {desc}")
    return 0


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _summary(stats, criterion: str, min_count: int, seed: int) -> list[str]:
    scores = score_experts(stats, criterion, min_count=min_count, seed=seed)
    lines = []
    for i in stats.layers:
        c = stats.count[i]
        routed = c > 0
        top = int(torch.argmax(scores[i]))
        low = int(((c > 0) & (c < min_count)).sum())
        lines.append(f"layer {i:>3}: {stats.tokens} tokens, routed per expert min {int(c.min())} / max {int(c.max())}, "
                     f"{int((~routed).sum())} dead, {low} below --min-count, top by {criterion}: expert {top} "
                     f"({_fmt(float(scores[i][top]))})")
    return lines


def _show(args: argparse.Namespace) -> int:
    expect = None
    if args.model is not None:  # --model given: the observation must have been made with that model
        if Path(resolve_model(args.model)).is_dir():  # config, tokenizer and routers only: no weights are loaded
            info = describe_checkpoint(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                                       cache_dir=args.cache_dir)[2]
        else:
            info = describe_model(models.load_model(args.model, dtype=args.dtype, device=args.device,
                                                    trust_remote_code=args.trust_remote_code), args.cache_dir)
        expect = info["fingerprint"]["sha256"]
    obs = load_observation(args.show, cache_dir=args.cache_dir, expect_model_fingerprint=expect)
    stats = obs.stats
    scores = score_experts(stats, args.criterion, min_count=args.min_count, seed=args.seed)
    values = criterion_values(stats, args.criterion, seed=args.seed)
    unit = get_criterion(args.criterion).unit or "the criterion's own score"
    m = obs.manifest
    if args.json:
        print(json.dumps({"key": obs.key, "criterion": args.criterion, "unit": unit, "min_count": args.min_count,
                          "values": {str(i): v.tolist() for i, v in values.items()},
                          "scores": {str(i): s.tolist() for i, s in scores.items()},
                          "count": {str(i): stats.count[i].tolist() for i in stats.layers},
                          "sources": m.get("data", {}).get("sources", [])}, indent=1))
        return 0
    print(f"observation {obs.key}")
    print(f"model {m.get('model', {}).get('path')} ({m.get('model', {}).get('architecture')}), {stats.tokens} tokens "
          f"({', '.join(f'{d} {n}' for d, n in zip(stats.domains, stats.domain_tokens)) or 'one domain'}), "
          f"seq_len {m.get('data', {}).get('seq_len')}")
    for line in source_lines(m):
        print(line)
    print(f"criterion {args.criterion}: {unit} (higher = keep)")
    print("rows: expert index; columns: L<i> = decoder layer i; * = never routed (no tokens), "
          f"~ = routed fewer than --min-count {args.min_count} times (value shown, but ranked after every unmarked "
          "expert of its layer)")
    layers = stats.layers
    header = "expert " + "".join(f"{'L' + str(i):>11}" for i in layers)
    print(header)
    for e in range(max(stats.count[i].numel() for i in layers)):
        cells = []
        for i in layers:
            if e >= stats.count[i].numel():
                cells.append(f"{'':>11}")
                continue
            c = float(stats.count[i][e])
            mark = "*" if c == 0 else "~" if c < args.min_count else " "
            cells.append(f"{_fmt(float(values[i][e])):>10}{mark}")
        print(f"{e:>6} " + "".join(cells))
    return 0


def source_lines(manifest: dict) -> list[str]:
    """One line per data source the observation read: what it was, its content fingerprint, rows and tokens
    taken (observations made before sources were recorded have none)."""
    lines = []
    sources = manifest.get("data", {}).get("sources", [])
    for s in sources if isinstance(sources, list) else []:
        if not isinstance(s, dict):
            continue
        fp = str(s.get("fingerprint") or "n/a (streamed; tokens " + str(s.get("tokens_sha256", "?"))[:16] + ")")
        lines.append(f"  source {s.get('name')}: {s.get('spec')}, fingerprint {fp[:16]}, "
                     f"{s.get('rows')} rows read, {s.get('sequences')} sequences, {s.get('tokens')} tokens")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.list_criteria:
        return _list_criteria()
    get_criterion(args.criterion)  # fail on a typo before any work
    if args.min_count < 0:
        raise UsageError(f"--min-count must be >= 0, got {args.min_count}")
    if args.show is not None:
        if not args.show.strip():
            raise UsageError("--show needs an observation key, key prefix or directory (printed by evoreap observe)")
        return _show(args)
    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    for flag, value in (("--tokens", args.tokens), ("--samples", args.samples),
                        ("--checkpoint-every", args.checkpoint_every)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    # the cache is where the observation goes: a file or an unwritable place fails before the model is loaded
    check_writable_dir(cache_root(args.cache_dir),
                       "--cache-dir" if args.cache_dir is not None else "cache directory ($EVOREAP_CACHE)")

    # --seq-len beyond the model's positions: refused from config.json, before any weight is read
    check_seq_len(args.seq_len, load_config(args.model, trust_remote_code=args.trust_remote_code))

    if args.max_memory is not None and not 0 < args.max_memory < float("inf"):  # also refuses nan
        raise UsageError(f"--max-memory must be a positive number of GiB, got {args.max_memory}")
    obs = api.observe(args.model, args.data, tokens=args.tokens, samples=args.samples, seq_len=args.seq_len,
                      batch_size=args.batch_size, seed=args.seed, cache_dir=args.cache_dir, dtype=args.dtype,
                      device=args.device, trust_remote_code=args.trust_remote_code, offload=args.offload,
                      max_memory_gb=args.max_memory, checkpoint_every=args.checkpoint_every, progress=not args.quiet,
                      chat_template=args.chat_template, device_map=args.device_map)
    key, stats = obs.key, obs.stats
    print(f"observation {key}")
    print(f"stored in {observations_dir(args.cache_dir) / key}")
    for line in _summary(stats, args.criterion, args.min_count, args.seed):
        print(line)
    return 0
