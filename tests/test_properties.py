"""Property-based tests (hypothesis) of the parsers that take user input: allocations, search spaces and data specs.

Every input either parses into something valid or raises UsageError (never another exception), and what parses
satisfies the invariants the rest of evoreap relies on.
"""

import math
import random

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from evoreap.adapters import MoEAdapter
from evoreap.allocation import Allocation
from evoreap.data.bundled import DOMAINS, SPLITS
from evoreap.data.spec import parse_data_spec
from evoreap.errors import UsageError
from evoreap.search.evolution import mutate, pattern_seeds
from evoreap.search.space import Budget, SearchSpace, SpaceSettings
from evoreap.testing import tiny_config

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ADAPTERS = {t: MoEAdapter(tiny_config(t)) for t in ("qwen3_moe", "deepseek_v3", "mixtral")}

json_scalars = st.none() | st.booleans() | st.integers(-50, 50) | st.floats(allow_nan=True) | st.text(max_size=4)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c,
                                                                                               max_size=3),
                           max_leaves=8)


# -- allocations ----------------------------------------------------------------------------------------------------

def _naive_ok(adapter, layers, counts):
    if tuple(layers) != tuple(adapter.moe_layer_indices):
        return False
    return all(adapter.min_keep() <= k <= adapter.num_experts and (adapter.n_group <= 1 or k % adapter.n_group == 0)
               for k in counts)


@SETTINGS
@given(data=st.dictionaries(st.sampled_from(["layers", "meta", "format", "x"]), json_values, max_size=4)
       | json_values)
def test_allocation_from_arbitrary_json_parses_or_is_a_usage_error(data):
    try:
        alloc = Allocation.from_json(data)
    except UsageError as e:
        assert "\n" not in str(e)
        return
    assert len(alloc.layers) == len(alloc.counts) > 0
    assert all(isinstance(k, int) and k >= 0 for k in alloc.counts)
    assert list(alloc.layers) == sorted(set(alloc.layers))


@SETTINGS
@given(layers=st.dictionaries(st.text(min_size=1, max_size=3), st.integers(-3, 20), min_size=1, max_size=5))
def test_allocation_layer_keys_are_ascii_indices_or_refused(layers):
    try:
        alloc = Allocation.from_json({"layers": layers})
    except UsageError:
        assert any(not (k.isascii() and k.isdigit()) or v < 0 for k, v in layers.items()) or \
            len({int(k) for k in layers if k.isascii() and k.isdigit()}) < len(layers)
        return
    assert alloc.as_dict() == {int(k): v for k, v in layers.items()}


@SETTINGS
@given(arch=st.sampled_from(sorted(ADAPTERS)), drop=st.booleans(), extra=st.booleans(),
       counts=st.lists(st.integers(-2, 20), min_size=1, max_size=6))
def test_allocation_validate_agrees_with_a_naive_check(arch, drop, extra, counts):
    adapter = ADAPTERS[arch]
    layers = list(adapter.moe_layer_indices)
    if drop:
        layers = layers[1:]
    if extra:
        layers = layers + [max(layers, default=0) + 1]
    counts = (counts * len(layers))[:len(layers)] if layers else []
    assume(layers)
    data = {"layers": {str(layer): k for layer, k in zip(layers, counts)}}
    try:
        alloc = Allocation.from_json(data)
        alloc.validate(adapter)
    except UsageError:
        assert not _naive_ok(adapter, layers, counts)
        return
    assert _naive_ok(adapter, layers, counts)
    again = Allocation.from_json(alloc.to_json(adapter))
    assert again == alloc and again.validate(adapter) == alloc


# -- search spaces --------------------------------------------------------------------------------------------------

setting_values = (st.none() | st.booleans() | st.integers(-3, 40) | st.floats(-1, 3)
                  | st.sampled_from([math.nan, math.inf, -math.inf]) | st.text(max_size=3))
setting_maps = st.dictionaries(
    st.sampled_from(["min_keep_fraction", "min_keep", "max_keep", "step", "max_deviation", "stepp", "a\nb"])
    | st.integers(0, 3),
    setting_values, max_size=5)


@SETTINGS
@given(data=setting_maps | json_values)
def test_space_settings_parse_or_are_a_usage_error(data):
    try:
        s = SpaceSettings.from_mapping(data, "space.yaml")
    except UsageError as e:
        assert str(e).startswith("space.yaml: ") and "\n" not in str(e)
        return
    assert 0 <= s.min_keep_fraction <= 1 and isinstance(s.step, int) and s.step >= 1
    assert s.max_deviation is None or math.isfinite(s.max_deviation) and s.max_deviation >= 0


def _check_space(space: SearchSpace, adapter, seed: int) -> None:
    e = adapter.num_experts
    assert space.is_feasible(space.uniform)
    assert space.routed_params(space.uniform) <= space.budget.params
    assert all(adapter.min_keep() <= a <= b <= e for a, b in zip(space.lower, space.upper))
    assert all(a % space.step == 0 and b % space.step == 0 for a, b in zip(space.lower, space.upper))
    if adapter.n_group > 1:
        assert space.step % adapter.n_group == 0
    rng = random.Random(seed)
    for _ in range(5):
        wild = [rng.randint(-5, 2 * e) for _ in space.layers]
        assert space.is_feasible(space.repair(wild)), wild
    child = space.uniform
    for _ in range(10):
        child = mutate(child, space, rng, guided=0.0)
        assert space.is_feasible(child), child
    assert all(space.is_feasible(c) for c in pattern_seeds(space).values())


@SETTINGS
@given(arch=st.sampled_from(sorted(ADAPTERS)), data=setting_maps,
       fraction=st.floats(-0.5, 1.5) | st.sampled_from([math.nan, math.inf]), seed=st.integers(0, 1000))
def test_search_space_build_is_feasible_or_a_usage_error(arch, data, fraction, seed):
    adapter = ADAPTERS[arch]
    try:
        s = SpaceSettings.from_mapping(data, "space.yaml")
        space = SearchSpace.build(adapter, s, Budget.resolve(adapter, fraction=fraction))
    except UsageError as e:
        assert "\n" not in str(e)
        return
    assert 0 < fraction <= 1
    _check_space(space, adapter, seed)


@SETTINGS
@given(arch=st.sampled_from(sorted(ADAPTERS)), step=st.integers(1, 16), frac=st.sampled_from([0, 0.125, 0.25, 0.5]),
       dev=st.none() | st.floats(0, 2), fraction=st.floats(0.05, 1.0), seed=st.integers(0, 1000))
def test_valid_spaces_give_feasible_uniform_repair_and_mutations(arch, step, frac, dev, fraction, seed):
    adapter = ADAPTERS[arch]
    s = SpaceSettings.from_mapping({"step": step, "min_keep_fraction": frac, "max_deviation": dev}, "space.yaml")
    try:
        space = SearchSpace.build(adapter, s, Budget.resolve(adapter, fraction=fraction))
    except UsageError as e:
        assert any(w in str(e) for w in ("floor", "bounds", "does not fit")), str(e)
        return
    _check_space(space, adapter, seed)


# -- data specs -----------------------------------------------------------------------------------------------------

spec_alphabet = st.sampled_from([*DOMAINS, "demo", "hf:x/y", "nosuch.txt", "@", ":", ",", "0.5", "2", "-1", "nan",
                                 "inf", "1e400", "heldout", "calibration", "bogus", " ", "codd", "hf:"])


@SETTINGS
@given(parts=st.lists(spec_alphabet, min_size=0, max_size=7))
def test_data_spec_parses_or_is_a_usage_error(parts):
    spec = "".join(parts)
    try:
        sources = parse_data_spec(spec, "calibration")
    except UsageError as e:
        assert "\n" not in str(e)
        return
    assert sources
    assert all(s.weight > 0 for s in sources) and math.isclose(sum(s.weight for s in sources), 1.0, rel_tol=1e-9)
    assert len({s.name for s in sources}) == len(sources)
    assert all(s.split in SPLITS for s in sources if s.kind == "demo")


@SETTINGS
@given(items=st.dictionaries(st.sampled_from(DOMAINS), st.tuples(st.sampled_from([None, *SPLITS]),
                                                                   st.floats(1e-3, 1e300)), min_size=1),
       default=st.sampled_from(SPLITS))
def test_valid_data_specs_keep_their_weights_and_splits(items, default):
    spec = ",".join(f"{d}{'@' + s if s else ''}:{w!r}" for d, (s, w) in items.items())
    sources = parse_data_spec(spec, default)
    assert [s.name for s in sources] == list(items)
    total = sum(w for _, w in items.values())
    for src in sources:
        split, w = items[src.name]
        assert src.split == (split or default)
        assert src.weight == pytest.approx(w / total, rel=1e-9)


@pytest.mark.parametrize("spec", ["code:1e308,drama:1e308", "code:5e-324,drama:1"])
def test_extreme_weights_still_normalise(spec):
    sources = parse_data_spec(spec, "calibration")
    assert all(s.weight >= 0 for s in sources) and math.isclose(sum(s.weight for s in sources), 1.0)
    assert sources[0].weight > 0
