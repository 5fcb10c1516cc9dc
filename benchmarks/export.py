"""Export cost against a plain copy of the same checkpoint, measured in one run.

    python benchmarks/export.py [--gb 2.2] [--shard-mb 500] [--repeats 2] [--workdir DIR] [--keep] [--no-safe-open]

Generates a multi-shard Qwen3-MoE checkpoint of about ``--gb`` GB (bf16, hub layout with per-expert keys) shard by
shard, never holding more than one shard in memory, then times each of these in its own subprocess and reads that
child's peak RSS from ``os.wait4``:

* ``python startup``: the interpreter and the imports export needs, doing nothing (the RSS floor);
* ``plain copy``: ``shutil.copy`` of every shard and the config;
* ``evoreap export``: the CLI with a 50% uniform allocation (explicit kept experts);
* ``safe_open reference`` (unless ``--no-safe-open``): the naive streamer, one tensor at a time through
  ``safetensors.safe_open``/``get_slice`` into ``save_file`` shards, to show why export does not use it.

The page cache is warmed first; each measurement keeps its best time and its largest RSS over ``--repeats`` runs.
Prints a markdown table with ratios to the plain copy. Everything is deleted at the end unless ``--keep``.
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

HIDDEN, EXPERTS, TOP_K, EXPERT_WIDTH, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 1024, 64, 8, 512, 32000, 16, 4, 64


def _layer_tensors(i: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{i}"
    out = [(f"{p}.input_layernorm.weight", (HIDDEN,)), (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
           (f"{p}.self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
           (f"{p}.self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
           (f"{p}.self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
           (f"{p}.self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
           (f"{p}.self_attn.q_norm.weight", (HEAD_DIM,)), (f"{p}.self_attn.k_norm.weight", (HEAD_DIM,)),
           (f"{p}.mlp.gate.weight", (EXPERTS, HIDDEN))]
    for e in range(EXPERTS):
        out += [(f"{p}.mlp.experts.{e}.gate_proj.weight", (EXPERT_WIDTH, HIDDEN)),
                (f"{p}.mlp.experts.{e}.up_proj.weight", (EXPERT_WIDTH, HIDDEN)),
                (f"{p}.mlp.experts.{e}.down_proj.weight", (HIDDEN, EXPERT_WIDTH))]
    return out


def generate(directory: Path, target_gb: float, shard_mb: int) -> tuple[int, int]:
    """Write config.json, bf16 shards and the index; returns (layers, bytes). Memory: one shard at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    per_layer = sum(2 * _numel(s) for _, s in _layer_tensors(0))
    fixed = 2 * (2 * VOCAB * HIDDEN + HIDDEN)
    layers = max(1, -(-(int(target_gb * 1e9) - fixed) // per_layer))
    Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                   num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                   moe_intermediate_size=EXPERT_WIDTH, intermediate_size=4 * HIDDEN, decoder_sparse_step=1,
                   mlp_only_layers=[], tie_word_embeddings=False, dtype="bfloat16").save_pretrained(directory)
    names = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        names += _layer_tensors(i)
    names += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    shards, size = [[]], 0
    for name, shape in names:
        if shards[-1] and size + 2 * _numel(shape) > shard_mb * 1e6:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += 2 * _numel(shape)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16) for name, shape in shard}
        save_file(tensors, directory / fname, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({name: fname for name, _ in shard})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return layers, total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


PLAIN_COPY = """
import shutil, sys, pathlib
src, dst = map(pathlib.Path, sys.argv[1:3])
dst.mkdir()
for f in sorted(src.iterdir()):
    shutil.copy(f, dst / f.name)
"""

STARTUP = """
import sys
import evoreap.cli, evoreap.export, evoreap.commands.export
from evoreap.models import load_config
from evoreap.adapters import MoEAdapter
MoEAdapter(load_config(sys.argv[1]))
"""

SAFE_OPEN = """
import sys, json, pathlib
from safetensors import safe_open
from safetensors.torch import save_file
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
alloc = json.loads(pathlib.Path(sys.argv[3]).read_text())
kept = {int(k): sorted(v) for k, v in alloc["experts"].items()}
renumber = {layer: {old: new for new, old in enumerate(v)} for layer, v in kept.items()}
dst.mkdir()
index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
for n, shard in enumerate(sorted(set(index.values()))):
    out = {}
    with safe_open(src / shard, "pt") as f:  # one tensor at a time, buffered until the shard is written
        for name in f.keys():
            parts = name.split(".")
            if ".mlp.experts." in name:
                new = renumber[int(parts[2])].get(int(parts[5]))
                if new is not None:
                    out[".".join(parts[:5] + [str(new)] + parts[6:])] = f.get_tensor(name)
            elif name.endswith("mlp.gate.weight"):
                out[name] = f.get_tensor(name)[kept[int(parts[2])]]
            else:
                out[name] = f.get_tensor(name)
    save_file(out, dst / shard, metadata={"format": "pt"})
    del out
"""


def measure(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.2, help="checkpoint size to generate (GB)")
    ap.add_argument("--shard-mb", type=int, default=500, help="source shard size (MB)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where to generate (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--no-safe-open", action="store_true", help="skip the safe_open reference")
    ap.add_argument("--generate", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        print(json.dumps(generate(Path(args.generate), args.gb, args.shard_mb)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="evoreap-export-bench-", dir=args.workdir))
    try:
        src = work / "src"
        src.mkdir()
        t0 = time.perf_counter()
        # generate in a child: a forked child's ru_maxrss starts at the parent's RSS, so this process stays small
        info = subprocess.run([sys.executable, __file__, "--generate", str(src), "--gb", str(args.gb),
                               "--shard-mb", str(args.shard_mb)], check=True, capture_output=True, text=True)
        layers, total = json.loads(info.stdout.strip().splitlines()[-1])
        shards = len(list(src.glob("*.safetensors")))
        print(f"generated {total / 1e9:.2f} GB in {shards} shards ({layers} MoE layers x {EXPERTS} experts, bf16) "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
        kept = {str(i): list(range(0, EXPERTS, 2)) for i in range(layers)}  # 50% uniform, every other expert
        alloc = work / "allocation.json"
        alloc.write_text(json.dumps({"layers": {k: len(v) for k, v in kept.items()}, "experts": kept,
                                     "meta": {"budget": 0.5}}))
        buf = bytearray(1 << 20)  # small: this process's RSS is where every child's ru_maxrss starts
        for f in src.iterdir():  # warm the page cache so no run pays for the first read
            with open(f, "rb") as h:
                while h.readinto(buf):
                    pass
        py = sys.executable
        runs = {
            "python startup (imports only)": lambda out: [py, "-c", STARTUP, str(src)],
            "plain copy (shutil.copy)": lambda out: [py, "-c", PLAIN_COPY, str(src), str(out)],
            "evoreap export (50% uniform)": lambda out: [py, "-m", "evoreap.cli", "-q", "export", "--model", str(src),
                                                         "--allocation", str(alloc), "--out", str(out),
                                                         "--no-progress"],
        }
        if not args.no_safe_open:
            runs["safe_open reference (50%)"] = lambda out: [py, "-c", SAFE_OPEN, str(src), str(out), str(alloc)]
        results = {name: (float("inf"), 0.0) for name in runs}
        for r in range(args.repeats):
            for name, cmd in runs.items():
                out = work / f"out-{r}-{abs(hash(name))}"
                seconds, rss = measure(cmd(out))
                results[name] = (min(results[name][0], seconds), max(results[name][1], rss))
                written = sum(f.stat().st_size for f in out.glob("*.safetensors")) if out.exists() else 0
                print(f"  run {r + 1}: {name}: {seconds:.2f} s, peak RSS {rss:.0f} MB, "
                      f"{written / 1e9:.2f} GB written", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        base_t, base_rss = results["plain copy (shutil.copy)"]
        floor = results["python startup (imports only)"][1]
        print(f"\ncheckpoint: {total / 1e9:.2f} GB in {shards} shards; export keeps 50% of the routed experts\n")
        floor_t = results["python startup (imports only)"][0]
        print("| run | time (s) | x plain copy | time above startup (s) | peak RSS (MB) | x plain copy | "
              "RSS above startup (MB) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, (t, rss) in results.items():
            print(f"| {name} | {t:.2f} | {t / base_t:.2f} | {max(t - floor_t, 0):.2f} | {rss:.0f} | "
                  f"{rss / base_rss:.2f} | {max(rss - floor, 0):.0f} |")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
