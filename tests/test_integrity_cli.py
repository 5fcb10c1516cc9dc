"""Mistakes found before any work, and never an "unexpected error": every case runs the real CLI and must fail with
exit 2 (usage) or 1 (runtime), exactly one error line naming the cause and the fix, no traceback, nothing created on
disk, and (where the mistake can be seen from the command line) no model loaded.

Tests run as root, which ignores permission bits, so "unwritable" is a path under a regular file (``file.txt/sub``)
or, where the file system supports it, an immutable directory (``chattr +i``).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import expect, run_cli

FAST = ["--generations", "0", "--offspring", "2", "--population", "2", "--fidelities", "256,512,1024",
        "--survivors", "2,1", "--calib-tokens", "1024", "--heldout-tokens", "512", "--seq-len", "64",
        "--batch-size", "8", "--no-plots"]






def tree(path: Path) -> list[str]:
    """Everything below ``path`` (to compare before and after a refused command)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture()
def no_model_load(monkeypatch):
    """Loading a model is the heavy work a usage error must come before: here it fails the command instead."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the mistake was found")

    import evoreap.models
    import evoreap.pipeline.session

    monkeypatch.setattr(evoreap.pipeline.session, "load_model", refuse)
    monkeypatch.setattr(evoreap.models, "load_model", refuse)


@pytest.fixture()
def place(tmp_path):
    """A working directory with a regular file in it (``file.txt``), the runs and cache dirs not yet there."""
    (tmp_path / "file.txt").write_text("not a directory\n")
    return tmp_path


def search(place, *extra):
    return ["search", "--runs-dir", place / "runs", "--cache-dir", place / "cache", *FAST, *extra]


def only_file_txt(place: Path) -> bool:
    return tree(place) == ["file.txt"]


# -- usage errors come before storage, directories and models ------------------------------------------------------

@pytest.mark.parametrize("storage", ["journal://{p}/journal/j.log", "sqlite:///{p}/db/study.db",
                                     "{p}/journal.log"])
def test_bad_budget_with_storage_creates_no_storage(small_model_dir, place, capsys, no_model_load, storage):
    expect(capsys, 2, ["--budget", "(0, 1]"], *search(place, "--model", small_model_dir, "--budget", "2",
                                                        "--storage", storage.format(p=place)))
    assert only_file_txt(place)


@pytest.mark.parametrize("flag,value,words", [
    ("--batch-size", "0", ["--batch-size", "at least 1"]),
    ("--seq-len", "1", ["--seq-len", "at least 2"]),
    ("--calib-tokens", "0", ["--calib-tokens"]),
    ("--heldout-tokens", "-5", ["--heldout-tokens"]),
    ("--reference-top-k", "0", ["--reference-top-k"]),
    ("--reference-top-k", "100000", ["--reference-top-k", "vocabulary"]),
    ("--guided", "1.5", ["--guided", "[0, 1]"]),
    ("--guided", "nan", ["--guided"]),
    ("--time-limit", "0", ["--time-limit", "positive"]),
    ("--trials", "0", ["--trials"]),
    ("--token-budget", "-1", ["--token-budget"]),
    ("--min-count", "-1", ["--min-count"]),
    ("--run", "../escape", ["run name"]),
])
def test_bad_number_leaves_no_run(small_model_dir, place, capsys, no_model_load, flag, value, words):
    expect(capsys, 2, words, *search(place, "--model", small_model_dir, "--budget", "0.5", flag, value))
    assert only_file_txt(place)


# -- --export is checked before the search, not after it ---------------------------------------------------------

def _nonempty(place):
    (place / "out").mkdir()
    (place / "out" / "mine.txt").write_text("keep me")
    return place / "out"


def _symlink(place):
    (place / "real").mkdir()
    (place / "out").symlink_to(place / "real")
    return place / "out"


@pytest.mark.parametrize("make,words", [
    (_nonempty, ["--export", "not empty", "--overwrite"]),
    (_symlink, ["--export", "symlink"]),
    (lambda p: p / "file.txt", ["--export", "is a file"]),
    (lambda p: p / "file.txt" / "out", ["cannot create --export", "file.txt"]),
    (lambda p: p / "cache" / "pruned", ["--export", "cache directory"]),
    (lambda p: p / "runs" / "r" / "pruned", ["--export", "run directory"]),
    (lambda p: p, ["--export", "run directory"]),  # would contain (and with --overwrite replace) the runs
])
def test_export_destination_is_checked_before_the_search(small_model_dir, place, capsys, no_model_load, make,
                                                         words):
    dest = make(place)
    before = tree(place)
    expect(capsys, 2, words, *search(place, "--model", small_model_dir, "--budget", "0.5", "--run", "r",
                                     "--export", dest))
    assert tree(place) == before


def test_export_into_the_model_directory_is_refused(small_model_dir, tmp_path, capsys, no_model_load):
    before = tree(small_model_dir)
    for dest in (small_model_dir, small_model_dir / "pruned", small_model_dir / ".." / small_model_dir.name):
        expect(capsys, 2, ["--export", "model directory"], *search(tmp_path, "--model", small_model_dir, "--budget",
                                                                   "0.5", "--export", dest, "--overwrite"))
    assert tree(small_model_dir) == before and not (tmp_path / "runs").exists()


def test_export_containing_the_storage_file_is_refused(small_model_dir, place, capsys, no_model_load):
    expect(capsys, 2, ["--export", "storage file"], *search(place, "--model", small_model_dir, "--budget", "0.5",
                                                             "--export", place / "out", "--overwrite", "--storage",
                                                             f"sqlite:///{place / 'out' / 'study.db'}"))
    assert only_file_txt(place)


# -- caches, run directories and storage files that cannot be used -----------------------------------------------

@pytest.mark.parametrize("cache,words", [
    ("file.txt", ["--cache-dir", "is a file"]),
    ("file.txt/cache", ["cannot create --cache-dir", "file.txt"]),
])
def test_unusable_cache_dir(small_model_dir, place, capsys, no_model_load, cache, words):
    expect(capsys, 2, words, "search", "--model", small_model_dir, "--budget", "0.5", "--runs-dir", place / "runs",
           "--cache-dir", place / cache, *FAST)
    expect(capsys, 2, words, "observe", "--model", small_model_dir, "--tokens", "256", "--seq-len", "64",
           "--cache-dir", place / cache)
    expect(capsys, 2, words, "observe", "--model", small_model_dir, "--offload", "--tokens", "256", "--seq-len",
           "64", "--cache-dir", place / cache)
    assert only_file_txt(place)


@pytest.mark.parametrize("url,words", [
    ("sqlite:///{p}/file.txt/study.db", ["cannot create storage file", "file.txt", "--storage"]),
    ("journal://{p}/file.txt/journal.log", ["cannot create storage file", "file.txt", "--storage"]),
    ("{p}/file.txt/journal.log", ["cannot create storage file", "file.txt"]),
    ("sqlite:///{p}", ["directory", "study.db"]),
    ("sqlite:///{p}/file.txt", ["not a sqlite database"]),
    ("sqlite://", ["in-memory", "sqlite:///"]),
    ("redis://localhost/0", ["not understood", "postgresql://"]),
    ("postgres://user:pw@localhost/db", ["postgresql://"]),
    ("::::", ["not understood"]),
])
def test_unusable_storage(small_model_dir, place, capsys, no_model_load, url, words):
    expect(capsys, 2, words, *search(place, "--model", small_model_dir, "--budget", "0.5", "--storage",
                                     url.format(p=place)))
    assert only_file_txt(place)


def test_truncated_run_config_is_a_clean_refusal(small_model_dir, place, capsys, no_model_load):
    run = place / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.json").write_text('{"identity": {"model": "/som')
    (run / "study.db").write_bytes(b"")
    before = tree(place)
    expect(capsys, 2, ["config.json", "not valid json", "--run"],
           *search(place, "--model", small_model_dir, "--budget", "0.5", "--run", "r"))
    (run / "config.json").write_text("[1, 2]")
    expect(capsys, 2, ["config.json", "not an evoreap run config"],
           *search(place, "--model", small_model_dir, "--budget", "0.5", "--run", "r"))
    assert tree(place) == before


def test_run_name_taken_by_a_file(small_model_dir, place, capsys, no_model_load):
    (place / "runs").mkdir()
    (place / "runs" / "r").write_text("x")
    expect(capsys, 2, ["run directory", "is a file", "--run"],
           *search(place, "--model", small_model_dir, "--budget", "0.5", "--run", "r"))
    expect(capsys, 2, ["--runs-dir", "is a file"], "search", "--model", small_model_dir, "--budget", "0.5",
           "--runs-dir", place / "file.txt", "--cache-dir", place / "cache", *FAST)
    assert tree(place) == ["file.txt", "runs", "runs/r"]


@pytest.fixture()
def immutable(tmp_path):
    """Make a directory immutable (read-only even for root); skipped where chattr is not supported."""
    made = []

    def make(path: Path) -> Path:
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("chattr +i is not supported here (root ignores permission bits)")
        made.append(path)
        return path

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def test_read_only_run_dir(small_model_dir, place, capsys, no_model_load, immutable):
    run = place / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"identity": {}, "identity_hash": "x", "config": {}}))
    immutable(run)
    expect(capsys, 2, ["not writable", "--run"], *search(place, "--model", small_model_dir, "--budget", "0.5",
                                                         "--run", "r"))
    assert tree(run) == ["config.json"]


def test_plot_into_a_read_only_run_dir(tmp_path, capsys, immutable):
    pytest.importorskip("matplotlib")
    run = immutable(_run_files(tmp_path / "run"))
    before = tree(run)
    expect(capsys, 2, ["cannot write", "not writable"], "plot", run)
    assert tree(run) == before


# -- devices --------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch build has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_on_a_cpu_only_torch(small_model_dir, place, capsys, no_model_load, device):
    words = ["--device", "cuda is not available in this torch build", "--device cpu"]
    expect(capsys, 2, words, *search(place, "--model", small_model_dir, "--budget", "0.5", "--device", device))
    expect(capsys, 2, words, "observe", "--model", small_model_dir, "--cache-dir", place / "cache", "--device",
           device)
    alloc = place / "a.json"
    alloc.write_text(json.dumps({"layers": {str(i): 4 for i in range(4)}}))
    expect(capsys, 2, words, "evaluate", "--model", small_model_dir, "--allocation", alloc, "--cache-dir",
           place / "cache", "--device", device)
    alloc.unlink()
    assert only_file_txt(place)


@pytest.mark.parametrize("device,words", [
    ("xyz", ["not a torch device", "cpu"]),
    ("cuda:x", ["not a torch device"]),
    ("meta", ["evoreap runs on cpu"]),
])
def test_device_that_is_not_one(small_model_dir, place, capsys, no_model_load, device, words):
    expect(capsys, 2, ["--device", *words], *search(place, "--model", small_model_dir, "--budget", "0.5",
                                                    "--device", device))
    assert only_file_txt(place)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has mps")
def test_mps_where_there_is_none(small_model_dir, place, capsys, no_model_load):
    expect(capsys, 2, ["mps is not available"], *search(place, "--model", small_model_dir, "--budget", "0.5",
                                                          "--device", "mps"))
    assert only_file_txt(place)


# -- credentials ------------------------------------------------------------------------------------------------------

def test_unreachable_database_masks_the_password(small_model_dir, place, capsys, no_model_load):
    line = expect(capsys, 2, ["cannot open storage", "***", "reachable"],
                  *search(place, "--model", small_model_dir, "--budget", "0.5", "--storage",
                          "postgresql://user:Secret-pw-123@127.0.0.1:1/db"))
    assert "Secret-pw-123" not in run_cli.last_err, line
    assert only_file_txt(place)


def test_missing_postgres_driver_says_what_to_install(small_model_dir, place, capsys, no_model_load, monkeypatch):
    """Without psycopg (3) or psycopg2 a postgresql:// URL names the extra to install, not "is it reachable"."""
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    line = expect(capsys, 2, ["psycopg", "evoreap[postgres]", "***"],
                  *search(place, "--model", small_model_dir, "--budget", "0.5", "--storage",
                          "postgresql://user:Secret-pw-123@db-host:5432/evoreap"))
    assert "reachable" not in line and "Secret-pw-123" not in run_cli.last_err
    assert only_file_txt(place)


def test_mask_url():
    from evoreap.search.storage import mask_url

    assert mask_url("postgresql://u:p%40ss@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert mask_url("mysql+pymysql://u:pw@h/db") == "mysql+pymysql://u:***@h/db"
    assert mask_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert mask_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert mask_url("journal:///tmp/j.log") == "journal:///tmp/j.log"
    assert "pw" not in mask_url("weird://u:pw@[bad")


def test_local_workers_get_the_storage_url_outside_their_command_line(tmp_path, monkeypatch):
    """``--workers N`` passes the storage URL (which may hold a password) to its workers in the environment, where
    ``ps`` does not show it."""
    from types import SimpleNamespace

    from evoreap.pipeline import session as cmd
    from evoreap.pipeline.config import SearchConfig

    url = "postgresql://u:Secret-pw-123@h/db"
    config = SearchConfig(budget=0.5, storage=url, workers=2)
    spawned = []

    def fake_popen(argv, env, stderr, **kw):
        stderr.close()
        spawned.append((argv, env))

    monkeypatch.setattr(cmd.subprocess, "Popen", fake_popen)
    cmd._spawn_workers(config, SimpleNamespace(storage_url=url, run=SimpleNamespace(path=tmp_path)))
    (argv, env), = spawned
    assert not any("Secret-pw-123" in a for a in argv) and "--storage" not in argv
    assert env[cmd.STORAGE_ENV] == url


# -- other commands ---------------------------------------------------------------------------------------------------

def _run_files(run: Path, **override) -> Path:
    run.mkdir()
    files = {"result.json": json.dumps({"space": {"layers": [0], "budget": "b"}, "best": [1], "uniform": [1],
                                        "heldout": {}, "generations": 0, "tokens_spent": 0, "stopped_by": "x",
                                        "best_value": 0, "uniform_value": 0}),
             "history.json": '{"history": []}', "best_allocation.json": '{"layers": {"0": 1}}',
             "config.json": '{"config": {}}', "environment.json": "{}"}
    files.update(override)
    for name, text in files.items():
        (run / name).write_text(text)
    return run


@pytest.mark.parametrize("override,words", [
    ({"result.json": '{"space": {"lay'}, ["result.json", "not valid json"]),
    ({"history.json": "[1, 2]"}, ["history.json", "not a json object"]),
    ({"result.json": "{}"}, ["result.json", "lacks", "space"]),
    ({"history.json": '{"history": []}'}, ["cannot draw"]),  # no trial at all
])
def test_plot_of_a_broken_run(tmp_path, capsys, override, words):
    pytest.importorskip("matplotlib")
    run = _run_files(tmp_path / "run", **override)
    before = tree(run)
    expect(capsys, 2, words, "plot", run)
    assert not (run / "report.md").exists() and set(before) <= set(tree(run))


def test_observe_show_with_an_empty_key(tmp_path, capsys, no_model_load):
    expect(capsys, 2, ["--show needs"], "observe", "--show", "", "--cache-dir", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_observe_max_memory_not_a_size(small_model_dir, tmp_path, capsys, no_model_load, value):
    expect(capsys, 2, ["--max-memory", "positive"], "observe", "--model", small_model_dir, "--max-memory", value,
           "--tokens", "256", "--seq-len", "64", "--cache-dir", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("flags,words", [
    (["--budget-params", "10000000000"], ["--budget-params", "model has only"]),
    (["--budget-gb", "1000", "--bits", "4"], ["--budget-gb", "model has only"]),
])
def test_budget_above_the_model_is_refused(flags, words, small_model_dir, tmp_path, capsys, no_model_load):
    """A budget larger than every routed expert would silently keep them all (a unit slip, e.g. GB for MB)."""
    expect(capsys, 2, words, "search", "--model", small_model_dir, *flags, "--runs-dir", tmp_path / "runs",
           "--cache-dir", tmp_path / "cache", *FAST)
    assert tree(tmp_path) == []


def test_binary_space_file_is_one_line(small_model_dir, tmp_path, capsys, no_model_load):
    space = tmp_path / "space.yaml"
    space.write_bytes(b"\xff\xfe\x00binary")
    expect(capsys, 2, ["search space", "not valid YAML"], "search", "--model", small_model_dir, "--budget", "0.5",
           "--space", space, "--runs-dir", tmp_path / "runs", "--cache-dir", tmp_path / "cache", *FAST)
    assert tree(tmp_path) == ["space.yaml"]
