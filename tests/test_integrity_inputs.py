"""Integrity of user inputs: allocation files (one reader, one validator, one chooser of kept experts for export,
evaluate and search) and data inputs (chat records, sequence lengths, counts, huge lines).

Each bad-input case runs the real CLI and must fail with exit 2, exactly one error line that names the problem, no
traceback, and nothing left behind (as in test_bad_input.py).
"""

import json

import pytest
import torch

from evoreap.adapters import MoEAdapter
from evoreap.allocation import MAX_FILE_BYTES, Allocation, kept_experts, keep_masks, select_experts
from evoreap.cli import main
from evoreap.data import load_tokens
from evoreap.errors import UsageError
from evoreap.testing import tiny_config
from cli_helpers import expect, nothing_in

LAYERS = {str(i): 4 for i in range(4)}  # small_model_dir: 4 MoE layers x 8 experts, top-2
GOOD_EXPERTS = {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7], "2": [0, 2, 4, 6], "3": [1, 3, 5, 7]}








def _export(model, alloc, tmp_path):
    return ["export", "--model", model, "--allocation", alloc, "--out", tmp_path / "out", "--no-progress"]


def _evaluate(model, alloc, tmp_path):
    return ["evaluate", "--model", model, "--allocation", alloc, "--tokens", "256", "--seq-len", "64",
            "--generate", "0", "--cache-dir", tmp_path / "cache"]


def _left_nothing(tmp_path) -> bool:
    return not (tmp_path / "out").exists() and nothing_in(tmp_path / "cache")


# -- one validator: export and evaluate accept and refuse exactly the same "experts" ------------------------------

BAD_EXPERTS = {
    "fewer than kept": ({**GOOD_EXPERTS, "1": [4, 5, 6]}, ["lists 3 experts for layer 1", "keeps 4"]),
    "more than kept": ({**GOOD_EXPERTS, "1": [3, 4, 5, 6, 7]}, ["lists 5 experts for layer 1"]),
    "negative index": ({**GOOD_EXPERTS, "2": [0, 2, 4, -1]}, ["expert -1", "0..7"]),
    "out of range": ({**GOOD_EXPERTS, "3": [1, 3, 5, 8]}, ["expert 8", "0..7"]),
    "huge index": ({**GOOD_EXPERTS, "3": [1, 3, 5, 10**100]}, ["0..7"]),
    "duplicate": ({**GOOD_EXPERTS, "0": [0, 1, 1, 2]}, ["twice"]),
    "pruned layer left out": ({k: v for k, v in GOOD_EXPERTS.items() if k != "2"}, ["does not list layer 2"]),
    "layer not in layers": ({**GOOD_EXPERTS, "7": [0, 1, 2, 3]}, ["layer 7", "not in \"layers\""]),
    "not a list": ({**GOOD_EXPERTS, "0": "0,1,2,3"}, ["list of whole expert indices"]),
    "bools": ({**GOOD_EXPERTS, "0": [True, False, 2, 3]}, ["list of whole expert indices"]),
    "floats": ({**GOOD_EXPERTS, "0": [0.0, 1, 2, 3]}, ["list of whole expert indices"]),
    "not an object": ([[0, 1, 2, 3]] * 4, ["\"experts\" must map"]),
}


@pytest.fixture(scope="module")
def experts_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("experts")
    files = {}
    for name, (experts, _) in BAD_EXPERTS.items():
        files[name] = d / f"{name.replace(' ', '_')}.json"
        files[name].write_text(json.dumps({"layers": LAYERS, "experts": experts}))
    return files


@pytest.mark.parametrize("command", ["export", "evaluate"])
@pytest.mark.parametrize("case", sorted(BAD_EXPERTS))
def test_export_and_evaluate_refuse_the_same_experts(small_model_dir, experts_files, tmp_path, capsys, command,
                                                     case):
    argv = (_export if command == "export" else _evaluate)(small_model_dir, experts_files[case], tmp_path)
    line = expect(capsys, 2, BAD_EXPERTS[case][1], *argv)
    assert str(experts_files[case]) in line
    assert _left_nothing(tmp_path)


def test_export_and_evaluate_accept_the_same_experts(small_model_dir, tmp_path, capsys):
    """A file both accept (unsorted lists, and a layer keeping all 8 left out), with the same kept experts."""
    alloc = tmp_path / "ok.json"
    experts = {"0": [3, 2, 1, 0], "1": [7, 6, 5, 4], "2": [6, 4, 2, 0]}
    alloc.write_text(json.dumps({"layers": {**{k: 4 for k in experts}, "3": 8}, "experts": experts,
                                 "meta": {"note": "mine"}}))
    assert main(["export", "--model", str(small_model_dir), "--allocation", str(alloc), "--out",
                 str(tmp_path / "out"), "--no-progress"]) == 0
    record = json.loads((tmp_path / "out" / "evoreap.json").read_text())
    assert {int(k): v for k, v in record["kept_experts"].items() if len(v) < 8} == \
        {int(k): sorted(v) for k, v in experts.items()}
    capsys.readouterr()
    assert main(["evaluate", "--model", str(small_model_dir), "--allocation", str(alloc), "--tokens", "128",
                 "--seq-len", "64", "--generate", "0", "--json", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "pruned (masked)" in json.loads(capsys.readouterr().out)["results"]


def test_kept_experts_is_the_one_chooser():
    adapter = MoEAdapter(tiny_config("qwen3_moe"))  # 16 experts, top-4
    layers = tuple(adapter.moe_layer_indices)
    scores = {layer: torch.rand(16, generator=torch.Generator().manual_seed(layer)) for layer in layers}
    alloc = Allocation(layers, (8,) * (len(layers) - 1) + (16,))
    chosen = kept_experts(alloc, adapter, scores)
    assert chosen == {layer: select_experts(adapter, scores[layer], k).tolist() for layer, k in
                      zip(layers, alloc.counts)}
    listed = alloc.with_experts({layer: idx[::-1] for layer, idx in chosen.items() if len(idx) < 16})
    assert kept_experts(listed, adapter) == chosen  # listed experts win, stored ascending; no scores needed
    masks = keep_masks(adapter, listed)
    assert set(masks) == set(layers[:-1]) and all(int(m.sum()) == 8 for m in masks.values())
    with pytest.raises(UsageError, match="--observation"):
        kept_experts(alloc, adapter)  # neither listed nor scored
    again = Allocation.from_json(json.loads(json.dumps(listed.to_json(adapter))))
    assert again == listed and again.experts == listed.experts


def test_group_limited_routing_needs_the_same_count_in_every_group(tmp_path):
    adapter = MoEAdapter(tiny_config("deepseek_v3"))  # 16 experts in 4 groups of 4, top-4
    layers = tuple(adapter.moe_layer_indices)
    even = {layer: [0, 1, 4, 5, 8, 9, 12, 13] for layer in layers}
    alloc = Allocation(layers, (8,) * len(layers)).with_experts(even)
    assert kept_experts(alloc.validate(adapter), adapter) == even
    uneven = {**even, layers[0]: [0, 1, 2, 3, 4, 5, 8, 9]}
    path = tmp_path / "uneven.json"
    Allocation(layers, (8,) * len(layers)).with_experts(uneven).save(path, adapter)
    with pytest.raises(UsageError, match=r"same number of kept experts in every group.*\[4, 2, 2, 0\]") as e:
        Allocation.load(path).validate(adapter)
    assert str(path) in str(e.value)


# -- allocation files are untrusted input ---------------------------------------------------------------------------

def _deep(n):
    return '{"layers": {"0": 4}, "meta": {"x": ' + "[" * n + "]" * n + "}}"


BAD_FILES = {
    "directory": (None, ["is a directory"]),
    "deep nesting": (_deep(100_000), ["nested too deeply"]),
    "nesting past the limit": (_deep(40), ["nested too deeply"]),
    "count 1e400": ('{"layers": {"0": 1e400, "1": 4, "2": 4, "3": 4}}', ["layer 0", "not a keep count for this model"]),
    "count 10**100": (json.dumps({"layers": {**LAYERS, "1": 10**100}}), ["not a keep count for this model"]),
    "count -10**100": (json.dumps({"layers": {**LAYERS, "1": -10**100}}), ["negative"]),
    "count 5000 digits": ('{"layers": {"0": 1' + "0" * 5000 + "}}", ["not valid json"]),
    "layer 10**100": (json.dumps({"layers": {**LAYERS, str(10**100): 4}}), ["not an moe layer of this model"]),
    "count a float": (json.dumps({"layers": {**LAYERS, "2": 4.0}}), ["layer 2", "not a keep count"]),
    "count a string": (json.dumps({"layers": {**LAYERS, "2": "4"}}), ["layer 2", "not a keep count"]),
    "count a bool": (json.dumps({"layers": {**LAYERS, "2": True}}), ["layer 2", "not a keep count"]),
    "meta a list": (json.dumps({"layers": LAYERS, "meta": [["criterion", "reap"]]}), ['"meta"', "object"]),
    "meta a string": (json.dumps({"layers": LAYERS, "meta": "ab"}), ['"meta"', "object"]),
    "meta a number": (json.dumps({"layers": LAYERS, "meta": 5}), ['"meta"', "object"]),
    "meta.criterion a number": (json.dumps({"layers": LAYERS, "meta": {"criterion": 5}}), ["meta.criterion"]),
    "duplicate top-level key": ('{"layers": {"0": 8}, "layers": ' + json.dumps(LAYERS) + "}", ["'layers' twice"]),
    "duplicate layer": ('{"layers": {"0": 4, "1": 4, "2": 4, "3": 4, "0": 8}}', ["'0' twice"]),
    "duplicate meta key": ('{"layers": ' + json.dumps(LAYERS) + ', "meta": {"a": {"b": 1, "b": 2}}}', ["'b' twice"]),
    "too large": ('{"layers": ' + json.dumps(LAYERS) + ', "meta": {"pad": "' + "x" * MAX_FILE_BYTES + '"}}',
                  ["larger than 16 MiB"]),
    "not utf-8": (b'{"layers": {"0": 4, "1": 4, "2": 4, "3": 4}, "meta": {"x": "caf\xe9"}}', ["not utf-8"]),
    "other format": (json.dumps({"format": "something-else", "layers": LAYERS}), ['"format"']),
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("badalloc")
    files = {}
    for name, (content, _) in BAD_FILES.items():
        files[name] = p = d / f"{name.replace(' ', '_').replace('*', '^')}.json"
        if content is None:
            p.mkdir()
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    return files


@pytest.mark.parametrize("command", ["export", "evaluate"])
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_untrusted_allocation_files(small_model_dir, bad_files, tmp_path, capsys, command, case):
    argv = (_export if command == "export" else _evaluate)(small_model_dir, bad_files[case], tmp_path)
    line = expect(capsys, 2, BAD_FILES[case][1], *argv)
    assert str(bad_files[case]) in line and len(line) < 400, line
    assert _left_nothing(tmp_path)


def test_allocation_files_round_trip_through_the_one_reader_and_writer(tmp_path):
    adapter = MoEAdapter(tiny_config("mixtral"))
    layers = tuple(adapter.moe_layer_indices)
    alloc = Allocation(layers, (4,) * len(layers), {"budget": 0.5}).with_experts({layers[0]: [6, 1, 2, 3]})
    alloc = alloc.with_experts({layer: [1, 2, 3, 6] for layer in layers})
    alloc.save(tmp_path / "a.json", adapter)
    back = Allocation.load(tmp_path / "a.json").validate(adapter)
    assert back == alloc and back.meta == {"budget": 0.5} and back.experts[layers[0]] == (1, 2, 3, 6)


# -- data inputs ----------------------------------------------------------------------------------------------------

class CharTokenizer:
    """A byte tokenizer that records how many characters it was handed."""

    eos_token_id = 0
    chat_template = None

    def __init__(self):
        self.chars = 0

    def __call__(self, text, add_special_tokens=False, verbose=False):
        self.chars += len(text)
        return {"input_ids": [b + 1 for b in text.encode("utf-8")]}


@pytest.mark.parametrize("record,words", [
    ({"messages": ["hello", "there"]}, ["line 3", "message 1", "'hello'", "string 'role'"]),
    ({"messages": [{"role": "user", "content": 5}]}, ["line 3", "message 1", "string 'role'"]),
    ({"messages": [{"role": "user", "content": "x"}, {"content": "no role"}]}, ["line 3", "message 2"]),
    ({"messages": [{"role": "user", "content": ["parts"]}]}, ["line 3", "message 1"]),
])
def test_chat_messages_must_be_objects_with_string_role_and_content(small_model_dir, tmp_path, capsys, record,
                                                                    words):
    f = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hi " * 40}, {"role": "assistant", "content": "yo " * 40}]}
    f.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n" + json.dumps(good) + "\n")
    line = expect(capsys, 2, [str(f), *words], "observe", "--model", small_model_dir, "--data", f, "--tokens", "128",
                  "--seq-len", "64", "--cache-dir", tmp_path / "cache")
    assert nothing_in(tmp_path / "cache"), line
    with pytest.raises(UsageError, match="line 3"):  # the library says the same
        load_tokens(str(f), CharTokenizer(), split="calibration", seq_len=16)


def test_jsonl_line_that_is_not_an_object_or_not_json(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "a " * 50}) + "\n[1, 2]\n")
    with pytest.raises(UsageError, match=r"d\.jsonl, line 2: a record must be a JSON object"):
        load_tokens(str(f), CharTokenizer(), split="calibration", seq_len=16)
    f.write_text(json.dumps({"text": "a " * 50}) + "\n{oops\n")
    with pytest.raises(UsageError, match=r"d\.jsonl, line 2: not valid JSON"):
        load_tokens(str(f), CharTokenizer(), split="calibration", seq_len=16)


@pytest.mark.parametrize("suffix", ["txt", "jsonl"])
def test_a_huge_single_line_is_not_tokenised_whole(tmp_path, suffix):
    size = 5_000_000
    text = "".join(chr(97 + i % 26) for i in range(4096)) * (size // 4096)
    f = tmp_path / f"huge.{suffix}"
    f.write_text(text if suffix == "txt" else json.dumps({"text": text}) + "\n")
    tok = CharTokenizer()
    data = load_tokens(str(f), tok, split="calibration", seq_len=64, samples=2)
    assert data.input_ids.shape == (2, 64)
    expected = torch.tensor([b + 1 for b in text[:128].encode()]).view(2, 64)
    assert torch.equal(data.input_ids, expected)  # the same tokens as tokenising it whole
    assert tok.chars <= 64 * 128, tok.chars  # bounded by what is needed, not by the line


def test_short_documents_pack_exactly_as_before():
    tok = CharTokenizer()
    data = load_tokens("code", tok, split="calibration", seq_len=64, samples=4)
    from evoreap.data.loader import read_documents
    from evoreap.data.spec import parse_data_spec
    import random

    docs = read_documents(parse_data_spec("code", "calibration")[0])
    order = list(range(len(docs)))
    random.Random(0).shuffle(order)
    ids = []
    for i in order:
        ids += [b + 1 for b in docs[i].encode()] + [0]
        if len(ids) >= 4 * 64:
            break
    assert data.input_ids.flatten().tolist() == ids[:4 * 64]


@pytest.mark.parametrize("command", ["observe", "evaluate", "search"])
def test_seq_len_beyond_the_models_positions_is_refused(small_model_dir, tmp_path, capsys, command):
    """small_model_dir has max_position_embeddings=512."""
    alloc = tmp_path / "a.json"
    alloc.write_text(json.dumps({"layers": LAYERS, "experts": GOOD_EXPERTS}))
    argv = {"observe": ["observe", "--model", small_model_dir, "--tokens", "2048"],
            "evaluate": ["evaluate", "--model", small_model_dir, "--allocation", alloc, "--tokens", "2048",
                         "--generate", "0"],
            "search": ["search", "--model", small_model_dir, "--budget", "0.5", "--runs-dir", tmp_path / "runs",
                       "--generations", "0"]}[command] + ["--cache-dir", tmp_path / "cache"]
    expect(capsys, 2, ["--seq-len 1024", "512 positions", "max_position_embeddings"], *argv, "--seq-len", "1024")
    assert nothing_in(tmp_path / "cache") and nothing_in(tmp_path / "runs")


@pytest.mark.parametrize("flag,value,words", [
    ("--batch-size", "0", ["--batch-size", "at least 1"]),
    ("--batch-size", "-3", ["--batch-size", "at least 1"]),
    ("--tokens", "0", ["--tokens", "at least 1"]),
    ("--tokens", "-5", ["--tokens", "at least 1"]),
    ("--tokens", "1" + "0" * 30, ["--tokens", "too large"]),
    ("--seq-len", "1", ["--seq-len", "at least 2"]),
    ("--seq-len", "0", ["--seq-len", "at least"]),
    ("--seq-len", "abc", ["--seq-len", "whole number"]),
])
@pytest.mark.parametrize("command", ["observe", "evaluate"])
def test_bad_counts_are_refused_before_anything_is_created(small_model_dir, tmp_path, capsys, command, flag, value,
                                                           words):
    alloc = tmp_path / "a.json"
    alloc.write_text(json.dumps({"layers": LAYERS, "experts": GOOD_EXPERTS}))
    base = (["observe", "--model", small_model_dir] if command == "observe" else
            ["evaluate", "--model", small_model_dir, "--allocation", alloc, "--generate", "0"])
    expect(capsys, 2, words, *base, "--cache-dir", tmp_path / "cache", flag, value)
    assert nothing_in(tmp_path / "cache")


def test_data_path_that_is_a_directory(tmp_path):
    (tmp_path / "docs.txt").mkdir()
    with pytest.raises(UsageError, match="is a directory"):
        load_tokens(str(tmp_path / "docs.txt"), CharTokenizer(), split="calibration", seq_len=16)


def test_samples_must_be_positive(small_model_dir, tmp_path, capsys):
    expect(capsys, 2, ["--samples", "at least 1"], "observe", "--model", small_model_dir, "--samples", "0",
           "--cache-dir", tmp_path / "cache")
    assert nothing_in(tmp_path / "cache")
