"""`evaluate --lm-eval` with --num-fewshot, --apply-chat-template and --out: the options reach lm-eval, and its own
results document is saved beside evoreap's table; a missing chat template is refused before the model loads."""

import json

import pytest

from cli_helpers import expect, nothing_in
from evoreap.cli import main

# Role markers that the demo tokenizer's text never holds, so that a rendered prompt is recognisable.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _half(tmp_path):
    """Keep experts 0-15 of 32 in every demo layer, listed: no observation (and no observing) is needed."""
    path = tmp_path / "half.json"
    path.write_text(json.dumps({"layers": {str(i): 16 for i in range(8)},
                                "experts": {str(i): list(range(16)) for i in range(8)}}))
    return path


def test_fewshot_and_chat_template_reach_lm_eval_and_its_results_are_saved(tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    contexts = []
    original = HFLM.loglikelihood

    def spy(self, requests, *args, **kwargs):  # what lm-eval scores: the prompts as rendered, then the real call
        contexts.extend(r.args[0] for r in requests)
        return original(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "loglikelihood", spy)
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    out = tmp_path / "eval"
    capsys.readouterr()
    assert main(["evaluate", "--allocation", str(_half(tmp_path)), "--data", "code", "--tokens", "256",
                 "--seq-len", "128", "--generate", "0", "--cache-dir", str(tmp_path / "cache"),
                 "--lm-eval", "evoreap_demo_math", "--lm-eval-limit", "3", "--lm-eval-batch-size", "4",
                 "--num-fewshot", "2", "--apply-chat-template", "--chat-template", str(tmp_path / "chat.jinja"),
                 "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)

    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "lm_eval_results.json"]
    assert json.loads((out / "evaluation.json").read_text()) == printed
    saved = json.loads((out / "lm_eval_results.json").read_text())
    assert set(saved) == {"unpruned", "pruned (masked)"}
    for name, doc in saved.items():
        assert doc["n-shot"] == {"evoreap_demo_math": 2}  # the task's own is 0
        assert doc["configs"]["evoreap_demo_math"]["num_fewshot"] == 2
        assert doc["config"]["limit"] == 3
        assert doc["results"]["evoreap_demo_math"]["acc,none"] == printed["lm_eval"][name]["evoreap_demo_math"]["acc"]

    # 3 documents x 4 choices, for each of the two models; each prompt is the chat rendering of 2 shots (multi-turn:
    # user question, assistant answer) and the question itself, ending where the model answers
    assert len(contexts) == 2 * 3 * 4
    for c in contexts:
        assert c.startswith("<|user|>\n") and c.endswith("<|assistant|>\n"), c[-80:]
        assert c.count("<|user|>") == 3 and c.count("<|assistant|>") == 3, c


def test_apply_chat_template_without_one_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """The demo tokenizer has no chat template: one line naming the fix, from the tokenizer alone."""
    pytest.importorskip("lm_eval")
    from evoreap.pipeline import judge

    monkeypatch.setattr(judge, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "eval"
    expect(capsys, 2, ["--apply-chat-template", "has none", "--chat-template FILE"],
           "evaluate", "--allocation", _half(tmp_path), "--data", "code", "--cache-dir", tmp_path / "cache",
           "--lm-eval", "evoreap_demo_math", "--apply-chat-template", "--out", out)
    assert nothing_in(out)
