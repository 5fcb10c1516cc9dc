"""Loading models and tokenizers: a local directory, a hub id where a hub is reachable, or the bundled demo."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evoreap.adapters import MoEAdapter
from evoreap.errors import EvoreapError, UsageError

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


def own_export_code(path: str | Path) -> bool:
    """True when the directory's only Python file is the modeling code this evoreap version writes into non-uniform
    exports (byte for byte) and config.json's ``auto_map`` points at nothing else, so loading it runs evoreap's own
    code, not the directory's (or a hub repository's: an ``auto_map`` entry may name one)."""
    from evoreap.export.core import MODELING_FILE, REMOTE_CLASS

    p = Path(path)
    code = sorted(p.glob("*.py")) if p.is_dir() else []
    if [c.name for c in code] != [MODELING_FILE]:
        return False
    try:
        from transformers import AutoConfig

        from evoreap.export import render_modeling

        cfg = json.loads((p / "config.json").read_text())
        if cfg.get("auto_map") != {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{REMOTE_CLASS}"}:
            return False
        config = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
        return code[0].read_text() == render_modeling(MoEAdapter(config))
    except Exception:  # anything unexpected: not provably ours
        return False


def needs_trust(path: str | Path, trust_remote_code: bool) -> bool:
    """Whether to pass ``trust_remote_code=True`` to transformers for a local directory; refuses (UsageError) a
    directory that carries custom code (``auto_map`` or ``*.py``) unless the user allowed it or it is our own."""
    p = Path(path)
    if trust_remote_code or not p.is_dir():
        return trust_remote_code
    try:
        custom = "auto_map" in json.loads((p / "config.json").read_text()) or any(p.glob("*.py"))
    except (OSError, ValueError):
        return False
    if not custom:
        return False
    if own_export_code(p):
        return True
    raise UsageError(f"{path} carries custom model code (auto_map or .py files); evoreap does not run code from a "
                     "model directory unless you pass --trust-remote-code (read that code first)")


def load_config(name: str | None, *, trust_remote_code: bool = False):
    from transformers import AutoConfig

    path = resolve_model(name)
    trust_remote_code = needs_trust(path, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UsageError(f"{path} needs custom code to load; evoreap refuses to run code from a model "
                             "directory unless you pass --trust-remote-code (read that code first)") from None
        raise EvoreapError(f"cannot read the config of {path}: {e}") from None
    except OSError as e:
        raise EvoreapError(f"cannot read the config of {path}: {str(e).splitlines()[0]}") from None


def load_tokenizer(name: str | None, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise EvoreapError(f"cannot load the tokenizer of {path}: {str(e).splitlines()[0]}") from None


def load_model(name: str | None = None, *, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a supported MoE causal LM in eval mode, its tokenizer and its adapter (unsupported models fail before
    any weight is read)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    user_trust = trust_remote_code  # the tokenizer runs no code of ours: only the user may allow its auto_map
    trust_remote_code = needs_trust(path, trust_remote_code)
    config = load_config(path, trust_remote_code=trust_remote_code)
    adapter = MoEAdapter(config)
    from safetensors import SafetensorError

    def load(**kwargs):
        return AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype), output_loading_info=True,
                                                    trust_remote_code=trust_remote_code, **kwargs)

    try:
        try:
            model, info = load()
        except RuntimeError as e:
            if "ignore_mismatched_sizes" not in str(e):
                raise
            model, info = load(ignore_mismatched_sizes=True)  # only to name the mismatched tensors below
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
    log.info("loaded %s (%s, %d MoE layers x %d experts, top-%d)", path, adapter.name,
             len(adapter.moe_layer_indices), adapter.num_experts, adapter.top_k)
    return LoadedModel(model, load_tokenizer(path, trust_remote_code=user_trust), path, adapter)
