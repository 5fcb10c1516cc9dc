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

import os
from typing import Any

import torch

from evoreap.errors import EvoreapError, UsageError

# Schemes whose weights need no calibration data (weight-only, or activations quantized dynamically at run time).
SCHEMES = ("W4A16", "W4A16_ASYM", "W8A16", "FP8_DYNAMIC", "FP8_BLOCK")


def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise UsageError("--quantize needs compressed-tensors; install evoreap's quant extra: "
                         "pip install 'evoreap[quant]'") from None


def unsupported_scheme(name: str) -> str:
    """Why ``--quantize name`` is refused, in one line: a preset with static activation scales (they are
    calibrated on data, and evoreap's export does not calibrate), another compressed-tensors preset, or an unknown
    name."""
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES, preset_name_to_scheme

    key = name.upper()
    supported = ", ".join(SCHEMES)
    if key not in PRESET_SCHEMES:
        return f"--quantize {name!r} is not a compressed-tensors scheme; use one of {supported}"
    acts = preset_name_to_scheme(key, ["Linear"]).input_activations
    if acts is not None and acts.dynamic is not True:
        return (f"--quantize {key} quantizes activations with static scales, which must be calibrated on data; "
                f"evoreap's export does not calibrate: use {'FP8_DYNAMIC' if key == 'FP8' else 'one of ' + supported}"
                " (activation scales computed at run time), or quantize the pruned export with llm-compressor")
    return (f"--quantize {key} is a compressed-tensors preset that evoreap's export does not write; use one of "
            f"{supported}, or quantize the pruned export with llm-compressor")


def make_scheme(name: str, *, group_size: int | None = None, block: tuple[int, int] | None = None):
    """compressed-tensors' preset ``name`` targeting Linear layers, with an optional group size / block override
    (tiny test models are narrower than the presets' 128)."""
    _ct()
    from compressed_tensors.quantization import preset_name_to_scheme

    key = name.upper()
    if key not in SCHEMES:
        raise UsageError(unsupported_scheme(name))
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


def quantization_config(scheme, ignore: list[str], moe_counts: list[int | None] | None = None,
                        kv_cache_scheme: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` of a checkpoint compressed with ``scheme`` (``moe_counts``: per decoder layer the
    kept experts, None for dense layers, written as compressed-tensors' ``moe_sparsity_config``; ``kv_cache_scheme``:
    the source's, whose calibrated ``k_scale``/``v_scale`` are copied)."""
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignore), format=scheme_format(scheme),
                            quantization_status="compressed", kv_cache_scheme=kv_cache_scheme)
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


def planned_tensors(plan, quant=None):
    """``(name, tensor)`` of every planned tensor in full precision: a quantized source's weights (``quant``, its
    :class:`~evoreap.checkpoint.quant.QuantizedCheckpoint`) dequantized from their planned (sliced or renumbered)
    stored parts by the format's own dequantizer, under the plain name the export gives them; its scales and other
    companions are consumed by that. Dequantized weights are handed out in float32."""
    owner = {}
    if quant is not None:
        for g in quant.groups.values():
            for role, t in g.parts.items():
                owner[t.name] = (g, role)
    by_source = {t.source.name: t for t in plan.tensors}
    for t in plan.tensors:
        if t.source.name not in owner:
            yield t.name, _planned_tensor(t)
            continue
        g, role = owner[t.source.name]
        if g.roles[role] != "weight":
            continue  # read with its weight
        planned = {r: by_source.get(p.name) for r, p in g.parts.items()}
        missing = [g.parts[r].name for r, p in planned.items() if p is None]
        if missing:
            raise EvoreapError(f"{missing[0]} is not exported with its weight {t.source.name}; please report this")
        tensor = quant.format.dequantize(g, {r: _planned_tensor(p) for r, p in planned.items()})
        # the plain name with the export's renumbering: the stored name and the plain name share their stem
        src, plain = t.source.name, g.name
        stem = len(os.path.commonprefix([src, plain]))
        yield t.name[: len(t.name) - (len(src) - stem)] + plain[stem:], tensor


def kv_cache_scheme(quant) -> dict[str, Any] | None:
    """The source's ``kv_cache_scheme`` when it stores KV-cache scales and the scheme is a compressed-tensors one
    (copied into the new config with the scales); None otherwise (the scales are then not written)."""
    from compressed_tensors.quantization import QuantizationArgs

    kv = quant.format.config.get("kv_cache_scheme") if quant is not None and quant.kv_cache else None
    if not isinstance(kv, dict):
        return None
    try:
        QuantizationArgs.model_validate(kv)
        return kv
    except ValueError:
        return None


def write_quantized(out_dir, plan, scheme, *, max_shard_bytes: int, progress: bool = True, spec=None, quant=None,
                    dense_dtype: torch.dtype = torch.bfloat16, skip: set[str] = frozenset()) -> tuple[list[str], int]:
    """Write ``plan``'s tensors with every projection weight quantized by ``scheme`` (compressed), sharded as
    :func:`~evoreap.export.writer.write_checkpoint` does; one shard's tensors are in memory at a time. Fused expert
    tensors are written as per-expert Linear views (``spec``'s layout, :func:`evoreap.checkpoint.linear_experts.
    split_fused`), each quantized; a quantized source (``quant``) is dequantized first; tensors named in ``skip`` are
    left out. Returns the file names and the bytes written."""
    import json

    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from evoreap.checkpoint.linear_experts import split_fused
    from evoreap.checkpoint.reader import INDEX_NAME
    from evoreap.export.writer import shard_names

    if spec is None:
        fused = next((t.name for t in plan.tensors if len(t.shape) == 3 and ".experts." in f"{t.name}."), None)
        if fused:
            raise UsageError(f"--quantize of fused experts ({fused}) needs the architecture's layout; please report "
                             "this")
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
        for name, tensor in planned_tensors(plan, quant):
            if name in skip:
                bar.update()
                continue
            views = split_fused(spec, name, tensor) if spec is not None else None
            items = {}
            for n, v in (views or {name: tensor}).items():
                if is_quantizable(n, v, ignore):
                    module = n.rpartition(".")[0]
                    items.update({f"{module}.{k}": x for k, x in quantize_weight(v, scheme).items()})
                elif quant is not None and n not in quant.plain and v.is_floating_point():
                    items[n] = v.to(dense_dtype).contiguous()  # a dequantized weight that the scheme leaves dense
                else:
                    items[n] = v.contiguous()
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
