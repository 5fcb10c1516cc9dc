"""The bundled demo model and its training script."""

import json
import re

import pytest

from evoreap.models import DEMO_MODEL_DIR, load_model


def test_demo_model_is_a_real_trained_moe():
    loaded = load_model(None)
    a = loaded.adapter
    assert a.name == "Qwen3-MoE" and len(a.moe_layer_indices) >= 8 and a.num_experts >= 32 and a.top_k >= 4
    log = json.loads((DEMO_MODEL_DIR / "training_log.json").read_text())
    for domain, loss in log["heldout_loss"].items():
        assert loss < log["unigram_loss"][domain] - 2.0, domain  # far below the unigram baseline
    curve = [p["loss"] for p in log["loss_curve"]]
    assert curve[-1] < curve[0] / 3
    assert sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir()) <= 20 * 1024 * 1024


def test_training_script_smoke_run(tmp_path):
    from evoreap.demo.train import main

    out = tmp_path / "m"
    main(["--steps", "2", "--size", "smoke", "--out", str(out), "--vocab", "512"])
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps"] == 2 and log["tokens"] == 2 * 16 * 256
    loaded = load_model(str(out))
    assert loaded.adapter.num_experts == 8
    assert {"code", "drama", "tools", "math"} == set(log["heldout_loss"])


@pytest.mark.parametrize("cmd", [["inspect"], ["inspect", "--json"]])
def test_inspect_runs_on_the_demo_with_no_model_named(cmd, capsys):
    from evoreap.cli import main

    assert main(cmd) == 0
    out = capsys.readouterr().out
    if "--json" in cmd:
        info = json.loads(out)
        assert info["architecture"] == "Qwen3-MoE" and info["top_k"] == 4
        assert info["experts_per_layer"] == {str(i): 32 for i in range(8)}
    else:
        assert re.search(r"^architecture\s+Qwen3-MoE", out, re.M)
        assert re.search(r"^experts per layer\s+32$", out, re.M) and re.search(r"^top-k\s+4$", out, re.M)
