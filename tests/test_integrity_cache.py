"""Cache integrity: keys cover every weight, references are checksummed and rebuilt when damaged, observation files
are checked against their manifest and the model, damaged manifests give one clean line, non-finite statistics are
never stored."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import evoreap.reference as reference_mod
from evoreap.adapters import MoEAdapter
from evoreap.cli import main
from evoreap.data import TokenData
from evoreap.errors import EvoreapError, UsageError
from evoreap.files import sha256_file
from evoreap.models import LoadedModel, load_model
from evoreap.observe import observe
from evoreap.observe.store import describe_model, load_observation, observations_dir, observe_cached
from evoreap.reference import Reference, reference_cached
from evoreap.testing import tiny_model

OBSERVE = ["--tokens", "512", "--seq-len", "64", "-q"]


def run_cli(capsys, *argv) -> tuple[int, list[str], str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return rc, [line for line in captured.err.strip().splitlines() if ": error: " in line], captured.out


def expect(capsys, code, words, *argv) -> str:
    rc, lines, _ = run_cli(capsys, *argv)
    assert rc == code and len(lines) == 1, (rc, lines)
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


def cli_observe(capsys, model_dir, cache) -> str:
    rc, lines, out = run_cli(capsys, "observe", "--model", model_dir, *OBSERVE, "--cache-dir", cache)
    assert rc == 0, lines
    return out.split("observation ", 1)[1].split()[0]


def rewrite_weight(model_dir: Path, name_part: str, change) -> str:
    """Apply ``change`` to the first tensor whose name contains ``name_part`` in the checkpoint; returns its name."""
    f = model_dir / "model.safetensors"
    weights = load_file(f)
    name = next(k for k in sorted(weights) if name_part in k)
    weights[name] = change(weights[name].clone())
    save_file(weights, f, metadata={"format": "pt"})
    return name


@pytest.fixture(scope="module")
def expert_variant(small_model_dir, tmp_path_factory) -> Path:
    """small_model_dir with one expert weight changed on disk; routers and everything else untouched."""
    path = tmp_path_factory.mktemp("variant") / "m"
    shutil.copytree(small_model_dir, path)
    name = rewrite_weight(path, "layers.1.mlp.experts.3.down_proj", lambda t: t + 0.25)
    assert ".gate." not in name
    return path


def tiny_loaded(arch="qwen3_moe", seed=0) -> LoadedModel:
    model = tiny_model(arch, seed=seed)
    return LoadedModel(model, None, f"tiny:{arch}", MoEAdapter.for_model(model))


def tiny_data(n=6, length=16, seed=0) -> TokenData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, length), generator=g)
    return TokenData(ids, torch.ones_like(ids), torch.arange(n) % 2, ("a", "b"))


# -- 1. keys cover all weights ----------------------------------------------------------------------------------------

def test_observation_key_changes_with_an_expert_weight_on_disk(small_model_dir, expert_variant, tmp_path, capsys):
    cache = tmp_path / "cache"
    key = cli_observe(capsys, small_model_dir, cache)
    other = cli_observe(capsys, expert_variant, cache)
    assert other != key  # a new observation, not the original model's statistics
    a, b = (load_observation(k, cache_dir=cache).manifest["model"]["fingerprint"] for k in (key, other))
    assert a["router_sha256"] == b["router_sha256"] and a["config_sha256"] == b["config_sha256"]
    assert a["weights_sha256"] != b["weights_sha256"]
    # the offload observer fingerprints the same files without loading them: same key, reused
    rc, _, out = run_cli(capsys, "observe", "--model", expert_variant, *OBSERVE, "--cache-dir", cache, "--offload")
    assert rc == 0 and out.split()[1] == other


def test_reference_key_changes_with_an_expert_weight_on_disk(small_model_dir, expert_variant, tmp_path):
    cache = tmp_path / "cache"
    data = tiny_data(n=2, length=12)
    refs = [reference_cached(load_model(str(d)).model, data, top_k=4, cache_dir=cache, progress=False)
            for d in (small_model_dir, expert_variant)]
    assert refs[0].key != refs[1].key
    assert len(list((cache / "reference").iterdir())) == 2


def test_in_memory_change_of_an_expert_weight_changes_both_fingerprints(small_model_dir, tmp_path, monkeypatch):
    from evoreap.observe.sequential import describe_checkpoint

    monkeypatch.setenv("EVOREAP_CACHE", str(tmp_path / "cache"))
    lm = load_model(str(small_model_dir))
    info = describe_model(lm)
    ref_fp = reference_mod.model_fingerprint(lm.model)
    # unchanged since loading: the files' fingerprint, equal to the offload observer's (no weights loaded there)
    assert describe_checkpoint(str(small_model_dir))[2]["fingerprint"] == info["fingerprint"]
    layer = lm.adapter.layers(lm.model)[1]
    with torch.no_grad():
        layer.experts.down_proj[3, 0, 0] += 1.0
    changed = describe_model(lm)["fingerprint"]
    assert changed["router_sha256"] == info["fingerprint"]["router_sha256"]
    assert changed["sha256"] != info["fingerprint"]["sha256"]
    assert reference_mod.model_fingerprint(lm.model) != ref_fp
    # a resident model without a directory: its tensors are hashed, and any change shows
    tiny = tiny_loaded()
    before = describe_model(tiny)["fingerprint"]["sha256"]
    with torch.no_grad():
        tiny.adapter.layers(tiny.model)[0].experts.down_proj[0, 0, 0] += 1.0
    assert describe_model(tiny)["fingerprint"]["sha256"] != before


def test_file_hashes_are_cached_and_a_damaged_cache_entry_is_recomputed(small_model_dir, tmp_path, monkeypatch):
    import evoreap.fingerprint as fingerprint

    model_dir = tmp_path / "m"
    shutil.copytree(small_model_dir, model_dir)
    cache = tmp_path / "cache"
    calls = []
    real = fingerprint.sha256_file
    monkeypatch.setattr(fingerprint, "sha256_file", lambda p: calls.append(p) or real(p))
    first = fingerprint.checkpoint_fingerprint(model_dir, cache)
    assert len(calls) == 1
    assert fingerprint.checkpoint_fingerprint(model_dir, cache) == first and len(calls) == 1  # cached
    (entry,) = (cache / "fingerprints").iterdir()
    for damage in ("{not json", "[]", json.dumps({**json.loads(entry.read_text()), "sha256": 5})):
        entry.write_text(damage)
        assert fingerprint.checkpoint_fingerprint(model_dir, cache) == first
    assert len(calls) == 4 and json.loads(entry.read_text())["sha256"] == sha256_file(model_dir / "model.safetensors")
    os.utime(model_dir / "model.safetensors", ns=(1, 1))  # a new mtime: hashed again
    assert fingerprint.checkpoint_fingerprint(model_dir, cache) == first and len(calls) == 5
    rewrite_weight(model_dir, "mlp.experts.0.up_proj", lambda t: -t)
    assert fingerprint.checkpoint_fingerprint(model_dir, cache) != first


def test_files_changed_after_loading_are_not_trusted(small_model_dir, tmp_path):
    """The file hash describes the resident model only while the files are the ones it was loaded from."""
    import evoreap.fingerprint as fingerprint

    model_dir = tmp_path / "m"
    shutil.copytree(small_model_dir, model_dir)
    lm = load_model(str(model_dir))
    rewrite_weight(model_dir, "mlp.experts.0.up_proj", lambda t: -t)
    got = fingerprint.weights_fingerprint(lm.model, tmp_path / "cache")
    assert got == fingerprint.tensors_fingerprint(lm.model)
    assert got != fingerprint.checkpoint_fingerprint(model_dir, tmp_path / "cache")


# -- 2. references are checksummed; damaged ones are rebuilt -----------------------------------------------------------

def _flip_last_byte(d: Path) -> None:
    f = d / "reference.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0x01
    f.write_bytes(bytes(raw))


def _edit_manifest(change):
    def apply(d: Path) -> None:
        m = json.loads((d / "manifest.json").read_text())
        (d / "manifest.json").write_text(json.dumps(change(m)))
    return apply


def _rewrite_ids(change):
    """A hostile copy: the top-K ids changed and the manifest's checksum made to match."""
    def apply(d: Path) -> None:
        f = d / "reference.safetensors"
        tensors = load_file(f)
        change(tensors["topk_ids"])
        save_file(tensors, f)
        m = json.loads((d / "manifest.json").read_text())
        (d / "manifest.json").write_text(json.dumps({**m, "sha256": sha256_file(f)}))
    return apply


REFERENCE_DAMAGE = {
    "ids out of range": _rewrite_ids(lambda ids: ids[0, 0, 0].fill_(1 << 20)),
    "repeated ids": _rewrite_ids(lambda ids: ids[0, 0, 1].copy_(ids[0, 0, 0])),
    "not json": lambda d: (d / "manifest.json").write_text("{not json"),
    "json list": lambda d: (d / "manifest.json").write_text("[]"),
    "missing field": _edit_manifest(lambda m: {k: v for k, v in m.items() if k != "model_fingerprint"}),
    "mistyped field": _edit_manifest(lambda m: {**m, "top_k": "4"}),
    "no checksum": _edit_manifest(lambda m: {k: v for k, v in m.items() if k != "sha256"}),
    "checksum mismatch": _flip_last_byte,
}


@pytest.mark.parametrize("damage", sorted(REFERENCE_DAMAGE))
def test_damaged_reference_is_rebuilt(damage, tmp_path, monkeypatch, caplog):
    model, data = tiny_model("qwen3_moe"), tiny_data()
    builds = []
    real_build = reference_mod.build_reference
    monkeypatch.setattr(reference_mod, "build_reference", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    first = reference_cached(model, data, top_k=4, cache_dir=tmp_path, progress=False)
    directory = tmp_path / "reference" / first.key
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["sha256"] == sha256_file(directory / "reference.safetensors")
    REFERENCE_DAMAGE[damage](directory)
    with caplog.at_level(logging.WARNING, logger="evoreap.reference"):
        again = reference_cached(model, data, top_k=4, cache_dir=tmp_path, progress=False)
    assert builds == [1, 1] and "rebuilding" in caplog.text
    assert torch.equal(again.topk_logprobs, first.topk_logprobs) and torch.equal(again.valid, first.valid)
    assert Reference.load(directory).key == first.key  # the rebuilt entry is whole again and reused
    reference_cached(model, data, top_k=4, cache_dir=tmp_path, progress=False)
    assert builds == [1, 1]


# -- 3. and 4. observation files and manifests -------------------------------------------------------------------------

@pytest.fixture()
def tiny_observation(tmp_path):
    lm, data = tiny_loaded(), tiny_data()
    key, stats = observe_cached(lm, data, cache_dir=tmp_path, batch_size=3, progress=False)
    return lm, data, key, observations_dir(tmp_path) / key


def _rewrite_layer(d: Path, index: int, change, source: int | None = None) -> None:
    """Replace layer ``index``'s file by ``change(tensors, metadata)`` of layer ``source``'s (default: its own), with
    the manifest's digest updated, as a careless repair would."""
    src = d / f"layer_{(index if source is None else source):03d}.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    tensors, meta = change(tensors, meta)
    dst = d / f"layer_{index:03d}.safetensors"
    save_file(tensors, str(dst), metadata=meta)
    m = json.loads((d / "manifest.json").read_text())
    m["files"][dst.name] = sha256_file(dst)
    (d / "manifest.json").write_text(json.dumps(m))


def _fewer_experts(tensors, meta):
    return {k: v[..., :-2].contiguous() for k, v in tensors.items()}, meta


LAYER_DAMAGE = {
    "another layer's file": (lambda t, m: (t, m), "holds layer"),
    "count shorter than the rest": (lambda t, m: ({**t, "count": t["count"][:-1].contiguous()}, m), "not float64"),
    "float32 sums": (lambda t, m: ({**t, "gate_sum": t["gate_sum"].float()}, m), "float64"),
    "missing field": (lambda t, m: ({k: v for k, v in t.items() if k != "max_norm"}, m), "lacks max_norm"),
    "non-finite sum": (lambda t, m: ({**t, "norm_sum": t["norm_sum"] * float("nan")}, m), "non-finite"),
}


@pytest.mark.parametrize("damage", sorted(LAYER_DAMAGE))
def test_layer_file_that_disagrees_with_its_manifest_is_refused(tiny_observation, damage):
    lm, data, key, d = tiny_observation
    layers = sorted(int(p.stem.split("_")[1]) for p in d.glob("layer_*.safetensors"))
    change, words = LAYER_DAMAGE[damage]
    _rewrite_layer(d, layers[1], change, source=layers[0] if damage == "another layer's file" else None)
    with pytest.raises(UsageError, match="does not match its manifest") as e:
        load_observation(d)
    assert words in str(e.value) and "observe again" in str(e.value)


def test_observation_with_fewer_experts_than_the_model_is_refused(tiny_observation, tmp_path):
    lm, data, key, d = tiny_observation
    for p in sorted(d.glob("layer_*.safetensors")):
        _rewrite_layer(d, int(p.stem.split("_")[1]), _fewer_experts)
    assert load_observation(d).stats.count[lm.adapter.moe_layer_indices[0]].numel() == lm.adapter.num_experts - 2
    with pytest.raises(UsageError, match="experts in layer .* but the model has"):
        observe_cached(lm, data, cache_dir=tmp_path, batch_size=3, progress=False)  # the reuse path checks it
    experts = {i: lm.adapter.num_experts for i in lm.adapter.moe_layer_indices}
    with pytest.raises(UsageError, match="covers MoE layers"):
        load_observation(d, expect_experts={**experts, 99: 8})


@pytest.fixture(scope="module")
def cli_observation(small_model_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("obs")
    assert main(["observe", "--model", str(small_model_dir), *OBSERVE, "--cache-dir", str(cache)]) == 0
    (key,) = [p.name for p in observations_dir(cache).iterdir()]
    return cache, key


def _cache_copy(cli_observation, tmp_path) -> tuple[Path, str, Path]:
    cache, key = cli_observation
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    return copy, key, observations_dir(copy) / key


def test_export_refuses_an_observation_with_fewer_experts(small_model_dir, cli_observation, tmp_path, capsys):
    cache, key, d = _cache_copy(cli_observation, tmp_path)
    for p in sorted(d.glob("layer_*.safetensors")):
        _rewrite_layer(d, int(p.stem.split("_")[1]), _fewer_experts)
    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps({"layers": {str(i): 4 for i in range(4)}, "meta": {"budget": 0.5}}))
    expect(capsys, 2, ["6 experts in layer 0", "model has 8", "observe this model"], "export", "--model",
           small_model_dir, "--allocation", alloc, "--observation", key, "--criterion", "frequency", "--out",
           tmp_path / "out", "--cache-dir", cache, "--no-progress")
    assert not (tmp_path / "out").exists()


MANIFEST_DAMAGE = {
    "manifest is a list": lambda m: [m],
    "files not a dict": lambda m: {**m, "files": list(m["files"])},
    "layers hold strings": lambda m: {**m, "layers": [str(i) for i in m["layers"]]},
    "layers hold floats": lambda m: {**m, "layers": [i + 0.5 for i in m["layers"]]},
    "tokens missing": lambda m: {k: v for k, v in m.items() if k != "tokens"},
    "tokens a string": lambda m: {**m, "tokens": str(m["tokens"])},
    "data not an object": lambda m: {**m, "data": "calibration"},
    "domains not a list": lambda m: {**m, "data": {**m["data"], "domains": "demo"}},
    "model not an object": lambda m: {**m, "model": [m["model"]]},
    "fingerprint missing": lambda m: {**m, "model": {**m["model"], "fingerprint": None}},
    "domain_tokens a list": lambda m: {**m, "domain_tokens": list(m["domain_tokens"].values())},
    "domain_tokens strings": lambda m: {**m, "domain_tokens": {k: str(v) for k, v in m["domain_tokens"].items()}},
    "key a number": lambda m: {**m, "key": 5},
}


@pytest.mark.parametrize("damage", sorted(MANIFEST_DAMAGE))
def test_damaged_manifest_gives_one_clean_line(cli_observation, tmp_path, capsys, damage):
    cache, key, d = _cache_copy(cli_observation, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(MANIFEST_DAMAGE[damage](m)))
    line = expect(capsys, 2, ["is damaged", f"delete {d}", "observe again"], "observe", "--show", key,
                  "--cache-dir", cache)
    assert "manifest.json" in line


# -- 5. non-finite statistics are never stored -------------------------------------------------------------------------

def test_non_finite_expert_weight_stores_nothing(tmp_path):
    lm, data = tiny_loaded(), tiny_data(n=8)
    layer = lm.adapter.layers(lm.model)[0]
    clean = observe(lm.model, lm.adapter, data, batch_size=2, progress=False)
    expert = int(clean.count[layer.index].argmax())  # routed on this data
    with torch.no_grad():
        layer.experts.down_proj[expert].fill_(float("inf"))
    with pytest.raises(EvoreapError, match=f"expert {expert} of layer {layer.index}: the model's weights are not "
                                           "finite") as e:
        observe_cached(lm, data, cache_dir=tmp_path, batch_size=2, progress=False, checkpoint_every=1)
    assert "\n" not in str(e.value)
    root = observations_dir(tmp_path)
    assert [p.name for p in root.iterdir() if not p.name.endswith(".partial")] == []
    assert not list(root.rglob("sums-*.safetensors")) and not list(root.rglob("progress.json"))


def test_overflowing_checkpoint_fails_observe_in_one_line(small_model_dir, tmp_path, capsys):
    """Loading refuses NaN/inf weights; finite weights whose activations overflow (here a layer-0 norm scaled to
    near the float32 maximum) only show in the statistics, which are then refused."""
    model_dir = tmp_path / "m"
    shutil.copytree(small_model_dir, model_dir)
    rewrite_weight(model_dir, "layers.0.post_attention_layernorm", lambda t: t.fill_(3e38))
    expect(capsys, 1, ["of layer 0", "weights are not finite", "nothing was stored"], "observe", "--model",
           model_dir, *OBSERVE, "--cache-dir", tmp_path / "cache")
    root = observations_dir(tmp_path / "cache")
    assert not root.exists() or [p.name for p in root.iterdir() if not p.name.endswith(".partial")] == []
