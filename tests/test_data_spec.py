"""--data spec parsing and token packing."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evoreap.data import load_tokens, parse_data_spec
from evoreap.errors import UsageError


class CharTokenizer:
    """A byte tokenizer: enough to test packing without any model files."""

    eos_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [b + 1 for b in text.encode("utf-8")]}


def test_demo_expands_to_four_equal_domains():
    src = parse_data_spec("demo", "calibration")
    assert [s.name for s in src] == ["code", "drama", "tools", "math"]
    assert all(s.split == "calibration" and abs(s.weight - 0.25) < 1e-12 for s in src)


def test_weights_and_split_overrides():
    src = parse_data_spec("code@heldout:3,math", "search")
    assert [(s.name, s.split, s.weight) for s in src] == [("code", "heldout", 0.75), ("math", "search", 0.25)]


@pytest.mark.parametrize("spec,match", [
    ("", "empty --data"), ("cod", "did you mean code"), ("code:-1", "positive"), ("code:nan", "positive"),
    ("code,,math", "empty item"), ("code@nosuch", "unknown split"), ("missing.jsonl", "does not exist"),
    ("code,code", "twice"),
])
def test_bad_specs_are_refused(spec, match):
    with pytest.raises(UsageError, match=match):
        parse_data_spec(spec, "calibration")


def test_packing_respects_weights_and_sizes():
    data = load_tokens("code:3,math:1", CharTokenizer(), split="calibration", seq_len=64, samples=8)
    assert data.input_ids.shape == (8, 64)
    assert data.domain_ids.tolist() == [0] * 6 + [1] * 2
    again = load_tokens("code:3,math:1", CharTokenizer(), split="calibration", seq_len=64, samples=8)
    assert data.fingerprints == again.fingerprints  # deterministic


def test_jsonl_text_and_chat_fields(tmp_path):
    f = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi " * 30}, {"role": "assistant", "content": "yo " * 30}]}]
    f.write_text("\n".join(json.dumps(r) for r in rows * 4))
    # a tokenizer without a chat template: refused in one line, not rendered as guessed "role: content" text
    with pytest.raises(UsageError, match="no chat template; pass --chat-template FILE"):
        load_tokens(str(f), CharTokenizer(), split="calibration", seq_len=32)
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    tok = CharTokenizer()
    tok.apply_chat_template = lambda messages, chat_template=None, tokenize=False: __import__("jinja2").Template(
        chat_template).render(messages=messages)
    data = load_tokens(str(f), tok, split="calibration", seq_len=32, chat_template=template)
    assert data.domains == ("chats",) and len(data) > 0 and str(f) in data.file_hashes
    expect = [b + 1 for b in ("<user>" + "hi " * 30 + "<assistant>" + "yo " * 30).encode()][:32]
    assert data.input_ids[0].tolist() == expect or any(r.tolist() == expect for r in data.input_ids)


@pytest.mark.parametrize("content,name,match", [
    (b"", "empty.txt", "empty"),
    (b"\x00\x01binary\x00", "bin.txt", "binary"),
    (b'{"body": "x"}\n', "nofield.jsonl", "neither a 'text'"),
    (b"short", "short.txt", "fewer than one sequence"),
])
def test_bad_files_are_refused(tmp_path, content, name, match):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(UsageError, match=match):
        load_tokens(str(f), CharTokenizer(), split="calibration", seq_len=64)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["code", "drama", "tools", "math"]),
                          st.floats(min_value=0.01, max_value=100)), min_size=1, max_size=4,
                unique_by=lambda t: t[0]))
def test_parsed_weights_are_normalised(items):
    spec = ",".join(f"{n}:{w!r}" for n, w in items)
    src = parse_data_spec(spec, "search")
    assert abs(sum(s.weight for s in src) - 1) < 1e-9
    assert [s.name for s in src] == [n for n, _ in items]


def test_a_data_folder_is_walked_without_hidden_parts_links_or_a_whole_disk(tmp_path, monkeypatch):
    """Data files are found below the folder (hidden files and folders, and links to folders, are not entered); a
    folder holding more entries than any data folder (``--data /``) is refused in one line instead of walked."""
    from evoreap.data import spec as spec_mod

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    for f in ("a/one.txt", "a/b/two.jsonl", "a/.hidden.txt", ".git/three.txt", "a/notes.md"):
        (tmp_path / f).write_text("x")
    (tmp_path / "elsewhere").symlink_to(tmp_path / "a", target_is_directory=True)
    assert spec_mod.data_files(tmp_path) == [tmp_path / "a" / "b" / "two.jsonl", tmp_path / "a" / "one.txt"]
    monkeypatch.setattr(spec_mod, "MAX_DATA_ENTRIES", 5)
    with pytest.raises(UsageError, match="holds more than 5 files and folders"):
        spec_mod.data_files(tmp_path)
    with pytest.raises(UsageError, match="holds more than 5 files and folders"):
        parse_data_spec("/", "search")


def test_a_tilde_of_no_user_is_a_usage_error():
    """``~nosuchuser/data`` names no home directory: one clear error, not pathlib's RuntimeError."""
    from evoreap.models import resolve_model

    with pytest.raises(UsageError, match="cannot expand its '~'"):
        parse_data_spec("~evoreap-no-such-user/data.jsonl", "search")
    with pytest.raises(UsageError, match="cannot expand its '~'"):
        resolve_model("~evoreap-no-such-user/model")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_arbitrary_specs_either_parse_or_raise_usage_error(spec):
    try:
        parse_data_spec(spec, "search")
    except UsageError:
        pass
