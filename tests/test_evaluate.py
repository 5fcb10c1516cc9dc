"""`evoreap evaluate` gives the same numbers on a masked allocation and on its export; guard refusals."""

import json

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
