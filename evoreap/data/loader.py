"""Read documents from data sources and pack them into fixed-length token sequences."""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evoreap.data.spec import DataSource, parse_data_spec
from evoreap.demo.corpus import corpus_path, load_texts
from evoreap.errors import EvoreapError, UsageError
from evoreap.files import sha256_file  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenData:
    """Packed token sequences with their domain labels.

    ``input_ids``/``attention_mask`` are ``[N, L]``; ``domain_ids[n]`` indexes ``domains``. ``fingerprints`` maps each
    domain to the sha256 of exactly the token ids used, ``file_hashes`` each source file to the sha256 of its bytes.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    domain_ids: torch.Tensor
    domains: tuple[str, ...]
    fingerprints: dict[str, str] = field(default_factory=dict)
    file_hashes: dict[str, str] = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self), batch_size):
            yield (self.input_ids[i:i + batch_size], self.attention_mask[i:i + batch_size],
                   self.domain_ids[i:i + batch_size])

    def subset(self, index: torch.Tensor | list[int]) -> TokenData:
        index = torch.as_tensor(index, dtype=torch.long)
        return TokenData(self.input_ids[index], self.attention_mask[index], self.domain_ids[index], self.domains,
                         self.fingerprints, self.file_hashes)


def _render(record: dict[str, Any], tokenizer: Any, where: str) -> str:
    if isinstance(record.get("text"), str):
        return record["text"]
    messages = record.get("messages")
    if isinstance(messages, list):
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)
    raise UsageError(f"{where}: a record has neither a 'text' string nor a 'messages' list (fields: "
                     f"{', '.join(sorted(record)) or 'none'}); convert it to one of those")


def _read_file(path: str, tokenizer: Any) -> list[str]:
    p = Path(path)
    raw = p.read_bytes()
    if not raw.strip():
        raise UsageError(f"data file {path} is empty; give a file with text in it")
    suffix = p.suffix.lower()
    if suffix in (".txt", ".jsonl", ".json") and b"\x00" in raw[:65536]:
        raise UsageError(f"data file {path} looks binary (it holds NUL bytes), not {suffix} text")
    if suffix == ".txt":
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"data file {path} is not UTF-8 text; convert it (iconv -t utf-8)") from None
        return [d.strip() + "\n" for d in text.split("\n\n\n") if d.strip()] or [text]
    import datasets

    builder = "parquet" if suffix == ".parquet" else "json"
    try:
        ds = datasets.load_dataset(builder, data_files=str(p), split="train")
    except Exception as e:  # datasets raises many types for malformed files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot read data file {path} as {builder}: {first}") from None
    return [_render(r, tokenizer, str(path)) for r in ds]


def read_documents(source: DataSource, tokenizer: Any = None) -> list[str]:
    """The documents of one source, as text."""
    if source.kind == "demo":
        return load_texts(source.location, source.split)
    if source.kind == "file":
        return _read_file(source.location, tokenizer)
    import datasets

    try:
        ds = datasets.load_dataset(source.location, split=source.split)
    except Exception as e:
        raise EvoreapError(f"cannot load dataset {source.location!r} (split {source.split}): "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; is a hub reachable? "
                           "Otherwise download it and pass the local file") from None
    return [_render(r, tokenizer, source.location) for r in ds]


def source_hash(source: DataSource) -> str | None:
    if source.kind == "demo":
        return sha256_file(corpus_path(source.location, source.split))
    if source.kind == "file":
        return sha256_file(source.location)
    return None


def _pack(docs: list[str], tokenizer: Any, seq_len: int, limit: int | None, seed: int) -> tuple[np.ndarray, int]:
    """Shuffle documents (seeded), tokenise them EOS-separated and cut full ``seq_len`` rows (stop at ``limit``).
    Returns the rows and the number of tokens read."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    need = None if limit is None else limit * seq_len
    for i in order:
        ids.extend(tokenizer(docs[i], add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    rows = len(ids) // seq_len if limit is None else min(limit, len(ids) // seq_len)
    return np.asarray(ids[: rows * seq_len], dtype=np.int64).reshape(rows, seq_len), len(ids)


def load_tokens(spec: str | list[DataSource], tokenizer: Any, *, split: str, seq_len: int,
                tokens: int | None = None, samples: int | None = None, seed: int = 0) -> TokenData:
    """Load, tokenise and pack the data of ``spec``.

    The number of sequences asked for is ``samples``, or ``ceil(tokens / seq_len)``, or everything available; each
    source gets its weight's share rounded up (at least one sequence), so with several sources the total can exceed
    it by up to one sequence per source. A source with less than one full sequence is an error.
    """
    if seq_len <= 0:
        raise UsageError(f"--seq-len must be a positive number of tokens, got {seq_len}")
    if tokens is not None and tokens <= 0 or samples is not None and samples <= 0:
        raise UsageError("--tokens and --samples must be positive")
    sources = parse_data_spec(spec, split) if isinstance(spec, str) else spec
    total = samples if samples is not None else (math.ceil(tokens / seq_len) if tokens is not None else None)
    rows, labels, names, prints, hashes = [], [], [], {}, {}
    for k, src in enumerate(sources):
        # rounded up, so that the sources together cover at least what was asked for
        limit = None if total is None else max(1, math.ceil(total * src.weight - 1e-9))
        docs = read_documents(src, tokenizer)
        packed, available = _pack(docs, tokenizer, seq_len, limit, seed + k)
        if len(packed) == 0:
            raise UsageError(f"data source {src.name} has {available} tokens, fewer than one sequence of "
                             f"{seq_len}; lower --seq-len or add data")
        if limit is not None and len(packed) < limit:
            log.warning("data source %s has only %d sequences of %d tokens (asked for %d)", src.name, len(packed),
                        seq_len, limit)
        rows.append(torch.from_numpy(packed))
        labels.append(torch.full((len(packed),), k, dtype=torch.long))
        names.append(src.name)
        prints[src.name] = hashlib.sha256(packed.tobytes()).hexdigest()
        h = source_hash(src)
        if h is not None:
            hashes[src.location if src.kind == "file" else f"demo:{src.location}@{src.split}"] = h
    input_ids = torch.cat(rows)
    return TokenData(input_ids, torch.ones_like(input_ids), torch.cat(labels), tuple(names), prints, hashes)
