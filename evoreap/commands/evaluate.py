"""``evoreap evaluate``: a pruned model (masked allocation or exported directory) against the unpruned one."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from evoreap.commands.common import add_model_arguments, add_runtime_arguments, positive_int, seq_len_type
from evoreap.errors import UsageError

NAME = "evaluate"
HELP = "held-out NLL/perplexity, KL, ESAP, top-1 agreement and generations of a pruned model vs the unpruned one"
EXAMPLE = "evoreap evaluate --allocation runs/demo-half/best_allocation.json --data demo --json"

log = logging.getLogger("evoreap.evaluate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_runtime_arguments(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--allocation", help="allocation JSON (best_allocation.json of a search, or your own)")
    what.add_argument("--pruned", help="a directory written by evoreap export")
    p.add_argument("--data", default="demo", help="evaluation data spec (split 'heldout' for bundled domains)")
    p.add_argument("--tokens", type=positive_int, default=32768, help="evaluation tokens")
    p.add_argument("--seq-len", type=seq_len_type, default=256, help="tokens per packed sequence")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass")
    p.add_argument("--reference-top-k", type=int, default=64, help="top-K log-probs kept of the unpruned model")
    p.add_argument("--criterion", default=None, help="criterion choosing experts when the allocation lists none")
    p.add_argument("--observation", default=None, help="observation key for --criterion")
    p.add_argument("--cache-dir", default=None, help="observation/reference cache")
    p.add_argument("--generate", type=int, default=32, help="greedy tokens generated per domain prompt (0: none)")
    p.add_argument("--allow-overlap", action="store_true", help="evaluate even on data the pruning was fitted to")
    h = p.add_argument_group("lm-eval-harness (the lm_eval extra)")
    h.add_argument("--lm-eval", default=None, metavar="TASKS",
                   help="also run these comma-separated lm-eval tasks on the unpruned and the pruned model; "
                        "evoreap_demo (or evoreap_demo_math, _tools, _ppl_<domain>) are bundled and need no hub")
    h.add_argument("--lm-eval-include", action="append", default=[], metavar="DIR",
                   help="directory of your own lm-eval task YAMLs (local data_files need no hub); repeatable")
    h.add_argument("--lm-eval-limit", type=int, default=None, metavar="N", help="at most N documents per task")
    h.add_argument("--lm-eval-batch-size", type=int, default=8, help="lm-eval batch size")
    p.add_argument("--json", action="store_true", help="print JSON for machines")


def _pruning_meta(args: argparse.Namespace):
    """``(allocation, meta)``: the allocation (None for --pruned) read by the one allocation reader, and the meta
    that names the data the pruning was fitted to."""
    from evoreap.allocation import Allocation, read_json

    if args.allocation:
        alloc = Allocation.load(args.allocation)
        return alloc, alloc.meta
    info = Path(args.pruned) / "evoreap.json"
    if not info.is_file():
        raise UsageError(f"{args.pruned} has no evoreap.json; pass a directory written by evoreap export")
    record = read_json(info, "export record")
    meta = record.get("meta", record) if isinstance(record, dict) else None
    if not isinstance(meta, dict):
        raise UsageError(f"export record {info} is not a JSON object; export the model again")
    return None, meta


def _candidate(args, loaded, alloc):
    from evoreap.adapters import MoEAdapter
    from evoreap.evaluation import Candidate

    if alloc is not None:
        from evoreap.allocation import keep_masks

        alloc.validate(loaded.adapter)  # the same validator as export: counts and any listed experts
        scores = None
        if alloc.experts is None:
            from evoreap.criteria import score_experts
            from evoreap.observe.store import check_routers, load_observation, router_tensors

            key = args.observation or alloc.meta_text("observation_key")
            criterion = args.criterion or alloc.meta_text("criterion")
            if not key or not criterion:
                raise UsageError("the allocation lists no experts; pass --observation KEY and --criterion NAME")
            obs = load_observation(key, cache_dir=args.cache_dir, expect_experts={
                layer.index: layer.num_experts for layer in loaded.adapter.layers(loaded.model)})
            check_routers(obs, router_tensors(loaded.model, loaded.adapter), str(loaded.path))
            scores = score_experts(obs.stats, criterion)
        masks = keep_masks(loaded.adapter, alloc, scores)  # listed experts, or chosen by scores (kept_experts)
        return Candidate("pruned (masked)", loaded.model, loaded.adapter, masks)
    from evoreap.models import load_model

    # evoreap's own modeling code in a non-uniform export is recognised byte for byte (evoreap.models.needs_trust)
    pruned = load_model(args.pruned, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    return Candidate("pruned (exported)", pruned.model, MoEAdapter.for_model(pruned.model), exported=True)


def run(args: argparse.Namespace) -> int:
    from evoreap.allocation import meta_text
    from evoreap.data import load_tokens
    from evoreap.data.guard import check_overlap
    from evoreap.evaluation import Candidate, as_row, generate, prompts_for, score
    from evoreap.data.loader import check_seq_len
    from evoreap.models import load_config, load_model
    from evoreap.reference import reference_cached

    harness = _harness(args)  # a missing package or an unknown task fails before any model work
    alloc, meta = _pruning_meta(args)
    where = alloc.source if alloc is not None else f"export record {Path(args.pruned) / 'evoreap.json'}"
    fitted = {role: (meta_text(meta, key, where), split) for role, key, split in
              (("calibration", "calibration_data", "calibration"), ("search", "search_data", "search"))
              if meta_text(meta, key, where)}
    if fitted:
        check_overlap({**fitted, "evaluation": (args.data, "heldout")}, allow=args.allow_overlap)
        if harness and harness[0].uses_demo_tasks:
            check_overlap({**fitted, "lm-eval demo task": ("demo", "heldout")}, allow=args.allow_overlap)
    model = args.model or meta_text(meta, "model", where)
    check_seq_len(args.seq_len, load_config(model, trust_remote_code=args.trust_remote_code))  # before any weight
    loaded = load_model(model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    cand = _candidate(args, loaded, alloc)  # a bad allocation fails before any reference is computed and cached
    data = load_tokens(args.data, loaded.tokenizer, split="heldout", seq_len=args.seq_len, tokens=args.tokens,
                       seed=args.seed, model_config=loaded.adapter.config)
    reference = reference_cached(loaded.model, data, top_k=args.reference_top_k, cache_dir=args.cache_dir,
                                 batch_size=args.batch_size)
    full = Candidate("unpruned", loaded.model, loaded.adapter)
    rows = {c.name: as_row(score(c, data, reference, args.batch_size)) for c in (full, cand)}
    gens = {}
    if args.generate > 0:
        for domain, prompt in prompts_for(data, loaded.tokenizer).items():
            gens[domain] = {"prompt": prompt, **{c.name: generate(c, loaded.tokenizer, prompt, args.generate)
                                                 for c in (full, cand)}}
    report = {"model": loaded.path, "data": args.data, "tokens": data.num_tokens, "results": rows,
              "generations": gens}
    if harness:
        report["lm_eval"] = _lm_eval((full, cand), loaded.tokenizer, *harness)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    _print(report)
    return 0


def _harness(args: argparse.Namespace):
    if not args.lm_eval:
        if args.lm_eval_include or args.lm_eval_limit is not None:
            raise UsageError("--lm-eval-include/--lm-eval-limit need --lm-eval TASKS")
        return None
    from evoreap.harness import HarnessSettings, parse_tasks, task_manager
    from evoreap.observe.store import cache_root

    if args.lm_eval_limit is not None and args.lm_eval_limit < 1:
        raise UsageError(f"--lm-eval-limit must be at least 1, got {args.lm_eval_limit}")
    settings = HarnessSettings(parse_tasks(args.lm_eval), tuple(args.lm_eval_include), args.lm_eval_limit,
                               args.lm_eval_batch_size, args.seed)
    return settings, task_manager(settings, cache_root(args.cache_dir))


def _lm_eval(candidates, tokenizer, settings, manager) -> dict:
    """lm-eval metrics per task, for each candidate (a masked one under its masks)."""
    from evoreap.harness import run_harness
    from evoreap.masking import masked

    results = {}
    for cand in candidates:
        log.info("lm-eval %s on %s", ",".join(settings.tasks), cand.name)
        with masked(cand.model, cand.adapter, cand.masks or {}):
            results[cand.name] = run_harness(cand.model, tokenizer, settings, manager)
    return results


def _print(report: dict) -> None:
    names = list(report["results"])
    print(f"model {report['model']}, data {report['data']}, {report['tokens']:,} tokens")
    print(f"{'':18s}" + "".join(f"{n:>34s}" for n in names))
    header = f"{'domain':18s}" + "".join(f"{'NLL':>7s}{'PPL':>8s}{'KL':>7s}{'ESAP':>6s}{'top1':>6s}" for _ in names)
    print(header)
    domains = ["overall", *report["results"][names[0]]["per_domain"]]
    for d in domains:
        line = f"{d:18s}"
        for n in names:
            r = report["results"][n]
            v = r["overall"] if d == "overall" else r["per_domain"][d]
            line += f"{v['nll']:7.3f}{v['ppl']:8.1f}{v['kl']:7.3f}{v['esap']:6.3f}{v['top1']:6.3f}"
        print(line)
    if "lm_eval" in report:
        _print_lm_eval(report["lm_eval"], names)
    for domain, g in report["generations"].items():
        print(f"\n[{domain}] prompt: {g['prompt']!r}")
        for n in names:
            print(f"  {n:18s} {g[n]!r}")


def _print_lm_eval(results: dict, names: list[str]) -> None:
    print(f"\nlm-eval{'':29s}" + "".join(f"{n:>20s}" for n in names))
    first = results[names[0]]
    for task in first:
        for metric in first[task]:
            if metric.endswith("_stderr") or metric == "sample_len":
                continue
            cells = ""
            for n in names:
                v, err = results[n][task].get(metric), results[n][task].get(f"{metric}_stderr")
                cells += f"{v:>20.4f}" if err is None else f"{f'{v:.4f} ± {err:.4f}':>20s}"
            print(f"{task[:24]:24s} {metric[:11]:11s}" + cells)
