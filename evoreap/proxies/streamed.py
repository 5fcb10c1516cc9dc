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
resumes after the last completed layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from evoreap.data import TokenData
from evoreap.errors import EvoreapError
from evoreap.files import write_json_atomic
from evoreap.fingerprint import checkpoint_fingerprint
from evoreap.masking import masked
from evoreap.observe.sequential import LayerCapture, SequentialModel
from evoreap.proxies.evaluate import ProxyResult, Tally, check_inputs, select_sequences
from evoreap.proxies.population import DEFAULT_CACHE_BYTES, Masks, PopulationEvaluator, Progress, WorkCount, \
    _layers_replaced, _Replay
from evoreap.reference import Reference, ReferenceBuilder, cached_reference, fingerprint_of, logprob_chunks, \
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


class StreamedEvaluator:
    """Scores lists of candidates (router masks) on ``data`` with the model streamed layer by layer from its shards.

    Same arguments and same values as :class:`~evoreap.proxies.population.PopulationEvaluator` (and so as
    :func:`evoreap.proxies.evaluate` on the resident model, per candidate). ``model_fp`` (default: computed from the
    files) is checked against the reference's; ``other_model=True`` skips that check (a pruned export compared with
    its source's reference). ``max_state_bytes`` bounds the hidden states kept in memory between layers (the rest
    goes to disk); ``resume_dir`` makes stages resumable (see the module docstring).
    """

    def __init__(self, seq: SequentialModel, data: TokenData, *, reference: Reference | None = None,
                 order: torch.Tensor | None = None, batch_size: int = 8, max_state_bytes: int = DEFAULT_CACHE_BYTES,
                 resume_dir: str | Path | None = None, model_fp: str | None = None, other_model: bool = False,
                 cache_dir: str | Path | None = None):
        self.seq, self.model, self.adapter, self.data = seq, seq.model, seq.adapter, data
        self.reference, self.order, self.batch_size = reference, order, batch_size
        self.max_state_bytes = max_state_bytes
        self.resume_dir = Path(resume_dir) if resume_dir is not None else None
        self.other_model, self.cache_dir = other_model, cache_dir
        self._fp = model_fp
        self.decoder = seq.decoder
        self.n_layers = len(self.decoder.layers)
        self.moe = set(self.adapter.moe_layer_indices)
        self._trie: dict[tuple[int, bytes | None], int] = {}
        self.work = WorkCount()
        self.layers_read: list[int] = []  # decoder layers materialised, in order (resume skips the done ones)
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
        paths = self._run(candidates, rows, progress)
        tallies = {p: Tally(specs, self.data, self.reference) for p in dict.fromkeys(paths)}
        self._head(rows, {p: tallies[p].add for p in tallies})
        self._finish(rows)
        self.work = WorkCount(self.work.computed, self.work.naive, self.work.cached,
                              self.work.candidates + len(candidates))
        return [tallies[p].result() for p in paths]

    def reference_distributions(self, top_k: int) -> Reference:
        """The unpruned model's :class:`~evoreap.reference.Reference` on every row of the data, in the data's own
        batches (as :func:`~evoreap.reference.build_reference` makes it on the resident model)."""
        vocab = int(self.model.get_output_embeddings().weight.shape[0])
        builder = ReferenceBuilder(self.data, top_k, vocab)
        rows = torch.arange(len(self.data))
        (path,) = self._run([None], rows, None)
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

    def _run(self, candidates: Sequence[Masks], rows: torch.Tensor, progress: Progress | None
             ) -> list[tuple[int, ...]]:
        """Every decoder layer over every live node; leaves ``self._front`` holding the leaves' final states."""
        for masks in candidates:  # a bad mask fails here, before any layer is read
            with masked(self.model, self.adapter, dict(masks or {})):
                pass
        paths = self._paths(candidates)
        leaves = list(dict.fromkeys(paths))
        mask_of = {p: dict(m or {}) for p, m in zip(paths, candidates)}
        batches = self._batches(rows)
        n, device = self.n_layers, self.seq.device
        positions = len(rows) * self.data.seq_len
        per_row = scored_positions(self.data.attention_mask).sum(1)
        total = int(per_row[rows].sum()) * len(candidates)

        done_layer, identity = -1, None
        if self.resume_dir is not None:
            directory, identity = self._stage_dir(candidates, rows)
            done_layer, files = _read_manifest(directory, identity)
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

        args_of = self._arguments(batches, front if done_layer < 0 else None)
        with torch.inference_mode():
            for d in range(done_layer + 1, n):
                children: dict[int, dict[int, torch.Tensor | None]] = {}
                for p in leaves:
                    children.setdefault(p[d], {})[p[d + 1]] = mask_of[p].get(d)
                layer = self.decoder.layers[d]
                self.seq.loader.materialise(layer, f"{self.seq.prefix}layers.{d}.", device)
                self.layers_read.append(d)
                try:
                    for b in range(len(batches)):
                        _, a, kw = args_of[b][d]
                        for parent, kids in children.items():
                            h = front.get((parent, b), device)
                            for child, keep in kids.items():
                                with masked(self.model, self.adapter, {d: keep} if keep is not None else {}):
                                    out = layer(h, *a, **kw)
                                front.put((child, b), out[0] if isinstance(out, tuple) else out)
                            front.drop((parent, b))
                            del h
                finally:
                    layer.to("meta")
                tokens = sum(len(k) for k in children.values()) * positions
                self.work = WorkCount(self.work.computed + tokens, self.work.naive, self.work.cached,
                                      self.work.candidates)
                if self.resume_dir is not None:
                    write_json_atomic(directory / MANIFEST, {**identity, "layer_done": d, "files": front.persist()})
                    front.commit()
                self.peak_state_bytes = max(self.peak_state_bytes, front.peak)
                self.spilled_state_bytes = front.spilled
                if progress is not None:
                    progress(total * (d + 1) // (n + 1), total)
        self.work = WorkCount(self.work.computed, self.work.naive + len(candidates) * n * positions,
                              self.work.cached, self.work.candidates)
        self._total, self._progress = total, progress
        return paths

    def _arguments(self, batches: list[torch.Tensor], front: _Frontier | None) -> list[dict[int, tuple]]:
        """Every layer's arguments per batch (attention masks, rotary tables) from one pass of the decoder whose
        layers are stand-ins, with the embeddings (and rotary module) materialised for it; layer 0's inputs go
        into ``front`` as the root node's states."""
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
                    if front is not None:
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
                        final = self._front.get((leaf[n], b), device)
                        stand_ins = [_Replay(i, layer, final) for i, layer in enumerate(self.decoder.layers)]
                        with _layers_replaced(self.decoder, stand_ins):
                            out = self.model(input_ids=self.data.input_ids[index].to(device),
                                             attention_mask=self.data.attention_mask[index].to(device),
                                             use_cache=False)
                        add(index, logprob_chunks(out.logits))
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
        if self._tmp is not None:
            self._tmp.cleanup()
        else:
            shutil.rmtree(self._dir, ignore_errors=True)
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
    resident model's, built layer by layer when missing."""
    fp = streamed_fingerprint(seq, cache_dir)

    def build() -> Reference:
        log.info("building the reference layer by layer from %s", seq.path)
        ev = StreamedEvaluator(seq, data, batch_size=batch_size, max_state_bytes=max_state_bytes, model_fp=fp)
        return ev.reference_distributions(top_k)

    return cached_reference(fp, data, top_k, cache_dir, build)
