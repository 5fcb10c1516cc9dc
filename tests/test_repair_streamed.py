"""The streamed layer-local repair (``evoreap repair --objective local --offload``): fitted layer by layer from the
shards, it gives the resident local repair's parameters, history and verdict; a repair killed after a layer resumes
at the next one with the uninterrupted result; the CLI and API select it with --offload or --max-memory."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from evoreap.adapters import MoEAdapter
from evoreap.allocation import Allocation, select_experts
from evoreap.data import TokenData
from evoreap.fingerprint import note_loaded
from evoreap.models import load_config
from evoreap.observe.sequential import SequentialModel
from evoreap.recovery import Repair, RepairSettings, fit_repair
from evoreap.recovery.streamed_repair import fit_repair_streamed
from evoreap.reference import reference_cached
from evoreap.testing import tiny_model


def _data(vocab, rows, seed, seq=32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, seq // 2:] = 0  # a padded row: only real tokens are fitted on
    return TokenData(ids, mask, torch.arange(rows) % 2, ("a", "b"))


def _saved(arch, tmp_path, dtype=torch.float32, keep=6):
    """A tiny model saved in ``dtype`` and loaded back in float32 (as load_model marks it), pruned to ``keep``
    experts per MoE layer, with fitting and stopping data and the stopping reference."""
    model = tiny_model(arch)
    with torch.no_grad():  # peaked next-token distributions, so that pruning changes them measurably
        model.get_output_embeddings().weight.mul_(5)
    path = tmp_path / arch
    model.to(dtype).save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    note_loaded(model, path)
    adapter = MoEAdapter.for_model(model)
    g = torch.Generator().manual_seed(3)
    kept = {layer.index: select_experts(adapter, torch.rand(adapter.num_experts, generator=g), keep).tolist()
            for layer in adapter.layers(model)}
    vocab = model.config.vocab_size
    fit, stop = _data(vocab, 16, 1), _data(vocab, 8, 2)
    ref = reference_cached(model, stop, top_k=16, cache_dir=tmp_path / "cache", batch_size=4, progress=False)
    return model, adapter, kept, fit, stop, ref, str(path)


def _same(resident: Repair, streamed: Repair) -> None:
    assert resident.tensors.keys() == streamed.tensors.keys()
    for name, t in resident.tensors.items():
        assert streamed.tensors[name].dtype == t.dtype
        torch.testing.assert_close(streamed.tensors[name], t, rtol=0, atol=1e-5, msg=name)
    for key in ("accepted", "steps", "steps_total", "model_fingerprint", "allocation_fingerprint", "kept",
                "storage_dtype"):
        assert streamed.meta[key] == resident.meta[key], key
    assert [h["step"] for h in streamed.meta["history"]] == [h["step"] for h in resident.meta["history"]]
    for a, b in zip(streamed.meta["history"], resident.meta["history"]):
        assert a["value"] == pytest.approx(b["value"], rel=1e-5)
    for key in ("kl_before", "kl_after", "stop_before", "stop_best"):
        assert streamed.meta["search"][key] == pytest.approx(resident.meta["search"][key], rel=1e-5), key


@pytest.mark.parametrize("arch, params, dtype", [
    ("deepseek_v3", "router+norm+scale+lowrank", torch.float32),  # a dense first layer, a correction bias, groups
    ("gpt_oss", "router+scale", torch.bfloat16),  # router and down_proj biases; stored in bf16: rounded as an
])                                                # export writes it
def test_streamed_local_repair_equals_the_resident_one(arch, params, dtype, tmp_path):
    # deepseek_v3: group-limited routing keeps the same count in each of its 4 groups
    model, adapter, kept, fit, stop, ref, path = _saved(arch, tmp_path, dtype, keep=8 if arch == "deepseek_v3" else 6)
    # patience 1 with a large step: the summed error stops improving before the last step, so the shared
    # early-stopping rule (decided after the last layer here) really picks an earlier evaluation
    settings = RepairSettings(params=params, objective="local", lr=5e-2, epochs=3, batch_size=4, evals_per_epoch=2,
                              patience=1)
    storage = "bfloat16" if dtype == torch.bfloat16 else "float32"
    resident = fit_repair(model, adapter, kept, fit, stop, stop_reference=ref, settings=settings,
                          storage_dtype=storage, progress=False)
    seq = SequentialModel(path, load_config(path))
    read = []
    materialise = seq.loader.materialise
    seq.loader.materialise = lambda module, prefix, *rest: (read.append(prefix), materialise(module, prefix, *rest))
    streamed = fit_repair_streamed(seq, kept, fit, stop, stop_reference=ref, settings=settings,
                                   storage_dtype=storage, progress=False, cache_dir=tmp_path / "cache",
                                   max_state_bytes=20000)  # most hidden states spill to disk
    _same(resident, streamed)
    assert streamed.meta["engine"] == "streamed"
    layers = [p for p in read if ".layers." in p]
    n = len(model.get_decoder().layers)
    assert layers[:n] == [f"model.layers.{i}." for i in range(n)]  # the fitting pass reads each layer once
    assert all(p.is_meta for p in seq.model.parameters())  # nothing stays resident


def test_streamed_repair_killed_after_a_layer_resumes_at_the_next(tmp_path):
    model, adapter, kept, fit, stop, ref, path = _saved("qwen3_moe", tmp_path)
    settings = RepairSettings(params="router+scale", objective="local", lr=1e-2, epochs=2, batch_size=4,
                              evals_per_epoch=2, patience=9)
    whole = fit_repair(model, adapter, kept, fit, stop, stop_reference=ref, settings=settings, progress=False)
    ckpt = tmp_path / "ckpt"
    seq = SequentialModel(path, load_config(path))
    materialise = seq.loader.materialise

    def killing(module, prefix, *rest):
        if prefix == "model.layers.3.":  # layers 0 (MoE), 1 (dense) and 2 (MoE) are done
            raise KeyboardInterrupt
        materialise(module, prefix, *rest)

    seq.loader.materialise = killing
    with pytest.raises(KeyboardInterrupt):
        fit_repair_streamed(seq, kept, fit, stop, stop_reference=ref, settings=settings, checkpoint=ckpt,
                            progress=False)
    manifest = json.loads((ckpt / "attempt-0" / "manifest.json").read_text())
    assert manifest["layer_done"] == 2 and sorted(manifest["layers"]) == ["0", "2"]
    read = []
    seq = SequentialModel(path, load_config(path))
    materialise = seq.loader.materialise
    seq.loader.materialise = lambda module, prefix, *rest: (read.append(prefix), materialise(module, prefix, *rest))
    resumed = fit_repair_streamed(seq, kept, fit, stop, stop_reference=ref, settings=settings, checkpoint=ckpt,
                                  progress=False)
    assert [p for p in read if ".layers." in p][0] == "model.layers.3."  # resumed at the next layer
    _same(whole, resumed)
    uninterrupted = fit_repair_streamed(SequentialModel(path, load_config(path)), kept, fit, stop,
                                        stop_reference=ref, settings=settings, progress=False)
    assert all(torch.equal(resumed.tensors[k], uninterrupted.tensors[k]) for k in whole.tensors)
    assert resumed.meta["history"] == uninterrupted.meta["history"]
    assert not ckpt.exists()
    # a checkpoint of other settings is not resumed: the layer pass starts over
    seq.loader.materialise = killing
    with pytest.raises(KeyboardInterrupt):
        fit_repair_streamed(seq, kept, fit, stop, stop_reference=ref, settings=settings, checkpoint=ckpt,
                            progress=False)
    read.clear()
    seq.loader.materialise = lambda module, prefix, *rest: (read.append(prefix), materialise(module, prefix, *rest))
    other = RepairSettings(**{**settings.__dict__, "seed": 1})
    fit_repair_streamed(seq, kept, fit, stop, stop_reference=ref, settings=other, checkpoint=ckpt, progress=False)
    assert [p for p in read if ".layers." in p][0] == "model.layers.0."


def test_cli_offload_and_max_memory_select_the_streamed_repair(tmp_path, capsys, monkeypatch):
    """On the demo checkpoint: --offload gives the resident API's repair, which evaluate --offload applies as the
    resident evaluate does; --max-memory below the weights selects the streamed repair, above them the resident one;
    the kl objective is refused in one line when streamed."""
    import evoreap
    import evoreap.api
    from evoreap.cli import main
    from evoreap.errors import UsageError
    from evoreap.models import DEMO_MODEL_DIR

    adapter = MoEAdapter(AutoConfig.from_pretrained(DEMO_MODEL_DIR))
    alloc = Allocation.uniform(adapter, 12).with_experts({i: list(range(0, 24, 2)) for i in adapter.moe_layer_indices})
    path = tmp_path / "alloc.json"
    alloc.save(path, adapter)
    small = ["--fit-tokens", "1024", "--stop-tokens", "512", "--epochs", "1", "--seq-len", "128",
             "--params", "router+scale", "--objective", "local"]
    resident = evoreap.repair(allocation=path, out=tmp_path / "resident.safetensors", params="router+scale",
                              objective="local", fit_tokens=1024, stop_tokens=512, epochs=1, seq_len=128,
                              progress=False)
    assert resident.repair.meta.get("engine") is None
    assert main(["repair", "--allocation", str(path), "--offload", *small, "-q"]) == 0
    streamed = Repair.load(tmp_path / "alloc.repair.safetensors")
    assert streamed.meta["engine"] == "streamed"
    _same(resident.repair, streamed)
    # evaluate --offload applies the repair beside the allocation, layer by layer, as the resident evaluate does
    whole = evoreap.evaluate(allocation=path, tokens=512, seq_len=128).results
    layered = evoreap.evaluate(allocation=path, tokens=512, seq_len=128, offload=True).results
    for key in ("unpruned", "pruned (masked, repaired)"):
        for metric in ("nll", "kl"):
            assert layered[key]["overall"][metric] == pytest.approx(whole[key]["overall"][metric], rel=1e-5, abs=1e-6)

    def engine(name):
        def refuse(*args, **kwargs):
            raise UsageError(f"engine: {name}")
        return refuse

    monkeypatch.setattr(evoreap.api, "fit_repair_streamed", engine("streamed"))
    monkeypatch.setattr(evoreap.api, "fit_repair", engine("resident"))
    for memory, chosen in (("0.001", "streamed"), ("100", "resident")):  # the demo's weights take ~12 MB
        capsys.readouterr()
        assert main(["repair", "--allocation", str(path), "--max-memory", memory, *small, "-q"]) == 2
        assert f"engine: {chosen}" in capsys.readouterr().err
    assert main(["repair", "--allocation", str(path), "--offload", "--objective", "kl", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--objective local" in err and len(err.splitlines()) == 1
