"""A destination is compared with its source as a real path: no spelling of the model directory (``..``, ``.``,
a trailing slash, a symlink to it or above it) lets an export replace or enter the source, and ``--overwrite`` only
ever replaces an earlier evoreap export."""

import os
import shutil
from pathlib import Path

import pytest

from evoreap.cli import main
from evoreap.errors import UsageError
from evoreap.export import export_pruned
from evoreap.files import check_destination, overlaps

KEPT = {layer: [0, 1, 2, 3] for layer in range(4)}


@pytest.fixture()
def model(tmp_path, small_model_dir):
    d = tmp_path / "models" / "m"
    shutil.copytree(small_model_dir, d)
    return d


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _spellings(model: Path, tmp_path: Path) -> list[str]:
    (tmp_path / "link_to_model").symlink_to(model, target_is_directory=True)
    (tmp_path / "link_to_models").symlink_to(model.parent, target_is_directory=True)
    return [f"{model}/../m", f"{model}/.", f"{model}/", f"{model.parent}/./m/../m",
            str(tmp_path / "link_to_model"), f"{tmp_path}/link_to_models/m", f"{model}/sub/..",
            f"{model}/sub", str(model.parent)]


def test_no_spelling_of_the_source_is_a_destination(model, tmp_path):
    before = _snapshot(model)
    for out in _spellings(model, tmp_path):
        with pytest.raises(UsageError, match="model directory|symlink"):
            export_pruned(model, out, KEPT, overwrite=True, progress=False)
    assert _snapshot(model) == before
    # the source given through a symlink is the same directory too
    with pytest.raises(UsageError, match="model directory"):
        export_pruned(tmp_path / "link_to_model", model, KEPT, overwrite=True, progress=False)
    assert _snapshot(model) == before


def test_cli_export_refuses_source_spellings_and_keeps_the_model(model, tmp_path, capsys):
    import json

    alloc = tmp_path / "a.json"
    alloc.write_text(json.dumps({"layers": {str(k): len(v) for k, v in KEPT.items()},
                                 "experts": {str(k): v for k, v in KEPT.items()}}))
    before = _snapshot(model)
    for out in _spellings(model, tmp_path):
        rc = main(["export", "--model", str(model), "--allocation", str(alloc), "--out", out, "--overwrite",
                   "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count(": error: ") == 1 and "Traceback" not in err, (out, err)
    assert _snapshot(model) == before


def test_overwrite_replaces_only_an_earlier_export(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("not an export")
    with pytest.raises(UsageError, match="not an evoreap export"):
        export_pruned(model, out, KEPT, overwrite=True, progress=False)
    assert (out / "precious.txt").read_text() == "not an export"
    fresh = tmp_path / "fresh"
    export_pruned(model, fresh, KEPT, progress=False)
    export_pruned(model, fresh, KEPT, overwrite=True, progress=False)  # its own earlier export: replaced
    assert (fresh / "evoreap.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dirs left


def test_symlinked_out_is_refused(model, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "out_link"
    link.symlink_to(target, target_is_directory=True)
    with pytest.raises(UsageError, match="symlink"):
        export_pruned(model, link, KEPT, progress=False)
    assert not any(target.iterdir())


def test_overlaps_and_check_destination(tmp_path):
    a = tmp_path / "a"
    (a / "b").mkdir(parents=True)
    assert overlaps(a, a / "b" / "..") and overlaps(a / "b", a) and overlaps(a, f"{a}/")
    assert not overlaps(a, tmp_path / "ab")  # a prefix of the name is not a parent
    os.symlink(a, tmp_path / "l")
    assert overlaps(tmp_path / "l" / "b", a)
    with pytest.raises(UsageError, match="lies inside|is, contains"):
        check_destination(tmp_path / "l" / "new", sources={"cache": a})
    assert check_destination(tmp_path / "new", sources={"cache": a}) == (tmp_path / "new").resolve()
