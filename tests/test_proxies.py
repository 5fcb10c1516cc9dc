"""Proxies and the reference cache, checked against a naive full-vocabulary computation on tiny models."""

import math
import os

import pytest
import torch

import evoreap.reference as reference_mod
from evoreap.adapters import MoEAdapter
from evoreap.allocation import Allocation, keep_masks
from evoreap.data import TokenData
from evoreap.errors import EvoreapError, UsageError
from evoreap.masking import masked
from evoreap.proxies import (PROXIES, ProxyInputs, evaluate, get_proxy, loss_value, parse_proxy_weights, register_proxy,
                             select_sequences, token_order, weighted_value)
from evoreap.reference import LOG_FLOOR, Reference, build_reference, log_partition, logit_chunks, \
    reference_cached
from evoreap.testing import tiny_model

DOMAINS = ("code", "drama", "math")
ATOL = 2e-5


def _data(n=7, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[4, -3:] = 0  # a right-padded row: its last 3 positions are not scored
    ids[4, -3:] = 0
    domain_ids = torch.tensor([0, 1, 2, 0, 1, 0, 2][:n])
    return TokenData(ids, mask, domain_ids, DOMAINS, {d: "x" for d in DOMAINS})


def _setup(arch="qwen3_moe", seed=0):
    model = tiny_model(arch, seed=seed)
    adapter = MoEAdapter.for_model(model)
    counts = [adapter.min_keep() if i % 2 == 0 else adapter.num_experts - adapter.n_group
              for i, _ in enumerate(adapter.moe_layer_indices)]
    allocation = Allocation(tuple(adapter.moe_layer_indices), tuple(counts)).validate(adapter)
    g = torch.Generator().manual_seed(5)
    scores = {i: torch.rand(adapter.num_experts, generator=g) for i in adapter.moe_layer_indices}
    return model, adapter, keep_masks(adapter, allocation, scores)


def naive(model, adapter, masks, data, top_k, rows=None):
    """Loops over rows and positions with full softmaxes in float64; per-domain sums and token counts."""
    rows = range(len(data)) if rows is None else [int(r) for r in rows]
    sums = {d: {"nll": 0.0, "kl": 0.0, "esap": 0.0, "kl_full": 0.0, "esap_full": 0.0} for d in DOMAINS}
    tokens = {d: 0 for d in DOMAINS}
    for n in rows:
        ids, mask = data.input_ids[n:n + 1], data.attention_mask[n:n + 1]
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask).logits[0].double()
            with masked(model, adapter, masks or {}):
                cand = model(input_ids=ids, attention_mask=mask).logits[0].double()
        domain = DOMAINS[int(data.domain_ids[n])]
        for t in range(data.seq_len - 1):
            if not (mask[0, t] and mask[0, t + 1]):
                continue
            p, q = torch.softmax(full[t], -1), torch.softmax(cand[t], -1)
            s = sums[domain]
            s["nll"] -= math.log(q[data.input_ids[n, t + 1]])
            top = torch.argsort(p, descending=True)[:top_k]
            pt, qt = max(0.0, 1 - float(p[top].sum())), max(0.0, 1 - float(q[top].sum()))
            s["kl"] += float((p[top] * (p[top] / q[top]).log()).sum()) + (pt * math.log(pt / qt) if pt > 1e-12 else 0)
            s["esap"] += float(torch.minimum(p[top], q[top]).sum()) + min(pt, qt)
            s["kl_full"] += float((p * (p / q).log()).sum())
            s["esap_full"] += float(torch.minimum(p, q).sum())
            tokens[domain] += 1
    return sums, tokens


def _means(sums, tokens):
    overall = {k: sum(sums[d][k] for d in DOMAINS) / sum(tokens.values()) for k in sums[DOMAINS[0]]}
    per_domain = {d: {k: v / tokens[d] for k, v in sums[d].items()} for d in DOMAINS if tokens[d]}
    return overall, per_domain


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_proxies_equal_a_naive_computation(arch):
    model, adapter, masks = _setup(arch)
    data = _data()
    ref = build_reference(model, data, top_k=8, batch_size=3, progress=False)
    result = evaluate(model, adapter, masks, data, proxies=("nll", "kl", "esap"), reference=ref, batch_size=4)
    overall, per_domain = _means(*naive(model, adapter, masks, data, top_k=8))
    assert result.tokens == 7 * 9 - 3 == ref.num_tokens
    assert result.domain_tokens == {"code": 27, "drama": 15, "math": 18}
    for proxy in ("nll", "kl", "esap"):
        assert result.values[proxy] == pytest.approx(overall[proxy], abs=ATOL, rel=1e-5)
        for d in DOMAINS:
            assert result.per_domain[d][proxy] == pytest.approx(per_domain[d][proxy], abs=ATOL, rel=1e-5)
    # the candidate really differs from the unpruned model, and top-8 of 256 is a strict coarsening
    assert result.values["kl"] > 1e-3 and result.values["esap"] < 0.999
    assert result.values["kl"] <= overall["kl_full"] + 1e-6  # data-processing inequality
    assert result.values["esap"] >= overall["esap_full"] - 1e-6


def test_top_k_equal_to_vocab_is_the_full_kl_and_esap():
    model, adapter, masks = _setup()
    data = _data()
    ref = build_reference(model, data, top_k=256, progress=False)
    assert ref.tail_logmass.max() <= -100  # no tail left (floored, not -inf)
    result = evaluate(model, adapter, masks, data, proxies=("kl", "esap"), reference=ref)
    overall, per_domain = _means(*naive(model, adapter, masks, data, top_k=256))
    assert result.values["kl"] == pytest.approx(overall["kl_full"], abs=ATOL, rel=1e-5)
    assert result.values["esap"] == pytest.approx(overall["esap_full"], abs=ATOL, rel=1e-5)
    for d in DOMAINS:
        assert result.per_domain[d]["kl"] == pytest.approx(per_domain[d]["kl_full"], abs=ATOL, rel=1e-5)


def test_log_partition_against_float64():
    """The one-pass normaliser on bfloat16 logits (as a bf16 model's head gives them) against float64 log-sum-exps,
    with and without gradients (router repair differentiates it)."""
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 5000) * 4).bfloat16()
    logits[0, 0, 7] = 60.0  # one token takes almost all the mass: the tail must not come from 1 - sum
    ids = torch.stack([torch.randperm(5000)[:16] for _ in range(15)]).view(3, 5, 16)
    ids[0, 0, 0] = 7
    x = logits.double()
    log_z = torch.logsumexp(x, -1)
    tail = torch.logsumexp(x.scatter(-1, ids, float("-inf")), -1) - log_z
    got_z, got_tail = log_partition(logits, ids)
    assert got_z.dtype == got_tail.dtype == torch.float32
    assert torch.allclose(got_z.double(), log_z, atol=2e-6, rtol=0)
    assert torch.allclose(got_tail.double(), tail, atol=1e-5, rtol=0)
    assert float(got_tail[0, 0]) < -30  # exp(-42): float32 1 - sum cannot go below about exp(-17)
    assert torch.allclose(log_partition(logits)[0], got_z, atol=1e-6, rtol=0)  # without ids: log Z alone
    assert log_partition(torch.tensor([[0.0, -1e30]]), torch.tensor([[0]]))[1].item() == LOG_FLOOR
    leaf = logits.float().requires_grad_()
    z, t = log_partition(leaf, ids)
    (z.sum() + t.sum()).backward()
    ref_leaf = logits.double().requires_grad_()
    ref_z = torch.logsumexp(ref_leaf, -1)
    ref_t = torch.logsumexp(ref_leaf.scatter(-1, ids, float("-inf")), -1) - ref_z
    (ref_z.sum() + ref_t.sum()).backward()
    assert torch.allclose(leaf.grad.double(), ref_leaf.grad, atol=1e-6)


def test_logit_chunks_cover_the_scored_positions_with_views():
    """Small chunks on a CPU (cache-sized), one per batch elsewhere (here the meta device), never a copy."""
    logits = torch.zeros(2, 10, 100_000)
    chunks = list(logit_chunks(logits))
    assert [(s, e) for s, e, _ in chunks] == [(i, i + 1) for i in range(9)]  # 2 x 100k floats already fill one
    assert all(c.data_ptr() == logits[:, s].data_ptr() for s, _, c in chunks)
    assert [(s, e) for s, e, _ in logit_chunks(torch.empty(2, 10, 100_000, device="meta"))] == [(0, 9)]


def test_proxy_inputs_derive_log_probs_from_the_logits_without_changing_them():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 300) * 5
    before = logits.clone()
    targets = torch.randint(0, 300, (2, 3))
    top = torch.topk(logits, 4, dim=-1)
    lsm = torch.log_softmax(logits.double(), -1)
    ref = {"topk_ids": top.indices.int(), "topk_logprobs": lsm.gather(-1, top.indices).float(),
           "tail_logmass": torch.log1p(-lsm.gather(-1, top.indices).exp().sum(-1)).float()}
    inputs = ProxyInputs(logits, targets, torch.ones(2, 3, dtype=torch.bool), ref)
    assert torch.allclose(inputs.logprobs.double(), lsm, atol=1e-5)
    assert torch.allclose(inputs.target_logprobs.double(), lsm.gather(-1, targets[..., None]).squeeze(-1), atol=1e-5)
    assert torch.allclose(get_proxy("kl").fn(inputs).double(), torch.zeros(2, 3, dtype=torch.float64), atol=1e-5)
    assert torch.equal(logits, before)  # the in-place passes work on a copy, never on the caller's float32 logits


def test_reference_tensors_and_the_unpruned_candidate():
    model, adapter, _ = _setup()
    data = _data()
    ref = build_reference(model, data, top_k=8, progress=False)
    assert ref.topk_logprobs.shape == (7, 9, 8) and ref.topk_logprobs.dtype == torch.float32
    assert ref.topk_ids.dtype == torch.int32 and ref.valid.dtype == torch.bool
    assert (ref.topk_logprobs[..., :-1] >= ref.topk_logprobs[..., 1:]).all()
    # tail = log(1 - sum of top-K probabilities)
    tail = torch.log1p(-ref.topk_logprobs.double().exp().sum(-1))
    assert torch.allclose(ref.tail_logmass.double(), tail, atol=1e-5)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=data.input_ids).logits[:, :-1].double(), -1)
    target = logp.gather(-1, data.input_ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(ref.target_logprob.double()[ref.valid], target[ref.valid], atol=1e-5)
    assert torch.allclose(log_partition(logp, ref.topk_ids)[1][ref.valid], tail[ref.valid], atol=1e-5)
    result = evaluate(model, adapter, None, data, proxies=("nll", "kl", "esap"), reference=ref)
    assert result.values["kl"] == 0.0  # the reference and the candidate share one normaliser, bit for bit
    assert result.values["esap"] == pytest.approx(1.0, abs=1e-6)
    assert result.values["nll"] == pytest.approx(-float(ref.target_logprob[ref.valid].double().mean()), abs=1e-5)


def test_per_domain_values_weighted_by_tokens_average_to_overall():
    model, adapter, masks = _setup()
    data = _data()
    ref = build_reference(model, data, top_k=8, progress=False)
    result = evaluate(model, adapter, masks, data, proxies=("nll", "kl", "esap"), reference=ref)
    for proxy in ("nll", "kl", "esap"):
        mean = sum(result.per_domain[d][proxy] * n for d, n in result.domain_tokens.items()) / result.tokens
        assert mean == pytest.approx(result.values[proxy], rel=1e-9)
    weights = parse_proxy_weights("code:2, drama:1")
    assert weights == {"code": 2.0, "drama": 1.0}
    expected = (2 * result.per_domain["code"]["esap"] + result.per_domain["drama"]["esap"]) / 3
    assert weighted_value(result, "esap", weights) == pytest.approx(expected)
    assert weighted_value(result, "esap", None) == result.values["esap"]
    assert loss_value(result, "esap", weights) == pytest.approx(1 - expected)
    assert loss_value(result, "kl", None) == result.values["kl"]
    with pytest.raises(UsageError, match="not evaluated"):
        weighted_value(result, "nll_typo")
    with pytest.raises(UsageError, match="poetry"):
        weighted_value(result, "kl", {"poetry": 1.0})


@pytest.mark.parametrize("text", ["", "code", "code:", ":2", "code:x", "code:-1", "code:nan", "code:1,code:2",
                                  "code:0,drama:0"])
def test_bad_proxy_weights_are_usage_errors(text):
    with pytest.raises(UsageError):
        parse_proxy_weights(text)


def test_token_order_is_seeded_stratified_and_prefixes_nest():
    model, adapter, masks = _setup()
    data = _data(n=7)
    order = token_order(data, seed=1)
    assert sorted(order.tolist()) == list(range(7))
    assert torch.equal(order, token_order(data, seed=1))
    assert any(not torch.equal(token_order(data, seed=s), order) for s in range(2, 6))
    # stratified: every prefix holds each domain in about its share of the rows
    for seed in range(20):
        counts = torch.nn.functional.one_hot(data.domain_ids[token_order(data, seed)], 3).cumsum(0).double()
        share = torch.bincount(data.domain_ids, minlength=3).double() / len(data)
        assert ((counts - torch.arange(1, 8)[:, None] * share).abs() < 1.5).all()
    previous = torch.tensor([], dtype=torch.long)
    for n in (1, 9, 10, 25, 40, 10_000):
        rows = select_sequences(data, order, n)
        assert torch.equal(rows[: len(previous)], previous)
        covered = int(data.attention_mask[rows][:, 1:].sum())
        assert covered >= min(n, 60) and (n >= 60 or covered - 9 < n)  # shortest covering prefix
        previous = rows
    ref = build_reference(model, data, top_k=8, progress=False)
    small = evaluate(model, adapter, masks, data, proxies=("nll", "kl", "esap"), reference=ref, order=order,
                     n_tokens=20)
    rows = select_sequences(data, order, 20).tolist()
    assert len(rows) == 3 and small.tokens >= 20
    overall, _ = _means(*naive(model, adapter, masks, data, top_k=8, rows=rows))
    for proxy in ("nll", "kl", "esap"):
        assert small.values[proxy] == pytest.approx(overall[proxy], abs=ATOL, rel=1e-5)
    with pytest.raises(UsageError):
        select_sequences(data, order, 0)


def test_reference_round_trips_and_the_cache_is_reused(tmp_path, monkeypatch):
    model, adapter, _ = _setup()
    data = _data()
    builds = []
    real_build = reference_mod.build_reference

    def counting_build(*args, **kwargs):
        builds.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(reference_mod, "build_reference", counting_build)
    monkeypatch.setenv("EVOREAP_CACHE", str(tmp_path / "root"))
    first = reference_cached(model, data, top_k=8, progress=False)
    directory = tmp_path / "root" / "reference" / first.key
    assert (directory / "manifest.json").is_file() and (directory / "reference.safetensors").is_file()
    stamp = os.stat(directory / "reference.safetensors").st_mtime_ns
    second = reference_cached(model, data, top_k=8, progress=False)
    assert builds == [1] and os.stat(directory / "reference.safetensors").st_mtime_ns == stamp
    for name in ("topk_logprobs", "topk_ids", "tail_logmass", "target_logprob", "valid"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert (second.model_fingerprint, second.data_fingerprint, second.top_k, second.vocab_size) == \
        (first.model_fingerprint, first.data_fingerprint, 8, 256)
    # another K is another entry; an explicit cache_dir overrides the environment
    reference_cached(model, data, top_k=4, progress=False)
    reference_cached(model, data, top_k=8, cache_dir=tmp_path / "other", progress=False)
    assert len(builds) == 3 and len(list((tmp_path / "root" / "reference").iterdir())) == 2
    # a corrupt entry is rebuilt, not trusted
    (directory / "reference.safetensors").write_bytes(b"garbage")
    reference_cached(model, data, top_k=8, progress=False)
    assert len(builds) == 4 and Reference.load(directory).top_k == 8


def test_a_reference_for_another_model_or_data_is_refused():
    model, adapter, masks = _setup()
    data = _data()
    ref = build_reference(model, data, top_k=8, progress=False)
    other_model = tiny_model("qwen3_moe", seed=1)
    with pytest.raises(EvoreapError, match="another model"):
        evaluate(other_model, adapter, masks, data, reference=ref)
    with pytest.raises(EvoreapError, match="other tokens"):
        evaluate(model, adapter, masks, _data(seed=1), reference=ref)
    with torch.no_grad():  # editing a router in place changes the fingerprint too
        adapter.layers(model)[0].router.weight[0, 0] += 1.0
    with pytest.raises(EvoreapError, match="another model"):
        evaluate(model, adapter, masks, data, reference=ref)


def test_registry_names_suggestions_and_plugins():
    assert {"nll", "kl", "esap"} <= set(PROXIES)
    assert get_proxy("esap").higher_is_better and not get_proxy("kl").higher_is_better
    assert not get_proxy("nll").needs_reference and get_proxy("kl").needs_reference
    with pytest.raises(UsageError, match="did you mean 'esap'"):
        get_proxy("esp")
    model, adapter, masks = _setup()
    data = _data()
    with pytest.raises(UsageError, match="needs its reference"):
        evaluate(model, adapter, masks, data, proxies=("kl",))
    nll_only = evaluate(model, adapter, masks, data, proxies="nll")
    assert set(nll_only.values) == {"nll"}

    @register_proxy("test_top1", higher_is_better=True, needs_reference=True, ideal=1.0)
    def top1(inputs):
        """Candidate's argmax equals the unpruned model's."""
        return (inputs.logprobs.argmax(-1) == inputs.ref["topk_ids"][..., 0]).float()

    try:
        ref = build_reference(model, data, top_k=2, progress=False)
        both = evaluate(model, adapter, masks, data, proxies=("test_top1", "nll"), reference=ref)
        assert 0 <= both.values["test_top1"] <= 1
        assert both.values["nll"] == pytest.approx(nll_only.values["nll"], rel=1e-6)
        assert evaluate(model, adapter, None, data, proxies=("test_top1",), reference=ref).values["test_top1"] == 1
        assert loss_value(both, "test_top1") == pytest.approx(1 - both.values["test_top1"])
    finally:
        PROXIES.pop("test_top1")
