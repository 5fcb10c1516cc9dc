"""Router repair on the demo: held-out NLL and KL before and after repair, per parameter set and objective, for
uniform and searched allocations at several budgets, with the time each repair took (one process, side by side).

    python benchmarks/recovery.py --searched 0.5=runs/NAME/best_allocation.json --params router,router+scale \\
        --objectives kl,local

Uniform rows keep the same count in every layer, experts chosen by the default criterion (reap_x_frequency) on
the default calibration observation, exactly as ``evoreap search`` builds its uniform baseline. Fitting text is the
calibration split, early stopping the search split; held-out is only ever scored.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from evoreap.allocation import Allocation, kept_experts
from evoreap.criteria import DEFAULT_CRITERION, DEFAULT_MIN_COUNT, score_experts
from evoreap.data import load_tokens
from evoreap.models import load_model
from evoreap.observe.store import observe_cached
from evoreap.pipeline.config import SearchConfig
from evoreap.proxies import evaluate
from evoreap.recovery import RepairSettings, applied, fit_repair, storage_dtype
from evoreap.recovery.reinject import reinject, saliency
from evoreap.reference import reference_cached
from evoreap.search.space import Budget, SearchSpace, load_space_settings


def masks_of(adapter, kept):
    e = adapter.num_experts
    return {i: torch.zeros(e, dtype=torch.bool).index_fill_(0, torch.tensor(k), True)
            for i, k in kept.items() if len(k) < e}


def heldout_row(model, adapter, kept, held, ref, repair=None):
    with applied(model, repair, kept):
        r = evaluate(model, adapter, masks_of(adapter, kept) if kept else None, held, proxies=("nll", "kl"),
                     reference=ref, other_model=repair is not None)
    return {"nll": r.values["nll"], "kl": r.values["kl"],
            "per_domain": {d: {"nll": v["nll"], "kl": v["kl"]} for d, v in r.per_domain.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="0.25,0.5,0.75")
    ap.add_argument("--searched", default="", help="BUDGET=FILE,... searched allocations (best_allocation.json)")
    ap.add_argument("--params", default="router,router+norm,router+scale")
    ap.add_argument("--objectives", default="kl,local")
    ap.add_argument("--kinds", default="uniform,searched")
    ap.add_argument("--fit-tokens", type=int, default=16384)
    ap.add_argument("--stop-tokens", type=int, default=8192)
    ap.add_argument("--heldout-tokens", type=int, default=32768)
    ap.add_argument("--epochs", type=int, default=RepairSettings.epochs)
    ap.add_argument("--lr", type=float, default=RepairSettings.lr)
    ap.add_argument("--out", default="benchmarks/recovery.json")
    ap.add_argument("--reinject", default=None, metavar="DOMAIN",
                    help="instead: re-injection for DOMAIN on the first --searched allocation (4 experts by the "
                         "domain's saliency, confirmed or not, against the 4 of highest global saliency)")
    args = ap.parse_args()

    defaults = SearchConfig()
    loaded = load_model(None)
    model, adapter, tok = loaded.model, loaded.adapter, loaded.tokenizer
    calib = load_tokens(defaults.calib_data, tok, split="calibration", seq_len=defaults.seq_len,
                        tokens=defaults.calib_tokens, seed=defaults.seed)
    _, stats = observe_cached(loaded, calib, progress=False)
    scores = score_experts(stats, DEFAULT_CRITERION, min_count=DEFAULT_MIN_COUNT, seed=defaults.seed)
    fit = load_tokens("demo", tok, split="calibration", seq_len=256, tokens=args.fit_tokens, seed=0)
    stop = load_tokens("demo", tok, split="search", seq_len=256, tokens=args.stop_tokens, seed=0)
    held = load_tokens("demo", tok, split="heldout", seq_len=256, tokens=args.heldout_tokens, seed=0)
    fit_ref = reference_cached(model, fit, progress=False)
    stop_ref = reference_cached(model, stop, progress=False)
    held_ref = reference_cached(model, held, progress=False)
    dtype = storage_dtype(loaded.path, adapter, torch.float32)
    searched = dict(item.split("=", 1) for item in args.searched.split(",") if item)
    space_settings = load_space_settings("default")

    if args.reinject:
        return reinject_benchmark(args, model, adapter, tok, stats, scores, searched)
    results = {"unpruned": heldout_row(model, adapter, None, held, held_ref), "rows": []}
    print(f"unpruned held-out NLL {results['unpruned']['nll']:.4f}", flush=True)
    for budget in [float(b) for b in args.budgets.split(",")]:
        space = SearchSpace.build(adapter, space_settings, Budget.resolve(adapter, fraction=budget))
        allocs = {}
        if "uniform" in args.kinds:
            allocs["uniform"] = kept_experts(Allocation(space.layers, tuple(space.uniform)), adapter, scores)
        if "searched" in args.kinds and str(budget) in searched:
            alloc = Allocation.load(searched[str(budget)])
            allocs["searched"] = kept_experts(alloc, adapter, None if alloc.experts is not None else scores)
        for kind, kept in allocs.items():
            before = heldout_row(model, adapter, kept, held, held_ref)
            print(f"{budget:.2f} {kind:8s} unrepaired: NLL {before['nll']:.4f} KL {before['kl']:.4f}", flush=True)
            for objective in args.objectives.split(","):
                for params in args.params.split(","):
                    settings = RepairSettings(params=params, objective=objective, epochs=args.epochs, lr=args.lr)
                    t0 = time.time()
                    rep = fit_repair(model, adapter, kept, fit, stop, stop_reference=stop_ref,
                                     fit_reference=fit_ref if objective == "kl" else None, settings=settings,
                                     storage_dtype=dtype, progress=False)
                    seconds = time.time() - t0
                    after = heldout_row(model, adapter, kept, held, held_ref, rep)
                    row = {"budget": budget, "allocation": kind, "counts": [len(kept[i]) for i in sorted(kept)],
                           "params": params, "objective": objective, "before": before, "after": after,
                           "accepted": rep.accepted, "search": rep.meta["search"], "steps": rep.meta["steps"],
                           "seconds": round(seconds, 1)}
                    results["rows"].append(row)
                    print(f"{budget:.2f} {kind:8s} {params:18s} {objective:5s} NLL {before['nll']:.4f} -> "
                          f"{after['nll']:.4f}  KL {before['kl']:.4f} -> {after['kl']:.4f}  "
                          f"(search KL {rep.meta['search']['kl_before']:.4f} -> {rep.meta['search']['kl_after']:.4f}"
                          f", {'kept' if rep.accepted else 'rejected'}, {rep.meta['steps']} steps, {seconds:.0f} s)",
                          flush=True)
                    Path(args.out).write_text(json.dumps(results, indent=1))


def reinject_benchmark(args, model, adapter, tok, stats, scores, searched) -> None:
    domain = args.reinject
    budget, path = next(iter(searched.items()))
    alloc = Allocation.load(path)
    kept = kept_experts(alloc, adapter, None if alloc.experts is not None else scores)
    search = load_tokens(domain, tok, split="search", seq_len=256, tokens=8192, seed=0)
    held = load_tokens(domain, tok, split="heldout", seq_len=256, tokens=args.heldout_tokens, seed=0)
    held_ref = reference_cached(model, held, progress=False)
    rows = {"searched allocation": kept}
    timing = {}
    for name, sal, confirm in ((f"+4 by {domain} saliency, confirmed", saliency(stats, domain), True),
                               (f"+4 by {domain} saliency", saliency(stats, domain), False),
                               ("+4 by global saliency", saliency(stats), False)):
        t0 = time.time()
        r = reinject(model, adapter, kept, sal, 4, search, confirm=confirm, progress=False)
        timing[name] = round(time.time() - t0, 1)
        rows[name] = r.kept
        print(f"{name}: added {r.added}, {domain} search NLL {r.before:.4f} -> {r.after:.4f} ({timing[name]} s)",
              flush=True)
    out = {}
    for name, k in rows.items():
        row = heldout_row(model, adapter, k, held, held_ref)
        out[name] = {"nll": row["nll"], "kl": row["kl"], "seconds": timing.get(name)}
        print(f"{budget} {name:40s} {domain} held-out NLL {row['nll']:.4f}  KL {row['kl']:.4f}", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
