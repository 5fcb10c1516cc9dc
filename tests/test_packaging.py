"""The built wheel works on its own: installed into a fresh virtual environment and run from outside the repository,
it finds its search spaces, its demo model and data, and runs a short search end to end.

No network: the wheel is built with ``--no-build-isolation`` from a copy of the checkout, and the fresh environment
(``venv --without-pip``) gets its dependencies (torch, transformers, ...) by a ``.pth`` file that appends this
environment's site-packages. A plain directory in a ``.pth`` file does not run *that* directory's own ``.pth`` files,
so an editable evoreap installed here stays invisible there; the test checks that evoreap is imported from the wheel.
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a checkout may hold besides the sources: never part of a build.
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
    ".ruff_cache", ".grimp_cache", ".import_linter_cache", "runs", ".whl")


def _run(cmd, *, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {out.returncode}\n--- stdout\n{out.stdout[-4000:]}\n"
        f"--- stderr\n{out.stderr[-4000:]}")
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Build the wheel, install it into a fresh venv; return (venv python, evoreap script, its site-packages, env)."""
    specs = {m: importlib.util.find_spec(m) for m in ("pip", "setuptools", "wheel")}  # found, not imported
    missing = [m for m in ("pip", "setuptools") if specs[m] is None]
    if not missing and specs["wheel"] is None and not any(
            (Path(d) / "command" / "bdist_wheel.py").is_file() for d in specs["setuptools"].submodule_search_locations):
        missing = ["wheel (or setuptools>=70.1, which has its own bdist_wheel)"]
    if missing:
        pytest.skip(f"cannot build a wheel offline: {', '.join(missing)} not installed in this environment")
    tmp = tmp_path_factory.mktemp("packaging")
    # A copy, so that setuptools' build/ and egg-info never land in (or go stale in) the shared checkout.
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCES)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_REQUIRE", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # One torch thread: this checks packaging, not speed, and on a shared 2-core machine two threads made the search
    # 3x slower (66 s wall, 42 s CPU vs 21 s, 10 s), spinning against the other processes.
    env["OMP_NUM_THREADS"] = "1"

    t0 = time.perf_counter()
    _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist"],
         cwd=tmp, env=env)
    (wheel,) = (tmp / "dist").glob("evoreap-*.whl")
    print(f"wheel built in {time.perf_counter() - t0:.1f} s: {wheel.name}")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, env=env)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=tmp, env=env).stdout.strip())
    here = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))  # this env's, in order, once each
    (site / "_evoreap_test_deps.pth").write_text("".join(f"{p}\n" for p in here))

    # Installing a pure-Python wheel is unpacking it into site-packages, plus the console script it declares.
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    (dist_info,) = site.glob("evoreap-*.dist-info")
    entry_points = configparser.ConfigParser()
    entry_points.read(dist_info / "entry_points.txt")
    module, func = entry_points["console_scripts"]["evoreap"].split(":")
    script = bindir / "evoreap"
    script.write_text(f"#!{python}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
    script.chmod(0o755)
    return python, script, site, env


def test_the_wheel_holds_the_search_spaces_and_the_demo(installed):
    _, _, site, _ = installed
    spaces = sorted(p.name for p in (site / "evoreap" / "search_spaces").iterdir())
    assert {"default.yaml", "conservative.yaml", "ep8.yaml", "README.md"} <= set(spaces)
    assert (site / "evoreap" / "demo" / "model" / "model.safetensors").is_file()
    assert list((site / "evoreap" / "demo" / "data").glob("*/heldout.jsonl.xz"))


def test_installed_package_is_the_wheel_and_finds_its_search_spaces(installed, tmp_path):
    python, _, site, env = installed
    code = ("import evoreap; from evoreap.search.space import SPACES_DIR, load_space_settings; "
            "print(evoreap.__file__); print(SPACES_DIR); print(load_space_settings('default')); "
            "print(*sorted(p.stem for p in SPACES_DIR.glob('*.yaml')))")
    lines = _run([python, "-c", code], cwd=tmp_path, env=env).stdout.splitlines()
    assert Path(lines[0]).resolve() == (site / "evoreap" / "__init__.py").resolve(), lines[0]
    assert Path(lines[1]).resolve() == (site / "evoreap" / "search_spaces").resolve(), lines[1]
    assert not Path(lines[1]).resolve().is_relative_to(ROOT)
    assert lines[2].startswith("SpaceSettings(")
    assert {"default", "conservative", "ep8"} <= set(lines[3].split())


def test_console_script_help_from_outside_the_repository(installed, tmp_path):
    _, script, _, env = installed
    out = _run([script, "search", "--help"], cwd=tmp_path, env=env).stdout
    assert "--space" in out


def test_a_short_search_on_the_bundled_demo_runs_from_the_wheel(installed, tmp_path):
    _, script, _, env = installed
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    t0 = time.perf_counter()
    tiny = ["--budget", "0.5", "--generations", "2", "--offspring", "2", "--population", "2", "--fidelities",
            "128,256,512", "--survivors", "2,1", "--calib-tokens", "1024", "--heldout-tokens", "512", "--seq-len", "64"]
    out = _run([script, "search", *tiny, "--no-plots", "--runs-dir", runs, "--cache-dir", cache], cwd=tmp_path, env=env)
    print(f"search from the wheel: {time.perf_counter() - t0:.1f} s")
    assert len(list(runs.glob("*/best_allocation.json"))) == 1, sorted(p.name for p in runs.rglob("*"))
    assert str(ROOT / "evoreap") not in out.stdout + out.stderr  # the demo model and data came from the wheel
