"""The layer-local repair resident against streamed from the shards (``evoreap repair --objective local [--offload]``),
side by side in one run on the demo checkpoint: time, peak RSS, the largest parameter difference, and held-out NLL/KL
before and after each repair.

    OMP_NUM_THREADS=1 python benchmarks/repair_streamed.py                       # uniform 0.5, default settings
    OMP_NUM_THREADS=1 python benchmarks/repair_streamed.py --allocation runs/searched-0.5/best_allocation.json
    OMP_NUM_THREADS=1 python benchmarks/repair_streamed.py --synthetic 7 --fit-tokens 4096 --epochs 2

``--synthetic LAYERS`` measures memory where it matters instead: the random bf16 Qwen3-MoE checkpoint of
``benchmarks/streamed.py`` (about 206 MB of bf16 weights per layer, float32 in memory: twice that), half of the
experts of every layer kept at random, random tokens; the resident fit (model loaded whole in float32) against the
streamed one, same settings, parameters compared.

Each repair runs in its own child process (peak RSS is the child's ``ru_maxrss``, imports included) with its own
empty cache, so each builds its own search-split reference. The allocation is copied beside the repairs; an
allocation without expert lists keeps the experts of the default criterion on the default calibration observation,
as ``evoreap search`` builds its uniform baseline. Held-out scoring (resident, masked, with each repair applied) is
in the parent, after both.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _cpu() -> float:
    """CPU seconds of this process (user + system): on a shared machine steadier than the wall time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    import evoreap

    t0 = time.time()
    result = evoreap.repair(args.model, args.allocation, objective="local", out=args.out, params=args.params,
                            fit_tokens=args.fit_tokens, epochs=args.epochs, cache_dir=args.cache_dir,
                            offload=args.engine == "streamed", progress=False)
    print(json.dumps({"seconds": time.time() - t0, "cpu_seconds": _cpu(), "peak_rss_mb": _rss_mb(),
                      "accepted": result.accepted, "search_kl_before": result.search_kl_before,
                      "search_kl_after": result.search_kl_after, "steps": result.repair.meta["steps"]}))


def synthetic_child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from streamed import EXPERTS, VOCAB

    from evoreap.adapters import MoEAdapter
    from evoreap.data import TokenData
    from evoreap.recovery import RepairSettings, fit_repair

    t0 = time.time()
    g = torch.Generator().manual_seed(1)

    def tokens(n, seq=256):
        ids = torch.randint(0, VOCAB, (-(-n // seq), seq), generator=g)
        return TokenData(ids, torch.ones_like(ids), torch.zeros(len(ids), dtype=torch.long), ("random",))

    fit, stop = tokens(args.fit_tokens), tokens(2048)
    layers = json.loads((Path(args.model) / "config.json").read_text())["num_hidden_layers"]
    kept = {i: sorted(torch.randperm(EXPERTS, generator=g)[:EXPERTS // 2].tolist()) for i in range(layers)}
    settings = RepairSettings(params=args.params, objective="local", epochs=args.epochs)
    if args.engine == "streamed":
        from evoreap.models import load_config
        from evoreap.observe.sequential import SequentialModel
        from evoreap.recovery.streamed_repair import fit_repair_streamed

        seq = SequentialModel(args.model, load_config(args.model))
        rep = fit_repair_streamed(seq, kept, fit, stop, settings=settings, storage_dtype="bfloat16",
                                  cache_dir=args.cache_dir, progress=False)
    else:
        from transformers import AutoModelForCausalLM

        from evoreap.fingerprint import note_loaded
        from evoreap.reference import reference_cached

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        note_loaded(model, args.model)
        ref = reference_cached(model, stop, top_k=64, cache_dir=args.cache_dir, batch_size=8, progress=False)
        rep = fit_repair(model, MoEAdapter.for_model(model), kept, fit, stop, stop_reference=ref, settings=settings,
                         storage_dtype="bfloat16", progress=False)
    rep.save(args.out)
    s = rep.meta["search"]
    print(json.dumps({"seconds": time.time() - t0, "cpu_seconds": _cpu(), "peak_rss_mb": _rss_mb(),
                      "accepted": rep.accepted, "search_kl_before": s["kl_before"],
                      "search_kl_after": s["kl_after"], "steps": rep.meta["steps"]}))


def synthetic_main(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from streamed import write_checkpoint

    from evoreap.recovery import Repair

    work = Path(tempfile.mkdtemp(prefix="evoreap-repair-bench-"))
    try:
        model = work / "model"
        size = write_checkpoint(model, args.synthetic)
        rows = {}
        for engine in ("resident", "streamed"):
            out = work / f"{engine}.repair.safetensors"
            done = subprocess.run([sys.executable, __file__, "--engine", engine, "--model", str(model), "--synthetic",
                                   str(args.synthetic), "--out", str(out), "--cache-dir", str(work / f"c-{engine}"),
                                   "--params", args.params, "--fit-tokens", str(args.fit_tokens), "--epochs",
                                   str(args.epochs)], check=True, capture_output=True, text=True)
            rows[engine] = json.loads(done.stdout.strip().splitlines()[-1]) | {"file": out}
        a, b = (Repair.load(rows[e]["file"]) for e in ("resident", "streamed"))
        diff = max(float((a.tensors[k].float() - b.tensors[k].float()).abs().max()) for k in a.tensors)
        print(f"synthetic Qwen3-MoE, {args.synthetic} layers: {size / 1e9:.2f} GB bf16 on disk, "
              f"{2 * size / 1e9:.2f} GB in float32; {args.params}, {args.fit_tokens} fitting tokens, {args.epochs} "
              f"epochs")
        print("| engine | wall (CPU) time | peak RSS | search KL before -> after | steps |")
        print("|---|---:|---:|---|---:|")
        for engine in ("resident", "streamed"):
            r = rows[engine]
            print(f"| {engine} | {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} s) | {r['peak_rss_mb']:.0f} MB | "
                  f"{r['search_kl_before']:.4f} -> "
                  f"{r['search_kl_after']:.4f} ({'kept' if r['accepted'] else 'rejected'}) | {r['steps']} |")
        print(f"largest parameter difference streamed vs resident: {diff:.2e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the bundled demo checkpoint)")
    p.add_argument("--allocation", default=None, help="allocation JSON (default: uniform at --budget)")
    p.add_argument("--budget", type=float, default=0.5, help="kept fraction of the uniform allocation")
    p.add_argument("--params", default="router+norm+scale")
    p.add_argument("--fit-tokens", type=int, default=65536)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--heldout-tokens", type=int, default=32768)
    p.add_argument("--synthetic", type=int, default=None, metavar="LAYERS",
                   help="a random bf16 checkpoint of this many layers instead of the demo (see above)")
    p.add_argument("--engine", choices=("resident", "streamed"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.engine:
        return synthetic_child(args) if args.synthetic else child(args)
    if args.synthetic:
        return synthetic_main(args)

    import evoreap
    from evoreap.allocation import Allocation
    from evoreap.models import load_model
    from evoreap.pipeline.choose import choose_experts

    work = Path(tempfile.mkdtemp(prefix="evoreap-repair-bench-"))
    try:
        loaded = load_model(args.model)
        adapter = loaded.adapter
        if args.allocation:
            alloc, name = Allocation.load(args.allocation), Path(args.allocation).name
        else:
            keep = max(adapter.top_k, round(args.budget * adapter.num_experts))
            alloc, name = Allocation.uniform(adapter, keep), f"uniform-{args.budget:g}"
        kept = choose_experts(alloc, adapter, loaded).kept
        path = work / "alloc.json"
        alloc.with_experts(kept).save(path, adapter)
        del loaded
        rows = {}
        for engine in ("resident", "streamed"):
            out = work / f"{engine}.repair.safetensors"
            cmd = [sys.executable, __file__, "--engine", engine, "--allocation", str(path), "--out", str(out),
                   "--cache-dir", str(work / f"cache-{engine}"), "--params", args.params,
                   "--fit-tokens", str(args.fit_tokens), "--epochs", str(args.epochs)]
            if args.model:
                cmd += ["--model", args.model]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows[engine] = json.loads(done.stdout.strip().splitlines()[-1]) | {"file": out}
        from evoreap.recovery import Repair

        a, b = (Repair.load(rows[e]["file"]) for e in ("resident", "streamed"))
        diff = max(float((a.tensors[k].float() - b.tensors[k].float()).abs().max()) for k in a.tensors)
        held = {}
        for label, repair in (("none", False), ("resident", rows["resident"]["file"]),
                              ("streamed", rows["streamed"]["file"])):
            r = evoreap.evaluate(args.model, allocation=path, repair=repair, tokens=args.heldout_tokens)
            pruned = next(v for k, v in r.results.items() if k.startswith("pruned"))
            held[label] = pruned["overall"]
            held["unpruned"] = r.results["unpruned"]["overall"]
        print(f"allocation {name}, {args.params}, local objective, {args.fit_tokens} fitting tokens, {args.epochs} "
              f"epochs, torch threads {torch.get_num_threads()}")
        print("| engine | wall (CPU) time | peak RSS | search KL before -> after | steps | held-out NLL | held-out KL"
              " |")
        print("|---|---:|---:|---|---:|---:|---:|")
        u, n = held["unpruned"], held["none"]
        print(f"| unpruned | | | | | {u['nll']:.4f} | |")
        print(f"| pruned, no repair | | | | | {n['nll']:.4f} (+{n['nll'] - u['nll']:.4f}) | {n['kl']:.4f} |")
        for engine in ("resident", "streamed"):
            r, h = rows[engine], held[engine]
            print(f"| {engine} | {r['seconds']:.1f} s ({r.get('cpu_seconds', 0):.1f} s) | {r['peak_rss_mb']:.0f} MB | "
                  f"{r['search_kl_before']:.4f} -> {r['search_kl_after']:.4f} "
                  f"({'kept' if r['accepted'] else 'rejected'}) | {r['steps']} | "
                  f"{h['nll']:.4f} (+{h['nll'] - u['nll']:.4f}) | {h['kl']:.4f} |")
        print(f"largest parameter difference streamed vs resident: {diff:.2e}; streamed/resident wall time "
              f"{rows['streamed']['seconds'] / rows['resident']['seconds']:.2f}x, peak RSS "
              f"{rows['streamed']['peak_rss_mb'] / rows['resident']['peak_rss_mb']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
