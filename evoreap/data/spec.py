"""Parse ``--data`` specs.

A spec is a comma-separated list of sources, each ``SOURCE[?OPTIONS][@SPLIT][:WEIGHT]``:

* a bundled demo domain (``code``, ``drama``, ``tools``, ``math``) or ``demo`` for all four, equally weighted;
* a local file: ``.txt`` (documents separated by blank lines), ``.jsonl``/``.json`` (a ``text`` field, or a chat
  ``messages`` field rendered with the tokenizer's chat template), ``.parquet`` (same fields);
* a local directory: every such file in it (and below it, in name order), or a dataset written by
  ``datasets``' ``save_to_disk`` (read with ``load_from_disk``; ``@SPLIT`` picks the split of a DatasetDict);
* ``hf:DATASET`` for a dataset on a reachable hub (or a local directory of data files), streamed: only the rows
  that are used are read.

``@SPLIT`` picks the split of a bundled domain, a hub dataset or a saved DatasetDict (default: the command's own
split for bundled domains, e.g. ``calibration`` for observe; ``train`` elsewhere). ``:WEIGHT`` sets the source's
share of the tokens (default 1, normalised over the sources): each source gives exactly its share of the packed
sequences, so per-domain reports keep one label per source.

``?OPTIONS`` are ``KEY=VALUE`` pairs joined by ``&``:

* ``config=NAME`` the hub dataset's configuration (subset), e.g. ``hf:HuggingFaceFW/fineweb-edu?config=sample-10BT``;
* ``split=NAME`` the same as ``@NAME``;
* ``text=FIELD`` the field holding plain text (default ``text``);
* ``messages=FIELD`` the field holding a chat (default ``messages``), with ``role=KEY`` and ``content=KEY`` naming
  the keys of each message (default ``role``/``content``; ShareGPT data:
  ``messages=conversations&role=from&content=value``, whose ``human``/``gpt`` roles are read as ``user``/``assistant``);
* ``rows=N`` read at most N records of the source;
* ``label=NAME`` the source's name in per-domain reports.

Examples: ``demo``, ``code:0.5,tools:0.5``, ``code@heldout``, ``data/my_chats.jsonl:2,drama``,
``hf:allenai/c4?config=en&rows=20000@train``, ``corpus_dir/?text=body``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evoreap.data.bundled import DOMAINS, SPLITS
from evoreap.errors import UsageError
from evoreap.files import user_path

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
MAX_DATA_ENTRIES = 100_000  # files and folders a data directory may hold
OPTION_KEYS = ("config", "split", "text", "messages", "role", "content", "rows", "label")


@dataclass(frozen=True)
class DataSource:
    """One source of a data spec. ``name`` is the domain label used in per-domain reports."""

    name: str
    kind: str  # "demo" | "file" | "dir" | "disk" | "hub" | "dataset"
    location: str  # demo domain, file or directory path, hub dataset id, or "dataset:FINGERPRINT" (in memory)
    split: str | None
    weight: float
    dataset: Any = field(default=None, compare=False, repr=False)  # the datasets.Dataset of kind "dataset"
    options: tuple[tuple[str, str], ...] = ()  # the ?KEY=VALUE options, sorted

    def option(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options).get(key, default)

    @property
    def rows(self) -> int | None:
        """The ``rows=N`` limit: at most this many records are read."""
        value = self.option("rows")
        return None if value is None else int(value)

    @property
    def spec(self) -> str:
        """This source written back as one spec item (without its weight): what the records show people."""
        opts = "&".join(f"{k}={v}" for k, v in self.options if k != "label")
        where = {"demo": self.location, "hub": f"hf:{self.location}"}.get(self.kind, self.location)
        split = f"@{self.split}" if self.split and self.kind in ("demo", "hub", "disk") else ""
        return f"{where}{'?' + opts if opts else ''}{split}"

    def reweighted(self, weight: float) -> DataSource:
        return dataclasses.replace(self, weight=weight)


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
        item, options = _split_options(item, raw)
        if "split" in options:
            if split is not None and split != options["split"]:
                raise UsageError(f"--data item {raw!r} names two splits; give one, as @SPLIT or split=SPLIT")
            split = options.pop("split")
        opts = tuple(sorted(options.items()))
        label = options.get("label")
        if item == "demo":
            if label:
                raise UsageError("label= names one source, and 'demo' is four; label the domains one by one")
            for d in DOMAINS:
                sources.append(DataSource(d, "demo", d, split or default_split, weight / len(DOMAINS), None, opts))
        elif item in DOMAINS:
            sources.append(DataSource(label or item, "demo", item, split or default_split, weight, None, opts))
        elif item.startswith("hf:"):
            ds_id = item[3:]
            if not ds_id:
                raise UsageError(f"--data item {raw!r} names no dataset; write hf:OWNER/NAME")
            name = label or (f"{ds_id}/{options['config']}" if "config" in options else ds_id)
            sources.append(DataSource(name, "hub", ds_id, split or "train", weight, None, opts))
        elif user_path(item).is_dir():
            sources.append(_directory_source(user_path(item), item, split, weight, opts, label))
        elif Path(item).suffix.lower() in FILE_SUFFIXES:
            p = user_path(item)
            if not p.is_file():
                raise UsageError(f"data file {item} does not exist; check the path")
            _check_readable(p, item)
            sources.append(DataSource(label or p.stem, "file", str(p), split, weight, None, opts))
        else:
            import difflib

            close = difflib.get_close_matches(item, [*DOMAINS, "demo"], n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise UsageError(f"unknown data source {item!r}{hint}; use a bundled domain ({', '.join(DOMAINS)}, "
                             f"demo), a {'/'.join(FILE_SUFFIXES)} file or a directory of them, or hf:DATASET_ID")
        if sources[-1].kind == "demo" and sources[-1].split not in SPLITS:
            raise UsageError(f"unknown split {sources[-1].split!r} in --data {raw!r}; bundled splits are "
                             f"{', '.join(SPLITS)}")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise UsageError(f"--data names a source twice ({', '.join(names)}); give each once with a weight")
    top = max(s.weight for s in sources)  # scale first: huge weights must not sum to inf
    total = sum(s.weight / top for s in sources)
    sources = [s.reweighted(s.weight / top) for s in sources]
    return [s.reweighted(s.weight / total) for s in sources]


def _split_options(item: str, raw: str) -> tuple[str, dict[str, str]]:
    """``SOURCE?k=v&k=v`` -> ``(SOURCE, {k: v})``; unknown keys and bad values are refused."""
    head, sep, tail = item.partition("?")
    if not sep:
        return item, {}
    options: dict[str, str] = {}
    for pair in tail.split("&"):
        key, eq, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise UsageError(f"--data option {pair!r} in {raw!r} is not KEY=VALUE; write e.g. {head}?rows=1000")
        if key not in OPTION_KEYS:
            import difflib

            close = difflib.get_close_matches(key, OPTION_KEYS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(f"unknown --data option {key!r} in {raw!r}{hint}; options are {', '.join(OPTION_KEYS)}")
        if key in options:
            raise UsageError(f"--data option {key!r} is given twice in {raw!r}")
        options[key] = value
    if "rows" in options and not (options["rows"].isdigit() and int(options["rows"]) > 0):
        raise UsageError(f"rows={options['rows']} in --data {raw!r} must be a whole number of records >= 1")
    return head, options


def _check_readable(p: Path, shown: str) -> None:
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise UsageError(f"data file {shown} cannot be read ({e.strerror or type(e).__name__}); check its "
                         "permissions") from None


def is_saved_dataset(p: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())


def data_files(p: Path) -> list[Path]:
    """The data files of a directory (and its subdirectories, not through links to folders), in path order; hidden
    entries and folders that cannot be listed are skipped. A tree of more than :data:`MAX_DATA_ENTRIES` entries is
    refused: that is not a data folder (``--data /``, a home directory) and walking it would take the run's time."""
    found, seen = [], 0
    for root, dirs, files in os.walk(p):  # errors (an unreadable folder, /proc) skip that folder
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        seen += len(dirs) + len(files)
        if seen > MAX_DATA_ENTRIES:
            raise UsageError(f"data path {p} holds more than {MAX_DATA_ENTRIES:,} files and folders, which is not "
                             "a data folder; point --data at the folder that holds your data files")
        for name in files:
            f = Path(root, name)
            if name.startswith(".") or f.suffix.lower() not in FILE_SUFFIXES:
                continue
            try:
                if f.is_file():
                    found.append(f)
            except OSError:  # a link this user may not follow: not a data file
                continue
    return sorted(found)


def _directory_source(p: Path, shown: str, split: str | None, weight: float, opts: tuple[tuple[str, str], ...],
                      label: str | None) -> DataSource:
    name = label or p.resolve().name
    if is_saved_dataset(p):
        return DataSource(name, "disk", str(p), split, weight, None, opts)
    files = data_files(p)
    if not files:
        raise UsageError(f"data path {shown} is a directory with no {'/'.join(FILE_SUFFIXES)} files in it, and not "
                         "a dataset saved with save_to_disk; point --data at your data")
    for f in files:
        _check_readable(f, str(f))
    return DataSource(name, "dir", str(p), split, weight, None, opts)
