"""`evoreap evaluate` gives the same numbers on a masked allocation and on its export; guard refusals."""

import json
from pathlib import Path

import pytest

from evoreap.cli import main

FAST = ["--generations", "1", "--offspring", "4", "--population", "2", "--fidelities", "512,1024,2048",
        "--survivors", "2,1", "--calib-tokens", "4096", "--heldout-tokens", "2048", "--seq-len", "128"]


@pytest.fixture(scope="module")
def searched(small_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    assert main(["search", "--model", str(small_model_dir), "--budget", "0.5", "--runs-dir", str(root / "runs"),
                 "--cache-dir", str(root / "cache"), "--run", "r", "--export", str(root / "pruned"), *FAST]) == 0
    return root


def _evaluate(capsys, *args):
    capsys.readouterr()
    assert main(["evaluate", "--tokens", "2048", "--seq-len", "128", "--generate", "8", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_masked_and_exported_give_identical_numbers(searched, small_model_dir, capsys):
    cache = str(searched / "cache")
    masked = _evaluate(capsys, "--model", str(small_model_dir), "--cache-dir", cache,
                       "--allocation", str(searched / "runs" / "r" / "best_allocation.json"))
    exported = _evaluate(capsys, "--model", str(small_model_dir), "--cache-dir", cache,
                         "--pruned", str(searched / "pruned"))
    a, b = masked["results"]["pruned (masked)"], exported["results"]["pruned (exported)"]
    for metric in ("nll", "kl", "esap", "top1"):
        assert a["overall"][metric] == pytest.approx(b["overall"][metric], abs=1e-5)
        for d in a["per_domain"]:
            assert a["per_domain"][d][metric] == pytest.approx(b["per_domain"][d][metric], abs=1e-5)
    full = masked["results"]["unpruned"]["overall"]
    assert full["kl"] == pytest.approx(0, abs=1e-6) and full["top1"] == 1.0 and full["esap"] == pytest.approx(1)
    assert a["overall"]["kl"] > 0
    g = masked["generations"]
    assert set(g) == {"code", "drama", "tools", "math"}
    assert exported["generations"]["code"]["pruned (exported)"] == g["code"]["pruned (masked)"]


def test_evaluating_on_search_data_is_refused(searched, small_model_dir, capsys):
    capsys.readouterr()
    code = main(["evaluate", "--model", str(small_model_dir), "--cache-dir", str(searched / "cache"),
                 "--allocation", str(searched / "runs" / "r" / "best_allocation.json"), "--data", "code@search"])
    assert code == 2
    err = capsys.readouterr().err
    assert "overlaps the search data" in err and "--allow-overlap" in err


def test_report_and_pictures_are_written(searched):
    run = searched / "runs" / "r"
    text = (run / "report.md").read_text()
    for pic in ("allocation.png", "history.png", "saliency.png", "domain_usage.png"):
        assert (run / pic).stat().st_size > 5000 and f"]({pic})" in text
    assert "## Held-out" in text and "uniform (reap_x_frequency)" in text


def test_pictures_are_optuna_artifacts_of_the_study(searched):
    import optuna
    from optuna.artifacts import get_all_artifact_meta

    run = searched / "runs" / "r"
    env = json.loads((run / "environment.json").read_text())
    study = optuna.load_study(study_name=env["study"], storage=env["storage"])
    names = sorted(m.filename for m in get_all_artifact_meta(study))
    assert names == ["allocation.png", "domain_usage.png", "history.png", "saliency.png"]
    # the same finished run reported again (a re-run of its command) stores no second copy of equal pictures
    from evoreap.pipeline.report import write_report

    write_report(run, artifacts=True)
    assert sorted(m.filename for m in get_all_artifact_meta(study)) == names


def readme_task_yaml(data: Path) -> str:
    """The local-data task example of the README, pointed at ``data``: the documented example is what is tested."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert "/data/my_task.jsonl" in block
    return block.replace("/data/my_task.jsonl", str(data))


def test_lm_eval_on_masked_and_exported_with_local_tasks(searched, small_model_dir, capsys, tmp_path):
    """Bundled demo tasks and a user's own local-data task run with no hub, on both forms of the pruned model, with
    the same numbers; the unpruned model scores differently."""
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "arith.jsonl").write_text("".join(
        json.dumps({"question": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1)], "label": 0}) + "\n"
        for a, b in [(1, 2), (3, 4), (10, 20), (7, 8), (12, 30)]))
    (tasks / "my_task.yaml").write_text(readme_task_yaml(tasks / "arith.jsonl"))
    common = ["--model", str(small_model_dir), "--cache-dir", str(searched / "cache"), "--generate", "0",
              "--lm-eval", "evoreap_demo_math,evoreap_demo_ppl_code,my_task", "--lm-eval-include", str(tasks),
              "--lm-eval-limit", "24"]
    masked = _evaluate(capsys, *common, "--allocation", str(searched / "runs" / "r" / "best_allocation.json"))
    exported = _evaluate(capsys, *common, "--pruned", str(searched / "pruned"))
    a, b = masked["lm_eval"]["pruned (masked)"], exported["lm_eval"]["pruned (exported)"]
    assert set(a) == {"evoreap_demo_math", "evoreap_demo_ppl_code", "my_task"}
    assert a["evoreap_demo_math"]["sample_len"] == 24 and a["my_task"]["sample_len"] == 5
    for task in a:
        for metric, value in a[task].items():
            assert b[task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
    full = masked["lm_eval"]["unpruned"]
    assert full == exported["lm_eval"]["unpruned"]
    assert full["evoreap_demo_ppl_code"]["bits_per_byte"] != pytest.approx(a["evoreap_demo_ppl_code"]["bits_per_byte"])


def test_lm_eval_refuses_unknown_task_before_model_work(small_model_dir, capsys, tmp_path):
    pytest.importorskip("lm_eval")
    code = main(["evaluate", "--model", str(small_model_dir), "--cache-dir", str(tmp_path), "--pruned",
                 str(tmp_path / "nothing"), "--lm-eval", "no_such_task_xyz"])
    assert code == 2
    assert "unknown lm-eval task no_such_task_xyz" in capsys.readouterr().err


def test_lm_eval_missing_package_gives_install_hint(small_model_dir, capsys, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    code = main(["evaluate", "--model", str(small_model_dir), "--cache-dir", str(tmp_path), "--pruned",
                 str(tmp_path / "nothing"), "--lm-eval", "evoreap_demo"])
    assert code == 2
    assert 'pip install "evoreap[lm_eval]"' in capsys.readouterr().err


def test_lm_eval_demo_tasks_are_guarded_against_the_fitted_data(searched, small_model_dir, capsys, tmp_path):
    """The bundled tasks come from the demo's held-out split: an allocation fitted to that split is refused even when
    --data names other text."""
    pytest.importorskip("lm_eval")
    alloc = json.loads((searched / "runs" / "r" / "best_allocation.json").read_text())
    meta = alloc.get("meta", alloc)
    meta["calibration_data"], meta["search_data"] = "math@heldout", None
    leaky = tmp_path / "leaky.json"
    leaky.write_text(json.dumps(alloc))
    capsys.readouterr()
    code = main(["evaluate", "--model", str(small_model_dir), "--cache-dir", str(searched / "cache"),
                 "--allocation", str(leaky), "--data", "code", "--lm-eval", "evoreap_demo_math"])
    assert code == 2
    err = capsys.readouterr().err
    assert "lm-eval demo task data" in err and "overlaps the calibration data" in err


def test_lm_eval_include_must_be_a_directory(small_model_dir, capsys, tmp_path):
    pytest.importorskip("lm_eval")
    code = main(["evaluate", "--model", str(small_model_dir), "--cache-dir", str(tmp_path), "--pruned",
                 str(tmp_path / "nothing"), "--lm-eval", "my_task", "--lm-eval-include", str(tmp_path / "nope")])
    assert code == 2
    assert "is not a directory" in capsys.readouterr().err
