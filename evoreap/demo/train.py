"""Train the bundled demo MoE from scratch on CPU (seeded, reproducible on the same machine and thread count).

    python -m evoreap.demo.train --steps 3000    # the shipped model (about 40 min on 2 cores)
    python -m evoreap.demo.train --steps 3 --size smoke --out /tmp/m   # a smoke run (tests)

It trains a byte-level BPE tokenizer on the ``train`` split of the four demo domains, then a Qwen3-MoE causal LM
with batches that hold every domain equally, and writes config, fp16 safetensors, tokenizer and
``training_log.json`` (loss curve, tokens, wall time, held-out loss per domain against a unigram baseline).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from evoreap.data.bundled import DOMAINS, load_texts

MODEL_DIR = Path(__file__).parent / "model"
EOS = "<|endoftext|>"

SIZES = {
    # >= 8 MoE layers, >= 32 experts, top-4: per-layer allocation is a real question on this model.
    "demo": dict(hidden_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 intermediate_size=256, moe_intermediate_size=48, num_experts=32, num_experts_per_tok=4),
    "smoke": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  intermediate_size=64, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2),
}


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=None, model_max_length=1024)


def encode_domain(tokenizer, docs: list[str]) -> np.ndarray:
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer(d)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return np.asarray(ids, dtype=np.int64)


@torch.no_grad()
def evaluate(model, streams: dict[str, np.ndarray], seq_len: int, max_seqs: int = 24) -> dict[str, float]:
    model.eval()
    out = {}
    for dom, ids in streams.items():
        n = min(max_seqs, (len(ids) - 1) // seq_len)
        x = torch.from_numpy(ids[: n * seq_len].reshape(n, seq_len))
        losses = [model(input_ids=x[i:i + 8], labels=x[i:i + 8]).loss.item() for i in range(0, n, 8)]
        out[dom] = float(np.mean(losses))
    model.train()
    return out


def unigram_baseline(train: dict[str, np.ndarray], held: dict[str, np.ndarray], vocab: int) -> dict[str, float]:
    counts = np.bincount(np.concatenate(list(train.values())), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return {d: float(-logp[ids].mean()) for d, ids in held.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=MODEL_DIR)
    ap.add_argument("--size", choices=sorted(SIZES), default="demo")
    ap.add_argument("--steps", type=int, default=None, help="fixed step count (default: until --time-limit)")
    ap.add_argument("--time-limit", type=float, default=2700.0, help="seconds of training")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--per-domain", type=int, default=4, help="sequences per domain in a batch")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    train_texts = {d: load_texts(d, "train") for d in DOMAINS}
    tokenizer = train_tokenizer([t for ts in train_texts.values() for t in ts], args.vocab)
    train = {d: encode_domain(tokenizer, ts) for d, ts in train_texts.items()}
    held = {d: encode_domain(tokenizer, load_texts(d, "heldout")) for d in DOMAINS}
    print(f"tokenizer: vocab {len(tokenizer)}, train tokens " +
          ", ".join(f"{d} {len(v):,}" for d, v in train.items()) + f" ({time.time() - t0:.1f}s)", flush=True)

    config = Qwen3MoeConfig(vocab_size=len(tokenizer), max_position_embeddings=1024, norm_topk_prob=True,
                            router_aux_loss_coef=0.01, output_router_logits=True, tie_word_embeddings=True,
                            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **SIZES[args.size])
    model = Qwen3MoeForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(args.seed)
    warmup, log, step, tokens = 100, [], 0, 0
    est_steps = args.steps or 10**9
    t_start = time.time()
    model.train()
    while True:
        elapsed = time.time() - t_start
        if (args.steps is not None and step >= args.steps) or (args.steps is None and elapsed >= args.time_limit):
            break
        # Cosine to 10% over the planned length; for a time budget, progress is measured in wall time.
        frac = step / est_steps if args.steps else elapsed / args.time_limit
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        rows = []
        for d in DOMAINS:
            ids = train[d]
            for s in rng.integers(0, len(ids) - args.seq_len - 1, size=args.per_domain):
                rows.append(ids[s:s + args.seq_len])
        x = torch.from_numpy(np.stack(rows))
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        if step % 25 == 0 or step == 1:
            log.append({"step": step, "tokens": tokens, "seconds": round(time.time() - t_start, 1),
                        "loss": round(out.loss.item(), 4), "lr": lr})
            print(f"step {step} tokens {tokens:,} loss {out.loss.item():.3f} "
                  f"{tokens / (time.time() - t_start):.0f} tok/s", flush=True)
    train_seconds = time.time() - t_start
    heldout = evaluate(model, held, args.seq_len)
    baseline = unigram_baseline(train, held, len(tokenizer))
    print("held-out loss: " + ", ".join(f"{d} {heldout[d]:.3f} (unigram {baseline[d]:.3f})" for d in DOMAINS))

    args.out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.float16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    report = {"params": n_params, "config": SIZES[args.size], "steps": step, "tokens": tokens,
              "train_seconds": round(train_seconds, 1), "tokens_per_second": round(tokens / train_seconds, 1),
              "seed": args.seed, "threads": args.threads, "lr": args.lr, "seq_len": args.seq_len,
              "heldout_loss": heldout, "unigram_loss": baseline, "loss_curve": log}
    (args.out / "training_log.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
