"""Report on the bundled demo model: size, training, held-out loss per domain against a unigram baseline, and
whether experts specialise (per-layer routing entropy, max/mean share, per-domain expert usage).

    python benchmarks/demo_model.py
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from evoreap.data import load_tokens
from evoreap.models import DEMO_MODEL_DIR, load_model
from evoreap.observe import observe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=65536)
    args = ap.parse_args()
    log = json.loads((DEMO_MODEL_DIR / "training_log.json").read_text())
    loaded = load_model(None)
    params = loaded.adapter.param_summary(loaded.model)
    print(f"params {params['total']:,} total, {params['routed_experts']:,} in routed experts, "
          f"{params['active_per_token']:,} active per token")
    print(f"training: {log['steps']} steps, {log['tokens']:,} tokens, {log['train_seconds']:.0f} s "
          f"({log['tokens_per_second']:.0f} tok/s, {log['threads']} threads, seed {log['seed']})\n")
    print("| domain | held-out loss | unigram baseline |")
    print("|---|---|---|")
    for d, v in log["heldout_loss"].items():
        print(f"| {d} | {v:.3f} | {log['unigram_loss'][d]:.3f} |")

    data = load_tokens("demo", loaded.tokenizer, split="calibration", seq_len=256, tokens=args.tokens)
    stats = observe(loaded.model, loaded.adapter, data, progress=False)
    print("\n| layer | routing entropy (1 = uniform) | max/mean share | experts < 1% of mean | "
          "I(expert; domain)/H(domain) | experts with > 50% of tokens from one domain |")
    print("|---|---|---|---|---|---|")
    for layer in stats.layers:
        c = stats.count[layer]
        p = c / c.sum()
        ent = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(len(p)))
        dc = stats.domain_count[layer]  # [D, E]
        joint = dc / dc.sum()
        pd, pe = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
        nz = joint > 0
        mi = float((joint[nz] * (joint[nz] / (pd @ pe)[nz]).log()).sum())
        hd = float(-(pd[pd > 0] * pd[pd > 0].log()).sum())
        share = dc.max(0).values / dc.sum(0).clamp(min=1)
        print(f"| {layer} | {ent:.2f} | {float(p.max() / p.mean()):.1f} | {int((p < 0.01 / len(p)).sum())} | "
              f"{mi / hd:.2f} | {int((share > 0.5).sum())} of {len(p)} |")
    top = {d: [] for d in data.domains}
    layer = stats.layers[len(stats.layers) // 2]
    for i, d in enumerate(data.domains):
        share = stats.domain_count[layer][i] / stats.domain_count[layer][i].sum()
        top[d] = torch.topk(share, 4).indices.tolist()
    print(f"\nlayer {layer}: each domain's four most used experts: " +
          "; ".join(f"{d} {v}" for d, v in top.items()))


if __name__ == "__main__":
    main()
