"""The search: an elitist evolutionary loop with multi-fidelity racing, on Optuna storage.

One generation (all randomness from ``Random(f"{seed}:{generation}")``, so a resumed run makes the same choices):

1. ``offspring`` children of the elites by budget-preserving level-switch mutation (a share saliency-guided);
2. stage 1: every child is scored on the first ``fidelities[0]`` tokens of a fixed shuffled order of the search
   data; the best ``survivors[0]`` go on;
3. stage 2: re-scored on ``fidelities[1]`` tokens (a superset of stage 1's); the best ``survivors[1]`` go on;
4. stage 3: scored on ``fidelities[2]`` tokens, the tokens every elite was scored on (paired comparison); the best
   ``population`` of elites and challengers become the next elites.

Generation 0 scores the seeds (uniform, the analytic saliency allocation, shape patterns) at the top fidelity. The
result is the best allocation ever scored at the top fidelity, so it is never worse than uniform on the search
data. Scores are looked up in the study before anything is computed: re-running a killed search replays the same
decisions from stored trials and computes only what is missing.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import optuna
from optuna.trial import TrialState

from evoreap.search import evolution
from evoreap.search.space import SearchSpace
from evoreap.search.storage import (ENQUEUING_ATTR, Worker, claim_trial, enqueue_stage, fail_dead_trials, heartbeat,
                                    live_workers, pop_waiting, present, stage_incomplete, trials_by_key)

log = logging.getLogger(__name__)

Alloc = tuple[int, ...]
# A scorer maps (allocation, tokens) to (value to minimise, user attrs to store).
Scorer = Callable[[Alloc, int], tuple[float, dict[str, Any]]]
# Called while scoring with (tokens scored, tokens to score) of the current group of trials.
TokenProgress = Callable[[int, int], None]
# A stage scorer scores a group of (allocation, tokens) requests at once (sharing work between them) and returns one
# (value, attrs) per request, in order; it reports progress through the callback when one is given.
StageScorer = Callable[[list[tuple[Alloc, int]], TokenProgress | None], list[tuple[float, dict[str, Any]]]]
# How many queued trials one process takes at a time: all of them (None), at most N, or "live": its share of the
# stage among the live workers (see :func:`share_size`).
Group = int | Literal["live"] | None
LIVE: Literal["live"] = "live"


@dataclass(frozen=True)
class EvolutionSettings:
    generations: int = 25
    population: int = 4
    offspring: int = 12
    fidelities: tuple[int, int, int] = (4096, 16384, 32768)
    survivors: tuple[int, int] = (4, 2)
    guided: float = 0.5
    seed: int = 0


@dataclass
class SearchLimits:
    """Optional bounds besides the generation count; reaching one ends the search after the current stage."""

    trials: int | None = None
    time_limit: float | None = None
    token_budget: int | None = None
    started: float = field(default_factory=time.time)

    def reached(self, trials: int, tokens: int) -> str | None:
        if self.trials is not None and trials >= self.trials:
            return f"{trials} trials"
        if self.time_limit is not None and time.time() - self.started >= self.time_limit:
            return f"time limit {self.time_limit:g}s"
        if self.token_budget is not None and tokens >= self.token_budget:
            return f"token budget {self.token_budget:,}"
        return None


def candidate_key(counts: Alloc, tokens: int) -> str:
    return f"{'-'.join(map(str, counts))}@{tokens}"


def params_of(space: SearchSpace, counts: Alloc) -> dict[str, int]:
    return {f"k{layer}": int(k) for layer, k in zip(space.layers, counts)}


def distributions(space: SearchSpace) -> dict[str, optuna.distributions.IntDistribution]:
    return {f"k{layer}": optuna.distributions.IntDistribution(lo, hi, step=space.step)
            for layer, lo, hi in zip(space.layers, space.lower, space.upper)}


def score_trial(study: optuna.Study, trial: optuna.trial.Trial, space: SearchSpace, scorer: Scorer,
                me: Worker | None = None) -> float:
    """Score one popped trial (its params were fixed when it was enqueued) and tell Optuna the result."""
    try:
        counts = tuple(trial.suggest_int(f"k{layer}", lo, hi, step=space.step)
                       for layer, lo, hi in zip(space.layers, space.lower, space.upper))
        tokens = int(trial.user_attrs["tokens"])
        trial.set_constraint("budget", float(space.routed_params(counts) - space.budget.params))
        with heartbeat(study, trial._trial_id, me):  # so that a leader can tell this trial from a dead one
            value, attrs = scorer(counts, tokens)
    except BaseException:
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise
    try:
        _set_attrs(trial, attrs)
        study.tell(trial, value)
    except optuna.exceptions.UpdateFinishedTrialError:  # a leader took it for dead (a stall, clocks apart)
        log.warning("trial %d was failed as dead while it was scored; the leader asks for it again", trial.number)
    return value


def _set_attrs(trial: optuna.trial.Trial, attrs: dict[str, Any]) -> None:
    """User attrs, except ``constraints`` (name -> value, <= 0 feasible, e.g. per-domain floors), which become
    Optuna constraints beside the budget's."""
    for k, v in attrs.items():
        if k == "constraints":
            for name, c in v.items():
                trial.set_constraint(name, float(c))
        else:
            trial.set_user_attr(k, v)


def _counts_of(trial: optuna.trial.Trial, space: SearchSpace) -> Alloc:
    return tuple(trial.suggest_int(f"k{layer}", lo, hi, step=space.step)
                 for layer, lo, hi in zip(space.layers, space.lower, space.upper))


def score_group(study: optuna.Study, trials: list[optuna.trial.Trial], space: SearchSpace,
                stage_scorer: StageScorer, progress: TokenProgress | None = None, me: Worker | None = None
                ) -> list[float]:
    """Score popped trials together (one call of ``stage_scorer``, which shares work between them) and tell Optuna
    each result; if scoring fails, every trial of the group is failed (and asked for again by the leader)."""
    told: set[int] = set()
    try:
        requests = []
        for trial in trials:
            counts = _counts_of(trial, space)
            trial.set_constraint("budget", float(space.routed_params(counts) - space.budget.params))
            requests.append((counts, int(trial.user_attrs["tokens"])))
        with contextlib.ExitStack() as beats:
            for trial in trials:  # so that a leader can tell these trials from dead ones
                beats.enter_context(heartbeat(study, trial._trial_id, me))
            results = stage_scorer(requests, progress)
        values = []
        for trial, (value, attrs) in zip(trials, results):
            told.add(trial._trial_id)
            try:
                _set_attrs(trial, attrs)
                study.tell(trial, value)
            except optuna.exceptions.UpdateFinishedTrialError:  # a leader took it for dead (a stall, clocks apart)
                log.warning("trial %d was failed as dead while it was scored; the leader asks for it again",
                            trial.number)
            values.append(value)
        return values
    except BaseException:
        for trial in trials:
            if trial._trial_id not in told:
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise


def pop_group(study: optuna.Study, limit: Group = None, space: SearchSpace | None = None,
              me: Worker | None = None) -> list[optuna.trial.Trial]:
    """Take up to ``limit`` WAITING trials (None: all; ``"live"``: this worker's share, :func:`share_size`), each
    atomically as :func:`pop_waiting` does, for worker ``me`` (default: this process).

    With ``space``, a share that shares prefixes: the waiting trials in prefix-tree order (by tokens, then keep
    counts layer by layer, so trials that agree on layers 0..l are adjacent) and this process takes the first run
    of up to ``limit`` that no other process has taken; a population engine computes their common layers once.
    Another worker reading the same queue takes the next run."""
    if limit == LIVE:
        attrs = study._storage.get_study_system_attrs(study._study_id)
        if stage_incomplete(study, me, attrs):  # the stage is being queued: wait for all of it
            return []
        limit = share_size(study, me, attrs)
    if space is None:
        group: list[optuna.trial.Trial] = []
        while (limit is None or len(group) < limit) and (trial := pop_waiting(study, me)) is not None:
            group.append(trial)
        return group
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    waiting.sort(key=lambda t: prefix_key(t, space))
    group = []
    for t in waiting:
        if limit is not None and len(group) >= limit:
            break
        if (trial := claim_trial(study, t, me)) is not None:
            group.append(trial)
    return group


def share_size(study: optuna.Study, me: Worker | None = None, attrs: dict[str, Any] | None = None) -> int:
    """This worker's share of the stage now queued: ceil(unfinished trials / live workers), where unfinished counts
    the waiting trials and those being scored, and the live workers are those whose beat in the study is fresh
    (:func:`evoreap.search.storage.live_workers`, this one included). Counting the trials in hand too gives workers
    that arrive together equal shares (12 trials, 3 workers: 4, 4, 4, not 4, 3, 2 and the rest), and a worker that
    finishes early takes a fair part of what is still waiting."""
    unfinished = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)))
    return max(1, -(-unfinished // len(live_workers(study, me, attrs))))


def prefix_key(trial: optuna.trial.FrozenTrial, space: SearchSpace) -> tuple[int, tuple[int, ...]]:
    """(tokens, keep counts in layer order) of a queued trial: sorting by it puts trials that share a prefix of the
    layers together (the depth-first order of their prefix tree), within each fidelity."""
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    return int(trial.user_attrs.get("tokens", 0)), tuple(int(params.get(f"k{layer}", -1)) for layer in space.layers)


def work_queue(study: optuna.Study, space: SearchSpace, scorer: Scorer, stage_scorer: StageScorer | None = None,
               group: Group = None, progress: TokenProgress | None = None, me: Worker | None = None) -> int:
    """Score WAITING trials until the queue is empty; returns how many this process scored. With a
    ``stage_scorer``, up to ``group`` trials at a time (default: every waiting trial; ``"live"``: this worker's
    share among the live workers, sized anew for each share) are scored together."""
    done = 0
    if stage_scorer is None:
        while (trial := pop_waiting(study, me)) is not None:
            score_trial(study, trial, space, scorer, me)
            done += 1
        return done
    while trials := pop_group(study, group, space, me):
        score_group(study, trials, space, stage_scorer, progress, me)
        done += len(trials)
    return done


class Leader:
    """Runs the evolutionary loop; asks the study for scores and enqueues the ones it lacks."""

    def __init__(self, study: optuna.Study, space: SearchSpace, scorer: Scorer, settings: EvolutionSettings,
                 curves: list[list[float]] | None, limits: SearchLimits | None = None, poll: float = 0.2,
                 on_progress: Callable[[dict[str, Any]], None] | None = None,
                 stage_scorer: StageScorer | None = None, group: Group = None,
                 on_stage: Callable[[dict[str, Any]], None] | None = None,
                 extra_seeds: dict[str, Alloc] | None = None,
                 on_elites: Callable[[list[Alloc]], None] | None = None, me: Worker | None = None):
        """``on_progress`` is called after each generation; ``on_stage`` while a stage is scored (``generation``,
        ``stage``, ``candidates``, ``tokens_done``/``tokens_total`` of the trials this process scores) and when it
        ends; ``stage_scorer`` scores up to ``group`` queued trials at a time together (see :func:`work_queue`);
        ``on_elites`` is told the elites whenever they are chosen (a population engine keeps their hidden states,
        from which the next children start); ``me`` is this process as a worker (its id, beats, timeout and clock:
        :class:`evoreap.search.storage.Worker`), announced in the study while :meth:`run` runs."""
        self.study, self.space, self.scorer, self.s = study, space, scorer, settings
        self.me = me or Worker()
        self.curves, self.limits, self.poll = curves, limits or SearchLimits(), poll
        self.on_progress, self.on_stage, self.on_elites = on_progress, on_stage, on_elites
        self.stage_scorer, self.group = stage_scorer, group
        self.extra_seeds = dict(extra_seeds or {})  # e.g. per-domain floor seeds, scored in generation 0
        self.history: list[dict[str, Any]] = []
        self.correlations: list[dict[str, Any]] = []
        self.tokens_spent = 0
        self._counted: set[str] = set()

    # -- scoring through the study ----------------------------------------------------------------------------------
    def score_many(self, requests: list[tuple[Alloc, int, dict[str, Any]]]) -> list[float]:
        """Scores for ``(counts, tokens, attrs)`` requests: from the study where present, else enqueued and scored
        here (and by any workers) before returning."""
        keys = [candidate_key(c, n) for c, n, _ in requests]
        # Read the unfinished trials before the finished ones: states only move WAITING -> RUNNING -> COMPLETE/FAIL,
        # so a trial that a worker finishes between the two reads is seen in one of them, never in neither (which
        # would enqueue a duplicate).
        pending = trials_by_key(self.study, (TrialState.WAITING, TrialState.RUNNING))
        done = trials_by_key(self.study, (TrialState.COMPLETE,))
        stage_trials = []
        for (counts, tokens, attrs), key in zip(requests, keys):
            if key not in done and key not in pending:
                stage_trials.append((params_of(self.space, counts), {**attrs, "key": key, "tokens": tokens}))
                pending[key] = None
        enqueue_stage(self.study, stage_trials, self.me)  # as one, so that workers size their shares from all of it
        stage = {k: requests[0][2].get(k) for k in ("generation", "stage")} if requests else {}
        stage["candidates"] = len(requests)
        asked = sum(n for _, n, _ in requests)
        one_by_one = {"scored": 0, "tokens": 0}

        def report(done: int, total: int) -> None:
            if self.on_stage:
                self.on_stage({**stage, "tokens_done": done, "tokens_total": total})

        def scorer(counts: Alloc, tokens: int) -> tuple[float, dict[str, Any]]:  # one trial at a time: per trial
            out = self.scorer(counts, tokens)
            one_by_one["scored"] += 1
            one_by_one["tokens"] += tokens
            if self.on_stage:
                self.on_stage({**stage, "scored": one_by_one["scored"], "tokens_done": one_by_one["tokens"],
                               "tokens_total": asked})
            return out

        while True:
            work_queue(self.study, self.space, scorer, self.stage_scorer, self.group, report, self.me)
            done = trials_by_key(self.study, (TrialState.COMPLETE,))
            missing = [i for i, k in enumerate(keys) if k not in done]
            if not missing:
                break
            fail_dead_trials(self.study, self.me)
            alive = trials_by_key(self.study, (TrialState.WAITING, TrialState.RUNNING))
            done = trials_by_key(self.study, (TrialState.COMPLETE,))  # after `alive`, as above
            again = []
            for i in missing:  # a failed trial (dead worker, crash) is asked for again
                if keys[i] not in alive and keys[i] not in done:
                    counts, tokens, attrs = requests[i]
                    log.warning("re-queueing %s after a failed trial", keys[i])
                    again.append((params_of(self.space, counts), {**attrs, "key": keys[i], "tokens": tokens}))
            enqueue_stage(self.study, again, self.me)
            time.sleep(self.poll)
        values = [float(done[k].value) for k in keys]
        if self.on_stage:
            self.on_stage({**stage, "finished": True})
        for (counts, tokens, attrs), value, key in zip(requests, values, keys):
            if key in self._counted:  # asked again (equal fidelities): no new tokens were scored
                continue
            self._counted.add(key)
            self.tokens_spent += tokens
            self.history.append({"counts": list(counts), "tokens": tokens, "value": value,
                                 "stage": attrs.get("stage"), "generation": attrs.get("generation"),
                                 "origin": attrs.get("origin"), "tokens_spent": self.tokens_spent})
        return values

    # -- the loop ---------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        with present(self.study, self.me):  # the leader scores too: workers count it when they size their shares
            # a stage this leader's id was enqueuing when it was killed (a restart with the same pid) is not pending
            self.study._storage.set_study_system_attr(self.study._study_id, ENQUEUING_ATTR, None)
            return self._run()

    def _run(self) -> dict[str, Any]:
        s, space = self.s, self.space
        top = s.fidelities[-1]
        seeds: dict[str, Alloc] = {"uniform": space.uniform}
        if self.curves is not None:
            seeds["saliency"] = evolution.analytic_seed(space, self.curves)
        seeds.update(evolution.pattern_seeds(space))
        seeds.update({name: c for name, c in self.extra_seeds.items() if space.is_feasible(c)})
        unique: dict[Alloc, str] = {}
        for name, c in seeds.items():
            unique.setdefault(c, name)
        seed_list = list(unique.items())
        vals = self.score_many([(c, top, {"stage": 3, "generation": 0, "origin": f"seed:{name}"})
                                for c, name in seed_list])
        scored_top: dict[Alloc, float] = dict(zip((c for c, _ in seed_list), vals))
        seen: set[Alloc] = set(scored_top)
        elites = self._select(scored_top)
        log.info("generation 0: %d seeds scored, best %.5g (uniform %.5g), %s tokens", len(seed_list),
                 min(vals), scored_top[space.uniform], f"{self.tokens_spent:,}")
        stop = None
        gen = 0
        for gen in range(1, s.generations + 1):
            stop = self.limits.reached(len(self.history), self.tokens_spent)
            if stop:
                break
            rng = random.Random(f"{s.seed}:{gen}")
            children = evolution.offspring(elites, space, rng, s.offspring, seen, self.curves, s.guided)
            if not children:
                log.info("generation %d: the neighbourhood of the elites is exhausted", gen)
                break
            seen.update(children)
            survivors = children
            low_scores: dict[Alloc, float] = {}
            for stage, (tokens, keep) in enumerate(zip(s.fidelities[:2], s.survivors), start=1):
                v = self.score_many([(c, tokens, {"stage": stage, "generation": gen, "origin": "mutation"})
                                     for c in survivors])
                if stage == 2:
                    self._correlation(gen, [low_scores[c] for c in survivors], v)
                low_scores = dict(zip(survivors, v))
                survivors = [c for _, c in sorted(zip(v, survivors), key=lambda p: p[0])][:keep]
            v = self.score_many([(c, top, {"stage": 3, "generation": gen, "origin": "mutation"}) for c in survivors])
            scored_top.update(zip(survivors, v))
            elites = self._select(scored_top)
            best = min(scored_top.values())
            log.info("generation %d: best %.5g (uniform %.5g), %d trials, %s tokens", gen, best,
                     scored_top[space.uniform], len(self.history), f"{self.tokens_spent:,}")
            if self.on_progress:
                self.on_progress({"generation": gen, "best": best, "tokens": self.tokens_spent,
                                  "trials": len(self.history)})
        best_counts = min(scored_top, key=lambda c: (scored_top[c], c != space.uniform))
        return {"best": best_counts, "best_value": scored_top[best_counts], "uniform_value": scored_top[space.uniform],
                "generations": gen if not stop else gen - 1, "stopped_by": stop or "generations",
                "tokens_spent": self.tokens_spent, "history": self.history, "correlations": self.correlations,
                "scored_top": {"-".join(map(str, c)): v for c, v in scored_top.items()}}

    def _select(self, scored_top: dict[Alloc, float]) -> list[Alloc]:
        """The ``population`` best at the top fidelity (ties: uniform first, then lexicographic, for determinism)."""
        order = sorted(scored_top, key=lambda c: (scored_top[c], c != self.space.uniform, c))
        elites = order[: self.s.population]
        if self.on_elites is not None:
            self.on_elites(elites)
        return elites

    def _correlation(self, gen: int, low: list[float], high: list[float]) -> None:
        if len(low) < 3:
            return
        rho = spearman(low, high)
        self.correlations.append({"generation": gen, "spearman": rho, "n": len(low)})
        log.info("generation %d: rank correlation stage 1 vs stage 2 = %.2f over %d candidates", gen, rho, len(low))


def spearman(a: list[float], b: list[float]) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
