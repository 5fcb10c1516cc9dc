"""Router repair, more capacity and safety: a low-rank update of the kept experts' down projections (fitted from the
identity, stored with the repair, merged into the expert weights on export), the per-domain guard, and resuming a
repair killed inside its lr/3 retry."""

from dataclasses import replace

import pytest
import torch

from evoreap.data import TokenData
from evoreap.errors import SettingError, UsageError
from evoreap.proxies import evaluate
from evoreap.recovery import Repair, RepairSettings, applied, export_edits, fit_repair
from evoreap.recovery.repair import _targets, search_kl_per_domain
from evoreap.recovery.store import LOWRANK_A, LOWRANK_B, SCALE
from evoreap.reference import build_reference
from evoreap.testing_quant import save_quantized
from test_repair import _kl, _masks, _setup

LOWRANK = RepairSettings(params="router+norm+scale+lowrank", objective="kl", lr=1e-2, epochs=2, batch_size=4,
                         evals_per_epoch=2, patience=3, rank=2)


def test_lowrank_starts_at_the_identity_and_fits_only_kept_experts():
    model, adapter, kept, fit, stop, fit_ref, stop_ref = _setup("qwen3_moe", 6)
    targets, start = _targets(model, adapter, kept, LOWRANK)
    masks = _masks(adapter, kept)
    plain = _kl(model, adapter, kept, stop, stop_ref)
    # B = 0 at the start: the merged model is exactly the unrepaired one
    assert search_kl_per_domain(model, adapter, masks, targets, start, stop, stop_ref, 4)[0] == pytest.approx(plain,
                                                                                                              abs=1e-7)
    rep = fit_repair(model, adapter, kept, fit, stop, stop_reference=stop_ref, fit_reference=fit_ref,
                     settings=LOWRANK, progress=False)
    assert rep.accepted
    e = adapter.num_experts
    for layer in adapter.layers(model):
        experts = f"model.layers.{layer.index}.mlp.experts"
        b, a = rep.tensors[f"{experts}.{LOWRANK_B}"], rep.tensors[f"{experts}.{LOWRANK_A}"]
        w = layer.experts.down_proj
        assert b.shape == (e, w.shape[1], 2) and a.shape == (e, 2, w.shape[2]) and b.dtype == torch.float32
        cut = [i for i in range(e) if i not in kept[layer.index]]
        assert not b[cut].any()  # never routed: no gradient, still zero
        assert all(b[j].abs().sum() > 0 for j in kept[layer.index])
        # what evaluate computes with: the naive merge (W + B A) * s, rounded to the storage dtype (float32 here)
        s = rep.tensors[f"{experts}.{SCALE}"]
        want = torch.stack([(w[j] + b[j] @ a[j]) * s[j] for j in range(e)])
        got = rep.overrides(model)[f"{experts}.down_proj"]
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    after = _kl(model, adapter, kept, stop, stop_ref, rep)
    assert after == pytest.approx(rep.meta["search"]["kl_after"], rel=1e-6) and after < 0.98 * plain
    with pytest.raises(SettingError, match="rank"):
        RepairSettings(rank=0).check()


def test_lowrank_repair_is_refused_for_a_quantized_source(tmp_path):
    model, adapter, kept, fit, stop, fit_ref, stop_ref = _setup("qwen3_moe", 6)
    rep = Repair({"model.layers.0.mlp.experts." + LOWRANK_A: torch.zeros(16, 2, 32),
                  "model.layers.0.mlp.experts." + LOWRANK_B: torch.zeros(16, 64, 2)},
                 {"storage_dtype": "float32"})
    save_quantized(model, tmp_path / "fp8", "fp8")
    with pytest.raises(UsageError, match="stores quantized"):
        export_edits(rep, tmp_path / "fp8", adapter, kept)


def _two_domains(vocab, rows, seed, seq=32):
    """Domain a: random tokens over the whole vocabulary; domain b: a narrow band of it (another distribution)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    b = torch.arange(rows) % 2 == 1
    ids[b] = torch.randint(0, vocab // 8, (int(b.sum()), seq), generator=g)
    return TokenData(ids, torch.ones_like(ids), b.long(), ("a", "b"))


def _per_domain_kl(model, adapter, kept, data, ref, repair=None):
    with applied(model, repair, kept):
        r = evaluate(model, adapter, _masks(adapter, kept), data, proxies=("kl",), reference=ref,
                     other_model=repair is not None)
    return {d: v["kl"] for d, v in r.per_domain.items()}


def test_the_guard_reports_and_refuses_a_repair_that_hurts_a_domain():
    model, adapter, kept, fit, _, fit_ref, _ = _setup("qwen3_moe", 6)
    stop = _two_domains(model.config.vocab_size, 8, 2)
    stop_ref = build_reference(model, stop, top_k=16, progress=False)
    # a large step trades domain a for b: better overall, a worse
    settings = RepairSettings(params="router+norm+scale", lr=0.1, epochs=3, batch_size=4, patience=9)
    free = fit_repair(model, adapter, kept, fit, stop, stop_reference=stop_ref, fit_reference=fit_ref,
                      settings=settings, progress=False)
    s = free.meta["search"]
    before = _per_domain_kl(model, adapter, kept, stop, stop_ref)
    after = _per_domain_kl(model, adapter, kept, stop, stop_ref, free)
    assert free.accepted and s["kl_after"] < s["kl_before"]  # reported, not refused
    assert s["hurt_domains"] == ["a"] and after["a"] > 1.02 * before["a"] and after["b"] < before["b"]
    for d in before:  # the recorded numbers are the masked (repaired) model's own
        assert s["per_domain"][d]["before"] == pytest.approx(before[d], rel=1e-6)
        assert s["per_domain"][d]["after"] == pytest.approx(after[d], rel=1e-6)
    guarded = fit_repair(model, adapter, kept, fit, stop, stop_reference=stop_ref, fit_reference=fit_ref,
                         settings=replace(settings, guard=True), progress=False)
    g = guarded.meta["search"]
    assert guarded.accepted and not g["hurt_domains"] and g["kl_after"] < g["kl_before"]
    after = _per_domain_kl(model, adapter, kept, stop, stop_ref, guarded)
    assert all(after[d] <= 1.02 * before[d] for d in before)  # the best evaluation that hurts no domain
    # the guard bound: it passed over the better-overall evaluations that hurt a
    assert g["stop_best"] > s["stop_best"]
    assert any(h["domains"]["a"] > 1.02 * before["a"] and h["value"] < g["stop_best"]
               for h in guarded.meta["history"])


def test_a_repair_killed_inside_its_retry_resumes_to_the_uninterrupted_result(tmp_path):
    model, adapter, kept, fit, stop, fit_ref, stop_ref = _setup("qwen3_moe", 6)
    # a huge learning rate never improves on the start: the fit is retried at lr/3 (and lr/9)
    settings = RepairSettings(params="router+scale", lr=50.0, epochs=1, batch_size=4, evals_per_epoch=2,
                              patience=9)
    whole = fit_repair(model, adapter, kept, fit, stop, stop_reference=stop_ref, fit_reference=fit_ref,
                       settings=settings, progress=False)
    tries = whole.meta["attempts"]
    assert len(tries) >= 2 and not tries[0]["accepted"] and tries[1]["steps"] >= 3
    calls = []

    def kill(step):
        calls.append(step)
        if len(calls) == tries[0]["steps"] + 3:  # the third step of the first retry
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit_repair(model, adapter, kept, fit, stop, stop_reference=stop_ref, fit_reference=fit_ref,
                   settings=settings, checkpoint=ckpt, progress=False, on_step=kill)
    retry = tmp_path / "ckpt.retry1"
    assert not ckpt.exists() and (retry / "state.json").is_file()  # attempt 0 finished, the retry checkpointed
    steps = []
    resumed = fit_repair(model, adapter, kept, fit, stop, stop_reference=stop_ref, fit_reference=fit_ref,
                         settings=settings, checkpoint=ckpt, progress=False, on_step=steps.append)
    assert steps[0] == 3  # the retry continued from its checkpoint at step 2; attempt 0 did not run again
    assert resumed.tensors.keys() == whole.tensors.keys()
    assert all(torch.equal(whole.tensors[k], resumed.tensors[k]) for k in whole.tensors)
    assert resumed.meta["attempts"] == tries and resumed.meta["history"] == whole.meta["history"]
    assert not retry.exists() and not ckpt.exists()
