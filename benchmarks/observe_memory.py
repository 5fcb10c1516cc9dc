"""Peak resident memory of in-memory vs sequential (``--offload``) observation, each in a fresh process.

    python benchmarks/observe_memory.py [--model DIR] [--synthetic-mb 1500] [--tokens 8192]

With ``--model`` it observes that checkpoint; otherwise it writes a synthetic Qwen3-MoE of about ``--synthetic-mb``
MB (fp32, random weights) to a temporary directory, so that the weights dominate memory. Both modes must give the
same statistics; the table shows peak RSS, wall time and the largest difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch


def hwm_mib():  # peak RSS of this process image (VmHWM; ru_maxrss would include the parent's before exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

from evoreap.data import TokenData
mode, path, tokens, seq_len, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
from evoreap.models import load_config
config = load_config(path)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, config.vocab_size, (tokens // seq_len, seq_len), generator=g)
data = TokenData(ids, torch.ones_like(ids), torch.zeros(len(ids), dtype=torch.long), ("all",))
base = hwm_mib()
t = time.time()
if mode == "memory":
    from transformers import AutoModelForCausalLM
    from evoreap.adapters import MoEAdapter
    from evoreap.observe import observe
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stats = observe(model, MoEAdapter.for_model(model), data, batch_size=8, progress=False)
else:
    from evoreap.observe.sequential import SequentialModel
    stats = SequentialModel(path, config).observe(data, batch_size=8, progress=False)
from safetensors.torch import save_file
save_file(stats.to_tensors(), out)
print(json.dumps({"wall": time.time() - t, "peak_mib": hwm_mib(), "import_mib": base}))
"""


def synthetic(path: Path, mb: int) -> None:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    hidden, experts, layers = 512, 32, 8
    per_layer = mb * 2**20 / 4 / layers
    width = max(16, int(per_layer / (3 * hidden * experts)))
    cfg = Qwen3MoeConfig(vocab_size=4096, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=64, num_experts=experts, num_experts_per_tok=4,
                         moe_intermediate_size=width, intermediate_size=1024, norm_topk_prob=True)
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(cfg).save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--synthetic-mb", type=int, default=1500)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--_write-synthetic", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._write_synthetic:
        synthetic(Path(args._write_synthetic[0]), int(args._write_synthetic[1]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            path = str(Path(tmp) / "model")
            # in a child process, so that this parent stays small
            subprocess.run([sys.executable, __file__, "--_write-synthetic", path, str(args.synthetic_mb)], check=True)
        size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 2**20
        res = {}
        for mode in ("memory", "offload"):
            out = str(Path(tmp) / f"{mode}.safetensors")
            t = time.time()
            p = subprocess.run([sys.executable, "-c", CHILD, mode, path, str(args.tokens), str(args.seq_len), out],
                               capture_output=True, text=True)
            if p.returncode:
                sys.exit(f"{mode} failed:\n{p.stderr[-3000:]}")
            res[mode] = json.loads(p.stdout.strip().splitlines()[-1]) | {"process": time.time() - t}
        from safetensors.torch import load_file

        a, b = load_file(str(Path(tmp) / "memory.safetensors")), load_file(str(Path(tmp) / "offload.safetensors"))
        diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    print(f"model {args.model or 'synthetic Qwen3-MoE'} ({size:.0f} MiB of safetensors), {args.tokens} tokens\n")
    print("| mode | peak RSS (MiB) | RSS after imports and data (MiB) | observe wall (s) |")
    print("| --- | --- | --- | --- |")
    for mode, r in res.items():
        print(f"| {mode} | {r['peak_mib']:.0f} | {r['import_mib']:.0f} | {r['wall']:.1f} |")
    print(f"\nmax |stats(memory) - stats(offload)| = {diff:.2e}")


if __name__ == "__main__":
    main()
