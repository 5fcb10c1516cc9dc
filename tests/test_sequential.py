"""Sequential (offload) observation equals in-memory observation; the CLI in both modes shares one cache entry."""

from __future__ import annotations

import json

import pytest
import torch

from evoreap.adapters import MoEAdapter
from evoreap.cli import main
from evoreap.data import TokenData
from evoreap.models import load_config, load_model
from evoreap.observe import observe
from evoreap.observe.sequential import SequentialModel
from evoreap.observe.stats import FIELDS
from evoreap.observe.store import describe_model, load_observation, model_fingerprint
from evoreap.testing import tiny_model


def save_tiny(path, arch: str, **overrides) -> str:
    tiny_model(arch, **overrides).save_pretrained(path)
    return str(path)


def make_data(n=5, length=16) -> TokenData:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    return TokenData(ids, mask, torch.arange(n) % 2, ("a", "b"))


def identical(a, b) -> bool:
    return a.tokens == b.tokens and a.domain_tokens == b.domain_tokens and all(
        torch.equal(getattr(a, f)[i], getattr(b, f)[i]) for f in FIELDS for i in a.layers)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_sequential_equals_in_memory(tmp_path, arch):
    path = save_tiny(tmp_path / arch, arch)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    adapter = MoEAdapter.for_model(model)
    data = make_data()
    want = observe(model, adapter, data, batch_size=2, progress=False)

    seq = SequentialModel(path, load_config(path))
    got = seq.observe(data, batch_size=2, progress=False)
    assert identical(got, want)
    # nothing stays resident: every parameter is back on the meta device
    assert all(p.is_meta for p in seq.model.parameters())
    # the fingerprint read from the files equals the one of the loaded model
    from evoreap.observe.store import router_tensors

    assert model_fingerprint(seq.adapter.config, seq.router_tensors()) == \
        model_fingerprint(adapter.config, router_tensors(model, adapter))


def test_hidden_states_on_disk_and_resume_chunks(tmp_path):
    path = save_tiny(tmp_path / "q", "qwen3_moe")
    data = make_data(n=7)
    seq = SequentialModel(path, load_config(path), max_hidden_bytes=0)  # force the on-disk hidden store
    whole = seq.observe(data, batch_size=2, progress=False)
    first = seq.observe(data, batch_size=2, stop_batch=2, progress=False)
    resumed = seq.observe(data, batch_size=2, initial=first, start_batch=2, progress=False)
    assert identical(resumed, whole)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen3-MoE with a small BPE tokenizer trained on demo text, as save_pretrained writes it."""
    from evoreap.data.bundled import load_texts
    from evoreap.demo.train import train_tokenizer

    path = tmp_path_factory.mktemp("tiny_qwen")
    tok = train_tokenizer(load_texts("code", "calibration")[:200] + load_texts("drama", "calibration")[:200], 300)
    tok.save_pretrained(path)
    tiny_model("qwen3_moe", vocab_size=len(tok)).save_pretrained(path)
    return str(path)


def test_cli_observe_offload_show_and_reuse(model_dir, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    common = ["observe", "--model", model_dir, "--data", "code,drama", "--tokens", "512", "--seq-len", "64",
              "--batch-size", "2", "--cache-dir", cache, "-q"]
    assert main(common) == 0
    out = capsys.readouterr().out.splitlines()
    key = out[0].split()[-1]
    layer_lines = [line for line in out if line.startswith("layer")]
    assert len(layer_lines) == 3 and "top by reap" in layer_lines[0]

    assert main(common + ["--offload"]) == 0  # same key: reused, not recomputed
    assert capsys.readouterr().out.splitlines()[0].split()[-1] == key

    obs = load_observation(key, cache_dir=cache)
    assert obs.manifest["data"]["file_hashes"] and obs.manifest["model"]["fingerprint"]["tokenizer_sha256"]
    lm = load_model(model_dir)
    assert obs.manifest["model"]["fingerprint"] == describe_model(lm)["fingerprint"]

    # an offload run from scratch (other cache) gives identical sums
    assert main(common[:-3] + ["--cache-dir", str(tmp_path / "other"), "-q", "--max-memory", "1e-6"]) == 0
    capsys.readouterr()
    assert identical(load_observation(key, cache_dir=str(tmp_path / "other")).stats, obs.stats)

    assert main(["observe", "--show", key[:8], "--cache-dir", cache, "--criterion", "frequency"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == f"observation {key}" and any(line.startswith("expert") for line in shown)
    assert len([line for line in shown if line.strip() and line.split()[0].isdigit()]) == 16  # one row per expert

    assert main(["observe", "--show", key, "--cache-dir", cache, "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert set(js["scores"]) == {str(i) for i in obs.stats.layers}


def test_cli_errors_and_listing(capsys, tmp_path):
    assert main(["observe", "--list-criteria"]) == 0
    assert "reap_x_frequency" in capsys.readouterr().out
    assert main(["observe", "--show", "abcdef12", "--criterion", "frequncy"]) == 2
    assert "did you mean frequency" in capsys.readouterr().err
    assert main(["observe", "--show", "abcdef12", "--cache-dir", str(tmp_path)]) == 2
    assert "no observation" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_layers_read_into_reused_buffers_equal_fresh_reads(tmp_path, arch):
    """Streaming reads each decoder layer into the previous one's tensors (no fresh pages per layer): every layer so
    read equals the same layer read into new tensors, and the fused expert tensors are the same memory each time."""
    from evoreap.observe.sequential import LayerBuffers

    path = save_tiny(tmp_path / arch, arch)
    seq = SequentialModel(path, load_config(path))
    buffers, pointers, held = LayerBuffers(), set(), []
    with torch.inference_mode():
        for i, layer in enumerate(seq.decoder.layers):
            prefix = f"{seq.prefix}layers.{i}."
            seq.loader.materialise(layer, prefix, torch.device("cpu"))
            fresh = {k: v.clone() for k, v in layer.state_dict().items()}
            layer.to("meta")
            seq.loader.materialise(layer, prefix, torch.device("cpu"), buffers)
            got = layer.state_dict()
            assert fresh.keys() == got.keys() and all(torch.equal(fresh[k], got[k]) for k in fresh)
            experts = [v for k, v in got.items() if k.endswith("experts.down_proj")]
            pointers |= {v.data_ptr() for v in experts}
            held += experts  # kept alive: fresh tensors could not reuse this address
            layer.to("meta")
    assert len(pointers) == 1  # every MoE layer's experts, in one tensor
