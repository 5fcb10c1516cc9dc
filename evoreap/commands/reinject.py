"""``evoreap reinject``: put back the pruned experts that carry one domain and write the new allocation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evoreap.api import reinject
from evoreap.commands.common import add_model_arguments, add_runtime_arguments, positive_int

NAME = "reinject"
HELP = ("put back the pruned experts that most lower one domain's loss (ranked by that domain's saliency, "
        "confirmed by masked evaluation on its search split) and write the new allocation")
EXAMPLE = "evoreap reinject --allocation runs/NAME/best_allocation.json --domain tools --experts 4"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text[:40]!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text[:40]}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Model")
    add_model_arguments(g)
    add_runtime_arguments(g)
    g = p.add_argument_group("Re-injection")
    g.add_argument("--allocation", required=True, type=Path, help="allocation JSON (as search writes it)")
    g.add_argument("--domain", required=True,
                   help="the domain to restore: a data source of the allocation's calibration data (e.g. tools)")
    how = g.add_mutually_exclusive_group(required=True)
    how.add_argument("--experts", type=positive_int, help="experts to put back")
    how.add_argument("--budget-gb", type=_positive_float, metavar="G",
                     help="put back as many experts as G more gigabytes hold (at the checkpoint's dtype)")
    g.add_argument("--proxy", default="nll", choices=("nll", "kl"), help="the domain loss that confirms candidates")
    g.add_argument("--tokens", type=positive_int, default=8192, help="search-split tokens of the domain")
    g.add_argument("--pool", type=positive_int, default=None,
                   help="best-ranked candidates evaluated one by one (None: 3 x the experts put back)")
    g.add_argument("--no-confirm", action="store_true", help="take the best-ranked by saliency, no evaluation")
    g.add_argument("--out", type=Path, default=None, help="new allocation (None: NAME.<domain>.json beside it)")
    g.add_argument("--cache-dir", default=None, help="cache; None means $EVOREAP_CACHE or ~/.cache/evoreap")
    g.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    alloc, result, path = reinject(args.model, args.allocation, args.domain, experts=args.experts,
                                   budget_gb=args.budget_gb, out=args.out, tokens=args.tokens, proxy=args.proxy,
                                   pool=args.pool, confirm=not args.no_confirm, seed=args.seed,
                                   cache_dir=args.cache_dir, dtype=args.dtype, device=args.device,
                                   trust_remote_code=args.trust_remote_code)
    if args.json:
        print(json.dumps({"path": str(path), "added": {str(k): v for k, v in result.added.items()},
                          "before": result.before, "after": result.after, "counts": list(alloc.counts)}, indent=1))
        return 0
    added = ", ".join(f"L{layer}: {v}" for layer, v in result.added.items()) or "none"
    print(f"{args.domain} search-split {args.proxy} {result.before:.4f} -> {result.after:.4f} with experts put back "
          f"({added}); wrote {path}")
    return 0
