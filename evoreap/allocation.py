"""Allocations: how many routed experts each MoE layer keeps, and which ones.

On disk an allocation is JSON::

    {"format": "evoreap-allocation", "version": 1, "num_experts": 32, "top_k": 4,
     "layers": {"0": 16, "1": 12, ...}, "meta": {...}}

``layers`` maps each MoE decoder-layer index to its keep count. ``meta`` is a free-form object (budget, criterion,
proxy values, ...). ``experts`` (optional) maps a layer to the original indices it keeps; a layer keeping every
expert may be left out. Without it the kept experts are chosen by criterion scores (:func:`kept_experts`).

Allocation files are untrusted input: :meth:`Allocation.load` is the one reader (size cap, UTF-8, no duplicate keys,
bounded nesting), :meth:`Allocation.from_json` checks the structure, :meth:`Allocation.validate` checks it against a
model, and :func:`kept_experts` is the one place that turns an allocation into kept expert indices (listed or chosen
by scores) for export, evaluate and search alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evoreap.adapters import MoEAdapter
from evoreap.errors import UsageError
from evoreap.files import write_json_atomic, write_text_atomic  # noqa: F401  (re-exported)

FORMAT = "evoreap-allocation"
MAX_FILE_BYTES = 16 * 2**20  # an allocation is a few kB; anything near this is the wrong file
MAX_DEPTH = 32  # nesting of objects/lists: evoreap writes 3 levels, meta a few more
_BIG = 2**31  # no model has this many layers or experts: larger numbers are refused before any arithmetic


@dataclass(frozen=True)
class Allocation:
    """Keep counts per MoE layer: ``counts[i]`` experts are kept in decoder layer ``layers[i]``.

    ``experts`` optionally lists the kept original expert indices (ascending) of some layers; layers it leaves out
    must keep every expert. ``source`` names where it was read from (for error messages).
    """

    layers: tuple[int, ...]
    counts: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    experts: dict[int, tuple[int, ...]] | None = field(default=None, hash=False)
    source: str | None = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.counts):
            raise UsageError(f"allocation has {len(self.layers)} layers but {len(self.counts)} counts")

    def with_experts(self, kept: Mapping[int, Sequence[int]] | None) -> Allocation:
        """A copy listing ``kept`` (layer -> original indices, stored ascending) as its explicit experts."""
        experts = None if kept is None else {int(k): tuple(sorted(int(i) for i in v)) for k, v in kept.items()}
        return dataclasses.replace(self, experts=experts)

    def meta_text(self, key: str) -> str | None:
        """``meta[key]`` if it is a string, None if absent; anything else is refused."""
        return meta_text(self.meta, key, self.source or "allocation")

    @classmethod
    def uniform(cls, adapter: MoEAdapter, keep: int) -> Allocation:
        layers = tuple(adapter.moe_layer_indices)
        return cls(layers, (keep,) * len(layers))

    def as_dict(self) -> dict[int, int]:
        return dict(zip(self.layers, self.counts))

    @property
    def total(self) -> int:
        return sum(self.counts)

    def fraction(self, adapter: MoEAdapter) -> float:
        """Fraction of routed-expert parameters kept."""
        return self.total / (adapter.num_experts * len(adapter.moe_layer_indices))

    def validate(self, adapter: MoEAdapter) -> Allocation:
        """Check layers, counts and listed experts against the model; raise :class:`UsageError` naming the first
        problem. Listed experts must be, per layer, exactly the keep count of distinct indices in ``[0, E)``, and
        with group-limited routing the same number in every group (what :func:`select_experts` chooses)."""
        where = f"{self.source}: " if self.source else ""
        expected = tuple(adapter.moe_layer_indices)
        if self.layers != expected:
            raise UsageError(f"{where}allocation names layers {_few(self.layers)} but the model's MoE layers are "
                             f"{_few(expected)} ({len(expected)} layers); was it made for another model?")
        for layer, keep in zip(self.layers, self.counts):
            try:
                adapter.check_keep_count(layer, keep)
            except UsageError as e:
                raise UsageError(f"{where}{e}") from None
        if self.experts is None:
            return self
        e, groups = adapter.num_experts, adapter.n_group
        extra = sorted(set(self.experts) - set(self.layers))
        if extra:
            raise UsageError(f'{where}"experts" lists layers {_few(extra)}, which are not in "layers"; list only '
                             "MoE layers of the allocation")
        for layer, keep in zip(self.layers, self.counts):
            idx = self.experts.get(layer)
            if idx is None:
                if keep < e:
                    raise UsageError(f'{where}"experts" does not list layer {layer}, which keeps {keep} of {e} '
                                     'experts; list its kept experts, or leave "experts" out to choose them by '
                                     "--criterion scores")
                continue
            if len(idx) != keep:
                raise UsageError(f'{where}"experts" lists {len(idx)} experts for layer {layer} but "layers" keeps '
                                 f"{keep}; make them agree")
            if len(set(idx)) != len(idx):
                raise UsageError(f'{where}"experts" lists an expert of layer {layer} twice; list each kept expert '
                                 "once")
            bad = [i for i in idx if not 0 <= i < e]
            if bad:
                raise UsageError(f'{where}"experts" lists expert {_short(bad[0])} in layer {layer}, but this model '
                                 f"has experts 0..{e - 1} (negative, from-the-end indices are not allowed)")
            if groups > 1:
                size = e // groups
                per = [sum(1 for i in idx if i // size == g) for g in range(groups)]
                if len(set(per)) > 1:
                    raise UsageError(f"{where}layer {layer}: group-limited routing (n_group={groups}) needs the same "
                                     f"number of kept experts in every group of {size} ({keep // groups} each), "
                                     f"got {per}; pruning unevenly would change the routing")
        return self

    # -- files ------------------------------------------------------------------------------------------------------
    def to_json(self, adapter: MoEAdapter | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "version": 1}
        if adapter is not None:
            out.update(num_experts=adapter.num_experts, top_k=adapter.top_k,
                       kept_fraction=round(self.fraction(adapter), 6))
        out["layers"] = {str(k): int(v) for k, v in zip(self.layers, self.counts)}
        if self.experts is not None:
            out["experts"] = {str(k): [int(i) for i in v] for k, v in sorted(self.experts.items())}
        out["meta"] = self.meta
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "allocation") -> Allocation:
        """Parse the structure of an allocation (types and shapes only; :meth:`validate` checks it against a model).
        Every problem is one :class:`UsageError` line that starts with ``where``."""
        if not isinstance(data, dict) or not isinstance(data.get("layers"), dict) or not data["layers"]:
            raise UsageError(f"{where} is not an evoreap allocation: expected a JSON object with a non-empty "
                             '"layers" mapping like {"layers": {"0": 16, "1": 12}}')
        fmt, version = data.get("format", FORMAT), data.get("version", 1)
        if fmt != FORMAT:
            raise UsageError(f'{where}: "format" is {_short(fmt)}, not "{FORMAT}"; is this an allocation file?')
        if isinstance(version, bool) or version != 1:
            raise UsageError(f"{where}: allocation version {_short(version)} is not one this evoreap reads (1); "
                             "upgrade evoreap or write the file again")
        pairs = []
        for k, v in data["layers"].items():
            layer = _layer_key(k, where, '"layers"')
            if isinstance(v, int) and not isinstance(v, bool) and v < 0:
                raise UsageError(f"{where}: layer {layer} has a negative keep count ({_short(v)})")
            if isinstance(v, bool) or not isinstance(v, int) or v >= _BIG:
                raise UsageError(f"{where}: layer {layer} -> {_short(v)} is not a keep count for this model; give a "
                                 'whole number of experts per layer, e.g. {"layers": {"0": 16}}')
            pairs.append((layer, v))
        pairs.sort()
        if len({p[0] for p in pairs}) != len(pairs):  # "1" and "01" name the same layer
            raise UsageError(f'{where}: "layers" names a layer twice ({_few(list(data["layers"]))}); give each layer '
                             "index once")
        meta = data.get("meta")
        if meta is None:
            meta = {}
        elif not isinstance(meta, dict):
            raise UsageError(f'{where}: "meta" must be a JSON object, not {_json_type(meta)}; fix or remove it')
        experts = _parse_experts(data.get("experts"), {p[0] for p in pairs}, where)
        return cls(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), dict(meta), experts, where)

    def save(self, path: str | Path, adapter: MoEAdapter | None = None) -> None:
        """Write the allocation file (atomically): the one writer of allocation files."""
        write_json_atomic(path, self.to_json(adapter))

    @classmethod
    def load(cls, path: str | Path) -> Allocation:
        """Read an allocation file: the one reader, for every command. Any problem with the file is one
        :class:`UsageError` line naming it; the result still needs :meth:`validate` against the model."""
        where = f"allocation file {path}"
        return cls.from_json(read_json(path, "allocation file"), where)


def meta_text(meta: Mapping[str, Any], key: str, where: str) -> str | None:
    """``meta[key]`` if it is a string, None if absent or null; another type is refused."""
    value = meta.get(key)
    if value is None or isinstance(value, str):
        return value
    raise UsageError(f"{where}: meta.{key} must be a string, not {_json_type(value)}; fix or remove it")


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (iterative: a deep value cannot exhaust the stack here)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in v)
    return deepest


def read_json(path: str | Path, what: str, max_bytes: int = MAX_FILE_BYTES) -> Any:
    """Parse a JSON file that a user hands evoreap. A missing path, a directory, an unreadable or oversized file,
    bytes that are not UTF-8, invalid JSON, a key given twice in one object (JSON parsers silently keep the last)
    and nesting deeper than :data:`MAX_DEPTH` are each one :class:`UsageError` line naming ``what`` and ``path``."""
    name = f"{what} {path}"
    p = Path(path)
    try:
        if p.is_dir():
            raise UsageError(f"{name} is a directory; pass the JSON file itself")
        with open(p, "rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise UsageError(f"{name} does not exist; check the path") from None
    except OSError as e:
        raise UsageError(f"cannot read {name}: {e.strerror or type(e).__name__}; check the path and its "
                         "permissions") from None
    if len(raw) > max_bytes:
        raise UsageError(f"{name} is larger than {max_bytes / 2**20:g} MiB, far more than any allocation; is it the "
                         "right file?")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{name} is not valid JSON: byte {e.start} is not UTF-8 text; save it as UTF-8") from None
    try:
        data = json.loads(text, object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as e:
        raise UsageError(f"{name} gives the key {_short(e.args[0])} twice in one object; give each key once") \
            from None
    except RecursionError:
        raise UsageError(f"{name} is nested too deeply to be read (more than {MAX_DEPTH} levels)") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{name} is not valid JSON ({e})") from None
    except ValueError as e:  # e.g. an integer beyond Python's 4300-digit conversion limit
        raise UsageError(f"{name} is not valid JSON ({_short(str(e).splitlines()[0], 80)})") from None
    if _depth(data) > MAX_DEPTH:
        raise UsageError(f"{name} is nested too deeply to be read (more than {MAX_DEPTH} levels)")
    return data


def _short(value: Any, width: int = 40) -> str:
    """``value`` for an error message, at most about ``width`` characters (huge numbers and strings shortened)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**12:
        return f"{'-' if value < 0 else ''}2**{abs(value).bit_length() - 1}-ish"
    text = repr(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _few(items: Sequence[Any], n: int = 8) -> str:
    shown = ", ".join(_short(x, 20) for x in list(items)[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}]"


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _layer_key(key: Any, where: str, field_name: str) -> int:
    """A layer index written as a JSON object key: decimal ASCII digits of a plausible size."""
    text = str(key)
    if not (text.isascii() and text.isdigit()):
        raise UsageError(f"{where}: {field_name} has the key {_short(key)}, which is not a layer index; name layers "
                         'by their decimal index, e.g. "0"')
    if len(text) > 10 or int(text) >= _BIG:
        raise UsageError(f"{where}: {field_name} names layer {_short(int(text) if len(text) < 4000 else text)}, "
                         "which is not an MoE layer of this model")
    return int(text)


def _parse_experts(raw: Any, layers: set[int], where: str) -> dict[int, tuple[int, ...]] | None:
    """The structure of ``"experts"`` (null or absent: none listed); ranges and counts are :meth:`validate`'s."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise UsageError(f'{where}: "experts" must map layer indices to lists of kept expert indices, e.g. '
                         '{"experts": {"0": [0, 3, 5]}}, not ' + _json_type(raw))
    out: dict[int, tuple[int, ...]] = {}
    for k, v in raw.items():
        layer = _layer_key(k, where, '"experts"')
        if layer in out:
            raise UsageError(f'{where}: "experts" names layer {layer} twice; give each layer index once')
        if layer not in layers:
            raise UsageError(f'{where}: "experts" lists layer {layer}, which is not in "layers"; list only the '
                             "allocation's layers")
        if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            raise UsageError(f'{where}: "experts" of layer {layer} must be a list of whole expert indices, e.g. '
                             f"[0, 3, 5], not {_short(v)}")
        out[layer] = tuple(sorted(v))
    return out


def select_experts(adapter: MoEAdapter, scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` highest-scored experts of one layer.

    Ties go to the lower index. With group-limited routing the same number is kept in every group, so that the
    pruned model's contiguous groups are the original groups minus the cut experts.
    """
    scores = scores.detach().double().cpu()
    e = scores.numel()
    groups = adapter.n_group
    if groups > 1:
        per, size = keep // groups, e // groups
        chosen = [g * size + _top(scores[g * size:(g + 1) * size], per) for g in range(groups)]
        return torch.cat(chosen).sort().values
    return _top(scores, keep).sort().values


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    # stable descending sort: equal scores keep their index order
    order = torch.sort(-scores, stable=True).indices
    return order[:k]


def kept_experts(allocation: Allocation, adapter: MoEAdapter, scores: Mapping[int, torch.Tensor] | None = None
                 ) -> dict[int, list[int]]:
    """The kept original expert indices (ascending) of every MoE layer: the allocation's own ``experts`` where it
    lists them, otherwise the ``keep`` highest-scored by ``scores`` (:func:`select_experts`). The allocation is
    validated against the model first. Export, evaluate and search all choose kept experts here."""
    allocation.validate(adapter)
    e = adapter.num_experts
    if allocation.experts is not None:
        return {layer: list(allocation.experts.get(layer, range(e))) for layer in allocation.layers}
    where = f"{allocation.source}: " if allocation.source else ""
    if scores is None:
        raise UsageError(f'{where}the allocation does not list its kept experts ("experts"); pass --observation KEY '
                         "and --criterion NAME (see evoreap observe) so that they are chosen by scores")
    missing = [layer for layer in allocation.layers if layer not in scores]
    if missing:
        raise UsageError(f"the expert scores have no values for MoE layers {_few(missing)}; were they observed on "
                         "this model?")
    wrong = [layer for layer in allocation.layers if scores[layer].numel() != e]
    if wrong:
        raise UsageError(f"the expert scores of layer {wrong[0]} cover {scores[wrong[0]].numel()} experts but the "
                         f"model has {e}; were they observed on this model?")
    return {layer: select_experts(adapter, scores[layer], keep).tolist()
            for layer, keep in zip(allocation.layers, allocation.counts)}


def keep_masks(adapter: MoEAdapter, allocation: Allocation, scores: Mapping[int, torch.Tensor] | None = None
               ) -> dict[int, torch.Tensor]:
    """Bool ``[E]`` masks of the kept experts (:func:`kept_experts`) per MoE layer; layers keeping everything are
    left out."""
    out = {}
    for layer, idx in kept_experts(allocation, adapter, scores).items():
        if len(idx) >= adapter.num_experts:
            continue
        mask = torch.zeros(adapter.num_experts, dtype=torch.bool)
        mask[idx] = True
        out[layer] = mask
    return out

