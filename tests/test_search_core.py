"""The evolutionary driver on a cheap synthetic objective: feasibility, determinism, resume, racing."""

import math

import optuna
import pytest

from evoreap.adapters import MoEAdapter
from evoreap.search import evolution
from evoreap.search.driver import EvolutionSettings, Leader, spearman
from evoreap.search.space import Budget, SearchSpace, SpaceSettings
from evoreap.testing import tiny_config

optuna.logging.set_verbosity(optuna.logging.ERROR)


def make_space(budget=0.5, **settings):
    cfg = tiny_config("qwen3_moe", num_hidden_layers=8, mlp_only_layers=[], num_experts=32)
    adapter = MoEAdapter(cfg)
    return SearchSpace.build(adapter, SpaceSettings(**settings), Budget.resolve(adapter, fraction=budget))


def toy_scorer(weights):
    """Separable concave utility: layer l values its k-th expert by weights[l] / k; noise shrinks with tokens."""
    calls = []

    def scorer(counts, tokens):
        calls.append((counts, tokens))
        value = -sum(w * math.log(k) for w, k in zip(weights, counts))
        noise = 0.3 * math.sin(hash(counts) % 1000) * 4096 / tokens
        return value + noise, {"values": {"toy": value}}

    return scorer, calls


WEIGHTS = [4, 3, 2, 1, 1, 0.5, 0.5, 0.25]
SETTINGS = EvolutionSettings(generations=6, population=3, offspring=8, fidelities=(1024, 2048, 4096),
                             survivors=(4, 2), seed=3)


def test_space_and_seeds_are_feasible():
    space = make_space(0.5)
    assert space.uniform == (16,) * 8 and space.total == 128
    assert all(space.is_feasible(c) for c in evolution.pattern_seeds(space).values())
    import random

    rng = random.Random(0)
    for _ in range(200):
        child = evolution.mutate(space.uniform, space, rng)
        assert space.is_feasible(child)


def test_infeasible_budget_names_the_numbers():
    with pytest.raises(Exception, match=r"below the floor of 4 per layer x 8 layers = 32 experts"):
        make_space(0.1)


def test_search_beats_uniform_and_is_deterministic():
    space = make_space(0.5)
    results = []
    for _ in range(2):
        scorer, calls = toy_scorer(WEIGHTS)
        study = optuna.create_study()
        res = Leader(study, space, scorer, SETTINGS, curves=None).run()
        results.append(res)
        assert all(space.is_feasible(tuple(h["counts"])) for h in res["history"])
    assert results[0]["best"] == results[1]["best"]
    assert results[0]["best_value"] < results[0]["uniform_value"]
    # the front layers get more experts, as the objective says
    best = results[0]["best"]
    assert best[0] > best[-1]


def test_resume_after_a_crash_equals_uninterrupted(tmp_path):
    space = make_space(0.5)
    scorer, _ = toy_scorer(WEIGHTS)
    ref = Leader(optuna.create_study(), space, scorer, SETTINGS, curves=None).run()

    url = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(storage=url, study_name="s")
    inner, calls = toy_scorer(WEIGHTS)

    def crashing(counts, tokens):
        if len(calls) == 25:
            raise KeyboardInterrupt
        return inner(counts, tokens)

    with pytest.raises(KeyboardInterrupt):
        Leader(study, space, crashing, SETTINGS, curves=None).run()
    before = len(calls)
    scorer2, calls2 = toy_scorer(WEIGHTS)
    study = optuna.load_study(storage=url, study_name="s")
    res = Leader(study, space, scorer2, SETTINGS, curves=None).run()
    assert res["best"] == ref["best"]
    assert res["best_value"] == pytest.approx(ref["best_value"])
    # nothing finished before the crash was computed again (the crash hit before its trial computed anything)
    assert before + len(calls2) == len(ref["history"])
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.FAIL) == 1


def test_trials_carry_params_constraint_and_attrs():
    space = make_space(0.5)
    scorer, _ = toy_scorer(WEIGHTS)
    study = optuna.create_study()
    Leader(study, space, scorer, EvolutionSettings(generations=1, offspring=4, fidelities=(512, 1024, 2048)),
           curves=None).run()
    t = study.get_trials()[0]
    assert set(t.params) == {f"k{i}" for i in space.layers}
    assert t.constraints["budget"] <= 0
    assert t.user_attrs["origin"] == "seed:uniform" and t.user_attrs["tokens"] == 2048


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_layers_of_unequal_expert_size_share_a_parameter_budget():
    """The budget is in parameters: with unequal expert sizes every seed, child and result stays within it and
    uses it (no fixed expert count), and the search still beats uniform."""
    import random

    cfg = tiny_config("qwen3_moe", num_hidden_layers=8, mlp_only_layers=[], num_experts=32)
    adapter = MoEAdapter(cfg)
    sizes = (100, 100, 300, 300, 200, 200, 100, 400)
    budget = Budget.resolve(adapter, fraction=0.5, params_per_expert=sizes)
    assert budget.params == 0.5 * 32 * sum(sizes)  # a fraction of the real per-layer sizes, not the config's one
    space = SearchSpace.build(adapter, SpaceSettings(), budget, params_per_expert=sizes)
    assert not space.equal_sizes and space.uniform == (16,) * 8
    assert space.routed_params(space.uniform) <= budget.params
    rng = random.Random(0)
    parent = space.uniform
    for _ in range(300):
        child = evolution.mutate(parent, space, rng)
        assert space.is_feasible(child)
        room = budget.params - space.routed_params(child)
        # the budget is used: no layer could take one more step of experts within what is left
        assert all(k + space.step > hi or space.step * p > room for k, hi, p in zip(child, space.upper, sizes))
        parent = child
    # fitting a child back into the budget does not push every walk towards the small-expert layers (before it
    # picked layers by size: 300 unselected mutations ended at 4.3 experts in the 400-parameter layer, 30 in a 100 one)
    ends = []
    for seed in range(20):
        rng, c = random.Random(seed), space.uniform
        for _ in range(300):
            c = evolution.mutate(c, space, rng)
        ends.append(c)
    mean = [sum(c[i] for c in ends) / len(ends) for i in range(len(sizes))]
    assert all(8 <= m <= 26 for m in mean), mean
    for seed in evolution.pattern_seeds(space).values():
        assert space.is_feasible(seed)
    scorer, _ = toy_scorer(WEIGHTS)
    res = Leader(optuna.create_study(), space, scorer, SETTINGS, curves=None).run()
    assert space.is_feasible(tuple(res["best"])) and res["best_value"] < res["uniform_value"]
