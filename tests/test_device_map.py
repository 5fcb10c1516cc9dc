"""Models placed by accelerate (``--device-map``, ``--max-memory``): some layers on the CPU, others offloaded to disk.
Routing statistics, reference distributions, fingerprints and proxy values equal the plain model's."""

import json

import pytest
import torch

from evoreap.cli import main
from evoreap.data import load_tokens
from evoreap.errors import UsageError
from evoreap.models import load_model, parse_max_memory
from evoreap.observe.recorder import observe
from evoreap.observe.stats import FIELDS
from evoreap.proxies import evaluate
from evoreap.proxies.population import PopulationEvaluator
from evoreap.reference import build_reference, model_fingerprint


@pytest.fixture(scope="module")
def models(small_model_dir, tmp_path_factory):
    """The small saved model twice: plain, and with layers 0-1 on the CPU and 2-3 offloaded to disk."""
    mapping = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
               "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "disk", "model.layers.3": "disk"}
    path = tmp_path_factory.mktemp("map") / "map.json"
    path.write_text(json.dumps(mapping))
    plain = load_model(str(small_model_dir))
    mapped = load_model(str(small_model_dir), device_map=str(path))
    return plain, mapped, path


def test_a_disk_offloaded_map_gives_the_plain_models_numbers(models):
    plain, mapped, _ = models
    offloaded = {n for n, p in mapped.model.named_parameters() if p.device.type == "meta"}
    assert offloaded and all(".layers.2." in n or ".layers.3." in n for n in offloaded)  # really on disk
    data = load_tokens("demo", plain.tokenizer, split="search", seq_len=32, samples=6)
    a = observe(plain.model, plain.adapter, data, batch_size=4, progress=False)
    b = observe(mapped.model, mapped.adapter, data, batch_size=4, progress=False)
    for field in FIELDS:
        for layer, t in getattr(a, field).items():
            assert torch.allclose(getattr(b, field)[layer].double(), t.double(), rtol=1e-6, atol=1e-7), field
    assert model_fingerprint(mapped.model) == model_fingerprint(plain.model)  # caches are shared
    ref = build_reference(plain.model, data, top_k=16, batch_size=4, progress=False)
    ref_mapped = build_reference(mapped.model, data, top_k=16, batch_size=4, progress=False)
    assert torch.allclose(ref_mapped.topk_logprobs, ref.topk_logprobs, atol=1e-5)
    e = plain.adapter.num_experts
    masks = {i: torch.arange(e) % 3 != 1 for i in plain.adapter.moe_layer_indices}
    names = ("kl", "nll", "esap")
    want = evaluate(plain.model, plain.adapter, masks, data, proxies=names, reference=ref, batch_size=4)
    got = evaluate(mapped.model, mapped.adapter, masks, data, proxies=names, reference=ref, batch_size=4)
    # a sibling differing only in layer 3 (on disk): that layer's attention runs once for both, under offload hooks
    last = max(plain.adapter.moe_layer_indices)
    sibling = {**masks, last: torch.arange(e) % 3 != 2}
    want_sibling = evaluate(plain.model, plain.adapter, sibling, data, proxies=names, reference=ref, batch_size=4)
    pop = PopulationEvaluator(mapped.model, mapped.adapter, data, reference=ref, batch_size=4)
    got_pop, unpruned, got_sibling = pop.score([masks, None, sibling], proxies=names)
    assert pop.work.attention_shared > 0
    for name in names:
        assert got.values[name] == pytest.approx(want.values[name], abs=1e-5)
        assert got_pop.values[name] == pytest.approx(want.values[name], abs=1e-5)
        assert got_sibling.values[name] == pytest.approx(want_sibling.values[name], abs=1e-5)
    assert unpruned.values["kl"] == pytest.approx(0.0, abs=1e-5)


def test_evaluate_with_a_device_map_from_the_cli(models, small_model_dir, tmp_path, capsys):
    _, _, path = models
    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps({"layers": {str(i): 4 for i in range(4)},  # experts listed: nothing to observe
                                 "experts": {str(i): [(i + 2 * j) % 8 for j in range(4)] for i in range(4)}}))
    outs = {}
    for name, extra in (("plain", []), ("mapped", ["--device-map", str(path)])):
        assert main(["evaluate", "--model", str(small_model_dir), "--allocation", str(alloc), "--tokens", "256",
                     "--seq-len", "32", "--generate", "0", "--cache-dir", str(tmp_path / "c"), "--json",
                     "--allow-overlap", *extra]) == 0
        outs[name] = json.loads(capsys.readouterr().out)["results"]
    for row, values in outs["plain"].items():
        for k, v in values["overall"].items():
            assert outs["mapped"][row]["overall"][k] == pytest.approx(v, abs=1e-5)


def test_max_memory_offloads_what_does_not_fit(small_model_dir):
    assert parse_max_memory("2") == {"cpu": 2 << 30}
    assert parse_max_memory("0=20GiB, cpu=1.5GB", "cuda") == {0: 20 << 30, "cpu": 3 << 29}
    for bad in ("lots", "cpu=-1", ""):
        with pytest.raises(UsageError, match="--max-memory"):
            parse_max_memory(bad)
    with pytest.raises(UsageError, match="--device-map nowhere.json"):
        load_model(str(small_model_dir), device_map="nowhere.json")
    small = load_model(str(small_model_dir), device_map="auto", max_memory="0.0004")  # ~430 kB on the CPU
    assert any(p.device.type == "meta" for p in small.model.parameters())


def test_search_with_a_device_map_finds_the_plain_searchs_allocation(models, small_model_dir, tmp_path):
    """``evoreap search --device-map FILE`` end to end (layers 0-1 on the CPU, 2-3 offloaded to disk; observed,
    referenced and scored under accelerate's hooks, by the population engine) completes with the plain search's best
    allocation and the same scores for every candidate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, path = models
    model_dir = tmp_path / "sharp"  # routers far from uniform and experts that matter: scores far from ties
    model = AutoModelForCausalLM.from_pretrained(small_model_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(40)
            for p in layer.mlp.experts.parameters():
                p.mul_(8)
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(small_model_dir).save_pretrained(model_dir)
    results = {}
    for name, extra in (("plain", []), ("mapped", ["--device-map", str(path), "--engine", "population"])):
        assert main(["search", "--model", str(model_dir), "--budget", "0.5", "--generations", "1", "--offspring", "2",
                     "--population", "2", "--fidelities", "64,96,128", "--survivors", "2,1", "--calib-tokens", "128",
                     "--heldout-tokens", "32", "--seq-len", "32", "--batch-size", "4", "--no-plots", "--allow-overlap",
                     "--runs-dir", str(tmp_path / "runs"), "--run", name, "--cache-dir", str(tmp_path / name), "-q",
                     *extra]) == 0
        run = tmp_path / "runs" / name
        results[name] = (json.loads((run / "result.json").read_text()), json.loads((run / "history.json").read_text()))
    (plain, plain_history), (mapped, mapped_history) = results["plain"], results["mapped"]
    assert mapped["best"] == plain["best"] and mapped["trials"] == plain["trials"] > 3
    assert mapped["best_value"] == pytest.approx(plain["best_value"], rel=1e-4) and plain["best_value"] > 1e-4
    assert mapped_history["scored_top"].keys() == plain_history["scored_top"].keys()
    for key, v in plain_history["scored_top"].items():
        assert mapped_history["scored_top"][key] == pytest.approx(v, rel=1e-4, abs=1e-9)
