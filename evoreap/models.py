"""Loading models and tokenizers: a local directory, a hub id where a hub is reachable, or the bundled demo."""

from __future__ import annotations

import logging
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
    p = Path(name).expanduser()
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


def load_model(name: str | None = None, *, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a supported MoE causal LM in eval mode, its tokenizer and its adapter (unsupported models fail before
    any weight is read)."""
    from transformers import AutoModelForCausalLM  # lazy: transformers' auto classes take ~1.7 s to import

    path = resolve_model(name)
    trust_remote_code = needs_trust(path, trust_remote_code)
    config = load_config(path, trust_remote_code=trust_remote_code)
    adapter = MoEAdapter(config)
    # before any weight is read: the checkpoint through evoreap's one reader (headers, shards inside the directory,
    # index matching its shards) and a real tokenizer
    local_checkpoint(path, context=f"cannot load the weights of {path}")
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    preflight.check_tokenizer(tokenizer, getattr(adapter.config, "vocab_size", None), path)
    cls = model_class(path, config)
    # evoreap's own class: never hand transformers a reason to import code (custom_generate/ included)
    model_trust = trust_remote_code and cls is AutoModelForCausalLM

    def load(**kwargs):
        return cls.from_pretrained(path, config=config, dtype=parse_dtype(dtype), output_loading_info=True,
                                   trust_remote_code=model_trust, **kwargs)

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
    model.to(device).eval()
    preflight.check_loaded(model, adapter, info, path)  # no stored tensor left unused, finite weights
    note_loaded(model, path)  # its weights fingerprint hashes these files (cached) while nothing changes in memory
    log.info("loaded %s (%s, %d MoE layers x %d experts, top-%d)", path, adapter.name,
             len(adapter.moe_layer_indices), adapter.num_experts, adapter.top_k)
    return LoadedModel(model, tokenizer, path, adapter)
