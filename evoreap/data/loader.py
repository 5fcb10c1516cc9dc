"""Read documents from data sources and pack them into fixed-length token sequences."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evoreap.adapters.adapter import text_config
from evoreap.data.bundled import corpus_path, load_texts
from evoreap.data.spec import DataSource, as_sources, data_files
from evoreap.errors import UsageError
from evoreap.files import sha256_file, user_path  # noqa: F401  (sha256_file re-exported)

log = logging.getLogger(__name__)

# Tokenising is bounded by what is still needed: at most this many characters per missing token are handed to the
# tokenizer at a time (real tokenizers average 2-6 characters per token), so a single 50 MB line is not tokenised
# whole to take a few hundred tokens from its start.
CHARS_PER_TOKEN_BOUND = 64


# Streamed sources (hub datasets) are shuffled through a buffer of this many records (datasets' own
# IterableDataset.shuffle), so taking a few thousand sequences never reads a whole split.
SHUFFLE_BUFFER = 10_000
# Records checked per source before any model is loaded (check_sources): bad files fail in seconds, not after minutes.
PREFLIGHT_RECORDS = 64
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}


@dataclass(frozen=True)
class SourceRecord:
    """What one data source gave: enough for two people to tell whether their observations are comparable.

    ``fingerprint`` is the sha256 of the source's bytes (files, directories, bundled data) or datasets' content
    fingerprint (saved or in-memory datasets); None for a streamed hub dataset, whose ``tokens_sha256`` (of
    exactly the token ids taken) still identifies what was used. ``rows`` counts the records read."""

    name: str
    spec: str
    kind: str
    fingerprint: str | None
    rows: int
    sequences: int
    tokens: int
    tokens_sha256: str
    weight: float


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
    sources: tuple[SourceRecord, ...] = ()

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
                         self.fingerprints, self.file_hashes, self.sources)


def _messages(raw: Any, source: DataSource | None, where: str) -> list[dict[str, str]] | None:
    """The chat of a record's messages field as ``[{"role", "content"}]`` (keys mapped by the source's
    ``role=``/``content=`` options, ShareGPT role names read as user/assistant), or None if it is not a list."""
    if not isinstance(raw, list):
        return None
    role_key = source.option("role", "role") if source else "role"
    content_key = source.option("content", "content") if source else "content"
    out = []
    for j, m in enumerate(raw, 1):
        if not (isinstance(m, dict) and isinstance(m.get(role_key), str) and isinstance(m.get(content_key), str)):
            shown = repr(m)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise UsageError(f"{where}: message {j} of the chat is {shown}, not an object with string "
                             f"'{role_key}' and '{content_key}'; write e.g. {{\"{role_key}\": \"user\", "
                             f"\"{content_key}\": \"hi\"}} (or name the keys: ?role=KEY&content=KEY)")
        role = m[role_key]
        out.append({"role": SHAREGPT_ROLES.get(role, role), "content": m[content_key]})
    return out


def _render(record: dict[str, Any], tokenizer: Any, where: str, source: DataSource | None = None,
            chat_template: str | None = None) -> str:
    """One record's text: its text field (``text``, or the source's ``text=``), or its chat (``messages``, or
    ``messages=``) rendered with ``chat_template`` or else the tokenizer's chat template.

    A chat on a tokenizer without a template is refused: guessing a format (``role: content`` lines) would
    calibrate on text the model never sees in use. Without a tokenizer (the overlap guard compares documents, not
    tokens) a chat is joined as ``role: content`` lines. ``where`` names the file and line (or record) for errors.
    """
    text_key = source.option("text", "text") if source else "text"
    chat_key = source.option("messages", "messages") if source else "messages"
    if isinstance(record.get(text_key), str):
        return record[text_key]
    messages = _messages(record.get(chat_key), source, where)
    if messages is not None:
        if tokenizer is None:
            return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        if not (chat_template or getattr(tokenizer, "chat_template", None)):
            raise UsageError(f"{where}: a chat ('{chat_key}'), but the tokenizer has no chat template; pass "
                             "--chat-template FILE (a Jinja chat template, e.g. the model family's) or give plain "
                             "'text' records")
        try:
            return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
        except Exception as e:  # jinja raises many types for messages a template does not accept
            first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise UsageError(f"{where}: the chat template cannot render these messages ({first}); "
                             "fix the record or give plain 'text'") from None
    fields = ", ".join(sorted(map(str, record))) or "none"
    raise UsageError(f"{where}: a record has neither a '{text_key}' string nor a '{chat_key}' list (fields: "
                     f"{fields}); name the field with ?text=FIELD or ?messages=FIELD, or convert the records")


def read_chat_template(path: str | Path) -> str:
    """The Jinja chat template in the file ``path`` (``--chat-template``), checked to parse."""
    p = user_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--chat-template {path} does not exist; pass a Jinja template file") from None
    except IsADirectoryError:
        raise UsageError(f"--chat-template {path} is a directory; pass a Jinja template file") from None
    except UnicodeDecodeError:
        raise UsageError(f"--chat-template {path} is not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"--chat-template {path} cannot be read ({e.strerror}); check its permissions") from None
    if not text.strip():
        raise UsageError(f"--chat-template {path} is empty; pass a Jinja chat template")
    import jinja2  # transformers renders chat templates with jinja2, so it is installed

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise UsageError(f"--chat-template {path}, line {e.lineno}: not a valid Jinja template ({e.message})") from None
    return text


def _jsonl_records(path: str, text: str) -> Iterator[tuple[dict[str, Any], str]]:
    """The records of a JSON-lines file, one per non-blank line, each with where it is; errors name the line."""
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
        yield record, f"{path}, line {n}"


def _datasets_records(load: Any, what: str) -> Iterator[tuple[dict[str, Any], str]]:
    """Records of a datasets loader (``load()`` -> an iterable of dicts), read lazily, errors as one line."""
    try:
        for i, r in enumerate(load(), 1):
            yield r, f"{what}, record {i}"
    except UsageError:
        raise
    except Exception as e:  # datasets raises many types for malformed files and unreachable hubs
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot read {what}: {first}") from None


def _file_items(path: str) -> Iterator[tuple[Any, str]]:
    """The items of one data file: ``(text, where)`` for .txt documents, ``(record, where)`` otherwise."""
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
        docs = [d.strip() + "\n" for d in text.split("\n\n\n") if d.strip()] or [text]
        yield from ((d, f"{path}, document {i}") for i, d in enumerate(docs, 1))
        return
    if suffix == ".jsonl":
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise UsageError(f"{path}, line {line}: not UTF-8 text; convert the file (iconv -t utf-8)") from None
        yield from _jsonl_records(path, text)
        return
    import datasets  # lazy: ~1 s to import, only for parquet/JSON files, saved and hub datasets

    builder = "parquet" if suffix == ".parquet" else "json"
    # streamed: nothing is converted into datasets' cache ("Generating train split") to read a file once
    yield from _datasets_records(lambda: datasets.load_dataset(builder, data_files=str(p), split="train",
                                                               streaming=True), f"data file {path} as {builder}")


def _load_from_disk(source: DataSource) -> Any:
    import datasets

    try:
        ds = datasets.load_from_disk(source.location)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot read the saved dataset {source.location}: {first}") from None
    if isinstance(ds, datasets.DatasetDict):
        split = source.split or ("train" if "train" in ds else next(iter(ds)) if len(ds) == 1 else None)
        if split not in ds:
            raise UsageError(f"the saved dataset {source.location} has splits {', '.join(ds)}; pick one with "
                             f"@SPLIT, e.g. {source.location}@{next(iter(ds))}")
        ds = ds[split]
    elif source.split is not None:
        raise UsageError(f"the saved dataset {source.location} is a single Dataset without splits; drop "
                         f"@{source.split}")
    return ds


def _hub_stream(source: DataSource, seed: int) -> Any:
    """The hub dataset as a streamed, buffer-shuffled IterableDataset (``rows=`` taken before the shuffle)."""
    import datasets

    ds = datasets.load_dataset(source.location, name=source.option("config"), split=source.split, streaming=True)
    if source.rows is not None:
        ds = ds.take(source.rows)
    return ds.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)


def _items(source: DataSource, seed: int = 0) -> Iterator[tuple[Any, str]]:
    """Every item of a source (texts or records, with where each is), lazily, ``rows=`` applied."""
    if source.kind == "demo":
        items: Iterator[tuple[Any, str]] = ((t, f"{source.name}, document {i}")
                                            for i, t in enumerate(load_texts(source.location, source.split), 1))
    elif source.kind == "file":
        items = _file_items(source.location)
    elif source.kind == "dir":
        items = (item for f in data_files(Path(source.location)) for item in _file_items(str(f)))
    elif source.kind == "disk":
        items = _datasets_records(lambda: _load_from_disk(source), f"saved dataset {source.location}")
    elif source.kind == "dataset":
        items = ((r, f"{source.name}, record {i}") for i, r in enumerate(source.dataset, 1))
    else:  # hub: streamed
        config = f", config {source.option('config')}" if source.option("config") else ""
        what = (f"dataset {source.location!r} (split {source.split}{config}; is a hub reachable? otherwise "
                "download it and pass the local files)")
        return _datasets_records(lambda: _hub_stream(source, seed), what)
    return itertools.islice(items, source.rows) if source.rows is not None else items


def _texts(items: Iterator[tuple[Any, str]], source: DataSource, tokenizer: Any,
           chat_template: str | None) -> Iterator[str]:
    for item, where in items:
        yield item if isinstance(item, str) else _render(item, tokenizer, where, source, chat_template)


def read_documents(source: DataSource, tokenizer: Any = None, chat_template: str | None = None) -> list[str]:
    """The documents of one source, as text (all of them, up to ``rows=``; a hub source is streamed in its
    buffer-shuffled order)."""
    return list(_texts(_items(source), source, tokenizer, chat_template))


def check_sources(spec: Any, split: str, records: int = PREFLIGHT_RECORDS) -> bool:
    """Read the first ``records`` items of every local source (files, directories, saved datasets) without a
    tokenizer, so that a bad path, an unknown domain, an unreadable or malformed file or a wrong field name fails
    before any model is loaded. Returns whether any of those records is a chat (which needs a chat template)."""
    chat = False
    for source in as_sources(spec, split):
        if source.kind in ("hub", "demo"):
            continue  # a hub is only reached when the data is read; bundled data is known good
        for item, where in itertools.islice(_items(source), records):
            if isinstance(item, str):
                continue
            _render(item, None, where, source)  # the fields exist and hold text or a well-formed chat
            chat_key = source.option("messages", "messages")
            chat = chat or (not isinstance(item.get(source.option("text", "text")), str)
                            and isinstance(item.get(chat_key), list))
    return chat


def check_data(spec: Any, split: str, *, chat_template: str | Path | None = None,
               tokenizer: Callable[[], Any] | None = None) -> None:
    """Everything about the data that can be checked before a model is loaded: the spec (paths, domains, options),
    the first records of every local source (:func:`check_sources`) and, when they hold chats, that there is a
    chat template: ``chat_template`` (a file, checked to parse) or the tokenizer's own (``tokenizer()`` loads just
    the tokenizer; a chat on a tokenizer without a template is refused in one line)."""
    if chat_template is not None:
        read_chat_template(chat_template)
    if check_sources(spec, split) and chat_template is None and tokenizer is not None:
        if not getattr(tokenizer(), "chat_template", None):
            raise UsageError("the data holds chats ('messages' records), but the model's tokenizer has no chat "
                             "template; pass --chat-template FILE (a Jinja chat template, e.g. the model "
                             "family's) or give plain 'text' records")


def source_hash(source: DataSource) -> str | None:
    if source.kind == "demo":
        return sha256_file(corpus_path(source.location, source.split))
    if source.kind == "file":
        return sha256_file(source.location)
    if source.kind == "dir":  # every file's path (relative) and bytes
        root = Path(source.location)
        return hashlib.sha256(json.dumps([[str(f.relative_to(root)), sha256_file(f)] for f in data_files(root)]
                                         ).encode()).hexdigest()
    if source.kind == "dataset":
        return source.location.split(":", 1)[1]  # datasets' own content fingerprint
    if source.kind == "disk":
        state = Path(source.location) / (source.split or "") / "state.json"
        try:
            return json.loads(state.read_text(encoding="utf-8")).get("_fingerprint")
        except (OSError, ValueError):
            return None
    return None


def _pack(docs: list[str], tokenizer: Any, seq_len: int, limit: int | None, seed: int
          ) -> tuple[np.ndarray, int, int]:
    """Shuffle documents (seeded) and pack them (:func:`_pack_stream`)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    return _pack_stream((docs[i] for i in order), tokenizer, seq_len, limit)


def _pack_stream(docs: Iterator[str], tokenizer: Any, seq_len: int, limit: int | None
                 ) -> tuple[np.ndarray, int, int]:
    """Tokenise documents in the order given, EOS-separated, and cut full ``seq_len`` rows (stop at ``limit``).
    Returns the rows, the number of tokens read and the number of documents read.

    With a ``limit`` a document is handed to the tokenizer at most ``CHARS_PER_TOKEN_BOUND`` characters per token
    still needed at a time, and not read past the point where enough tokens are there: a huge document costs what is
    taken from it, not its size. Documents shorter than that bound (all ordinary ones) are tokenised whole, exactly
    as before. No document is read past the one that completes the last row."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    need = None if limit is None else limit * seq_len
    read = 0

    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    for doc in docs:
        read += 1
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
    return np.asarray(ids[: rows * seq_len], dtype=np.int64).reshape(rows, seq_len), len(ids), read


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
                model_config: Any = None, chat_template: str | Path | None = None) -> TokenData:
    """Load, tokenise and pack the data of ``spec``.

    The number of sequences asked for is ``samples``, or ``ceil(tokens / seq_len)``, or everything available; each
    source gets its weight's share rounded up (at least one sequence), so with several sources the total can exceed
    it by up to one sequence per source. A source with less than one full sequence is an error. With
    ``model_config``, a ``seq_len`` beyond the model's positions is refused (:func:`check_seq_len`).
    ``chat_template`` is a Jinja template file for chat records (else the tokenizer's own template is used).

    Local and bundled sources are read whole (up to ``rows=``) and shuffled with ``seed``; hub sources are streamed
    through datasets' shuffle buffer and read only until their share is packed. Weights are shares of tokens, met
    exactly per source, so every sequence keeps its source's label for per-domain reports (datasets'
    ``interleave_datasets`` samples documents by probability instead, so a source of long documents would take more
    than its share of tokens).
    """
    check_seq_len(seq_len, model_config)
    if tokens is not None and tokens <= 0 or samples is not None and samples <= 0:
        raise UsageError("--tokens and --samples must be positive")
    template = read_chat_template(chat_template) if chat_template is not None else None
    sources = as_sources(spec, split)
    check_sources(sources, split)  # a malformed record near the start is named before anything is tokenised
    total = samples if samples is not None else (-(-tokens // seq_len) if tokens is not None else None)
    rows, labels, names, prints, hashes, records = [], [], [], {}, {}, []
    for k, src in enumerate(sources):
        # rounded up, so that the sources together cover at least what was asked for
        limit = None if total is None else max(1, math.ceil(total * src.weight - 1e-9))
        if src.kind == "hub":  # streamed: read only what is packed
            packed, available, read = _pack_stream(_texts(_items(src, seed + k), src, tokenizer, template),
                                                   tokenizer, seq_len, limit)
        else:
            docs = read_documents(src, tokenizer, template)
            packed, available, _ = _pack(docs, tokenizer, seq_len, limit, seed + k)
            read = len(docs)
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
        records.append(SourceRecord(src.name, src.spec, src.kind, h, read, len(packed), int(packed.size),
                                    prints[src.name], src.weight))
    input_ids = torch.cat(rows)
    return TokenData(input_ids, torch.ones_like(input_ids), torch.cat(labels), tuple(names), prints, hashes,
                     tuple(records))
