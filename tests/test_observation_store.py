"""Observation directories: reuse, resume after an interruption, checksums and refusals, cache location."""

from __future__ import annotations

import json

import pytest
import torch

from evoreap.adapters import MoEAdapter
from evoreap.data import TokenData
from evoreap.errors import UsageError
from evoreap.models import LoadedModel
from evoreap.observe import observe
from evoreap.observe.stats import FIELDS
from evoreap.observe.store import (
    describe_model,
    load_observation,
    observation_key,
    observations_dir,
    observe_cached,
)
from evoreap.testing import tiny_model


def loaded_tiny(arch="qwen3_moe", seed=0) -> LoadedModel:
    model = tiny_model(arch, seed=seed)
    return LoadedModel(model, None, f"tiny:{arch}", MoEAdapter.for_model(model))


def make_data(n=6, length=16, seed=0) -> TokenData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, length), generator=g)
    return TokenData(ids, torch.ones_like(ids), torch.arange(n) % 2, ("a", "b"))


class ForwardCounter:
    """Counts decoder forwards; raises KeyboardInterrupt on forward number ``fail_at`` (1-based)."""

    def __init__(self, model, fail_at=None):
        self.n, self.fail_at = 0, fail_at
        self.handle = model.get_decoder().layers[0].register_forward_hook(self)

    def __call__(self, module, args, output):
        self.n += 1
        if self.n == self.fail_at:
            raise KeyboardInterrupt

    def remove(self):
        self.handle.remove()


def equal(a, b) -> bool:
    return a.tokens == b.tokens and a.domain_tokens == b.domain_tokens and all(
        torch.equal(getattr(a, f)[i], getattr(b, f)[i]) for f in FIELDS for i in a.layers)


def test_reuse_and_manifest(tmp_path):
    lm, data = loaded_tiny(), make_data()
    counter = ForwardCounter(lm.model)
    key, stats = observe_cached(lm, data, cache_dir=tmp_path, batch_size=2, progress=False, seed=7)
    assert counter.n == 3
    key2, again = observe_cached(lm, data, cache_dir=tmp_path, batch_size=2, progress=False, seed=7)
    assert key2 == key and counter.n == 3  # reused: no forward at all
    counter.remove()
    assert equal(again, stats)
    assert equal(stats, observe(lm.model, lm.adapter, data, batch_size=2, progress=False))

    obs_dir = observations_dir(tmp_path) / key
    m = json.loads((obs_dir / "manifest.json").read_text())
    assert m["schema_version"] == 3 and m["key"] == key and m["evoreap_version"]
    fp = m["model"]["fingerprint"]
    assert set(fp) == {"config_sha256", "router_sha256", "tokenizer_sha256", "weights_sha256", "sha256"}
    assert m["data"]["seq_len"] == 16 and m["data"]["seed"] == 7 and set(m["data"]["fingerprints"]) == {"a", "b"}
    assert m["tokens"] == 96 and m["domain_tokens"] == {"a": 48, "b": 48}
    assert set(m["files"]) == {f"layer_{i:03d}.safetensors" for i in stats.layers}
    assert sorted(p.suffix for p in obs_dir.iterdir()) == [".json"] + [".safetensors"] * len(stats.layers)
    assert not (observations_dir(tmp_path) / f"{key}.partial").exists()
    # by key, key prefix or directory
    for ref in (key, key[:10], str(obs_dir)):
        assert equal(load_observation(ref, cache_dir=tmp_path).stats, stats)


def test_key_depends_on_what_determines_the_stats(tmp_path):
    lm, data = loaded_tiny(), make_data()
    fp = describe_model(lm)["fingerprint"]["sha256"]
    from evoreap.observe.store import data_fingerprints

    base = observation_key(fp, data_fingerprints(data), 16, {"dtype": "float32", "batch_size": 2})
    assert base == observation_key(fp, data_fingerprints(data), 16, {"batch_size": 2, "dtype": "float32"})
    assert base != observation_key(fp, data_fingerprints(make_data(seed=1)), 16, {"dtype": "float32", "batch_size": 2})
    assert base != observation_key(fp, data_fingerprints(data), 16, {"dtype": "float32", "batch_size": 3})
    assert data_fingerprints(data.subset([0, 2])) != data_fingerprints(data)
    with torch.no_grad():
        lm.adapter.layers(lm.model)[-1].router.weight[0, 0] += 1e-3
    assert describe_model(lm)["fingerprint"]["sha256"] != fp


def test_interrupted_run_resumes_to_identical_sums(tmp_path):
    data = make_data(n=10)
    lm = loaded_tiny("glm4_moe")
    want = observe(lm.model, lm.adapter, data, batch_size=2, progress=False)

    counter = ForwardCounter(lm.model, fail_at=4)  # dies in batch 4 of 5, after checkpoints at 1, 2, 3
    with pytest.raises(KeyboardInterrupt):
        observe_cached(lm, data, cache_dir=tmp_path, batch_size=2, progress=False, checkpoint_every=1)
    counter.remove()
    partial = [p for p in observations_dir(tmp_path).iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1
    progress = json.loads((partial[0] / "progress.json").read_text())
    assert progress["batches_done"] == 3
    assert len(list(partial[0].glob("sums-*.safetensors"))) == 1

    counter = ForwardCounter(lm.model)
    key, got = observe_cached(lm, data, cache_dir=tmp_path, batch_size=2, progress=False, checkpoint_every=1)
    counter.remove()
    assert counter.n == 2  # only the two missing batches ran
    assert equal(got, want)
    assert not partial[0].exists()



def test_checkpoint_of_another_row_order_is_not_resumed(tmp_path):
    """The same rows per domain in another interleaving share the key (a finished observation is order-free), but
    a checkpoint after k batches covers other rows then: it is discarded, never resumed (no row counted twice)."""
    data = make_data(n=10)
    order = [i for i in range(10) if i % 2] + [i for i in range(10) if not i % 2]  # domain b first, then a
    swapped = data.subset(order)
    lm = loaded_tiny("glm4_moe")
    want = observe(lm.model, lm.adapter, swapped, batch_size=2, progress=False)

    counter = ForwardCounter(lm.model, fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        observe_cached(lm, data, cache_dir=tmp_path, batch_size=2, progress=False, checkpoint_every=1)
    counter.remove()
    counter = ForwardCounter(lm.model)
    key, got = observe_cached(lm, swapped, cache_dir=tmp_path, batch_size=2, progress=False, checkpoint_every=1)
    counter.remove()
    assert counter.n == 5  # started over
    assert equal(got, want)

def test_refuses_corrupted_foreign_and_escaping_files(tmp_path):
    lm, data = loaded_tiny("mixtral"), make_data()
    key, _ = observe_cached(lm, data, cache_dir=tmp_path, batch_size=3, progress=False)
    d = observations_dir(tmp_path) / key
    fp = describe_model(lm)["fingerprint"]["sha256"]
    assert load_observation(key, cache_dir=tmp_path, expect_model_fingerprint=fp).key == key

    other = describe_model(loaded_tiny("mixtral", seed=1))["fingerprint"]["sha256"]
    with pytest.raises(UsageError, match="another model"):
        load_observation(key, cache_dir=tmp_path, expect_model_fingerprint=other)

    victim = sorted(d.glob("layer_*.safetensors"))[0]
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(UsageError, match="corrupted"):
        load_observation(key, cache_dir=tmp_path)
    with pytest.raises(UsageError, match="corrupted"):  # observe_cached refuses too, it does not overwrite
        observe_cached(lm, data, cache_dir=tmp_path, batch_size=3, progress=False)

    m = json.loads((d / "manifest.json").read_text())
    m["files"] = {"../outside.safetensors": "0" * 64, **m["files"]}
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UsageError, match="outside its directory"):
        load_observation(d)

    (d / "manifest.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_observation(d)
    with pytest.raises(UsageError, match="no observation"):
        load_observation("ffffffffffff", cache_dir=tmp_path)


def test_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOREAP_CACHE", str(tmp_path / "env"))
    assert observations_dir() == tmp_path / "env" / "observations"
    assert observations_dir(tmp_path / "flag") == tmp_path / "flag" / "observations"
    monkeypatch.delenv("EVOREAP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert observations_dir() == tmp_path / "home" / ".cache" / "evoreap" / "observations"


def test_show_with_another_model_is_refused(small_model_dir, tmp_path, capsys):
    """`observe --show KEY --model M` checks that KEY was observed with M."""
    from evoreap.cli import main

    cache = str(tmp_path / "cache")
    assert main(["observe", "--model", str(small_model_dir), "--tokens", "1024", "--seq-len", "64",
                 "--cache-dir", cache]) == 0
    key = capsys.readouterr().out.split("observation ", 1)[1].split()[0]
    assert main(["observe", "--show", key, "--model", str(small_model_dir), "--cache-dir", cache]) == 0
    other = tmp_path / "other"
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(small_model_dir, other)
    weights = load_file(other / "model.safetensors")
    name = next(k for k in weights if k.endswith("mlp.gate.weight"))
    weights[name] = weights[name] + 1.0
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["observe", "--show", key, "--model", str(other), "--cache-dir", cache]) == 2
    assert "was made for another model" in capsys.readouterr().err


def test_router_check_rounds_to_the_observed_dtype(tmp_path):
    """An fp32 checkpoint observed in bfloat16 carries the fingerprint of its rounded routers: the fp32 tensors read
    from its files pass the check once rounded the same way; other weights are still refused."""
    from types import SimpleNamespace

    from evoreap.observe.store import check_routers, router_hash

    g = torch.Generator().manual_seed(0)
    fp32 = {f"{i}.weight": torch.randn(8, 16, generator=g) for i in range(3)}
    manifest = {"model": {"dtype": "bfloat16", "path": "m",
                          "fingerprint": {"router_sha256": router_hash({n: t.bfloat16() for n, t in fp32.items()})}}}
    obs = SimpleNamespace(manifest=manifest, key="k" * 64)
    assert router_hash(fp32) != manifest["model"]["fingerprint"]["router_sha256"]  # without rounding: refused
    check_routers(obs, fp32, "ckpt")
    other = {**fp32, "2.weight": fp32["2.weight"] + 0.05}
    with pytest.raises(UsageError, match="other router weights"):
        check_routers(obs, other, "ckpt")
