"""Run directories: ``runs/NAME/`` with the resolved config, environment, storage, log and results.

A run's identity is the part of its config that changes results (model, data, budget, space, criterion, proxy,
evolution settings, seed). Re-running with the same name and identity resumes; a different identity under the same
name is refused, naming the settings that differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evoreap.version import __version__
from evoreap.allocation import write_json_atomic
from evoreap.errors import UsageError
from evoreap.search.storage import mask_url  # a --storage URL's password stays out of the run directory
from evoreap.files import real

RUNS_DIR = Path("runs")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def default_run_name(model: str, budget: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name or "model").strip("-") or "model"
    return f"{base}-{budget}-{time.strftime('%Y%m%d-%H%M%S')}"


def find_unfinished(runs_dir: Path, identity: dict[str, Any]) -> Path | None:
    """The newest unfinished run with this identity (so that re-running the same command resumes it)."""
    h = identity_hash(identity)
    found = []
    for cfg in runs_dir.glob("*/config.json"):
        try:
            data = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("identity_hash") == h and not (cfg.parent / "best_allocation.json").exists():
            found.append(cfg.parent)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise UsageError(f"run name {name!r} may only hold letters, digits, '.', '_' and '-' (at most 128)")


def writable(directory: Path) -> bool:
    """Whether this process can create files in ``directory`` (an existing directory): the permission bits, then a
    real temporary file (root ignores the bits, but not a read-only mount or an immutable directory)."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".evoreap-write-test-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True


def read_config(path: Path) -> dict[str, Any]:
    """The ``config.json`` of the existing run directory ``path``; a run whose config cannot be read cannot be
    resumed (its identity is in there), so that is a usage error naming the way out."""
    cfg = path / "config.json"
    way_out = f"restore it, delete {path} to start that run afresh, or choose another --run name"
    try:
        data = json.loads(cfg.read_text())
    except UnicodeDecodeError:
        raise UsageError(f"run {path.name}: {cfg} is not text; {way_out}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"run {path.name}: {cfg} is not valid JSON ({e.msg}, line {e.lineno}); {way_out}") \
            from None
    except OSError as e:
        raise UsageError(f"run {path.name}: cannot read {cfg} ({e.strerror or e}); {way_out}") from None
    if not isinstance(data, dict) or not isinstance(data.get("identity"), dict):
        raise UsageError(f"run {path.name}: {cfg} is not an evoreap run config (no identity); {way_out}")
    if not writable(path):
        raise UsageError(f"run directory {path} is not writable, so run {path.name} cannot be resumed there; "
                         "make it writable or choose another --run name")
    return data


@dataclass(frozen=True)
class RunDir:
    path: Path

    @staticmethod
    def check(name: str | None, runs_dir: Path) -> None:
        """Everything about a run directory that can be checked before any work, creating nothing: the name is
        valid, ``runs_dir`` can hold a new run directory, and an existing run of that name is a directory with a
        readable ``config.json`` that this process can write to."""
        if name is not None:
            check_name(name)
        path = runs_dir / name if name is not None else None
        for p in (runs_dir, path):
            if p is not None and p.exists() and not p.is_dir():
                what, other = ("--runs-dir", "--runs-dir") if p is runs_dir else ("run directory", "--run name")
                raise UsageError(f"{what} {p} is a file, not a directory; choose another {other}")
        if path is not None and (path / "config.json").exists():
            read_config(path)  # readable, and the directory writable
            return
        parent = real(path if path is not None else runs_dir)
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise UsageError(f"cannot create run directory {path or runs_dir}: {parent} is a file, not a directory; "
                             "choose a writable --runs-dir")
        if not writable(parent):
            raise UsageError(f"cannot create run directory {path or runs_dir}: {parent} is not writable; choose a "
                             "writable --runs-dir")

    @classmethod
    def open(cls, name: str, runs_dir: Path, identity: dict[str, Any], config: dict[str, Any]) -> RunDir:
        check_name(name)
        path = runs_dir / name
        cfg_path = path / "config.json"
        if cfg_path.exists():
            old = read_config(path)
            differ = sorted(k for k in set(old.get("identity", {})) | set(identity)
                            if old.get("identity", {}).get(k) != identity.get(k))
            if differ:
                raise UsageError(f"run {name} exists with different settings ({', '.join(differ)}); resume it with "
                                 "its original settings or choose another --run name")
        else:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"cannot create run directory {path}: {e.strerror}; choose a writable location") \
                    from None
            write_json_atomic(cfg_path, {"identity": identity, "identity_hash": identity_hash(identity),
                                         "config": config})
        return cls(path)

    def write(self, name: str, data: Any) -> Path:
        p = self.path / name
        write_json_atomic(p, data)
        return p

    def environment(self, extra: dict[str, Any]) -> None:
        import numpy
        import optuna
        import torch
        import transformers

        self.write("environment.json", {
            "evoreap": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "torch": torch.__version__, "transformers": transformers.__version__, "optuna": optuna.__version__,
            "numpy": numpy.__version__, "command": [mask_url(a) for a in sys.argv], **extra})
