"""Domain-targeted pruning: calibrate and search on one domain, compare held-out loss per domain with a generic
(all-domain) search at the same budget, in one run on the demo model.

    python benchmarks/domain_targeted.py --domain code --budget 0.5
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from evoreap.cli import main as cli


def search(runs: Path, cache: Path, name: str, args: argparse.Namespace, extra: list[str]) -> dict:
    argv = ["search", "-q", "--budget", str(args.budget), "--runs-dir", str(runs), "--cache-dir", str(cache),
            "--run", name, "--generations", str(args.generations), "--criterion", args.criterion, "--no-plots",
            *extra]
    if args.model:
        argv += ["--model", args.model]
    assert cli(argv) == 0
    return json.loads((runs / name / "result.json").read_text())["heldout"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--domain", default="code")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--generations", type=int, default=15)
    ap.add_argument("--criterion", default="reap")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="evoreap-bench-domain-"))
    runs, cache = work / "runs", work / "cache"
    generic = search(runs, cache, "generic", args, [])
    d = args.domain
    targeted = search(runs, cache, f"targeted-{d}", args,
                      ["--calib-data", d, "--data", d, "--proxy-weights", f"{d}:1"])
    domains = list(generic["unpruned"]["per_domain"])
    print(f"\nHeld-out NLL per domain at budget {args.budget:g} (criterion {args.criterion}); "
          f"targeted = calibration and search on '{d}' only\n")
    print("| model | " + " | ".join(domains) + " |")
    print("|---" * (len(domains) + 1) + "|")
    table = [("unpruned", generic["unpruned"]), ("generic search", generic["searched"]),
             (f"{d}-targeted search", targeted["searched"])]
    for name, row in table:
        print(f"| {name} | " + " | ".join(f"{row['per_domain'][x]['nll']:.3f}" for x in domains) + " |")
    base = generic["unpruned"]["per_domain"][d]["nll"]
    g = generic["searched"]["per_domain"][d]["nll"] - base
    t = targeted["searched"]["per_domain"][d]["nll"] - base
    print(f"\n{d} held-out NLL above unpruned: generic +{g:.3f}, targeted +{t:.3f} "
          f"({100 * (1 - t / g):.0f}% less damage)" if g > 0 else "")


if __name__ == "__main__":
    main()
