"""``evoreap evaluate``: a pruned model (masked allocation or exported directory) against the unpruned one."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from evoreap.allocation import Allocation
from evoreap.commands.common import DEFAULTS, add_chat_template_argument, add_model_arguments, \
    add_placement_arguments, add_runtime_arguments, positive_int, seq_len_type, setting_help
from evoreap.criteria import DEFAULT_CRITERION
from evoreap.data.loader import read_chat_template
from evoreap.errors import UsageError
from evoreap.files import check_writable_dir, write_json_atomic
from evoreap.harness import HarnessSettings, parse_tasks, task_manager  # imports lm_eval only when it runs
from evoreap.observe.store import cache_root
from evoreap.pipeline.judge import evaluate_pruned
from evoreap.recovery.store import resolve_repair

NAME = "evaluate"
HELP = "held-out NLL/perplexity, KL, ESAP, top-1 agreement and generations of a pruned model vs the unpruned one"
EXAMPLE = "evoreap evaluate --allocation runs/demo-half/best_allocation.json --data demo --json"

log = logging.getLogger("evoreap.evaluate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_runtime_arguments(p)
    add_placement_arguments(p)
    p.add_argument("--offload", action="store_true", help=setting_help("offload"))
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--allocation", help="allocation JSON (best_allocation.json of a search, or your own)")
    what.add_argument("--pruned", help="a directory written by evoreap export")
    p.add_argument("--data", default=DEFAULTS.heldout_data,
                   help="evaluation data spec (split 'heldout' for bundled domains)")
    p.add_argument("--tokens", type=positive_int, default=DEFAULTS.heldout_tokens, help="evaluation tokens")
    p.add_argument("--seq-len", type=seq_len_type, default=DEFAULTS.seq_len, help=setting_help("seq_len"))
    p.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size, help=setting_help("batch_size"))
    p.add_argument("--reference-top-k", type=positive_int, default=DEFAULTS.reference_top_k,
                   help=setting_help("reference_top_k"))
    p.add_argument("--criterion", default=None,
                   help="criterion choosing experts when the allocation lists none; None: the allocation's own, "
                        f"else {DEFAULT_CRITERION}")
    p.add_argument("--observation", default=None,
                   help="observation key for --criterion; None: the allocation's own, else the model is observed on "
                        "the default calibration data (once, then cached)")
    p.add_argument("--cache-dir", default=None, help="observation/reference cache")
    p.add_argument("--generate", type=int, default=32, help="greedy tokens generated per domain prompt (0: none)")
    p.add_argument("--allow-overlap", action="store_true", help="evaluate even on data the pruning was fitted to")
    add_chat_template_argument(p)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write the results there: evaluation.json (this table) and, with --lm-eval, "
                        "lm_eval_results.json (lm-eval's own results document per model); None: print only")
    h = p.add_argument_group("lm-eval-harness (the lm_eval extra)")
    h.add_argument("--lm-eval", default=None, metavar="TASKS",
                   help="also run these comma-separated lm-eval tasks on the unpruned and the pruned model; "
                        "evoreap_demo (or evoreap_demo_math, _tools, _ppl_<domain>) are bundled and need no hub")
    h.add_argument("--lm-eval-include", action="append", default=[], metavar="DIR",
                   help="directory of your own lm-eval task YAMLs (local data_files need no hub); repeatable")
    h.add_argument("--lm-eval-limit", type=int, default=None, metavar="N", help="at most N documents per task")
    h.add_argument("--lm-eval-batch-size", type=positive_int, default=8, help="lm-eval batch size")
    h.add_argument("--num-fewshot", type=int, default=None, metavar="N",
                   help="few-shot examples per lm-eval prompt; None: each task's own")
    h.add_argument("--apply-chat-template", action="store_true",
                   help="render lm-eval prompts with the chat template (the tokenizer's, or --chat-template)")
    p.add_argument("--repair", default=None, metavar="FILE",
                   help="repaired parameters for --allocation (None: its NAME.repair.safetensors if present)")
    p.add_argument("--no-repair", action="store_true", help="ignore a repair file beside the allocation")
    p.add_argument("--json", action="store_true", help="print JSON for machines")


def run(args: argparse.Namespace) -> int:
    if args.out is not None:  # a file or an unwritable place fails before any model work
        check_writable_dir(args.out, "--out")
    harness = _harness(args)  # a missing package or an unknown task fails before any model work
    allocation = Allocation.load(args.allocation) if args.allocation else None
    repair = resolve_repair(args.allocation, False if args.no_repair else args.repair) if allocation else None
    result = evaluate_pruned(args.model, allocation=allocation, pruned=args.pruned, data=args.data,
                             tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                             reference_top_k=args.reference_top_k, criterion=args.criterion,
                             observation=args.observation, cache_dir=args.cache_dir, generate_tokens=args.generate,
                             allow_overlap=args.allow_overlap, dtype=args.dtype, device=args.device, seed=args.seed,
                             trust_remote_code=args.trust_remote_code, harness=harness,
                             chat_template=args.chat_template, repair=repair, device_map=args.device_map,
                             max_memory=args.max_memory, offload=args.offload)
    report = result.as_dict()
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "evaluation.json", report)
        if result.lm_eval_output is not None:
            write_json_atomic(out / "lm_eval_results.json", result.lm_eval_output)
        log.info("wrote %s", ", ".join(str(p) for p in sorted(out.glob("*.json"))))
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    _print(report)
    return 0


def _harness(args: argparse.Namespace):
    if not args.lm_eval:
        if args.lm_eval_include or args.lm_eval_limit is not None or args.num_fewshot is not None or \
                args.apply_chat_template:
            raise UsageError("--lm-eval-include/--lm-eval-limit/--num-fewshot/--apply-chat-template need "
                             "--lm-eval TASKS")
        return None
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError(f"--num-fewshot must be 0 or more, got {args.num_fewshot}")
    template = read_chat_template(args.chat_template) if args.chat_template else None

    if args.lm_eval_limit is not None and args.lm_eval_limit < 1:
        raise UsageError(f"--lm-eval-limit must be at least 1, got {args.lm_eval_limit}")
    settings = HarnessSettings(parse_tasks(args.lm_eval), tuple(args.lm_eval_include), args.lm_eval_limit,
                               args.lm_eval_batch_size, args.seed, args.num_fewshot, args.apply_chat_template,
                               template)
    return settings, task_manager(settings, cache_root(args.cache_dir))


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
