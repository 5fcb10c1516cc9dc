"""Larger than memory: one search stage with the layer-streamed engine against the in-memory population engine.

    nice python benchmarks/streamed.py                      # 1.5, 3 and 6 GB checkpoints, 8 candidates, 2,048 tokens
    nice python benchmarks/streamed.py --sizes 1.5 --tokens 512 --candidates 4     # a quick look
    nice python benchmarks/streamed.py --search --sizes 1.5   # a 2-generation search, states kept across stages or not

For each size a Qwen3-MoE-shaped checkpoint with random weights is written under /tmp, shard by shard (one decoder
layer per shard, never the whole model in memory), in bfloat16: hidden 1024, 64 experts of width 512, top-8,
16 heads (4 KV heads), vocabulary 32,000, untied head; the layer count sets the size. Then, each in a child process
measured by ``/usr/bin/time`` (peak RSS of the whole process, imports included):

* streamed: ``--max-memory 2`` picks the streamed engine (float32 weights above 2 GB); one stage of ``--candidates``
  candidates (router masks keeping half the experts of every layer, all different from layer 0 on: no shared prefix,
  the worst case) on ``--tokens`` tokens with :class:`~evoreap.proxies.streamed.StreamedEvaluator` (each layer read
  from the shards once for the stage, hidden states within ``--state-gb``, the rest spilled to disk);
* in memory (where the float32 model fits ``--resident-max-gb``): the model loaded whole, the same stage with
  :class:`~evoreap.proxies.population.PopulationEvaluator`; the load is timed apart from the stage.

Both score the nll proxy (kl needs the reference, itself one more streamed pass of one candidate); the values of both
engines are printed and must agree. The checkpoints are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

HIDDEN, EXPERTS, WIDTH, TOP_K, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 1024, 64, 512, 8, 16, 4, 64, 32000
PER_LAYER = (3 * EXPERTS * WIDTH * HIDDEN + HIDDEN * (2 * HEADS + 2 * KV_HEADS) * HEAD_DIM + EXPERTS * HIDDEN) * 2
OUTER = 2 * VOCAB * HIDDEN * 2


def config(layers: int):
    import transformers as tf

    return tf.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers,
                             num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                             intermediate_size=2816, moe_intermediate_size=WIDTH, num_experts=EXPERTS,
                             num_experts_per_tok=TOP_K, norm_topk_prob=True, max_position_embeddings=4096,
                             tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])


def layer_tensors(i: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Decoder layer ``i`` in the checkpoint's per-expert layout, random bf16 (routers scaled up so that routing is
    far from uniform)."""
    p = f"model.layers.{i}."

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    out = {p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
           p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
           p + "self_attn.q_proj.weight": rnd(HEADS * HEAD_DIM, HIDDEN),
           p + "self_attn.k_proj.weight": rnd(KV_HEADS * HEAD_DIM, HIDDEN),
           p + "self_attn.v_proj.weight": rnd(KV_HEADS * HEAD_DIM, HIDDEN),
           p + "self_attn.o_proj.weight": rnd(HIDDEN, HEADS * HEAD_DIM),
           p + "self_attn.q_norm.weight": torch.ones(HEAD_DIM, dtype=torch.bfloat16),
           p + "self_attn.k_norm.weight": torch.ones(HEAD_DIM, dtype=torch.bfloat16),
           p + "mlp.gate.weight": rnd(EXPERTS, HIDDEN, std=0.3)}
    for e in range(EXPERTS):
        out[f"{p}mlp.experts.{e}.gate_proj.weight"] = rnd(WIDTH, HIDDEN)
        out[f"{p}mlp.experts.{e}.up_proj.weight"] = rnd(WIDTH, HIDDEN)
        out[f"{p}mlp.experts.{e}.down_proj.weight"] = rnd(HIDDEN, WIDTH)
    return out


def write_checkpoint(path: Path, layers: int) -> int:
    """One shard per decoder layer plus one for the embeddings and head, and the index; returns bytes on disk."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    config(layers).save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    shards = [("outer", None)] + [(f"layer{i:03d}", i) for i in range(layers)]
    for n, (name, i) in enumerate(shards):
        if i is None:
            tensors = {"model.embed_tokens.weight": (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).bfloat16(),
                       "lm_head.weight": (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).bfloat16(),
                       "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}
        else:
            tensors = layer_tensors(i, g)
        file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = file
            total += t.numel() * t.element_size()
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return total


def checkpoints(sizes: str, parent: str | None) -> Iterator[tuple[Path, int, int]]:
    """A generated checkpoint per size (GB on disk, comma-separated ``sizes``) in a temporary directory under
    ``parent`` (default /tmp): yields ``(path, layers, bytes)``, each deleted once the caller moves on to the next,
    the directory at the end."""
    root = Path(tempfile.mkdtemp(prefix="evoreap-bench-streamed-", dir=parent or "/tmp"))
    try:
        for gb in (float(x) for x in sizes.split(",")):
            layers = max(1, round((gb * 1e9 - OUTER) / PER_LAYER))
            path = root / f"qwen3-moe-{gb:g}gb"
            t0 = time.perf_counter()
            size = write_checkpoint(path, layers)
            print(f"wrote {path} ({size / 1e9:.2f} GB, {layers} layers) in {time.perf_counter() - t0:.0f}s", flush=True)
            yield path, layers, size
            shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def stage_inputs(layers: int, tokens: int, candidates: int, seq_len: int = 256):
    from evoreap.data import TokenData

    g = torch.Generator().manual_seed(1)
    rows = -(-tokens // (seq_len - 1))
    ids = torch.randint(0, VOCAB, (rows, seq_len), generator=g)
    data = TokenData(ids, torch.ones_like(ids), torch.zeros(rows, dtype=torch.long), ("random",))
    cands = []
    for _ in range(candidates):
        cands.append({i: torch.zeros(EXPERTS, dtype=torch.bool).index_fill_(0, torch.randperm(EXPERTS, generator=g)
                                                                           [:EXPERTS // 2], True)
                      for i in range(layers)})
    return data, cands


def child(args: argparse.Namespace) -> None:
    """One engine on one checkpoint; prints a JSON line with its times and values."""
    from evoreap.models import load_config

    path, layers = args.path, args.layers
    data, cands = stage_inputs(layers, args.tokens, args.candidates)
    out: dict = {}
    if args.child == "streamed":
        from evoreap.observe.sequential import SequentialModel
        from evoreap.pipeline.streaming import wants_streaming
        from evoreap.proxies.streamed import StreamedEvaluator

        out["streams"] = wants_streaming(path, offload=False, device_map=None, max_memory="2")
        t0 = time.perf_counter()
        seq = SequentialModel(path, load_config(path))
        ev = StreamedEvaluator(seq, data, batch_size=8, max_state_bytes=int(args.state_gb * 2**30))
        res = ev.score(cands, proxies=("nll",))
        out.update(stage_s=time.perf_counter() - t0, spilled_mb=ev.spilled_state_bytes / 2**20,
                   state_peak_mb=ev.peak_state_bytes / 2**20)
    else:
        from transformers import AutoModelForCausalLM

        from evoreap.adapters import MoEAdapter
        from evoreap.proxies.population import PopulationEvaluator, StateCache

        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        out["load_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pop = PopulationEvaluator(model, MoEAdapter.for_model(model), data, batch_size=8, cache=StateCache(0))
        res = pop.score(cands, proxies=("nll",))
        out["stage_s"] = time.perf_counter() - t0
    out["nll"] = [r.values["nll"] for r in res]
    out["tokens"] = res[0].tokens
    print("RESULT " + json.dumps(out), flush=True)


def search_child(args: argparse.Namespace) -> None:
    """A small evolutionary search streamed (``--generations`` after the seeds): each generation's children are
    scored on half the tokens, the better half of them again on all the tokens (successive halving, as the driver
    does), the best ``--elites`` are the next parents and are pinned in the state store. ``search-reuse`` keeps
    states across stages (``store_bytes``); ``search-none`` starts every stage from the embeddings. Allocations
    come from evoreap's own mutation (budget-preserving level switches) on the model's search space (budget 0.5),
    masks keep each layer's first experts of a fixed random ranking."""
    import random

    from evoreap.adapters import MoEAdapter
    from evoreap.models import load_config
    from evoreap.observe.sequential import SequentialModel
    from evoreap.proxies.streamed import StreamedEvaluator
    from evoreap.search.evolution import offspring
    from evoreap.search.space import Budget, SearchSpace, SpaceSettings

    path = args.path
    data, _ = stage_inputs(args.layers, args.tokens, 0)
    adapter = MoEAdapter(load_config(path))
    space = SearchSpace.build(adapter, SpaceSettings(step=8), Budget.resolve(adapter, fraction=0.5))
    g = torch.Generator().manual_seed(2)
    rank = {i: torch.randperm(EXPERTS, generator=g) for i in space.layers}

    def masks(counts):
        return {i: torch.zeros(EXPERTS, dtype=torch.bool).index_fill_(0, rank[i][:k], True)
                for i, k in zip(space.layers, counts)}

    rng = random.Random(0)
    seq = SequentialModel(path, load_config(path))
    reuse = args.child == "search-reuse"
    # batches of 4 rows (1,020 tokens): a stage on half the tokens shares its first batches with one on all of them
    ev = StreamedEvaluator(seq, data, batch_size=4, max_state_bytes=int(args.state_gb * 2**30),
                           store_bytes=int(args.store_gb * 2**30) if reuse else 0)
    stages, values, seen = [], {}, {space.uniform}
    t_all = time.perf_counter()

    def stage(cands, tokens, name):
        before, read, t0 = ev.work, len(ev.layers_read), time.perf_counter()
        res = ev.score([masks(c) for c in cands], proxies=("nll",), n_tokens=tokens)
        w = ev.work
        stages.append({"stage": name, "candidates": len(cands), "tokens": res[0].tokens,
                       "computed": w.computed - before.computed, "naive": w.naive - before.naive,
                       "layers_read": len(ev.layers_read) - read, "s": time.perf_counter() - t0})
        for c, r in zip(cands, res):
            values[(c, tokens)] = r.values["nll"]
        return [r.values["nll"] for r in res]

    # the lower fidelity in whole batches (4 rows of 255 scored tokens), so that its batches are the first ones of
    # the full stage's: a survivor re-scored on all the tokens starts from its final states on those
    half = max(1, args.tokens // 2 // 1020) * 1020
    parents = [space.uniform] + offspring([space.uniform], space, rng, args.candidates - 1, seen, None, 0.0)
    seen.update(parents)
    nll = stage(parents, args.tokens, "seeds")
    elites = [c for _, c in sorted(zip(nll, parents))][:args.elites]
    for gen in range(1, args.generations + 1):
        ev.retain([masks(c) for c in elites])
        kids = offspring(elites, space, rng, args.candidates, seen, None, 0.0)
        seen.update(kids)
        low = stage(kids, half, f"gen {gen} children, {half} tokens")
        top = [c for _, c in sorted(zip(low, kids))][:max(1, len(kids) // 2)]
        high = stage(top, args.tokens, f"gen {gen} survivors, {args.tokens} tokens")
        pool = sorted(zip(nll + high, parents + top))
        nll, parents = [v for v, _ in pool][:args.elites], [c for _, c in pool][:args.elites]
        elites = parents
    out = {"stages": stages, "total_s": time.perf_counter() - t_all, "computed": ev.work.computed,
           "naive": ev.work.naive, "best": list(elites[0]), "nll": [values[k] for k in sorted(values)],
           "store_writes": ev.store.writes if ev.store else 0, "store_hits": ev.store.hits if ev.store else 0,
           "store_evicted": ev.store.evicted if ev.store else 0,
           "store_mb": ev.store.bytes / 2**20 if ev.store else 0.0}
    ev.close()
    print("RESULT " + json.dumps(out), flush=True)


def measure(engine: str, path: Path, layers: int, args: argparse.Namespace) -> dict:
    cmd = ["/usr/bin/time", "-f", "MAXRSS %M", sys.executable, __file__, "--child", engine, "--path", str(path),
           "--layers", str(layers), "--tokens", str(args.tokens), "--candidates", str(args.candidates),
           "--state-gb", str(args.state_gb), "--store-gb", str(args.store_gb), "--generations",
           str(args.generations), "--elites", str(args.elites)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - t0
    lines = (proc.stdout + proc.stderr).splitlines()
    result = next((json.loads(x[7:]) for x in lines if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or result is None:
        raise SystemExit(f"{engine} on {path} failed:\n" + "\n".join(lines[-30:]))
    result["rss_gb"] = int(next(x.split()[1] for x in lines if x.startswith("MAXRSS"))) / 2**20
    result["wall_s"] = wall
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1.5,3,6", help="checkpoint sizes in GB (bf16 on disk)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--state-gb", type=float, default=1.0, help="hidden states kept in memory (the rest on disk)")
    ap.add_argument("--resident-max-gb", type=float, default=7.0,
                    help="run the in-memory engine where the float32 model is at most this large")
    ap.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary directory in /tmp)")
    ap.add_argument("--search", action="store_true",
                    help="instead of one stage: a small streamed search with and without states kept across stages")
    ap.add_argument("--generations", type=int, default=2, help="--search: generations after the seeds")
    ap.add_argument("--elites", type=int, default=2, help="--search: parents kept per generation")
    ap.add_argument("--parallel", action="store_true", help="--search: run both searches at the same time")
    ap.add_argument("--store-gb", type=float, default=1.0, help="--search: disk for states kept across stages")
    ap.add_argument("--child", choices=("streamed", "resident", "search-reuse", "search-none"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        (search_child if args.child.startswith("search") else child)(args)
        return
    if args.search:
        search_main(args)
        return
    rows = []
    for path, layers, size in checkpoints(args.sizes, args.dir):
        s = measure("streamed", path, layers, args)
        print(f"  streamed: {json.dumps(s)}", flush=True)
        r = None
        if 2 * size / 1e9 <= args.resident_max_gb:
            r = measure("resident", path, layers, args)
            print(f"  in memory: {json.dumps(r)}", flush=True)
            diff = max(abs(a - b) for a, b in zip(s["nll"], r["nll"]))
            print(f"  max |nll streamed - nll in memory| = {diff:.2e}", flush=True)
        rows.append((size, layers, s, r))
    print()
    print(f"one stage: {args.candidates} candidates (no shared prefix) x {rows[0][3]['tokens']:,} scored tokens, nll; "
          f"streamed with --max-memory 2 (hidden states <= {args.state_gb:g} GB in memory)")
    print(f"{'checkpoint':>12s} {'layers':>6s} | {'streamed RSS':>12s} {'stage':>8s} | {'in-mem RSS':>10s} "
          f"{'load':>7s} {'stage':>8s} | {'RSS ratio':>9s} {'stage ratio':>11s}")
    for size, layers, s, r in rows:
        left = f"{size / 1e9:9.2f} GB {layers:6d} | {s['rss_gb']:9.2f} GB {s['stage_s']:7.0f}s |"
        if r is None:
            print(left + f" {'(does not fit)':>27s} |")
        else:
            print(left + f" {r['rss_gb']:7.2f} GB {r['load_s']:6.0f}s {r['stage_s']:7.0f}s | "
                         f"{s['rss_gb'] / r['rss_gb']:9.2f} {s['stage_s'] / r['stage_s']:11.2f}")


def search_main(args: argparse.Namespace) -> None:
    for path, layers, size in checkpoints(args.sizes, args.dir):
        engines = ("search-none", "search-reuse")
        if args.parallel:  # side by side, so that both see the same load on a shared machine
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(2) as pool:
                runs = dict(zip(engines, pool.map(lambda e: measure(e, path, layers, args), engines)))
        else:
            runs = {e: measure(e, path, layers, args) for e in engines}
        for engine in engines:
            print(f"  {engine}: {json.dumps(runs[engine])}", flush=True)
        a, b = runs["search-none"], runs["search-reuse"]
        diff = max(abs(x - y) for x, y in zip(a["nll"], b["nll"]))
        print(f"\n{size / 1e9:.2f} GB, {layers} layers; {args.candidates} children per generation, "
              f"{args.generations} generations; same best: {a['best'] == b['best']}, "
              f"max |nll difference| = {diff:.1e}")
        print(f"{'stage':>34s} | {'without reuse: work':>19s} {'time':>6s} | {'with reuse: work':>16s} "
              f"{'layers read':>11s} {'time':>6s}")
        for x, y in zip(a["stages"], b["stages"]):
            print(f"{x['stage']:>34s} | {x['computed'] / x['naive']:19.3f} {x['s']:5.0f}s | "
                  f"{y['computed'] / y['naive']:16.3f} {y['layers_read']:5d}/{layers:<5d} {y['s']:5.0f}s")
        print(f"{'search':>34s} | {a['computed'] / a['naive']:19.3f} {a['total_s']:5.0f}s | "
              f"{b['computed'] / b['naive']:16.3f} {'':>11s} {b['total_s']:5.0f}s")
        print(f"peak RSS: {a['rss_gb']:.2f} GB without, {b['rss_gb']:.2f} GB with reuse (store "
              f"{b['store_mb']:.0f} MB on disk at the end, {b['store_writes']} states written, "
              f"{b['store_hits']} read, {b['store_evicted']} evicted); search time with / without "
              f"{b['total_s'] / a['total_s']:.2f}, layer work {b['computed'] / a['computed']:.3f}")


if __name__ == "__main__":
    main()
