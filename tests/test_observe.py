"""The observer against a naive per-token, per-expert reference on tiny models of every supported architecture."""

from __future__ import annotations

import pytest
import torch

from evoreap.adapters import MoEAdapter
from evoreap.data import TokenData
from evoreap.errors import EvoreapError
from evoreap.observe import ExpertStats, Recorder, observe, recording
from evoreap.observe import recorder as recorder_module
from evoreap.observe.stats import FIELDS
from evoreap.testing import ARCHITECTURES, tiny_model


def make_model(arch: str):
    model = tiny_model(arch)
    return model, MoEAdapter.for_model(model)


def make_data(n: int = 4, length: int = 12, seed: int = 0) -> TokenData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 5:] = 0  # right padding in two sequences
    mask[n - 1, length - 2:] = 0
    return TokenData(ids, mask, torch.arange(n) % 2, ("even", "odd"))


def naive_stats(model, adapter: MoEAdapter, data: TokenData) -> ExpertStats:
    """Capture each MoE block's input, then route and run every routed (token, expert) pair one at a time."""
    layers = adapter.layers(model)
    inputs: dict[int, torch.Tensor] = {}
    handles = [layer.block.register_forward_pre_hook(
        lambda m, args, kwargs, i=layer.index: inputs.__setitem__(
            i, (args[0] if args else kwargs["hidden_states"]).detach().clone()), with_kwargs=True)
        for layer in layers]
    try:
        with torch.no_grad():
            model(input_ids=data.input_ids, attention_mask=data.attention_mask)
    finally:
        for h in handles:
            h.remove()
    mask = data.attention_mask.reshape(-1).bool()
    dom = data.domain_ids[:, None].expand_as(data.attention_mask).reshape(-1)
    stats = ExpertStats.zeros({layer.index: layer.num_experts for layer in layers}, data.domains)
    kind = adapter.spec.router_kind
    with torch.no_grad():
        for layer in layers:
            i = layer.index
            h = inputs[i].reshape(-1, inputs[i].shape[-1])
            logits, weights, idx = adapter.route(layer, h)
            for t in range(h.shape[0]):
                if not mask[t]:
                    continue
                lt = logits[t].double()
                probs = lt.sigmoid() if kind == "sigmoid_group" else torch.softmax(lt, -1)
                stats.prob_mass[i].add_(probs)
                for s in range(idx.shape[1]):
                    e = int(idx[t, s])
                    g = float(weights[t, s])
                    n = float(adapter.expert_output(layer, e, h[t:t + 1]).double().norm())
                    stats.count[i][e] += 1
                    stats.gate_sum[i][e] += g
                    stats.norm_sum[i][e] += n
                    stats.gate_norm_sum[i][e] += g * n
                    stats.max_norm[i][e] = max(float(stats.max_norm[i][e]), n)
                    stats.domain_count[i][int(dom[t]), e] += 1
                    stats.domain_gate_norm_sum[i][int(dom[t]), e] += g * n
    dt = tuple(int(data.attention_mask[data.domain_ids == d].sum()) for d in range(len(data.domains)))
    return ExpertStats(**{f: getattr(stats, f) for f in FIELDS}, domains=data.domains, tokens=int(mask.sum()),
                       domain_tokens=dt)


def assert_stats_close(got: ExpertStats, want: ExpertStats, rtol: float = 1e-5) -> None:
    assert got.layers == want.layers
    assert got.tokens == want.tokens and got.domain_tokens == want.domain_tokens and got.domains == want.domains
    for f in FIELDS:
        for i in want.layers:
            a, b = getattr(got, f)[i], getattr(want, f)[i]
            assert a.dtype == torch.float64, f
            err = ((a - b).abs() / b.abs().clamp_min(1e-12)).max().item()
            assert err <= rtol, f"layer {i} {f}: relative error {err:.2e}\n{a}\n{b}"


def hooks_of(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_quantity_matches_naive_reference(arch):
    model, adapter = make_model(arch)
    data = make_data()
    want = naive_stats(model, adapter, data)
    with torch.no_grad():
        plain = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    previous, hooks = model.config._experts_implementation, hooks_of(model)

    # In one forward: the logits are the model's own and the statistics match the reference.
    layers = adapter.layers(model)
    rec = Recorder(adapter, layers, data.domains)
    with torch.no_grad(), recording(model, rec, layers):
        assert model.config._experts_implementation == recorder_module.IMPLEMENTATION
        rec.begin_batch(data.attention_mask, data.domain_ids)
        seen = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    assert (seen - plain).abs().max().item() <= 1e-5
    assert_stats_close(rec.result(), want)

    # observe() in batches of 3 (a ragged last batch) gives the same sums.
    got = observe(model, adapter, data, batch_size=3, progress=False)
    assert_stats_close(got, want)
    assert got.tokens == int(data.attention_mask.sum())
    assert int(got.count[layers[0].index].sum()) == got.tokens * adapter.top_k
    assert model.config._experts_implementation == previous and hooks_of(model) == hooks
    assert not recorder_module._ACTIVE


def test_padding_never_counts():
    model, adapter = make_model("qwen3_moe")
    data = make_data()
    base = observe(model, adapter, data, batch_size=4, progress=False)
    # Different ids under the padding: identical statistics (right padding cannot influence real tokens).
    ids = data.input_ids.clone()
    ids[data.attention_mask == 0] = 7
    other = observe(model, adapter, TokenData(ids, data.attention_mask, data.domain_ids, data.domains),
                    batch_size=4, progress=False)
    assert base.allclose(other, rtol=1e-12)
    assert base.tokens == int(data.attention_mask.sum()) < data.attention_mask.numel()


def test_merge_equals_concatenation():
    model, adapter = make_model("deepseek_v3")
    data = make_data(n=6)
    whole = observe(model, adapter, data, batch_size=2, progress=False)
    first = observe(model, adapter, data.subset(range(0, 4)), batch_size=2, progress=False)
    second = observe(model, adapter, data.subset(range(4, 6)), batch_size=2, progress=False)
    merged = first.merge(second)
    for f in FIELDS:
        for i in whole.layers:
            assert torch.allclose(getattr(merged, f)[i], getattr(whole, f)[i], rtol=1e-13, atol=0), f
    assert merged.tokens == whole.tokens and merged.domain_tokens == whole.domain_tokens
    # Continuing from partial sums is bit-identical to an uninterrupted run (what resume relies on).
    resumed = observe(model, adapter, data, batch_size=2, progress=False, initial=first, start_batch=2)
    assert all(torch.equal(getattr(resumed, f)[i], getattr(whole, f)[i]) for f in FIELDS for i in whole.layers)


def test_nothing_remains_after_a_failure_midway():
    model, adapter = make_model("gpt_oss")
    data = make_data()
    with torch.no_grad():
        before = model(input_ids=data.input_ids).logits
    previous, hooks = model.config._experts_implementation, hooks_of(model)
    calls = []

    def boom(module, args, output):
        calls.append(1)
        if len(calls) == 2:  # the second batch, after one successful forward
            raise RuntimeError("boom")

    handle = model.get_decoder().layers[2].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        observe(model, adapter, data, batch_size=2, progress=False)
    handle.remove()
    assert model.config._experts_implementation == previous
    assert hooks_of(model) == hooks
    assert not recorder_module._ACTIVE
    with torch.no_grad():
        assert torch.equal(model(input_ids=data.input_ids).logits, before)


def test_nested_observation_is_refused():
    model, adapter = make_model("mixtral")
    layers = adapter.layers(model)
    with recording(model, Recorder(adapter, layers), layers):
        with pytest.raises(EvoreapError, match="already being observed"):
            with recording(model, Recorder(adapter, layers), layers):
                pass
    assert not recorder_module._ACTIVE


def test_tensor_roundtrip():
    model, adapter = make_model("olmoe")
    stats = observe(model, adapter, make_data(), batch_size=4, progress=False)
    back = ExpertStats.from_tensors(stats.to_tensors(), stats.domains)
    assert back.allclose(stats, rtol=0) and back.domain_tokens == stats.domain_tokens
    view = stats.layer(stats.layers[0])
    assert view.num_experts == adapter.num_experts and view.domain_count.shape == (2, adapter.num_experts)
