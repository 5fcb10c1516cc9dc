"""Pre-quantized pruning, measured: observing an FP8 checkpoint instead of its bf16 original, and exporting it.

    python benchmarks/quant.py [--layers 20] [--experts 64] [--tokens 2048] [--keep-dir DIR]
    python benchmarks/quant.py --load [--dtype bfloat16] ...   # in-memory load (dequantize on load) only

Writes a synthetic Qwen3-MoE (random bf16 weights, hidden 1024, per-expert keys) and the same model as a DeepSeek-style
FP8 checkpoint (float8_e4m3fn + F32 ``weight_scale_inv`` per 128x128 block); with the defaults the FP8 one is about
2.1 GB and the bf16 one 4.2 GB. Then, each in a fresh process:

* observe (streamed, ``--offload``: one decoder layer at a time, fp32 compute) on both: peak RSS and wall time, and
  how the two observations agree: Spearman rank correlation of REAP scores per MoE layer, and the share of the
  experts kept at 50% (top half by ``reap_x_frequency``) that both pick;
* export of the FP8 checkpoint at 50% experts per layer (quantized tensors and scales copied byte for byte) against a
  plain copy of the same kept bytes into one file: wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OBSERVE = r"""
import json, sys, time
import torch


def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

from evoreap.data import TokenData
from evoreap.models import load_config
from evoreap.observe.sequential import SequentialModel
path, tokens, seq_len, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
config = load_config(path)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, config.vocab_size, (tokens // seq_len, seq_len), generator=g)
data = TokenData(ids, torch.ones_like(ids), torch.zeros(len(ids), dtype=torch.long), ("all",))
torch.set_num_threads(2)
t = time.time()
stats = SequentialModel(path, config).observe(data, batch_size=4, progress=False)
wall = time.time() - t
from evoreap.criteria import criterion_values, score_experts
scores = {"reap": {i: v.tolist() for i, v in criterion_values(stats, "reap").items()},
          "keep": {i: v.tolist() for i, v in score_experts(stats, "reap_x_frequency").items()}}
open(out, "w").write(json.dumps(scores))
print(json.dumps({"wall": wall, "peak_mib": hwm_mib()}))
"""

LOAD = r"""
import json, sys, time
import torch


def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

path, dtype, eager = sys.argv[1], sys.argv[2], sys.argv[3] == "eager"
import evoreap.models  # imports (transformers, torch) before the clock and the baseline
if eager:  # the whole checkpoint dequantized into one state dict before transformers loads it (evoreap < this change)
    def dense_state(quant, dt):
        return {n: (t.to(dt) if t.is_floating_point() else t) for n in quant.names() for t in (quant.get(n),)}
    evoreap.models._dequantized_state = dense_state
from transformers import AutoModelForCausalLM  # noqa: F401
base = hwm_mib()
t = time.time()
loaded = evoreap.models.load_model(path, dtype=dtype)
wall = time.time() - t
model_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
print(json.dumps({"wall": wall, "peak_mib": hwm_mib(), "base_mib": base, "model_mib": model_bytes / 2**20}))
"""

EXPORT = r"""
import json, os, sys, time


def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

mode, src, out, experts = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
from evoreap.export import export_pruned, plan_export
from evoreap.models import load_config
from evoreap.adapters import MoEAdapter
adapter = MoEAdapter(load_config(src))
kept = {layer: list(range(0, experts, 2)) for layer in adapter.moe_layer_indices}
t = time.time()
if mode == "export":
    r = export_pruned(src, out, kept, progress=False)
    written = r.bytes_after
else:  # the kept bytes, copied range by range into one file: the floor any export has to pay
    from evoreap.checkpoint.reader import copy_ranges
    _, plan = plan_export(src, kept)
    fds = {}
    with open(out, "wb") as f:
        offset = 0
        for tp in plan.tensors:
            fd = fds.setdefault(tp.source.file, os.open(tp.source.file, os.O_RDONLY))
            offset = copy_ranges(fd, f.fileno(), list(tp.ranges), offset)
    written = offset
print(json.dumps({"wall": time.time() - t, "peak_mib": hwm_mib(), "bytes": written}))
"""


def write_models(root: Path, layers: int, experts: int) -> tuple[Path, Path]:
    """The bf16 original and its FP8 release, written shard by shard (one decoder layer in memory at a time)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    from evoreap.models import DEMO_MODEL_DIR
    from evoreap.testing_quant import quantize_fp8_block

    hidden, inter, vocab = 1024, 512, 8192
    cfg = Qwen3MoeConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=128, num_experts=experts, num_experts_per_tok=8,
                         moe_intermediate_size=inter, intermediate_size=2048, norm_topk_prob=True,
                         tie_word_embeddings=False, max_position_embeddings=4096)
    bf16, fp8 = root / "bf16", root / "fp8"
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, std=0.02):
        return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)

    maps = {bf16: {}, fp8: {}}
    shards = [("outer", {"model.embed_tokens.weight": rnd(vocab, hidden), "lm_head.weight": rnd(vocab, hidden),
                         "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)})]
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
             p + "self_attn.q_norm.weight": torch.ones(128, dtype=torch.bfloat16),
             p + "self_attn.k_norm.weight": torch.ones(128, dtype=torch.bfloat16),
             p + "self_attn.q_proj.weight": rnd(1024, hidden), p + "self_attn.k_proj.weight": rnd(256, hidden),
             p + "self_attn.v_proj.weight": rnd(256, hidden), p + "self_attn.o_proj.weight": rnd(hidden, 1024),
             p + "mlp.gate.weight": rnd(experts, hidden, std=0.1)}
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            t |= {q + "gate_proj.weight": rnd(inter, hidden), q + "up_proj.weight": rnd(inter, hidden),
                  q + "down_proj.weight": rnd(hidden, inter)}
        shards.append((f"layer{i:03d}", t))
    for d in (bf16, fp8):
        d.mkdir()
    for name, t in shards:
        save_file(t, str(bf16 / f"{name}.safetensors"), metadata={"format": "pt"})
        maps[bf16].update(dict.fromkeys(t, f"{name}.safetensors"))
        q = {}
        for k, v in t.items():
            if k.endswith("_proj.weight"):
                q[k], q[f"{k}_scale_inv"] = quantize_fp8_block(v, (128, 128))
            else:
                q[k] = v
        save_file(q, str(fp8 / f"{name}.safetensors"), metadata={"format": "pt"})
        maps[fp8].update(dict.fromkeys(q, f"{name}.safetensors"))
        del t, q
    raw = cfg.to_dict()
    raw["architectures"] = ["Qwen3MoeForCausalLM"]
    for d in (bf16, fp8):
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": maps[d]}))
        c = dict(raw)
        if d == fp8:
            c["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": [128, 128]}
        (d / "config.json").write_text(json.dumps(c))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if (DEMO_MODEL_DIR / f).exists():
                (d / f).write_bytes((DEMO_MODEL_DIR / f).read_bytes())
    return bf16, fp8


def run(code: str, *args: str) -> dict:
    t = time.time()
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"child failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]) | {"process": time.time() - t}


def spearman(a, b) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--keep-dir", default=None, help="write the checkpoints here and keep them (default: a temp dir)")
    ap.add_argument("--load", action="store_true",
                    help="measure only the in-memory load (load_model: the FP8 checkpoint dequantized on load) of "
                         "both, peak RSS against the loaded model's size")
    ap.add_argument("--dtype", default="bfloat16", help="dtype of the in-memory load (--load)")
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        t = time.time()
        if (root / "fp8" / "config.json").is_file() and (root / "bf16" / "config.json").is_file():
            bf16, fp8 = root / "bf16", root / "fp8"  # kept from an earlier run with --keep-dir
        else:
            bf16, fp8 = write_models(root, args.layers, args.experts)
        gen = time.time() - t
        size = {d.name: sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (bf16, fp8)}
        if args.load:
            load = {d.name: run(LOAD, str(d), args.dtype, "lazy") for d in (bf16, fp8)}
            load["fp8, whole state dict dequantized first"] = run(LOAD, str(fp8), args.dtype, "eager")
            size["fp8, whole state dict dequantized first"] = size["fp8"]
            print(f"synthetic Qwen3-MoE, {args.layers} layers x {args.experts} experts; load_model(dtype="
                  f"{args.dtype}) in a fresh process each (peak RSS less the RSS after imports); fp8 is dequantized "
                  "tensor by tensor as transformers' loader asks for each weight\n")
            print("| source | stored | loaded model | load peak RSS over imports (MiB) | / loaded model | wall (s) |")
            print("| --- | --- | --- | --- | --- | --- |")
            for k in load:
                r = load[k]
                extra = r["peak_mib"] - r["base_mib"]
                print(f"| {k} | {size[k] / 1e9:.2f} GB | {r['model_mib']:.0f} MiB | {extra:.0f} | "
                      f"x{extra / r['model_mib']:.2f} | {r['wall']:.1f} |")
            return
        obs = {d.name: run(OBSERVE, str(d), str(args.tokens), str(args.seq_len), str(root / f"{d.name}.stats"))
               for d in (fp8, bf16)}
        scores = {k: json.loads((root / f"{k}.stats").read_text()) for k in obs}
        reap = {k: {i: torch.tensor(v) for i, v in s["reap"].items()} for k, s in scores.items()}
        rho = [spearman(reap["fp8"][i], reap["bf16"][i]) for i in reap["fp8"]]
        keep = {k: {i: torch.tensor(v) for i, v in s["keep"].items()} for k, s in scores.items()}
        half = args.experts // 2
        same = [len(set(keep["fp8"][i].topk(half).indices.tolist()) & set(keep["bf16"][i].topk(half).indices.tolist()))
                / half for i in keep["fp8"]]
        exp = {m: run(EXPORT, m, str(fp8), str(root / f"out-{m}-{time.time():.0f}"), str(args.experts))
               for m in ("export", "copy")}

    print(f"synthetic Qwen3-MoE, {args.layers} layers x {args.experts} experts (generated in {gen:.0f} s); "
          f"{args.tokens} tokens, streamed observe (--offload), fp32 compute\n")
    print("| source | stored | observe peak RSS (MiB) | observe wall (s) |")
    print("| --- | --- | --- | --- |")
    for k in ("bf16", "fp8"):
        print(f"| {k} | {size[k] / 1e9:.2f} GB | {obs[k]['peak_mib']:.0f} | {obs[k]['wall']:.1f} |")
    print(f"\nFP8 / bf16: peak RSS x{obs['fp8']['peak_mib'] / obs['bf16']['peak_mib']:.2f}, "
          f"observe time x{obs['fp8']['wall'] / obs['bf16']['wall']:.2f}, "
          f"stored bytes x{size['fp8'] / size['bf16']:.2f}")
    print(f"REAP rank correlation (Spearman) per MoE layer, FP8 vs bf16: min {min(rho):.4f}, "
          f"mean {sum(rho) / len(rho):.4f}")
    print(f"experts kept at 50% (reap_x_frequency) chosen by both: min {min(same):.1%}, "
          f"mean {sum(same) / len(same):.1%} per layer\n")
    print("| export of the FP8 checkpoint, 50% experts | wall (s) | peak RSS (MiB) | bytes written |")
    print("| --- | --- | --- | --- |")
    for m, label in (("export", "evoreap export (shards, headers, config)"), ("copy", "plain copy of the kept bytes")):
        print(f"| {label} | {exp[m]['wall']:.2f} | {exp[m]['peak_mib']:.0f} | {exp[m]['bytes'] / 1e9:.3f} GB |")
    print(f"\nexport / plain copy: time x{exp['export']['wall'] / exp['copy']['wall']:.2f}, "
          f"peak RSS x{exp['export']['peak_mib'] / exp['copy']['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
