"""Calibration data from anywhere: options on a source, local files and directories, saved datasets, streamed hub
datasets (a local directory of data files stands in for the hub: same code path, no network)."""

import json

import pytest

from evoreap.data import load_tokens, parse_data_spec
from evoreap.errors import UsageError
from tests.test_data_spec import CharTokenizer

datasets = pytest.importorskip("datasets")
pd = pytest.importorskip("pandas")

DOCS = [{"body": f"doc{i} " + f"w{i} " * 30, "id": i} for i in range(40)]


def _tokens(text):
    return [b + 1 for b in text.encode()]


def test_options_are_parsed_and_checked():
    (src,) = parse_data_spec("hf:owner/set?config=en&text=body&rows=50&label=web@test:2", "calibration")
    assert (src.kind, src.location, src.split, src.name, src.rows, src.option("config"), src.option("text")) == \
        ("hub", "owner/set", "test", "web", 50, "en", "body")
    assert src.spec == "hf:owner/set?config=en&rows=50&text=body@test"
    for bad, match in (("code?rows=0", "whole number"), ("code?colour=red", "unknown --data option"),
                       ("code?text", "KEY=VALUE"), ("code?rows=5&rows=6", "twice"),
                       ("hf:x?split=a@b", "two splits")):
        with pytest.raises(UsageError, match=match):
            parse_data_spec(bad, "calibration")


def test_parquet_field_and_row_limit(tmp_path):
    f = tmp_path / "web.parquet"
    pd.DataFrame(DOCS).to_parquet(f)
    data = load_tokens(f"{f}?text=body&rows=5", CharTokenizer(), split="calibration", seq_len=16)
    (rec,) = data.sources
    naive = sum(len(_tokens(d["body"])) + 1 for d in DOCS[:5])  # only the first 5 records, EOS after each
    assert (rec.rows, rec.sequences, rec.tokens) == (5, naive // 16, naive // 16 * 16)
    with pytest.raises(UsageError, match=r"neither a 'text' string.*\?text=FIELD"):
        load_tokens(str(f), CharTokenizer(), split="calibration", seq_len=16)


def test_directory_of_files_and_saved_datasets(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text("\n".join(json.dumps({"text": x["body"]}) for x in DOCS[:10]))
    (d / "sub" / "b.txt").write_text("\n\n\n".join(x["body"] for x in DOCS[10:20]))
    data = load_tokens(str(d), CharTokenizer(), split="calibration", seq_len=32)
    assert data.domains == ("corpus",) and data.sources[0].rows == 20 and data.sources[0].kind == "dir"
    naive = sum(len(_tokens(x["body"] if i < 10 else x["body"].strip() + "\n")) + 1 for i, x in enumerate(DOCS[:20]))
    assert data.num_tokens == naive // 32 * 32

    ds = datasets.Dataset.from_list([{"text": x["body"]} for x in DOCS])
    ds.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": ds, "test": ds.select(range(4))}).save_to_disk(tmp_path / "saved_dict")
    one = load_tokens(str(tmp_path / "saved"), CharTokenizer(), split="calibration", seq_len=32)
    assert one.sources[0].kind == "disk" and one.sources[0].rows == 40
    assert one.sources[0].fingerprint == ds._fingerprint  # datasets' own content fingerprint
    test = load_tokens(f"{tmp_path / 'saved_dict'}@test", CharTokenizer(), split="calibration", seq_len=32)
    assert test.sources[0].rows == 4
    with pytest.raises(UsageError, match="has splits train, test"):
        load_tokens(f"{tmp_path / 'saved_dict'}@nope", CharTokenizer(), split="calibration", seq_len=32)


def test_streamed_source_reads_only_what_it_packs(tmp_path):
    """hf: streams (datasets streaming=True): 3 sequences of 32 byte-tokens need 2 of the 40 records."""
    hub = tmp_path / "hub"
    hub.mkdir()
    pd.DataFrame(DOCS).to_parquet(hub / "train.parquet")
    data = load_tokens(f"hf:{hub}?text=body", CharTokenizer(), split="calibration", seq_len=32, samples=3)
    (rec,) = data.sources
    assert rec.kind == "hub" and rec.sequences == 3 and rec.tokens == 96
    assert rec.rows < 5  # (~97 tokens per record) not the whole split
    again = load_tokens(f"hf:{hub}?text=body", CharTokenizer(), split="calibration", seq_len=32, samples=3)
    assert torch_equal(data.input_ids, again.input_ids)  # the shuffle buffer is seeded


def torch_equal(a, b):
    return a.shape == b.shape and bool((a == b).all())


def test_sharegpt_chat_mapping(tmp_path):
    f = tmp_path / "share.jsonl"
    f.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi " * 20},
                                               {"from": "gpt", "value": "yo " * 20}]}) + "\n")
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    tok = CharTokenizer()
    tok.apply_chat_template = lambda messages, chat_template=None, tokenize=False: __import__("jinja2").Template(
        chat_template).render(messages=messages)
    data = load_tokens(f"{f}?messages=conversations&role=from&content=value", tok, split="calibration", seq_len=16,
                       chat_template=template)
    text = "[user]" + "hi " * 20 + "[assistant]" + "yo " * 20
    assert data.input_ids.flatten().tolist() == (_tokens(text) + [0])[:data.num_tokens]
