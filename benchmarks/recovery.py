"""Recovery on the demo, one command for the README tables: held-out NLL and KL (overall and per domain) before and
after router repair, for uniform and searched allocations at several budgets, each repair with the time it took;
and, with ``--floor``, the searched allocation with and without a per-domain floor.

    python benchmarks/recovery.py --runs-dir /tmp/recovery-runs --floor tools:kl=0.05 --table

Searched allocations come from ``evoreap search --budget B --runs-dir DIR --run recovery-B`` (run here when the run
has no ``best_allocation.json`` yet; ``--generations N`` passes through, and the table says how many each search
ran), or from ``--searched B=FILE,...``. At ``--compare-budget`` (default 0.5) the searched allocation is repaired
with every parameter set and objective of ``--params`` x ``--objectives``; elsewhere with ``--rest`` (default: the
default repair and router-only). Uniform rows keep the same count in every layer, experts chosen by the default
criterion on the default calibration observation, exactly as ``evoreap search`` builds its uniform baseline.
Fitting text is the calibration split, early stopping the search split; held-out is only ever scored.
``--table-only FILE`` prints the tables of an earlier run's JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
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
from evoreap.recovery.repair import FIT_TOKENS
from evoreap.reference import reference_cached
from evoreap.search.space import Budget, SearchSpace, load_space_settings

DEFAULT = f"{RepairSettings.params}/{RepairSettings.objective}"


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


def run_search(runs_dir: Path, name: str, budget: float, generations: int | None, floor: str | None) -> Path:
    """``evoreap search --budget B`` (the README's main command) into ``runs_dir/name``; a finished run is reused."""
    run = runs_dir / name
    best = run / "best_allocation.json"
    if best.is_file() and (run / "result.json").is_file():
        return best
    exe = Path(sys.executable).with_name("evoreap")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-c", "from evoreap.cli import main; main()"]
    cmd += ["search", "--budget", str(budget), "--runs-dir", str(runs_dir), "--run", name, "--no-plots"]
    if generations is not None:
        cmd += ["--generations", str(generations)]
    if floor:
        cmd += ["--floor", floor]
    print("$ " + " ".join(cmd[1:] if exe.is_file() else cmd[3:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    print(f"  search took {time.time() - t0:.0f} s", flush=True)
    return best


def generations_of(best: Path) -> int | None:
    try:
        return int(json.loads((best.parent / "config.json").read_text())["config"]["generations"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="0.25,0.5,0.75")
    ap.add_argument("--searched", default="", help="BUDGET=FILE,... searched allocations (best_allocation.json)")
    ap.add_argument("--runs-dir", default=None, help="run the searches that --searched does not give here")
    ap.add_argument("--generations", type=int, default=None, help="generations of those searches (default: search's)")
    ap.add_argument("--compare-budget", type=float, default=0.5)
    ap.add_argument("--params", default="router,router+norm,router+scale,router+norm+scale")
    ap.add_argument("--objectives", default="kl,local")
    ap.add_argument("--rest", default=f"{DEFAULT},router/kl", help="PARAMS/OBJECTIVE,... at the other budgets")
    ap.add_argument("--kinds", default="uniform,searched")
    ap.add_argument("--floor", default=None, metavar="SPEC",
                    help="also search at --compare-budget with --floor SPEC and compare it per domain")
    ap.add_argument("--fit-tokens", type=int, default=FIT_TOKENS)
    ap.add_argument("--stop-tokens", type=int, default=8192)
    ap.add_argument("--heldout-tokens", type=int, default=32768)
    ap.add_argument("--epochs", type=int, default=RepairSettings.epochs)
    ap.add_argument("--lr", type=float, default=RepairSettings.lr)
    ap.add_argument("--rank", type=int, default=RepairSettings.rank, help="rank of the lowrank parameter sets")
    ap.add_argument("--guard", action="store_true", help="repairs with --guard (never hurt a search-split domain)")
    ap.add_argument("--patience", type=int, default=RepairSettings.patience)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a busy machine)")
    ap.add_argument("--out", default="benchmarks/recovery.json")
    ap.add_argument("--step-cost", type=int, default=0, metavar="N",
                    help="instead: time N optimiser steps of each --params on the --compare-budget allocation, the "
                         "sets interleaved round by round in one process, and print each one's time per step "
                         "relative to the first")
    ap.add_argument("--table", action="store_true", help="print the results as markdown tables at the end")
    ap.add_argument("--table-only", default=None, metavar="JSON,...",
                    help="only print the tables of earlier runs (their JSON files, merged)")
    ap.add_argument("--reinject", default=None, metavar="DOMAIN",
                    help="instead: re-injection for DOMAIN on the first --searched allocation (4 experts by the "
                         "domain's saliency, confirmed or not, against the 4 of highest global saliency)")
    args = ap.parse_args()
    if args.table_only:  # several runs' JSON (comma-separated) print as one table
        parts = [json.loads(Path(f).read_text()) for f in args.table_only.split(",")]
        merged = {**parts[0], "rows": [r for p in parts for r in p["rows"]],
                  "floor": next((p["floor"] for p in parts if p.get("floor")), None),
                  "generations": {k: v for p in parts for k, v in p.get("generations", {}).items()}}
        print_tables(merged)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    searched = {float(b): Path(f) for b, f in (item.split("=", 1) for item in args.searched.split(",") if item)}
    budgets = [float(b) for b in args.budgets.split(",")]
    searches = {}
    if args.runs_dir and "searched" in args.kinds and not args.reinject:
        for b in budgets:
            if b not in searched:
                searched[b] = run_search(Path(args.runs_dir), f"recovery-{b:g}", b, args.generations, None)
        if args.floor:
            searches["floored"] = run_search(Path(args.runs_dir), f"recovery-{args.compare_budget:g}-floor",
                                             args.compare_budget, args.generations, args.floor)

    defaults = SearchConfig()
    loaded = load_model(None)
    model, adapter, tok = loaded.model, loaded.adapter, loaded.tokenizer
    calib = load_tokens(defaults.calib_data, tok, split="calibration", seq_len=defaults.seq_len,
                        tokens=defaults.calib_tokens, seed=defaults.seed)
    _, stats = observe_cached(loaded, calib, progress=False)
    scores = score_experts(stats, DEFAULT_CRITERION, min_count=DEFAULT_MIN_COUNT, seed=defaults.seed)
    if args.reinject:
        return reinject_benchmark(args, model, adapter, tok, stats, scores, searched)
    fit = load_tokens("demo", tok, split="calibration", seq_len=256, tokens=args.fit_tokens, seed=0)
    if args.step_cost:
        b = args.compare_budget
        if b in searched:
            alloc = Allocation.load(searched[b])
            kept = kept_experts(alloc, adapter, None if alloc.experts is not None else scores)
        else:
            space = SearchSpace.build(adapter, load_space_settings("default"), Budget.resolve(adapter, fraction=b))
            kept = kept_experts(Allocation(space.layers, tuple(space.uniform)), adapter, scores)
        return step_cost(args, model, adapter, kept, fit, reference_cached(model, fit, progress=False))
    stop = load_tokens("demo", tok, split="search", seq_len=256, tokens=args.stop_tokens, seed=0)
    held = load_tokens("demo", tok, split="heldout", seq_len=256, tokens=args.heldout_tokens, seed=0)
    fit_ref = reference_cached(model, fit, progress=False)
    stop_ref = reference_cached(model, stop, progress=False)
    held_ref = reference_cached(model, held, progress=False)
    dtype = storage_dtype(loaded.path, adapter, torch.float32)
    space_settings = load_space_settings("default")

    def kept_of(path: Path) -> dict[int, list[int]]:
        alloc = Allocation.load(path)
        return kept_experts(alloc, adapter, None if alloc.experts is not None else scores)

    results = {"unpruned": heldout_row(model, adapter, None, held, held_ref), "rows": [], "floor": None,
               "settings": {"fit_tokens": fit.num_tokens, "stop_tokens": stop.num_tokens,
                            "heldout_tokens": held.num_tokens, "epochs": args.epochs, "lr": args.lr,
                            "rank": args.rank, "guard": args.guard, "patience": args.patience,
                            "threads": torch.get_num_threads()},
               "generations": {str(b): generations_of(p) for b, p in searched.items()}}
    print(f"unpruned held-out NLL {results['unpruned']['nll']:.4f}", flush=True)
    if args.floor and "floored" in searches:
        results["floor"] = {"spec": args.floor, "budget": args.compare_budget,
                            "searched": heldout_row(model, adapter, kept_of(searched[args.compare_budget]), held,
                                                    held_ref),
                            "floored": heldout_row(model, adapter, kept_of(searches["floored"]), held, held_ref),
                            "counts": {k: Allocation.load(p).counts for k, p in
                                       (("searched", searched[args.compare_budget]),
                                        ("floored", searches["floored"]))},
                            "generations": generations_of(searches["floored"])}
        Path(args.out).write_text(json.dumps(results, indent=1))
    for budget in budgets:
        space = SearchSpace.build(adapter, space_settings, Budget.resolve(adapter, fraction=budget))
        allocs = {}
        if "uniform" in args.kinds:
            allocs["uniform"] = kept_experts(Allocation(space.layers, tuple(space.uniform)), adapter, scores)
        if "searched" in args.kinds and budget in searched:
            allocs["searched"] = kept_of(searched[budget])
        for kind, kept in allocs.items():
            before = heldout_row(model, adapter, kept, held, held_ref)
            print(f"{budget:.2f} {kind:8s} unrepaired: NLL {before['nll']:.4f} KL {before['kl']:.4f}", flush=True)
            if kind == "searched" and budget == args.compare_budget:
                combos = [(p, o) for o in args.objectives.split(",") for p in args.params.split(",")]
            else:
                combos = [tuple(item.split("/")) for item in args.rest.split(",")]
            for params, objective in combos:
                settings = RepairSettings(params=params, objective=objective, epochs=args.epochs, lr=args.lr,
                                          rank=args.rank, guard=args.guard, patience=args.patience)
                t0 = time.time()
                rep = fit_repair(model, adapter, kept, fit, stop, stop_reference=stop_ref,
                                 fit_reference=fit_ref if objective == "kl" else None, settings=settings,
                                 storage_dtype=dtype, progress=False)
                seconds = time.time() - t0
                after = heldout_row(model, adapter, kept, held, held_ref, rep)
                row = {"budget": budget, "allocation": kind, "counts": [len(kept[i]) for i in sorted(kept)],
                       "params": params if "lowrank" not in params else f"{params} (rank {args.rank})",
                       "objective": objective + (" +guard" if args.guard else ""), "before": before, "after": after,
                       "accepted": rep.accepted, "search": rep.meta["search"], "steps": rep.meta["steps"],
                       "attempts": rep.meta.get("attempts"), "seconds": round(seconds, 1)}
                results["rows"].append(row)
                print(f"{budget:.2f} {kind:8s} {row['params']:18s} {row['objective']:5s} NLL {before['nll']:.4f} -> "
                      f"{after['nll']:.4f}  KL {before['kl']:.4f} -> {after['kl']:.4f}  "
                      f"(search KL {rep.meta['search']['kl_before']:.4f} -> {rep.meta['search']['kl_after']:.4f}"
                      f", {'kept' if rep.accepted else 'rejected'}, {rep.meta['steps']} steps, {seconds:.0f} s)",
                      flush=True)
                Path(args.out).write_text(json.dumps(results, indent=1))
    Path(args.out).write_text(json.dumps(results, indent=1))
    if args.table:
        print_tables(results)


def step_cost(args, model, adapter, kept, fit, fit_ref) -> None:
    """Seconds per optimiser step (forward, backward, Adam) of each parameter set on the same batches, the sets
    taking turns round by round so that a busy machine slows them alike; ratios to the first set."""
    from evoreap.recovery.repair import _kl_loss, _masks, _targets, _with_values

    sets = args.params.split(",")
    masks = _masks(adapter, kept)
    state = {}
    for params in sets:
        settings = RepairSettings(params=params, rank=args.rank)
        targets, values = _targets(model, adapter, kept, settings)
        leaves = [v.requires_grad_(True) for v in values.values()]
        state[params] = (targets, values, torch.optim.Adam(leaves, lr=1e-3))
    for p in model.parameters():
        p.requires_grad_(False)
    spent = dict.fromkeys(sets, 0.0)
    for step in range(args.step_cost + 1):  # round 0 warms up and is not counted
        rows = torch.arange(step * 8, step * 8 + 8) % len(fit)
        ref = fit_ref.rows(rows, torch.device("cpu"))
        for params in sets:
            targets, values, opt = state[params]
            t0 = time.perf_counter()
            with _with_values(model, adapter, masks, targets, values):
                loss = _kl_loss(model, fit.input_ids[rows], fit.attention_mask[rows], ref)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step:
                spent[params] += time.perf_counter() - t0
    first = spent[sets[0]]
    for params in sets:
        n = sum(v.numel() for v in state[params][1].values())
        print(f"{params:28s} {spent[params] / args.step_cost * 1e3:7.1f} ms/step  x{spent[params] / first:.2f}  "
              f"({n:,} fitted values)")


def print_tables(results: dict) -> None:
    """The README tables: overall before/after per repair, then per domain, then the floor comparison."""
    unpruned = results["unpruned"]
    gens = results.get("generations", {})
    print(f"\nUnpruned held-out NLL {unpruned['nll']:.4f}. Settings: {results.get('settings')}\n")
    print("| budget | allocation | repair (params, objective) | NLL before -> after | KL before -> after | "
          "gap to unpruned after | repair time |")
    print("|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        kind = r["allocation"]
        g = gens.get(str(r["budget"]))
        if kind == "searched" and g is not None:
            kind += f" ({g} gen.)"
        b, a = r["before"], r["after"]
        tries = r.get("attempts") or []
        verdict = "" if r["accepted"] else " (rejected)"
        if len(tries) > 1:
            verdict += f" (at lr {tries[-1]['lr']:.2g}, try {len(tries)})"
        print(f"| {r['budget']:g} | {kind} | {r['params']}, {r['objective']}{verdict} | {b['nll']:.4f} -> "
              f"{a['nll']:.4f} | {b['kl']:.4f} -> {a['kl']:.4f} | {a['nll'] - unpruned['nll']:+.4f} | "
              f"{r['seconds']:.0f} s |")
    domains = sorted(unpruned["per_domain"])
    print("\nPer domain, held-out NLL / KL (unrepaired rows first, then each repair):\n")
    print("| budget | allocation | repair | " + " | ".join(domains) + " |")
    print("|---|---|---|" + "---|" * len(domains))
    print("| - | unpruned | - | " + " | ".join(f"{unpruned['per_domain'][d]['nll']:.3f} / 0" for d in domains)
          + " |")
    seen = set()
    for r in results["rows"]:
        key = (r["budget"], r["allocation"])
        cells = []
        if key not in seen:
            seen.add(key)
            cells.append(("none", r["before"]))
        cells.append((f"{r['params']}, {r['objective']}", r["after"]))
        for name, row in cells:
            print(f"| {r['budget']:g} | {r['allocation']} | {name} | "
                  + " | ".join(f"{row['per_domain'][d]['nll']:.3f} / {row['per_domain'][d]['kl']:.3f}"
                               for d in domains) + " |")
    fl = results.get("floor")
    if fl:
        print(f"\nA binding floor at budget {fl['budget']:g}: `--floor {fl['spec']}` (held-out, no repair; "
              f"counts searched {fl['counts']['searched']}, floored {fl['counts']['floored']}):\n")
        print("| allocation | overall NLL / KL | " + " | ".join(domains) + " |")
        print("|---|---|" + "---|" * len(domains))
        for name in ("searched", "floored"):
            row = fl[name]
            gen = gens.get(str(fl["budget"])) if name == "searched" else fl.get("generations")
            label = "searched" if name == "searched" else f"searched with --floor {fl['spec']}"
            label += f" ({gen} gen.)" if gen is not None else ""
            print(f"| {label} | {row['nll']:.4f} / {row['kl']:.4f} | "
                  + " | ".join(f"{row['per_domain'][d]['nll']:.3f} / {row['per_domain'][d]['kl']:.4f}"
                               for d in domains) + " |")


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
