"""Adapters reproduce each architecture's own routing and expert outputs (tiny models built from configs)."""

import pytest
import torch

from evoreap.adapters import MoEAdapter, find_spec
from evoreap.errors import UnsupportedModelError
from evoreap.testing import ARCHITECTURES, tiny_config, tiny_model

EXPECTED = {  # model_type: (MoE layers, experts, top-k, shared experts present)
    "qwen3_moe": ([0, 2, 3], 16, 4, False),
    "qwen2_moe": ([1, 3], 12, 2, True),
    "mixtral": ([0, 1, 2, 3], 8, 2, False),
    "olmoe": ([0, 1, 2, 3], 16, 4, False),
    "deepseek_v3": ([1, 2, 3], 16, 4, True),
    "glm4_moe": ([1, 2, 3], 16, 4, True),
    "gpt_oss": ([0, 1, 2, 3], 8, 2, False),
}


def _sorted_by_index(weights, idx):
    order = idx.argsort(dim=-1)
    return weights.gather(-1, order), idx.gather(-1, order)


def _capture(layer):
    """Record what the router hands the experts during a real forward."""
    seen = {}

    def hook(module, args, output):
        seen.setdefault("inputs", []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
        seen.setdefault("outputs", []).append(tuple(o.detach() for o in output))

    return seen, layer.router.register_forward_hook(hook)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_structure_from_config(arch):
    model = tiny_model(arch)
    adapter = MoEAdapter.for_model(model)
    layers, experts, top_k, shared = EXPECTED[arch]
    assert adapter.moe_layer_indices == layers
    assert [layer.index for layer in adapter.layers(model)] == layers
    assert adapter.num_experts == experts and adapter.top_k == top_k
    summary = adapter.param_summary(model)
    # routed-expert params from the config formula equal what the modules hold
    assert summary["routed_experts"] == summary["per_expert"] * experts * len(layers)
    assert (summary["shared_experts"] > 0) == shared
    assert summary["active_per_token"] < summary["total"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_route_reproduces_the_models_own_routing(arch):
    model = tiny_model(arch)
    adapter = MoEAdapter.for_model(model)
    x = torch.randint(0, 256, (3, 24))
    for layer in adapter.layers(model):
        seen, handle = _capture(layer)
        with torch.no_grad():
            model(input_ids=x)
        handle.remove()
        hidden, (logits, weights, idx) = seen["inputs"][0], seen["outputs"][0]
        my_logits, my_w, my_idx = adapter.route(layer, hidden)
        w1, i1 = _sorted_by_index(weights, idx)
        w2, i2 = _sorted_by_index(my_w, my_idx)
        assert torch.equal(i1, i2)
        assert my_w.dtype == weights.dtype
        torch.testing.assert_close(w2, w1, rtol=0, atol=1e-7)
        torch.testing.assert_close(my_logits, logits, rtol=0, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_block_equals_sum_of_gated_expert_outputs(arch):
    """The experts module's output is sum_k g_k * f_k(x) with the adapter's gates and expert forward."""
    model = tiny_model(arch)
    adapter = MoEAdapter.for_model(model)
    layer = adapter.layers(model)[0]
    torch.manual_seed(1)
    h = torch.randn(40, model.config.hidden_size)
    with torch.no_grad():
        _, w, idx = adapter.route(layer, h)
        reference = layer.experts(h, idx, w)
        mine = torch.zeros_like(h)
        for t in range(h.shape[0]):
            for k in range(idx.shape[1]):
                e = int(idx[t, k])
                mine[t] += w[t, k] * adapter.expert_output(layer, e, h[t:t + 1])[0]
    torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)


def test_dense_model_is_refused_with_a_clear_message():
    from transformers import LlamaConfig

    with pytest.raises(UnsupportedModelError, match="'llama' is not a Mixture-of-Experts model"):
        find_spec(LlamaConfig())


def test_unknown_moe_is_refused_naming_the_expert_key():
    from transformers import JetMoeConfig

    with pytest.raises(UnsupportedModelError, match="'jetmoe' has routed experts .*no adapter"):
        find_spec(JetMoeConfig())


def test_group_limited_keep_counts():
    adapter = MoEAdapter(tiny_config("deepseek_v3"))
    assert adapter.n_group == 4 and adapter.min_keep() == 8
    adapter.check_keep_count(1, 12)
    with pytest.raises(Exception, match="multiple of 4"):
        adapter.check_keep_count(1, 10)
    with pytest.raises(Exception, match="between 8"):
        adapter.check_keep_count(1, 4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_expert_params_per_layer_match_the_config_formula(arch):
    model = tiny_model(arch)
    adapter = MoEAdapter.for_model(model)
    assert adapter.expert_params_per_layer(model) == (adapter.expert_params(),) * len(adapter.moe_layer_indices)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_models_run_padded_batches(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 256, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[1, 4:]).all()
