"""Criteria: registry, planted structure on a real model, ordering rules, plugins."""

from __future__ import annotations

import sys

import pytest
import torch

from evoreap import criteria
from evoreap.adapters import MoEAdapter
from evoreap.criteria import get_criterion, list_criteria, register_criterion, score_experts
from evoreap.data import TokenData
from evoreap.errors import UsageError
from evoreap.observe import ExpertStats, observe
from evoreap.testing import tiny_model

BUILTIN = ("reap", "frequency", "gate_mass", "ean", "reap_x_frequency", "max_activation", "random")


def synthetic(count, gate_norm, norm=None, prob=None) -> ExpertStats:
    count = torch.tensor(count, dtype=torch.float64)
    gn = torch.tensor(gate_norm, dtype=torch.float64)
    norm = gn * 2 if norm is None else torch.tensor(norm, dtype=torch.float64)
    prob = count / 3 if prob is None else torch.tensor(prob, dtype=torch.float64)
    one = lambda t: {5: t}  # noqa: E731 - decoder layer 5
    return ExpertStats(count=one(count), gate_sum=one(count * 0.5), norm_sum=one(norm), gate_norm_sum=one(gn),
                       max_norm=one(torch.where(count > 0, norm, 0 * norm)), prob_mass=one(prob),
                       domain_count=one(count[None]), domains=(), tokens=int(count.sum()))


def test_builtins_listed():
    names = [n for n, _ in list_criteria()]
    assert set(BUILTIN) <= set(names)
    assert all(desc for _, desc in list_criteria())


@pytest.mark.parametrize("name", BUILTIN)
def test_never_routed_rank_last(name):
    # expert 1 and 3 never routed but carry (impossible) huge sums; they must still rank below every routed one
    stats = synthetic([50, 0, 20, 0, 30], [5.0, 1e6, 1.0, 1e6, 9.0], prob=[0.1, 9.0, 0.3, 9.0, 0.2])
    s = score_experts(stats, name)[5]
    assert s.dtype == torch.float64 and torch.isfinite(s).all()
    assert s[[1, 3]].max() < s[[0, 2, 4]].min()


def test_reap_values_and_min_count():
    # means: 0.1, 0.05, 100 (1 token), 0.3
    stats = synthetic([10, 20, 1, 10], [1.0, 1.0, 100.0, 3.0])
    trusted = score_experts(stats, "reap", min_count=5)[5]
    assert torch.argsort(trusted, descending=True).tolist() == [3, 0, 1, 2]  # the 1-token expert last
    assert trusted[[0, 1, 3]].tolist() == pytest.approx([0.1, 0.05, 0.3])
    raw = score_experts(stats, "reap", min_count=0)[5]
    assert raw.tolist() == pytest.approx([0.1, 0.05, 100.0, 0.3])
    assert score_experts(stats, "reap_x_frequency")[5].tolist() == pytest.approx([1.0, 1.0, 100.0, 3.0])
    assert score_experts(stats, "frequency")[5].tolist() == [10, 20, 1, 10]
    assert score_experts(stats, "ean", min_count=0)[5].tolist() == pytest.approx([0.2, 0.1, 200.0, 0.6])
    with pytest.raises(UsageError, match="min-count"):
        score_experts(stats, "reap", min_count=-1)


def test_random_is_seeded():
    stats = synthetic([5] * 8, [1.0] * 8)
    a, b = score_experts(stats, "random", seed=1)[5], score_experts(stats, "random", seed=1)[5]
    assert torch.equal(a, b)
    assert not torch.equal(a, score_experts(stats, "random", seed=2)[5])


def test_unknown_name_suggests_close_ones():
    with pytest.raises(UsageError, match="did you mean reap"):
        get_criterion("reapp")
    with pytest.raises(UsageError, match="known: "):
        get_criterion("zzzzzz")


def test_user_registered_criterion():
    @register_criterion("test_gate_mean", "mean gate weight")
    def gate_mean(stats, min_count):
        return stats.gate_sum / stats.count.clamp_min(1)

    try:
        assert ("test_gate_mean", "mean gate weight") in list_criteria()
        s = score_experts(synthetic([4, 2, 0], [1.0, 1.0, 1.0]), "test_gate_mean")[5]
        assert s[:2].tolist() == [0.5, 0.5] and s[2] < 0.5
    finally:
        criteria._REGISTRY.pop("test_gate_mean")


def test_bad_criterion_output_is_reported():
    register_criterion("test_bad", "wrong length")(lambda stats, min_count: torch.zeros(3))
    try:
        with pytest.raises(UsageError, match="returned 3 scores"):
            score_experts(synthetic([1, 1], [1.0, 1.0]), "test_bad")
    finally:
        criteria._REGISTRY.pop("test_bad")


def test_entry_point_plugin(tmp_path, monkeypatch):
    (tmp_path / "evoreap_test_plugin.py").write_text(
        "import torch\n"
        "def loudest(stats, min_count):\n"
        "    '''largest max norm, negated (a test plugin)'''\n"
        "    return -stats.max_norm\n")
    dist = tmp_path / "evoreap_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: evoreap-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[evoreap.criteria]\ntest_plugin = evoreap_test_plugin:loudest\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(criteria, "_entry_points_loaded", False)
    try:
        assert ("test_plugin", "largest max norm, negated (a test plugin)") in list_criteria()
        s = score_experts(synthetic([1, 1], [1.0, 3.0]), "test_plugin")[5]
        assert s.tolist() == [-2.0, -6.0]
    finally:
        criteria._REGISTRY.pop("test_plugin", None)
        sys.modules.pop("evoreap_test_plugin", None)


def test_planted_structure_on_a_real_model():
    """Zeroing an expert's down_proj makes its REAP 0; scaling it by c scales its REAP (and EAN, max) by c."""
    model = tiny_model("qwen3_moe")
    adapter = MoEAdapter.for_model(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (8, 32), generator=g)
    data = TokenData(ids, torch.ones_like(ids), torch.zeros(8, dtype=torch.long), ("all",))
    base = observe(model, adapter, data, batch_size=8, progress=False)
    layer = adapter.layers(model)[1]  # a later MoE layer: only its own experts change below
    i = layer.index
    counts = base.count[i]
    zeroed, scaled = torch.argsort(counts, descending=True)[:2].tolist()  # two frequently routed experts
    c = 3.0
    with torch.no_grad():
        layer.experts.down_proj[zeroed].zero_()
        layer.experts.down_proj[scaled].mul_(c)
    after = observe(model, adapter, data, batch_size=8, progress=False)
    assert torch.equal(after.count[i], counts)  # routing into this layer unchanged
    reap_before = score_experts(base, "reap")[i]
    reap_after = score_experts(after, "reap")[i]
    assert reap_after[zeroed] == 0.0
    assert torch.argsort(reap_after)[0].item() == zeroed  # the weakest routed expert now
    assert reap_after[scaled].item() == pytest.approx(c * reap_before[scaled].item(), rel=1e-5)
    for name in ("ean", "max_activation", "reap_x_frequency"):
        b, a = score_experts(base, name)[i], score_experts(after, name)[i]
        assert a[scaled].item() == pytest.approx(c * b[scaled].item(), rel=1e-5), name
        assert a[zeroed].item() == 0.0, name
    # the router-only criteria do not see expert outputs at all
    for name in ("frequency", "gate_mass"):
        assert torch.equal(score_experts(base, name)[i], score_experts(after, name)[i]), name
