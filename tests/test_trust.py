"""No code from a model directory runs unless the user passed --trust-remote-code.

evoreap loads its own non-uniform exports with a class built in-process from its packaged template and hands
transformers ``trust_remote_code=False``; any other code-bearing entry anywhere in a directory is refused. Every place
transformers 5 imports code from is tried: Python files at any depth, ``custom_generate/``, ``auto_map`` in the model
config (extra entries) and in the tokenizer config, and an edited ``modeling_evoreap.py``. Each payload writes a
marker file when imported; the marker must never appear.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from evoreap.checkpoint.trust import code_entries, needs_trust
from evoreap.cli import main
from evoreap.errors import UsageError
from evoreap.export import export_pruned
from evoreap.models import load_model

KEPT = {0: [0, 1, 2, 3], 1: list(range(8)), 2: [1, 3], 3: [0, 2, 4, 6, 7]}


def _payload(marker: Path) -> str:
    return f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, small_model_dir):
    out = tmp_path_factory.mktemp("trust") / "pruned"
    export_pruned(small_model_dir, out, KEPT, progress=False)
    return out


def _with(export_dir: Path, tmp_path: Path, place: str) -> tuple[Path, Path]:
    """A copy of the export with a code payload put at ``place``; returns (directory, marker path)."""
    d = tmp_path / "m"
    shutil.copytree(export_dir, d)
    marker = tmp_path / "MARKER"
    code = _payload(marker)
    if place == "custom_generate":
        (d / "custom_generate").mkdir()
        (d / "custom_generate" / "generate.py").write_text(code + "def generate(model, **kwargs):\n    return None\n")
    elif place == "nested_py":
        (d / "sub" / "deeper").mkdir(parents=True)
        (d / "sub" / "deeper" / "helper.py").write_text(code)
    elif place == "top_py":
        (d / "configuration_extra.py").write_text(code)
    elif place == "config_auto_map":
        (d / "configuration_evil.py").write_text(code + "from transformers import Qwen3MoeConfig as EvilConfig\n")
        cfg = json.loads((d / "config.json").read_text())
        cfg["auto_map"]["AutoConfig"] = "configuration_evil.EvilConfig"
        (d / "config.json").write_text(json.dumps(cfg))
    elif place == "tokenizer_auto_map":
        tc = json.loads((d / "tokenizer_config.json").read_text())
        tc["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
        (d / "tokenizer_config.json").write_text(json.dumps(tc))
        (d / "tokenization_evil.py").write_text(code)
    elif place == "symlinked_folder":
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "generate.py").write_text(code)
        (d / "custom_generate_link").symlink_to(outside, target_is_directory=True)
    else:
        raise AssertionError(place)
    return d, marker


PLACES = ["custom_generate", "nested_py", "top_py", "config_auto_map", "tokenizer_auto_map", "symlinked_folder"]


@pytest.mark.parametrize("place", PLACES)
def test_code_anywhere_in_an_export_is_refused_without_trust(export_dir, tmp_path, place):
    d, marker = _with(export_dir, tmp_path, place)
    assert code_entries(d)  # the scan sees it
    with pytest.raises(UsageError, match="trust-remote-code"):
        load_model(str(d))
    assert not marker.exists()


@pytest.mark.parametrize("command", ["observe", "evaluate"])
def test_cli_never_runs_custom_generate(export_dir, small_model_dir, tmp_path, capsys, command):
    """The red team's case: a custom_generate/ folder added to a genuine evoreap export ran under
    ``evaluate --pruned DIR`` and ``observe --model DIR``."""
    d, marker = _with(export_dir, tmp_path, "custom_generate")
    cache = tmp_path / "cache"
    if command == "observe":
        argv = ["observe", "--model", d, "--tokens", "256", "--seq-len", "64", "--cache-dir", cache]
    else:
        argv = ["evaluate", "--model", small_model_dir, "--pruned", d, "--tokens", "256", "--seq-len", "64",
                "--cache-dir", cache, "--generate", "0"]
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and "custom_generate/" in err and "--trust-remote-code" in err, err
    assert not marker.exists()
    assert not cache.exists() or not any((cache).rglob("*.safetensors"))


def test_edited_modeling_file_is_never_imported(export_dir, small_model_dir, tmp_path):
    """evoreap builds the export's class from its own template: an edited ``modeling_evoreap.py`` in the directory
    neither runs nor changes the model, and the export loads without trust and equals the masked model."""
    from evoreap.masking import masked

    d = tmp_path / "m"
    shutil.copytree(export_dir, d)
    marker = tmp_path / "MARKER"
    (d / "modeling_evoreap.py").write_text(_payload(marker) + "raise SystemExit('imported')\n")
    assert needs_trust(d, False) is False
    pruned = load_model(str(d))
    assert not marker.exists()
    full = load_model(str(small_model_dir))
    masks = {layer: torch.zeros(8, dtype=torch.bool).index_fill_(0, torch.tensor(k), True)
             for layer, k in KEPT.items() if len(k) < 8}
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), masked(full.model, full.adapter, masks):
        want = full.model(input_ids=ids).logits
    got = pruned.model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_user_trust_is_the_only_trust(export_dir, tmp_path):
    """needs_trust never turns trust on by itself; with the user's flag a foreign folder loads as transformers
    decides (here: the tokenizer payload is imported, because the user asked for it)."""
    d, marker = _with(export_dir, tmp_path, "nested_py")
    assert needs_trust(export_dir, False) is False
    assert needs_trust(d, True) is True
    load_model(str(d), trust_remote_code=True)  # a nested helper is not on any import path: loads, runs nothing
    assert not marker.exists()
