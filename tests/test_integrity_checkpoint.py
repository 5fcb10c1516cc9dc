"""Broken checkpoints, command by command: safetensors headers that lie about their bytes, indexes and symlinks that
lead out of the model directory, and models that load but cannot be observed meaningfully (no tokenizer, weights
the config drops, impossible top-k, NaN weights). Each case runs the real CLI and must fail with exit 2 (usage) or
1 (runtime), exactly one error line that names the problem, no traceback, and nothing left on disk.

Broken files are made by rewriting a good checkpoint's header: 8-byte little-endian length, JSON, data.
"""

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evoreap.errors import EvoreapError
from cli_helpers import expect, nothing_in, run_cli

SHARD = "model-00001-of-00001.safetensors"
EXPERT = "model.layers.0.mlp.experts.0.down_proj.weight"  # F32 [32, 16] in small_model_dir
ROUTER = "model.layers.0.mlp.gate.weight"  # F32 [8, 32]
OBSERVE = ["--tokens", "256", "--seq-len", "64", "-q"]


# -- helpers (as in test_bad_input) ---------------------------------------------------------------------------------







def split(path: Path) -> tuple[bytes, bytes]:
    """(header JSON bytes, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8:8 + n], raw[8 + n:]


def join(path: Path, header: bytes, data: bytes) -> None:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def rewrite(path: Path, change) -> None:
    """Apply ``change(header_dict, data) -> (header_dict_or_raw_bytes, data)`` to a safetensors file."""
    header, data = split(path)
    new, data = change(json.loads(header), data)
    join(path, new if isinstance(new, bytes) else json.dumps(new).encode(), data)


def model_copy(small_model_dir, tmp_path, name="m") -> Path:
    return Path(shutil.copytree(small_model_dir, tmp_path / name))


def alloc_file(tmp_path) -> Path:
    f = tmp_path / "alloc.json"
    f.write_text(json.dumps({"layers": {str(i): 4 for i in range(4)},
                             "experts": {str(i): [0, 2, 4, 6] for i in range(4)}}))
    return f


def export_args(model, tmp_path, *extra):
    return ("export", "--model", model, "--allocation", alloc_file(tmp_path), "--out", tmp_path / "out",
            "--no-progress", *extra)


def no_export_left(tmp_path) -> bool:
    return not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# -- 1. headers that do not describe their bytes --------------------------------------------------------------------

def _set(name, key, value):
    def change(h, data):
        h[name][key] = value
        return h, data
    return change


def _gap(h, data):  # 8 unused bytes before the first tensor
    for k, v in h.items():
        if k != "__metadata__":
            v["data_offsets"] = [v["data_offsets"][0] + 8, v["data_offsets"][1] + 8]
    return h, b"\0" * 8 + data


def _overlap(h, data):  # a second tensor reads the first one's bytes; the file is one tensor short at the end
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"])
    last = h[names[-1]]
    cut = last["data_offsets"][1] - last["data_offsets"][0]
    ln = "model.layers.0.post_attention_layernorm.weight"
    h[ln]["data_offsets"] = list(h["model.layers.0.input_layernorm.weight"]["data_offsets"])
    del h[names[-1]]
    return h, data[:len(data) - cut]


def _trailing(h, data):
    return h, data + b"\0" * 16


def _duplicate(h, data):
    text = json.dumps(h)
    entry = json.dumps({ROUTER: h[ROUTER]})[1:-1]
    return (text[:-1] + ", " + entry + "}").encode(), data


def _not_object(h, data):
    return b"[]", data


def _entry_not_object(h, data):
    h[ROUTER] = [h[ROUTER]["dtype"], h[ROUTER]["shape"]]
    return h, data


def _bad_metadata(h, data):
    h["__metadata__"] = {"format": 1}
    return h, data


DEFECTS = {
    "expert_shape": (_set(EXPERT, "shape", [32, 32]), [EXPERT, "shape"]),
    "router_dtype": (_set(ROUTER, "dtype", "F16"), [ROUTER, "F16"]),
    "unknown_dtype": (_set(ROUTER, "dtype", "F31"), [ROUTER, "dtype", "F31"]),
    "negative_dim": (_set(ROUTER, "shape", [-8, -32]), [ROUTER, "malformed"]),
    "offsets_reversed": (_set(ROUTER, "data_offsets", [1024, 0]), [ROUTER, "offsets"]),
    "gap": (_gap, ["unused"]),
    "overlap": (_overlap, ["overlap"]),
    "trailing_bytes": (_trailing, ["16 bytes", "not described"]),
    "duplicate_key": (_duplicate, ["duplicate", ROUTER]),
    "header_not_object": (_not_object, ["json object"]),
    "entry_not_object": (_entry_not_object, [ROUTER, "malformed"]),
    "metadata_not_strings": (_bad_metadata, ["__metadata__"]),
}


@pytest.fixture(scope="module")
def broken(tmp_path_factory, small_model_dir):
    """defect name -> a copy of small_model_dir whose model.safetensors carries that defect."""
    root = tmp_path_factory.mktemp("broken")
    out = {}
    for name, (change, _) in DEFECTS.items():
        path = Path(shutil.copytree(small_model_dir, root / name))
        rewrite(path / "model.safetensors", change)
        out[name] = path
    return out


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_bad_header_is_refused_by_inspect(defect, broken, capsys):
    expect(capsys, 1, ["safetensors", *DEFECTS[defect][1]], "inspect", broken[defect])


@pytest.mark.parametrize("defect", ["expert_shape", "router_dtype", "gap", "trailing_bytes", "duplicate_key"])
def test_bad_header_is_refused_by_export(defect, broken, tmp_path, capsys):
    """The red team's case: export exited 0 and wrote a checkpoint that safetensors refuses to load."""
    expect(capsys, 1, DEFECTS[defect][1], *export_args(broken[defect], tmp_path))
    assert no_export_left(tmp_path)


@pytest.mark.parametrize("defect", ["expert_shape", "router_dtype", "overlap"])
def test_bad_header_is_refused_by_offloaded_observe(defect, broken, tmp_path, capsys):
    expect(capsys, 1, DEFECTS[defect][1], "observe", "--model", broken[defect], "--offload", "--cache-dir",
           tmp_path / "cache", *OBSERVE)
    assert nothing_in(tmp_path / "cache")


def test_header_length_is_bounded_before_reading(small_model_dir, tmp_path, capsys):
    """A header length over safetensors' 100,000,000-byte limit is refused without reading it (sparse file)."""
    path = model_copy(small_model_dir, tmp_path)
    f = path / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.write(struct.pack("<Q", 100_000_001))
        fh.truncate(150_000_000)
    expect(capsys, 1, ["header", "100000001", "limit"], "inspect", path)


def test_fp8_and_sub_byte_dtypes_validate_by_size(tmp_path):
    from evoreap.checkpoint.reader import read_header

    f = tmp_path / "x.safetensors"
    good = {"e4m3": {"dtype": "F8_E4M3", "shape": [2, 4], "data_offsets": [0, 8]},
            "e5m2": {"dtype": "F8_E5M2", "shape": [4], "data_offsets": [8, 12]},
            "e8m0": {"dtype": "F8_E8M0", "shape": [4], "data_offsets": [12, 16]},
            "fp4": {"dtype": "F4", "shape": [2, 4], "data_offsets": [16, 20]},
            "fp6": {"dtype": "F6_E3M2", "shape": [4], "data_offsets": [20, 23]},
            "c64": {"dtype": "C64", "shape": [1], "data_offsets": [23, 31]}}
    join(f, json.dumps(good).encode(), bytes(31))
    tensors, _ = read_header(f)
    assert {n: t.nbytes for n, t in tensors.items()} == {"e4m3": 8, "e5m2": 4, "e8m0": 4, "fp4": 4, "fp6": 3,
                                                         "c64": 8}
    with pytest.raises(EvoreapError, match="fp4"):  # a row of one F4 element is half a byte
        dataclasses.replace(tensors["fp4"], shape=(8, 1)).row_ranges([0])
    bad = {"e8m0": {"dtype": "F8_E8M0", "shape": [4], "data_offsets": [0, 8]}}  # 4 one-byte elements in 8 bytes
    join(f, json.dumps(bad).encode(), bytes(8))
    with pytest.raises(EvoreapError, match="e8m0"):
        read_header(f)


def test_reader_reads_fp8_tensors(tmp_path):
    from evoreap.checkpoint.reader import read_header, read_tensor

    t = torch.tensor([0.5, -1.0, 2.0, 448.0]).to(torch.float8_e4m3fn)
    save_file({"w": t}, tmp_path / "x.safetensors")
    got = read_tensor(read_header(tmp_path / "x.safetensors")[0]["w"])
    assert got.dtype == torch.float8_e4m3fn and torch.equal(got.float(), t.float())


# -- 2. an index that leads out of the model directory or disagrees with its shards ----------------------------------

def indexed(small_model_dir, tmp_path, name="m") -> Path:
    """small_model_dir with its one file renamed to a shard and a model.safetensors.index.json naming it."""
    path = model_copy(small_model_dir, tmp_path, name)
    (path / "model.safetensors").rename(path / SHARD)
    names = [k for k in json.loads(split(path / SHARD)[0]) if k != "__metadata__"]
    write_index(path, {n: SHARD for n in names})
    return path


def write_index(path: Path, weight_map) -> None:
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _point_all(path: Path, target: str) -> None:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    write_index(path, {k: target for k in index["weight_map"]})


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_index_leading_out_of_the_model_dir_is_refused(how, small_model_dir, tmp_path, capsys):
    path = indexed(small_model_dir, tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(path / SHARD, outside)
    if how == "dotdot":
        _point_all(path, "../outside.safetensors")
    elif how == "absolute":
        _point_all(path, str(outside))
    else:
        (path / SHARD).unlink()
        (path / SHARD).symlink_to(outside)
    words = ["outside", "model directory"]
    expect(capsys, 2, words, "inspect", path)
    expect(capsys, 2, words, *export_args(path, tmp_path))
    assert no_export_left(tmp_path)
    expect(capsys, 2, words, "observe", "--model", path, "--cache-dir", tmp_path / "cache", *OBSERVE)
    expect(capsys, 2, words, "observe", "--model", path, "--offload", "--cache-dir", tmp_path / "cache", *OBSERVE)
    assert nothing_in(tmp_path / "cache")


def test_lone_safetensors_symlink_leading_out_is_refused(small_model_dir, tmp_path, capsys):
    path = model_copy(small_model_dir, tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    (path / "model.safetensors").rename(outside)
    (path / "model.safetensors").symlink_to(outside)
    expect(capsys, 2, ["model.safetensors", "outside", "model directory"], "inspect", path)


def test_hf_cache_snapshot_symlinks_into_its_blobs_are_accepted(small_model_dir, tmp_path, capsys):
    """The hub cache stores every file of snapshots/REV/ as a symlink into ../../blobs/: that is not "outside"."""
    repo = tmp_path / "models--org--m"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in small_model_dir.iterdir():
        blob = repo / "blobs" / f"sha-{f.name}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    rc, lines = run_cli(capsys, *export_args(snap, tmp_path))
    assert rc == 0, run_cli.last_err[-1500:]
    assert not (tmp_path / "out" / "tokenizer.json").is_symlink()
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (small_model_dir / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("weight_map,words", [
    (["a", "b"], ["weight_map", "object"]),
    ({"model.norm.weight": 3}, ["weight_map", "model.norm.weight"]),
    ("extra", ["model.extra.weight", "not in", SHARD]),
    ("missing", [ROUTER, "not listed"]),
])
def test_index_that_disagrees_with_its_shards(weight_map, words, small_model_dir, tmp_path, capsys):
    path = indexed(small_model_dir, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    if weight_map == "extra":
        weight_map = {**index, "model.extra.weight": SHARD}
    elif weight_map == "missing":
        weight_map = {k: v for k, v in index.items() if k != ROUTER}
    write_index(path, weight_map)
    expect(capsys, 1, words, "inspect", path)
    expect(capsys, 1, words, *export_args(path, tmp_path, "--dry-run"))
    expect(capsys, 1, words, "observe", "--model", path, "--offload", "--cache-dir", tmp_path / "cache", *OBSERVE)
    assert nothing_in(tmp_path / "cache")


# -- 3. auxiliary files that are symlinks out of the model directory -------------------------------------------------

def test_aux_symlink_leading_out_is_refused_unless_asked(small_model_dir, tmp_path, capsys):
    path = model_copy(small_model_dir, tmp_path)
    secret = tmp_path / "secret.json"
    (path / "tokenizer.json").rename(secret)
    (path / "tokenizer.json").symlink_to(secret)
    expect(capsys, 2, ["tokenizer.json", "symlink", "outside", "--copy-external-links"],
           *export_args(path, tmp_path))
    assert no_export_left(tmp_path)

    rc, _ = run_cli(capsys, *export_args(path, tmp_path, "--copy-external-links"))
    assert rc == 0, run_cli.last_err[-1500:]
    out = tmp_path / "out" / "tokenizer.json"
    assert out.is_file() and not out.is_symlink() and out.read_bytes() == secret.read_bytes()


def test_aux_symlink_inside_the_model_dir_is_copied_as_a_file(small_model_dir, tmp_path):
    from evoreap.export import export_pruned

    path = model_copy(small_model_dir, tmp_path)
    (path / "LICENSE.txt").write_text("license text\n")
    (path / "LICENSE").symlink_to("LICENSE.txt")
    dangling = path / "NOTICE"
    dangling.symlink_to(tmp_path / "no-such-file")
    with pytest.raises(EvoreapError, match="NOTICE"):  # a link to nowhere is refused too, never skipped silently
        export_pruned(path, tmp_path / "out", {0: [0, 2, 4, 6]}, progress=False, follow_external_links=True)
    dangling.unlink()
    export_pruned(path, tmp_path / "out", {0: [0, 2, 4, 6]}, progress=False)
    lic = tmp_path / "out" / "LICENSE"
    assert lic.is_file() and not lic.is_symlink() and lic.read_text() == "license text\n"


# -- 4. preflight: models that load but cannot be observed meaningfully ----------------------------------------------

def _drop_tokenizer(path: Path) -> None:
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / f).unlink(missing_ok=True)


def _config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("offload", [False, True])
def test_missing_tokenizer_is_refused(offload, small_model_dir, tmp_path, capsys):
    path = model_copy(small_model_dir, tmp_path)
    _drop_tokenizer(path)
    expect(capsys, 1, ["tokenizer", "tokens"], "observe", "--model", path, *(["--offload"] if offload else []),
           "--cache-dir", tmp_path / "cache", *OBSERVE)
    assert nothing_in(tmp_path / "cache")


def test_tokenizer_rule():
    from evoreap.preflight import check_tokenizer

    class Tok:
        def __init__(self, n, ids, special=()):
            self.n, self.ids, self.all_special_ids, self.unk_token_id = n, ids, list(special), None

        def __len__(self):
            return self.n

        def encode(self, text, add_special_tokens=False):
            return list(self.ids)

    check_tokenizer(Tok(4096, [5, 6, 7]), 4096, "m")
    check_tokenizer(Tok(151669, [5, 6, 7]), 151936, "m")  # padded embedding: fine
    for tok, vocab in [(Tok(1, []), 4096), (Tok(8, [5]), 8), (Tok(30, [5]), 4096), (Tok(4096, [0, 0], [0]), 4096),
                       (Tok(4096, [5, 9000]), 4096)]:
        with pytest.raises(EvoreapError, match="tokenizer"):
            check_tokenizer(tok, vocab, "m")


@pytest.mark.parametrize("offload", [False, True])
def test_config_with_fewer_layers_than_the_weights_is_refused(offload, small_model_dir, tmp_path, capsys):
    path = model_copy(small_model_dir, tmp_path)
    _config(path, num_hidden_layers=2)
    expect(capsys, 1, ["model.layers.2.", "not used", "num_hidden_layers"], "observe", "--model", path,
           *(["--offload"] if offload else []), "--cache-dir", tmp_path / "cache", *OBSERVE)
    assert nothing_in(tmp_path / "cache")


def test_ignored_checkpoint_tensors_are_accepted(tmp_path):
    """Tensors transformers itself ignores (rotary inv_freq of old checkpoints) are not "unused weights"."""
    from evoreap.models import load_config
    from evoreap.observe.sequential import SequentialModel
    from evoreap.testing import tiny_model

    path = tmp_path / "q"
    tiny_model("qwen3_moe").save_pretrained(path)
    f = path / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, f, metadata={"format": "pt"})
    assert SequentialModel(str(path), load_config(str(path))).unused_tensors() == []
    tensors["model.layers.9.mlp.gate.weight"] = torch.ones(16, 64)
    save_file(tensors, f, metadata={"format": "pt"})
    assert SequentialModel(str(path), load_config(str(path))).unused_tensors() == ["model.layers.9.mlp.gate.weight"]


def test_no_tensor_is_unused_in_any_supported_architecture(tmp_path):
    """The offloaded reader accounts for every tensor transformers saves, in every family (no false refusals)."""
    from evoreap.models import load_config
    from evoreap.observe.sequential import SequentialModel
    from evoreap.testing import ARCHITECTURES, tiny_model

    for arch in ARCHITECTURES:
        tiny_model(arch).save_pretrained(tmp_path / arch)
        assert SequentialModel(str(tmp_path / arch), load_config(str(tmp_path / arch))).unused_tensors() == [], arch


@pytest.mark.parametrize("top_k", [0, -1, 9])
def test_impossible_top_k_is_refused_before_weights_load(top_k, small_model_dir, tmp_path, capsys):
    path = model_copy(small_model_dir, tmp_path)
    _config(path, num_experts_per_tok=top_k)
    (path / "model.safetensors").write_bytes(b"")  # reading any weight would fail differently
    words = ["num_experts_per_tok", str(top_k), "8 experts"]
    expect(capsys, 1, words, "inspect", path)
    expect(capsys, 1, words, "observe", "--model", path, "--cache-dir", tmp_path / "cache", *OBSERVE)
    expect(capsys, 1, words, *export_args(path, tmp_path))
    assert nothing_in(tmp_path / "cache") and no_export_left(tmp_path)


@pytest.mark.parametrize("top_k", [0, 17, 2.0, "two", None, True])
def test_top_k_rule(top_k):
    from evoreap.adapters import MoEAdapter
    from evoreap.testing import tiny_config

    config = tiny_config("qwen3_moe")  # 16 experts, top-4
    MoEAdapter(config)
    object.__setattr__(config, "num_experts_per_tok", top_k)  # past the config class's own type checks
    with pytest.raises(EvoreapError, match=f"num_experts_per_tok={top_k!r}; top-k must be a whole number from 1 "
                                           "to the 16 experts"):
        MoEAdapter(config)


def _poison(path: Path, name: str, value: float) -> None:
    f = path / "model.safetensors"
    tensors = load_file(f)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = value
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.mark.parametrize("name,value,offload", [
    (ROUTER, float("nan"), False),
    (ROUTER, float("inf"), True),
    ("model.layers.3.mlp.experts.5.up_proj.weight", float("nan"), False),
    ("model.layers.3.mlp.experts.5.up_proj.weight", float("-inf"), True),
])
def test_non_finite_weights_are_refused(name, value, offload, small_model_dir, tmp_path, capsys):
    path = model_copy(small_model_dir, tmp_path)
    _poison(path, name, value)
    words = [name] if "experts" not in name else ["model.layers.3.mlp.experts.", "(expert 5)"]
    expect(capsys, 1, ["not finite", *words], "observe", "--model", path, *(["--offload"] if offload else []),
           "--cache-dir", tmp_path / "cache", *OBSERVE)
    observations = tmp_path / "cache" / "observations"
    if offload and "experts" in name:
        # offloaded, an expert is only read (and checked) when its layer is: the cache keeps no observation, only
        # the empty resumable-checkpoint folder that any failure midway through a first chunk leaves
        assert not observations.exists() or all(p.name.endswith(".partial") and not any(p.iterdir())
                                                for p in observations.iterdir())
    else:  # checked before any observing starts
        assert nothing_in(tmp_path / "cache")


@pytest.mark.parametrize("field,value", [("num_experts_per_tok", "two"), ("hidden_size", [32]),
                                         ("num_hidden_layers", None)])
def test_config_field_of_the_wrong_type(field, value, small_model_dir, tmp_path, capsys):
    """transformers' strict config dataclasses raise their own error type; it is one line naming the field."""
    model = model_copy(small_model_dir, tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg[field] = value
    (model / "config.json").write_text(json.dumps(cfg))
    expect(capsys, 2, ["config", "config.json"], "inspect", model)
