"""Pre-quantized checkpoints (FP8 block-scaled, MXFP4, compressed-tensors): dequantizers against naive references,
inspect, loading and observing (in memory and streamed) equal to the dequantized model, exports that keep the format
byte for byte with scales lined up, and bad input refused with one line before anything is written."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from evoreap.adapters import MoEAdapter
from evoreap.checkpoint.quant import MXFP4, CompressedTensors, dequantize_fp8_block, open_quantized
from evoreap.checkpoint.reader import CheckpointIndex, read_tensor
from evoreap.commands.inspect import describe
from evoreap.errors import EvoreapError, UsageError
from evoreap.export import export_pruned
from evoreap.masking import masked
from evoreap.models import load_model
from evoreap.testing import tiny_model
from evoreap.testing_quant import quantize_fp8_block, quantize_mxfp4, save_quantized

from evoreap.models import DEMO_MODEL_DIR as DEMO

# name -> (architecture, method, options): the formats as the published checkpoints use them
KINDS = {
    "qwen3-fp8": ("qwen3_moe", "fp8", {"block": (16, 16), "scale_dtype": torch.bfloat16}),  # Qwen: BF16 scales
    "deepseek-fp8": ("deepseek_v3", "fp8", {"block": (16, 16)}),  # F32 scales; kv_a_proj_with_mqa has 24 rows
    "gpt-oss-mxfp4": ("gpt_oss", "mxfp4", {}),
    "qwen3-ct-w4a16": ("qwen3_moe", "compressed-tensors", {"scheme": "W4A16", "scale_dtype": torch.bfloat16}),
    "qwen3-ct-fp8": ("qwen3_moe", "compressed-tensors", {"scheme": "FP8_DYNAMIC"}),
}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tok):
    made = {}

    def get(kind):
        if kind not in made:
            arch, method, opts = KINDS[kind]
            path = tmp_path_factory.mktemp(kind)
            save_quantized(tiny_model(arch, vocab_size=len(tok)), path, method, tokenizer=tok, **opts)
            made[kind] = path
        return made[kind]
    return get


# -- dequantizers against naive references --------------------------------------------------------------------------
def _naive_fp8(w, s, block):
    out = torch.empty(w.shape)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            out[i, j] = w[i, j].float() * s[i // block[0], j // block[1]].float()
    return out


@pytest.mark.parametrize("shape,block", [((576, 200), (128, 128)), ((192, 72), (128, 32)), ((24, 40), (16, 16))])
def test_fp8_block_dequantizer_pads_non_multiple_shapes(shape, block):
    from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer

    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g)
    q, s = quantize_fp8_block(w, block)
    assert s.shape == (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    got = dequantize_fp8_block(q, s, block)
    rows = list(range(0, shape[0], 61)) + [shape[0] - 1]  # the naive loop on a subset of rows, incl. the short block
    assert torch.equal(got[rows], _naive_fp8(q[rows], s.repeat_interleave(block[0], 0)[rows][:, :], (1, block[1])))
    ct = FP8BlockDequantizer(weight_block_size=block, dtype=torch.float32).process(
        {"m.weight": q, "m.weight_scale_inv": s})["m.weight"]
    assert torch.equal(got, ct)  # compressed-tensors' padded dequantizer: the same numbers
    assert (got - w).norm() / w.norm() < 0.05  # and it encodes w
    # fused [E, R, C] experts: each expert as its own matrix
    q3 = torch.stack([q, q.flip(0)])
    s3 = torch.stack([s, s.flip(0) * 2])
    assert torch.equal(dequantize_fp8_block(q3, s3, block)[1], dequantize_fp8_block(q.flip(0), s.flip(0) * 2, block))


def test_mxfp4_dequantizer_matches_naive_decoding():
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (2, 3, 2, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(120, 134, (2, 3, 2), generator=g, dtype=torch.uint8)
    got = MXFP4({}).dequantize(None, {"blocks": blocks, "scales": scales})
    lut = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    ref = torch.empty(2, 3, 64)
    for e in range(2):
        for r in range(3):
            for b in range(2):
                for i in range(16):
                    byte = int(blocks[e, r, b, i])
                    for k, nib in enumerate((byte & 0xF, byte >> 4)):
                        ref[e, r, b * 32 + 2 * i + k] = lut[nib] * 2.0 ** (int(scales[e, r, b]) - 127)
    assert torch.equal(got, ref.transpose(1, 2))  # stored rows are output features; the model holds [E, in, out]
    w = torch.randn(2, 6, 64, generator=g)
    assert ((MXFP4({}).dequantize(None, dict(zip(("blocks", "scales"), quantize_mxfp4(w)))).transpose(1, 2) - w)
            .norm() / w.norm()) < 0.2


@pytest.mark.parametrize("scheme", ["W4A16", "W4A16_ASYM", "FP8_DYNAMIC", "FP8_BLOCK"])
def test_compressed_tensors_dequantizer_matches_naive(scheme):
    from evoreap.export.quantize import make_scheme, quantization_config, quantize_weight, weight_qparams

    sch = make_scheme(scheme, group_size=16, block=(16, 16))
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(2))
    parts = quantize_weight(w, sch)
    fmt = CompressedTensors(quantization_config(sch, []))
    from types import SimpleNamespace
    got = fmt.dequantize(SimpleNamespace(name="m.weight", scheme=sch), parts)
    scale, zp = weight_qparams(w, sch)
    if scheme.startswith("W4"):  # integers in [-8, 7] per group of 16, times the group's scale (minus zero point)
        s = scale.repeat_interleave(16, 1)
        z = zp.repeat_interleave(16, 1).float()
        ref = (torch.clamp(torch.round(w / s + z), -8, 7) - z) * s
    else:
        s = scale if scale.shape[-1] == 1 else \
            scale.repeat_interleave(16, 0)[:40].repeat_interleave(16, 1)[:, :64]
        ref = (w / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    assert torch.allclose(got, ref, rtol=0, atol=1e-6)


# -- inspect -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,fmt,block", [("deepseek-fp8", "float8_e4m3fn", [16, 16]),
                                            ("gpt-oss-mxfp4", "mxfp4 (e2m1 values, e8m0 scales)", [1, 32]),
                                            ("qwen3-ct-w4a16", "pack-quantized", [1, 32])])
def test_inspect_names_format_and_counts_bytes(quantized, kind, fmt, block):
    path = quantized(kind)
    info = describe(str(path))
    q = info["quantization"]
    assert (q["method"], q["format"], q["block"]) == (KINDS[kind][1], fmt, block)
    parts = info["stored_bytes_by_part"]
    assert sum(parts.values()) == info["stored_bytes"] == CheckpointIndex(path).total_bytes
    index = CheckpointIndex(path)
    scale_names = [n for n in index.tensors if ".experts." in n and n.endswith(("_scale_inv", "_scales", "weight_scale",
                                                                              "weight_shape"))]
    assert parts["expert_scales"] == sum(index.tensors[n].nbytes for n in scale_names) > 0


# -- loading and observing ---------------------------------------------------------------------------------------------
def _dequantized_dir(path, out):
    """The full-precision checkpoint a quantized one encodes, written as a plain safetensors model."""
    quant = open_quantized(path)
    shutil.copytree(path, out)
    for f in out.glob("*.safetensors"):
        f.unlink()
    save_file({n: quant.get(n).contiguous() for n in quant.names()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("kind", ["qwen3-fp8", "deepseek-fp8", "gpt-oss-mxfp4", "qwen3-ct-w4a16", "qwen3-ct-fp8"])
def test_observe_equals_dequantized_model_in_memory_and_streamed(quantized, kind, tmp_path):
    from evoreap.api import observe

    path = quantized(kind)
    plain = _dequantized_dir(path, tmp_path / "plain")
    ids = torch.randint(0, 4000, (2, 12), generator=torch.Generator().manual_seed(3))
    a, b = load_model(str(path)), load_model(str(plain))
    assert torch.equal(a.model(ids).logits, b.model(ids).logits)
    kw = dict(tokens=256, seq_len=32, batch_size=4, cache_dir=str(tmp_path / "cache"), progress=False)
    q_mem = observe(str(path), **kw)
    q_off = observe(str(path), offload=True, **kw)
    p_mem = observe(str(plain), **kw)
    assert q_off.key == q_mem.key != p_mem.key  # the quantization is part of the identity
    assert q_mem.manifest["model"]["quantization"] == describe(str(path))["quantization"]["method"] + \
        q_mem.manifest["model"]["quantization"][len(KINDS[kind][1]):]
    assert "quantization" not in p_mem.manifest["model"]
    assert q_mem.stats.allclose(p_mem.stats, rtol=1e-5, atol=1e-6)
    assert q_off.stats.allclose(q_mem.stats, rtol=1e-5, atol=1e-6)


# -- export keeps the format -------------------------------------------------------------------------------------------
def _source_slices(index, name, rows):
    t = index.tensors[name]
    raw = bytearray()
    with open(t.file, "rb") as f:
        for off, n in t.row_ranges(rows):
            f.seek(off)
            raw += f.read(n)
    return bytes(raw)


def _stored_bytes(info):
    with open(info.file, "rb") as f:
        f.seek(info.start)
        return f.read(info.nbytes)


@pytest.mark.parametrize("kind", ["qwen3-fp8", "deepseek-fp8", "gpt-oss-mxfp4", "qwen3-ct-w4a16", "qwen3-ct-fp8"])
def test_export_keeps_quantized_bytes_and_matches_masked_model(quantized, kind, tmp_path):
    src = quantized(kind)
    loaded = load_model(str(src))
    adapter = loaded.adapter
    e = adapter.num_experts
    g = torch.Generator().manual_seed(4)
    kept = {layer: sorted(torch.randperm(e, generator=g)[: e // 2 + (i % 2) * (e // 4)].tolist())
            for i, layer in enumerate(adapter.moe_layer_indices)}
    if adapter.n_group > 1:  # group-limited routing: the same count in every group
        size = e // adapter.n_group
        kept = {layer: [gi * size + j for gi in range(adapter.n_group) for j in ((0, 1, 3) if i % 2 else (0, 2))]
                for i, layer in enumerate(adapter.moe_layer_indices)}
    out = tmp_path / "out"
    export_pruned(src, out, kept, progress=False)
    s_idx, o_idx = CheckpointIndex(src), CheckpointIndex(out)
    s_q, o_q = open_quantized(src), open_quantized(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == KINDS[kind][1]
    if KINDS[kind][1] == "compressed-tensors":  # per-layer counts in compressed-tensors' own field
        assert cfg["quantization_config"]["moe_sparsity_config"] == {
            "method": "prune", "num_experts": [len(kept[i]) if i in kept else None
                                               for i in range(adapter.config.num_hidden_layers)]}
    layout = __import__("evoreap.checkpoint.layout", fromlist=["KeyLayout"]).KeyLayout.of(adapter)
    checked = 0
    for name, t in o_idx.tensors.items():
        key = layout.parse(name)
        if key is None or key.layer not in kept:
            assert _stored_bytes(t) == _stored_bytes(s_idx.tensors[name])
            continue
        per = key.expert()
        if per is not None:  # renumbered expert tensor (weight, scale, packed shape): the old expert's bytes
            old = kept[key.layer][per[0]]
            src_name = name.replace(f".{key.part}.{per[0]}.", f".{key.part}.{old}.")
            assert _stored_bytes(t) == _stored_bytes(s_idx.tensors[src_name])
        else:  # fused experts or router: the kept rows, byte for byte
            assert _stored_bytes(t) == _source_slices(s_idx, name, kept[key.layer])
        checked += 1
    assert checked
    # scales line up with their experts: every kept expert dequantizes to the source expert it came from, while the
    # weights of one expert with the scales of another would not
    layer = adapter.moe_layer_indices[0]
    groups = [n for n in o_q.groups if (k := layout.parse(n)) is not None and k.layer == layer and not k.is_router]
    assert groups
    for name in groups:
        key = layout.parse(name)
        got = o_q.get(name)
        if key.expert() is not None:
            new, _ = key.expert()
            old = kept[layer][new]
            ref = s_q.get(name.replace(f".{key.part}.{new}.", f".{key.part}.{old}."))
            assert torch.equal(got, ref)
            if new + 1 < len(kept[layer]):
                swapped = s_q.groups[name.replace(f".{key.part}.{new}.", f".{key.part}.{old}.")]
                other = s_q.groups[name.replace(f".{key.part}.{new}.", f".{key.part}.{kept[layer][new + 1]}.")]
                mixed = {r: read_tensor(t) for r, t in swapped.parts.items()}
                mixed.update({r: read_tensor(other.parts[r]) for r in swapped.parts if swapped.roles[r] == "scale"})
                assert not torch.equal(s_q.format.dequantize(swapped, mixed), ref)
        else:
            assert torch.equal(got, s_q.get(name)[kept[layer]])
            perm = list(reversed(kept[layer]))
            assert not torch.equal(got, s_q.get(name)[perm])
    # the reloaded export computes what the masked quantized model computes
    masks = {layer: torch.zeros(e, dtype=torch.bool).index_fill_(0, torch.tensor(k), True) for layer, k in kept.items()}
    ids = torch.randint(0, 4000, (2, 16), generator=g)
    with torch.no_grad(), masked(loaded.model, adapter, masks):
        ref = loaded.model(ids).logits
    pruned = load_model(str(out), trust_remote_code=True)
    with torch.no_grad():
        got = pruned.model(ids).logits
    assert ((got - ref).norm() / ref.norm()) <= 1e-4


# -- bad input ---------------------------------------------------------------------------------------------------------
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_scales_that_do_not_match_their_weights_are_refused_before_writing(quantized, tmp_path):
    src = _copy(quantized("deepseek-fp8"), tmp_path / "src")
    name = "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"
    _rewrite(src, lambda t: t.__setitem__(name, t[name][:, :1].contiguous()))
    for call in (lambda: load_model(str(src)),
                 lambda: export_pruned(src, tmp_path / "out", {1: list(range(8))}, progress=False),
                 lambda: describe(str(src))):
        with pytest.raises(EvoreapError) as err:
            call()
        msg = str(err.value)
        assert "\n" not in msg and name in msg and "do not match" in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_mxfp4_scales_of_another_shape_are_refused(quantized, tmp_path):
    src = _copy(quantized("gpt-oss-mxfp4"), tmp_path / "src")
    name = "model.layers.0.mlp.experts.down_proj_scales"
    _rewrite(src, lambda t: t.__setitem__(name, t[name][:, :-1].contiguous()))
    with pytest.raises(EvoreapError, match="needs one scale per block"):
        export_pruned(src, tmp_path / "out", {0: [0, 1, 2, 3]}, progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_quant_method_and_bad_block_sizes_are_usage_errors(quantized, tmp_path):
    src = _copy(quantized("qwen3-fp8"), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    for qc, words in (({"quant_method": "hqq"}, "quant_method 'hqq' is not supported"),
                      ({"quant_method": "fp8", "weight_block_size": [0, 128]}, "two positive integers")):
        (src / "config.json").write_text(json.dumps(cfg | {"quantization_config": qc}))
        for call in (lambda: load_model(str(src)), lambda: describe(str(src)),
                     lambda: export_pruned(src, tmp_path / "out", {0: list(range(8))}, progress=False)):
            with pytest.raises(UsageError, match=words) as err:
                call()
            assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_group_size_that_does_not_divide_is_refused(quantized, tmp_path):
    src = _copy(quantized("qwen3-ct-w4a16"), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 24
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="group_size 24 does not divide the 32 input features"):
        export_pruned(src, tmp_path / "out", {0: list(range(8))}, progress=False)
    assert not (tmp_path / "out").exists()


def test_adapter_of_quantized_config_is_unchanged(quantized):
    from evoreap.models import load_config

    assert MoEAdapter(load_config(str(quantized("gpt-oss-mxfp4")))).num_experts == 8


@pytest.mark.parametrize("kind", ["qwen3-fp8", "gpt-oss-mxfp4", "qwen3-ct-w4a16"])
def test_uniform_quantized_export_loads_with_stock_transformers(quantized, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    src = quantized(kind)
    adapter = load_model(str(src)).adapter
    kept = {layer: list(range(0, adapter.num_experts, 2)) for layer in adapter.moe_layer_indices}
    export_pruned(src, tmp_path / "out", kept, progress=False)
    ours = load_model(str(tmp_path / "out")).model
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)  # transformers dequantizes
    ids = torch.randint(0, 4000, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = stock(ids).logits, ours(ids).logits
    # transformers' compressed-tensors loader multiplies in the scales' dtype (bf16 here) and rounds the weights;
    # evoreap multiplies in float32, exactly what the checkpoint encodes: a bf16 tolerance for that format
    assert (a - b).norm() / b.norm() <= (2e-2 if KINDS[kind][1] == "compressed-tensors" else 1e-6)


def test_budget_gb_counts_stored_bytes_of_a_quantized_source(quantized):
    from evoreap.checkpoint.quant import expert_stored_bits
    from evoreap.models import load_config
    from evoreap.search.space import Budget

    path = quantized("qwen3-fp8")
    adapter = MoEAdapter(load_config(str(path)))
    bits = expert_stored_bits(str(path), adapter)
    index = CheckpointIndex(path)
    stored = sum(t.nbytes for n, t in index.tensors.items() if ".experts." in n)
    assert bits == 8 * stored / (adapter.num_experts * adapter.expert_params() * len(adapter.moe_layer_indices))
    assert bits == 8 + 16 / 256  # one FP8 byte per weight, one BF16 scale per 16x16 block
    budget = Budget.resolve(adapter, gb=stored / 2 / 1e9, stored_bits=bits)
    assert budget.params == int(stored / 2 * 8 / bits) and "as stored" in budget.described
    with pytest.raises(UsageError, match="drop --bits"):
        Budget.resolve(adapter, gb=1e-4, bits=4, stored_bits=bits)
    assert expert_stored_bits(str(DEMO), adapter) is None  # full precision: --bits plans the size


# -- prune, then quantize -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_qwen(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("plain-qwen")
    tiny_model("qwen3_moe", vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_export_quantize_writes_compressed_tensors_that_transformers_loads(plain_qwen, tmp_path):
    from transformers import AutoModelForCausalLM

    from evoreap.export.quantize import make_scheme, weight_qparams

    src = plain_qwen
    s_idx = CheckpointIndex(src)
    layers = [0, 2, 3]
    uniform = {layer: list(range(1, 16, 2)) for layer in layers}
    out = tmp_path / "w4"
    result = export_pruned(src, out, uniform, progress=False, quantize="W4A16", quantize_group_size=32)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert {"lm_head", "model.embed_tokens", "model.layers.0.mlp.gate"} <= set(qc["ignore"])
    assert result.bytes_after == CheckpointIndex(out).total_bytes < result.bytes_before
    o_idx, o_q = CheckpointIndex(out), open_quantized(out)
    assert torch.equal(read_tensor(o_idx.tensors["model.layers.2.mlp.gate.weight"]),
                       read_tensor(s_idx.tensors["model.layers.2.mlp.gate.weight"])[uniform[2]])  # router: as is
    sch = make_scheme("W4A16", group_size=32)
    for new, old in ((0, 1), (5, 11)):  # the kept expert, quantized: clamp(round(w / s)) * s per group of 32
        w = read_tensor(s_idx.tensors[f"model.layers.2.mlp.experts.{old}.down_proj.weight"])
        scale, _ = weight_qparams(w, sch)
        s = scale.repeat_interleave(32, 1)
        assert torch.allclose(o_q.get(f"model.layers.2.mlp.experts.{new}.down_proj.weight"),
                              torch.clamp(torch.round(w / s), -8, 7) * s, rtol=0, atol=1e-6)
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours = load_model(str(out)).model
    ids = torch.randint(0, 4000, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, ours(ids).logits)
    # non-uniform: per-layer counts in compressed-tensors' moe_sparsity_config, loadable through evoreap's own code
    nonuni = dict(uniform) | {0: list(range(12))}
    export_pruned(src, tmp_path / "fp8", nonuni, progress=False, quantize="FP8_DYNAMIC")
    qc = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert qc["moe_sparsity_config"] == {"method": "prune", "num_experts": [12, None, 8, 8]}
    assert load_model(str(tmp_path / "fp8"), trust_remote_code=True).adapter.num_experts == 12
    # a quantized source keeps its format: --quantize on it, or an unknown scheme, is refused before writing
    for scheme, words in (("W3A3", "'W3A3' is not a compressed-tensors scheme"),
                          ("FP8", "FP8 quantizes activations with static scales, which must be calibrated"),
                          ("NVFP4", "static scales"), ("W8A8", "does not write")):
        with pytest.raises(UsageError, match=words) as err:
            export_pruned(src, tmp_path / "bad", uniform, progress=False, quantize=scheme)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "bad").exists()


def test_export_dry_run_describes_quantize_and_refuses_a_bad_scheme(plain_qwen, tmp_path, capsys):
    from evoreap.cli import main

    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps({"format": "evoreap-allocation", "version": 1, "layers": {"0": 8, "2": 8, "3": 8},
                                 "experts": {str(i): list(range(8)) for i in (0, 2, 3)}}))
    base = ["export", "--model", str(plain_qwen), "--allocation", str(alloc), "--out", str(tmp_path / "o"),
            "--dry-run"]
    assert main(base + ["--quantize", "W4A16"]) == 0
    text = capsys.readouterr().out
    assert "compressed-tensors W4A16" in text and "stock transformers" in text
    assert main(base + ["--quantize", "FP8"]) == 2
    assert "static scales" in capsys.readouterr().err and not (tmp_path / "o").exists()


def _qdq_w4(w, group=32):
    """Naive W4A16 (symmetric, per group of ``group`` inputs) quantize-dequantize of one Linear weight [out, in]."""
    from evoreap.export.quantize import make_scheme, weight_qparams

    scale, _ = weight_qparams(w, make_scheme("W4A16", group_size=group))
    s = scale.repeat_interleave(group, 1)
    return torch.clamp(torch.round(w / s), -8, 7) * s


def _qdq_reference(model, interleaved, transposed):
    """``model`` with every projection Linear and every expert's gate, up and down projection quantize-dequantized
    naively, the fused expert tensors cut into per-expert Linear weights by hand (GPT-OSS: [E, in, out], gate on
    even and up on odd output columns; transformers 5: [E, out, in], gate rows then up rows)."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and "proj" in name.rsplit(".", 1)[-1]:
                mod.weight.copy_(_qdq_w4(mod.weight))
            gu, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
            if not isinstance(gu, torch.nn.Parameter):
                continue
            for e in range(gu.shape[0]):
                w = gu[e].T if transposed else gu[e].clone()  # [2I, H]: output rows
                half = w.shape[0] // 2
                rows = (torch.arange(0, 2 * half, 2), torch.arange(1, 2 * half, 2)) if interleaved else \
                    (torch.arange(half), torch.arange(half, 2 * half))
                for r in rows:
                    w[r] = _qdq_w4(w[r])
                gu[e] = w.T if transposed else w
                d = down[e].T if transposed else down[e]
                down[e] = _qdq_w4(d).T if transposed else _qdq_w4(d)
    return model


@pytest.fixture(scope="module")
def fused_sources(tmp_path_factory, tok):
    """GPT-OSS in full precision and MXFP4, and a Qwen3-MoE saved with transformers 5's fused expert tensors."""
    made = {}

    def get(kind):
        if kind not in made:
            path = tmp_path_factory.mktemp(kind)
            arch = "qwen3_moe" if kind == "qwen3-fused" else "gpt_oss"
            model = tiny_model(arch, vocab_size=len(tok))
            if kind == "gpt-oss-mxfp4":
                save_quantized(model, path, "mxfp4", tokenizer=tok)
            else:
                model.save_pretrained(path)
                tok.save_pretrained(path)
                if kind == "qwen3-fused":  # the model's own (fused) parameter names on disk
                    for f in path.glob("*.safetensors"):
                        f.unlink()
                    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                              str(path / "model.safetensors"), metadata={"format": "pt"})
            made[kind] = path
        return made[kind]
    return get


@pytest.mark.parametrize("kind", ["gpt-oss-bf16", "gpt-oss-mxfp4", "qwen3-fused"])
def test_export_quantize_of_fused_experts_writes_per_expert_linear_views(fused_sources, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    src = fused_sources(kind)
    source = load_model(str(src))
    adapter, e = source.adapter, source.adapter.num_experts
    stored = CheckpointIndex(src)
    assert any(n.endswith(("experts.gate_up_proj", "experts.gate_up_proj_blocks")) for n in stored.tensors)
    kept = {layer: list(range(1, e, 2)) for layer in adapter.moe_layer_indices}
    out = tmp_path / "w4"
    export_pruned(src, out, kept, progress=False, quantize="W4A16", quantize_group_size=32)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    routers = {f"model.layers.{i}.mlp.{adapter.spec.router_attr}" for i in adapter.moe_layer_indices}
    assert routers | {"lm_head"} <= set(qc["ignore"])
    o_idx = CheckpointIndex(out)
    gate, up, down = (n.split(".")[0] for n in adapter.spec.linear_expert_names)
    for i in adapter.moe_layer_indices:  # one compressed Linear per kept expert and projection; routers dense
        for new in range(len(kept[i])):
            for proj in (gate, up, down):
                assert f"model.layers.{i}.mlp.experts.{new}.{proj}.weight_packed" in o_idx.tensors
        assert f"model.layers.{i}.mlp.experts.{len(kept[i])}.{gate}.weight_packed" not in o_idx.tensors
        assert o_idx.tensors[f"model.layers.{i}.mlp.{adapter.spec.router_attr}.weight"].shape == (len(kept[i]), 64)
    assert not any(n.endswith(("gate_up_proj", "_blocks")) for n in o_idx.tensors)
    # the reloaded export computes what the pruned model with naively quantized Linear views computes
    gpt = adapter.spec.name == "GPT-OSS"
    ref_model = _qdq_reference(load_model(str(src)).model, interleaved=gpt, transposed=gpt)
    masks = {layer: torch.zeros(e, dtype=torch.bool).index_fill_(0, torch.tensor(k), True) for layer, k in kept.items()}
    ids = torch.randint(0, 4000, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        with masked(source.model, adapter, masks):
            full = source.model(ids).logits
        with masked(ref_model, adapter, masks):
            ref = ref_model(ids).logits
        got = load_model(str(out)).model(ids).logits
    assert (got - ref).norm() / ref.norm() <= 1e-5
    assert (got - full).norm() / full.norm() > 1e-3  # it is quantized: W4 differs from the full-precision model
    if kind == "gpt-oss-bf16":  # the streamed reader fuses the per-expert views as the in-memory loader does
        from evoreap.api import observe

        kw = dict(tokens=64, seq_len=32, batch_size=2, cache_dir=str(tmp_path / "cache"), progress=False)
        assert observe(str(out), offload=True, **kw).stats.allclose(observe(str(out), **kw).stats, rtol=1e-5,
                                                                    atol=1e-6)
    stock, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    if gpt:
        # transformers 5.24 has no checkpoint conversion for GPT-OSS (stored fused), so its loader leaves the
        # per-expert tensors unused and the fused experts random: evoreap's own loader fuses them (FusedView)
        assert "model.layers.0.mlp.experts.gate_up_proj" in info["missing_keys"]
        assert "Loads with evoreap only" in (out / "README.md").read_text()
    else:  # per-expert Linear tensors are what transformers' conversion stacks into the fused experts
        assert not info["missing_keys"] and not info["unexpected_keys"]
        with torch.no_grad():
            assert torch.equal(stock(ids).logits, got)


@pytest.mark.parametrize("kind", ["qwen3-fp8", "gpt-oss-mxfp4", "qwen3-ct-w4a16"])
def test_non_uniform_quantized_export_loads_with_stock_transformers_and_its_own_code(quantized, kind, tmp_path):
    """A non-uniform export ships evoreap's modeling code (auto_map): stock transformers loads it with
    trust_remote_code=True through its own FP8 / MXFP4 / compressed-tensors loaders, refuses it without (shapes
    differ per layer). compressed-tensors' moe_sparsity_config is a field of its own QuantizationConfig only, so it
    is declared there and never added to an fp8 or mxfp4 config (whose loaders have no such field)."""
    from transformers import AutoModelForCausalLM

    src = quantized(kind)
    loaded = load_model(str(src))
    adapter, e = loaded.adapter, loaded.adapter.num_experts
    kept = {layer: list(range(e // 2 + (i % 2) * (e // 4))) for i, layer in enumerate(adapter.moe_layer_indices)}
    export_pruned(src, tmp_path / "out", kept, progress=False)
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert ("moe_sparsity_config" in qc) == (KINDS[kind][1] == "compressed-tensors")
    masks = {layer: torch.zeros(e, dtype=torch.bool).index_fill_(0, torch.tensor(k), True) for layer, k in kept.items()}
    ids = torch.randint(0, 4000, (1, 12), generator=torch.Generator().manual_seed(8))
    with pytest.raises(RuntimeError, match="mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, trust_remote_code=True)
    with torch.no_grad(), masked(loaded.model, adapter, masks):
        ref = loaded.model(ids).logits
    with torch.no_grad():
        got = stock(ids).logits
    # compressed-tensors' loader multiplies in the bf16 scales' dtype (see the uniform test): a bf16 tolerance there
    assert (got - ref).norm() / ref.norm() <= (2e-2 if KINDS[kind][1] == "compressed-tensors" else 1e-5)


def test_search_on_an_fp8_model_records_the_quantization_and_exports_fp8(quantized, tmp_path):
    """A very short automated search on an FP8 block-scaled Qwen3-MoE: it runs on the dequantized model, its
    observation is keyed as FP8, and --export of the best allocation keeps the FP8 tensors byte for byte."""
    import evoreap
    from evoreap.observe.store import load_observation

    src = quantized("qwen3-fp8")
    out = tmp_path / "pruned"
    res = evoreap.search(str(src), 0.5, runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"), run="q",
                         quiet=True, export=str(out), generations=1, offspring=1, population=1,
                         fidelities=(64, 96, 128), survivors=(1, 1), calib_tokens=128, heldout_tokens=64, seq_len=32,
                         batch_size=8, no_plots=True)
    best = json.loads((tmp_path / "runs" / "q" / "best_allocation.json").read_text())
    obs = load_observation(best["meta"]["observation_key"], cache_dir=str(tmp_path / "cache"))
    assert obs.manifest["model"]["quantization"] == "fp8 float8_e4m3fn block 16x16"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == json.loads((src / "config.json").read_text())["quantization_config"]
    record = json.loads((out / "evoreap.json").read_text())
    kept = {int(k): v for k, v in record["kept_experts"].items()}
    assert {k: len(v) for k, v in kept.items()} == res.allocation.as_dict()
    s_idx, o_idx = CheckpointIndex(src), CheckpointIndex(out)
    for layer, experts in kept.items():
        for new, old in enumerate(experts):
            for leaf in ("weight", "weight_scale_inv"):
                name = f"model.layers.{layer}.mlp.experts.{{}}.down_proj.{leaf}"
                t = o_idx.tensors[name.format(new)]
                assert t.dtype == ("F8_E4M3" if leaf == "weight" else "BF16")
                assert _stored_bytes(t) == _stored_bytes(s_idx.tensors[name.format(old)])


def test_search_refuses_a_lowrank_repair_of_a_quantized_model_before_searching(quantized, tmp_path):
    """The low-rank update cannot be merged into FP8 experts, so ``search --repair ...+lowrank`` on an FP8 model is
    refused at set-up, before any observation, reference or run directory exists (not after hours of search)."""
    import evoreap

    with pytest.raises(UsageError, match="low-rank repair changes expert weights"):
        evoreap.search(str(quantized("qwen3-fp8")), 0.5, runs_dir=str(tmp_path / "runs"),
                       cache_dir=str(tmp_path / "cache"), run="q", quiet=True, repair="router+norm+scale+lowrank",
                       generations=1, calib_tokens=128, heldout_tokens=64, seq_len=32, no_plots=True)
    assert not (tmp_path / "runs" / "q").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("kind", ["qwen3-fp8", "qwen3-ct-fp8"])
def test_kv_cache_scales_are_listed_ignored_by_the_model_and_copied_by_export(quantized, tok, tmp_path, kind):
    """A checkpoint with calibrated KV-cache scales (self_attn.k_scale / v_scale, kv_cache_scheme): inspect names
    the scheme and counts them as scales, loading and observe --offload do not flag them as unused (a dequantized
    model has no use for them) and compute what the same checkpoint without them computes, export copies them byte
    for byte with the kv_cache_scheme, and --quantize carries both over."""
    from evoreap.api import observe

    _, method, opts = KINDS[kind]
    plain = quantized(kind)
    src = save_quantized(tiny_model("qwen3_moe", vocab_size=len(tok)), tmp_path / "kv", method, tokenizer=tok,
                         kv_cache=True, **opts)
    s_idx = CheckpointIndex(src)
    kv = sorted(n for n in s_idx.tensors if n.endswith(("k_scale", "v_scale")))
    assert len(kv) == 8
    info = describe(str(src))
    assert info["quantization"]["kv_cache_scheme"]["strategy"] == "tensor"
    assert info["stored_bytes_by_part"]["other_scales"] == (describe(str(plain))["stored_bytes_by_part"]
                                                            ["other_scales"] + 8 * 4)
    ids = torch.randint(0, 4000, (1, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(load_model(str(src)).model(ids).logits, load_model(str(plain)).model(ids).logits)
    if method == "fp8":  # the streamed reader's unused-tensor check too
        kw = dict(tokens=64, seq_len=32, batch_size=2, cache_dir=str(tmp_path / "cache"), progress=False)
        assert observe(str(src), offload=True, **kw).stats.allclose(observe(str(plain), **kw).stats, rtol=1e-5,
                                                                    atol=1e-6)
    kept = {layer: list(range(0, 16, 2)) for layer in (0, 2, 3)}
    export_pruned(src, tmp_path / "out", kept, progress=False)
    o_idx = CheckpointIndex(tmp_path / "out")
    for n in kv:
        assert _stored_bytes(o_idx.tensors[n]) == _stored_bytes(s_idx.tensors[n])
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache_scheme"] == json.loads((src / "config.json").read_text())["quantization_config"][
        "kv_cache_scheme"]
    load_model(str(tmp_path / "out"))
    if method == "compressed-tensors":
        export_pruned(src, tmp_path / "w4", kept, progress=False, quantize="W4A16", quantize_group_size=32)
        w_idx = CheckpointIndex(tmp_path / "w4")
        assert all(torch.equal(read_tensor(w_idx.tensors[n]), read_tensor(s_idx.tensors[n])) for n in kv)
        qc = json.loads((tmp_path / "w4" / "config.json").read_text())["quantization_config"]
        assert qc["kv_cache_scheme"]["type"] == "float" and qc["format"] == "pack-quantized"
        load_model(str(tmp_path / "w4"))


def test_fused_layout_of_an_architecture_is_validated():
    from evoreap.adapters import ArchSpec, register_architecture
    from evoreap.errors import RegistryError

    with pytest.raises(RegistryError, match="unknown fused_gate_up 'zip'"):
        register_architecture(ArchSpec("X", ("x_moe_test",), "softmax_topk", fused_gate_up="zip"))


def test_streamed_evaluate_of_an_fp8_model_equals_the_dequantized_model_in_memory(quantized, tmp_path):
    """The layer-streamed engine reads a quantized checkpoint dequantized layer by layer: `evaluate --offload` of a
    masked allocation on the FP8 Qwen3-MoE gives the in-memory evaluation's table."""
    import evoreap.pipeline.judge as judge
    from evoreap.allocation import Allocation

    src = str(quantized("qwen3-fp8"))
    adapter = MoEAdapter(load_model(src).adapter.config)
    layers = adapter.moe_layer_indices
    kept = {i: list(range(0, adapter.num_experts, 2)) for i in layers}
    alloc = Allocation(tuple(layers), tuple(len(k) for k in kept.values()), {"model": src}).with_experts(kept)
    kw = dict(data="demo", tokens=128, seq_len=32, batch_size=4, cache_dir=str(tmp_path / "c"), generate_tokens=0)
    want = judge.evaluate_pruned(src, allocation=alloc, **kw).results
    got = judge.evaluate_pruned(src, allocation=alloc, offload=True, **kw).results
    assert want.keys() == got.keys()
    for row in want:
        for name, v in want[row]["overall"].items():
            assert got[row]["overall"][name] == pytest.approx(v, rel=1e-5, abs=1e-6), (row, name)
