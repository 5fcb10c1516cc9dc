"""Pre-quantized checkpoints: which quantization a checkpoint uses, and its tensors read back in full precision.

Three families are understood, each a :class:`QuantFormat` registered under its ``quantization_config.quant_method``:

* ``fp8`` -- block-scaled FP8 as DeepSeek-V3/R1 and the Qwen3/GLM "-FP8" releases store it: ``<name>`` in
  ``float8_e4m3fn`` plus ``<name>_scale_inv`` (F32 at DeepSeek, BF16 at Qwen), one scale per
  ``weight_block_size`` block, the last block of a row or column cut short where a dimension is not a multiple of the
  block (DeepSeek-V3's ``kv_a_proj_with_mqa`` has 576 rows);
* ``mxfp4`` -- GPT-OSS experts: ``<name>_blocks`` (uint8, two E2M1 values a byte, 32 values a block) plus
  ``<name>_scales`` (uint8 E8M0 exponents, one a block), fused with the experts on dim 0; dequantized by
  transformers' own ``convert_moe_packed_tensors``, which also transposes into the model's layout;
* ``compressed-tensors`` -- what llm-compressor writes: per quantized Linear ``weight_packed``/``weight_scale``/
  ``weight_shape`` (pack-quantized, e.g. W4A16), ``weight``/``weight_scale`` (float- or int-quantized, e.g. FP8),
  optional zero points; dequantized by compressed-tensors' own compressors (the optional ``quant`` extra).

:class:`QuantizedCheckpoint` shows a quantized :class:`~evoreap.checkpoint.reader.CheckpointIndex` as the
full-precision checkpoint it encodes: the quantized weight under its plain name (``...down_proj.weight``,
``...experts.gate_up_proj``), its scales and other companions hidden behind it. Model loading, observe ``--offload``
and the preflight read it through that view; export copies the stored tensors themselves, byte for byte.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evoreap.checkpoint.reader import CheckpointIndex, TensorInfo, read_tensor
from evoreap.errors import EvoreapError, UsageError
from evoreap.registry import Registry

WEIGHT, SCALE, AUX = "weight", "scale", "aux"  # roles of the stored tensors behind one quantized weight
# Attention / KV-cache quantization parameters (compressed-tensors' ``kv_cache_scheme``: ``self_attn.k_scale`` and
# ``v_scale``, ``q_scale`` with quantized attention, zero points when asymmetric; AutoFP8's single ``kv_scale``):
# calibrated scales of the cache, not model weights; dequantized models never read them, export copies them.
KV_CACHE_PARAMS = ("k_scale", "v_scale", "q_scale", "k_zero_point", "v_zero_point", "q_zero_point", "kv_scale")


@dataclass(frozen=True)
class QuantGroup:
    """One quantized weight: its plain (dequantized) name and the stored tensors it is made of.

    ``parts`` maps each stored tensor's role name in its format (``weight``, ``weight_scale_inv``, ``blocks``,
    ``weight_packed``, ...) to where it lies; ``roles`` maps the same names to :data:`WEIGHT`, :data:`SCALE` or
    :data:`AUX` (packed shapes, zero points, activation scales)."""

    name: str
    parts: dict[str, TensorInfo]
    roles: dict[str, str]
    scheme: Any = None  # the compressed-tensors QuantizationScheme, None for the other formats

    def stored(self) -> list[TensorInfo]:
        return list(self.parts.values())

    def bytes_by_role(self) -> dict[str, int]:
        out = {WEIGHT: 0, SCALE: 0, AUX: 0}
        for k, t in self.parts.items():
            out[self.roles[k]] += t.nbytes
        return out


class QuantFormat:
    """A quantization method: how to find a checkpoint's quantized weights, check them and dequantize them."""

    method = ""

    def __init__(self, config: dict[str, Any]):
        self.config = config

    def describe(self) -> dict[str, Any]:
        """``method``, ``format``, ``block`` (block or group size, None where not blocked) for inspect."""
        raise NotImplementedError

    def label(self) -> str:
        """A short stable description, recorded in observation identities (``fp8 e4m3 block 128x128``)."""
        d = self.describe()
        block = "x".join(str(b) for b in d["block"]) if d.get("block") else ""
        return " ".join(str(x) for x in (d["method"], d["format"], f"block {block}" if block else "") if x)

    def group(self, index: CheckpointIndex) -> tuple[dict[str, QuantGroup], set[str]]:
        """The quantized weights of ``index`` under their plain names, and every stored name they consume."""
        raise NotImplementedError

    def check(self, g: QuantGroup, read) -> None:
        """Raise EvoreapError when ``g``'s scales or companions do not fit its weight (``read(info)`` reads a small
        tensor such as a packed shape)."""

    def dequantize(self, g: QuantGroup, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 weight encoded by ``tensors`` (role name -> tensor)."""
        raise NotImplementedError


FORMATS: Registry[type[QuantFormat]] = Registry("quantization method", quote=True)


def register_format(cls: type[QuantFormat]) -> type[QuantFormat]:
    FORMATS.add(cls.method, cls)
    return cls


def _mismatch(path: Path | str, what: str) -> EvoreapError:
    return EvoreapError(f"{path}: {what}; the checkpoint's scales do not match its weights (re-download or "
                        "re-quantize it)")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# -- FP8, block-scaled ---------------------------------------------------------------------------------------------
def dequantize_fp8_block(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``weight`` (``[..., R, C]`` FP8) times its per-block ``scale`` (``[..., ceil(R/br), ceil(C/bc)]``; a single
    scale when ``block`` is None), in ``dtype``.

    Written here rather than taken from transformers, whose FP8 dequantizer (5.24) infers the block from the scale
    grid and is wrong where a dimension is not a multiple of the block (576 rows: fails, 192 rows: 2% off); the scale
    grid is expanded and cut to the weight's shape, which is what compressed-tensors' padded dequantizer computes
    (tested against it), and it takes the fused ``[E, R, C]`` expert tensors of transformers 5 saves as well."""
    w = weight.to(torch.float32)
    s = scale.to(torch.float32)
    if block is None:
        return (w * s).to(dtype)
    rows, cols = w.shape[-2:]
    full = s.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]
    return (w * full).to(dtype)


@register_format
class FP8Block(QuantFormat):
    """``quant_method: fp8`` (transformers' FineGrainedFP8 format)."""

    method = "fp8"

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        block = config.get("weight_block_size")
        if block is not None and (not isinstance(block, list | tuple) or len(block) != 2
                                  or not all(type(b) is int and b > 0 for b in block)):
            raise UsageError(f"quantization_config.weight_block_size is {block!r}; it must be two positive integers "
                             "(e.g. [128, 128]) or null; fix config.json")
        self.block = tuple(block) if block is not None else None
        fmt = config.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise UsageError(f"quantization_config.fmt {fmt!r} is not supported; evoreap reads FP8 e4m3 "
                             "checkpoints")

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "format": "float8_e4m3fn", "block": list(self.block) if self.block else None,
                "activation_scheme": self.config.get("activation_scheme")}

    def group(self, index):
        groups, consumed = {}, set()
        for name, t in index.tensors.items():
            if not name.endswith("_scale_inv"):
                continue
            base = name[: -len("_scale_inv")]
            w = index.tensors.get(base)
            if w is None:
                raise _mismatch(t.file, f"{name} has no weight {base} to scale")
            groups[base] = QuantGroup(base, {"weight": w, "weight_scale_inv": t},
                                      {"weight": WEIGHT, "weight_scale_inv": SCALE})
            consumed |= {base, name}
            act = base.rsplit(".", 1)[0] + ".input_scale" if base.endswith(".weight") else None
            if act and act in index.tensors:  # static activation scales: irrelevant once weights are dequantized
                groups[base].parts["input_scale"] = index.tensors[act]
                groups[base].roles["input_scale"] = AUX
                consumed.add(act)
        return groups, consumed

    def check(self, g, read):
        w, s = g.parts["weight"], g.parts["weight_scale_inv"]
        if w.dtype != "F8_E4M3":
            raise _mismatch(w.file, f"{w.name} is {w.dtype}, not F8_E4M3, yet has a weight_scale_inv")
        if len(w.shape) < 2:
            raise _mismatch(w.file, f"{w.name} has shape {list(w.shape)}; FP8 block scaling needs a matrix")
        if self.block is None:
            if s.numel != 1:
                raise _mismatch(w.file, f"{s.name} has {s.numel} scales, but without weight_block_size one scale "
                                        "per tensor is expected")
            return
        rows, cols = w.shape[-2:]
        want = (*w.shape[:-2], _cdiv(rows, self.block[0]), _cdiv(cols, self.block[1]))
        if tuple(s.shape) != want:
            raise _mismatch(w.file, f"{s.name} has shape {list(s.shape)}, but {w.name} {list(w.shape)} in "
                                    f"{self.block[0]}x{self.block[1]} blocks needs {list(want)}")

    def dequantize(self, g, tensors):
        return dequantize_fp8_block(tensors["weight"], tensors["weight_scale_inv"], self.block)


# -- MXFP4 (GPT-OSS) -----------------------------------------------------------------------------------------------
@register_format
class MXFP4(QuantFormat):
    """``quant_method: mxfp4``: ``<name>_blocks`` + ``<name>_scales``, 32 E2M1 values per E8M0 scale."""

    method = "mxfp4"
    BLOCK = 32

    def describe(self):
        return {"method": self.method, "format": "mxfp4 (e2m1 values, e8m0 scales)", "block": [1, self.BLOCK]}

    def group(self, index):
        groups, consumed = {}, set()
        for name, t in index.tensors.items():
            if not name.endswith("_blocks"):
                continue
            base = name[: -len("_blocks")]
            s = index.tensors.get(f"{base}_scales")
            if s is None:
                raise _mismatch(t.file, f"{name} has no {base}_scales")
            groups[base] = QuantGroup(base, {"blocks": t, "scales": s}, {"blocks": WEIGHT, "scales": SCALE})
            consumed |= {name, s.name}
        orphan = next((n for n in index.tensors if n.endswith("_scales") and n not in consumed), None)
        if orphan:
            raise _mismatch(index.tensors[orphan].file, f"{orphan} has no {orphan[:-len('_scales')]}_blocks")
        return groups, consumed

    def check(self, g, read):
        b, s = g.parts["blocks"], g.parts["scales"]
        if b.dtype != "U8" or s.dtype != "U8":
            raise _mismatch(b.file, f"{b.name} ({b.dtype}) and {s.name} ({s.dtype}) must both be U8 in MXFP4")
        if len(b.shape) != 4 or b.shape[-1] * 2 != self.BLOCK:
            raise _mismatch(b.file, f"{b.name} has shape {list(b.shape)}; MXFP4 expert blocks are "
                                    f"[experts, rows, groups, {self.BLOCK // 2}]")
        if tuple(s.shape) != tuple(b.shape[:-1]):
            raise _mismatch(b.file, f"{s.name} has shape {list(s.shape)}, but {b.name} {list(b.shape)} needs one "
                                    f"scale per block: {list(b.shape[:-1])}")

    def dequantize(self, g, tensors):
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # lazy: transformers is heavy

        # [E, R, G, 16] -> [E, G*32, R]: transformers' GPT-OSS layout, transposed against the stored rows
        return convert_moe_packed_tensors(tensors["blocks"], tensors["scales"], dtype=torch.float32)


# -- compressed-tensors --------------------------------------------------------------------------------------------
def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise UsageError("this checkpoint is in the compressed-tensors format; install evoreap's quant extra: "
                         "pip install 'evoreap[quant]'") from None


@register_format
class CompressedTensors(QuantFormat):
    """``quant_method: compressed-tensors`` (llm-compressor's output), through compressed-tensors' compressors."""

    method = "compressed-tensors"

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        _ct()
        import pydantic
        from compressed_tensors.quantization import QuantizationConfig

        try:
            self.qc = QuantizationConfig.model_validate({k: v for k, v in config.items() if k != "quant_method"})
        except pydantic.ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err.get("loc", ()))
            raise UsageError(f"quantization_config is not a valid compressed-tensors config ({where}: "
                             f"{err.get('msg')}); fix config.json") from None

    def _schemes(self):
        if getattr(self, "_cached", None) is None:
            self._cached = self._resolve_schemes()
        return self._cached

    def _resolve_schemes(self):
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.compressors.format import infer_module_format
        from compressed_tensors.config import CompressionFormat

        out = []
        for scheme in self.qc.config_groups.values():
            if scheme.weights is None:
                continue
            fmt = scheme.format or self.qc.format
            if fmt in (None, CompressionFormat.mixed_precision.value, CompressionFormat.mixed_precision):
                fmt = infer_module_format(torch.nn.Linear, scheme)
            fmt = CompressionFormat(fmt).value
            try:
                comp = BaseCompressor.get_value_from_registry(fmt)
            except Exception:
                raise UsageError(f"compressed-tensors format {fmt!r} has no compressor in this version of "
                                 "compressed-tensors") from None
            out.append((scheme, fmt, comp))
        return out

    def describe(self):
        groups = []
        for scheme, fmt, _ in self._schemes():
            w = scheme.weights
            block = (list(w.block_structure) if w.block_structure else [1, w.group_size] if w.group_size else None)
            groups.append({"format": fmt, "targets": list(scheme.targets), "num_bits": w.num_bits,
                           "type": str(w.type.value if hasattr(w.type, "value") else w.type),
                           "strategy": str(w.strategy.value if hasattr(w.strategy, "value") else w.strategy),
                           "symmetric": w.symmetric, "block": block})
        first = groups[0] if groups else {"format": "dense", "block": None}
        return {"method": self.method, "format": ",".join(dict.fromkeys(g["format"] for g in groups)) or "dense",
                "block": first["block"],
                "scheme": [f"{g['type']}{g['num_bits']} {g['strategy']}" + ("" if g["symmetric"] else " asym")
                           for g in groups],
                "ignore": list(self.qc.ignore or [])}

    def _scheme_of(self, module: str, schemes):
        from compressed_tensors.utils.match import match_name

        if any(match_name(module, ig) for ig in self.qc.ignore or []):
            return None
        for scheme, fmt, comp in schemes:
            if "Linear" in scheme.targets or any(match_name(module, t) for t in scheme.targets):
                return scheme, fmt, comp
        return None

    def group(self, index):
        from compressed_tensors.quantization import QuantizationMetadata

        schemes = self._schemes()
        qparams = set(QuantizationMetadata.all_qparam_names())
        groups, consumed = {}, set()
        modules = dict.fromkeys(n.rsplit(".", 1)[0] for n in index.tensors
                                if n.endswith((".weight_packed", ".weight_scale")))
        for module in modules:
            found = self._scheme_of(module, schemes)
            if found is None:
                continue
            scheme, fmt, comp = found
            names = comp.compression_param_names(scheme)
            parts, roles = {}, {}
            for p in names:
                t = index.tensors.get(f"{module}.{p}")
                if t is None:
                    raise _mismatch(next(iter(index.tensors.values())).file,
                                    f"{module} is quantized as {fmt} but has no {p}")
                parts[p] = t
                roles[p] = WEIGHT if p == names[0] else SCALE if p.endswith("scale") else AUX
            for n in list(index.tensors):  # activation qparams of this module: not needed once weights are dense
                mod, _, leaf = n.rpartition(".")
                if mod == module and leaf in qparams and leaf not in parts:
                    parts[leaf], roles[leaf] = index.tensors[n], AUX
            groups[f"{module}.weight"] = QuantGroup(f"{module}.weight", parts, roles, scheme)
            consumed |= {t.name for t in parts.values()}
        return groups, consumed

    def check(self, g, read):
        from compressed_tensors.quantization import QuantizationStrategy as S

        w = g.scheme.weights
        if "weight_shape" in g.parts:
            shape = tuple(int(x) for x in read(g.parts["weight_shape"]).tolist())
            packed = g.parts["weight_packed"]
            want_cols = math.ceil(shape[-1] * w.num_bits / 32) if len(shape) == 2 else -1
            if len(shape) != 2 or tuple(packed.shape) != (shape[0], want_cols):
                raise _mismatch(packed.file, f"{packed.name} has shape {list(packed.shape)}, but weight_shape "
                                             f"{list(shape)} at {w.num_bits} bits needs [{shape[0]}, {want_cols}]")
        else:
            shape = tuple(g.parts["weight"].shape)
        if len(shape) != 2:
            raise _mismatch(g.parts[next(iter(g.parts))].file, f"{g.name} has shape {list(shape)}; expected a matrix")
        rows, cols = shape
        s = g.parts["weight_scale"]
        strategy = w.strategy
        if strategy == S.GROUP or strategy == S.TENSOR_GROUP:
            if cols % w.group_size:
                raise UsageError(f"{s.file}: group_size {w.group_size} does not divide the {cols} input features "
                                 f"of {g.name}; the checkpoint cannot be read as grouped quantization")
            want = (rows, cols // w.group_size)
        elif strategy == S.CHANNEL:
            want = (rows, 1)
        elif strategy == S.BLOCK:
            br, bc = w.block_structure
            want = (_cdiv(rows, br), _cdiv(cols, bc))
        else:
            want = None
        if want is None:
            if s.numel != 1:
                raise _mismatch(s.file, f"{s.name} has shape {list(s.shape)}; tensor-wise scaling has one scale")
        elif tuple(s.shape) != want:
            raise _mismatch(s.file, f"{s.name} has shape {list(s.shape)}, but {g.name} {list(shape)} quantized "
                                    f"{strategy.value if hasattr(strategy, 'value') else strategy} needs {list(want)}")

    def dequantize(self, g, tensors):
        from compressed_tensors.compressors import BaseCompressor

        _, fmt, comp = self._scheme_of(g.name.rsplit(".", 1)[0], self._schemes())
        # scales in float32: with BF16 scales compressed-tensors would multiply in bf16 and round the products (a
        # 4-bit integer times a bf16 scale needs 11 mantissa bits), while float32 holds them exactly
        state = {k: v.float() if k.endswith("scale") and v.is_floating_point() else v for k, v in tensors.items()
                 if k in comp.compression_param_names(g.scheme)}
        return BaseCompressor.get_value_from_registry(fmt).decompress(state, g.scheme)["weight"].to(torch.float32)


# -- detection and the dequantized view ----------------------------------------------------------------------------
def quantization_config(config: Any) -> dict[str, Any] | None:
    """A config's ``quantization_config`` as a plain dict (from a transformers config object or a raw
    ``config.json`` dict, with a nested ``text_config`` too); None when the model is not quantized."""
    if isinstance(config, dict):
        qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    else:
        qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    return qc


def detect(config: Any) -> QuantFormat | None:
    """The :class:`QuantFormat` a config's ``quantization_config`` names; None for a full-precision model. An
    unknown ``quant_method`` raises UsageError."""
    qc = quantization_config(config)
    if qc is None:
        return None
    method = qc.get("quant_method")
    cls = FORMATS.find(str(method)) if isinstance(method, str) else None
    if cls is None:
        raise UsageError(f"quantization_config.quant_method {method!r} is not supported; evoreap reads "
                         f"{', '.join(FORMATS.names())} checkpoints (dequantize it to bf16 first)")
    return cls(qc)


def quant_label(config: Any) -> str | None:
    """:meth:`QuantFormat.label` of a config, None when it is not quantized (for observation identities); a method
    evoreap cannot read from disk (a model quantized in memory, e.g. bitsandbytes) is named by its quant_method."""
    try:
        fmt = detect(config)
    except UsageError:
        return str((quantization_config(config) or {}).get("quant_method"))
    return fmt.label() if fmt is not None else None


@dataclass
class QuantizedCheckpoint:
    """A quantized checkpoint seen as the full-precision checkpoint it encodes (see the module docstring)."""

    index: CheckpointIndex
    format: QuantFormat
    groups: dict[str, QuantGroup] = field(default_factory=dict)
    plain: dict[str, TensorInfo] = field(default_factory=dict)
    # per-expert Linear tensors of a family stored fused on disk (a compressed-tensors export of GPT-OSS), shown as
    # the fused parameters the model has (evoreap.checkpoint.linear_experts)
    fused: Any = None
    kv_cache: dict[str, TensorInfo] = field(default_factory=dict)  # KV-cache scales, hidden from the model's view

    @classmethod
    def of(cls, index: CheckpointIndex, fmt: QuantFormat, spec: Any = None) -> QuantizedCheckpoint:
        """The view of ``index`` quantized by ``fmt``; ``spec`` (the architecture's ArchSpec) lets per-expert Linear
        tensors of a fused-on-disk family read back as its fused parameters."""
        groups, consumed = fmt.group(index)
        self = cls(index, fmt, groups, {n: t for n, t in index.tensors.items() if n not in consumed})
        clash = next((n for n in groups if n in self.plain), None)
        if clash:
            raise _mismatch(index.directory, f"{clash} is stored both quantized and in full precision")
        for g in groups.values():
            fmt.check(g, read_tensor)
        self.kv_cache = {n: t for n, t in self.plain.items() if n.rpartition(".")[2] in KV_CACHE_PARAMS}
        for n in self.kv_cache:
            del self.plain[n]
        if spec is not None and not spec.disk_expert_names:
            from evoreap.checkpoint.linear_experts import FusedView

            view = FusedView(spec, [*self.plain, *self.groups])
            self.fused = view if view.members else None
        return self

    def names(self) -> list[str]:
        if self.fused is None:
            return [*self.plain, *self.groups]
        hidden = self.fused.consumed()
        return [n for n in (*self.plain, *self.groups) if n not in hidden] + self.fused.names()

    def __contains__(self, name: str) -> bool:
        if self.fused is not None and name in self.fused.members:
            return True
        return name in self.plain or name in self.groups

    def get(self, name: str) -> torch.Tensor:
        """The full-precision tensor ``name`` (float32 for a dequantized weight, the stored dtype otherwise)."""
        if name in self.plain:
            return read_tensor(self.plain[name])
        if self.fused is not None and name in self.fused.members:
            return self.fused.get(name, self.get)
        g = self.groups[name]
        return self.format.dequantize(g, {k: read_tensor(t) for k, t in g.parts.items()})

    def stored(self, name: str) -> list[TensorInfo]:
        """The stored tensors behind plain name ``name``."""
        if self.fused is not None and name in self.fused.members:
            return [t for n in self.fused.parts(name) for t in self.stored(n)]
        return [self.plain[name]] if name in self.plain else self.groups[name].stored()

    def role_of(self) -> dict[str, str]:
        """Every stored tensor's role: :data:`WEIGHT`, :data:`SCALE` or :data:`AUX` (plain tensors: WEIGHT)."""
        out = dict.fromkeys(self.plain, WEIGHT) | dict.fromkeys(self.kv_cache, SCALE)
        for g in self.groups.values():
            out.update({t.name: g.roles[k] for k, t in g.parts.items()})
        return out


def read_raw_config(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def open_quantized(directory: str | Path, index: CheckpointIndex | None = None,
                   config: Any = None) -> QuantizedCheckpoint | None:
    """The dequantized view of the checkpoint in ``directory`` when its config names a quantization, else None."""
    config = config if config is not None else (read_raw_config(directory) or {})
    fmt = detect(config)
    if fmt is None:
        return None
    return QuantizedCheckpoint.of(index if index is not None else CheckpointIndex(directory), fmt, spec_of(config))


def spec_of(config: Any):
    """The registered ArchSpec of a config object or raw ``config.json`` dict; None for an unknown model type."""
    from evoreap.adapters.spec import BY_MODEL_TYPE

    if isinstance(config, dict):
        model_type = (config.get("text_config") or {}).get("model_type") or config.get("model_type")
    else:
        from evoreap.adapters import text_config

        model_type = getattr(text_config(config), "model_type", None)
    return BY_MODEL_TYPE.find(model_type) if isinstance(model_type, str) else None


def expert_stored_bits(directory: str | Path | None, adapter: Any) -> float | None:
    """Bits per routed-expert parameter as a quantized checkpoint stores them (weights plus their scales, packed
    shapes and zero points), for ``--budget-gb``; None for a full-precision checkpoint or anything but a local
    directory (there ``--bits`` plans the size)."""
    if directory is None or not Path(directory).is_dir():
        return None
    fmt = detect(read_raw_config(directory) or {})
    if fmt is None:
        return None
    from evoreap.checkpoint.layout import KeyLayout  # layout imports the adapters; only needed here

    index = CheckpointIndex(directory)
    layout = KeyLayout(adapter.spec)
    moe = set(adapter.moe_layer_indices)
    stored = 0
    for t in index:
        key = layout.parse(t.name)
        if key is not None and not key.is_router and key.layer in moe:
            stored += t.nbytes
    params = adapter.num_experts * adapter.expert_params() * len(moe)
    return 8 * stored / params if params else None
