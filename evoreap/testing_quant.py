"""Tiny pre-quantized checkpoints for tests and benchmarks, written the way the published ones are stored:

* ``fp8``: DeepSeek-V3 / Qwen3 "-FP8" -- every projection ``weight`` in float8_e4m3fn plus ``weight_scale_inv``
  (one scale per block, F32 like DeepSeek or BF16 like Qwen), routers, norms, embeddings and lm_head unquantized;
* ``mxfp4``: GPT-OSS -- fused experts as ``gate_up_proj_blocks``/``_scales`` and ``down_proj_blocks``/``_scales``
  (rows = output features), everything else unquantized;
* ``compressed-tensors``: llm-compressor's output, through :mod:`evoreap.export.quantize` (compressed-tensors' API).

The quantizers here write test fixtures only (the FP8 and MXFP4 ones are the formats' definitions, tested against
the dequantizers evoreap reads them with); evoreap never quantizes to FP8-block or MXFP4 itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from evoreap.checkpoint.quant import MXFP4

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8 weight, scale_inv)`` of ``w`` ([..., R, C]): per block, ``scale_inv = amax / 448``; the last block of
    a dimension that is not a multiple of the block is short."""
    w = w.to(torch.float32)
    if block is None:
        s = (w.abs().amax() / FP8_MAX).clamp(min=1e-12).reshape(())
        return (w / s).to(torch.float8_e4m3fn), s
    br, bc = block
    rows, cols = w.shape[-2:]
    pr, pc = -rows % br, -cols % bc
    p = torch.nn.functional.pad(w, (0, pc, 0, pr))
    v = p.unflatten(-2, (p.shape[-2] // br, br)).unflatten(-1, (p.shape[-1] // bc, bc))
    s = (v.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp(min=1e-12)
    full = s.repeat_interleave(br, -2)[..., :rows, :].repeat_interleave(bc, -1)[..., :cols]
    return (w / full).to(torch.float8_e4m3fn), s


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks, scales)`` of ``w`` ([..., R, C], C a multiple of 32): per 32 values an E8M0 exponent ``e`` with
    ``amax / 2**e <= 6``, each value rounded to the nearest E2M1 value, two per byte (low nibble first)."""
    k = MXFP4.BLOCK
    v = w.to(torch.float32).unflatten(-1, (w.shape[-1] // k, k))
    amax = v.abs().amax(-1, keepdim=True).clamp(min=2.0**-126)
    e = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    x = v / torch.exp2(e)
    idx = (x.abs().unsqueeze(-1) - _E2M1).abs().argmin(-1)
    code = idx + 8 * (x < 0).long() * (idx > 0).long()
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return packed, (e.squeeze(-1) + 127).to(torch.uint8)


def _fp8_targets(name: str, t: torch.Tensor) -> bool:
    module, _, leaf = name.rpartition(".")
    return leaf == "weight" and t.dim() == 2 and "proj" in module.rsplit(".", 1)[-1]


def _write(path: Path, tensors: dict[str, torch.Tensor], qconfig: dict[str, Any]) -> None:
    for f in path.glob("*.safetensors"):
        f.unlink()
    (path / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = qconfig
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def save_quantized(model: torch.nn.Module, path: str | Path, method: str, *, tokenizer: Any = None,
                   block: tuple[int, int] | None = (128, 128), scale_dtype: torch.dtype = torch.float32,
                   scheme: str = "W4A16", group_size: int | None = 32, kv_cache: bool = False) -> Path:
    """Save ``model`` (``save_pretrained``, so per-expert keys where transformers writes them) quantized by
    ``method`` (``fp8``, ``mxfp4`` or ``compressed-tensors`` with ``scheme``) into ``path``; returns ``path``.
    ``kv_cache`` adds FP8 KV-cache scales as llm-compressor calibrates them (``self_attn.k_scale`` / ``v_scale``, one
    float32 per layer, and ``kv_cache_scheme`` in the config)."""
    path = Path(path)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    files = sorted(path.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    out: dict[str, torch.Tensor] = {}
    if method == "fp8":
        for name, t in tensors.items():
            if _fp8_targets(name, t):
                q, s = quantize_fp8_block(t, block)
                out[name], out[f"{name}_scale_inv"] = q, s.to(scale_dtype)
            else:
                out[name] = t
        qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": list(block) if block else None}
    elif method == "mxfp4":
        for name, t in tensors.items():
            if ".experts." in name and name.endswith(("gate_up_proj", "down_proj")) and t.dim() == 3:
                # the model holds [E, in, out]; GPT-OSS stores rows = out features, 32-value blocks along in
                out[f"{name}_blocks"], out[f"{name}_scales"] = quantize_mxfp4(t.transpose(1, 2))
            else:
                out[name] = t
        qc = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    elif method == "compressed-tensors":
        from evoreap.export import quantize as q

        sch = q.make_scheme(scheme, group_size=group_size, block=block)
        ignore = sorted({n.rpartition(".")[0] for n, t in tensors.items()
                         if n.endswith(".weight") and t.dim() == 2 and not q.is_quantizable(n, t, set())})
        for name, t in tensors.items():
            if q.is_quantizable(name, t, set(ignore)):
                module = name.rpartition(".")[0]
                out.update({f"{module}.{k}": v for k, v in q.quantize_weight(t.to(scale_dtype), sch).items()})
            else:
                out[name] = t
        qc = q.quantization_config(sch, ignore)
    else:
        raise ValueError(f"unknown method {method!r}")
    if kv_cache:
        g = torch.Generator().manual_seed(11)
        for attn in sorted({n.split(".k_proj.")[0] for n in out if ".self_attn.k_proj." in n}):
            for leaf in ("k_scale", "v_scale"):
                out[f"{attn}.{leaf}"] = torch.rand(1, generator=g) * 0.01 + 0.001
        qc["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                                 "symmetric": True}
    _write(path, out, qc)
    return path
