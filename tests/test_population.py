"""The population engine: a stage of candidates scored layer by layer with shared prefixes and a hidden-state cache
gives every candidate the values of its own masked forward; progress is reported within a stage."""

import math

import optuna
import pytest
import torch

from evoreap.adapters import MoEAdapter
from evoreap.data import TokenData
from evoreap.pipeline.config import SearchConfig
from evoreap.pipeline.session import SearchSession
from evoreap.proxies import evaluate, select_sequences, token_order
from evoreap.proxies.population import PopulationEvaluator, StateCache
from evoreap.reference import build_reference
from evoreap.search.driver import EvolutionSettings, Leader
from evoreap.search.space import Budget, SearchSpace, SpaceSettings
from evoreap.testing import ARCHITECTURES, tiny_config, tiny_model

PROXIES = ("kl", "nll", "esap", "top1")


def tiny_data():
    """Six rows of 16 tokens in two domains, one of them padded, and the seeded generator that drew them (the
    tests draw their random masks from it next)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (6, 16), generator=g)
    mask = torch.ones(6, 16, dtype=torch.long)
    mask[1, 11:] = 0  # padding, so that attention masks are not trivial
    return TokenData(ids, mask, torch.tensor([0, 1, 0, 1, 0, 1]), ("a", "b")), g


def _setup(arch):
    model = tiny_model(arch)
    adapter = MoEAdapter.for_model(model)
    data, g = tiny_data()
    ref = build_reference(model, data, top_k=16, batch_size=4, progress=False)
    return model, adapter, data, ref, g


def _random_mask(adapter, g):
    e, groups = adapter.num_experts, adapter.n_group
    k = max(adapter.min_keep(), e // 2)
    k -= k % groups
    keep = torch.zeros(e, dtype=torch.bool)
    size = e // groups
    for gi in range(groups):  # the same count in every routing group (group-limited routers)
        keep[gi * size + torch.randperm(size, generator=g)[:k // groups]] = True
    return keep


def _close(got, want):
    assert got.tokens == want.tokens and got.domain_tokens == want.domain_tokens
    for name, v in want.values.items():
        assert abs(got.values[name] - v) <= 1e-5, name
        for d, per in want.per_domain.items():
            assert abs(got.per_domain[d][name] - per[name]) <= 1e-5, (d, name)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_population_equals_one_masked_forward_per_candidate(arch):
    """Shared prefixes (a candidate that differs only in its last MoE layer, a duplicate, the unpruned model), then
    a second call that starts from cached states, then a cache so small that states are spilled to disk."""
    model, adapter, data, ref, g = _setup(arch)
    layers = adapter.moe_layer_indices
    base = {i: _random_mask(adapter, g) for i in layers}
    cands = [base, {**base, layers[-1]: _random_mask(adapter, g)}, dict(base), None]
    order = token_order(data, 0)
    want = [evaluate(model, adapter, c, data, proxies=PROXIES, reference=ref, order=order, n_tokens=40,
                     batch_size=4) for c in cands]
    pop = PopulationEvaluator(model, adapter, data, reference=ref, order=order, batch_size=4)
    calls = []
    hooks = [getattr(layer, adapter.spec.attention_attr).register_forward_hook(lambda *_: calls.append(1))
             for layer in model.get_decoder().layers]
    for got, w in zip(pop.score(cands, proxies=PROXIES, n_tokens=40), want):
        _close(got, w)
    for h in hooks:
        h.remove()
    n = len(model.get_decoder().layers)
    rows = len(select_sequences(data, order, 40))
    positions = rows * data.seq_len
    # distinct prefix-tree nodes: base's n layers, its sibling's from the last MoE layer on, the unpruned model's
    # from the first MoE layer on; the duplicate costs nothing
    assert pop.work.naive == 4 * n * positions
    assert pop.work.computed == (n + (n - layers[-1]) + (n - layers[0])) * positions
    # the sibling and the unpruned model each branch off at a MoE layer from a node another candidate computes
    # through: that layer's attention ran once for both
    assert pop.work.attention_shared == 2 * positions
    assert len(calls) == (n + (n - layers[-1]) + (n - layers[0]) - 2) * -(-rows // 4)

    # a child of `base` differing from layer layers[-1] on: starts from base's cached states
    child = {**base, layers[-1]: _random_mask(adapter, g)}
    before = pop.work.computed
    got = pop.score([child], proxies=PROXIES, n_tokens=40)[0]
    _close(got, evaluate(model, adapter, child, data, proxies=PROXIES, reference=ref, order=order, n_tokens=40,
                         batch_size=4))
    assert pop.work.computed - before == (n - layers[-1]) * positions

    # a 1-byte memory budget: every state goes to disk and comes back from it
    spilled = PopulationEvaluator(model, adapter, data, reference=ref, order=order, batch_size=4,
                                  cache=StateCache(1, spill=True))
    spilled.score(cands[:1], proxies=PROXIES, n_tokens=40)
    assert spilled.cache.disk and not spilled.cache.mem
    for got, w in zip(spilled.score(cands[:2], proxies=PROXIES, n_tokens=40), want):
        _close(got, w)
    assert spilled.cache.hits > 0
    spilled.close()


def test_work_is_shared_and_cached():
    model, adapter, data, ref, g = _setup("qwen3_moe")
    layers, n = adapter.moe_layer_indices, len(model.get_decoder().layers)
    base = {i: _random_mask(adapter, g) for i in layers}
    pop = PopulationEvaluator(model, adapter, data, reference=ref, batch_size=3)
    pop.score([base, dict(base)], proxies="nll")
    positions = len(data) * data.seq_len
    assert (pop.work.computed, pop.work.naive) == (n * positions, 2 * n * positions)  # a duplicate costs nothing
    pop.score([base], proxies="nll")
    assert pop.work.computed == n * positions and pop.work.cached == n * positions  # all from the cache
    with torch.no_grad():  # other weights: nothing stored is valid any more
        model.get_decoder().layers[0].mlp.gate.weight.mul_(2)
    pop.score([base], proxies="nll")
    assert pop.work.computed == 2 * n * positions
    none = PopulationEvaluator(model, adapter, data, reference=ref, batch_size=3, cache=StateCache(0))
    none.score([base], proxies="nll")
    none.score([base], proxies="nll")
    assert none.work.computed == 2 * n * positions


def test_elites_states_outlive_others_in_a_full_cache():
    """A cache that holds one candidate's states: under plain LRU a stranger's states push out the elite's; pinned
    (``retain``), the elite's stay, and its child computes only the layers after its first change."""
    model, adapter, data, ref, g = _setup("qwen3_moe")
    layers, n = adapter.moe_layer_indices, len(model.get_decoder().layers)
    elite = {i: _random_mask(adapter, g) for i in layers}
    stranger = {i: _random_mask(adapter, g) for i in layers}
    child = {**elite, layers[-1]: _random_mask(adapter, g)}
    positions = len(data) * data.seq_len
    state = 3 * data.seq_len * adapter.config.hidden_size * 4  # one batch of 3 rows after one layer, float32
    computed = {}
    for pin in (False, True):
        pop = PopulationEvaluator(model, adapter, data, reference=ref, batch_size=3, cache=StateCache(2 * n * state))
        pop.score([elite], proxies="kl")
        if pin:
            pop.retain([elite])
        pop.score([stranger], proxies="kl")  # differs from layer 0 on: n new states per batch
        before = pop.work.computed
        got = pop.score([child], proxies=PROXIES)[0]
        _close(got, evaluate(model, adapter, child, data, proxies=PROXIES, reference=ref, batch_size=3))
        computed[pin] = pop.work.computed - before
    assert computed[True] == (n - layers[-1]) * positions
    assert computed[False] > computed[True]


def test_a_path_read_from_the_cache_keeps_all_its_states():
    """A cache that holds two candidates' states. Re-scoring A (read from its deepest states) marks every state of
    its path as used, so a newcomer pushes out C's states rather than A's early layers, and a child branching off A
    late computes only the layers after the branch."""
    model, adapter, data, ref, g = _setup("qwen3_moe")
    layers, n = adapter.moe_layer_indices, len(model.get_decoder().layers)
    a, c, b = ({i: _random_mask(adapter, g) for i in layers} for _ in range(3))
    child = {**a, layers[-1]: _random_mask(adapter, g)}
    positions = len(data) * data.seq_len
    state = 3 * data.seq_len * adapter.config.hidden_size * 4  # one batch of 3 rows after one layer, float32
    pop = PopulationEvaluator(model, adapter, data, reference=ref, batch_size=3, cache=StateCache(4 * n * state))
    for cands in ([a], [c], [a], [b]):
        pop.score(cands, proxies="nll")
    before = pop.work.computed
    got = pop.score([child], proxies=PROXIES)[0]
    _close(got, evaluate(model, adapter, child, data, proxies=PROXIES, reference=ref, batch_size=3))
    assert pop.work.computed - before == (n - layers[-1]) * positions


def test_progress_within_a_call():
    """Every batch reports tokens scored so far (over all candidates) and the total (issue: silent scoring)."""
    model, adapter, data, ref, g = _setup("mixtral")
    seen, seen_single = [], []
    pop = PopulationEvaluator(model, adapter, data, reference=ref, batch_size=2)
    pop.score([None, {adapter.moe_layer_indices[0]: _random_mask(adapter, g)}], proxies="kl",
              progress=lambda done, total: seen.append((done, total)))
    total = 2 * int(data.attention_mask[:, 1:].logical_and(data.attention_mask[:, :-1]).sum())
    assert len(seen) == 3 and seen[-1] == (total, total) and seen[0][0] < total
    evaluate(model, adapter, None, data, proxies="kl", reference=ref, batch_size=2,
             progress=lambda done, total: seen_single.append((done, total)))
    assert len(seen_single) == 3 and seen_single[-1] == (total // 2, total // 2)


def test_the_search_bar_moves_within_a_generation():
    """The leader reports each stage while it is scored, before the generation ends; with a stage scorer a whole
    stage is scored in one call and gives the same result as trial by trial."""
    adapter = MoEAdapter(tiny_config("qwen3_moe", num_hidden_layers=6, mlp_only_layers=[], num_experts=16))
    space = SearchSpace.build(adapter, SpaceSettings(), Budget.resolve(adapter, fraction=0.5))

    def value(counts):
        return -sum(w * math.log(k) for w, k in zip((4, 3, 2, 1, 1, 0.5), counts))

    def scorer(counts, tokens):
        return value(counts), {}

    calls, events = [], []

    def stage_scorer(requests, progress):
        calls.append(len(requests))
        for i in range(len(requests)):
            progress(i + 1, len(requests))
        return [(value(c), {}) for c, _ in requests]

    settings = EvolutionSettings(generations=2, population=2, offspring=6, fidelities=(8, 16, 32), survivors=(3, 1),
                                 seed=1)
    gens = []
    ref = Leader(optuna.create_study(), space, scorer, settings, curves=None).run()
    res = Leader(optuna.create_study(), space, scorer, settings, curves=None, stage_scorer=stage_scorer,
                 on_stage=events.append, on_progress=lambda info: gens.append((info["generation"], len(events)))
                 ).run()
    assert res["best"] == ref["best"] and res["scored_top"] == ref["scored_top"]
    assert max(calls) > 1  # whole stages at once
    during = [e for e in events if e.get("generation") == 1 and "tokens_done" in e]
    assert {e["stage"] for e in during} == {1, 2, 3}
    assert gens[0][0] == 1 and all(events.index(e) < gens[0][1] for e in during)  # before generation 1 ended


def test_a_seeded_search_gives_the_same_best_allocation_with_either_engine(small_model_dir, tmp_path):
    """One search session on a saved model; its evolution run once trial by trial (one masked forward each) and
    once a stage at a time through the population engine: the same scores and the same best allocation."""
    config = SearchConfig(model=str(small_model_dir), budget=0.5, generations=1, offspring=4, population=2,
                          fidelities=(128, 256, 512), survivors=(2, 1), calib_tokens=1024, heldout_tokens=128,
                          seq_len=64, batch_size=4, runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "c"),
                          quiet=True)
    session = SearchSession.prepare(config)
    results = {}
    for engine, stage_scorer in (("single", None), ("population", session.stage_scorer)):
        results[engine] = Leader(optuna.create_study(), session.space, session.scorer, session.settings,
                                 session.curves, stage_scorer=stage_scorer).run()
    single, pop = results["single"], results["population"]
    assert pop["best"] == single["best"]
    assert pop["scored_top"].keys() == single["scored_top"].keys() and len(single["scored_top"]) > 3
    for key, v in single["scored_top"].items():
        assert pop["scored_top"][key] == pytest.approx(v, abs=1e-5)
    work = session.population.work
    assert work.cached > 0 and work.computed < work.naive  # shared prefixes and cached states were used


def test_pooled_state_slots_are_reused_and_never_leak_between_states():
    """The cache copies states into reused slots of a few slabs: a slot freed by an eviction takes the next state
    (no new slab once the cache is full), a smaller state (a shorter last batch) fits in a larger slot, a state read
    before its slot was reused keeps its values, and every state read back is the one stored under its key."""
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(3, 5, 4, generator=g) for _ in range(5)] + [torch.randn(2, 5, 4, generator=g)]
    size = states[0].numel() * 4
    cache = StateCache(2 * size)
    want = {}
    for i, t in enumerate(states):
        key = ((i % 2,), i)
        with torch.inference_mode(i == 0):  # slabs made in inference mode stay writable outside it
            cache.put(key, t)
        want[key] = t.clone()
        t.add_(1.0)  # the caller's tensor changes after the put: the cache holds its own copy
        if i:  # the previous state is still held (a cache of two) and unchanged by this put
            prev = ((i - 1) % 2,), i - 1
            assert torch.equal(cache.get(prev, torch.device("cpu")), want[prev])
        read = cache.get(key, torch.device("cpu"))  # now the most recently used: the next put evicts `prev`
        assert torch.equal(read, want[key])
        read_before = read
    assert cache.pool.slabs == 1 and len(cache.mem) == 2 and cache.bytes == 2 * size
    cache.put(((9,), 9), torch.zeros(3, 5, 4))  # evicts and reuses the slot the last read came from
    assert torch.equal(read_before, want[((1,), 5)]) and cache.pool.slabs == 1
    cache.clear()
    assert cache.bytes == 0 and not cache.pool.free


def test_population_with_a_small_reused_cache_equals_one_masked_forward_per_candidate():
    """Generations of children of the previous best through a cache of a few states: its slots are reused across
    calls and batches of two sizes (4 and 2 rows), and every value is exactly the candidate's own masked forward."""
    model, adapter, data, ref, g = _setup("qwen3_moe")
    layers, n = adapter.moe_layer_indices, len(model.get_decoder().layers)
    state = 4 * data.seq_len * adapter.config.hidden_size * 4
    pop = PopulationEvaluator(model, adapter, data, reference=ref, batch_size=4, cache=StateCache(3 * n * state // 2))
    parent = {i: _random_mask(adapter, g) for i in layers}
    for _ in range(2):
        children = [{**parent, layers[-1]: _random_mask(adapter, g)}, parent]
        got = pop.score(children, proxies=PROXIES)
        for c, r in zip(children, got):
            want = evaluate(model, adapter, c, data, proxies=PROXIES, reference=ref, batch_size=4)
            assert r.values == want.values and r.per_domain == want.per_domain
        pop.retain([children[0]])
        parent = children[0]
    assert pop.cache.hits > 0 and pop.cache.pool.slabs <= 2 and pop.cache.bytes <= pop.cache.max_bytes
