"""The bundled lm-eval tasks over the demo's held-out split: items are right, files are local, the demo model passes."""

import json

import pytest
import yaml

from evoreap.data.bundled import load_texts
from evoreap.demo.harness_tasks import TOOL_NAMES, demo_task_dir, math_items, tool_items


def test_math_items_label_the_stated_answer():
    texts = load_texts("math", "heldout")
    items = math_items(texts)
    assert len(items) > 500
    for it in items:
        assert len(it["choices"]) == 4 == len(set(it["choices"]))
        assert it["context"].endswith("\nAnswer:") and "Answer:" not in it["context"][:-7]
        right = it["choices"][it["label"]]
        # the worked steps end on the answer; the distractors are other numbers of the same problem
        assert it["context"].removesuffix("\nAnswer:").rstrip(".").endswith(right)
        assert all(c in it["context"] for c in it["choices"])
    assert math_items(texts) == items  # deterministic


def test_tool_items_label_the_called_tool():
    texts = load_texts("tools", "heldout")
    items = tool_items(texts)
    assert len(items) == sum(t.count('"tool_calls"') for t in texts)
    for it in items:
        name = TOOL_NAMES[it["label"]]
        doc = next(t for t in texts if t.startswith(it["context"]))
        assert doc[len(it["context"]):].startswith(name + '"')
    assert {it["label"] for it in items} == set(range(len(TOOL_NAMES)))


def test_task_files_name_local_data_that_exists(tmp_path, monkeypatch):
    from evoreap.demo import harness_tasks

    root = demo_task_dir(tmp_path)
    monkeypatch.setattr(harness_tasks, "build_tasks", lambda *a: pytest.fail("built twice"))
    assert demo_task_dir(tmp_path) == root  # built once: the second call finds the finished directory
    yamls = sorted(root.glob("*.yaml"))
    assert [p.stem for p in yamls] == ["evoreap_demo_math", "evoreap_demo_ppl_code", "evoreap_demo_ppl_drama",
                                       "evoreap_demo_ppl_math", "evoreap_demo_ppl_tools", "evoreap_demo_tools"]
    for p in yamls:
        task = yaml.safe_load(p.read_text())
        data = task["dataset_kwargs"]["data_files"]["test"]
        assert task["dataset_path"] == "json" and data.startswith("/")
        rows = [json.loads(line) for line in open(data)]
        assert rows and task["tag"] == ["evoreap_demo"]
    assert not list(tmp_path.joinpath("lm_eval_tasks").glob(".building-*"))


def test_demo_model_is_far_above_chance_on_the_bundled_tasks(tmp_path):
    """The tasks measure a skill the demo model has (chance is 25 %), so pruning damage can show."""
    pytest.importorskip("lm_eval")
    from evoreap.harness import HarnessSettings, run_harness, task_manager
    from evoreap.models import load_model

    settings = HarnessSettings(("evoreap_demo_math", "evoreap_demo_tools"), limit=80)
    manager = task_manager(settings, tmp_path)
    demo = load_model(None)
    out = run_harness(demo.model, demo.tokenizer, settings, manager)
    assert out["evoreap_demo_math"]["acc"] > 0.9 and out["evoreap_demo_tools"]["acc"] > 0.7
    assert out["evoreap_demo_math"]["sample_len"] == 80
