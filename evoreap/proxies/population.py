"""Scoring a whole stage of candidates at once, layer by layer, computing what candidates share only once.

A candidate is a set of router masks (one per masked MoE layer). Two candidates whose masks agree on decoder layers
``0..l`` have identical hidden states after layer ``l`` on the same tokens, so the candidates of a stage form a
prefix tree over the layers: each node is the hidden states after one layer under one sequence of masks, computed
once from its parent node and shared by every candidate below it. Nodes are also kept across calls in a
:class:`StateCache` bounded by bytes (least recently used out first, the current elites' nodes last: see
:meth:`PopulationEvaluator.retain`; optionally spilled to disk), so a child that first differs from its elite
parent at layer ``l`` starts from the parent's layer-``l`` states of an earlier generation on the same rows.
Siblings (nodes computed from the same parent that differ only in the layer's MoE mask) share that layer's
attention: it runs once for them (:func:`attention_shared`).

The layers are the loaded model's own decoder-layer modules, called with the arguments the model's decoder hands
them (attention mask of the layer's type, rotary tables, positions: recorded once per batch by one pass of the
decoder whose layers are stand-ins), and each candidate's masks are applied through
:func:`evoreap.masking.masked`, so every value equals the one-candidate masked forward of
:func:`evoreap.proxies.evaluate` on the same batches (tested on every architecture). The output head runs through
the model's own forward with every decoder layer replaced by a stand-in that returns the final hidden states, so
what the model does after its layers (final norm, head, any scaling) is the model's own code.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch
from safetensors.torch import load_file, save_file

from evoreap.adapters import MoEAdapter
from evoreap.data import TokenData
from evoreap.errors import UsageError
from evoreap.fingerprint import offloaded, versions
from evoreap.masking import masked
from evoreap.models import release_freed_memory
from evoreap.observe.sequential import LayerCapture
from evoreap.proxies.evaluate import ProxyResult, Tally, check_inputs, select_sequences
from evoreap.reference import Reference, logit_chunks, model_device, scored_positions

log = logging.getLogger(__name__)

Masks = Mapping[int, torch.Tensor] | None
# Called after every batch of a call to PopulationEvaluator.score with (tokens scored, tokens to score), counted
# over candidates: a stage of 12 candidates on 4,096 tokens reports up to 49,152.
Progress = Callable[[int, int], None]

DEFAULT_CACHE_BYTES = 1 << 30
# Cached states live in slots of slabs this large: above glibc's largest dynamic mmap threshold (32 MiB on 64-bit),
# so every slab is its own mapping, returned to the system when freed. States held one by one as the layers' own
# ~1 MB output tensors came from the heap between transient buffers and kept it fragmented (4.4 GB peak RSS on the
# README's search, against 0.7 GB for one forward per candidate plus the 1 GB cache).
SLAB_BYTES = 64 << 20


@dataclass(frozen=True)
class WorkCount:
    """Decoder-layer work of the calls so far, in token positions (rows x sequence length) through one layer.

    Attributes:
        computed: layer-position evaluations actually run.
        naive: what one forward per candidate would have run (candidates x decoder layers x positions).
        cached: evaluations skipped because a node came from the state cache (part of ``naive - computed``).
        candidates: candidates scored.
        attention_shared: of ``computed``, evaluations whose attention came from a sibling (a node computed from the
            same parent states that differs only in this layer's MoE mask), so that only the rest of the layer ran.
    """

    computed: int = 0
    naive: int = 0
    cached: int = 0
    candidates: int = 0
    attention_shared: int = 0

    def plus(self, **counts: int) -> WorkCount:
        """These counts added to the named fields."""
        return replace(self, **{f.name: getattr(self, f.name) + counts.get(f.name, 0) for f in fields(self)})

    @property
    def ratio(self) -> float:
        """computed / naive (1.0 = no sharing at all)."""
        return self.computed / self.naive if self.naive else 1.0


class SlotPool:
    """Fixed-size buffers for the cached states, carved out of large slabs and reused: an evicted state's slot takes
    the next state of at most its size (same dtype and device), so once the cache is full nothing more is allocated.

    ``take`` copies a tensor into a slot and returns the slot's view in the tensor's shape; ``give`` returns the
    slot. A slab is freed when :meth:`clear` drops the pool and no view of it is left. Not a torch allocator feature:
    torch's CPU allocator hands every tensor to malloc, so a long-lived tensor pins its part of the heap.
    """

    def __init__(self, slab_bytes: int = SLAB_BYTES):
        self.slab_bytes = slab_bytes
        self.free: dict[tuple[torch.dtype, torch.device, int], list[torch.Tensor]] = {}
        self.slabs = 0  # slabs allocated so far (a measure of reuse)

    def take(self, t: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(view, slot)``: a free slot (1-D) holding a copy of ``t`` and its view in ``t``'s shape; a new slab
        holds at most ``limit`` bytes (the cache's budget)."""
        n = t.numel()
        fits = [k for k, v in self.free.items() if v and k[0] == t.dtype and k[1] == t.device and k[2] >= n]
        if fits:
            slot = self.free[min(fits, key=lambda k: k[2])].pop()
        else:
            size = max(1, n * t.element_size())
            with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
                slab = torch.empty((max(1, min(self.slab_bytes, limit) // size), n), dtype=t.dtype, device=t.device)
            self.slabs += 1
            slots = list(slab.unbind(0))  # each a view: the slab lives as long as any of them
            slot = slots.pop()
            self.free.setdefault((t.dtype, t.device, n), []).extend(slots)
        return slot[:n].view(t.shape).copy_(t), slot

    def give(self, slot: torch.Tensor) -> None:
        """Return a slot that :meth:`take` handed out; views of it must no longer be read."""
        self.free.setdefault((slot.dtype, slot.device, slot.numel()), []).append(slot)

    def clear(self) -> None:
        self.free.clear()


class StateCache:
    """Hidden states of prefix-tree nodes per batch of rows, bounded by ``max_bytes``: least recently used out first,
    except that states of pinned nodes (:meth:`pin`: the current elites' paths, which their children start from) go
    only when nothing else is left.

    Keys are ``(rows, node)``: ``rows`` the batch's row indices as a tuple (a state is only reused for exactly the
    batch it was computed on, so a candidate's values are bit-equal to its own masked forward, whose batches are the
    same slices of the token order), ``node`` a prefix-tree node id. ``spill_dir`` (or ``spill=True`` for a temporary
    directory) keeps evicted states in safetensors files instead of dropping them (the disk holds at most
    ``max_disk_bytes``); they are read back on a hit.

    States are copied into reused slots of a :class:`SlotPool` (not kept as the layers' output tensors), and
    :meth:`get` returns a copy: a slot may take another state as soon as its own is evicted.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, *, spill: bool = False,
                 max_disk_bytes: int = 16 << 30):
        if max_bytes < 0:
            raise UsageError(f"the hidden-state cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes, self.max_disk_bytes = max_bytes, max_disk_bytes
        self.mem: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # unpinned, least recently used first
        self.kept: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # pinned nodes' states
        self.pinned: frozenset[int] = frozenset()
        self.bytes = 0
        self._dir = tempfile.TemporaryDirectory(prefix="evoreap-states-") if spill else None
        self.disk: OrderedDict[tuple, tuple[str, int]] = OrderedDict()
        self.disk_bytes = 0
        self._files = 0
        self.hits = self.misses = 0
        self.pool = SlotPool()
        self._slots: dict[tuple, torch.Tensor] = {}  # key -> the slot under its state in mem or kept

    def __contains__(self, key: tuple) -> bool:
        return key in self.mem or key in self.kept or key in self.disk

    def get(self, key: tuple, device: torch.device) -> torch.Tensor:
        for held in (self.kept, self.mem):
            if key in held:
                held.move_to_end(key)
                self.hits += 1
                return held[key].to(device, copy=True)  # the caller's: the slot may be reused meanwhile
        path, _ = self.disk[key]
        self.disk.move_to_end(key)
        self.hits += 1
        t = load_file(path)["h"].to(device)
        if key[1] in self.pinned:  # an elite's state back in memory: its children start from it
            self._hold(key, t)
        return t

    def put(self, key: tuple, t: torch.Tensor) -> None:
        if key in self:
            return
        self._hold(key, t)

    def touch(self, key: tuple) -> None:
        """Mark a held state as just used, without reading it."""
        for held in (self.kept, self.mem, self.disk):
            if key in held:
                held.move_to_end(key)

    def pin(self, nodes: set[int] | frozenset[int]) -> None:
        """Keep the states of ``nodes`` (on any rows) in memory before all others; replaces the previous pins.
        States of nodes no longer pinned become the next to go."""
        self.pinned = frozenset(nodes)
        unpinned = OrderedDict((k, v) for k, v in self.kept.items() if k[1] not in self.pinned)
        for k in unpinned:
            del self.kept[k]
        for k in [k for k in self.mem if k[1] in self.pinned]:
            self.kept[k] = self.mem.pop(k)
        unpinned.update(self.mem)
        self.mem = unpinned

    def _hold(self, key: tuple, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.max_bytes:  # larger than the memory budget: straight to disk, if there is one
            if key not in self.disk:
                self._spill(key, t)
            return
        while self.bytes + size > self.max_bytes:  # evict first, so that the new state can take a freed slot
            self._evict()
        view, slot = self.pool.take(t.detach(), self.max_bytes)
        (self.kept if key[1] in self.pinned else self.mem)[key] = view
        self._slots[key] = slot
        self.bytes += slot.numel() * slot.element_size()
        while self.bytes > self.max_bytes:  # a larger slot than the state needed
            self._evict()

    def _evict(self) -> None:
        old, value = (self.mem or self.kept).popitem(last=False)
        slot = self._slots.pop(old)
        self.bytes -= slot.numel() * slot.element_size()
        if old not in self.disk:
            self._spill(old, value)
        self.pool.give(slot)

    def _spill(self, key: tuple, t: torch.Tensor) -> None:
        if self._dir is None:
            return
        size = t.numel() * t.element_size()
        while self.disk and self.disk_bytes + size > self.max_disk_bytes:
            _, (path, n) = self.disk.popitem(last=False)
            os.unlink(path)
            self.disk_bytes -= n
        if size > self.max_disk_bytes:
            return
        self._files += 1
        path = os.path.join(self._dir.name, f"{self._files}.safetensors")
        save_file({"h": t.detach().cpu().contiguous()}, path)
        self.disk[key] = (path, size)
        self.disk_bytes += size

    def clear(self) -> None:
        self.mem.clear()
        self.kept.clear()
        self._slots.clear()
        self.pool.clear()
        self.bytes = 0
        for path, _ in self.disk.values():
            os.unlink(path)
        self.disk.clear()
        self.disk_bytes = 0

    def close(self) -> None:
        self.clear()
        if self._dir is not None:
            self._dir.cleanup()


class _Replay(LayerCapture):
    """Stands in for a decoder layer and returns the given final hidden states, so that the model's own forward
    computes only what follows its decoder layers (final norm, output head) on them."""

    def __init__(self, index: int, original: torch.nn.Module, final: torch.Tensor):
        super().__init__(index, original, {})
        self.final = final

    def forward(self, hidden_states, *args, **kwargs):
        return self.final


class _Recorded(torch.nn.Module):
    """Stands in for a decoder layer's attention module and returns (a copy of) the output it gave on the same
    input."""

    def __init__(self, output: object):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return _copied(self.output)


def _copied(output: object) -> object:
    # a copy, in case the layer's own code changes the attention output in place
    if isinstance(output, torch.Tensor):
        return output.clone()
    return tuple(_copied(x) for x in output) if isinstance(output, tuple) else output


@contextmanager
def attention_shared(layer: torch.nn.Module, attr: str, record: list | None) -> Iterator[bool]:
    """Run ``layer`` with its attention module (``layer.<attr>``) computed once over the calls that pass the same
    ``record``: calls on the same input states with the same arguments, which differ only in the MoE mask, so their
    attention outputs are equal. The first call stores the module's output in ``record``; later ones get it from a
    stand-in, and the rest of the layer (norms, residuals, the masked MoE block) runs as the layer's own code. Yields
    whether the attention came from the record. ``record=None`` (or a layer without ``attr``) changes nothing."""
    attention = getattr(layer, attr, None)
    if record is None or not isinstance(attention, torch.nn.Module):
        yield False
    elif record:
        setattr(layer, attr, _Recorded(record[0]))
        try:
            yield True
        finally:
            setattr(layer, attr, attention)
    else:
        handle = attention.register_forward_hook(lambda module, args, output: record.append(_copied(output)))
        try:
            yield False
        finally:
            handle.remove()


@contextmanager
def _layers_replaced(decoder: torch.nn.Module, modules: list[torch.nn.Module]) -> Iterator[None]:
    layers = decoder.layers
    decoder.layers = torch.nn.ModuleList(modules)
    try:
        yield
    finally:
        decoder.layers = layers


class PopulationEvaluator:
    """Scores lists of candidates (router masks) on ``data`` with prefix sharing and a hidden-state cache.

    Same arguments and same values as :func:`evoreap.proxies.evaluate` per candidate. Bound to the model's weights
    as they are: the cache is emptied when a parameter or buffer changes. ``cache`` bounds what is kept across calls
    (``StateCache(0)`` keeps nothing; sharing within one call still happens).
    """

    def __init__(self, model: torch.nn.Module, adapter: MoEAdapter, data: TokenData, *,
                 reference: Reference | None = None, order: torch.Tensor | None = None, batch_size: int = 8,
                 cache: StateCache | None = None):
        self.model, self.adapter, self.data = model, adapter, data
        self.reference, self.order, self.batch_size = reference, order, batch_size
        self.cache = StateCache() if cache is None else cache
        self.decoder = model.get_decoder()
        self.n_layers = len(self.decoder.layers)
        self.moe = set(adapter.moe_layer_indices)
        self._trie: dict[tuple[int, bytes | None], int] = {}
        self._weights = "offloaded" if offloaded(model) else versions(model)
        self.work = WorkCount()

    # -- the prefix tree ---------------------------------------------------------------------------------------------
    def _path(self, masks: Masks) -> tuple[int, ...]:
        """Node ids after each layer (index 0 = the embeddings, the root, id 0): equal ids = equal hidden states."""
        masks = masks or {}
        unknown = sorted(set(masks) - self.moe)
        if unknown:
            raise UsageError(f"layers {unknown} are not MoE layers of this model ({sorted(self.moe)})")
        path, node = [0], 0
        for layer in range(self.n_layers):
            keep = masks.get(layer)
            key = None if keep is None else keep.detach().to("cpu", torch.bool).numpy().tobytes()
            node = self._trie.setdefault((node, key), len(self._trie) + 1)
            path.append(node)
        return tuple(path)

    def retain(self, candidates: Sequence[Masks]) -> None:
        """Keep the hidden states on these candidates' paths (the current elites: the next generation's children
        start from them) in the cache before any other state; replaces the previous call's choice."""
        self.cache.pin({node for m in candidates for node in self._path(m)[1:]})

    # -- scoring -----------------------------------------------------------------------------------------------------
    def score(self, candidates: Sequence[Masks], *, proxies: Sequence[str] | str = ("kl",),
              n_tokens: int | None = None, progress: Progress | None = None) -> list[ProxyResult]:
        """Proxy values of each candidate on the rows of ``order`` that cover ``n_tokens`` scored tokens, as
        ``evaluate(model, adapter, masks, data, order=order, n_tokens=n_tokens, batch_size=batch_size)`` gives them.
        """
        if not candidates:
            return []
        specs = check_inputs(self.model, self.data, proxies, self.reference, self.batch_size)
        now = "offloaded" if offloaded(self.model) else versions(self.model)  # offloaded: read from the files
        if now is None or now != self._weights:  # other weights: no stored state is valid
            self.cache.clear()
            self._weights = now
        for masks in candidates:  # a bad mask fails here, before any work
            with masked(self.model, self.adapter, dict(masks or {})):
                pass
        paths = [self._path(m) for m in candidates]
        leaves = list(dict.fromkeys(paths))  # identical candidates are scored once
        masks_of = {p: dict(m or {}) for p, m in zip(paths, candidates)}
        tallies = {p: Tally(specs, self.data, self.reference) for p in leaves}
        rows = select_sequences(self.data, self.order, n_tokens)
        per_row = scored_positions(self.data.attention_mask).sum(1)
        total, done = int(per_row[rows].sum()) * len(candidates), 0
        positions = self.data.seq_len
        with torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                index = rows[start:start + self.batch_size]
                finals = self._advance(index, leaves, masks_of)
                for leaf in leaves:
                    tallies[leaf].add(index, self._head(index, finals[leaf]))
                done += int(per_row[index].sum()) * len(candidates)
                self.work = self.work.plus(naive=len(candidates) * self.n_layers * len(index) * positions)
                if progress is not None:
                    progress(done, total)
        self.work = self.work.plus(candidates=len(candidates))
        release_freed_memory()
        return [tallies[p].result() for p in paths]

    def _inputs(self, index: torch.Tensor) -> tuple[torch.Tensor, dict[int, tuple]]:
        """Layer 0's input and every layer's other arguments for the rows ``index``, from one pass of the decoder
        whose layers are stand-ins (embeddings, masks and rotary tables only)."""
        sink: dict[int, tuple] = {}
        stand_ins = [LayerCapture(i, layer, sink) for i, layer in enumerate(self.decoder.layers)]
        device = model_device(self.model)
        with _layers_replaced(self.decoder, stand_ins):
            self.decoder(input_ids=self.data.input_ids[index].to(device),
                         attention_mask=self.data.attention_mask[index].to(device), use_cache=False)
        return sink[0][0], sink

    def _advance(self, index: torch.Tensor, leaves: list[tuple[int, ...]], masks_of: dict
                 ) -> dict[tuple[int, ...], torch.Tensor]:
        """Final hidden states of every leaf on rows ``index``: each node computed once from its parent, starting
        from the deepest node of each path that the cache holds."""
        rkey = tuple(index.tolist())
        tokens = len(index) * self.data.seq_len
        n = self.n_layers
        start: dict[tuple[int, ...], int] = {}
        stored: dict[int, torch.Tensor] = {}  # fetched now: computing this batch may evict them from the cache
        device = model_device(self.model)
        for p in leaves:
            start[p] = next((d for d in range(n, 0, -1) if p[d] in stored or (rkey, p[d]) in self.cache), 0)
            # a path read from its deepest state is used whole: children branch off at any of its layers, so its
            # shallower states must not be the first to go, as they would under LRU by reads alone
            for d in range(1, start[p]):
                self.cache.touch((rkey, p[d]))
            if start[p] and p[start[p]] not in stored:
                stored[p[start[p]]] = self.cache.get((rkey, p[start[p]]), device)
        finals: dict[tuple[int, ...], torch.Tensor] = {}
        h0 = args = None
        if any(s < n for s in start.values()):
            h0, args = self._inputs(index)
        live: dict[int, torch.Tensor] = {}
        cached = 0
        for d in range(n + 1):
            for p in leaves:  # paths that begin here: from the embeddings or from a stored node
                if start[p] == d and p[d] not in live:
                    live[p[d]] = h0 if d == 0 else stored[p[d]]
                    cached += d
            if d == n:
                break
            children: dict[int, dict[int, torch.Tensor | None]] = {}  # parent -> child -> this layer's mask
            for p in leaves:
                if start[p] <= d:
                    children.setdefault(p[d], {}).setdefault(p[d + 1], masks_of[p].get(d))
            layer = self.decoder.layers[d]
            nxt: dict[int, torch.Tensor] = {}
            for parent, kids in children.items():
                _, a, kw = args[d]
                record: list | None = [] if len(kids) > 1 else None
                for child, keep in kids.items():
                    with masked(self.model, self.adapter, {d: keep} if keep is not None else {}), \
                            attention_shared(layer, self.adapter.spec.attention_attr, record) as shared:
                        out = layer(live[parent], *a, **kw)
                    out = out[0] if isinstance(out, tuple) else out
                    nxt[child] = out
                    self.cache.put((rkey, child), out)
                    self.work = self.work.plus(computed=tokens, attention_shared=tokens if shared else 0)
            # nodes at depth d+1 that are stored and start a path are already in `nxt` or fetched next round
            live = nxt
        for p in leaves:
            finals[p] = live[p[n]]
        self.work = self.work.plus(cached=cached * tokens)
        return finals

    def _head(self, index: torch.Tensor, final: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Log-prob chunks of the model's own forward from the final hidden states on: every decoder layer replaced
        by a stand-in that returns ``final`` (the embeddings and masks it recomputes are cheap)."""
        stand_ins = [_Replay(i, layer, final) for i, layer in enumerate(self.decoder.layers)]
        device = model_device(self.model)
        with _layers_replaced(self.decoder, stand_ins):
            out = self.model(input_ids=self.data.input_ids[index].to(device),
                             attention_mask=self.data.attention_mask[index].to(device), use_cache=False)
        return logit_chunks(out.logits)

    def close(self) -> None:
        self.cache.close()
