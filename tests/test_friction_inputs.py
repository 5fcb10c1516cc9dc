"""Frictions of issue #16: observe --show printed negative REAP values, bad data was found only after the model
had loaded, chats were rendered silently without a chat template, libraries were noisy."""

import json
import logging
import re

import pytest

from evoreap.api import observe
from tests.cli_helpers import expect


@pytest.fixture(scope="module")
def observed(small_model_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("obs-cache")
    obs = observe(str(small_model_dir), "code", tokens=512, seq_len=64, cache_dir=str(cache), progress=False)
    return obs, cache


def test_show_prints_real_reap_means_with_units(observed, capsys):
    """Untrusted (few-token) experts used to be shifted below the trusted ones and printed as negative REAP."""
    from evoreap.cli import main

    obs, cache = observed
    assert main(["observe", "--show", obs.key[:12], "--criterion", "reap", "--min-count", "100",
                 "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "gate weight x L2 norm of the expert output, mean over the tokens routed to the expert" in out
    assert "rows: expert index; columns: L<i> = decoder layer i" in out
    rows = [line for line in out.splitlines() if re.match(r"^\s+\d+ ", line)]
    stats = obs.stats
    marks = 0
    for line in rows:
        cells = re.findall(r"(-?[\d.]+(?:e[-+]?\d+)?)([ *~]?)", line[7:])
        e = int(line[:6])
        for (value, mark), layer in zip(cells, stats.layers):
            count = float(stats.count[layer][e])
            naive = float(stats.gate_norm_sum[layer][e]) / count if count else 0.0
            assert float(value) >= 0 and float(value) == pytest.approx(naive, rel=1e-3, abs=1e-6), (line, layer)
            marks += mark == "~"
    assert marks > 0  # some experts are below --min-count 100, and marked, not shifted negative


def _allocation(tmp_path):
    f = tmp_path / "alloc.json"
    f.write_text(json.dumps({"layers": {str(i): 4 for i in range(4)}}))
    return f


@pytest.fixture()
def no_model_load(monkeypatch):
    """Any model load fails the test: the error must come before it."""
    import evoreap.api
    import evoreap.models
    import evoreap.pipeline.judge
    import evoreap.pipeline.session

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    for mod in (evoreap.models, evoreap.api, evoreap.pipeline.judge, evoreap.pipeline.session):
        monkeypatch.setattr(mod, "load_model", refuse)


def _bad_inputs(tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi " * 40}]}) + "\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"text": "fine " * 40}) + "\n{not json\n")
    return [
        (str(tmp_path / "missing.jsonl"), ["does not exist"]),
        ("cod", ["did you mean code"]),
        (str(broken), ["broken.jsonl, line 2", "not valid JSON"]),
        (f"{tmp_path}/nowhere_dir?rows=3", ["unknown data source"]),
        ("code?colour=red", ["unknown --data option"]),
        (str(chats), ["no chat template", "--chat-template FILE"]),
    ]


@pytest.mark.parametrize("command", ["observe", "evaluate", "search"])
def test_bad_data_is_refused_before_the_model_loads(command, small_model_dir, tmp_path, capsys, no_model_load):
    for spec, words in _bad_inputs(tmp_path):
        if command == "observe":
            argv = ["observe", "--model", small_model_dir, "--data", spec, "--cache-dir", tmp_path / "c"]
        elif command == "evaluate":
            argv = ["evaluate", "--model", small_model_dir, "--allocation", _allocation(tmp_path), "--data", spec,
                    "--cache-dir", tmp_path / "c"]
        else:
            argv = ["search", "--model", small_model_dir, "--budget", "0.5", "--calib-data", spec,
                    "--runs-dir", tmp_path / "runs",
                    "--cache-dir", tmp_path / "c", "--no-plots"]
        expect(capsys, 2, words, *argv)


def test_evaluate_refuses_a_wrong_observation_key_and_output_before_loading(small_model_dir, tmp_path, capsys,
                                                                          no_model_load):
    alloc = _allocation(tmp_path)
    expect(capsys, 2, ["observation"], "evaluate", "--model", small_model_dir, "--allocation", alloc,
           "--observation", "deadbeef", "--cache-dir", tmp_path / "c")
    (tmp_path / "file").write_text("x")
    expect(capsys, 2, ["--out", "is a file"], "evaluate", "--model", small_model_dir, "--allocation", alloc,
           "--out", tmp_path / "file", "--cache-dir", tmp_path / "c")


def test_bad_chat_template_file_is_refused(small_model_dir, tmp_path, capsys, no_model_load):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    expect(capsys, 2, ["bad.jinja", "not a valid Jinja template"], "observe", "--model", small_model_dir, "--data",
           "code", "--chat-template", bad, "--cache-dir", tmp_path / "c")


def test_chats_observe_with_a_template_file_and_record_their_sources(small_model_dir, tmp_path, capsys):
    from evoreap.cli import main

    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"question {i} " * 12},
                                                        {"role": "assistant", "content": f"answer {i} " * 12}]})
                               for i in range(30)) + "\n")
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}")
    cache = tmp_path / "cache"
    assert main(["observe", "--model", str(small_model_dir), "--data", f"{chats}:1,code:1", "--chat-template",
                 str(template), "--tokens", "512", "--seq-len", "64", "--cache-dir", str(cache)]) == 0
    key = re.search(r"observation (\w+)", capsys.readouterr().out).group(1)
    manifest = json.loads((cache / "observations" / key / "manifest.json").read_text())
    chat, code = manifest["data"]["sources"]
    assert (chat["name"], chat["kind"], chat["rows"], chat["sequences"], chat["tokens"]) == ("chats", "file", 30, 4,
                                                                                            256)
    assert code["spec"] == "code@calibration" and code["tokens"] == 256 and len(code["fingerprint"]) == 64
    assert main(["observe", "--show", key, "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert f"source chats: {chats}, fingerprint {chat['fingerprint'][:16]}, 30 rows read, 4 sequences, 256 tokens" \
        in out


def test_library_noise_is_quiet_unless_verbose(tmp_path, monkeypatch, capfd):
    from evoreap.cli import configure_logging

    configure_logging(0, False)
    assert logging.getLogger("lm_eval").getEffectiveLevel() == logging.ERROR
    assert logging.getLogger("datasets").getEffectiveLevel() == logging.ERROR
    import datasets

    if datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is None:  # else the environment decides
        assert datasets.are_progress_bars_disabled()  # "Generating train split"
    pytest.importorskip("lm_eval")
    from lm_eval import evaluator

    from evoreap.harness import _quiet_git

    monkeypatch.chdir(tmp_path)  # not a git repository
    capfd.readouterr()
    with _quiet_git():
        evaluator.get_git_commit_hash()
    assert "fatal" not in capfd.readouterr().err
    configure_logging(1, False)
    assert logging.getLogger("lm_eval").getEffectiveLevel() == logging.WARNING
    if datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is None:
        assert not datasets.are_progress_bars_disabled()
    configure_logging(0, False)
