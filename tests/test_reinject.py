"""Re-injection of pruned experts for one domain: ranked by that domain's saliency (per-domain REAP sums that
observe records), confirmed by masked evaluation, written as a new allocation."""

import json

import pytest
import torch

from evoreap.adapters import MoEAdapter
from evoreap.allocation import Allocation
from evoreap.data import TokenData
from evoreap.errors import UsageError
from evoreap.observe.recorder import observe
from evoreap.proxies import evaluate
from evoreap.recovery.reinject import ranked_candidates, reinject, saliency
from evoreap.testing import tiny_model


def _setup():
    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(5)
    adapter = MoEAdapter.for_model(model)
    g = torch.Generator().manual_seed(0)
    # two "domains" that use different token ranges, so that their experts differ
    a = torch.randint(0, 128, (8, 32), generator=g)
    b = torch.randint(128, 256, (8, 32), generator=g)
    ids = torch.cat([a, b])
    data = TokenData(ids, torch.ones_like(ids), torch.tensor([0] * 8 + [1] * 8), ("a", "b"))
    stats = observe(model, adapter, data, batch_size=8, progress=False)
    kept = {layer.index: list(range(0, 16, 3))[:5] for layer in adapter.layers(model)}
    return model, adapter, data, stats, kept


def _loss(model, adapter, kept, data):
    masks = {i: torch.zeros(adapter.num_experts, dtype=torch.bool).index_fill_(0, torch.tensor(k), True)
             for i, k in kept.items()}
    return evaluate(model, adapter, masks, data, proxies=("nll",)).values["nll"]


def test_domain_saliency_is_the_domains_share_of_reap_and_sums_to_the_total():
    _, _, _, stats, _ = _setup()
    a, b, total = saliency(stats, "a"), saliency(stats, "b"), saliency(stats)
    for i in stats.layers:
        assert torch.allclose(a[i] + b[i], total[i], rtol=1e-12)
    assert any(not torch.equal(a[i].argsort(), b[i].argsort()) for i in stats.layers)
    with pytest.raises(UsageError, match="no domain 'tools'"):
        saliency(stats, "tools")


def test_reinject_confirms_candidates_by_masked_loss_and_adds_the_best():
    model, adapter, data, stats, kept = _setup()
    dom = data.subset(torch.arange(8))  # domain a's rows
    scores = saliency(stats, "a")
    result = reinject(model, adapter, kept, scores, 2, dom, pool=6, progress=False)
    ranked = ranked_candidates(kept, scores, adapter.num_experts)
    assert [(t["layer"], t["expert"]) for t in result.tried] == [(c[0], c[1]) for c in ranked[:6]]
    before = _loss(model, adapter, kept, dom)
    assert result.before == pytest.approx(before, rel=1e-9)
    for t in result.tried[:2]:  # each delta is the candidate's own masked loss change, computed independently
        alone = {**kept, t["layer"]: sorted([*kept[t["layer"]], t["expert"]])}
        assert t["delta"] == pytest.approx(_loss(model, adapter, alone, dom) - before, rel=1e-6, abs=1e-9)
    best = sorted((t for t in result.tried if t["delta"] < 0), key=lambda t: t["delta"])[:2]
    assert sorted((t["layer"], t["expert"]) for t in best) == sorted(
        (layer, e) for layer, es in result.added.items() for e in es)
    added = sum(len(v) for v in result.added.values())
    assert added == len(best) and sum(map(len, result.kept.values())) == sum(map(len, kept.values())) + added
    assert result.after == pytest.approx(_loss(model, adapter, result.kept, dom), rel=1e-9)
    if added:
        assert result.after < result.before
    unconfirmed = reinject(model, adapter, kept, scores, 3, dom, confirm=False, progress=False)
    assert sorted((layer, e) for layer, es in unconfirmed.added.items() for e in es) == sorted(
        (c[0], c[1]) for c in ranked[:3])


def test_cli_reinject_writes_a_loadable_allocation(small_model_dir, tmp_path):
    from transformers import AutoConfig

    from evoreap.cli import main

    adapter = MoEAdapter(AutoConfig.from_pretrained(small_model_dir))
    path = tmp_path / "alloc.json"
    Allocation.uniform(adapter, 4).with_experts({i: [0, 1, 2, 3] for i in adapter.moe_layer_indices}).save(
        path, adapter)
    out = tmp_path / "more.json"
    code = main(["reinject", "--model", str(small_model_dir), "--allocation", str(path), "--domain", "tools",
                 "--experts", "2", "--no-confirm", "--tokens", "512", "--out", str(out), "--json", "-q"])
    assert code == 0
    new = Allocation.load(out).validate(adapter)
    assert sum(new.counts) == 4 * len(adapter.moe_layer_indices) + 2
    meta = json.loads(out.read_text())["meta"]["reinjected"]
    assert meta["domain"] == "tools" and sum(len(v) for v in meta["added"].values()) == 2
    assert main(["reinject", "--model", str(small_model_dir), "--allocation", str(path), "--domain", "poetry",
                 "--experts", "1", "-q"]) == 2
