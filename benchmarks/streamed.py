"""Larger than memory: one search stage with the layer-streamed engine against the in-memory population engine.

    nice python benchmarks/streamed.py                      # 1.5, 3 and 6 GB checkpoints, 8 candidates, 2,048 tokens
    nice python benchmarks/streamed.py --sizes 1.5 --tokens 512 --candidates 4     # a quick look

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
from pathlib import Path

import torch

HIDDEN, EXPERTS, WIDTH, TOP_K, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 1024, 64, 512, 8, 16, 4, 64, 32000


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


def measure(engine: str, path: Path, layers: int, args: argparse.Namespace) -> dict:
    cmd = ["/usr/bin/time", "-f", "MAXRSS %M", sys.executable, __file__, "--child", engine, "--path", str(path),
           "--layers", str(layers), "--tokens", str(args.tokens), "--candidates", str(args.candidates),
           "--state-gb", str(args.state_gb)]
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
    ap.add_argument("--child", choices=("streamed", "resident"), help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    per_layer = (3 * EXPERTS * WIDTH * HIDDEN + HIDDEN * (2 * HEADS + 2 * KV_HEADS) * HEAD_DIM + EXPERTS * HIDDEN) * 2
    outer = 2 * VOCAB * HIDDEN * 2
    root = Path(tempfile.mkdtemp(prefix="evoreap-bench-streamed-", dir=args.dir or "/tmp"))
    rows = []
    try:
        for gb in (float(s) for s in args.sizes.split(",")):
            layers = max(1, round((gb * 1e9 - outer) / per_layer))
            path = root / f"qwen3-moe-{gb:g}gb"
            t0 = time.perf_counter()
            size = write_checkpoint(path, layers)
            print(f"wrote {path} ({size / 1e9:.2f} GB, {layers} layers) in {time.perf_counter() - t0:.0f}s", flush=True)
            s = measure("streamed", path, layers, args)
            print(f"  streamed: {json.dumps(s)}", flush=True)
            r = None
            if 2 * size / 1e9 <= args.resident_max_gb:
                r = measure("resident", path, layers, args)
                print(f"  in memory: {json.dumps(r)}", flush=True)
                diff = max(abs(a - b) for a, b in zip(s["nll"], r["nll"]))
                print(f"  max |nll streamed - nll in memory| = {diff:.2e}", flush=True)
            rows.append((gb, size, layers, s, r))
            shutil.rmtree(path)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(f"one stage: {args.candidates} candidates (no shared prefix) x {rows[0][3]['tokens']:,} scored tokens, nll; "
          f"streamed with --max-memory 2 (hidden states <= {args.state_gb:g} GB in memory)")
    print(f"{'checkpoint':>12s} {'layers':>6s} | {'streamed RSS':>12s} {'stage':>8s} | {'in-mem RSS':>10s} "
          f"{'load':>7s} {'stage':>8s} | {'RSS ratio':>9s} {'stage ratio':>11s}")
    for gb, size, layers, s, r in rows:
        left = f"{size / 1e9:9.2f} GB {layers:6d} | {s['rss_gb']:9.2f} GB {s['stage_s']:7.0f}s |"
        if r is None:
            print(left + f" {'(does not fit)':>27s} |")
        else:
            print(left + f" {r['rss_gb']:7.2f} GB {r['load_s']:6.0f}s {r['stage_s']:7.0f}s | "
                         f"{s['rss_gb'] / r['rss_gb']:9.2f} {s['stage_s'] / r['stage_s']:11.2f}")


if __name__ == "__main__":
    main()
