"""The unpruned model's next-token distributions, computed once and cached on disk.

Full-vocabulary logits do not fit anywhere for real models (64 x 4096 tokens x 152k vocab is ~160 GB in fp32), so
a :class:`Reference` keeps, per scored position, only the top-K log-probabilities with their token ids, the log of
the probability mass outside them (the *tail*), the log-probability of the actual next token and a validity flag.
The proxies in :mod:`evoreap.proxies` compare a candidate against this coarsened distribution.

Position ``t`` of a row scores the prediction of token ``t + 1`` from tokens ``0..t`` (teacher forcing); it is
valid when both tokens are real (attention mask 1). Rows follow the row order of the :class:`TokenData` it was
built from, which its fingerprint pins down.

Cache layout: ``<cache root>/reference/<key>/{reference.safetensors, manifest.json}`` where the cache root is
``$EVOREAP_CACHE`` or ``~/.cache/evoreap`` and ``key`` hashes the model fingerprint (config, routers, dtype and all
weights), the data fingerprint and K. The manifest records the sha256 of ``reference.safetensors``; an entry whose
manifest is damaged, whose checksum or shapes disagree, or that was made for other inputs is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from evoreap.adapters import MoEAdapter
from evoreap.data import TokenData
from evoreap.errors import EvoreapError, UsageError
from evoreap.files import cache_root, shareable, sha256_file, write_json_atomic
from evoreap.fingerprint import versions, weights_fingerprint
from evoreap.observe.store import data_fingerprints, router_tensors
from evoreap.observe.store import model_fingerprint as store_fingerprint

log = logging.getLogger(__name__)

FORMAT = "evoreap-reference"
VERSION = 3  # 2: the model fingerprint covers all weights; the manifest holds the file's sha256. 3: log-probs from
# log_partition, the normaliser every candidate uses (a version-2 entry differs by up to 1e-5: rebuilt)
# Floor for log-masses: keeps 0 * (log p - log q) at 0 instead of NaN when a mass underflows (exp(-1e4) == 0).
LOG_FLOOR = -1e4
# Positions per chunk of the output head's values are chosen so that a float32 chunk [B, positions, V] holds about
# this many elements (one position at least), bounded whatever the vocabulary. On a CPU, small enough to stay in a
# core's cache through the few passes over it (`benchmarks/proxy.py --vocab-passes`: on a 50k vocabulary the proxies
# run 6.9x faster than on a log-softmax of the whole batch); on an accelerator, large, since every chunk costs
# several kernel launches.
_CPU_CHUNK_ELEMENTS = 1 << 18
_CHUNK_ELEMENTS = 1 << 26
_TENSORS = ("topk_logprobs", "topk_ids", "tail_logmass", "target_logprob", "valid")


# -- fingerprints -----------------------------------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return str(t.dtype).encode() + str(tuple(t.shape)).encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_fingerprint(model: torch.nn.Module, cache_dir: str | Path | None = None) -> str:
    """The observation store's model fingerprint (sha256 of the config minus load-location keys, of every router
    weight and bias and of all weights, :func:`evoreap.fingerprint.weights_fingerprint`; no tokenizer) plus the
    compute dtype, which changes the distributions. ``cache_dir``: where checkpoint file hashes are cached.

    Cached per model object and recomputed when any parameter or buffer is replaced or modified in place (tensor
    version counters), so calling it once per candidate evaluation is free.
    """
    now = versions(model)
    hit = _FINGERPRINTS.get(model)
    if now is not None and hit is not None and hit[0] == now:
        return hit[1]
    adapter = MoEAdapter.for_model(model)
    digest = fingerprint_of(adapter.config, router_tensors(model, adapter), weights_fingerprint(model, cache_dir),
                            next(model.parameters()).dtype)
    if now is not None:
        _FINGERPRINTS[model] = (now, digest)
    return digest


def fingerprint_of(config: Any, routers: dict[str, torch.Tensor], weights: str, dtype: torch.dtype) -> str:
    """:func:`model_fingerprint` from its parts, for a model that is not resident (streamed from its shards: the
    routers read from the files, ``weights`` their :func:`~evoreap.fingerprint.checkpoint_fingerprint`)."""
    base = store_fingerprint(config, routers, weights=weights)["sha256"]
    return hashlib.sha256(f"{base}:{str(dtype).replace('torch.', '')}".encode()).hexdigest()


def data_fingerprint(data: TokenData) -> str:
    """sha256 of exactly the token ids and attention mask in row order (the reference is aligned to rows, so the
    per-domain fingerprints of the observation store are not enough)."""
    h = hashlib.sha256()
    h.update(_tensor_bytes(data.input_ids.to(torch.int64)))
    h.update(_tensor_bytes(data.attention_mask.to(torch.bool)))
    return h.hexdigest()


def reference_key(model_fp: str, data_fp: str, top_k: int) -> str:
    blob = json.dumps({"format": FORMAT, "version": VERSION, "model": model_fp, "data": data_fp, "top_k": top_k},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# -- teacher-forced log-probs -----------------------------------------------------------------------------------------
def scored_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[N, L-1]``: position t predicts token t+1 and both are real tokens."""
    mask = attention_mask.to(torch.bool)
    return mask[:, :-1] & mask[:, 1:]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def next_token_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
                      ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """One forward pass; yields ``(start, end, logits [B, end-start, V])`` over the L-1 scored positions (see
    :func:`logit_chunks`)."""
    device = model_device(model)
    out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    return logit_chunks(out.logits)


def logit_chunks(logits: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, end, logits[:, start:end])`` over the L-1 scored positions of ``logits`` ``[B, L, V]``: views in the
    model's dtype, in chunks small enough that a float32 pass over one stays in cache whatever the vocabulary."""
    b, length, vocab = logits.shape
    bound = _CPU_CHUNK_ELEMENTS if logits.device.type == "cpu" else _CHUNK_ELEMENTS
    step = max(1, bound // max(1, b * vocab))
    for start in range(0, length - 1, step):
        end = min(length - 1, start + step)
        yield start, end, logits[:, start:end]


def log_partition(logits: torch.Tensor, ids: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(log Z, tail)`` over the last dimension of ``logits`` ``[..., V]``, in float32 (float64 for float64 logits),
    from one exponential pass: ``log Z = log sum_v exp(logits_v)`` (log-probs are ``logits - log Z``), and given
    ``ids`` ``[..., K]`` (distinct), ``tail`` = log of the probability outside ``ids``, summed over the rest of the
    vocabulary (exact, unlike log(1 - the ids' probabilities)) and floored at :data:`LOG_FLOOR`.

    The reference and every candidate go through this same function, so the unpruned model's KL against its own
    reference is 0 exactly.
    """
    # one float copy, then in place (never the caller's tensor): converting first is 4x faster than reducing
    # bfloat16 values directly
    exp = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)
    shift = exp.detach().amax(-1, keepdim=True)
    exp.sub_(shift).exp_()
    if ids is None:
        return shift.squeeze(-1) + exp.sum(-1).log(), None
    ids = ids.long()
    inside = exp.gather(-1, ids).sum(-1)
    # zeroed in place unless autograd needs the exponentials (router repair differentiates this)
    rest = (exp.scatter(-1, ids, 0.0) if exp.requires_grad else exp.scatter_(-1, ids, 0.0)).sum(-1)
    total = (rest + inside).log()
    return shift.squeeze(-1) + total, (rest.log() - total).clamp_min(LOG_FLOOR)


# -- the record -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Reference:
    """Top-K next-token distributions of the unpruned model over every row of one :class:`TokenData`.

    Attributes:
        topk_logprobs: ``[N, L-1, K]`` float32, descending.
        topk_ids: ``[N, L-1, K]`` int32 token ids of those log-probs.
        tail_logmass: ``[N, L-1]`` float32, log(1 - sum of the top-K probabilities), floored at ``LOG_FLOOR``.
        target_logprob: ``[N, L-1]`` float32, log-prob of the actual next token.
        valid: ``[N, L-1]`` bool, both tokens of the position are real.
        model_fingerprint, data_fingerprint: what it was computed from (see :func:`model_fingerprint`).
        top_k: K; ``vocab_size``: V (K == V makes the top-K proxies exact).
    """

    topk_logprobs: torch.Tensor
    topk_ids: torch.Tensor
    tail_logmass: torch.Tensor
    target_logprob: torch.Tensor
    valid: torch.Tensor
    model_fingerprint: str
    data_fingerprint: str
    top_k: int
    vocab_size: int
    domains: tuple[str, ...] = ()
    data_fingerprints: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return reference_key(self.model_fingerprint, self.data_fingerprint, self.top_k)

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum())

    def check(self, model: torch.nn.Module | None = None, data: TokenData | None = None) -> None:
        """Refuse (EvoreapError) to be used with another model or other tokens than it was built from."""
        if model is not None and model_fingerprint(model) != self.model_fingerprint:
            raise EvoreapError("the reference distributions were computed with another model (weights or config "
                               "differ); rebuild it for this model with reference_cached(model, data, ...)")
        if data is not None and data_fingerprint(data) != self.data_fingerprint:
            raise EvoreapError(f"the reference distributions were computed on other tokens ({len(data)} rows of "
                               f"{data.seq_len} given, reference has {self.valid.shape[0]} rows of "
                               f"{self.valid.shape[1] + 1}); rebuild it for this data")

    def rows(self, index: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The per-position tensors of rows ``index``, on ``device``."""
        return {name: getattr(self, name)[index].to(device) for name in _TENSORS}

    # -- files ----------------------------------------------------------------------------------------------------
    def manifest(self, sha256: str | None = None) -> dict[str, Any]:
        n, t, k = self.topk_logprobs.shape
        return {"format": FORMAT, "version": VERSION, "key": self.key, "model_fingerprint": self.model_fingerprint,
                "data_fingerprint": self.data_fingerprint, "data_fingerprints": dict(self.data_fingerprints),
                "domains": list(self.domains), "top_k": self.top_k, "vocab_size": self.vocab_size,
                "rows": n, "positions": t, "tokens": self.num_tokens, "sha256": sha256,
                "tail": "log of the probability mass outside the top-K ids, floored at %g" % LOG_FLOOR}

    def save(self, directory: str | Path) -> Path:
        """Write ``reference.safetensors`` then ``manifest.json`` with its sha256 (the manifest marks a complete
        entry)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".reference.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({name: getattr(self, name).contiguous().cpu() for name in _TENSORS}, tmp,
                      metadata={"format": FORMAT, "key": self.key})
            shareable(tmp)  # mkstemp and safetensors write 0600
            digest = sha256_file(tmp)
            os.replace(tmp, directory / "reference.safetensors")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        write_json_atomic(directory / "manifest.json", self.manifest(digest))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Reference:
        """Read and verify a stored reference: manifest fields and types, the file's sha256, tensor shapes and
        dtypes, and the key (EvoreapError on any mismatch; UsageError when there is no manifest)."""
        directory = Path(directory)
        mpath = directory / "manifest.json"
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"{directory} holds no reference (manifest.json missing)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EvoreapError(f"{mpath} is corrupt ({e}); delete the directory to rebuild") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise EvoreapError(f"{directory} is not an evoreap reference of version {VERSION}; delete it to rebuild")
        problem = _manifest_problem(manifest)
        if problem:
            raise EvoreapError(f"{mpath} is damaged ({problem}); delete the directory to rebuild")
        path = directory / "reference.safetensors"
        try:
            digest = sha256_file(path)
        except OSError as e:
            raise EvoreapError(f"cannot read {path} ({e.strerror or e}); delete the directory to rebuild") from None
        if digest != manifest["sha256"]:
            raise EvoreapError(f"{path} is corrupted (sha256 mismatch with the manifest); delete the directory to "
                               "rebuild")
        try:
            tensors = load_file(path)
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise EvoreapError(f"cannot read {path} ({e}); delete the directory to rebuild") from None
        n, t, k = manifest["rows"], manifest["positions"], manifest["top_k"]
        want = {"topk_logprobs": (torch.float32, [n, t, k]), "topk_ids": (torch.int32, [n, t, k]),
                "tail_logmass": (torch.float32, [n, t]), "target_logprob": (torch.float32, [n, t]),
                "valid": (torch.bool, [n, t])}
        for name, (dtype, shape) in want.items():
            got = tensors.get(name)
            if got is None or got.dtype != dtype or list(got.shape) != shape:
                what = "is missing" if got is None else f"is {got.dtype} {list(got.shape)}, not {dtype} {shape}"
                raise EvoreapError(f"{path}: {name} {what}; delete the directory to rebuild")
        ids = tensors["topk_ids"]
        # the proxies gather at these ids and sum the mass outside them: an id out of range would fail there, a
        # repeated one would count its mass twice
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= manifest["vocab_size"]):
            raise EvoreapError(f"{path}: topk_ids holds token ids outside 0..{manifest['vocab_size'] - 1}; delete the "
                               "directory to rebuild")
        if k > 1 and bool((ids.sort(dim=-1).values.diff(dim=-1) == 0).any()):
            raise EvoreapError(f"{path}: topk_ids repeats a token id at one position; delete the directory to rebuild")
        ref = cls(**{n: tensors[n] for n in _TENSORS}, model_fingerprint=manifest["model_fingerprint"],
                  data_fingerprint=manifest["data_fingerprint"], top_k=manifest["top_k"],
                  vocab_size=manifest["vocab_size"], domains=tuple(manifest["domains"]),
                  data_fingerprints=dict(manifest["data_fingerprints"]))
        if manifest["key"] != ref.key:
            raise EvoreapError(f"{directory}: manifest key does not match its contents; delete it to rebuild")
        return ref


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with a reference manifest's fields (format and version already checked), or None."""
    def count(v: Any, least: int = 0) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    for name in ("key", "model_fingerprint", "data_fingerprint"):
        if not isinstance(m.get(name), str):
            return f"{name!r} is missing or not a string"
    sha = m.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        return "'sha256' is missing or not a sha256 digest"
    for name, least in (("top_k", 1), ("vocab_size", 1), ("rows", 0), ("positions", 0)):
        if not count(m.get(name), least):
            return f"{name!r} is missing or not an integer >= {least}"
    if m["top_k"] > m["vocab_size"]:
        return "'top_k' exceeds 'vocab_size'"
    if not isinstance(m.get("domains"), list) or not all(isinstance(d, str) for d in m["domains"]):
        return "'domains' is missing or not a list of strings"
    fps = m.get("data_fingerprints")
    if not isinstance(fps, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in fps.items()):
        return "'data_fingerprints' is missing or not a map of strings"
    return None


# -- building ---------------------------------------------------------------------------------------------------------
class ReferenceBuilder:
    """Fills a :class:`Reference` batch by batch from chunks of the output head's values (shared by the resident
    forward and the layer-streamed one of :mod:`evoreap.proxies.streamed`)."""

    def __init__(self, data: TokenData, top_k: int, vocab: int):
        if not 1 <= top_k <= vocab:
            raise UsageError(f"reference top-K must lie between 1 and the vocabulary size {vocab}, got {top_k}")
        if data.seq_len < 2:
            raise UsageError("sequences need at least 2 tokens to score a next-token prediction")
        self.data, self.top_k, self.vocab = data, top_k, vocab
        n, positions = len(data), data.seq_len - 1
        self.topk_lp = torch.empty(n, positions, top_k, dtype=torch.float32)
        self.topk_ids = torch.empty(n, positions, top_k, dtype=torch.int32)
        self.tail = torch.empty(n, positions, dtype=torch.float32)
        self.target = torch.empty(n, positions, dtype=torch.float32)

    def add(self, index: torch.Tensor | slice, chunks: Iterator[tuple[int, int, torch.Tensor]]) -> None:
        """The rows ``index`` of the data, whose logits ``chunks`` yields (see :func:`next_token_logits`)."""
        ids = self.data.input_ids[index]
        targets = None
        for s, e, logits in chunks:
            if targets is None:
                targets = ids[:, 1:].to(logits.device)
            logits = logits.float()
            values, top = torch.topk(logits, self.top_k, dim=-1)
            log_z, tail = log_partition(logits, top)
            self.topk_lp[index, s:e] = (values - log_z[..., None]).cpu()
            self.topk_ids[index, s:e] = top.to(torch.int32).cpu()
            self.tail[index, s:e] = tail.cpu()
            self.target[index, s:e] = (logits.gather(-1, targets[:, s:e, None].long()).squeeze(-1) - log_z).cpu()

    def result(self, model_fp: str) -> Reference:
        data = self.data
        return Reference(self.topk_lp, self.topk_ids, self.tail, self.target, scored_positions(data.attention_mask),
                         model_fp, data_fingerprint(data), self.top_k, self.vocab, tuple(data.domains),
                         data_fingerprints(data))


def build_reference(model: torch.nn.Module, data: TokenData, *, top_k: int = 64, batch_size: int = 8,
                    progress: bool = True) -> Reference:
    """Run the (unmasked) model once over every row of ``data`` and keep the top-``top_k`` log-probs per position."""
    vocab = int(model.get_output_embeddings().weight.shape[0])
    if batch_size <= 0:
        raise UsageError(f"batch size must be positive, got {batch_size}")
    builder = ReferenceBuilder(data, top_k, vocab)
    bar = tqdm(total=len(data), desc="reference", unit="seq", disable=not progress)
    with torch.inference_mode():
        row = 0
        for ids, mask, _ in data.batches(batch_size):
            rows = slice(row, row + ids.shape[0])
            row += ids.shape[0]
            builder.add(rows, next_token_logits(model, ids, mask))
            bar.update(ids.shape[0])
    bar.close()
    return builder.result(model_fingerprint(model))


def reference_cached(model: torch.nn.Module, data: TokenData, *, top_k: int = 64,
                     cache_dir: str | Path | None = None, batch_size: int = 8, progress: bool = True) -> Reference:
    """Load the reference for (model, data, top_k) from the cache, or build and store it.

    ``cache_dir`` is the cache root (default :func:`cache_root`); entries live under ``<root>/reference/<key>``.
    """
    return cached_reference(model_fingerprint(model, cache_dir), data, top_k, cache_dir,
                            lambda: build_reference(model, data, top_k=top_k, batch_size=batch_size, progress=progress))


def cached_reference(model_fp: str, data: TokenData, top_k: int, cache_dir: str | Path | None,
                     build: Callable[[], Reference]) -> Reference:
    """The cached reference of the model fingerprinted ``model_fp`` on ``data``, or ``build()``'s, stored: one
    cache entry whichever way the model runs (resident or streamed from its shards)."""
    root = cache_root(cache_dir)
    key = reference_key(model_fp, data_fingerprint(data), top_k)
    directory = root / "reference" / key
    if (directory / "manifest.json").exists():
        try:
            ref = Reference.load(directory)
            if ref.key != key or ref.model_fingerprint != model_fp:
                raise EvoreapError(f"{directory} holds the reference of other inputs (key {ref.key[:12]})")
            ref.check(data=data)
            log.info("reusing reference distributions from %s", directory)
            return ref
        except EvoreapError as e:
            log.warning("ignoring unusable cached reference (%s); rebuilding", e)
    ref = build()
    if ref.model_fingerprint != model_fp:
        raise EvoreapError("the reference was built from another model than the one it is cached for")
    ref.save(directory)
    log.info("stored reference distributions (%d tokens, top-%d) in %s", ref.num_tokens, top_k, directory)
    return ref
