"""Search quality and cost on the demo model, measured in one run.

For each budget: held-out KL and NLL to the unpruned model of uniform-frequency, uniform-criterion and the searched
allocation. For one budget also the tokens the multi-fidelity search needed to reach its best, against a
single-fidelity search (every candidate scored on all tokens) with the same settings and seed.

    python benchmarks/search.py                      # budgets 0.25 0.5 0.75 on the bundled demo
    python benchmarks/search.py --budgets 0.5 --generations 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from evoreap.cli import main as cli


def run_search(runs: Path, cache: Path, name: str, budget: float, args: argparse.Namespace,
               fidelities: str, survivors: str) -> dict:
    argv = ["search", "-q", "--budget", str(budget), "--runs-dir", str(runs), "--cache-dir", str(cache),
            "--run", name, "--generations", str(args.generations), "--criterion", args.criterion,
            "--proxy", args.proxy, "--fidelities", fidelities, "--survivors", survivors, "--no-plots",
            "--seed", str(args.seed)]
    if args.model:
        argv += ["--model", args.model]
    t = time.time()
    assert cli(argv) == 0
    result = json.loads((runs / name / "result.json").read_text())
    history = json.loads((runs / name / "history.json").read_text())["history"]
    top = max(h["tokens"] for h in history)
    best = result["best_value"]
    reached = next(h["tokens_spent"] for h in history if h["tokens"] == top and h["value"] <= best + 1e-12)
    return {"result": result, "seconds": time.time() - t, "tokens_to_best": reached,
            "tokens_total": result["tokens_spent"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--criterion", default="reap")
    ap.add_argument("--proxy", default="kl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fidelity-budget", type=float, default=0.5, help="budget of the single-fidelity comparison")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="evoreap-bench-search-"))
    runs, cache = work / "runs", work / "cache"
    rows = {}
    for b in args.budgets:
        rows[b] = run_search(runs, cache, f"multi-{b}", b, args, "4096,16384,32768", "4,2")
    print(f"\nHeld-out (demo heldout split) distance to the unpruned model, criterion {args.criterion}, "
          f"proxy {args.proxy}, {args.generations} generations\n")
    print("| budget | allocation | KL | NLL | ESAP | search s |")
    print("|---|---|---|---|---|---|")
    for b, r in rows.items():
        held = r["result"]["heldout"]
        for name in ("unpruned", "uniform (frequency)", f"uniform ({args.criterion})", "searched"):
            if name in held:
                v = held[name]["values"]
                secs = f"{r['seconds']:.0f}" if name == "searched" else ""
                print(f"| {b:g} | {name} | {v['kl']:.4f} | {v['nll']:.4f} | {v['esap']:.4f} | {secs} |")
    b = args.fidelity_budget
    multi = rows.get(b) or run_search(runs, cache, f"multi-{b}", b, args, "4096,16384,32768", "4,2")
    single = run_search(runs, cache, f"single-{b}", b, args, "32768,32768,32768", "4,2")
    print(f"\nSearch cost at budget {b:g}: tokens scored until the best allocation was found\n")
    print("| search | best search KL | held-out KL | tokens to best | tokens total | seconds |")
    print("|---|---|---|---|---|---|")
    for name, r in (("multi-fidelity 4k/16k/32k", multi), ("single-fidelity 32k", single)):
        print(f"| {name} | {r['result']['best_value']:.5f} | {r['result']['heldout']['searched']['values']['kl']:.4f}"
              f" | {r['tokens_to_best']:,} | {r['tokens_total']:,} | {r['seconds']:.0f} |")
    print(f"\nratio single/multi tokens to best: {single['tokens_to_best'] / max(multi['tokens_to_best'], 1):.2f}x; "
          f"total: {single['tokens_total'] / max(multi['tokens_total'], 1):.2f}x  (runs kept in {work})")


if __name__ == "__main__":
    main()
