"""The Python API, the typed run config and its replay, and counts-only allocations."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evoreap
from evoreap.cli import main
from evoreap.errors import SettingError, UsageError
from evoreap.pipeline.config import SearchConfig

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(generations=1, offspring=2, population=2, fidelities=(256, 512, 1024), survivors=(2, 1),
            calib_tokens=2048, heldout_tokens=1024, seq_len=64, batch_size=8, no_plots=True)


def test_readme_api_example_runs_as_written(tmp_path):
    """The README's Python block, run as a user would paste it (its own process, a fresh working directory)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- api-example[^>]*-->\n```python\n(.*?)```", text, re.S).group(1)
    env = {**os.environ, "EVOREAP_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "keep per layer:" in r.stdout and "exported model, held-out KL:" in r.stdout
    searched, uniform = map(float, re.search(r"searched vs uniform: (\S+) (\S+)", r.stdout).groups())
    assert 0 < searched <= uniform
    assert (tmp_path / "runs" / "api-demo-pruned" / "evoreap.json").is_file()
    cfg = json.loads((tmp_path / "runs" / "api-demo" / "config.json").read_text())
    assert cfg["config"]["generations"] == 2 and cfg["config"]["run"] == "api-demo"


def test_search_from_python_equals_the_cli(small_model_dir, tmp_path, capsys):
    """Same settings through evoreap.search and through the CLI: same best allocation and held-out values."""
    cache = tmp_path / "cache"
    res = evoreap.search(str(small_model_dir), 0.5, runs_dir=str(tmp_path / "py"), cache_dir=str(cache),
                         run="a", quiet=True, **FAST)
    argv = ["search", "--model", small_model_dir, "--budget", "0.5", "--runs-dir", tmp_path / "cli", "--cache-dir",
            cache, "--run", "a"]
    for k, v in FAST.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, ",".join(map(str, v)) if isinstance(v, tuple) else v]
    assert main([str(a) for a in argv]) == 0
    capsys.readouterr()
    cli = json.loads((tmp_path / "cli" / "a" / "best_allocation.json").read_text())
    assert {str(k): v for k, v in res.allocation.as_dict().items()} == cli["layers"]
    assert res.table["searched"]["values"] == pytest.approx(cli["meta"]["heldout"], rel=1e-9)
    assert res.run_dir == tmp_path / "py" / "a"


def test_config_replay_gives_the_same_run(small_model_dir, tmp_path, capsys):
    """``search --config RUN_DIR`` replays the stored settings; a YAML file of settings works the same; options on
    the command line override the file."""
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    base = ["search", "--model", str(small_model_dir), "--budget", "0.5", "--runs-dir", str(runs), "--cache-dir",
            str(cache), "--generations", "1", "--offspring", "2", "--population", "2", "--fidelities", "256,512,1024",
            "--survivors", "2,1", "--calib-tokens", "2048", "--heldout-tokens", "1024", "--seq-len", "64",
            "--no-plots", "--seed", "3"]
    assert main([*base, "--run", "orig"]) == 0
    assert main(["search", "--config", str(runs / "orig"), "--run", "replay"]) == 0
    yaml_file = tmp_path / "settings.yaml"
    stored = json.loads((runs / "orig" / "config.json").read_text())["config"]
    yaml_file.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in stored.items() if k != "run"))
    assert main(["search", "--config", str(yaml_file), "--run", "yaml"]) == 0
    capsys.readouterr()

    def best(name):
        return json.loads((runs / name / "best_allocation.json").read_text())

    assert best("orig")["layers"] == best("replay")["layers"] == best("yaml")["layers"]
    assert best("orig")["meta"]["heldout"] == best("replay")["meta"]["heldout"] == best("yaml")["meta"]["heldout"]
    replay = json.loads((runs / "replay" / "config.json").read_text())["config"]
    assert {k: v for k, v in replay.items() if k != "run"} == {k: v for k, v in stored.items() if k != "run"}
    # an option on the command line overrides the file
    assert main(["search", "--config", str(runs / "orig"), "--run", "other", "--seed", "4"]) == 0
    assert json.loads((runs / "other" / "config.json").read_text())["config"]["seed"] == 4


@pytest.mark.parametrize("content,words", [
    ('{"budgt": 0.5}', ["unknown setting", "budgt"]),
    ('{"budget": 0.5, "workers": "two"}', ["workers", "whole number"]),
    ('{"budget": 0.5, "fidelities": [1, "x", 3]}', ["fidelities"]),
    ('{"budget": 0.5, "sampler": "tpee"}', ["sampler", "did you mean tpe"]),
    ('[1, 2]', ["not a search config"]),
    ('{"budget": 0.5', ["cannot be read as JSON"]),
    ('{"budget": 0.5, "storage": "postgresql://u:***@h/db"}', ["masked", "--storage"]),
])
def test_bad_config_files_are_one_line(content, words, tmp_path, capsys):
    f = tmp_path / "c.json"
    f.write_text(content)
    rc = main(["search", "--config", str(f), "--runs-dir", str(tmp_path / "runs")])
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert rc == 2 and len(err) == 1, err
    for w in words:
        assert w in err[0], (w, err[0])
    assert not (tmp_path / "runs").exists()


def test_config_fields_are_the_cli_options_and_defaults():
    """One source: every CLI-visible field is an option of `evoreap search` whose help states the field's default;
    SearchConfig() is what the CLI uses when no option is given."""
    from evoreap.cli import build_parser
    from evoreap.commands.search import config_from_args

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["search"]
    options = {a.dest: a for a in sub._actions if a.option_strings}
    import dataclasses

    for f in dataclasses.fields(SearchConfig):
        if f.metadata["cli"]:
            assert f.name in options, f.name
            shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else str(f.default)
            assert f"(default: {shown})" in options[f.name].help, f.name
    assert config_from_args(parser.parse_args(["search"])) == SearchConfig()


def test_setting_errors_name_the_setting_in_python_and_the_option_in_the_cli(tmp_path, capsys):
    with pytest.raises(SettingError, match=r"^batch_size must be at least 1"):
        evoreap.search(budget=0.5, batch_size=0, runs_dir=str(tmp_path / "runs"))
    assert main(["search", "--budget", "0.5", "--batch-size", "0", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err
    with pytest.raises(UsageError, match="unknown search setting"):
        evoreap.search(budget=0.5, generatoins=3)
    assert isinstance(SettingError("x", "{name}"), ValueError)


def test_observe_and_evaluate_take_a_loaded_model_and_a_dataset(small_model_dir, tmp_path):
    """``model`` may be a transformers model object and ``data`` a datasets.Dataset; the observation equals the one
    made from the directory on the same text."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evoreap.data.loader import read_documents
    from evoreap.data.spec import parse_data_spec

    texts = read_documents(parse_data_spec("code", "calibration")[0])[:40]
    ds = datasets.Dataset.from_dict({"text": texts})
    model = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(small_model_dir)
    cache = str(tmp_path / "cache")
    a = evoreap.observe(model, ds, tokenizer=tok, tokens=2048, seq_len=64, cache_dir=cache, progress=False)
    b = evoreap.observe(str(small_model_dir), ds, tokens=2048, seq_len=64, cache_dir=cache, progress=False)
    for layer in a.stats.layers:
        assert torch.equal(a.stats.layer(layer).count, b.stats.layer(layer).count)
        torch.testing.assert_close(a.stats.layer(layer).gate_norm_sum, b.stats.layer(layer).gate_norm_sum)
    alloc = evoreap.Allocation((0, 1, 2, 3), (4, 4, 4, 4), {"observation_key": b.key, "criterion": "reap"})
    report = evoreap.evaluate(model, allocation=alloc, tokenizer=tok, data=ds, tokens=1024, seq_len=64,
                              cache_dir=cache)
    assert report.results["unpruned"]["overall"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert report.results["pruned (masked)"]["overall"]["kl"] > 0


def test_counts_only_allocation_is_completed_from_the_defaults(small_model_dir, tmp_path, capsys):
    """An allocation that names counts only, no observation and no criterion: export and evaluate complete it with
    the default criterion on an observation of the model on the default calibration data, both choosing the same
    experts, and the export equals the masked model."""
    alloc = tmp_path / "counts.json"
    alloc.write_text(json.dumps({"layers": {"0": 4, "1": 6, "2": 2, "3": 8}}))
    cache = tmp_path / "cache"
    out = tmp_path / "pruned"
    assert main(["export", "--model", str(small_model_dir), "--allocation", str(alloc), "--out", str(out),
                 "--cache-dir", str(cache), "--no-progress"]) == 0
    record = json.loads((out / "evoreap.json").read_text())
    assert record["criterion"] == "reap_x_frequency" and len(record["observation_key"]) == 64
    assert {k: len(v) for k, v in record["kept_experts"].items()} == {"0": 4, "1": 6, "2": 2, "3": 8}
    res = evoreap.evaluate(str(small_model_dir), allocation=str(alloc), tokens=1024, seq_len=64,
                           cache_dir=str(cache))
    exported = evoreap.evaluate(str(small_model_dir), pruned=str(out), tokens=1024, seq_len=64, cache_dir=str(cache))
    masked = res.results["pruned (masked)"]["overall"]
    assert exported.results["pruned (exported)"]["overall"]["kl"] == pytest.approx(masked["kl"], rel=1e-4, abs=1e-6)
    capsys.readouterr()
