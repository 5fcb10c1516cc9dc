"""`evoreap search` end to end on a small saved model: results, resume, refusals, workers."""

import json
import sqlite3

import pytest

from evoreap.cli import main

FAST = ["--generations", "2", "--offspring", "4", "--population", "2", "--fidelities", "512,1024,2048",
        "--survivors", "2,1", "--calib-tokens", "4096", "--heldout-tokens", "2048", "--seq-len", "128",
        "--batch-size", "8"]


def search(model, runs, cache, *extra):
    return main(["search", "--model", str(model), "--runs-dir", str(runs), "--cache-dir", str(cache), *FAST,
                 *extra])


def error_lines(err):
    """The error lines of stderr (log lines such as 'loaded ...' may precede them); never a traceback."""
    assert "Traceback" not in err
    return [line for line in err.strip().splitlines() if ": error: " in line]


def trials(run_dir):
    con = sqlite3.connect(run_dir / "study.db")
    try:
        return con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    finally:
        con.close()


def test_search_writes_a_feasible_best_allocation_and_resumes(small_model_dir, tmp_path, capsys):
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    assert search(small_model_dir, runs, cache, "--budget", "0.5", "--run", "r1", "--no-plots") == 0
    out = capsys.readouterr().out
    assert "keep counts per MoE layer" in out and "held-out split" in out and "searched" in out
    run = runs / "r1"
    best = json.loads((run / "best_allocation.json").read_text())
    counts = list(best["layers"].values())
    assert sum(counts) == 16 and all(2 <= k <= 8 for k in counts)  # 4 layers x 8 experts at 50%
    assert {k: len(v) for k, v in best["experts"].items()} == best["layers"]
    result = json.loads((run / "result.json").read_text())
    assert result["best_value"] <= result["uniform_value"]
    n = trials(run)
    assert n == len(json.loads((run / "history.json").read_text())["history"])

    # the same command again: every score comes from the study, nothing is recomputed, same answer
    (run / "best_allocation.json").unlink()
    assert search(small_model_dir, runs, cache, "--budget", "0.5", "--run", "r1", "--no-plots") == 0
    assert trials(run) == n
    assert json.loads((run / "best_allocation.json").read_text())["layers"] == best["layers"]


def test_reused_run_name_with_other_settings_is_refused(small_model_dir, tmp_path, capsys):
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    assert search(small_model_dir, runs, cache, "--budget", "0.5", "--run", "r", "--no-plots",
                  "--generations", "0") == 0
    capsys.readouterr()
    assert search(small_model_dir, runs, cache, "--budget", "0.75", "--run", "r", "--no-plots") == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "exists with different settings" in err[0] and "space" in err[0]


@pytest.mark.parametrize("args,match", [
    (["--budget", "0.1"], "below the floor"),
    (["--budget", "0"], "in (0, 1]"),
    (["--budget", "1.5"], "in (0, 1]"),
    (["--budget", "nan"], "in (0, 1]"),
    (["--budget", "0.5", "--budget-params", "100"], "exactly one"),
    (["--budget", "0.5", "--criterion", "reapp"], "did you mean"),
    (["--budget", "0.5", "--proxy", "kll"], "kl"),
    (["--budget", "0.5", "--space", "nosuch"], "not found"),
    (["--budget", "0.5", "--workers", "0"], "at least 1"),
])
def test_bad_search_input_is_one_line_and_leaves_no_run(small_model_dir, tmp_path, capsys, args, match):
    runs = tmp_path / "runs"
    assert search(small_model_dir, runs, tmp_path / "cache", *args) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and match in err[0], err
    assert not runs.exists() or not any(runs.iterdir())


def test_budget_text_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["search", "--budget", "half"])
    assert e.value.code == 2


def test_two_workers_lose_and_duplicate_no_trial(small_model_dir, tmp_path, capsys):
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    assert search(small_model_dir, runs, cache, "--budget", "0.5", "--run", "w2", "--no-plots") == 0
    single = json.loads((runs / "w2" / "result.json").read_text())
    assert search(small_model_dir, runs, cache, "--budget", "0.5", "--run", "w2b", "--no-plots",
                  "--workers", "2") == 0
    run = runs / "w2b"
    con = sqlite3.connect(run / "study.db")
    keys = [r[0] for r in con.execute(
        "select a.value_json from trial_user_attributes a join trials t on a.trial_id = t.trial_id "
        "where a.key = 'key' and t.state = 'COMPLETE'")]
    con.close()
    assert len(keys) == len(set(keys)) == len(json.loads((run / "history.json").read_text())["history"])
    multi = json.loads((run / "result.json").read_text())
    assert multi["best"] == single["best"]


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_optuna_samplers_over_the_repaired_encoding(small_model_dir, tmp_path, sampler):
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    assert search(small_model_dir, runs, cache, "--budget", "0.5", "--run", sampler, "--no-plots",
                  "--sampler", sampler) == 0
    best = json.loads((runs / sampler / "best_allocation.json").read_text())
    assert sum(best["layers"].values()) == 16
    result = json.loads((runs / sampler / "result.json").read_text())
    assert result["best_value"] <= result["uniform_value"]
    assert trials(runs / sampler) == 2 * (4 // 2 + 1)  # generations x (offspring / 2 + 1)
