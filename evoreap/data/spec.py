"""Parse ``--data`` specs.

A spec is a comma-separated list of sources, each ``SOURCE[@SPLIT][:WEIGHT]``:

* a bundled demo domain (``code``, ``drama``, ``tools``, ``math``) or ``demo`` for all four, equally weighted;
* a local file: ``.txt`` (documents separated by blank lines), ``.jsonl``/``.json`` (a ``text`` field, or a chat
  ``messages`` field rendered with the tokenizer's chat template), ``.parquet`` (same fields);
* ``hf:DATASET_ID`` for a dataset on a reachable hub.

``@SPLIT`` picks the split of a bundled domain or hub dataset (default: the command's own split, e.g. ``calibration``
for observe). ``:WEIGHT`` sets the source's share of the tokens (default 1, normalised over the sources).

Examples: ``demo``, ``code:0.5,tools:0.5``, ``code@heldout``, ``data/my_chats.jsonl:2,drama``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evoreap.data.bundled import DOMAINS, SPLITS
from evoreap.errors import UsageError

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class DataSource:
    """One source of a data spec. ``name`` is the domain label used in per-domain reports."""

    name: str
    kind: str  # "demo" | "file" | "hub" | "dataset"
    location: str  # demo domain, file path, hub dataset id, or "dataset:FINGERPRINT" for an in-memory dataset
    split: str | None
    weight: float
    dataset: Any = field(default=None, compare=False, repr=False)  # the datasets.Dataset of kind "dataset"


def _split_weight(item: str) -> tuple[str, float]:
    head, sep, tail = item.rpartition(":")
    if sep and head and not head.endswith("hf") and _is_number(tail):
        w = float(tail)
        if not math.isfinite(w) or w <= 0:
            raise UsageError(f"data weight in {item!r} must be a positive number, e.g. code:0.5")
        return head, w
    return item, 1.0


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def dataset_source(dataset: Any, name: str = "dataset") -> DataSource:
    """A ``datasets.Dataset`` (records with ``text`` or chat ``messages``) as one source, named ``name`` in
    per-domain reports; its content fingerprint (``dataset._fingerprint``) stands for it in keys and records."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if not hasattr(dataset, "__iter__") or not hasattr(dataset, "__len__") or not isinstance(fingerprint, str):
        raise UsageError(f"data {type(dataset).__name__} is neither a data spec nor a datasets.Dataset; pass e.g. "
                         "'demo', a file path, or a datasets.Dataset with a text or messages column")
    return DataSource(name, "dataset", f"dataset:{fingerprint}", None, 1.0, dataset)


def as_sources(spec: Any, default_split: str) -> list[DataSource]:
    """A data spec string, a ``datasets.Dataset``, or sources already parsed, as a list of sources."""
    if isinstance(spec, str):
        return parse_data_spec(spec, default_split)
    if isinstance(spec, list) and all(isinstance(s, DataSource) for s in spec):
        return spec
    return [dataset_source(spec)]


def parse_data_spec(spec: str, default_split: str) -> list[DataSource]:
    """Parse ``spec`` into sources; unknown names, missing files and bad weights raise :class:`UsageError`."""
    if not spec or not spec.strip():
        raise UsageError("empty --data; name bundled domains (code, drama, tools, math, demo) or local files")
    sources: list[DataSource] = []
    for raw in (s.strip() for s in spec.split(",")):
        if not raw:
            raise UsageError(f"empty item in --data {spec!r}; separate sources with single commas")
        item, weight = _split_weight(raw)
        split = None
        if "@" in item and not item.startswith("hf:") or item.startswith("hf:") and "@" in item[3:]:
            item, split = item.rsplit("@", 1)
            if not split:
                raise UsageError(f"empty split in --data item {raw!r}; write e.g. code@heldout")
        if item == "demo":
            for d in DOMAINS:
                sources.append(DataSource(d, "demo", d, split or default_split, weight / len(DOMAINS)))
        elif item in DOMAINS:
            sources.append(DataSource(item, "demo", item, split or default_split, weight))
        elif item.startswith("hf:"):
            sources.append(DataSource(item[3:], "hub", item[3:], split or "train", weight))
        elif Path(item).suffix.lower() in FILE_SUFFIXES:
            p = Path(item).expanduser()
            if p.is_dir():
                raise UsageError(f"data file {item} is a directory; name the file itself")
            if not p.is_file():
                raise UsageError(f"data file {item} does not exist; check the path")
            sources.append(DataSource(p.stem, "file", str(p), split, weight))
        else:
            import difflib

            close = difflib.get_close_matches(item, [*DOMAINS, "demo"], n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise UsageError(f"unknown data source {item!r}{hint}; use a bundled domain ({', '.join(DOMAINS)}, "
                             f"demo), a {'/'.join(FILE_SUFFIXES)} file, or hf:DATASET_ID")
        if sources[-1].kind == "demo" and sources[-1].split not in SPLITS:
            raise UsageError(f"unknown split {sources[-1].split!r} in --data {raw!r}; bundled splits are "
                             f"{', '.join(SPLITS)}")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise UsageError(f"--data names a source twice ({', '.join(names)}); give each once with a weight")
    top = max(s.weight for s in sources)  # scale first: huge weights must not sum to inf
    total = sum(s.weight / top for s in sources)
    sources = [DataSource(s.name, s.kind, s.location, s.split, s.weight / top) for s in sources]
    return [DataSource(s.name, s.kind, s.location, s.split, s.weight / total) for s in sources]
