"""Shared fixtures: small saved models that every command can load from disk (no hub)."""

import os
import shutil
from pathlib import Path

import pytest
import torch

DEMO = Path(__file__).resolve().parents[1] / "evoreap" / "demo" / "model"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """No test writes into the user's ~/.cache/evoreap (observations, references, weight hashes): the default
    cache root is a fresh directory for the session (subprocesses inherit it); tests name their own --cache-dir
    where they check what it holds."""
    os.environ["EVOREAP_CACHE"] = str(tmp_path_factory.mktemp("evoreap-cache"))


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory) -> Path:
    """A random-init Qwen3-MoE (4 layers x 8 experts, top-2) with the demo tokenizer, saved with save_pretrained.

    Small enough that a whole search runs in seconds, with a real tokenizer so that the bundled data works.
    """
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    path = tmp_path_factory.mktemp("small_moe")
    tok = AutoTokenizer.from_pretrained(DEMO)
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, intermediate_size=64, moe_intermediate_size=16,
                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():  # routers far from uniform, so that allocations differ measurably
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture()
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
