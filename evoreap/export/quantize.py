"""Prune, then quantize: ``evoreap export --quantize SCHEME`` writes a compressed-tensors checkpoint.

llm-compressor (0.14) pins transformers <= 5.17, so the weights are quantized with compressed-tensors' own API: the
scales from the weight's own min/max (``calculate_qparams``, the "minmax" observer; weight-only and dynamic-activation
schemes need no calibration data), the compressed tensors from the scheme's compressor (``pack-quantized``,
``float-quantized``), and the ``quantization_config`` from its ``QuantizationConfig``. Per-expert checkpoints are
quantized per expert Linear (``...experts.{e}.gate_proj.weight``), which is how llm-compressor unfuses transformers
5's fused experts; routers, embeddings, norms and ``lm_head`` stay unquantized and are named in ``ignore`` (transformers
5 routers are not Linear modules, so the ``Linear`` target alone would not exclude them on every loader).
"""

from __future__ import annotations

from typing import Any

import torch

from evoreap.errors import UsageError

# Schemes whose weights need no calibration data (weight-only, or activations quantized dynamically at run time).
SCHEMES = ("W4A16", "W4A16_ASYM", "W8A16", "FP8_DYNAMIC", "FP8_BLOCK")


def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise UsageError("--quantize needs compressed-tensors; install evoreap's quant extra: "
                         "pip install 'evoreap[quant]'") from None


def make_scheme(name: str, *, group_size: int | None = None, block: tuple[int, int] | None = None):
    """compressed-tensors' preset ``name`` targeting Linear layers, with an optional group size / block override
    (tiny test models are narrower than the presets' 128)."""
    _ct()
    from compressed_tensors.quantization import preset_name_to_scheme

    key = name.upper()
    if key not in SCHEMES:
        raise UsageError(f"--quantize {name!r} is not supported; use one of {', '.join(SCHEMES)} (schemes with "
                         "static activation scales need calibration, which evoreap does not run)")
    scheme = preset_name_to_scheme(key, ["Linear"])
    if group_size is not None and scheme.weights.group_size is not None:
        scheme.weights.group_size = int(group_size)
    if block is not None and scheme.weights.block_structure is not None:
        scheme.weights.block_structure = [int(block[0]), int(block[1])]
    return scheme


def scheme_format(scheme) -> str:
    from compressed_tensors.compressors.format import infer_module_format

    return infer_module_format(torch.nn.Linear, scheme).value


def weight_qparams(weight: torch.Tensor, scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of ``weight`` (``[out, in]``) from its min/max in the scheme's granularity."""
    from compressed_tensors.quantization import QuantizationStrategy as S
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, maybe_pad_tensor_for_block_quant

    a = scheme.weights
    rows, cols = weight.shape
    if a.strategy in (S.GROUP, S.TENSOR_GROUP):
        if cols % a.group_size:
            raise UsageError(f"group size {a.group_size} does not divide the {cols} input features of a weight; "
                             "choose a group size that divides every Linear's input width")
        v = weight.unflatten(-1, (cols // a.group_size, a.group_size))
        lo, hi = v.amin(-1), v.amax(-1)
    elif a.strategy == S.CHANNEL:
        lo, hi = weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
    elif a.strategy == S.BLOCK:
        br, bc = a.block_structure
        p = maybe_pad_tensor_for_block_quant(weight, (br, bc))
        v = p.unflatten(0, (p.shape[0] // br, br)).unflatten(-1, (p.shape[1] // bc, bc))
        lo, hi = v.amin((1, 3)), v.amax((1, 3))
    elif a.strategy == S.TENSOR:
        lo, hi = weight.amin(), weight.amax()
    else:
        raise UsageError(f"weight strategy {a.strategy} is not supported by --quantize")
    return calculate_qparams(lo, hi, a)


def quantize_weight(weight: torch.Tensor, scheme) -> dict[str, torch.Tensor]:
    """The compressed tensors (local names: ``weight_packed``, ``weight_scale``, ...) of one Linear weight."""
    from compressed_tensors.compressors import BaseCompressor

    scale, zero_point = weight_qparams(weight, scheme)
    comp = BaseCompressor.get_value_from_registry(scheme_format(scheme))
    out = comp.compress({"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}, scheme)
    return {k: v.contiguous() for k, v in out.items()}


def quantization_config(scheme, ignore: list[str], moe_counts: list[int | None] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` of a checkpoint compressed with ``scheme`` (``moe_counts``: per decoder layer the
    kept experts, None for dense layers, written as compressed-tensors' ``moe_sparsity_config``)."""
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignore), format=scheme_format(scheme),
                            quantization_status="compressed")
    out = qc.to_dict()
    out["quantization_status"] = "compressed"
    out["quant_method"] = "compressed-tensors"
    if moe_counts is not None:
        out["moe_sparsity_config"] = {"method": "prune", "num_experts": list(moe_counts)}
    else:
        out.pop("moe_sparsity_config", None)
    return out


def is_quantizable(name: str, tensor: torch.Tensor, ignore_modules: set[str]) -> bool:
    """A Linear weight that the scheme quantizes: a 2-D ``<module>.weight`` of a projection (``*_proj``, Mixtral's
    ``w1/w2/w3``), not a router, embedding, norm or ``lm_head`` (listed in ``ignore_modules``)."""
    module, _, leaf = name.rpartition(".")
    if leaf != "weight" or tensor.dim() != 2 or module in ignore_modules:
        return False
    last = module.rsplit(".", 1)[-1]
    return "proj" in last or last in ("w1", "w2", "w3")


def _planned_tensor(t) -> torch.Tensor:
    """The planned tensor ``t`` (an export TensorPlan: whole dim-0 rows of its source) read into memory, with its
    edit (repaired parameters) applied."""
    from evoreap.checkpoint.reader import TensorInfo, read_tensor

    shape = tuple(t.shape)
    row = t.nbytes // shape[0] if shape and shape[0] else t.nbytes
    parts = [read_tensor(TensorInfo(t.name, t.source.file, t.dtype, (n // row, *shape[1:]) if shape else (),
                                    off, off + n)) for off, n in t.ranges]
    tensor = (torch.cat(parts) if len(parts) > 1 else parts[0]).reshape(shape)
    transform = getattr(t, "transform", None)
    return transform(tensor) if transform is not None else tensor


def quantized_ignore(plan) -> list[str]:
    """Modules of ``plan`` with a 2-D weight that stay unquantized (routers, lm_head, embeddings, gates), named in
    ``ignore``."""
    return sorted({t.name.rpartition(".")[0] for t in plan.tensors if t.name.endswith(".weight")
                   and len(t.shape) == 2 and not is_quantizable(t.name, torch.empty(0, 0), set())})


def write_quantized(out_dir, plan, scheme, *, max_shard_bytes: int, progress: bool = True) -> tuple[list[str], int]:
    """Write ``plan``'s tensors with every projection weight quantized by ``scheme`` (compressed), sharded as
    :func:`~evoreap.export.writer.write_checkpoint` does; one shard's tensors are in memory at a time. Returns the
    file names and the bytes written."""
    import json

    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from evoreap.checkpoint.reader import INDEX_NAME
    from evoreap.export.writer import shard_names

    fused = next((t.name for t in plan.tensors if len(t.shape) == 3 and ".experts." in f"{t.name}."), None)
    if fused:
        raise UsageError(f"--quantize needs one Linear weight per expert, but this checkpoint stores its experts fused "
                         f"({fused}); export without --quantize, or quantize the export with llm-compressor")
    if any(t.dtype.startswith(("F8", "U8", "I32")) and t.name.endswith(".weight") for t in plan.tensors):
        raise UsageError("--quantize needs a full-precision source; this checkpoint is already quantized (export "
                         "keeps its format without --quantize)")
    ignore = set(quantized_ignore(plan))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, total = 0, 0
    tmp_names: list[str] = []

    def flush():
        nonlocal size
        name = f".shard-{len(tmp_names)}.safetensors"
        save_file(shards[-1], str(out_dir / name), metadata={"format": "pt"})
        tmp_names.append(name)
        shards[-1] = {}
        size = 0

    weight_map: dict[str, int] = {}
    with tqdm(total=len(plan.tensors), unit="tensor", desc="Quantizing", disable=not progress) as bar:
        for t in plan.tensors:
            tensor = _planned_tensor(t)
            if is_quantizable(t.name, tensor, ignore):
                module = t.name.rpartition(".")[0]
                items = {f"{module}.{k}": v for k, v in quantize_weight(tensor, scheme).items()}
            else:
                items = {t.name: tensor.contiguous()}
            nbytes = sum(v.numel() * v.element_size() for v in items.values())
            if shards[-1] and size + nbytes > max_shard_bytes:
                flush()
            shards[-1].update(items)
            weight_map.update(dict.fromkeys(items, len(tmp_names)))
            size += nbytes
            total += nbytes
            bar.update()
    if shards[-1] or not tmp_names:
        flush()
    names = shard_names(len(tmp_names))
    for tmp, final in zip(tmp_names, names):
        (out_dir / tmp).rename(out_dir / final)
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in weight_map.items()}}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names, total
