"""Cost of scoring one candidate (masked forward + nll/kl/esap) against a plain forward on the same tokens.

    python benchmarks/proxy.py            # bundled demo model
    python benchmarks/proxy.py --model DIR --samples 32 --seq-len 256 --top-k 64
    python benchmarks/proxy.py --vocab-passes --vocab 50304 --threads 1   # the proxies' passes over the logits alone

Prints the median of ``--repeats`` interleaved timings of: a plain forward over the rows, an unmasked evaluate, and a
masked evaluate (uniform 50% keep), and the ratio masked-evaluate / plain-forward. The reference is built once
(timed too).

``--vocab-passes``: nll + kl + esap on one batch of random bfloat16 logits ``[batch, seq-len, vocab]`` against a
top-K reference, computed the way evoreap does it (cache-sized chunks, one exponential pass: ``log_partition``) and
the straightforward way (log-softmax of the whole batch in float32, then the tail outside the top-K as a
log-sum-exp over a copy with those ids removed), interleaved, with the output head's matmul (hidden 2048) for scale.
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
from evoreap.proxies import ProxyInputs, evaluate, get_proxy
from evoreap.reference import LOG_FLOOR, logit_chunks, reference_cached


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


def vocab_passes(args: argparse.Namespace) -> None:
    """The proxies' work on one batch of logits, evoreap's way against the straightforward one (see the module
    docstring), and the ratio; both must give the same values."""
    b, length, vocab, k = args.batch_size, args.seq_len, args.vocab, args.top_k
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(b, length, vocab, generator=g) * 3).bfloat16()
    ref_logp = torch.log_softmax(torch.randn(b, length - 1, vocab, generator=g) * 3, -1)
    top_lp, top_ids = torch.topk(ref_logp, k, dim=-1)
    ref = {"topk_logprobs": top_lp, "topk_ids": top_ids.int(),
           "tail_logmass": torch.log1p(-top_lp.exp().sum(-1).clamp_max(1 - 1e-7))}
    targets = torch.randint(0, vocab, (b, length - 1), generator=g)
    valid = torch.ones(b, length - 1, dtype=torch.bool)
    specs = [get_proxy(name) for name in ("nll", "kl", "esap")]
    head = torch.nn.Linear(2048, vocab, bias=False, dtype=torch.bfloat16)
    hidden = torch.randn(b, length, 2048, dtype=torch.bfloat16)
    out: dict[str, dict[str, torch.Tensor]] = {}

    def ours() -> None:
        values = {s.name: torch.zeros(b, length - 1) for s in specs}
        for s, e, chunk in logit_chunks(logits):
            inputs = ProxyInputs(chunk, targets[:, s:e], valid[:, s:e], {n: v[:, s:e] for n, v in ref.items()})
            for spec in specs:
                values[spec.name][:, s:e] = spec.fn(inputs)
        out["ours"] = values

    def straightforward() -> None:
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        ids = ref["topk_ids"].long()
        lq, lp, lpt = logp.gather(-1, ids), ref["topk_logprobs"], ref["tail_logmass"]
        lqt = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), -1).clamp_min(LOG_FLOOR)
        p, pt = lp.exp(), lpt.exp()
        out["straightforward"] = {
            "nll": -logp.gather(-1, targets[..., None]).squeeze(-1),
            "kl": (p * (lp - lq)).sum(-1) + pt * (lpt - lqt),
            "esap": torch.minimum(lp, lq).exp().sum(-1) + torch.minimum(lpt, lqt).exp()}

    with torch.inference_mode():
        times = _interleaved({"ours": ours, "straightforward": straightforward, "head": lambda: head(hidden)},
                             args.repeats)
    t = {name: statistics.median(v) for name, v in times.items()}
    diff = max(float((out["ours"][n] - out["straightforward"][n]).abs().max()) for n in ("nll", "kl", "esap"))
    print(f"logits {b} x {length} x {vocab} bfloat16, top-{k} reference, {args.threads} thread(s), median of "
          f"{args.repeats} interleaved rounds")
    print(f"nll+kl+esap, straightforward  {t['straightforward'] * 1e3:8.1f} ms")
    print(f"nll+kl+esap, evoreap          {t['ours'] * 1e3:8.1f} ms   {t['straightforward'] / t['ours']:.1f}x faster "
          f"(largest difference in a value {diff:.1e})")
    print(f"the output head's matmul      {t['head'] * 1e3:8.1f} ms   (proxies / head: "
          f"{t['ours'] / t['head']:.2f} evoreap, {t['straightforward'] / t['head']:.2f} straightforward)")


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
    p.add_argument("--vocab-passes", action="store_true", help="time the proxies' passes over the logits alone")
    p.add_argument("--vocab", type=int, default=50304, help="vocabulary of --vocab-passes (OLMoE's by default)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.vocab_passes:
        return vocab_passes(args)

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
