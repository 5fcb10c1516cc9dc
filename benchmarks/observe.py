"""Observation throughput, measured in one run on the same data: plain forward, evoreap observe, and a dense
every-expert-on-every-token observer (the upstream REAP approach, written here as a simple reference).

    python benchmarks/observe.py [--model DIR] [--tokens 16384] [--seq-len 256] [--batch-size 8] [--repeats 2]

Prints a markdown table of tokens/s and time ratios against the plain forward (target: observe <= 1.5x).
"""

from __future__ import annotations

import argparse
import time

import torch

from evoreap.adapters import MoEAdapter
from evoreap.data import load_tokens
from evoreap.models import load_model
from evoreap.observe import observe


def plain_forward(model, adapter, data, batch_size: int) -> None:
    decoder = model.get_decoder()
    with torch.inference_mode():
        for ids, mask, _ in data.batches(batch_size):
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)


def dense_observer(model, adapter: MoEAdapter, data, batch_size: int) -> dict[int, torch.Tensor]:
    """Upstream-style: in a hook on every MoE block, run *every* expert on *every* token (E x T x H activations),
    then keep gate * ||f|| for the routed pairs (REAP sums and counts only)."""
    layers = adapter.layers(model)
    reap = {layer.index: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in layers}
    count = {layer.index: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in layers}
    state = {}

    def hook(layer):
        def fn(module, args, kwargs, output):
            h = (args[0] if args else kwargs["hidden_states"])
            h = h.reshape(-1, h.shape[-1])
            mask = state["mask"]
            _, weights, idx = adapter.route(layer, h)
            acts = torch.stack([adapter.expert_output(layer, e, h) for e in range(layer.num_experts)])  # [E, T, H]
            norms = acts.float().norm(dim=-1)  # [E, T]
            t = torch.arange(h.shape[0]).repeat_interleave(idx.shape[1])
            e = idx.reshape(-1)
            keep = mask[t]
            g = weights.reshape(-1)[keep].double()
            reap[layer.index].index_add_(0, e[keep], g * norms[e[keep], t[keep]].double())
            count[layer.index].index_add_(0, e[keep], torch.ones_like(g))
        return fn

    handles = [layer.block.register_forward_hook(hook(layer), with_kwargs=True) for layer in layers]
    try:
        decoder = model.get_decoder()
        with torch.inference_mode():
            for ids, mask, _ in data.batches(batch_size):
                state["mask"] = mask.reshape(-1).bool()
                decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for hd in handles:
            hd.remove()
    return {i: reap[i] / count[i].clamp_min(1) for i in reap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the bundled demo)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best time of each is kept")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    data = load_tokens("demo", lm.tokenizer, split="calibration", seq_len=args.seq_len, tokens=args.tokens)
    model, adapter = lm.model, lm.adapter
    n = data.num_tokens
    runs = {
        "plain forward (grouped_mm)": lambda: plain_forward(model, adapter, data, args.batch_size),
        "evoreap observe": lambda: observe(model, adapter, data, batch_size=args.batch_size, progress=False),
        "dense every-expert observer": lambda: dense_observer(model, adapter, data, args.batch_size),
    }
    plain_forward(model, adapter, data.subset(range(min(len(data), args.batch_size))), args.batch_size)  # warm-up
    best = {k: float("inf") for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    # the dense observer must agree with observe on REAP (a correctness check of the reference)
    stats = observe(model, adapter, data, batch_size=args.batch_size, progress=False)
    dense = dense_observer(model, adapter, data, args.batch_size)
    err = max(float(((stats.gate_norm_sum[i] / stats.count[i].clamp_min(1)) - dense[i]).abs().max()) for i in dense)

    print(f"model {lm.path} ({adapter.name}, {len(adapter.moe_layer_indices)} MoE layers x {adapter.num_experts} "
          f"experts, top-{adapter.top_k}), {n} tokens, batch {args.batch_size} x {args.seq_len}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}\n")
    print("| method | seconds | tokens/s | time vs plain forward |")
    print("| --- | --- | --- | --- |")
    base = best["plain forward (grouped_mm)"]
    for name, s in best.items():
        print(f"| {name} | {s:.2f} | {n / s:,.0f} | {s / base:.2f}x |")
    print(f"\nmax |REAP(observe) - REAP(dense)| = {err:.2e}")


if __name__ == "__main__":
    main()
