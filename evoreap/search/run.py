"""Run directories: ``runs/NAME/`` with the resolved config, environment, storage, log and results.

A run's identity is the part of its config that changes results (model, data, budget, space, criterion, proxy,
evolution settings, seed). Re-running with the same name and identity resumes; a different identity under the same
name is refused, naming the settings that differ.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evoreap import __version__
from evoreap.allocation import write_json_atomic
from evoreap.errors import UsageError

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


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def open(cls, name: str, runs_dir: Path, identity: dict[str, Any], config: dict[str, Any]) -> RunDir:
        if not _NAME.match(name):
            raise UsageError(f"run name {name!r} may only hold letters, digits, '.', '_' and '-' (at most 128)")
        path = runs_dir / name
        cfg_path = path / "config.json"
        if cfg_path.exists():
            old = json.loads(cfg_path.read_text())
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
            "numpy": numpy.__version__, "command": sys.argv, **extra})
