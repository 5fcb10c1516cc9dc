"""The command line: help, exit codes, one-line errors, inspect."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evoreap.cli import build_parser, main
from evoreap.testing import tiny_model


@pytest.fixture(scope="module")
def saved_qwen(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen")
    tiny_model("qwen3_moe").save_pretrained(path)
    return path


def test_every_subcommand_has_help_with_defaults_and_an_example(capsys):
    parser = build_parser()
    names = [a for a in parser._subparsers._group_actions[0].choices]
    assert "inspect" in names
    for name in names:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "example:" in out and "evoreap " + name in out


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--no-such-flag"])
    assert e.value.code == 2


def test_inspect_tiny_model_json(saved_qwen, capsys):
    assert main(["inspect", str(saved_qwen), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "Qwen3-MoE" and info["moe_layers"] == [0, 2, 3]
    assert info["experts_per_layer"] == {"0": 16, "2": 16, "3": 16} and info["top_k"] == 4
    p = info["params"]
    assert p["routed_experts"] == 16 * 3 * p["per_expert"]
    assert info["stored_bytes"] == 4 * p["total"]  # fp32 on disk, untied embeddings


def test_missing_model_is_one_line_exit_2(capsys, tmp_path):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_dense_model_is_refused_exit_1(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                vocab_size=64).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a Mixture-of-Experts model" in err[0] and "Traceback" not in err[0]


def test_cli_shim_runs_as_a_script():
    shim = Path(__file__).resolve().parents[1] / "cli.py"
    out = subprocess.run([sys.executable, str(shim), "--help"], capture_output=True, text=True, check=True)
    assert "evoreap" in out.stdout and "inspect" in out.stdout


def test_model_with_custom_code_is_refused_without_trust_remote_code(saved_qwen, tmp_path, capsys):
    import shutil

    d = tmp_path / "custom"
    shutil.copytree(saved_qwen, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "configuration_evil.py").write_text("raise SystemExit('this code must never run')\n")
    assert main(["inspect", str(d)]) == 2
    err = capsys.readouterr().err
    assert "--trust-remote-code" in err and "never run" not in err
