"""Repaired parameters on disk and in use: the :class:`Repair` record, its safetensors file, applying it to a
resident model (``with applied(...)``) and to an export (:func:`export_edits`).

A repair file holds full replacement values of a few model tensors, named as the model names them (router weights,
router biases, the norm before each MoE block), plus per pruned layer one ``<experts>.output_scale`` ``[E]`` (each
expert's output rescaled) and/or a low-rank update of every expert's down projection, ``<experts>.down_proj_lowrank_b``
``[E, D0, r]`` and ``<experts>.down_proj_lowrank_a`` ``[E, r, D1]`` for a ``down_proj`` of ``[E, D0, D1]`` (in the
model's own layout, transposed or not). Router and norm values are stored in the checkpoint's own dtype, so that an
export writes exactly the values the repaired masked model computes with; scales and low-rank factors stay float32
and are merged into ``down_proj`` (and the scale into its bias) as ``(W + B @ A) * s``, rounded to that dtype in both
places the same way (:func:`merge_down`), so an export is a plain checkpoint with no extra tensors.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evoreap.adapters import MoEAdapter
from evoreap.checkpoint import CheckpointIndex, KeyLayout
from evoreap.checkpoint.quant import quantization_config, read_raw_config
from evoreap.errors import EvoreapError, UsageError
from evoreap.files import sha256_json, shareable
from evoreap.fingerprint import weights_fingerprint

FORMAT = "evoreap-repair"
VERSION = 1
SCALE = "output_scale"  # suffix of a per-expert output scale: "<experts module>.output_scale"
LOWRANK_A = "down_proj_lowrank_a"  # "<experts module>.down_proj_lowrank_a": [E, r, D1]
LOWRANK_B = "down_proj_lowrank_b"  # "<experts module>.down_proj_lowrank_b": [E, D0, r], zero at the start
FOLDED = (SCALE, LOWRANK_A, LOWRANK_B)  # float32 tensors merged into down_proj rather than model tensors
SUFFIX = ".repair.safetensors"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def allocation_fingerprint(kept: dict[int, list[int]]) -> str:
    """sha256 of the kept experts per layer: what a repair is fitted to (counts alone do not say which experts)."""
    return sha256_json({"kept": {str(layer): [int(i) for i in idx] for layer, idx in sorted(kept.items())}})


def repair_path(allocation_path: str | Path) -> Path:
    """Where the repair of the allocation file ``allocation_path`` lives: beside it, ``NAME.repair.safetensors``."""
    p = Path(allocation_path)
    return p.with_name(p.name[:-len(p.suffix)] + SUFFIX if p.suffix else p.name + SUFFIX)


@dataclass(frozen=True, eq=False)
class Repair:
    """Fitted replacement values of some of a model's tensors for one set of kept experts.

    Attributes:
        tensors: model tensor name -> full replacement (router rows of cut experts are left as they were), or
            ``<experts>.output_scale`` -> ``[E]`` float32 scale of each expert's output, or the float32 low-rank
            factors ``<experts>.down_proj_lowrank_b`` / ``_a`` of each expert's down projection update.
        meta: ``model_fingerprint``, ``allocation_fingerprint``, ``kept``, ``params``, ``objective``, ``accepted``,
            ``storage_dtype``, the search-split values before and after, the fitting history and settings.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def accepted(self) -> bool:
        return bool(self.meta.get("accepted"))

    @property
    def storage_dtype(self) -> torch.dtype:
        return _DTYPES[self.meta["storage_dtype"]]

    @property
    def kept(self) -> dict[int, list[int]]:
        return {int(k): list(v) for k, v in self.meta["kept"].items()}

    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary file beside it, then rename); the meta travels in the safetensors header."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}, tmp,
                      metadata={"format": FORMAT, "version": str(VERSION), "meta": json.dumps(self.meta)})
            shareable(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> Repair:
        """Read and check a repair file (EvoreapError naming the file when it is not one)."""
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"repair file {path} does not exist; run evoreap repair --allocation FILE first")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise EvoreapError(f"cannot read repair file {path} ({e}); delete it and run evoreap repair "
                               "again") from None
        if header.get("format") != FORMAT or header.get("version") != str(VERSION):
            raise EvoreapError(f"{path} is not an evoreap repair file of version {VERSION}; run evoreap repair again")
        try:
            meta = json.loads(header.get("meta", ""))
        except json.JSONDecodeError:
            meta = None
        problem = _meta_problem(meta, tensors)
        if problem:
            raise EvoreapError(f"repair file {path} is damaged ({problem}); delete it and run evoreap repair again")
        return cls(tensors, meta)

    # -- use --------------------------------------------------------------------------------------------------------
    def check(self, model: torch.nn.Module, kept: dict[int, list[int]], where: str = "the repair") -> None:
        """Refuse (UsageError) to apply to other kept experts or another model's weights than it was fitted to."""
        if allocation_fingerprint(kept) != self.meta["allocation_fingerprint"]:
            raise UsageError(f"{where} was fitted to other kept experts than this allocation's; run evoreap repair "
                             "again for this allocation (or pass --no-repair)")
        if weights_fingerprint(model) != self.meta["model_fingerprint"]:
            raise UsageError(f"{where} was fitted to another model (its weights differ); run evoreap repair again "
                             "for this model")

    def overrides(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Model tensor name -> the value it takes under this repair (scales and low-rank updates merged into
        ``down_proj``)."""
        named = dict(model.named_parameters()) | dict(model.named_buffers())
        out: dict[str, torch.Tensor] = {}
        for experts, parts in folded_parts(self.tensors).items():
            out.update(fold_down(named, experts, parts.get(SCALE), lowrank_delta(parts), self.storage_dtype))
        for name, value in self.tensors.items():
            if folded_leaf(name):
                continue
            if name not in named:
                raise EvoreapError(f"the repair names {name}, which this model does not have")
            if tuple(named[name].shape) != tuple(value.shape):
                raise EvoreapError(f"the repair's {name} is {list(value.shape)}, the model's "
                                   f"{list(named[name].shape)}")
            out[name] = value.to(named[name].device, named[name].dtype)
        return out


def folded_leaf(name: str) -> str | None:
    """Which of :data:`FOLDED` the repair tensor ``name`` is (None for a plain model tensor)."""
    leaf = name.rpartition(".")[2]
    return leaf if leaf in FOLDED else None


def folded_parts(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Experts module -> {leaf of :data:`FOLDED`: value} for the folded tensors among ``tensors``."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in tensors.items():
        leaf = folded_leaf(name)
        if leaf is not None:
            out.setdefault(name.rpartition(".")[0], {})[leaf] = value
    return out


def lowrank_delta(parts: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """``B @ A`` ``[E, D0, D1]`` float32 of one experts module's factors (None without them). Computed once for all
    experts and sliced by its users, so that the fit, evaluate and an export merge bit-identical values."""
    a, b = parts.get(LOWRANK_A), parts.get(LOWRANK_B)
    if a is None and b is None:
        return None
    if a is None or b is None or a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or b.shape[2] != a.shape[1]:
        raise EvoreapError("the repair's low-rank factors of one experts module are missing or do not fit together "
                           f"({None if b is None else list(b.shape)} @ {None if a is None else list(a.shape)})")
    return torch.bmm(b.float(), a.float())


def merge_down(t: torch.Tensor, scale: torch.Tensor | None, delta: torch.Tensor | None, dtype: torch.dtype
               ) -> torch.Tensor:
    """``(t + delta) * scale`` rounded to the storage ``dtype`` (then back to ``t``'s dtype): one expert's (or a
    stack of experts') down projection, or its bias with ``delta`` None. ``scale`` holds one value per leading row
    of ``t`` (or one value for a single expert's tensor)."""
    out = t.float()
    if delta is not None:
        if tuple(delta.shape) != tuple(t.shape):
            raise EvoreapError(f"a low-rank update is {list(delta.shape)} but the down projection it merges into is "
                               f"{list(t.shape)}; is it the model the repair was fitted to?")
        out = out + delta.to(out.device)
    if scale is not None:
        s = scale.to(out.device, torch.float32)
        out = out * (s.view(-1, *([1] * (t.dim() - 1))) if t.dim() and s.numel() > 1 else s.reshape(()))
    return out.to(dtype).to(t.dtype)


def fold_down(named: dict[str, torch.Tensor], experts: str, scale: torch.Tensor | None, delta: torch.Tensor | None,
              dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``down_proj`` (and ``down_proj_bias``) of the experts module ``experts`` with the low-rank update added and
    each expert's rows multiplied by its scale, rounded to the storage ``dtype`` as an export writes them."""
    out = {}
    for leaf in ("down_proj", "down_proj_bias"):
        t = named.get(f"{experts}.{leaf}")
        if t is None:
            if leaf == "down_proj":
                raise EvoreapError(f"the repair changes the experts {experts}, which have no down_proj")
            continue
        d = delta if leaf == "down_proj" else None
        if scale is None and d is None:
            continue
        out[f"{experts}.{leaf}"] = merge_down(t, scale, None if d is None else d.to(t.device), dtype)
    return out


def fold_scale(named: dict[str, torch.Tensor], experts: str, scale: torch.Tensor, dtype: torch.dtype
               ) -> dict[str, torch.Tensor]:
    """``down_proj`` (and ``down_proj_bias``) of the experts module ``experts`` with each expert's rows multiplied
    by its scale, rounded to the storage ``dtype`` as an export writes them."""
    return fold_down(named, experts, scale, None, dtype)


def refuse_quantized_lowrank(src: str | Path | None, params: str | None = None) -> None:
    """A low-rank update must be merged into full-precision expert weights; a quantized source keeps its format on
    export (requantizing a merged weight would not give back the repaired model's values), so refuse it."""
    if src is None or (params is not None and "lowrank" not in params):
        return
    label = quantization_config(read_raw_config(src) or {})
    if label is not None:
        raise UsageError(f"the low-rank repair changes expert weights, which {src} stores quantized "
                         f"({label.get('quant_method', 'quantized')}); use --params router+norm+scale (or a "
                         "full-precision copy of the model)")


def _meta_problem(meta: Any, tensors: dict[str, torch.Tensor]) -> str | None:
    if not isinstance(meta, dict):
        return "its meta is not a JSON object"
    for key in ("model_fingerprint", "allocation_fingerprint", "params", "objective", "storage_dtype"):
        if not isinstance(meta.get(key), str):
            return f"meta {key!r} is missing or not a string"
    if meta["storage_dtype"] not in _DTYPES:
        return f"storage dtype {meta['storage_dtype']!r} is not one of {', '.join(_DTYPES)}"
    kept = meta.get("kept")
    if not isinstance(kept, dict) or not all(isinstance(v, list) and all(isinstance(i, int) for i in v)
                                             for v in kept.values()):
        return "meta 'kept' is missing or not a map of expert lists"
    try:
        if allocation_fingerprint({int(k): v for k, v in kept.items()}) != meta["allocation_fingerprint"]:
            return "its kept experts do not match its allocation fingerprint"
    except ValueError:
        return "meta 'kept' has a layer that is not a number"
    if not isinstance(meta.get("accepted"), bool):
        return "meta 'accepted' is missing"
    for name, t in tensors.items():
        if not t.is_floating_point() or not torch.isfinite(t).all():
            return f"{name} is not a finite floating-point tensor"
    return None


def storage_dtype(model_dir: str | Path | None, adapter: MoEAdapter, fallback: torch.dtype) -> str:
    """The dtype the checkpoint in ``model_dir`` stores its routers in (what an export writes), else ``fallback``."""
    if model_dir is not None and Path(model_dir).is_dir():
        try:
            infos = KeyLayout.of(adapter).router_tensor_infos(CheckpointIndex(model_dir), adapter.moe_layer_indices)
        except (EvoreapError, OSError):
            infos = {}
        for info in infos.values():
            name = _SAFETENSORS_DTYPES.get(info.dtype)
            if name:
                return name
    return str(fallback).replace("torch.", "")


@contextmanager
def swapped(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Let ``model`` compute with ``values`` (tensor name -> tensor, which may require grad) in place of its own
    parameters and buffers; on exit the very same tensor objects are back.

    The module dictionaries are written directly (``setattr`` refuses a non-Parameter for a parameter name, and
    deleting and re-adding would reorder them): the originals are never modified, so their version counters, and
    with them the cached weights fingerprint and reference keys, stay valid.
    """
    saved = []
    try:
        for name, value in values.items():
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            store = module._parameters if attr in module._parameters else module._buffers
            if attr not in store:
                raise EvoreapError(f"{name} is not a parameter or buffer of the model")
            saved.append((store, attr, store[attr]))
            store[attr] = value
        yield
    finally:
        for store, attr, old in reversed(saved):
            store[attr] = old


@contextmanager
def applied(model: torch.nn.Module, repair: Repair | None, kept: dict[int, list[int]] | None = None,
            check: bool = True) -> Iterator[None]:
    """Compute with ``repair``'s values (nothing when None); with ``check``, refuse a repair fitted to other kept
    experts or another model first. Use it with :func:`evoreap.masking.masked` for the repaired pruned model."""
    if repair is None:
        yield
        return
    if check:
        repair.check(model, kept if kept is not None else repair.kept)
    with torch.no_grad():
        values = repair.overrides(model)
    with swapped(model, values):
        yield


def export_edits(repair: Repair, src: str | Path, adapter: MoEAdapter, kept: dict[int, list[int]]
                 ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Source checkpoint tensor name -> the function that turns it, as the export plans it (rows of kept experts
    only), into its repaired value; for :func:`evoreap.export.export_pruned`'s ``edits``."""
    index = {t.name: t for t in CheckpointIndex(src)}
    layout = KeyLayout.of(adapter)
    e = adapter.num_experts
    rows_of = {layer: (list(idx) if len(idx) < e else list(range(e))) for layer, idx in kept.items()}
    dtype = repair.storage_dtype

    def find(param: str) -> str:
        for name in layout.candidates(param):
            if name in index:
                return name
        raise EvoreapError(f"the checkpoint in {src} has no tensor for {param}; is it the model the repair was "
                           "fitted to?")

    def layer_of(name: str) -> int | None:
        parts = name.split(".")
        for i, p in enumerate(parts[:-1]):
            if p == "layers" and parts[i + 1].isdigit():
                return int(parts[i + 1])
        return None

    edits: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    groups = folded_parts(repair.tensors)
    if any(LOWRANK_A in parts for parts in groups.values()):
        refuse_quantized_lowrank(src)
    for experts, parts in groups.items():
        rows = rows_of.get(layer_of(experts), list(range(e)))
        scale = parts[SCALE].float() if SCALE in parts else None
        delta = lowrank_delta(parts)
        for what, t in (("output scales", scale), ("low-rank factors", delta)):
            if t is not None and (t.dim() == 0 or t.shape[0] != e):  # a damaged file: one line, not an IndexError
                raise EvoreapError(f"the repair's {what} of {experts} are for {t.shape[0] if t.dim() else 1} "
                                   f"experts, but the model has {e}; is it the model the repair was fitted to?")
        for leaf in ("down_proj", "down_proj_bias"):
            d = delta if leaf == "down_proj" else None
            if scale is None and d is None:
                continue
            param = f"{experts}.{leaf}"
            pieces = layout.per_expert_parts(param, e) if leaf == "down_proj" else None
            if pieces:  # stored one tensor per expert (the model's down_proj[j] as it is on disk): edit each
                for j in rows:
                    for piece in pieces[j]:
                        edits[find(piece)] = _merged(None if scale is None else scale[j:j + 1],
                                                     None if d is None else d[j], dtype)
                continue
            if leaf == "down_proj_bias" and not any(c in index for c in layout.candidates(param)):
                continue
            edits[find(param)] = _merged(None if scale is None else scale[rows], None if d is None else d[rows],
                                         dtype)
    for name, value in repair.tensors.items():
        if folded_leaf(name):
            continue
        layer = layer_of(name)
        rows = rows_of.get(layer, list(range(e)))
        src_name = find(name)
        is_router = (key := layout.parse(src_name)) is not None and key.is_router
        edits[src_name] = _replace(value[rows] if is_router and value.dim() and value.shape[0] == e else value)
    return edits


def _merged(scale: torch.Tensor | None, delta: torch.Tensor | None, dtype: torch.dtype
            ) -> Callable[[torch.Tensor], torch.Tensor]:
    def edit(t: torch.Tensor) -> torch.Tensor:
        return merge_down(t, scale, delta, dtype)

    return edit


def _replace(value: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def edit(t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape) != tuple(value.shape):
            raise EvoreapError(f"a repaired tensor is {list(value.shape)} but the export writes {list(t.shape)}")
        return value.to(t.dtype)

    return edit


def resolve_repair(allocation_file: str | Path | None, repair: Repair | str | Path | bool | None
                   ) -> Repair | None:
    """The repair to apply: ``repair`` itself (a :class:`Repair` or its file), none when ``False``, and by default
    (``None`` or ``True``) the file beside ``allocation_file`` when there is one (``True`` requires it)."""
    if repair is False:
        return None
    if isinstance(repair, Repair):
        return repair
    if isinstance(repair, (str, Path)):
        return Repair.load(repair)
    beside = repair_path(allocation_file) if allocation_file else None
    if beside is not None and beside.is_file():
        return Repair.load(beside)
    if repair is True:
        raise UsageError(f"no repair file beside {allocation_file or 'the allocation'} ({beside}); run evoreap "
                         "repair --allocation FILE first")
    return None
