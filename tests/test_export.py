"""evoreap export: streamed pruned checkpoints that load back and compute exactly what the masked model computes.

Every architecture is saved with save_pretrained (the hub layout), exported with a uniform and a non-uniform
allocation, and loaded from disk (stock classes for uniform, the bundled remote code for non-uniform); the loaded
model's logits must equal the masked resident model's, and its experts must be the original experts' kept rows.
"""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from evoreap.adapters import MoEAdapter
from evoreap.checkpoint import CheckpointIndex
from evoreap.checkpoint import reader as reader_mod
from evoreap.cli import main
from evoreap.errors import EvoreapError, UsageError
from evoreap.export import export_pruned, plan_export, render_modeling
from evoreap.export import writer as writer_mod
from evoreap.masking import masked
from evoreap.testing import ARCHITECTURES, tiny_model

TOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> (resident model, adapter, directory written by save_pretrained); built once per module."""
    cache = {}

    def get(arch, **save_kwargs):
        key = (arch, tuple(sorted(save_kwargs.items())))
        if key not in cache:
            model = tiny_model(arch)
            path = tmp_path_factory.mktemp(f"src-{arch}")
            model.save_pretrained(path, **save_kwargs)
            cache[key] = (model, MoEAdapter.for_model(model), path)
        return cache[key]

    return get


def _choose(adapter, counts, seed=0):
    """Random kept experts per layer (ascending), the same number in every group for group-limited routing."""
    g = torch.Generator().manual_seed(seed)
    e, groups = adapter.num_experts, adapter.n_group
    size = e // groups
    kept = {}
    for layer, k in counts.items():
        per = k // groups
        kept[layer] = sorted(grp * size + i for grp in range(groups)
                             for i in torch.randperm(size, generator=g)[:per].tolist())
    return kept


def _allocations(adapter):
    """A uniform (half the experts) and a non-uniform allocation (counts differ per layer, respect top-k/groups)."""
    e, step, lo = adapter.num_experts, adapter.n_group, adapter.min_keep()
    layers = adapter.moe_layer_indices
    half = max(lo, e // 2 // step * step)
    menu = [lo, e, half, e - step]
    non = {layer: menu[j % len(menu)] for j, layer in enumerate(layers)}
    assert len(set(non.values())) > 1
    return {"uniform": _choose(adapter, {layer: half for layer in layers}),
            "nonuniform": _choose(adapter, non, seed=1)}


def _masks(adapter, kept):
    return {layer: torch.zeros(adapter.num_experts, dtype=torch.bool).index_fill_(0, torch.tensor(k), True)
            for layer, k in kept.items()}


def _ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))


def _check_against_masked(model, adapter, kept, out, remote):
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote, dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        with masked(model, adapter, _masks(adapter, kept)):
            ref = model(ids).logits
        got = loaded(ids).logits
    assert (ref - got).abs().max().item() <= TOL
    # the loaded experts and router rows are exactly the original's kept rows (naive reference: tensor indexing)
    originals = {layer.index: layer for layer in adapter.layers(model)}
    for layer in _layers_of(adapter, loaded):
        idx = torch.tensor(kept.get(layer.index, range(adapter.num_experts)))
        src = originals[layer.index]
        for name, p in layer.experts.named_parameters():
            assert torch.equal(p, getattr(src.experts, name)[idx]), name
        for name, p in list(layer.router.named_parameters()) + list(layer.router.named_buffers()):
            assert torch.equal(p, getattr(src.router, name)[idx]), name
    return loaded


def _layers_of(adapter, loaded):
    """MoE layers of a loaded model, sized by their modules (a non-uniform config's global count is not theirs)."""
    from evoreap.adapters import MoELayer

    out = []
    for i in adapter.moe_layer_indices:
        block = loaded.get_decoder().layers[i].mlp
        router, experts = getattr(block, adapter.spec.router_attr), getattr(block, adapter.spec.experts_attr)
        out.append(MoELayer(i, block, router, experts, router.weight.shape[0], router.top_k))
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_export_loads_and_matches_masked_model(arch, saved, tmp_path):
    model, adapter, src = saved(arch)
    n_before = sum(p.numel() for p in model.parameters())
    first = adapter.layers(model)[0].router
    router_row = sum(p.numel() for p in first.parameters()) // adapter.num_experts  # weight row (+ bias)
    for mode, kept in _allocations(adapter).items():
        out = tmp_path / mode
        result = export_pruned(src, out, kept, meta={"criterion": "frequency", "budget": 0.5}, progress=False)
        assert result.uniform == (mode == "uniform")
        remote = mode == "nonuniform"
        cfg = json.loads((out / "config.json").read_text())
        assert ("auto_map" in cfg) == remote and (out / "modeling_evoreap.py").exists() == remote
        loaded = _check_against_masked(model, adapter, kept, out, remote)
        if remote:
            assert type(loaded).__name__ == "EvoreapForCausalLM"
            assert {int(k): v for k, v in cfg["evoreap_experts_per_layer"].items()} == result.experts_per_layer
        else:
            assert type(loaded).__module__.startswith("transformers.models.")  # stock class, no remote code
            assert MoEAdapter(AutoConfig.from_pretrained(out)).num_experts == len(next(iter(kept.values())))
        cut = sum(adapter.num_experts - len(k) for k in kept.values())
        # budget accounting counts expert weights; the router loses one row (+ bias) per cut expert on top of that
        assert sum(p.numel() for p in loaded.parameters()) == n_before - cut * (adapter.expert_params() + router_row)
        assert result.elements_before - result.elements_after >= cut * adapter.expert_params()
        record = json.loads((out / "evoreap.json").read_text())
        assert record["kept_experts"] == {str(k): v for k, v in kept.items()}
        assert record["criterion"] == "frequency" and record["budget"] == 0.5


def test_multi_shard_source_and_output(saved, tmp_path):
    model, adapter, src = saved("gpt_oss", max_shard_size="60KB")  # fused experts on disk
    assert (src / "model.safetensors.index.json").exists()
    kept = _allocations(adapter)["nonuniform"]
    out = tmp_path / "out"
    result = export_pruned(src, out, kept, max_shard_bytes=100_000, progress=False)
    shards = [f for f in result.files if f.endswith(".safetensors")]
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == result.bytes_after
    assert set(index["weight_map"].values()) == set(shards)
    for f in shards:
        with safe_open(out / f, "pt") as h:
            assert h.metadata() == {"format": "pt"}
            assert all(index["weight_map"][k] == f for k in h.keys())
    _check_against_masked(model, adapter, kept, out, remote=True)


def test_fused_source_layout_is_written_back_fused(tmp_path):
    """A checkpoint holding the transformers-5 fused layout (not the hub's per-expert keys) exports and loads."""
    model = tiny_model("qwen3_moe")
    adapter = MoEAdapter.for_model(model)
    src = tmp_path / "src"
    model.save_pretrained(src)
    (src / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src / "model.safetensors",
              metadata={"format": "pt"})
    kept = _allocations(adapter)["uniform"]
    export_pruned(src, tmp_path / "out", kept, progress=False)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as h:
        assert h.get_slice("model.layers.0.mlp.experts.gate_up_proj").get_shape()[0] == len(kept[0])
    _check_against_masked(model, adapter, kept, tmp_path / "out", remote=False)


def test_plain_read_write_fallback_writes_identical_bytes(saved, tmp_path, monkeypatch):
    model, adapter, src = saved("mixtral")
    kept = _allocations(adapter)["nonuniform"]
    export_pruned(src, tmp_path / "a", kept, progress=False)
    monkeypatch.setattr(reader_mod, "_USE_COPY_FILE_RANGE", False)
    monkeypatch.setattr(reader_mod, "_CHUNK", 1000)  # many partial chunks
    export_pruned(src, tmp_path / "b", kept, progress=False)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_mixtral_renumbers_legacy_names(saved):
    model, adapter, src = saved("mixtral")
    adapter_, plan = plan_export(src, {0: [1, 5], 1: [0, 2, 4, 6]})
    names = {t.name: t.source.name for t in plan.tensors}
    moe = "model.layers.0.block_sparse_moe.experts"
    assert names[f"{moe}.1.w2.weight"] == f"{moe}.5.w2.weight" and names[f"{moe}.0.w1.weight"] == f"{moe}.1.w1.weight"
    assert f"{moe}.2.w1.weight" not in names and f"{moe}.0.w1.weight" in {t.name for t in plan.dropped}
    assert plan.counts == {0: 2, 1: 4, 2: 8, 3: 8} and not plan.uniform
    assert plan.bytes_before == CheckpointIndex(src).total_bytes > plan.bytes_after


def test_existing_out_is_refused_unless_overwrite(saved, tmp_path):
    model, adapter, src = saved("olmoe")
    kept = _allocations(adapter)["uniform"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="--overwrite"):
        export_pruned(src, out, kept, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="not an evoreap export"):  # --overwrite replaces only an earlier export
        export_pruned(src, out, kept, overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    export_pruned(src, out, kept, progress=False)
    (out / "stale.txt").write_text("left from before")
    export_pruned(src, out, kept, overwrite=True, progress=False)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup dirs left
    for bad_out in (src, src / "sub", src.parent):
        with pytest.raises(UsageError, match="model directory"):
            export_pruned(src, bad_out, kept, overwrite=True, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    export_pruned(src, empty, kept, progress=False)  # an empty directory is fine without --overwrite


@pytest.mark.parametrize("overwrite", [False, True])
def test_failure_midway_leaves_nothing(saved, tmp_path, monkeypatch, overwrite):
    model, adapter, src = saved("qwen3_moe", max_shard_size="150KB")
    kept = _allocations(adapter)["nonuniform"]
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "old.txt").write_text("previous export")
        (out / "evoreap.json").write_text('{"format": "evoreap-export"}')
    calls = []
    real = writer_mod.write_shard

    def failing(path, tensors, progress=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, tensors, progress)

    monkeypatch.setattr(writer_mod, "write_shard", failing)
    with pytest.raises(OSError, match="disk full"):
        export_pruned(src, out, kept, overwrite=overwrite, max_shard_bytes=100_000, progress=False)
    assert len(calls) == 2
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == (["out"] if overwrite else [])
    if overwrite:
        assert sorted(p.name for p in out.iterdir()) == ["evoreap.json", "old.txt"]


def test_invalid_kept_experts_are_refused_before_writing(saved, tmp_path):
    model, adapter, src = saved("deepseek_v3")  # 16 experts in 4 groups of 4, top-4
    bad = {
        "uneven groups": {1: [0, 1, 2, 3, 4, 5, 8, 9]},
        "not ascending": {1: [1, 0, 4, 5, 8, 9, 12, 13]},
        "out of range": {1: [0, 1, 4, 5, 8, 9, 12, 16]},
        "below top-k": {1: [0, 4]},
        "dense layer": {0: [0, 1, 4, 5, 8, 9, 12, 13]},
    }
    for what, kept in bad.items():
        with pytest.raises(UsageError):
            export_pruned(src, tmp_path / "out", kept, progress=False)
        assert not any(tmp_path.iterdir()), what


def test_custom_code_is_refused_and_never_copied(saved, tmp_path):
    model, adapter, src0 = saved("glm4_moe")
    src = tmp_path / "src"
    shutil.copytree(src0, src)
    (src / "modeling_custom.py").write_text("raise RuntimeError('untrusted code ran')\n")
    kept = _allocations(adapter)["nonuniform"]
    with pytest.raises(UsageError, match="trust-remote-code"):
        export_pruned(src, tmp_path / "out", kept, progress=False)
    assert main(["export", "--model", str(src), "--allocation", str(_alloc_file(tmp_path, adapter, kept)),
                 "--out", str(tmp_path / "cli")]) == 2
    export_pruned(src, tmp_path / "out", kept, progress=False, trust_remote_code=True)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.py")) == ["modeling_evoreap.py"]
    code = (tmp_path / "out" / "modeling_evoreap.py").read_text()
    assert code == render_modeling(adapter) and "untrusted" not in code and 'MODEL_TYPE = "glm4_moe"' in code



def test_own_export_code_is_trusted_only_with_its_own_auto_map(saved, tmp_path):
    """A non-uniform export loads without --trust-remote-code (evoreap builds its class in-process and never imports
    the directory's file, so transformers gets trust_remote_code=False); the same export with one more auto_map entry
    (which transformers would fetch from that hub repository and run) is refused."""
    from evoreap.checkpoint.trust import needs_trust

    model, adapter, src = saved("qwen3_moe")
    out = tmp_path / "out"
    export_pruned(src, out, _allocations(adapter)["nonuniform"], progress=False)
    assert needs_trust(out, False) is False
    with pytest.raises(UsageError, match="already a non-uniform evoreap export"):  # our code, but not a source
        export_pruned(out, tmp_path / "again", _allocations(adapter)["nonuniform"], progress=False)
    with pytest.raises(UsageError, match="is a file, not a directory"):  # the library refuses it too, not only the CLI
        export_pruned(src, out / "config.json" / "sub", _allocations(adapter)["nonuniform"], progress=False)
    cfg = json.loads((out / "config.json").read_text())
    cfg["auto_map"]["AutoConfig"] = "someone/repo--configuration_evil.EvilConfig"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="trust-remote-code"):
        needs_trust(out, False)
    assert needs_trust(out, True) is True

def _alloc_file(tmp_path, adapter, kept, with_experts=True):
    data = {"format": "evoreap-allocation", "version": 1,
            "layers": {str(layer): len(k) for layer, k in kept.items()},
            "meta": {"budget": 0.6, "criterion": "reap", "observation_key": "obs123", "proxy": {"kl": 0.25}}}
    if with_experts:
        data["experts"] = {str(layer): k for layer, k in kept.items()}
    path = tmp_path / f"alloc-{with_experts}.json"
    path.write_text(json.dumps(data))
    return path


def test_cli_export_dry_run_and_card(saved, tmp_path, capsys):
    model, adapter, src = saved("qwen2_moe")
    kept = _allocations(adapter)["nonuniform"]
    alloc = _alloc_file(tmp_path, adapter, kept)
    out = tmp_path / "out"
    assert main(["export", "--model", str(src), "--allocation", str(alloc), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "non-uniform" in text and "dropped" in text and not out.exists()
    assert main(["export", "--model", str(src), "--allocation", str(alloc), "--out", str(out), "--no-progress"]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "trust_remote_code=True" in card  # base_model only as a hub id (#16)
    for layer, k in kept.items():
        assert f"| {layer} | {len(k)} | {adapter.num_experts} |" in card
    record = json.loads((out / "evoreap.json").read_text())
    assert record["observation_key"] == "obs123" and record["proxy"] == {"kl": 0.25}
    assert record["command"].startswith("evoreap ")
    assert main(["export", "--model", str(src), "--allocation", str(alloc), "--out", str(out)]) == 2
    # without kept indices or an observation, export observes the model on the default calibration data
    # (tests/test_api.py); this model has no tokenizer to read that data with, which is said in one line
    no_experts = _alloc_file(tmp_path, adapter, kept, with_experts=False)
    data = json.loads(no_experts.read_text())
    data["meta"] = {}
    no_experts.write_text(json.dumps(data))
    assert main(["export", "--model", str(src), "--allocation", str(no_experts), "--out", str(tmp_path / "x")]) == 1
    assert "tokenizer" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_truncated_source_is_reported(saved, tmp_path):
    model, adapter, src0 = saved("qwen3_moe")
    src = tmp_path / "src"
    shutil.copytree(src0, src)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(EvoreapError, match="truncated"):
        export_pruned(src, tmp_path / "out", _allocations(adapter)["uniform"], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


KILLED_EXPORT = """
import sys, time, pathlib
from evoreap.export import export_pruned, writer
real = writer.write_shard
def slow(path, tensors, progress=None):
    real(path, tensors, progress)
    pathlib.Path(sys.argv[3]).write_text("one shard written")
    time.sleep(60)  # killed here
writer.write_shard = slow
export_pruned(sys.argv[1], sys.argv[2], {0: [0, 1, 2, 3], 2: [4, 5, 6, 7], 3: [8, 9, 10, 11]},
              max_shard_bytes=100_000, progress=False)
"""


def test_killed_export_leaves_nothing_that_looks_complete(saved, tmp_path, caplog, monkeypatch):
    import logging
    import signal
    import subprocess
    import sys
    import time

    model, adapter, src = saved("qwen3_moe")
    out, marker = tmp_path / "out", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_EXPORT, str(src), str(out), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the export never got to its first shard"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = [p for p in tmp_path.iterdir() if p.name != "marker"]
    assert not out.exists() and len(left) == 1 and left[0].name.startswith(".out.tmp-")
    assert not (left[0] / "config.json").exists()  # shards only: nothing a loader would take for a model
    monkeypatch.setattr(logging.getLogger("evoreap"), "propagate", True)  # the CLI tests may have turned it off
    with caplog.at_level("WARNING", logger="evoreap.export.core"):
        export_pruned(src, out, {0: [0, 1, 2, 3], 2: [4, 5, 6, 7], 3: [8, 9, 10, 11]}, progress=False)
    assert "interrupted" in caplog.text and (out / "config.json").exists()


def test_cli_chooses_experts_by_criterion_on_a_stored_observation(saved, tmp_path):
    from evoreap.allocation import select_experts
    from evoreap.criteria import score_experts
    from evoreap.data import TokenData
    from evoreap.observe import observe
    from evoreap.observe import store

    model, adapter, src = saved("qwen3_moe")
    g = torch.Generator().manual_seed(3)
    data = TokenData(torch.randint(0, 256, (4, 32), generator=g), torch.ones(4, 32, dtype=torch.long),
                     torch.zeros(4, dtype=torch.long), ("demo",))
    stats = observe(model, adapter, data, batch_size=2, progress=False)
    cache, key = tmp_path / "cache", "ab12" * 16
    fingerprint = store.model_fingerprint(adapter.config, store.router_tensors(model, adapter))
    store.write_observation(store.observations_dir(cache) / key, stats,
                            {"schema_version": store.SCHEMA_VERSION, "key": key, "model": {"fingerprint": fingerprint}})
    other = "cd34" * 16  # the same statistics, recorded on a model with other router weights
    store.write_observation(store.observations_dir(cache) / other, stats,
                            {"schema_version": store.SCHEMA_VERSION, "key": other,
                             "model": {"fingerprint": {**fingerprint, "router_sha256": "0" * 64}}})
    counts = {layer: n for layer, n in zip(adapter.moe_layer_indices, (4, 8, 12))}
    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps({"layers": {str(k): v for k, v in counts.items()}, "meta": {"budget": 0.5}}))
    out = tmp_path / "out"
    args = ["export", "--model", str(src), "--allocation", str(alloc), "--out", str(out), "--no-progress",
            "--criterion", "frequency", "--cache-dir", str(cache)]
    assert main([*args, "--observation", other]) == 2 and not out.exists()
    assert main([*args, "--observation", key]) == 0
    scores = score_experts(stats, "frequency")
    expected = {str(layer): select_experts(adapter, scores[layer], n).tolist() for layer, n in counts.items()}
    record = json.loads((out / "evoreap.json").read_text())
    assert record["kept_experts"] == expected
    assert record["criterion"] == "frequency" and record["observation_key"] == key
    _check_against_masked(model, adapter, {int(k): v for k, v in expected.items()}, out, remote=True)
