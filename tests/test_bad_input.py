"""Bad input, command by command: each case runs the real CLI and must fail with exit 2 (usage) or 1 (runtime),
exactly one error line that names the problem and the fix, no traceback, and no file left behind.

Tests run as root, which ignores permission bits, so "unwritable output" is a path under a regular file
(``file.txt/sub``): no user can create it.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from evoreap.cli import main
from cli_helpers import expect, nothing_in, run_cli

FAST = ["--generations", "0", "--offspring", "2", "--population", "2", "--fidelities", "256,512,1024",
        "--survivors", "2,1", "--calib-tokens", "1024", "--heldout-tokens", "512", "--seq-len", "64",
        "--batch-size", "8", "--no-plots"]








# -- fixtures: broken models, data files and a real observation --------------------------------------------------

@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, small_model_dir):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = tmp_path_factory.mktemp("dense")
    cfg = Qwen3Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, intermediate_size=32)
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    return path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def truncated_dir(tmp_path_factory, small_model_dir):
    path = _copy(small_model_dir, tmp_path_factory.mktemp("trunc") / "m")
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="module")
def wrong_experts_dir(tmp_path_factory, small_model_dir):
    path = _copy(small_model_dir, tmp_path_factory.mktemp("wrongE") / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_local_experts"] = 16  # the weights hold 8
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def other_router_dir(tmp_path_factory, small_model_dir):
    """The same architecture and tokenizer with other router weights: another model to an observation."""
    path = _copy(small_model_dir, tmp_path_factory.mktemp("other") / "m")
    f = path / "model.safetensors"
    tensors = load_file(f)
    for name in tensors:
        if name.endswith("mlp.gate.weight"):
            tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, f, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def observation(tmp_path_factory, small_model_dir):
    """(cache dir, key) of a real observation of small_model_dir."""
    cache = tmp_path_factory.mktemp("obs_cache")
    assert main(["observe", "--model", str(small_model_dir), "--tokens", "512", "--seq-len", "64",
                 "--cache-dir", str(cache), "-q"]) == 0
    (key,) = [p.name for p in (cache / "observations").iterdir() if (p / "manifest.json").is_file()]
    return cache, key


def _tampered_cache(observation, tmp_path, change):
    cache, key = observation
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    change(copy / "observations" / key)
    return copy, key


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "empty.txt").write_text("")
    (d / "short.txt").write_text("a few words only")
    (d / "nofield.jsonl").write_text("\n".join(json.dumps({"body": f"document {i} " * 50}) for i in range(20)))
    torch.manual_seed(0)
    (d / "binary.txt").write_bytes(bytes(torch.randint(0, 256, (20000,), dtype=torch.uint8).tolist()))
    (d / "bigstep.yaml").write_text("step: 8\n")
    (d / "file.txt").write_text("not a directory\n")
    return d


def _alloc(tmp_path, layers):
    p = tmp_path / "alloc.json"
    p.write_text(json.dumps({"layers": {str(k): v for k, v in layers.items()},
                             "experts": None}))
    return p


# -- models -------------------------------------------------------------------------------------------------------

# an unsupported architecture is a runtime refusal (exit 1) that lists the supported ones
def test_dense_model_is_refused(dense_dir, capsys):
    expect(capsys, 1, ["not a mixture-of-experts", "mixtral"], "inspect", dense_dir)


def test_dense_model_search_leaves_no_run(dense_dir, tmp_path, capsys):
    expect(capsys, 1, ["not a mixture-of-experts"], "search", "--model", dense_dir, "--budget", "0.5",
           "--runs-dir", tmp_path / "runs",
           "--cache-dir", tmp_path / "cache", *FAST)
    assert nothing_in(tmp_path / "runs") and nothing_in(tmp_path / "cache")


def test_missing_model_path(tmp_path, capsys):
    expect(capsys, 2, ["does not exist", "directory"], "inspect", tmp_path / "nope")


def test_model_path_is_a_file(data_files, capsys):
    expect(capsys, 2, ["not a directory"], "inspect", data_files / "file.txt")


def test_model_dir_without_config(tmp_path, capsys):
    expect(capsys, 2, ["config.json"], "inspect", tmp_path)


def test_truncated_safetensors_observe_leaves_no_cache(truncated_dir, tmp_path, capsys):
    line = expect(capsys, 1, ["safetensors"], "observe", "--model", truncated_dir, "--tokens", "256",
                  "--seq-len", "64", "--cache-dir", tmp_path / "cache")
    assert "cannot load" in line
    assert nothing_in(tmp_path / "cache")


def test_truncated_safetensors_export_leaves_no_out(truncated_dir, tmp_path, capsys):
    alloc = tmp_path / "a.json"
    alloc.write_text(json.dumps({"layers": {str(i): 4 for i in range(4)},
                                 "experts": {str(i): [0, 1, 2, 3] for i in range(4)}}))
    expect(capsys, 1, ["safetensors"], "export", "--model", truncated_dir, "--allocation", alloc,
           "--out", tmp_path / "out", "--no-progress")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_config_expert_count_disagrees_with_weights(wrong_experts_dir, tmp_path, capsys):
    expect(capsys, 1, ["do not match config.json", "shape differs"], "observe", "--model", wrong_experts_dir,
           "--tokens", "256",
           "--seq-len", "64", "--cache-dir", tmp_path / "cache")
    assert nothing_in(tmp_path / "cache")


# -- budgets and the search space --------------------------------------------------------------------------------

@pytest.mark.parametrize("budget,code,words", [
    ("0", 2, ["(0, 1]"]),
    ("-0.5", 2, ["(0, 1]"]),
    ("1.5", 2, ["(0, 1]"]),
    ("nan", 2, ["(0, 1]"]),
    ("inf", 2, ["(0, 1]"]),
    ("half", 2, ["--budget", "number"]),
    ("0.1", 2, ["below the floor", "raise the budget"]),
])
def test_bad_budget(small_model_dir, tmp_path, capsys, budget, code, words):
    expect(capsys, code, words, "search", "--model", small_model_dir, "--budget", budget,
           "--runs-dir", tmp_path / "runs", "--cache-dir", tmp_path / "cache", *FAST)
    assert nothing_in(tmp_path / "runs") and nothing_in(tmp_path / "cache")


def test_step_that_cannot_meet_the_budget(small_model_dir, data_files, tmp_path, capsys):
    expect(capsys, 2, ["step", "budget"], "search", "--model", small_model_dir, "--budget", "0.5",
           "--space", data_files / "bigstep.yaml", "--runs-dir", tmp_path / "runs", "--cache-dir",
           tmp_path / "cache", *FAST)
    assert nothing_in(tmp_path / "runs")


@pytest.mark.parametrize("flag,value,words", [
    ("--criterion", "reapp", ["did you mean", "reap"]),
    ("--proxy", "kll", ["kl"]),
    ("--sampler", "evolutoin", ["evolution"]),
    ("--workers", "0", ["at least 1"]),
    ("--seq-len", "0", ["seq-len"]),
    ("--storage", "mysqlx:/nowhere", ["storage", "sqlite:///"]),
    ("--storage", "postgresql://user@127.0.0.1:1/db", ["cannot open storage", "reachable"]),
    ("--fidelities", "1024,512,2048", ["--fidelities", "three increasing"]),
    ("--survivors", "1,2", ["--survivors", "not larger"]),
    ("--generations", "-1", ["--generations", ">= 0"]),
    ("--proxy-weights", "poetry:1", ["poetry", "not a domain"]),
])
def test_bad_search_setting(small_model_dir, tmp_path, capsys, flag, value, words):
    expect(capsys, 2, words, "search", "--model", small_model_dir, "--budget", "0.5", "--runs-dir",
           tmp_path / "runs", "--cache-dir", tmp_path / "cache", *FAST, flag, value)
    assert nothing_in(tmp_path / "runs") and nothing_in(tmp_path / "cache")



def test_worker_without_run_name(small_model_dir, tmp_path, capsys):
    """A worker must join the leader's run: without --run it would start a run of its own and wait forever."""
    expect(capsys, 2, ["--worker needs --run"], "search", "--model", small_model_dir, "--budget", "0.5",
           "--runs-dir", tmp_path / "runs", "--cache-dir", tmp_path / "cache", *FAST, "--worker")
    assert nothing_in(tmp_path / "runs") and nothing_in(tmp_path / "cache")

def test_unknown_criterion_in_observe(small_model_dir, tmp_path, capsys):
    expect(capsys, 2, ["did you mean"], "observe", "--model", small_model_dir, "--criterion", "frequncy",
           "--cache-dir", tmp_path / "cache")
    assert nothing_in(tmp_path / "cache")


def test_reused_run_name_with_other_settings(small_model_dir, tmp_path, capsys):
    common = ["search", "--model", small_model_dir, "--run", "r", "--runs-dir", tmp_path / "runs", "--cache-dir",
              tmp_path / "cache", *FAST]
    assert run_cli(capsys, *common, "--budget", "0.5")[0] == 0
    before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    expect(capsys, 2, ["different settings"], *common, "--budget", "0.75")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == before


# -- data -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,words", [
    ("empty.txt", ["empty.txt"]),
    ("short.txt", ["short", "fewer than one sequence", "--seq-len"]),
    ("nofield.jsonl", ["text"]),
    ("binary.txt", ["binary.txt"]),
    ("missing.txt", ["does not exist"]),
])
def test_bad_data_file(small_model_dir, data_files, tmp_path, capsys, name, words):
    expect(capsys, 2, words, "observe", "--model", small_model_dir, "--data", data_files / name, "--tokens",
           "256", "--seq-len", "64", "--cache-dir", tmp_path / "cache")
    assert nothing_in(tmp_path / "cache")


def test_zero_seq_len_in_observe(small_model_dir, tmp_path, capsys):
    expect(capsys, 2, ["seq-len"], "observe", "--model", small_model_dir, "--seq-len", "0",
           "--cache-dir", tmp_path / "cache")
    assert nothing_in(tmp_path / "cache")


# -- observations ---------------------------------------------------------------------------------------------------

def test_observation_of_another_model_in_export(other_router_dir, observation, tmp_path, capsys):
    cache, key = observation
    alloc = tmp_path / "a.json"
    alloc.write_text(json.dumps({"layers": {str(i): 4 for i in range(4)}}))
    expect(capsys, 2, ["other router weights", "observe this model"], "export", "--model", other_router_dir,
           "--allocation", alloc, "--observation", key, "--criterion", "reap", "--cache-dir", cache,
           "--out", tmp_path / "out", "--no-progress")
    assert not (tmp_path / "out").exists()


def test_observation_of_another_model_in_evaluate(other_router_dir, observation, tmp_path, capsys):
    cache, key = observation
    alloc = tmp_path / "a.json"
    alloc.write_text(json.dumps({"layers": {str(i): 4 for i in range(4)}}))
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    expect(capsys, 2, ["other router weights", "observe this model"], "evaluate", "--model", other_router_dir,
           "--allocation", alloc, "--observation", key, "--criterion", "reap", "--cache-dir", cache,
           "--tokens", "256", "--seq-len", "64", "--generate", "0")
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before  # no reference cached


def test_unknown_observation_key(observation, capsys):
    cache, _ = observation
    expect(capsys, 2, ["no observation", "evoreap observe"], "observe", "--show", "feedbeef", "--cache-dir", cache)


def test_manifest_checksum_mismatch(observation, tmp_path, capsys):
    def corrupt(d):
        f = sorted(d.glob("*.safetensors"))[0]
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))

    cache, key = _tampered_cache(observation, tmp_path, corrupt)
    expect(capsys, 2, ["sha256", "observe again"], "observe", "--show", key, "--cache-dir", cache)


def test_manifest_file_name_leaves_its_directory(observation, tmp_path, capsys):
    def escape(d):
        m = json.loads((d / "manifest.json").read_text())
        name, digest = next(iter(m["files"].items()))
        m["files"]["../" + name] = digest
        (d / "manifest.json").write_text(json.dumps(m))

    cache, key = _tampered_cache(observation, tmp_path, escape)
    expect(capsys, 2, ["outside its directory"], "observe", "--show", key, "--cache-dir", cache)


def test_corrupted_manifest_json(observation, tmp_path, capsys):
    cache, key = _tampered_cache(observation, tmp_path, lambda d: (d / "manifest.json").write_text("{not json"))
    expect(capsys, 2, ["not valid json", "observe again"], "observe", "--show", key, "--cache-dir", cache)


# -- allocations: export and evaluate ----------------------------------------------------------------------------

BAD_ALLOCATIONS = [
    ({0: 4, 1: 4, 2: 4}, ["layers", "another model"]),            # wrong number of layers
    ({0: -1, 1: 4, 2: 4, 3: 4}, ["negative"]),
    ({0: 9, 1: 4, 2: 4, 3: 4}, ["9"]),                              # above the 8 experts
    ({0: 1, 1: 4, 2: 4, 3: 4}, ["top-k"]),                          # below top-2
]


@pytest.mark.parametrize("layers,words", BAD_ALLOCATIONS)
def test_bad_allocation_in_export(small_model_dir, tmp_path, capsys, layers, words):
    expect(capsys, 2, words, "export", "--model", small_model_dir, "--allocation", _alloc(tmp_path, layers),
           "--out", tmp_path / "out", "--no-progress")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layers,words", BAD_ALLOCATIONS)
def test_bad_allocation_in_evaluate(small_model_dir, tmp_path, capsys, layers, words):
    expect(capsys, 2, words, "evaluate", "--model", small_model_dir, "--allocation", _alloc(tmp_path, layers),
           "--tokens", "256", "--seq-len", "64", "--generate", "0", "--cache-dir", tmp_path / "cache")
    assert nothing_in(tmp_path / "cache")


def test_allocation_not_json(small_model_dir, data_files, tmp_path, capsys):
    expect(capsys, 2, ["not valid json"], "export", "--model", small_model_dir, "--allocation",
           data_files / "binary.txt", "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_allocation_missing(small_model_dir, tmp_path, capsys):
    expect(capsys, 2, ["does not exist"], "evaluate", "--model", small_model_dir, "--allocation",
           tmp_path / "nope.json", "--cache-dir", tmp_path / "cache")
    assert nothing_in(tmp_path / "cache")


# -- output directories -------------------------------------------------------------------------------------------

def _good_alloc(tmp_path):
    p = tmp_path / "good.json"
    p.write_text(json.dumps({"layers": {str(i): 4 for i in range(4)},
                             "experts": {str(i): [0, 1, 2, 3] for i in range(4)}}))
    return p


def test_existing_output_directory(small_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect(capsys, 2, ["--overwrite"], "export", "--model", small_model_dir, "--allocation", _good_alloc(tmp_path),
           "--out", out, "--no-progress")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.json", "out"]


def test_unwritable_output_directory(small_model_dir, data_files, tmp_path, capsys):
    # root ignores chmod, so the unwritable place is a path below a regular file
    out = data_files / "file.txt" / "sub"
    expect(capsys, 2, ["cannot create", "file.txt", "choose another --out"], "export", "--model", small_model_dir,
           "--allocation",
           _good_alloc(tmp_path), "--out", out, "--no-progress")
    assert (data_files / "file.txt").read_text() == "not a directory\n"


def test_unwritable_runs_dir(small_model_dir, data_files, tmp_path, capsys):
    expect(capsys, 2, ["cannot create run directory", "writable"], "search", "--model", small_model_dir,
           "--budget", "0.5", "--runs-dir", data_files / "file.txt" / "runs", "--cache-dir", tmp_path / "cache",
           *FAST)


# -- a few through a real process: the exit code and stderr the shell sees ---------------------------------------

@pytest.mark.parametrize("argv,code,words", [
    (["inspect", "/nonexistent/model"], 2, ["does not exist"]),
    (["search", "--budget", "half"], 2, ["--budget"]),
])
def test_bad_input_in_a_subprocess(argv, code, words):
    p = subprocess.run([sys.executable, "-m", "evoreap.cli", *argv], capture_output=True, text=True, timeout=120)
    assert p.returncode == code and "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1 and all(w in lines[0] for w in words), p.stderr
