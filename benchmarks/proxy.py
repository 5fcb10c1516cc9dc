"""Cost of scoring one candidate (masked forward + nll/kl/esap) against a plain forward on the same tokens.

    python benchmarks/proxy.py            # bundled demo model
    python benchmarks/proxy.py --model DIR --samples 32 --seq-len 256 --top-k 64

Prints the median of ``--repeats`` interleaved timings of: a plain forward over the rows, an unmasked evaluate, and a
masked evaluate (uniform 50% keep), and the ratio masked-evaluate / plain-forward. The reference is built once
(timed too).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from evoreap.allocation import Allocation, keep_masks
from evoreap.data import load_tokens
from evoreap.models import load_model
from evoreap.proxies import evaluate
from evoreap.reference import reference_cached


def _interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Time every function once per round, rounds repeated, so that load drift on a shared box hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: the bundled demo)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--keep", type=float, default=0.5, help="fraction of experts kept per layer")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    model, adapter = loaded.model, loaded.adapter
    data = load_tokens("demo", loaded.tokenizer, split="search", seq_len=args.seq_len, samples=args.samples)
    step = max(adapter.n_group, 1)  # the uniform count nearest --keep that the model can represent
    keep = max(adapter.min_keep(), min(adapter.num_experts, round(adapter.num_experts * args.keep / step) * step))
    scores = {i: torch.rand(adapter.num_experts, generator=torch.Generator().manual_seed(i))
              for i in adapter.moe_layer_indices}
    masks = keep_masks(adapter, Allocation.uniform(adapter, keep), scores)

    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        ref = reference_cached(model, data, top_k=args.top_k, cache_dir=cache, batch_size=args.batch_size,
                               progress=False)
        build_s = time.perf_counter() - t
        size = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file())

    def plain() -> None:
        with torch.inference_mode():
            for ids, mask, _ in data.batches(args.batch_size):
                model(input_ids=ids, attention_mask=mask, use_cache=False)

    def score(m):
        return lambda: evaluate(model, adapter, m, data, proxies=("nll", "kl", "esap"), reference=ref,
                                batch_size=args.batch_size)

    times = _interleaved({"plain": plain, "full": score(None), "masked": score(masks)}, args.repeats)
    t_plain, t_full, t_masked = (statistics.median(times[k]) for k in ("plain", "full", "masked"))
    ratio = statistics.median(m / p for m, p in zip(times["masked"], times["plain"]))
    result = score(masks)()
    print(f"model {loaded.path}: {adapter.name}, {len(adapter.moe_layer_indices)} MoE layers x "
          f"{adapter.num_experts} experts, top-{adapter.top_k}, vocab {ref.vocab_size}; threads {args.threads}")
    print(f"data: {len(data)} x {args.seq_len} tokens ({ref.num_tokens} scored), batch {args.batch_size}; "
          f"candidate keeps {keep}/{adapter.num_experts} per layer")
    print(f"reference build (top-{args.top_k}): {build_s:.3f} s, {size / 1e6:.2f} MB on disk")
    print(f"plain forward          {t_plain * 1e3:8.1f} ms")
    print(f"evaluate, unmasked     {t_full * 1e3:8.1f} ms   ratio {t_full / t_plain:.2f}")
    print(f"evaluate, masked       {t_masked * 1e3:8.1f} ms   ratio {t_masked / t_plain:.2f} "
          f"(median of per-round ratios {ratio:.2f}, {args.repeats} rounds)")
    print("masked candidate: " + ", ".join(f"{k} {v:.4f}" for k, v in result.values.items()))


if __name__ == "__main__":
    main()
