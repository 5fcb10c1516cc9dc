"""Repository contracts: the README's commands, CI, search spaces, no unsafe loads."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_the_main_job_and_the_test_command():
    main_job, tests = readme_commands()[:2]
    assert "pip install torch==2.13.0" in main_job and main_job.endswith("evoreap search --budget 0.5")
    assert tests.endswith("python -m pytest -q")


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci.splitlines()


def test_no_pickle_or_unsafe_torch_load_in_the_package():
    for path in (ROOT / "evoreap").rglob("*.py"):
        src = path.read_text()
        assert not re.search(r"^\s*import pickle|^\s*from pickle|pickle\.load", src, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", src):
            assert "weights_only=True" in call, f"{path}: {call}"


def test_shipped_search_spaces_parse():
    from evoreap.search.space import load_space_settings

    names = sorted(p.stem for p in (ROOT / "search_spaces").glob("*.yaml"))
    assert {"default", "ep8", "conservative"} <= set(names)
    for n in names:
        load_space_settings(n)


def test_lint_finds_no_undefined_names_or_errors():
    """pyflakes and pycodestyle errors (ruff, settings in pyproject.toml): an undefined name in an error path is a
    crash that only bad input reaches."""
    import subprocess
    import sys

    if subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True).returncode != 0:
        pytest.skip("ruff is not installed (it is in the test extra)")
    out = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
