"""Work and time of the population engine against one masked forward per candidate, over a real search.

    python benchmarks/population.py                       # the bundled demo, the README search's settings
    python benchmarks/population.py --generations 20      # the whole README search
    python benchmarks/population.py --olmoe-like          # generated model: OLMoE-1B-7B's hidden size, experts,
                                                          # top-k and vocabulary, fewer layers, bfloat16
    python benchmarks/population.py --memory --generations 4   # peak RSS and time of `evoreap search --budget 0.5`
                                                               # with each engine, in subprocesses

One search session (observation, reference, saliency: the pipeline's own set-up) is run twice from generation 0
on fresh in-memory studies with the same seed: trial by trial (``--engine single``) and a stage at a time
(``--engine population``), in one process, side by side. Printed: the decoder-layer token evaluations computed /
(candidates x layers x tokens) of the population engine, the wall time per scored token of each engine against
one plain forward of the same rows (no proxies), whether both found the same best allocation, and the share of a
forward's FLOPs that the decoder layers take (the output head is computed per candidate by either engine).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import optuna
import torch

from evoreap.adapters import MoEAdapter
from evoreap.masking import masked
from evoreap.models import LoadedModel, load_model, load_tokenizer
from evoreap.pipeline.config import SearchConfig
from evoreap.pipeline.session import SearchSession
from evoreap.proxies import select_sequences
from evoreap.proxies.population import PopulationEvaluator, WorkCount
from evoreap.search.driver import Leader


def olmoe_like(layers: int, dtype: torch.dtype) -> LoadedModel:
    """OLMoE-1B-7B's proportions (hidden 2048, 64 experts of width 1024, top-8, vocabulary 50304, 16 heads) with
    ``layers`` decoder layers and random weights (routers scaled up so that routing is far from uniform)."""
    import transformers as tf

    cfg = tf.OlmoeConfig(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                         vocab_size=50304, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                         max_position_embeddings=4096, norm_topk_prob=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    adapter = MoEAdapter.for_model(model)
    with torch.no_grad():
        for layer in adapter.layers(model):
            layer.router.weight.normal_(0.0, 0.3)
    return LoadedModel(model, load_tokenizer(None), "olmoe-like (generated)", adapter)


def decoder_flop_share(model: torch.nn.Module, adapter: MoEAdapter, seq_len: int) -> float:
    """Multiply-adds per token of the decoder layers (active parameters: routed experts counted top-k times, plus
    attention over half the sequence on average) / those plus the output head's."""
    decoder = model.get_decoder()
    moe = {layer.index: layer for layer in adapter.layers(model)}
    cfg = adapter.config
    heads, head_dim = cfg.num_attention_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // \
        cfg.num_attention_heads
    macs = 0
    for i, layer in enumerate(decoder.layers):
        params = sum(p.numel() for p in layer.parameters())
        if i in moe:
            routed = sum(p.numel() for p in moe[i].experts.parameters())
            params += routed // moe[i].num_experts * moe[i].top_k - routed
        macs += params + 2 * (seq_len // 2) * heads * head_dim
    head = model.get_output_embeddings().weight.numel()
    return macs / (macs + head)


def plain_forward_seconds(model: torch.nn.Module, session: SearchSession, tokens: int, repeats: int,
                          masks: dict | None = None) -> tuple[float, float]:
    """Best of ``repeats`` timings of plain forwards (no proxies; router ``masks`` if given, else none) over the rows
    a candidate is scored on at ``tokens``, per token position: wall seconds and CPU seconds of this process
    (steadier on a shared box)."""
    data, bs = session.search_data, session.config.batch_size
    rows = select_sequences(data, session.order, tokens)
    best = (float("inf"), float("inf"))
    with torch.inference_mode(), masked(model, MoEAdapter.for_model(model), masks or {}):
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            for start in range(0, len(rows), bs):
                index = rows[start:start + bs]
                model(input_ids=data.input_ids[index], attention_mask=data.attention_mask[index], use_cache=False)
            best = min(best, (time.perf_counter() - t, time.process_time() - c))
    positions = len(rows) * data.seq_len
    return best[0] / positions, best[1] / positions


def decoder_seconds(model: torch.nn.Module, session: SearchSession, tokens: int, repeats: int) -> float:
    """Best CPU seconds per token position of the decoder alone (embeddings and layers, no final norm or head)
    over the same rows as :func:`plain_forward_seconds`: the rest of a plain forward is the output head."""
    data, bs = session.search_data, session.config.batch_size
    rows = select_sequences(data, session.order, tokens)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            c = time.process_time()
            for start in range(0, len(rows), bs):
                index = rows[start:start + bs]
                model.get_decoder()(input_ids=data.input_ids[index], attention_mask=data.attention_mask[index],
                                    use_cache=False)
            best = min(best, time.process_time() - c)
    return best / (len(rows) * data.seq_len)


class Split:
    """CPU seconds the population engine spends computing decoder layers (``_advance``: layers, masks, state
    cache) and in the whole of ``score`` (the rest: output head, log-softmax, proxies, per candidate)."""

    def __init__(self):
        self.layers = self.total = 0.0

    def __enter__(self):
        self.saved = PopulationEvaluator._advance, PopulationEvaluator.score
        advance, score = self.saved

        def timed_advance(pop, *a, **kw):
            c = time.process_time()
            try:
                return advance(pop, *a, **kw)
            finally:
                self.layers += time.process_time() - c

        def timed_score(pop, *a, **kw):
            c = time.process_time()
            try:
                return score(pop, *a, **kw)
            finally:
                self.total += time.process_time() - c

        PopulationEvaluator._advance, PopulationEvaluator.score = timed_advance, timed_score
        return self

    def __exit__(self, *exc):
        PopulationEvaluator._advance, PopulationEvaluator.score = self.saved


class StageLog:
    """Wraps the session's stage scorer: per stage, the population engine's work and each candidate's prefix-tree
    path and batches, so that the work can be compared with what an unbounded cache would have computed."""

    def __init__(self, session: SearchSession):
        self.session, self.stage = session, ("?", "?")
        self.calls: list[tuple[tuple, WorkCount, WorkCount, list[tuple[int, ...]], list[tuple[int, ...]]]] = []

    def on_stage(self, info: dict) -> None:
        self.stage = (info.get("generation"), info.get("stage"))

    def __call__(self, requests, progress=None):
        session = self.session
        before = session.population.work if session.population is not None else WorkCount()
        out = session.stage_scorer(requests, lambda done, total: progress and progress(done, total))
        pop, bs = session.population, session.config.batch_size
        for tokens in dict.fromkeys(n for _, n in requests):
            rows = select_sequences(session.search_data, session.order, tokens).tolist()
            batches = [tuple(rows[i:i + bs]) for i in range(0, len(rows), bs)]
            paths = [pop._path(session.masks_for(c)) for c, n in requests if n == tokens]
            self.calls.append((self.stage, before, pop.work, paths, batches))
            before = pop.work
        return out

    def report(self, seq_len: int) -> None:
        """Per stage kind: computed / naive, and the unbounded-cache ideal (every (batch, node) computed once
        ever; and per row, i.e. if states of any batch could be reused on any other batch holding the row)."""
        seen_batch: set = set()
        seen_row: set = set()
        rows_of: dict = {}
        for (gen, stage), w0, w1, paths, batches in self.calls:
            kind = "seeds" if gen == 0 else f"stage {stage}"
            t = rows_of.setdefault(kind, [0, 0, 0, 0, 0])
            t[0] += w1.computed - w0.computed
            t[1] += w1.naive - w0.naive
            t[2] += w1.cached - w0.cached
            for b in batches:
                for p in dict.fromkeys(paths):
                    for node in p[1:]:
                        if (b, node) not in seen_batch:
                            seen_batch.add((b, node))
                            t[3] += len(b) * seq_len
                        for r in b:
                            if (r, node) not in seen_row:
                                seen_row.add((r, node))
                                t[4] += seq_len
        tot = [sum(v[i] for v in rows_of.values()) for i in range(5)]
        print("  work by stage: computed / naive (from the cache) | unbounded cache: same batches, any batch")
        for kind, (c, n, k, ib, ir) in sorted(rows_of.items()) + [("all", tot)]:
            print(f"  {kind:>8}: {c / n:.3f} ({k / n:.3f}) | {ib / n:.3f}, {ir / n:.3f}   [naive {n:,}]")


def memory(args: argparse.Namespace) -> None:
    """`evoreap search --budget 0.5` on the demo with each engine in a subprocess, one after the other, after one
    run that fills the observation and reference cache (so that each measured run does the same set-up work): peak
    RSS (the kernel's maximum resident set of the child), wall and CPU time."""
    import os
    import subprocess
    import sys

    cli = [sys.executable, "-c", "import sys; from evoreap.cli import main; sys.argv[0] = 'evoreap'; sys.exit(main())",
           "search", "--budget", "0.5", "--state-cache-gb", str(args.state_cache_gb)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or os.path.join(tmp, "cache")
        runs = os.path.join(tmp, "runs")
        subprocess.run(cli + ["--generations", "0", "--engine", "single", "--run", "prime", "--runs-dir", runs,
                              "--cache-dir", cache], env=env, check=True, capture_output=True)
        for engine in args.engines.split(","):
            t = time.perf_counter()
            child = subprocess.Popen(cli + ["--generations", str(args.generations), "--engine", engine, "--run",
                                            engine, "--runs-dir", runs, "--cache-dir", cache],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            err = child.stderr.read()
            _, status, usage = os.wait4(child.pid, 0)
            seconds = time.perf_counter() - t
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"{engine} failed:\n{err.decode(errors='replace')[-2000:]}")
            print(f"{engine:>10}: peak RSS {usage.ru_maxrss / 2**20:.2f} GB, {seconds:.0f}s wall, "
                  f"{usage.ru_utime + usage.ru_stime:.0f}s CPU  (--generations {args.generations}, "
                  f"--state-cache-gb {args.state_cache_gb}, OMP_NUM_THREADS={args.threads})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: the bundled demo)")
    p.add_argument("--olmoe-like", action="store_true", help="a generated model with OLMoE-1B-7B's proportions")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of --olmoe-like")
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--fidelities", default="4096,16384,32768")
    p.add_argument("--offspring", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--state-cache-gb", type=float, default=1.0)
    p.add_argument("--engines", default="population,single")
    p.add_argument("--cache-dir", default=None, help="observation/reference cache (default: a temporary one)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="peak RSS and time of the demo search per engine")
    args = p.parse_args()
    if args.memory:
        return memory(args)
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fidelities = tuple(int(x) for x in args.fidelities.split(","))

    with tempfile.TemporaryDirectory() as tmp:
        if args.olmoe_like:
            loaded = olmoe_like(args.layers, torch.bfloat16)
        else:
            loaded = load_model(args.model)
        config = SearchConfig(model=args.model, budget=0.5, generations=args.generations, fidelities=fidelities,
                              offspring=args.offspring, seq_len=args.seq_len, batch_size=args.batch_size,
                              calib_tokens=min(65536, 4 * fidelities[-1]), heldout_tokens=fidelities[0],
                              state_cache_gb=args.state_cache_gb, runs_dir=tmp,
                              cache_dir=args.cache_dir or tmp, quiet=True)
        t = time.perf_counter()
        session = SearchSession.prepare(config, loaded)
        print(f"set-up {time.perf_counter() - t:.1f}s: {loaded.adapter.name}, "
              f"{len(loaded.model.get_decoder().layers)} layers, hidden {loaded.adapter.config.hidden_size}, "
              f"{loaded.adapter.num_experts} experts top-{loaded.adapter.top_k}, vocab "
              f"{loaded.adapter.config.vocab_size}, {loaded.model.dtype}; generations {args.generations}, "
              f"fidelities {fidelities}, batch {args.batch_size} x {args.seq_len}")
        # plain forwards timed before and after the engines (whole batches, as the stages), and averaged: on a
        # shared machine one timing alone can be off by more than the effect measured
        before = plain_forward_seconds(loaded.model, session, fidelities[-1], 2)
        before_decoder = decoder_seconds(loaded.model, session, fidelities[-1], 2)
        share = decoder_flop_share(loaded.model, loaded.adapter, args.seq_len)
        results, splits = {}, {}
        for engine in args.engines.split(","):
            stages = StageLog(session)
            stage_scorer = stages if engine == "population" else None
            session.population = None  # a fresh engine (empty state cache) for each run
            leader = Leader(optuna.create_study(), session.space, session.scorer, session.settings, session.curves,
                            stage_scorer=stage_scorer, on_elites=session.retain_elites, on_stage=stages.on_stage)
            t, c = time.perf_counter(), time.process_time()
            with Split() as split:
                res = leader.run()
            seconds, cpu = time.perf_counter() - t, time.process_time() - c
            positions = sum(len(select_sequences(session.search_data, session.order, h["tokens"]))
                            for h in res["history"]) * session.search_data.seq_len
            results[engine] = (res, seconds, cpu, positions)
            splits[engine] = (split, stages, session.population.work if session.population is not None else None)
        after = plain_forward_seconds(loaded.model, session, fidelities[-1], 2)
        after_decoder = decoder_seconds(loaded.model, session, fidelities[-1], 2)
        plain = ((before[0] + after[0]) / 2, (before[1] + after[1]) / 2)
        plain_decoder = (before_decoder + after_decoder) / 2
        uniform = plain_forward_seconds(loaded.model, session, fidelities[-1], 2,
                                        session.masks_for(session.space.uniform))
        print(f"plain forward per token position: {before[0] * 1e6:.0f} us wall / {before[1] * 1e6:.0f} us CPU "
              f"before the engines, {after[0] * 1e6:.0f} / {after[1] * 1e6:.0f} after; the ratios use the means. "
              f"The uniform allocation's masked forward: {uniform[0] / plain[0]:.2f}x wall, "
              f"{uniform[1] / plain[1]:.2f}x CPU (what pruning itself does to a forward's cost here)")
        for engine, (res, seconds, cpu, positions) in results.items():
            line = (f"{engine:>10}: {len(res['history'])} candidates, {seconds:.1f}s wall ({cpu:.1f}s CPU); per "
                    f"scored token {seconds / positions / plain[0]:.2f}x a plain forward's wall time, "
                    f"{cpu / positions / plain[1]:.2f}x its CPU time")
            split, stages, w = splits[engine]
            if engine == "population":
                line += (f"; decoder-layer token evaluations computed / (candidates x layers x tokens) = "
                         f"{w.computed:,} / {w.naive:,} = {w.ratio:.3f} (from the state cache: "
                         f"{w.cached / w.naive:.3f}; computed with the attention shared by siblings, over the same "
                         f"naive total: {w.attention_shared / w.naive:.3f})")
            print(line)
            if engine == "population":
                stages.report(session.search_data.seq_len)
                per = positions * plain[1]  # CPU seconds of plain forwards of the same tokens
                print(f"  CPU time of the population engine in units of plain forwards of the same tokens: decoder "
                      f"layers {split.layers / per:.3f} (their share of a plain forward: "
                      f"{plain_decoder / plain[1]:.3f}), output head + log-softmax + proxies per candidate "
                      f"{(split.total - split.layers) / per:.3f} (the head's share of a plain forward: "
                      f"{1 - plain_decoder / plain[1]:.3f}), search outside the engine "
                      f"{(cpu - split.total) / per:.3f}")
        if len(results) == 2:
            (a, *_), (b, *_) = results.values()
            print(f"same best allocation: {a['best'] == b['best']}; population / single: wall time "
                  f"{results['population'][1] / results['single'][1]:.2f}, CPU time "
                  f"{results['population'][2] / results['single'][2]:.2f}")
        print(f"decoder layers' share of a forward's multiply-adds (output head the rest): {share:.3f}; "
              f"plain forward {plain[0] * 1e6:.1f} us wall, {plain[1] * 1e6:.1f} us CPU per token position")


if __name__ == "__main__":
    main()
