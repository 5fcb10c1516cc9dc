"""The exported model card (huggingface_hub ModelCard): base model as a hub id, the source's license, the full
observation key, calibration sources, budget in fraction/parameters/bytes, held-out results as model-index."""

import json
import shutil

from huggingface_hub import ModelCard

from evoreap.api import export, observe
from evoreap.export.card import base_model_id


def test_card_carries_what_people_share(small_model_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(small_model_dir, src)
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# the source model\n")
    cache = str(tmp_path / "cache")
    obs = observe(str(src), "code", tokens=256, seq_len=64, cache_dir=cache, progress=False)
    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps({"layers": {"0": 2, "1": 4, "2": 6, "3": 8},
                                 "meta": {"heldout": {"nll": 3.5, "kl": 0.25}, "heldout_data": "demo"}}))
    result = export(alloc, tmp_path / "out", model=src, observation=obs.key[:8], cache_dir=cache,
                    base_model="Owner/Base-MoE", progress=False)
    card = ModelCard.load(result.out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "Owner/Base-MoE" and data["license"] == "apache-2.0"
    assert {"moe", "expert-pruning", "evoreap", "non-uniform-experts"} <= set(data["tags"])
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"nll": 3.5, "kl": 0.25}
    text = card.text
    assert obs.key in text  # the full key, not the 8 characters typed
    assert "| routed experts | 32 | 20 (62.5%) |" in text
    assert f"| parameters (all stored weights) | {result.elements_before:,} | {result.elements_after:,}" in text
    assert "`code@calibration`: " in text and "256 tokens" in text
    assert "hf upload" in text
    record = json.loads((result.out / "evoreap.json").read_text())
    assert record["observation_key"] == obs.key and record["calibration"]["sources"][0]["tokens"] == 256


def test_base_model_id_from_the_source():
    assert base_model_id({"base_model": "/x"}, {"_name_or_path": "Qwen/Qwen3-30B-A3B"}) == "Qwen/Qwen3-30B-A3B"
    assert base_model_id({"base_model": "/h/models--Qwen--Qwen3-30B-A3B/snapshots/abc"}, {}) == "Qwen/Qwen3-30B-A3B"
    assert base_model_id({"base_model": "/some/local/dir"}, {"_name_or_path": "/some/local/dir"}) is None
