"""Router repair (evoreap.recovery): it lowers the search-split KL of a pruned model, is deterministic and resumable,
never makes the search split worse, and an export of the repaired model reloads in stock transformers with the
repaired masked model's logits."""

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from evoreap.adapters import MoEAdapter
from evoreap.allocation import Allocation, select_experts
from evoreap.data import TokenData
from evoreap.errors import EvoreapError, SettingError, UsageError
from evoreap.export import export_pruned
from evoreap.masking import masked
from evoreap.proxies import evaluate
from evoreap.recovery import Repair, RepairSettings, applied, export_edits, fit_repair, storage_dtype
from evoreap.recovery.store import allocation_fingerprint
from evoreap.reference import build_reference
from evoreap.testing import tiny_model


def _data(vocab, rows, seed, seq=32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    return TokenData(ids, torch.ones_like(ids), torch.arange(rows) % 2, ("a", "b"))


def _kept(model, adapter, keep):
    g = torch.Generator().manual_seed(3)
    return {layer.index: select_experts(adapter, torch.rand(adapter.num_experts, generator=g), keep).tolist()
            for layer in adapter.layers(model)}


def _setup(arch, keep, save_dir=None, **overrides):
    model = tiny_model(arch, **overrides)
    with torch.no_grad():  # peaked next-token distributions, so that pruning changes them measurably
        model.get_output_embeddings().weight.mul_(5)
    if save_dir is not None:  # stored in bf16: the repair must round to it so that the export reproduces it
        model.to(torch.bfloat16).save_pretrained(save_dir)
        model = AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32).eval()
    adapter = MoEAdapter.for_model(model)
    vocab = model.config.vocab_size
    fit, stop = _data(vocab, 16, 1), _data(vocab, 8, 2)
    return model, adapter, _kept(model, adapter, keep), fit, stop, build_reference(model, fit, top_k=16,
                                                                                     progress=False), \
        build_reference(model, stop, top_k=16, progress=False)


def _masks(adapter, kept):
    return {i: torch.zeros(adapter.num_experts, dtype=torch.bool).index_fill_(0, torch.tensor(k), True)
            for i, k in kept.items() if len(k) < adapter.num_experts}


def _kl(model, adapter, kept, data, ref, repair=None):
    with applied(model, repair, kept):
        return evaluate(model, adapter, _masks(adapter, kept), data, proxies=("kl",), reference=ref,
                        other_model=repair is not None).values["kl"]


SETTINGS = RepairSettings(params="router+norm+scale", objective="kl", lr=1e-2, epochs=3, batch_size=4,
                          evals_per_epoch=2, patience=3)


def test_kl_repair_lowers_search_kl_deterministically_and_leaves_the_model_alone():
    model, adapter, kept, fit, stop, fit_ref, stop_ref = _setup("qwen3_moe", 6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rep = fit_repair(model, adapter, kept, fit, stop, stop_reference=stop_ref, fit_reference=fit_ref,
                     settings=SETTINGS, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # fitting swaps, never writes
    assert all(p.requires_grad for p in model.parameters())
    assert rep.accepted
    base = _kl(model, adapter, kept, stop, stop_ref)
    after = _kl(model, adapter, kept, stop, stop_ref, rep)
    assert rep.meta["search"]["kl_before"] == pytest.approx(base, rel=1e-6)
    assert after == pytest.approx(rep.meta["search"]["kl_after"], rel=1e-6)
    assert after < 0.97 * base
    # only kept router rows move; the scales of cut experts stay 1
    for layer in adapter.layers(model):
        name = f"model.layers.{layer.index}.mlp.gate.weight"
        cut = [i for i in range(adapter.num_experts) if i not in kept[layer.index]]
        assert torch.equal(rep.tensors[name][cut], before[name][cut])
        assert not torch.equal(rep.tensors[name][kept[layer.index]], before[name][kept[layer.index]])
        assert torch.equal(rep.tensors[f"model.layers.{layer.index}.mlp.experts.output_scale"][cut],
                           torch.ones(len(cut)))
    again = fit_repair(model, adapter, kept, fit, stop, stop_reference=stop_ref, fit_reference=fit_ref,
                       settings=SETTINGS, progress=False)
    assert rep.tensors.keys() == again.tensors.keys()
    assert all(torch.equal(rep.tensors[k], again.tensors[k]) for k in rep.tensors)


def test_killed_repair_resumes_to_the_same_result(tmp_path):
    model, adapter, kept, fit, stop, fit_ref, stop_ref = _setup("qwen3_moe", 6)
    settings = RepairSettings(params="router+scale", objective="kl", lr=1e-2, epochs=2, batch_size=4,
                              evals_per_epoch=2, patience=9)
    whole = fit_repair(model, adapter, kept, fit, stop, stop_reference=stop_ref, fit_reference=fit_ref,
                       settings=settings, progress=False)

    def kill(step):
        if step == 5:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit_repair(model, adapter, kept, fit, stop, stop_reference=stop_ref, fit_reference=fit_ref,
                   settings=settings, checkpoint=ckpt, progress=False, on_step=kill)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 4  # the last evaluation before the kill
    steps = []
    resumed = fit_repair(model, adapter, kept, fit, stop, stop_reference=stop_ref, fit_reference=fit_ref,
                         settings=settings, checkpoint=ckpt, progress=False, on_step=steps.append)
    assert steps[0] == 5  # continued, not restarted
    assert all(torch.equal(whole.tensors[k], resumed.tensors[k]) for k in whole.tensors)
    assert whole.meta["history"] == resumed.meta["history"]
    assert not ckpt.exists()


def test_local_objective_lowers_the_block_error_and_never_worsens_search_kl():
    model, adapter, kept, fit, stop, _, stop_ref = _setup("qwen3_moe", 6)
    rep = fit_repair(model, adapter, kept, fit, stop, stop_reference=stop_ref,
                     settings=RepairSettings(params="router+scale", objective="local", lr=1e-2, epochs=4,
                                             batch_size=4, patience=4), progress=False)
    s = rep.meta["search"]
    assert s["stop_metric"] == "local" and s["stop_best"] < 0.95 * s["stop_before"]
    assert _kl(model, adapter, kept, stop, stop_ref, rep) <= s["kl_before"] + 1e-9


def test_a_repair_that_does_not_help_is_rejected():
    model, adapter, kept, fit, stop, fit_ref, stop_ref = _setup("qwen3_moe", 6)
    # a huge learning rate wrecks the routers: the search split sees it and the file keeps the unrepaired values
    rep = fit_repair(model, adapter, kept, fit, stop, stop_reference=stop_ref, fit_reference=fit_ref,
                     settings=RepairSettings(params="router", lr=50.0, epochs=1, batch_size=4, evals_per_epoch=1,
                                             patience=1), progress=False)
    named = dict(model.named_parameters())
    tries = rep.meta["attempts"]  # a rejected fit is retried at a third of the learning rate, twice at most
    assert [t["lr"] for t in tries] == pytest.approx([50.0, 50 / 3, 50 / 9][:len(tries)])
    assert all(not t["accepted"] for t in tries[:-1]) and (tries[-1]["accepted"] or len(tries) == 3)
    assert tries[-1]["accepted"] == rep.accepted
    if not rep.accepted:
        assert all(torch.equal(v, named[k]) for k, v in rep.tensors.items())
    assert _kl(model, adapter, kept, stop, stop_ref, rep) <= rep.meta["search"]["kl_before"] + 1e-9


@pytest.mark.parametrize("params", ["router+norm+scale", "router+norm+scale+lowrank"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_uniform_export_with_repair_loads_in_stock_transformers_with_the_repaired_logits(arch, params, tmp_path):
    """Per-expert checkpoint tensors (qwen3_moe) and fused, transposed ones (gpt_oss); the low-rank update is
    merged into the exported down projections, so the export has no extra tensor."""
    src = tmp_path / "src"
    model, adapter, kept, fit, stop, fit_ref, stop_ref = _setup(arch, 4 if arch == "gpt_oss" else 6, save_dir=src)
    dtype = storage_dtype(src, adapter, torch.float32)
    assert dtype == "bfloat16"
    rep = fit_repair(model, adapter, kept, fit, stop, stop_reference=stop_ref, fit_reference=fit_ref,
                     settings=RepairSettings(**{**SETTINGS.__dict__, "params": params, "rank": 2}),
                     storage_dtype=dtype, progress=False)
    assert rep.accepted
    assert any(k.endswith("down_proj_lowrank_b") for k in rep.tensors) == ("lowrank" in params)
    if arch == "gpt_oss":
        assert any(k.endswith("router.bias") for k in rep.tensors)
    path = rep.save(tmp_path / "alloc.repair.safetensors")
    rep = Repair.load(path)
    out = tmp_path / "out"
    export_pruned(src, out, kept, edits=export_edits(rep, src, adapter, kept), progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # stock, no remote code
    ids = fit.input_ids[:4]
    with torch.no_grad(), applied(model, rep, kept), masked(model, adapter, _masks(adapter, kept)):
        want = model(input_ids=ids).logits
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        with masked(plain, adapter, _masks(adapter, kept)):
            unrepaired = plain(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5
    assert (unrepaired - want).abs().max() > 1e-3  # the repair is really in the export
    assert set(loaded.state_dict()) == set(plain.state_dict())  # a plain checkpoint: nothing added
    for leaves in (("down_proj_lowrank_b", "down_proj_lowrank_a"), ("output_scale",)):
        # a damaged file whose factors (or scales) are for one expert too few: one clear error, not an IndexError
        names = [k for k in rep.tensors if k.endswith(leaves)]
        if names:
            experts = names[0].rpartition(".")[0]
            cut = {k: (v[:-1] if k.rpartition(".")[0] == experts and k.endswith(leaves) else v)
                   for k, v in rep.tensors.items()}
            with pytest.raises(EvoreapError, match="but the model has"):
                export_edits(Repair(cut, rep.meta), src, adapter, kept)


def test_repair_refuses_other_experts_or_weights():
    model, adapter, kept, fit, stop, fit_ref, stop_ref = _setup("qwen3_moe", 6)
    rep = fit_repair(model, adapter, kept, fit, stop, stop_reference=stop_ref, fit_reference=fit_ref,
                     settings=RepairSettings(params="router", epochs=1, batch_size=8), progress=False)
    other = {k: sorted(set(range(adapter.num_experts)) - set(v))[:6] for k, v in kept.items()}
    assert allocation_fingerprint(other) != rep.meta["allocation_fingerprint"]
    with pytest.raises(UsageError, match="other kept experts"):
        with applied(model, rep, other):
            pass
    changed = tiny_model("qwen3_moe", seed=5)
    with pytest.raises(UsageError, match="another model"):
        with applied(changed, rep, kept):
            pass


def test_api_and_cli_repair_then_evaluate_and_export_apply_it(tmp_path):
    """On the demo model (trained, so pruning really costs): repair, then evaluate and export find and apply it."""
    import evoreap
    from evoreap.cli import main
    from evoreap.models import DEMO_MODEL_DIR

    demo = DEMO_MODEL_DIR
    adapter = MoEAdapter(AutoConfig.from_pretrained(demo))
    alloc = Allocation.uniform(adapter, 12).with_experts({i: list(range(0, 24, 2)) for i in adapter.moe_layer_indices})
    path = tmp_path / "alloc.json"
    alloc.save(path, adapter)
    code = main(["repair", "--allocation", str(path), "--params", "router+norm+scale+lowrank", "--rank", "4",
                 "--fit-tokens", "2048", "--stop-tokens", "1024", "--epochs", "1", "--lr", "0.003", "--seq-len", "128",
                 "-q"])
    assert code == 0
    rep = Repair.load(tmp_path / "alloc.repair.safetensors")
    assert rep.tensors["model.layers.0.mlp.experts.down_proj_lowrank_a"].shape == (32, 4, 48)  # merged on export
    assert rep.accepted and rep.meta["search"]["kl_after"] < 0.95 * rep.meta["search"]["kl_before"]
    plain = evoreap.evaluate(allocation=path, tokens=1024, seq_len=128, repair=False)
    fixed = evoreap.evaluate(allocation=path, tokens=1024, seq_len=128)
    assert "pruned (masked, repaired)" in fixed.results and "pruned (masked)" in plain.results
    kl_plain = plain.results["pruned (masked)"]["overall"]["kl"]
    kl_fixed = fixed.results["pruned (masked, repaired)"]["overall"]["kl"]
    assert (kl_fixed < kl_plain) == rep.accepted and kl_fixed <= kl_plain + 1e-9
    out = tmp_path / "pruned"
    evoreap.export(path, out)
    record = json.loads((out / "evoreap.json").read_text())
    assert json.dumps(record).count('"objective": "kl"') == 1
    exported = evoreap.evaluate(pruned=out, tokens=1024, seq_len=128)
    assert exported.results["pruned (exported)"]["overall"]["kl"] == pytest.approx(kl_fixed, abs=1e-4)


def test_learning_rate_schedule_is_a_function_of_the_step():
    from evoreap.recovery.repair import lr_at

    s = RepairSettings(lr=0.01, schedule="cosine")
    lrs = [lr_at(s, i, 100) for i in range(100)]
    assert lrs[:5] == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.01])  # 5% warm-up
    assert lrs[5] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 94 / 95)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # then it only decays
    assert lrs[52] == pytest.approx(0.005, rel=0.05)  # half-way through the decay: half the peak
    assert {lr_at(RepairSettings(lr=0.01, schedule="constant"), i, 100) for i in range(100)} == {0.01}
    with pytest.raises(SettingError, match="schedule"):
        RepairSettings(schedule="linear").check()
