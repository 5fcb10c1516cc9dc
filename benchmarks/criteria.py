"""Held-out loss after uniform pruning, for every registered criterion.

    python benchmarks/criteria.py [--model DIR] [--calib-tokens 65536] [--heldout-tokens 32768] [--min-count 10]

Observes the demo calibration split (through the observation cache), then for each criterion and each uniform
pruning level (25/50/75 % of each layer's experts removed) masks the cut experts (exact virtual pruning) and measures
the mean next-token cross-entropy on the held-out split. Prints a markdown table (lower is better).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from evoreap.allocation import Allocation, keep_masks
from evoreap.criteria import DEFAULT_MIN_COUNT, list_criteria, score_experts
from evoreap.data import load_tokens
from evoreap.masking import masked
from evoreap.models import load_model
from evoreap.observe.store import observe_cached


def heldout_ce(model, adapter, data, masks, batch_size: int) -> float:
    total, n = 0.0, 0
    with torch.inference_mode(), masked(model, adapter, masks):
        for ids, mask, _ in data.batches(batch_size):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            target = ids[:, 1:]
            valid = (mask[:, 1:] * mask[:, :-1]).bool()
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
            total += float(ce[valid.reshape(-1)].double().sum())
            n += int(valid.sum())
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the bundled demo)")
    ap.add_argument("--calib-tokens", type=int, default=65536)
    ap.add_argument("--heldout-tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--min-count", type=int, default=DEFAULT_MIN_COUNT)
    ap.add_argument("--levels", default="0.25,0.5,0.75", help="fractions of experts removed per layer")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    t0 = time.time()
    lm = load_model(args.model)
    model, adapter = lm.model, lm.adapter
    calib = load_tokens("demo", lm.tokenizer, split="calibration", seq_len=args.seq_len, tokens=args.calib_tokens)
    heldout = load_tokens("demo", lm.tokenizer, split="heldout", seq_len=args.seq_len, tokens=args.heldout_tokens)
    key, stats = observe_cached(lm, calib, cache_dir=args.cache_dir, batch_size=args.batch_size, progress=False)
    levels = [float(x) for x in args.levels.split(",")]
    e = adapter.num_experts
    keeps = [max(adapter.min_keep(), round(e * (1 - lv))) for lv in levels]
    base = heldout_ce(model, adapter, heldout, {}, args.batch_size)
    rows = []
    for name, _ in list_criteria():
        scores = score_experts(stats, name, min_count=args.min_count, seed=0)
        ces = []
        for keep in keeps:
            masks = keep_masks(adapter, Allocation.uniform(adapter, keep), scores)
            ces.append(heldout_ce(model, adapter, heldout, masks, args.batch_size))
        rows.append((name, ces))
    print(f"model {lm.path}, calibration {stats.tokens} tokens (observation {key[:12]}), held-out {heldout.num_tokens}"
          f" tokens, min_count {args.min_count}; unpruned held-out CE {base:.4f}; {time.time() - t0:.0f} s\n")
    print("| criterion | " + " | ".join(f"{lv:.0%} pruned (keep {k}/{e})" for lv, k in zip(levels, keeps)) + " |")
    print("| --- |" + " --- |" * len(levels))
    best = [min(r[1][j] for r in rows) for j in range(len(levels))]
    for name, ces in rows:
        cells = [f"**{c:.4f}**" if c == best[j] else f"{c:.4f}" for j, c in enumerate(ces)]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
