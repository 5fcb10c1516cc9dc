"""Scoring a stage of candidates on a model larger than memory: layer-outer, each decoder layer read once per stage.

The population engine (:mod:`evoreap.proxies.population`) runs batch-outer over a resident model. Here the model is
a :class:`~evoreap.observe.sequential.SequentialModel` (built on the meta device, weights in the safetensors shards)
and the loops are turned around: decoder layer ``d`` is materialised once per stage, applied to every live node of
the stage's prefix tree (candidates that agree on layers ``0..d-1`` share one node) on every batch of rows, and
freed. Only the hidden states of the live nodes are kept between layers, in memory up to a byte bound and in
safetensors files beyond it. The output head (final norm, lm_head: the model's own forward with the decoder layers
replaced by stand-ins) is materialised once at the end. The layers are the model's own modules called with the
arguments its decoder hands them, under :func:`evoreap.masking.masked`, so every value equals the one-candidate
masked forward of :func:`evoreap.proxies.evaluate` on the resident model (tested on every architecture).

With a ``resume_dir`` a stage checkpoints after every layer (the live nodes' states and a manifest naming the stage:
its candidates' masks, rows, batch size and model); a stage killed and started again with the same candidates
resumes after the last completed layer. The streamed reference checkpoints the same way.

Across stages (the generations of a search) the nodes' states are kept in a :class:`StateStore`: files on disk
bounded in bytes, named by the node's prefix (the masks below it) and the batch (model fingerprint, rows, tokens),
the elites' nodes evicted last. A candidate of a later stage starts, on each batch, from the deepest node of its
path the store holds (a child of an elite where it first differs from it; a survivor re-scored on more tokens from
its final states on the batches it was scored on), and a decoder layer is read only when some path still needs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save, save_file

from evoreap.data import TokenData
from evoreap.errors import EvoreapError
from evoreap.files import cache_root, write_json_atomic
from evoreap.fingerprint import checkpoint_fingerprint
from evoreap.masking import masked
from evoreap.models import release_freed_memory
from evoreap.observe.sequential import LayerBuffers, LayerCapture, SequentialModel
from evoreap.proxies.evaluate import ProxyResult, Tally, check_inputs, select_sequences
from evoreap.proxies.population import DEFAULT_CACHE_BYTES, Masks, PopulationEvaluator, Progress, WorkCount, \
    _layers_replaced, _Replay, attention_shared
from evoreap.reference import Reference, ReferenceBuilder, cached_reference, fingerprint_of, logit_chunks, \
    scored_positions

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_FORMAT = "evoreap-streamed-stage"


def streamed_fingerprint(seq: SequentialModel, cache_dir: str | Path | None = None) -> str:
    """:func:`evoreap.reference.model_fingerprint` of the model ``seq`` streams, equal to that of the same
    checkpoint loaded whole, from its config, router tensors and files (nothing else is read)."""
    return fingerprint_of(seq.adapter.config, seq.router_tensors(), checkpoint_fingerprint(seq.path, cache_dir),
                          next(seq.model.parameters()).dtype)


class _Frontier:
    """Hidden states of the live prefix-tree nodes per batch, keyed ``(node, batch)``: in memory up to ``max_bytes``,
    beyond that in safetensors files of ``directory``. Files of dropped nodes are deleted at :meth:`commit` when the
    directory is a checkpoint (until then the last manifest still names them)."""

    def __init__(self, max_bytes: int, directory: Path, keep_files_until_commit: bool):
        self.max_bytes, self.dir, self.deferred = max_bytes, directory, keep_files_until_commit
        self.mem: dict[tuple[int, int], torch.Tensor] = {}
        self.files: dict[tuple[int, int], str] = {}
        self.bytes = 0
        self.peak = 0
        self.spilled = 0  # bytes written to disk for lack of memory (checkpoints not counted)
        self._doomed: list[str] = []

    def _file(self, key: tuple[int, int]) -> str:
        return f"n{key[0]}-b{key[1]}.safetensors"

    def put(self, key: tuple[int, int], t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if self.bytes + size <= self.max_bytes:
            self.mem[key] = t
            self.bytes += size
            self.peak = max(self.peak, self.bytes)
        else:
            self.spilled += size
            self._write(key, t)

    def _write(self, key: tuple[int, int], t: torch.Tensor) -> None:
        name = self._file(key)
        save_file({"h": t.detach().cpu().contiguous()}, str(self.dir / name))
        self.files[key] = name

    def get(self, key: tuple[int, int], device: torch.device) -> torch.Tensor:
        if key in self.mem:
            return self.mem[key]
        path = self.dir / self.files[key]
        try:
            return load_file(str(path))["h"].to(device)
        except Exception as e:  # a damaged or foreign file in a stage checkpoint
            raise EvoreapError(f"cannot read hidden states {path} ({e}); delete {self.dir} and run again") from None

    def drop(self, key: tuple[int, int]) -> None:
        t = self.mem.pop(key, None)
        if t is not None:
            self.bytes -= t.numel() * t.element_size()
        name = self.files.pop(key, None)
        if name is not None:
            if self.deferred:
                self._doomed.append(name)
            else:
                os.unlink(self.dir / name)

    def persist(self) -> dict[str, str]:
        """Every live state on disk (those in memory written too, and kept in memory): ``"node-batch" -> file``."""
        for key, t in self.mem.items():
            if key not in self.files:
                self._write(key, t)
        return {f"{n}-{b}": name for (n, b), name in self.files.items()}

    def commit(self) -> None:
        for name in self._doomed:
            (self.dir / name).unlink(missing_ok=True)
        self._doomed.clear()

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self.mem or key in self.files


_STATE_FORMAT = "evoreap-streamed-state"
_STATE_NAME = re.compile(r"[0-9a-f]{64}-[0-9a-f]{64}\.safetensors")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


class _StoreMiss(Exception):
    """A state the stage was planned to start from is gone from the store (another process evicted it)."""


class StateStore:
    """Hidden states of prefix-tree nodes kept across stages (the generations of a search), one safetensors file
    each in ``directory``, at most ``max_bytes`` of them: least recently used out first, the pinned nodes' (the
    elites', :meth:`pin`) last, and never one a running stage starts from (:meth:`protect`). Processes sharing the
    directory share the bound: each counts the others' files before it writes (a state another one then evicts is
    recomputed by the stage that wanted it).

    A state is named ``<prefix key>-<batch key>``: the prefix key hashes the router masks of the layers below it (the
    same candidates' prefix as the population engine's :class:`~evoreap.proxies.population.StateCache` node), the
    batch key the model fingerprint, the device, the batch's row indices and their tokens, so a state is found only
    for the same prefix on the same batch of the same model and data. Files are read back only under names this
    class makes, and only when their metadata repeat both keys and the sha256 of the tensor (anything else is deleted
    and recomputed). Disk files rather than memory: the streamed engine runs where memory is short; the files are
    written by safetensors under a temporary name and renamed, so a killed run leaves whole files or none, and a
    search re-run in the same run directory finds them again.
    """

    def __init__(self, directory: str | Path, max_bytes: int):
        self.dir, self.max_bytes = Path(directory), max_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
        self.bytes = 0
        self.pinned: frozenset[str] = frozenset()  # prefix keys
        self.protected: set[str] = set()
        self.hits = self.writes = self.evicted = 0
        found = [p for p in self.dir.iterdir() if _STATE_NAME.fullmatch(p.name)]
        for p in sorted(found, key=lambda p: p.stat().st_mtime):  # a re-run in the same directory: a killed run's
            self._adopt(p.name)
        self._shrink(0)

    def _adopt(self, name: str) -> bool:
        try:
            st = (self.dir / name).lstat()
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode):  # a link could point anywhere: only plain files written here
            return False
        size = st.st_size
        self.index[name] = size
        self.bytes += size
        return True

    @staticmethod
    def name(prefix: str, batch: str) -> str:
        return f"{prefix}-{batch}.safetensors"

    def has(self, name: str) -> bool:
        """Held here (or written by another process sharing the directory since)."""
        return name in self.index or self._adopt(name)

    def pin(self, prefixes: set[str] | frozenset[str]) -> None:
        self.pinned = frozenset(prefixes)

    def touch(self, name: str) -> None:
        """Mark a held state as just used, without reading it."""
        if name in self.index:
            self.index.move_to_end(name)

    def protect(self, names: set[str]) -> None:
        self.protected = set(names)

    def get(self, name: str, device: torch.device) -> torch.Tensor | None:
        """The state, or None when it is missing or not a file this class wrote for this name (then deleted)."""
        from safetensors import safe_open

        path = self.dir / name
        prefix, batch = name[:64], name[65:129]
        try:
            if path.is_symlink() or not _STATE_NAME.fullmatch(name):
                raise OSError("not a state file")
            with safe_open(str(path), framework="pt") as f:
                meta, keys = f.metadata() or {}, list(f.keys())
                t = f.get_tensor("h") if keys == ["h"] else None
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file: recompute rather than fail
            log.debug("state %s unreadable (%s)", path, e)
            t, meta = None, {}
        if t is None or meta != {"format": _STATE_FORMAT, "prefix": prefix, "batch": batch, "sha256": _digest(t)}:
            if path.exists():
                log.warning("ignoring a hidden-state file that this engine did not write: %s", path)
            self._remove(name)
            return None
        self.index.move_to_end(name)
        self.hits += 1
        return t.to(device)

    def put(self, name: str, t: torch.Tensor) -> None:
        if self.has(name) or t.numel() * t.element_size() > self.max_bytes:
            return
        t = t.detach().cpu().contiguous()
        blob = save({"h": t}, metadata={"format": _STATE_FORMAT, "prefix": name[:64], "batch": name[65:129],
                                        "sha256": _digest(t)})
        if not self._shrink(len(blob)):
            return
        tmp = self.dir / f".{name}.{os.getpid()}.tmp"
        try:  # not evoreap.files' atomic write: its fsync per state costs more than a lost state (recomputed)
            tmp.write_bytes(blob)
            os.replace(tmp, self.dir / name)
        except OSError as e:  # a full disk costs reuse, not the search
            tmp.unlink(missing_ok=True)
            log.warning("cannot keep hidden states in %s (%s)", self.dir, e)
            return
        self.writes += 1
        self._adopt(name)

    def _sync(self) -> None:
        """Count what other processes sharing the directory (workers of one run) wrote or removed since, so that
        the bound holds for the directory as a whole rather than per process."""
        try:
            names = {e.name for e in os.scandir(self.dir) if _STATE_NAME.fullmatch(e.name)}
        except OSError:
            return
        for name in [n for n in self.index if n not in names]:
            self.bytes -= self.index.pop(name)
        for name in sorted(names - self.index.keys()):
            self._adopt(name)

    def _shrink(self, size: int) -> bool:
        """Make room for ``size`` more bytes (in the whole directory): False when the protected states leave none."""
        self._sync()
        while self.bytes + size > self.max_bytes:
            victims = [k for k in self.index if k not in self.protected]
            if not victims:
                return False
            victim = next((k for k in victims if k[:64] not in self.pinned), victims[0])
            self._remove(victim)
            self.evicted += 1
        return True

    def _remove(self, name: str) -> None:
        self.bytes -= self.index.pop(name, 0)
        (self.dir / name).unlink(missing_ok=True)

    def close(self) -> None:
        """Delete every state (the search is over), and the directory when nothing else is in it."""
        for name in list(self.index):
            self._remove(name)
        for p in self.dir.glob("*.safetensors"):  # adopted by has() after the index was read
            if _STATE_NAME.fullmatch(p.name):
                p.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass


class StreamedEvaluator:
    """Scores lists of candidates (router masks) on ``data`` with the model streamed layer by layer from its shards.

    Same arguments and same values as :class:`~evoreap.proxies.population.PopulationEvaluator` (and so as
    :func:`evoreap.proxies.evaluate` on the resident model, per candidate). ``model_fp`` (default: computed from the
    files) is checked against the reference's; ``other_model=True`` skips that check (a pruned export compared with
    its source's reference). ``max_state_bytes`` bounds the hidden states kept in memory between layers (the rest
    goes to disk); ``resume_dir`` makes stages resumable (see the module docstring). ``store_bytes`` > 0 keeps
    the nodes' states across calls in a :class:`StateStore` of that many bytes on disk (in ``store_dir``, default
    ``resume_dir/states`` or a temporary directory; deleted by :meth:`close`): a candidate of a later stage starts
    from the deepest state of its prefix stored for the same batch, and the layers below it are not computed for it.
    """

    def __init__(self, seq: SequentialModel, data: TokenData, *, reference: Reference | None = None,
                 order: torch.Tensor | None = None, batch_size: int = 8, max_state_bytes: int = DEFAULT_CACHE_BYTES,
                 resume_dir: str | Path | None = None, model_fp: str | None = None, other_model: bool = False,
                 cache_dir: str | Path | None = None, store_bytes: int = 0, store_dir: str | Path | None = None):
        self.seq, self.model, self.adapter, self.data = seq, seq.model, seq.adapter, data
        self.reference, self.order, self.batch_size = reference, order, batch_size
        self.max_state_bytes = max_state_bytes
        self.resume_dir = Path(resume_dir) if resume_dir is not None else None
        self._store_tmp = None
        self.store: StateStore | None = None
        if store_bytes > 0:
            if store_dir is None and self.resume_dir is not None:
                store_dir = self.resume_dir / "states"
            if store_dir is None:
                self._store_tmp = tempfile.TemporaryDirectory(prefix="evoreap-states-")
                store_dir = self._store_tmp.name
            self.store = StateStore(store_dir, store_bytes)
        self.other_model, self.cache_dir = other_model, cache_dir
        self._fp = model_fp
        self.decoder = seq.decoder
        self.n_layers = len(self.decoder.layers)
        self.moe = set(self.adapter.moe_layer_indices)
        self._trie: dict[tuple[int, bytes | None], int] = {}
        self.work = WorkCount()
        self.layers_read: list[int] = []  # decoder layers materialised, in order (resume skips the done ones)
        self._buffers = LayerBuffers()  # within a stage, each layer is read into the previous one's memory
        self.peak_state_bytes = 0  # most hidden-state bytes held in memory at once
        self.spilled_state_bytes = 0  # written to disk beyond max_state_bytes in the last stage

    @property
    def model_fp(self) -> str:
        if self._fp is None:
            self._fp = streamed_fingerprint(self.seq, self.cache_dir)
        return self._fp

    # -- the stage's prefix tree ---------------------------------------------------------------------------------------
    def _key(self, masks: Masks) -> bytes:
        masks = masks or {}
        parts = [b"-" if masks.get(i) is None else masks[i].detach().to("cpu", torch.bool).numpy().tobytes()
                 for i in sorted(self.moe)]
        return hashlib.sha256(b"|".join(parts)).digest()

    def retain(self, candidates: Sequence[Masks]) -> None:
        """The current elites: their states stay in the store before any other's (their children start from
        them); replaces the previous call's choice."""
        if self.store is not None:
            self.store.pin({k for m in candidates for k in self._prefixes(dict(m or {}))[1:]})

    def _prefixes(self, masks: dict[int, torch.Tensor]) -> list[str]:
        """The prefix key of each node of a candidate's path (index 0 = the embeddings): a hash of the masks below
        it, equal for two candidates exactly when their prefix-tree nodes are (the trie's keys, chained)."""
        keys = [hashlib.sha256(b"evoreap-prefix").hexdigest()]
        for d in range(self.n_layers):
            keep = masks.get(d)
            part = b"-" if keep is None else keep.detach().to("cpu", torch.bool).numpy().tobytes()
            keys.append(hashlib.sha256(keys[-1].encode() + b"|" + part).hexdigest())
        return keys

    def _batch_keys(self, batches: list[torch.Tensor]) -> list[str]:
        device = str(self.seq.device)
        return [hashlib.sha256(json.dumps({"model": self.model_fp, "device": device, "seq_len": self.data.seq_len,
                                           "rows": index.tolist(), "tokens": hashlib.sha256(
                                               self.data.input_ids[index].numpy().tobytes()
                                               + self.data.attention_mask[index].numpy().tobytes()).hexdigest()},
                                          sort_keys=True).encode()).hexdigest() for index in batches]

    def close(self) -> None:
        """Delete the stored states."""
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._store_tmp is not None:
            self._store_tmp.cleanup()
            self._store_tmp = None

    def _paths(self, candidates: Sequence[Masks]) -> list[tuple[int, ...]]:
        """Node ids per candidate (the population engine's prefix tree, built fresh per stage), numbered in the
        order of the candidates' mask hashes so that the same stage gets the same ids in another process."""
        self._trie = {}
        keys = [self._key(m) for m in candidates]
        for i in sorted(range(len(candidates)), key=lambda i: keys[i]):
            PopulationEvaluator._path(self, candidates[i])  # same node logic; reads _trie, moe and n_layers
        return [PopulationEvaluator._path(self, m) for m in candidates]

    # -- scoring -----------------------------------------------------------------------------------------------------
    def score(self, candidates: Sequence[Masks], *, proxies: Sequence[str] | str = ("kl",),
              n_tokens: int | None = None, progress: Progress | None = None) -> list[ProxyResult]:
        """Proxy values of each candidate on the rows of ``order`` that cover ``n_tokens`` scored tokens."""
        if not candidates:
            return []
        specs = check_inputs(self.model, self.data, proxies, self.reference, self.batch_size, other_model=True)
        if self.reference is not None and not self.other_model and \
                self.reference.model_fingerprint != self.model_fp:
            raise EvoreapError("the reference distributions were computed with another model (weights or config "
                               "differ) than the checkpoint streamed here; rebuild the reference")
        rows = select_sequences(self.data, self.order, n_tokens)
        try:
            paths = self._run(candidates, rows, progress)
            tallies = {p: Tally(specs, self.data, self.reference) for p in dict.fromkeys(paths)}
            self._head(rows, {p: tallies[p].add for p in tallies})
        except _StoreMiss as e:  # another process sharing the store evicted a state this stage planned to use
            log.warning("a stored hidden state vanished (%s); scoring the stage again without the store", e)
            self._discard()
            paths = self._run(candidates, rows, progress, use_store=False)
            tallies = {p: Tally(specs, self.data, self.reference) for p in dict.fromkeys(paths)}
            self._head(rows, {p: tallies[p].add for p in tallies})
        self._finish(rows)
        self.work = self.work.plus(candidates=len(candidates))
        return [tallies[p].result() for p in paths]

    def reference_distributions(self, top_k: int) -> Reference:
        """The unpruned model's :class:`~evoreap.reference.Reference` on every row of the data, in the data's own
        batches (as :func:`~evoreap.reference.build_reference` makes it on the resident model). With a
        ``resume_dir`` it checkpoints after every layer like a stage: a killed build resumes after its last
        completed layer."""
        vocab = int(self.model.get_output_embeddings().weight.shape[0])
        builder = ReferenceBuilder(self.data, top_k, vocab)
        rows = torch.arange(len(self.data))
        (path,) = self._run([None], rows, None, use_store=False)  # the data's own batches: nothing to share
        self._head(rows, {path: builder.add})
        self._finish(rows)
        return builder.result(self.model_fp)

    # -- the layer loop ------------------------------------------------------------------------------------------------
    def _batches(self, rows: torch.Tensor) -> list[torch.Tensor]:
        return [rows[s:s + self.batch_size] for s in range(0, len(rows), self.batch_size)]

    def _stage_dir(self, candidates: Sequence[Masks], rows: torch.Tensor) -> tuple[Path, dict[str, Any]]:
        identity = {"format": _FORMAT, "candidates": sorted({self._key(m).hex() for m in candidates}),
                    "rows": rows.tolist(), "batch_size": self.batch_size, "layers": self.n_layers,
                    "model": self.model_fp, "seq_len": self.data.seq_len,
                    "data": hashlib.sha256(self.data.input_ids[rows].numpy().tobytes()
                                           + self.data.attention_mask[rows].numpy().tobytes()).hexdigest()}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        identity["masks_sha256"] = hashlib.sha256("".join(identity["candidates"]).encode()).hexdigest()
        identity.pop("candidates")  # the manifest stays small; the directory name pins them
        return self.resume_dir / f"stage-{digest[:24]}", identity

    def _run(self, candidates: Sequence[Masks], rows: torch.Tensor, progress: Progress | None,
             use_store: bool = True) -> list[tuple[int, ...]]:
        """Every decoder layer over every live node; leaves ``self._front`` holding the leaves' final states (or
        ``self._stored`` naming where the store holds them). A path starts, per batch, from the deepest node the
        store holds; a layer is read when some path still needs it."""
        for masks in candidates:  # a bad mask fails here, before any layer is read
            with masked(self.model, self.adapter, dict(masks or {})):
                pass
        paths = self._paths(candidates)
        leaves = list(dict.fromkeys(paths))
        mask_of = {p: dict(m or {}) for p, m in zip(paths, candidates)}
        batches = self._batches(rows)
        n, device = self.n_layers, self.seq.device
        sizes = [len(index) * self.data.seq_len for index in batches]
        per_row = scored_positions(self.data.attention_mask).sum(1)
        total = int(per_row[rows].sum()) * len(candidates)

        store = self.store if use_store else None
        start = {(p, b): 0 for p in leaves for b in range(len(batches))}
        self._names: dict[tuple[int, int], str] = {}
        if store is not None:
            node_key: dict[int, str] = {}
            for p in leaves:
                node_key.update(zip(p, self._prefixes(mask_of[p])))
            batch_keys = self._batch_keys(batches)
            self._names = {(node, b): StateStore.name(key, bk) for node, key in node_key.items() if node
                           for b, bk in enumerate(batch_keys)}
            for p, b in start:
                start[p, b] = next((d for d in range(n, 0, -1) if store.has(self._names[p[d], b])), 0)
                for d in range(1, start[p, b]):  # used whole: see PopulationEvaluator._advance
                    store.touch(self._names[p[d], b])

        done_layer, identity = -1, None
        if self.resume_dir is not None:
            directory, identity = self._stage_dir(candidates, rows)
            done_layer, files = _read_manifest(directory, identity)
            if done_layer >= 0:
                have = {tuple(int(x) for x in k.split("-")) for k in files}
                if all((p[done_layer + 1], b) in have for (p, b), s in start.items() if s <= done_layer + 1):
                    start = {k: max(s, done_layer + 1) for k, s in start.items()}
                else:  # planned with states the store no longer has: start over
                    log.warning("stage checkpoint %s misses states; the stage starts over", directory)
                    done_layer, files = -1, {}
            directory.mkdir(parents=True, exist_ok=True)
            self._tmp = None
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="evoreap-stream-")
            directory, files = Path(self._tmp.name), {}
        front = _Frontier(self.max_state_bytes, directory, keep_files_until_commit=self.resume_dir is not None)
        self._front, self._dir = front, directory
        if done_layer >= 0:
            front.files = {tuple(int(x) for x in k.split("-")): v for k, v in files.items()}
            log.info("resuming a streamed stage after layer %d of %d (%s)", done_layer, n, directory)
        if store is not None:  # what this stage starts from stays until it is done
            store.protect({self._names[p[s], b] for (p, b), s in start.items() if s > 0})
        cached = {(p[s], b): s * sizes[b] for (p, b), s in start.items() if s > 0 and done_layer < 0}
        self.work = self.work.plus(cached=sum(cached.values()))

        roots = {b for (_, b), s in start.items() if s == 0} if done_layer < 0 else set()
        args_of = self._arguments(batches, front, roots) if min(start.values()) < n else []
        with torch.inference_mode():
            for d in range(done_layer + 1, n):
                plan: list[dict[int, dict[int, torch.Tensor | None]]] = [{} for _ in batches]
                for (p, b), s in start.items():
                    if s <= d:
                        plan[b].setdefault(p[d], {})[p[d + 1]] = mask_of[p].get(d)
                if not any(plan):  # every path starts above this layer: not read
                    continue
                layer = self.decoder.layers[d]
                self.seq.loader.materialise(layer, f"{self.seq.prefix}layers.{d}.", device, self._buffers)
                self.layers_read.append(d)
                tokens = shared_tokens = 0
                try:
                    for b, children in enumerate(plan):
                        _, a, kw = args_of[b][d]
                        for parent, kids in children.items():
                            h = self._state(parent, b, device)
                            record: list | None = [] if len(kids) > 1 else None
                            for child, keep in kids.items():
                                with masked(self.model, self.adapter, {d: keep} if keep is not None else {}), \
                                        attention_shared(layer, self.adapter.spec.attention_attr, record) as shared:
                                    out = layer(h, *a, **kw)
                                out = out[0] if isinstance(out, tuple) else out
                                front.put((child, b), out)
                                if store is not None:
                                    store.put(self._names[child, b], out)
                                tokens += sizes[b]
                                shared_tokens += sizes[b] if shared else 0
                            front.drop((parent, b))
                            del h
                finally:
                    layer.to("meta")
                    # the layer's transient buffers leave free pages inside the heap: given back now, peak memory
                    # stays flat over the layers instead of creeping up with their number (measured: 150 MB by
                    # layer 7 of a 1.58 GB checkpoint's reference)
                    release_freed_memory()
                self.work = self.work.plus(computed=tokens, attention_shared=shared_tokens)
                if self.resume_dir is not None:
                    write_json_atomic(directory / MANIFEST, {**identity, "layer_done": d, "files": front.persist()})
                    front.commit()
                self.peak_state_bytes = max(self.peak_state_bytes, front.peak)
                self.spilled_state_bytes = front.spilled
                if progress is not None:
                    progress(total * (d + 1) // (n + 1), total)
        self._buffers.clear()  # the output head comes next: no layer's memory held under it
        self.work = self.work.plus(naive=len(candidates) * n * sum(sizes))
        self._total, self._progress = total, progress
        return paths

    def _state(self, node: int, b: int, device: torch.device) -> torch.Tensor:
        """A live node's states on batch ``b``: computed in this stage, or where the stage starts, from the store."""
        if (node, b) in self._front:
            return self._front.get((node, b), device)
        t = self.store.get(self._names[node, b], device) if self.store is not None and self._names else None
        if t is None:
            raise _StoreMiss(f"node {node} batch {b}")
        return t

    def _arguments(self, batches: list[torch.Tensor], front: _Frontier, roots: set[int]) -> list[dict[int, tuple]]:
        """Every layer's arguments per batch (attention masks, rotary tables) from one pass of the decoder whose
        layers are stand-ins, with the embeddings (and rotary module) materialised for it; layer 0's inputs on the
        batches ``roots`` go into ``front`` as the root node's states."""
        device = self.seq.device
        out: list[dict[int, tuple]] = []
        self.seq._materialise_outer()
        try:
            with torch.inference_mode():
                for b, index in enumerate(batches):
                    sink: dict[int, tuple] = {}
                    stand_ins = [LayerCapture(i, layer, sink) for i, layer in enumerate(self.decoder.layers)]
                    with _layers_replaced(self.decoder, stand_ins):
                        self.decoder(input_ids=self.data.input_ids[index].to(device),
                                     attention_mask=self.data.attention_mask[index].to(device), use_cache=False)
                    if b in roots:
                        front.put((0, b), sink[0][0])
                    out.append({i: (None, a, kw) for i, (_, a, kw) in sink.items()})
        finally:
            self.seq._free_outer()
        return out

    def _outer_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """The model's modules outside its decoder (the output head), with their names."""
        return [(name, child) for name, child in self.model.named_children() if child is not self.decoder]

    def _head(self, rows: torch.Tensor, sinks: dict[tuple[int, ...], Callable[[torch.Tensor, Iterator], None]]
              ) -> None:
        """Log-prob chunks of every leaf on every batch, through the model's own forward after its decoder layers
        (the embeddings, final norm and output head materialised once)."""
        device, n = self.seq.device, self.n_layers
        head = self.model.get_output_embeddings()
        tied = not self.seq.loader.sources(self._name_of(head) + ".weight", head.weight) and \
            getattr(self.model.config.get_text_config(), "tie_word_embeddings", False)
        self.seq._materialise_outer()
        try:
            for name, child in self._outer_modules():
                if child is head and tied:  # stored once, as the input embeddings
                    head.weight = self.model.get_input_embeddings().weight
                    continue
                self.seq.loader.materialise(child, f"{name}.", device)
            with torch.inference_mode():
                for b, index in enumerate(self._batches(rows)):
                    for leaf, add in sinks.items():
                        final = self._state(leaf[n], b, device)
                        stand_ins = [_Replay(i, layer, final) for i, layer in enumerate(self.decoder.layers)]
                        with _layers_replaced(self.decoder, stand_ins):
                            out = self.model(input_ids=self.data.input_ids[index].to(device),
                                             attention_mask=self.data.attention_mask[index].to(device),
                                             use_cache=False)
                        add(index, logit_chunks(out.logits))
                        del out, final
        finally:
            self.seq._free_outer()
            for _, child in self._outer_modules():
                child.to("meta")

    def _name_of(self, module: torch.nn.Module) -> str:
        return next(name for name, m in self.model.named_modules() if m is module)

    def _finish(self, rows: torch.Tensor) -> None:
        """The stage is scored: its states and checkpoint are removed."""
        if self._progress is not None:
            self._progress(self._total, self._total)
        self._discard()
        if self._tmp is None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _discard(self) -> None:
        """Forget the stage's live states (a checkpoint stays)."""
        if self._tmp is not None:
            self._tmp.cleanup()
        if self.store is not None:
            self.store.protect(set())
        self._front = None


def _read_manifest(directory: Path, identity: dict[str, Any]) -> tuple[int, dict[str, str]]:
    """The last completed layer of a checkpointed stage and its states' files; (-1, {}) when there is none (or it
    belongs to other inputs, or a file is missing: the stage then starts over)."""
    path = directory / MANIFEST
    if not path.is_file():
        return -1, {}
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("ignoring an unreadable stage checkpoint %s (%s); the stage starts over", path, e)
        return -1, {}
    if not isinstance(m, dict) or any(m.get(k) != v for k, v in identity.items()) or \
            not isinstance(m.get("layer_done"), int) or not isinstance(m.get("files"), dict):
        log.warning("ignoring a stage checkpoint of other inputs in %s; the stage starts over", directory)
        return -1, {}
    files = m["files"]
    # names come from a file on disk: only the names this module writes are accepted, so a crafted manifest cannot
    # make a resumed stage read, or later delete, a file outside its own directory
    if not all(isinstance(k, str) and re.fullmatch(r"\d+-\d+", k) and v == "n{}-b{}.safetensors".format(
            *k.split("-")) for k, v in files.items()):
        log.warning("ignoring a stage checkpoint with unexpected file names in %s; the stage starts over", directory)
        return -1, {}
    if not all((directory / v).is_file() for v in files.values()):
        log.warning("stage checkpoint %s misses state files; the stage starts over", directory)
        return -1, {}
    return m["layer_done"], files


def streamed_reference_cached(seq: SequentialModel, data: TokenData, *, top_k: int = 64,
                              cache_dir: str | Path | None = None, batch_size: int = 8,
                              max_state_bytes: int = DEFAULT_CACHE_BYTES) -> Reference:
    """:func:`evoreap.reference.reference_cached` for a streamed model: the same cache entry (same key) as the
    resident model's, built layer by layer when missing. The build checkpoints after every layer under
    ``<cache root>/streamed-reference/`` (a stage of one candidate, the unpruned model, named by the model
    fingerprint and the data), so a killed build resumes after its last completed layer."""
    fp = streamed_fingerprint(seq, cache_dir)
    partial = cache_root(cache_dir) / "streamed-reference"

    def build() -> Reference:
        log.info("building the reference layer by layer from %s", seq.path)
        ev = StreamedEvaluator(seq, data, batch_size=batch_size, max_state_bytes=max_state_bytes, model_fp=fp,
                               resume_dir=partial)
        ref = ev.reference_distributions(top_k)
        try:  # the stage's own directory is gone; the parent too when no other build is under way
            partial.rmdir()
        except OSError:
            pass
        return ref

    return cached_reference(fp, data, top_k, cache_dir, build)
