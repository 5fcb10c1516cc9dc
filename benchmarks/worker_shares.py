"""How a stage is split between a leader and workers started by hand (as on other machines), side by side in one run.

    python benchmarks/worker_shares.py                  # 1 leader + 2 workers, 0.1 s per candidate
    python benchmarks/worker_shares.py --workers 4 --cost 0.05

The same seeded search runs twice on a fresh journal storage, each time with the leader in this process and
``--workers`` processes that only score queued trials (``evoreap search --worker``'s loop):

* ``fixed``: every process sizes its share from its own ``--workers`` (1 for a hand-started worker), i.e. takes every
  waiting trial: whoever polls first scores the whole stage (what a ``--worker`` on another machine did before);
* ``live``: every process takes ceil(unfinished trials / live workers), the live workers being those announced in the
  study with a fresh beat.

Scoring a candidate costs ``--cost`` seconds of waiting (a worker's own accelerator busy; this box's two shared CPU
cores would otherwise make the split unmeasurable), so the wall time shows how many processes worked in parallel.
Printed: wall time of each search, the ratio, trials scored per process, and whether both found the same allocation.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna

from evoreap.adapters import MoEAdapter
from evoreap.search import storage as st
from evoreap.search.driver import LIVE, EvolutionSettings, Leader, work_queue
from evoreap.search.space import Budget, SearchSpace, load_space_settings
from evoreap.testing import tiny_config

SETTINGS = EvolutionSettings(generations=2, population=2, offspring=12, fidelities=(16, 32, 64), survivors=(4, 2))


def space() -> SearchSpace:
    adapter = MoEAdapter(tiny_config("qwen3_moe", num_hidden_layers=6, mlp_only_layers=[], num_experts=16))
    return SearchSpace.build(adapter, load_space_settings("default"), Budget.resolve(adapter, fraction=0.5))


def value(counts: tuple[int, ...], tokens: int) -> float:
    return float(sum((i % 3 - 1) * k * (i + 1) for i, k in enumerate(counts)) + (sum(counts) % 7) * 16 / tokens)


def stage_scorer(cost: float):
    def score(requests, progress):
        time.sleep(cost * len(requests))
        return [(value(c, n), {}) for c, n in requests]
    return score


def worker(url: str, group: str | None, cost: float) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sp = space()
    study = optuna.load_study(storage=st.open_storage(url), study_name="bench")
    with st.present(study) as me:
        while not study.user_attrs.get("done"):
            if work_queue(study, sp, lambda c, n: (value(c, n), {}), stage_scorer(cost), group, me=me) == 0:
                time.sleep(0.02)
            study = optuna.load_study(storage=study._storage, study_name="bench")


def run(mode: str, workers: int, cost: float, root: Path) -> tuple[float, Counter, tuple[int, ...]]:
    url = f"journal://{root / mode / 'journal.log'}"
    study = optuna.create_study(storage=st.open_storage(url), study_name="bench", direction="minimize")
    study.set_user_attr("done", False)
    group = LIVE if mode == "live" else None
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(url, group, cost)) for _ in range(workers)]
    for p in procs:
        p.start()
    while len(st.live_workers(study)) < workers + 1:  # every worker has set up and announced itself
        time.sleep(0.1)
    t = time.perf_counter()
    result = Leader(study, space(), lambda c, n: (value(c, n), {}), SETTINGS, None, poll=0.02,
                    stage_scorer=stage_scorer(cost), group=group).run()
    seconds = time.perf_counter() - t
    study.set_user_attr("done", True)
    for p in procs:
        p.join()
    scored = Counter(t.system_attrs[st.OWNER_ATTR] for t in study.get_trials()
                     if t.state == optuna.trial.TrialState.COMPLETE)
    return seconds, scored, tuple(result["best"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="processes started besides the leader")
    ap.add_argument("--cost", type=float, default=0.1, help="seconds to score one candidate")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        out = {mode: run(mode, args.workers, args.cost, Path(tmp)) for mode in ("fixed", "live")}
    for mode, (seconds, scored, best) in out.items():
        print(f"{mode:>6}: {seconds:6.2f}s, {sum(scored.values())} trials, per process "
              f"{sorted(scored.values(), reverse=True)}")
    print(f"live / fixed wall time: {out['live'][0] / out['fixed'][0]:.2f}x; same best allocation: "
          f"{out['live'][2] == out['fixed'][2]}")


if __name__ == "__main__":
    main()
