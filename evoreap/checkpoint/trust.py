"""The trust check: whether a model directory carries code that transformers would run, and the
``trust_remote_code`` evoreap hands transformers for it (only ever the user's own flag).

evoreap's own non-uniform exports carry exactly ``modeling_evoreap.py`` and the ``auto_map`` naming it; evoreap never
imports that file (it builds the same class in-process, :mod:`evoreap.checkpoint.own_code`), so those two entries
need no trust. Anything else that could run code is refused without ``--trust-remote-code``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from evoreap.checkpoint.own_code import MODELING_FILE, is_own_export
from evoreap.errors import UsageError

# Names transformers imports code from when remote code is trusted, besides auto_map entries.
_CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".pyd")
_CODE_DIRS = ("custom_generate",)
_MAX_ENTRIES = 100_000  # a model directory with more entries than this is not one; refuse instead of walking on


def code_entries(path: str | Path) -> list[str]:
    """Everything in a model directory that could make transformers run code when remote code is trusted: Python
    (or compiled extension) files at any depth, a ``custom_generate/`` folder, a symlinked folder (its contents
    cannot be vouched for) and ``auto_map`` entries in any ``*config*.json``. Relative names, sorted."""
    root = Path(path)
    found: set[str] = set()
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        seen += len(dirnames) + len(filenames)
        if seen > _MAX_ENTRIES:
            raise UsageError(f"{root} holds more than {_MAX_ENTRIES:,} files and folders; pass the model's own "
                             "directory (the one with config.json and the safetensors files)")
        for d in dirnames:
            rel = (here / d).relative_to(root).as_posix()
            if d in _CODE_DIRS:
                found.add(rel + "/")
            elif (here / d).is_symlink():
                found.add(rel + "/ (symlinked folder)")
        for f in filenames:
            if f.endswith(_CODE_SUFFIXES):
                found.add((here / f).relative_to(root).as_posix())
    for cfg in sorted(root.glob("*config*.json")):
        try:
            raw = json.loads(cfg.read_text(encoding="utf-8")) if cfg.stat().st_size < 64 << 20 else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not readable as JSON: transformers cannot read an auto_map from it either
        nested = [raw, *(v for v in raw.values() if isinstance(v, dict))] if isinstance(raw, dict) else []
        for d in nested:
            if isinstance(d, dict) and d.get("auto_map"):
                found.add(f"{cfg.name}: auto_map")
    return sorted(found)


def own_export(path: str | Path) -> bool:
    """Whether ``path`` is a non-uniform evoreap export, which evoreap loads with its own in-process class."""
    try:
        return is_own_export(json.loads((Path(path) / "config.json").read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def needs_trust(path: str | Path, trust_remote_code: bool) -> bool:
    """The ``trust_remote_code`` to pass to transformers for ``path``: only ever the user's own flag.

    A local directory carrying code (see :func:`code_entries`) is refused (UsageError) unless the user allowed it.
    A non-uniform evoreap export may carry exactly its ``modeling_evoreap.py`` and the ``auto_map`` naming it:
    evoreap never imports that file (it builds the same class from its own template, see
    :mod:`evoreap.checkpoint.own_code`), so they need no trust; anything else in it does.
    """
    p = Path(path)
    if trust_remote_code or not p.is_dir():
        return trust_remote_code
    entries = code_entries(p)
    if own_export(p):
        entries = [e for e in entries if e not in (MODELING_FILE, "config.json: auto_map")]
    if entries:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise UsageError(f"{path} carries code that transformers would run ({shown}); evoreap runs no code from a "
                         "model directory unless you pass --trust-remote-code (read that code first)")
    return False
