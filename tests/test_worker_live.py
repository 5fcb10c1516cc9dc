"""Workers size their share of a stage from the workers live in the study (not from --workers), and a worker that
dies with a share in hand loses no trial: after the timeout the leader fails its trials, asks for each once more, and
the search ends exactly as an uninterrupted one does. Time is a clock the test moves, so nothing sleeps."""

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evoreap.adapters import MoEAdapter
from evoreap.search import storage as st
from evoreap.search.driver import (LIVE, EvolutionSettings, Leader, candidate_key, params_of, pop_group, prefix_key,
                                   share_size)
from evoreap.search.space import Budget, SearchSpace, load_space_settings
from evoreap.testing import tiny_config

optuna.logging.set_verbosity(optuna.logging.WARNING)
TIMEOUT = 30.0


class Clock:
    """Wall-clock seconds that move only when the test moves them."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _space() -> SearchSpace:
    adapter = MoEAdapter(tiny_config("qwen3_moe", num_hidden_layers=6, mlp_only_layers=[], num_experts=16))
    return SearchSpace.build(adapter, load_space_settings("default"), Budget.resolve(adapter, fraction=0.5))


@pytest.fixture()
def tmp_path(tmp_path):
    """A directory in memory (tmpfs) where there is one: every trial is a few writes that Optuna fsyncs, and on a
    busy disk the fsyncs, not the search, would take the test's time (measured: 3.6 of 4.3 s)."""
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="evoreap-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _url(tmp_path, kind: str) -> str:
    return f"journal://{tmp_path / 'j.log'}" if kind == "journal" else f"sqlite:///{tmp_path / 's.db'}"


def _children(space: SearchSpace, n: int) -> list[tuple[int, ...]]:
    import random

    from evoreap.search import evolution

    rng, out = random.Random(0), []
    while len(out) < n:
        c = evolution.mutate(space.uniform, space, rng)
        if space.is_feasible(c) and c not in out:
            out.append(c)
    return out


def test_a_worker_whose_clock_is_behind_says_so_once(tmp_path, caplog):
    """Beats are compared across machines: a process that reads another worker's beat from more than the tolerance
    in its own future warns, naming that worker and the gap, once per worker; agreeing clocks say nothing."""
    study = optuna.create_study(storage=st.open_storage(_url(tmp_path, "journal")), study_name="clocks")
    ours, ahead = Clock(), Clock(1_000_000.0 + 95)
    me, near, far = (st.Worker(f"host-{x}:1", timeout=TIMEOUT, clock=c) for x, c in zip("abc", (ours, ours, ahead)))
    for w in (me, near, far):
        st.announce(study, w)
    warned: set[str] = set()
    with caplog.at_level("WARNING", logger="evoreap.search.storage"):
        st.check_clocks(study, me, warned)
        st.check_clocks(study, me, warned)
    assert warned == {far.id}
    assert [r.getMessage() for r in caplog.records] == [
        f"worker {far.id}'s clock is 95 s ahead of this machine's: workers compare beats across machines and take one "
        f"silent for {TIMEOUT:g} s for dead, so synchronise the clocks (NTP)"]


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_shares_follow_the_live_workers(tmp_path, kind):
    """Three workers announced themselves; one has been silent longer than the timeout. Ten queued trials are split
    between the two live ones, 5 and 5, each share a run of the prefix-tree order; a worker that stops (leaves
    :func:`present`) is not counted any more, and the silent one counts again once it beats."""
    space, clock = _space(), Clock()
    url = _url(tmp_path, kind)
    study = optuna.create_study(storage=st.open_storage(url), study_name="live", direction="minimize")
    a, b, c = (st.Worker(f"host-{x}:1", timeout=TIMEOUT, clock=clock) for x in "abc")
    for w in (a, b, c):
        st.announce(study, w)
    clock.now += 20
    st.announce(study, a)
    st.announce(study, b)
    clock.now += 20  # c's last beat is 40 s old, a's and b's 20 s
    assert st.live_workers(study, a) == [a.id, b.id]
    assert st.live_workers(study, c) == [a.id, b.id, c.id]  # a worker asking counts itself

    cands = _children(space, 10)
    for cand in cands:
        st.enqueue(study, params_of(space, cand), {"key": candidate_key(cand, 64), "tokens": 64})
    order = sorted(prefix_key(t, space) for t in study.get_trials())
    share_a = pop_group(study, LIVE, space, a)  # ceil(10 / 2)
    study_b = optuna.load_study(storage=st.open_storage(url), study_name="live")  # b's own connection
    share_b = pop_group(study_b, LIVE, space, b)  # ceil((5 waiting + 5 in a's hands) / 2)
    keys = lambda share: [prefix_key(study._storage.get_trial(t._trial_id), space) for t in share]  # noqa: E731
    assert keys(share_a) == order[:5] and keys(share_b) == order[5:]
    owners = Counter(t.system_attrs[st.OWNER_ATTR] for t in study.get_trials())
    assert owners == {a.id: 5, b.id: 5}

    # the share of the next stage: ceil(12 / 3) with c beating again, ceil(12 / 2) once b has stopped
    study2 = optuna.create_study(storage=study._storage, study_name="next", direction="minimize")
    for cand in _children(space, 12):
        st.enqueue(study2, params_of(space, cand), {"key": candidate_key(cand, 64), "tokens": 64})
    for w in (a, b, c):
        st.announce(study2, w)
    assert len(pop_group(study2, LIVE, space, c)) == 4
    with st.present(study2, st.Worker("host-d:1", timeout=TIMEOUT, clock=clock)):
        assert len(st.live_workers(study2, a)) == 4
    assert len(st.live_workers(study2, a)) == 3  # d left: not counted at once, without waiting for the timeout
    st.announce(study2, b, alive=False)
    assert st.live_workers(study2, a) == [a.id, c.id] and share_size(study2, a) == 6


def test_a_stage_is_shared_once_it_is_all_queued(tmp_path, monkeypatch):
    """Optuna queues one trial at a time: a worker polling while the leader queues a stage takes nothing until the
    last trial is queued (before, it took a share of the first few), then its share of the whole stage. A leader
    killed while queuing holds nobody back once its beat is stale."""
    space, clock = _space(), Clock()
    study = optuna.create_study(storage=st.open_storage(_url(tmp_path, "journal")), direction="minimize")
    leader, worker = (st.Worker(f"host-{x}:1", timeout=TIMEOUT, clock=clock) for x in "lw")
    st.announce(study, leader)
    st.announce(study, worker)
    polled, enqueue = [], st.enqueue

    def enqueue_and_poll(study_, params, attrs):
        enqueue(study_, params, attrs)
        polled.append(len(pop_group(study_, LIVE, space, worker)))

    monkeypatch.setattr(st, "enqueue", enqueue_and_poll)
    stage = [(params_of(space, c), {"key": candidate_key(c, 64), "tokens": 64}) for c in _children(space, 6)]
    st.enqueue_stage(study, stage, leader)
    assert polled == [0] * 6
    assert len(pop_group(study, LIVE, space, worker)) == 3  # ceil(6 / 2)

    study._storage.set_study_system_attr(study._study_id, st.ENQUEUING_ATTR, leader.id)  # killed while queuing
    assert pop_group(study, LIVE, space, worker) == []
    clock.now += TIMEOUT + 1
    st.announce(study, worker)
    assert len(pop_group(study, LIVE, space, worker)) == 3  # the rest: the leader is silent, the worker alone


SETTINGS = EvolutionSettings(generations=3, population=2, offspring=6, fidelities=(16, 32, 64), survivors=(3, 2),
                             seed=1)
# generations, the fidelity of the stage where the worker is killed, and the shares (leader, killed worker) of it:
# on a journal in generation 1's first stage (6 children), on SQLite (Optuna's RDB storage, about 5x slower per trial)
# in generation 0 (7 seeds) of a search of the seeds alone
KILL = {"journal": (3, SETTINGS.fidelities[0], (3, 3)), "sqlite": (0, SETTINGS.fidelities[-1], (4, 3))}


def _value(counts: tuple[int, ...], tokens: int) -> float:
    """A deterministic landscape over keep counts with a fidelity-dependent part (no model needed)."""
    return float(sum((i % 3 - 1) * k * (i + 1) for i, k in enumerate(counts)) + (sum(counts) % 7) * 16 / tokens)


def _search(url: str, generations: int, kill_at: int | None) -> tuple[dict, list[tuple[tuple[int, ...], int]], dict]:
    """A seeded search led by this process on ``url``; with ``kill_at`` a worker on another host takes its share
    of the first stage scored on ``kill_at`` tokens and dies there (it never scores nor beats again)."""
    clock = Clock()
    space = _space()
    study = optuna.create_study(storage=st.open_storage(url), study_name="s", direction="minimize")
    me = st.Worker(timeout=TIMEOUT, clock=clock)
    dead = st.Worker("elsewhere:7", timeout=TIMEOUT, clock=clock)
    scored: list[tuple[tuple[int, ...], int]] = []
    info: dict = {}
    if kill_at is not None:
        st.announce(study, dead)

    def stage_scorer(requests, progress):
        if kill_at is not None and not info and requests[0][1] == kill_at:
            other = optuna.load_study(storage=st.open_storage(url), study_name="s")
            share = pop_group(other, LIVE, space, dead)  # taken while this process holds its own share ...
            info["leader_share"], info["dead_share"] = len(requests), [t._trial_id for t in share]
            clock.now += TIMEOUT + 1  # ... and never heard of again
        scored.extend(requests)
        return [(_value(c, n), {}) for c, n in requests]

    settings = EvolutionSettings(**{**SETTINGS.__dict__, "generations": generations})
    result = Leader(study, space, lambda c, n: (_value(c, n), {}), settings, None, poll=0.001,
                    stage_scorer=stage_scorer, group=LIVE, me=me).run()
    return result, scored, info


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_a_killed_workers_share_is_scored_once_by_another(tmp_path, kind):
    """A worker on another machine takes half of a stage and is killed. After the timeout the leader fails exactly
    that share, asks for each of its trials once more and scores them: every candidate is scored once, each key has
    one complete trial, and the result is the uninterrupted search's."""
    (tmp_path / "ref").mkdir()
    (tmp_path / "kill").mkdir()
    # the uninterrupted search on a journal (the storage does not change the search, only its speed)
    generations, kill_at, shares = KILL[kind]
    reference, ref_scored, _ = _search(_url(tmp_path / "ref", "journal"), generations, None)
    result, scored, info = _search(_url(tmp_path / "kill", kind), generations, kill_at)

    assert (info["leader_share"], len(info["dead_share"])) == shares  # ceil(stage / 2 live workers), the rest
    assert json.dumps(result, sort_keys=True) == json.dumps(reference, sort_keys=True)
    assert Counter(scored) == Counter(ref_scored) and max(Counter(scored).values()) == 1  # each scored once
    study = optuna.load_study(storage=st.open_storage(_url(tmp_path / "kill", kind)), study_name="s")
    trials = study.get_trials()
    complete = [t.user_attrs["key"] for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == len(set(complete)) == len(ref_scored)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert sorted(t._trial_id for t in failed) == sorted(info["dead_share"])
    assert all(t.system_attrs[st.OWNER_ATTR] == "elsewhere:7" for t in failed)
    assert {t.user_attrs["key"] for t in failed} <= set(complete)  # asked for again and completed, once
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)
    assert st.live_workers(study, st.Worker("observer:1", timeout=TIMEOUT)) == ["observer:1"]  # leader left
