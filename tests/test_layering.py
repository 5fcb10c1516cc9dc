"""The layering of evoreap's packages holds: ``lint-imports`` keeps every contract in ``[tool.importlinter]`` of
pyproject.toml (one-way layers from the CLI down to the adapters, search independent of runs and export, commands
imported by the CLI alone, adapters importing nothing but errors). docs/architecture.md describes the layers."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> list[str]:
    """The ``lint-imports`` of this environment (the console script beside this Python, else the one on PATH)."""
    name = "lint-imports.exe" if os.name == "nt" else "lint-imports"
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("lint-imports")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"]


def test_import_contracts_are_kept():
    if importlib.util.find_spec("importlinter") is None:
        pytest.skip("import-linter is not installed (it is in the test extra)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)  # the checkout's evoreap, whatever is installed
    # --no-cache: leave no .import_linter_cache in the checkout.
    out = subprocess.run([*_lint_imports(), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"lint-imports exited {out.returncode}:\n{out.stdout[-8000:]}\n{out.stderr[-4000:]}"
    summary = re.search(r"Contracts: (\d+) kept, (\d+) broken", out.stdout)
    assert summary and int(summary[1]) >= 4 and summary[2] == "0", out.stdout[-8000:]
