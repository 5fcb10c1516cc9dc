"""``evoreap repair``: fit the routers (and optionally norms and expert scales) of a pruned allocation back to the
unpruned model; the result lies beside the allocation, where ``evaluate`` and ``export`` apply it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evoreap.api import repair
from evoreap.commands.common import (DEFAULTS, add_model_arguments, add_runtime_arguments, positive_int,
                                     seq_len_type, setting_help)
from evoreap.recovery.repair import FIT_TOKENS, OBJECTIVES, PARAM_SETS, QUANTIZED_PARAMS, SCHEDULES, RepairSettings

NAME = "repair"
HELP = ("router repair after pruning: fit the kept router rows (+ norm before each MoE block, + per-expert output "
        "scales, + a low-rank update of each kept expert's down projection) so the pruned model matches the unpruned "
        "one; early stopping on the search split")
EXAMPLE = "evoreap repair --allocation runs/NAME/best_allocation.json --params router+scale --objective kl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Model")
    add_model_arguments(g)
    add_runtime_arguments(g)
    g.add_argument("--offload", action="store_true",
                   help="stream the model from its directory's shards one decoder layer at a time (models larger "
                        "than memory; --objective local only: each layer is fitted while it is read, resumable "
                        "after every layer)")
    g.add_argument("--max-memory", default=None, metavar="GB",
                   help="stream the model as --offload does when its weights (in --dtype) exceed this many GB")
    g = p.add_argument_group("Allocation")
    g.add_argument("--allocation", required=True, type=Path, help="allocation JSON (as search writes it)")
    g.add_argument("--criterion", default=None, help="criterion for a counts-only allocation (None: its meta)")
    g.add_argument("--observation", default=None, metavar="KEY", help="observation for a counts-only allocation")
    g.add_argument("--cache-dir", default=None, help="cache; None means $EVOREAP_CACHE or ~/.cache/evoreap")
    g = p.add_argument_group("Repair")
    g.add_argument("--params", default=None, choices=tuple(PARAM_SETS),
                   help="what is fitted: the kept router rows (with router biases), plus the norm before each MoE "
                        "block and/or one output scale per kept expert, and/or (lowrank) a low-rank update of each "
                        f"kept expert's down projection, merged into the expert weights on export (default: "
                        f"{RepairSettings.params}; {QUANTIZED_PARAMS} for a quantized checkpoint)")
    g.add_argument("--rank", type=positive_int, default=RepairSettings.rank,
                   help="rank of the down projection update of the lowrank parameter sets")
    g.add_argument("--objective", default=RepairSettings.objective, choices=tuple(OBJECTIVES),
                   help="; ".join(f"{k}: {v}" for k, v in OBJECTIVES.items()))
    g.add_argument("--data", default=None, help="fitting text (split calibration; None: the allocation's "
                                                "calibration data, else demo)")
    g.add_argument("--stop-data", default=None, help="early-stopping text (split search; None: the allocation's "
                                                     "search data, else demo)")
    g.add_argument("--fit-tokens", type=positive_int, default=FIT_TOKENS, help="tokens of fitting text")
    g.add_argument("--stop-tokens", type=positive_int, default=8192, help="tokens of early-stopping text")
    g.add_argument("--epochs", type=positive_int, default=RepairSettings.epochs, help="passes over the fitting text")
    g.add_argument("--lr", type=float, default=RepairSettings.lr, help="Adam learning rate (peak, with a schedule)")
    g.add_argument("--schedule", default=RepairSettings.schedule, choices=SCHEDULES,
                   help="learning rate over the steps: cosine (5%% warm-up, then cosine decay to 0) or constant")
    g.add_argument("--patience", type=positive_int, default=RepairSettings.patience,
                   help="search-split evaluations without improvement before stopping")
    g.add_argument("--batch-size", type=positive_int, default=RepairSettings.batch_size, help="sequences per step")
    g.add_argument("--seq-len", type=seq_len_type, default=DEFAULTS.seq_len, help=setting_help("seq_len"))
    g.add_argument("--guard", action="store_true",
                   help="never hurt a domain: reject a repair that makes one domain's search-split KL worse by more "
                        "than --guard-tolerance (without it such domains are only reported)")
    g.add_argument("--guard-tolerance", type=float, default=RepairSettings.guard_tolerance,
                   help="relative worsening of one domain's search-split KL that counts as hurting it")
    g.add_argument("--out", type=Path, default=None,
                   help="repair file (None: NAME.repair.safetensors beside the allocation)")
    g.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    result = repair(args.model, args.allocation, params=args.params, objective=args.objective, out=args.out,
                    data=args.data, stop_data=args.stop_data, fit_tokens=args.fit_tokens,
                    stop_tokens=args.stop_tokens, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                    epochs=args.epochs, patience=args.patience, schedule=args.schedule, seed=args.seed,
                    rank=args.rank, guard=args.guard, guard_tolerance=args.guard_tolerance,
                    criterion=args.criterion, observation=args.observation, cache_dir=args.cache_dir,
                    dtype=args.dtype, device=args.device,
                    trust_remote_code=args.trust_remote_code, offload=args.offload, max_memory=args.max_memory)
    if args.json:
        print(json.dumps({"path": str(result.path), "accepted": result.accepted,
                          "search_kl_before": result.search_kl_before, "search_kl_after": result.search_kl_after,
                          "hurt_domains": {d: list(v) for d, v in result.hurt_domains.items()},
                          "seconds": result.seconds}, indent=1))
        return 0
    hurt = result.hurt_domains
    if result.accepted:
        verdict = "kept"
    elif hurt and args.guard:
        verdict = "rejected (it hurts a domain, --guard; the file holds the unrepaired values)"
    else:
        verdict = "rejected (no improvement; the file holds the unrepaired values)"
    print(f"repair ({result.repair.meta['params']}, {args.objective}): search-split KL "
          f"{result.search_kl_before:.4f} -> {result.search_kl_after:.4f}, {verdict}, {result.seconds:.0f} s; "
          f"wrote {result.path}")
    if hurt:
        print("worse on the search split: " + ", ".join(f"{d} KL {a:.4f} -> {b:.4f}" for d, (a, b) in hurt.items())
              + ("" if args.guard else " (--guard refuses a repair that hurts a domain)"))
    return 0
