"""Loading models and tokenizers: a local directory, a hub id where a hub is reachable, or the bundled demo."""

from __future__ import annotations

import copy
import ctypes
import importlib.util
import json
import logging
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from evoreap import preflight
from evoreap.adapters import MoEAdapter
from evoreap.checkpoint.own_code import own_model_class
from evoreap.checkpoint.reader import local_checkpoint
from evoreap.checkpoint.trust import needs_trust, own_export
from evoreap.errors import EvoreapError, UsageError
from evoreap.files import user_path
from evoreap.fingerprint import note_loaded

log = logging.getLogger(__name__)

DEMO_MODEL_DIR = Path(__file__).parent / "demo" / "model"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    path: str
    adapter: MoEAdapter


def resolve_model(name: str | None) -> str:
    """``None`` means the bundled demo; a path must exist; anything else is treated as a hub id."""
    if name is None:
        if not (DEMO_MODEL_DIR / "config.json").exists():
            raise EvoreapError(f"the bundled demo model is missing from {DEMO_MODEL_DIR}; reinstall evoreap or "
                               "rebuild it with: python -m evoreap.demo.train")
        return str(DEMO_MODEL_DIR)
    p = user_path(name)
    looks_like_path = name.startswith((".", "/", "~")) or p.exists() or name.count("/") != 1
    if looks_like_path:
        if not p.is_dir():
            raise UsageError(f"model path {name} does not exist or is not a directory; pass a local model "
                             "directory (with config.json) or a hub id like Qwen/Qwen3-30B-A3B")
        if not (p / "config.json").is_file():
            raise UsageError(f"model directory {name} has no config.json; pass the directory that "
                             "save_pretrained wrote")
        return str(p.resolve())
    return name


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}; use one of {', '.join(sorted(DTYPES))}") from None


def model_class(path: str | Path, config: Any) -> Any:
    """What builds the model of ``path``: evoreap's in-process class for its own non-uniform exports (so no file of
    the directory is imported), else transformers' AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM  # lazy: transformers' auto classes take ~1.7 s to import

    if Path(path).is_dir() and own_export(path):
        return own_model_class(MoEAdapter(config))
    return AutoModelForCausalLM


def load_config(name: str | None, *, trust_remote_code: bool = False):
    from transformers import AutoConfig  # lazy: transformers' auto classes take ~1.7 s to import

    path = resolve_model(name)
    trust_remote_code = needs_trust(path, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UsageError(f"{path} needs custom code to load; evoreap refuses to run code from a model "
                             "directory unless you pass --trust-remote-code (read that code first)") from None
        raise EvoreapError(f"cannot read the config of {path}: {e}") from None
    except (OSError, TypeError, KeyError, StrictDataclassError) as e:  # a field of the wrong type or a bad file
        what = " ".join(str(e).split())[:300] or type(e).__name__
        raise UsageError(f"cannot read the config of {path}: {what}; fix config.json") from None


def load_tokenizer(name: str | None, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer  # lazy: transformers' auto classes take ~1.7 s to import

    path = resolve_model(name)
    trust_remote_code = needs_trust(path, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise EvoreapError(f"cannot load the tokenizer of {path}: {str(e).splitlines()[0]}") from None


def _quantized(path: str, index, config: Any):
    """The dequantized view of a pre-quantized local checkpoint (None when it is not quantized).

    Quantized checkpoints are dequantized on load, on any device, by evoreap's readers (compressed-tensors'
    compressors, transformers' MXFP4 helper, a padded FP8 block dequantizer) rather than by transformers' quantizer
    integrations: those need CUDA kernels to keep weights quantized, and transformers 5.24's FP8 ``dequantize=True``
    infers the block from the scale grid, which is wrong where a dimension is not a multiple of 128 (576 rows fail
    to load, 192 load 2% wrong). The streamed path (``observe --offload``) reads through the same view."""
    from evoreap.checkpoint.quant import QuantizedCheckpoint, detect, spec_of

    fmt = detect(config)
    if fmt is None:
        return None
    if index is None:
        raise UsageError(f"{path} is quantized ({fmt.label()}); evoreap dequantizes quantized checkpoints from local "
                         "safetensors files: download it first (huggingface-cli download ...)")
    try:
        return QuantizedCheckpoint.of(index, fmt, spec_of(config))
    except UsageError:
        raise
    except EvoreapError as e:
        raise EvoreapError(f"cannot load the weights of {path}: {e}") from None


class _Dequantized:
    """One weight of a quantized checkpoint, read and dequantized only when transformers' loader materialises it
    (``value[...]``, as it does with the safetensors slices it opens itself), so that the whole dequantized state
    dict never sits in memory beside the model: a dict of dequantized tensors made the load peak at 3.0x the loaded
    model's size against 2.2x for the bf16 checkpoint (benchmarks/quant.py --load)."""

    def __init__(self, quant, name: str, dtype: torch.dtype):
        self.quant, self.name, self.dtype = quant, name, dtype

    def __getitem__(self, index):
        t = self.quant.get(self.name)
        return (t.to(self.dtype) if t.is_floating_point() else t)[index]


def _dequantized_state(quant, dtype: torch.dtype) -> dict[str, _Dequantized]:
    return {name: _Dequantized(quant, name, dtype) for name in quant.names()}


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_max_memory(spec: str | float | dict | None, device: str = "cpu") -> dict[int | str, int] | None:
    """``--max-memory``: a number of GB for ``device`` (``2``, ``2.5GB``) or ``DEVICE=SIZE`` pairs
    (``0=20GiB,cpu=60GiB``), as accelerate's ``max_memory`` (GPU indices as integers)."""
    if spec is None or isinstance(spec, dict):
        return spec
    text = str(spec).strip()
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    out: dict[int | str, int] = {}
    for pair in pairs:
        key, _, size = pair.rpartition("=")
        key = key.strip() or (device.split(":")[-1] if device.startswith("cuda") else device)
        size = size.strip()
        number = size.rstrip("GgIiBb")
        try:
            gb = float(number)
        except ValueError:
            raise UsageError(f"--max-memory {text!r}: {size!r} is not a size; give GB (2 or 2.5GB) or DEVICE=SIZE "
                             "pairs (0=20GiB,cpu=60GiB)") from None
        if gb <= 0:
            raise UsageError(f"--max-memory {text!r}: sizes must be positive")
        out[int(key) if key.isdigit() else key] = int(gb * 2**30)  # bytes
    if not out:
        raise UsageError("--max-memory is empty; give GB (2) or DEVICE=SIZE pairs (0=20GiB,cpu=60GiB)")
    return out


def parse_device_map(spec: str | dict | None) -> str | dict[str, Any] | None:
    """``--device-map``: auto, balanced, balanced_low_0, sequential, or a JSON file mapping module names to a device
    (an index, ``cpu`` or ``disk``), as transformers' ``device_map`` takes it."""
    if spec is None or isinstance(spec, dict) or spec in DEVICE_MAPS:
        return spec
    path = user_path(spec)
    if not path.is_file():
        raise UsageError(f"--device-map {spec}: not one of {', '.join(DEVICE_MAPS)} and no such file; give a JSON "
                         'file mapping module names to devices, e.g. {"model.layers.0": 0, "model.layers.1": "disk"}')
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--device-map {spec} is not readable JSON ({e})") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, (int, str)) and
                                                not isinstance(v, bool) for k, v in mapping.items()):
        raise UsageError(f"--device-map {spec} must be a JSON object of module name -> device (an index, a device "
                         'name, "cpu" or "disk")')
    return mapping


def _resident_routers(model: torch.nn.Module, adapter: MoEAdapter) -> None:
    """Routers that accelerate offloaded (their weights on meta, brought in per forward) are made resident on their
    execution device: they are tiny, and fingerprints, masking and recording read them outside their forward."""
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    for layer in adapter.layers(model):
        router = layer.router
        hook = getattr(router, "_hf_hook", None)
        if hook is None or not getattr(hook, "offload", False):
            continue
        device, stored = hook.execution_device, hook.weights_map
        remove_hook_from_module(router)
        for name, t in [*router.named_parameters(recurse=False), *router.named_buffers(recurse=False)]:
            if t.device.type == "meta":
                set_module_tensor_to_device(router, name, device, value=stored[name])


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``) after work whose transient buffers
    (a loader's copies, a stage's logits and hidden states) leave the heap's high-water mark behind; a no-op where the
    C library is not glibc."""
    global _trim
    if _trim is None:
        try:
            _trim = ctypes.CDLL(None).malloc_trim
        except (AttributeError, OSError):
            _trim = False
    if _trim:
        _trim(0)


_trim: Callable | bool | None = None


def load_model(name: str | None = None, *, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False, device_map: str | dict | None = None,
               max_memory: str | float | dict | None = None) -> LoadedModel:
    """Load a supported MoE causal LM in eval mode, its tokenizer and its adapter (unsupported models fail before
    any weight is read).

    ``device_map`` / ``max_memory`` (see :func:`parse_device_map`, :func:`parse_max_memory`) place the model through
    accelerate's big-model dispatch, as transformers' ``from_pretrained`` does: layers spread over devices, the CPU
    and a temporary offload folder on disk (removed with the model); ``device`` is then only the default device of
    a plain ``max_memory`` number."""
    device_map = parse_device_map(device_map)
    memory = parse_max_memory(max_memory, device)
    placement: dict[str, Any] = {}
    offload = None
    if device_map is not None or memory is not None:
        if importlib.util.find_spec("accelerate") is None:
            raise UsageError("--device-map and --max-memory place the model with accelerate, which is not installed: "
                             "pip install 'evoreap[devices]'")
        offload = tempfile.TemporaryDirectory(prefix="evoreap-offload-")
        placement = {"device_map": device_map or "auto", "offload_folder": offload.name}
        if memory is not None:
            placement["max_memory"] = memory
    from transformers import AutoModelForCausalLM  # lazy: transformers' auto classes take ~1.7 s to import

    path = resolve_model(name)
    trust_remote_code = needs_trust(path, trust_remote_code)
    config = load_config(path, trust_remote_code=trust_remote_code)
    adapter = MoEAdapter(config)
    # before any weight is read: the checkpoint through evoreap's one reader (headers, shards inside the directory,
    # index matching its shards) and a real tokenizer
    index = local_checkpoint(path, context=f"cannot load the weights of {path}")
    quant = _quantized(path, index, config)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    preflight.check_tokenizer(tokenizer, getattr(adapter.config, "vocab_size", None), path)
    cls = model_class(path, config)
    # evoreap's own class: never hand transformers a reason to import code (custom_generate/ included)
    model_trust = trust_remote_code and cls is AutoModelForCausalLM

    def load(**kwargs):
        if quant is not None:  # dequantized here, handed over as a full-precision state dict (see _quantized)
            plain = copy.deepcopy(config)
            plain.quantization_config = None
            target = cls
            if cls is AutoModelForCausalLM:  # from_pretrained(None, ...) needs the concrete class
                from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
                target = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
            return target.from_pretrained(None, config=plain, state_dict=_dequantized_state(quant, parse_dtype(dtype)),
                                       dtype=parse_dtype(dtype), output_loading_info=True, **placement, **kwargs)
        return cls.from_pretrained(path, config=config, dtype=parse_dtype(dtype), output_loading_info=True,
                                   trust_remote_code=model_trust, **placement, **kwargs)

    try:
        try:
            model, info = load()
        except RuntimeError as e:
            if isinstance(e, EvoreapError) or "ignore_mismatched_sizes" not in str(e):
                raise
            model, info = load(ignore_mismatched_sizes=True)  # only to name the mismatched tensors below
    except EvoreapError:
        raise
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvoreapError(f"cannot load the weights of {path}: {first}; check that the safetensors files are "
                           "complete and match config.json") from None
    # transformers only warns about weights that are missing or of another shape and initialises them at random;
    # pruning a half-random model would give meaningless results, so refuse it
    bad = [*sorted(f"{k if isinstance(k, str) else k[0]} (shape differs)" for k in info.get("mismatched_keys") or ()),
           *sorted(f"{k} (missing)" for k in info.get("missing_keys") or ())]
    if bad:
        raise EvoreapError(f"cannot load the weights of {path}: {len(bad)} tensor(s) do not match config.json, e.g. "
                           f"{bad[0]}; check that the safetensors files are complete and match config.json")
    if placement:  # dispatched by accelerate: weights stay where the map put them; the offload folder lives as
        weakref.finalize(model, offload.cleanup)  # long as the model
        model.eval()
        _resident_routers(model, adapter)
        log.info("placed %s with device map %s", path, getattr(model, "hf_device_map", device_map))
        preflight.check_unused(info.get("unexpected_keys") or (), path, adapter.config)
        with torch.no_grad():  # offloaded weights (on meta) are read from the checkpoint, not checked here
            preflight.check_finite([(n, t) for n, t in preflight.weights(model, adapter) if t.device.type != "meta"],
                                   path)
    else:
        model.to(device).eval()
        preflight.check_loaded(model, adapter, info, path)  # no stored tensor left unused, finite weights
    note_loaded(model, path)  # its weights fingerprint hashes these files (cached) while nothing changes in memory
    release_freed_memory()  # the loader's copies in the stored dtype: a 1.58 GB bf16 checkpoint left 5.3 GB, now 3.3
    log.info("loaded %s (%s, %d MoE layers x %d experts, top-%d)", path, adapter.name,
             len(adapter.moe_layer_indices), adapter.num_experts, adapter.top_k)
    return LoadedModel(model, tokenizer, path, adapter)
