"""Tiny random-init models of every supported architecture, built from configs (no network). For tests and
benchmarks; seeded, so two calls give the same weights."""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from evoreap.adapters import MoEAdapter

ARCHITECTURES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "glm4_moe", "gpt_oss")

_COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, max_position_embeddings=256, tie_word_embeddings=False)


def tiny_config(model_type: str, **overrides: Any):
    """A small config of ``model_type`` with non-default routing options switched on where the family has them."""
    if model_type == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, intermediate_size=64,
                                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1], **_COMMON)
    elif model_type == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(num_experts=12, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64,
                                shared_expert_intermediate_size=48, norm_topk_prob=False, decoder_sparse_step=2,
                                **_COMMON)
    elif model_type == "mixtral":
        cfg = tf.MixtralConfig(num_local_experts=8, num_experts_per_tok=2, intermediate_size=48, **_COMMON)
    elif model_type == "olmoe":
        cfg = tf.OlmoeConfig(num_experts=16, num_experts_per_tok=4, intermediate_size=32, norm_topk_prob=False,
                             **{k: v for k, v in _COMMON.items() if k != "head_dim"})
    elif model_type == "deepseek_v3":
        cfg = tf.DeepseekV3Config(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                                  routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=1,
                                  moe_intermediate_size=32, intermediate_size=64, first_k_dense_replace=1,
                                  q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                  v_head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                  # MLA with fewer KV heads than heads fails in SDPA on padded batches
                                  **{k: v for k, v in _COMMON.items() if k != "head_dim"} | {"num_key_value_heads": 4})
    elif model_type == "glm4_moe":
        cfg = tf.Glm4MoeConfig(n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1,
                               routed_scaling_factor=1.5, norm_topk_prob=True, n_shared_experts=1,
                               moe_intermediate_size=32, intermediate_size=64, first_k_dense_replace=1, **_COMMON)
    elif model_type == "gpt_oss":
        cfg = tf.GptOssConfig(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32,
                              layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=32, **_COMMON)
    else:
        raise ValueError(f"no tiny config for {model_type!r}; known: {', '.join(ARCHITECTURES)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random-init causal LM of ``model_type`` in fp32, eval mode. Routers get a larger init than the default
    0.02 so that routing is far from uniform and saliency rankings mean something; router biases get random values."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    adapter = MoEAdapter.for_model(model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in adapter.layers(model):
            layer.router.weight.normal_(0.0, 0.3, generator=g)
            for name in ("bias", "e_score_correction_bias"):
                b = getattr(layer.router, name, None)
                if b is not None:
                    b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            for p in layer.experts.parameters():
                p.normal_(0.0, 0.1, generator=g)
    return model.eval()
