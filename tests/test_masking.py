"""Virtual pruning (router masking) equals physical pruning, and leaves the model exactly as it was."""

import copy

import pytest
import torch

from evoreap.adapters import MoEAdapter
from evoreap.allocation import Allocation, keep_masks
from evoreap.masking import masked
from evoreap.testing import ARCHITECTURES, tiny_model

TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def physically_pruned(model, adapter, masks):
    """A deep copy of ``model`` whose cut experts are deleted: router rows (weight, bias, correction bias) and
    fused expert tensors sliced along dim 0, expert counts fixed on the modules."""
    pruned = copy.deepcopy(model)
    for layer in adapter.layers(pruned):
        keep = masks.get(layer.index)
        if keep is None:
            continue
        idx = keep.nonzero().squeeze(1)
        for name in ("weight", "bias", "e_score_correction_bias"):
            t = getattr(layer.router, name, None)
            if t is None:
                continue
            sliced = t.data[idx].clone()
            if isinstance(t, torch.nn.Parameter):
                setattr(layer.router, name, torch.nn.Parameter(sliced, requires_grad=False))
            else:
                setattr(layer.router, name, sliced)  # registered buffer: stays a buffer
        for name, p in list(layer.experts.named_parameters(recurse=False)):
            assert p.shape[0] == layer.num_experts, name
            setattr(layer.experts, name, torch.nn.Parameter(p.data[idx].clone(), requires_grad=False))
        layer.router.num_experts = layer.experts.num_experts = len(idx)
    return pruned


def _allocations(adapter):
    e, layers = adapter.num_experts, adapter.moe_layer_indices
    step = adapter.n_group if adapter.n_group > 1 else 1
    options = [k for k in range(adapter.min_keep(), e, step)]
    uniform = Allocation.uniform(adapter, e // 2)
    # the smallest legal count, then a spread of others: never all equal
    counts = [options[0]] + [options[(3 * i + 2) % len(options)] for i in range(1, len(layers))]
    if len(set(counts)) == 1:
        counts[-1] = options[-1]
    non_uniform = Allocation(tuple(layers), tuple(counts))
    return [uniform.validate(adapter), non_uniform.validate(adapter)]


def _scores(adapter, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {i: torch.rand(adapter.num_experts, generator=g) for i in adapter.moe_layer_indices}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_masked_equals_physically_pruned(arch):
    model = tiny_model(arch)
    adapter = MoEAdapter.for_model(model)
    full = _logits(model)
    for allocation in _allocations(adapter):
        masks = keep_masks(adapter, allocation, _scores(adapter))
        assert len(masks) == len(adapter.moe_layer_indices)
        with masked(model, adapter, masks):
            virtual = _logits(model)
        physical = _logits(physically_pruned(model, adapter, masks))
        assert (virtual - full).abs().max() > 1e-3, "masking changed nothing; the test would prove nothing"
        assert (virtual - physical).abs().max() <= 1e-5, allocation.counts


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_exit_restores_the_model_exactly(arch):
    model = tiny_model(arch)
    adapter = MoEAdapter.for_model(model)
    before = _logits(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masks = keep_masks(adapter, Allocation.uniform(adapter, adapter.min_keep()), _scores(adapter))
    with masked(model, adapter, masks):
        assert not torch.equal(_logits(model), before)
    assert torch.equal(_logits(model), before)

    with pytest.raises(RuntimeError, match="boom"):
        with masked(model, adapter, masks):
            _logits(model)
            raise RuntimeError("boom")
    assert torch.equal(_logits(model), before)
    assert all(not layer.router._forward_hooks for layer in adapter.layers(model))
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_keeping_fewer_than_top_k_is_refused(arch):
    model = tiny_model(arch)
    adapter = MoEAdapter.for_model(model)
    first, last = adapter.moe_layer_indices[0], adapter.moe_layer_indices[-1]
    ok = torch.ones(adapter.num_experts, dtype=torch.bool)
    too_few = torch.zeros(adapter.num_experts, dtype=torch.bool)
    too_few[: adapter.top_k - 1] = True
    with pytest.raises(ValueError, match="top-k"):
        with masked(model, adapter, {first: ok, last: too_few}):
            pass
    # the hook already placed on the first layer is gone again
    assert all(not layer.router._forward_hooks for layer in adapter.layers(model))


def test_unknown_layer_is_refused():
    model = tiny_model("qwen3_moe")
    adapter = MoEAdapter.for_model(model)
    with pytest.raises(ValueError, match="not MoE layers"):
        with masked(model, adapter, {1: torch.ones(adapter.num_experts, dtype=torch.bool)}):
            pass


def test_unbalanced_routing_groups_are_refused():
    model = tiny_model("deepseek_v3")  # 16 experts in 4 groups of 4, topk_group 2, top-4
    adapter = MoEAdapter.for_model(model)
    layer = adapter.moe_layer_indices[0]
    keep = torch.ones(16, dtype=torch.bool)
    keep[[0, 1]] = False  # group 0 keeps 2, the others 4: no exported model routes like this
    with pytest.raises(ValueError, match="routing groups"):
        with masked(model, adapter, {layer: keep}):
            pass
    keep = torch.tensor([1, 1, 0, 0] * 4, dtype=torch.bool)  # 2 per group: legal (2 groups x 2 >= top-4)
    with masked(model, adapter, {layer: keep}):
        pass
