"""Workers take a share of a stage at a time, trials that share prefixes together, each trial exactly once."""

import random
import threading
import time

import optuna
from optuna.trial import TrialState

from evoreap.adapters import MoEAdapter
from evoreap.search import evolution
from evoreap.search import storage as st
from evoreap.search.driver import candidate_key, params_of, pop_group, prefix_key, work_queue
from evoreap.search.space import Budget, SearchSpace, load_space_settings
from evoreap.testing import tiny_config


def _space() -> SearchSpace:
    adapter = MoEAdapter(tiny_config("qwen3_moe", num_hidden_layers=6, mlp_only_layers=[], num_experts=16))
    return SearchSpace.build(adapter, load_space_settings("default"), Budget.resolve(adapter, fraction=0.5))


def _families(space: SearchSpace, size: int) -> list[list[tuple[int, ...]]]:
    """Children of uniform in groups of ``size`` that agree on layer 0 (different across groups)."""
    rng = random.Random(0)
    by_first: dict[int, list[tuple[int, ...]]] = {}
    for _ in range(400):
        c = evolution.mutate(space.uniform, space, rng)
        if space.is_feasible(c) and c not in by_first.setdefault(c[0], []):
            by_first[c[0]].append(c)
    return [v[:size] for v in by_first.values() if len(v) >= size]


def _enqueue(study, space, cands, tokens=64):
    for c in cands:
        st.enqueue(study, params_of(space, c), {"key": candidate_key(c, tokens), "tokens": tokens})


def test_a_share_holds_trials_that_share_prefixes():
    """Two families interleaved in the queue: a share of 3 is one family (one trial at a time in queue order, as
    before, mixed them), in prefix-tree order."""
    space = _space()
    fams = _families(space, 3)[:2]
    assert len(fams) == 2
    study = optuna.create_study(direction="minimize")
    _enqueue(study, space, [c for pair in zip(*fams) for c in pair])
    groups = []
    while trials := pop_group(study, 3, space):
        groups.append([tuple(prefix_key(study._storage.get_trial(t._trial_id), space)[1]) for t in trials])
    assert sorted(map(sorted, groups)) == sorted(map(sorted, fams))
    assert all(g == sorted(g) for g in groups)
    assert all(t.state == TrialState.RUNNING for t in study.get_trials())  # taken, not scored here


def test_workers_take_shares_exactly_once(tmp_path):
    """Three workers (each its own storage connection, as separate processes have) empty one stage by shares of at
    most 3: each trial is scored by exactly one of them, every share is in prefix-tree order, and every trial is
    complete with its score."""
    space = _space()
    cands = [c for fam in _families(space, 2) for c in fam][:24]
    url = f"journal://{tmp_path / 'j.log'}"  # the multi-host storage; its claims are atomic across processes
    study = optuna.create_study(storage=st.open_storage(url), study_name="groups", direction="minimize")
    _enqueue(study, space, cands)
    groups: list[list[tuple[int, ...]]] = []

    def stage_scorer(requests, progress):
        groups.append([c for c, _ in requests])
        time.sleep(0.01)  # some scoring, so that workers interleave
        return [(float(sum(c)), {}) for c, _ in requests]

    def worker():
        work_queue(optuna.load_study(storage=st.open_storage(url), study_name="groups"), space, None, stage_scorer,
                   group=3)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    scored = [c for g in groups for c in g]
    assert sorted(scored) == sorted(cands)  # each trial once
    assert all(0 < len(g) <= 3 and g == sorted(g) for g in groups)
    trials = study.get_trials()
    assert all(t.state == TrialState.COMPLETE and t.value == sum(t.params.values()) for t in trials)
