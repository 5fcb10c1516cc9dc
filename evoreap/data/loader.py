"""Read documents from data sources and pack them into fixed-length token sequences."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evoreap.adapters.adapter import text_config
from evoreap.data.bundled import corpus_path, load_texts
from evoreap.data.spec import DataSource, as_sources
from evoreap.errors import EvoreapError, UsageError
from evoreap.files import sha256_file  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

# Tokenising is bounded by what is still needed: at most this many characters per missing token are handed to the
# tokenizer at a time (real tokenizers average 2-6 characters per token), so a single 50 MB line is not tokenised
# whole to take a few hundred tokens from its start.
CHARS_PER_TOKEN_BOUND = 64


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

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def batch(self, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch ``index`` of ``batch_size`` sequences (the last one may be shorter): ids, mask, domain ids."""
        lo = index * batch_size
        return self.input_ids[lo:lo + batch_size], self.attention_mask[lo:lo + batch_size], \
            self.domain_ids[lo:lo + batch_size]

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Batches ``[start, stop)`` (all by default) in order, as :meth:`batch` gives them: every forward pass over
        the data (observation, reference, benchmarks) batches it the same way."""
        stop = self.num_batches(batch_size) if stop is None else min(stop, self.num_batches(batch_size))
        for b in range(start, stop):
            yield self.batch(b, batch_size)

    def subset(self, index: torch.Tensor | list[int]) -> TokenData:
        index = torch.as_tensor(index, dtype=torch.long)
        return TokenData(self.input_ids[index], self.attention_mask[index], self.domain_ids[index], self.domains,
                         self.fingerprints, self.file_hashes)


def _render(record: dict[str, Any], tokenizer: Any, where: str) -> str:
    """One record's text: its ``text`` string, or its chat ``messages`` rendered (chat template, else
    ``role: content`` lines). ``where`` names the file and line (or record) for errors."""
    if isinstance(record.get("text"), str):
        return record["text"]
    messages = record.get("messages")
    if isinstance(messages, list):
        for j, m in enumerate(messages, 1):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                shown = repr(m)
                shown = shown if len(shown) <= 40 else shown[:37] + "..."
                raise UsageError(f"{where}: message {j} of 'messages' is {shown}, not an object with string 'role' "
                                 'and \'content\'; write e.g. {"role": "user", "content": "hi"}')
        if getattr(tokenizer, "chat_template", None):
            try:
                return tokenizer.apply_chat_template(messages, tokenize=False)
            except Exception as e:  # jinja raises many types for messages a template does not accept
                first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
                raise UsageError(f"{where}: the tokenizer's chat template cannot render these messages ({first}); "
                                 "fix the record or give plain 'text'") from None
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    raise UsageError(f"{where}: a record has neither a 'text' string nor a 'messages' list (fields: "
                     f"{', '.join(sorted(map(str, record))) or 'none'}); convert it to one of those")


def _read_jsonl(path: str, text: str, tokenizer: Any) -> list[str]:
    """The documents of a JSON-lines file, one record per non-blank line; errors name the line."""
    docs = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028 raw
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except RecursionError:
            raise UsageError(f"{path}, line {n}: the record is nested too deeply to read") from None
        except ValueError as e:
            raise UsageError(f"{path}, line {n}: not valid JSON ({str(e).splitlines()[0][:120]}); each line must "
                             "be one JSON object") from None
        if not isinstance(record, dict):
            raise UsageError(f"{path}, line {n}: a record must be a JSON object with a 'text' string or a "
                             f"'messages' list, not {type(record).__name__}")
        docs.append(_render(record, tokenizer, f"{path}, line {n}"))
    return docs


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
    if suffix == ".jsonl":
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise UsageError(f"{path}, line {line}: not UTF-8 text; convert the file (iconv -t utf-8)") from None
        return _read_jsonl(path, text, tokenizer)
    import datasets  # lazy: ~1 s to import, only for parquet/JSON files and hub datasets

    builder = "parquet" if suffix == ".parquet" else "json"
    try:
        ds = datasets.load_dataset(builder, data_files=str(p), split="train")
    except Exception as e:  # datasets raises many types for malformed files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot read data file {path} as {builder}: {first}") from None
    return [_render(r, tokenizer, f"{path}, record {i}") for i, r in enumerate(ds, 1)]


def read_documents(source: DataSource, tokenizer: Any = None) -> list[str]:
    """The documents of one source, as text."""
    if source.kind == "demo":
        return load_texts(source.location, source.split)
    if source.kind == "file":
        return _read_file(source.location, tokenizer)
    if source.kind == "dataset":
        return [_render(r, tokenizer, f"{source.name}, record {i}") for i, r in enumerate(source.dataset, 1)]
    import datasets  # lazy: ~1 s to import, only for parquet/JSON files and hub datasets

    try:
        ds = datasets.load_dataset(source.location, split=source.split)
    except Exception as e:
        raise EvoreapError(f"cannot load dataset {source.location!r} (split {source.split}): "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; is a hub reachable? "
                           "Otherwise download it and pass the local file") from None
    return [_render(r, tokenizer, f"{source.location}, record {i}") for i, r in enumerate(ds, 1)]


def source_hash(source: DataSource) -> str | None:
    if source.kind == "demo":
        return sha256_file(corpus_path(source.location, source.split))
    if source.kind == "file":
        return sha256_file(source.location)
    if source.kind == "dataset":
        return source.location.split(":", 1)[1]  # datasets' own content fingerprint
    return None


def _pack(docs: list[str], tokenizer: Any, seq_len: int, limit: int | None, seed: int) -> tuple[np.ndarray, int]:
    """Shuffle documents (seeded), tokenise them EOS-separated and cut full ``seq_len`` rows (stop at ``limit``).
    Returns the rows and the number of tokens read.

    With a ``limit`` a document is handed to the tokenizer at most ``CHARS_PER_TOKEN_BOUND`` characters per token
    still needed at a time, and not read past the point where enough tokens are there: a huge document costs what is
    taken from it, not its size. Documents shorter than that bound (all ordinary ones) are tokenised whole, exactly
    as before."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    need = None if limit is None else limit * seq_len

    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    for i in order:
        doc = docs[i]
        if need is None or len(doc) <= CHARS_PER_TOKEN_BOUND * (need - len(ids)):
            ids.extend(tokens(doc))
        else:  # a long document: take it piece by piece until enough tokens are there
            pos = 0
            while pos < len(doc) and len(ids) < need:
                step = CHARS_PER_TOKEN_BOUND * (need - len(ids))
                ids.extend(tokens(doc[pos:pos + step]))
                pos += step
            if pos < len(doc):  # enough tokens from inside this document: no EOS, nothing more to read
                break
        if eos is not None:
            ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    rows = len(ids) // seq_len if limit is None else min(limit, len(ids) // seq_len)
    return np.asarray(ids[: rows * seq_len], dtype=np.int64).reshape(rows, seq_len), len(ids)


def check_seq_len(seq_len: int, model_config: Any = None) -> None:
    """Refuse a ``--seq-len`` below 2 (a row of L tokens scores L-1 next-token predictions) or, given the model's
    config, longer than its positions (``max_position_embeddings``)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2 tokens (a row of L tokens scores L-1 next-token "
                         f"predictions), got {seq_len}")
    if model_config is None:
        return
    limit = getattr(text_config(model_config), "max_position_embeddings", None)
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < seq_len:
        raise UsageError(f"--seq-len {seq_len} is longer than the model's {limit} positions "
                         f"(max_position_embeddings in its config.json); use --seq-len {limit} or less")


def load_tokens(spec: Any, tokenizer: Any, *, split: str, seq_len: int,
                tokens: int | None = None, samples: int | None = None, seed: int = 0,
                model_config: Any = None) -> TokenData:
    """Load, tokenise and pack the data of ``spec``.

    The number of sequences asked for is ``samples``, or ``ceil(tokens / seq_len)``, or everything available; each
    source gets its weight's share rounded up (at least one sequence), so with several sources the total can exceed
    it by up to one sequence per source. A source with less than one full sequence is an error. With
    ``model_config``, a ``seq_len`` beyond the model's positions is refused (:func:`check_seq_len`).
    """
    check_seq_len(seq_len, model_config)
    if tokens is not None and tokens <= 0 or samples is not None and samples <= 0:
        raise UsageError("--tokens and --samples must be positive")
    sources = as_sources(spec, split)
    total = samples if samples is not None else (-(-tokens // seq_len) if tokens is not None else None)
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
            hashes[f"demo:{src.location}@{src.split}" if src.kind == "demo" else src.location] = h
    input_ids = torch.cat(rows)
    return TokenData(input_ids, torch.ones_like(input_ids), torch.cat(labels), tuple(names), prints, hashes)
