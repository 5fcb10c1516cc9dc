"""Options shared by several sub-commands."""

from __future__ import annotations

import argparse
import dataclasses

import torch

from evoreap.errors import UsageError
from evoreap.pipeline.config import SearchConfig
from evoreap.models import parse_dtype


def add_model_arguments(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=None,
                       help="local model directory or hub id (default: the bundled demo MoE)")
    else:
        p.add_argument("--model", default=None, help="local model directory or hub id (default: the bundled demo)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model directory's own Python code to run (read it first)")


def device_type(text: str) -> str:
    """``--device``: a torch device this machine has (checked when the command line is read, so that a missing GPU
    fails in one line before anything is loaded or created)."""
    try:
        dev = torch.device(text.strip())
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return str(dev)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
                raise argparse.ArgumentTypeError(
                    f"cuda is not available in this torch build (torch {torch.__version__} is CPU-only); "
                    "install a CUDA build of torch (see README) or use --device cpu")
            raise argparse.ArgumentTypeError(
                "cuda is not available (torch sees no GPU: check the driver and CUDA_VISIBLE_DEVICES); "
                "use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: there is no such GPU, torch sees {count} "
                                             f"(cuda:0 to cuda:{count - 1}); pick one of them")
        return str(dev)
    if dev.type in ("mps", "xpu"):
        backend = getattr(torch.backends, "mps", None) if dev.type == "mps" else getattr(torch, "xpu", None)
        if backend is None or not backend.is_available():
            raise argparse.ArgumentTypeError(f"{dev.type} is not available in this torch build or on this "
                                             "machine; use --device cpu")
        return str(dev)
    raise argparse.ArgumentTypeError(f"{text}: evoreap runs on cpu, cuda, cuda:N, mps or xpu, not {dev.type}")


def dtype_type(text: str) -> str:
    """``--dtype``: a dtype name evoreap knows (returned as given)."""
    try:
        parse_dtype(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device_type, default=DEFAULTS.device, help=setting_help("device"))
    p.add_argument("--dtype", type=dtype_type, default=DEFAULTS.dtype, help=setting_help("dtype"))
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help=setting_help("seed"))


def add_placement_arguments(p: argparse.ArgumentParser, max_memory: bool = True) -> None:
    """``--device-map`` (and ``--max-memory``): the model placed over devices, CPU and disk by accelerate."""
    p.add_argument("--device-map", default=None, metavar="MAP", help=setting_help("device_map"))
    if max_memory:
        p.add_argument("--max-memory", default=None, metavar="MEM", help=setting_help("max_memory"))


def add_data_arguments(p: argparse.ArgumentParser, default_split: str, tokens: int) -> None:
    p.add_argument("--data", default=DEFAULTS.data,
                   help=f"data spec: bundled domains (code, drama, tools, math, demo), files (.txt/.jsonl/.parquet) "
                        f"or hf:ID, each as SOURCE[@SPLIT][:WEIGHT]; default split here is {default_split}")
    p.add_argument("--tokens", type=positive_int, default=tokens, help="tokens to use (rounded up to whole sequences)")
    p.add_argument("--samples", type=positive_int, default=None, help="sequences to use (overrides --tokens)")
    p.add_argument("--seq-len", type=seq_len_type, default=DEFAULTS.seq_len, help=setting_help("seq_len"))
    p.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size, help=setting_help("batch_size"))


def add_chat_template_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template", default=None, metavar="FILE", help=setting_help("chat_template"))


_MAX_COUNT = 2**53  # beyond this a count is no longer exact as a float (and is no real token or batch count)


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (token, sample and batch counts), refused in one line otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text[:40]!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    if value > _MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{text[:20]}... is far too large; give at most {_MAX_COUNT}")
    return value


def seq_len_type(text: str) -> int:
    """argparse type for ``--seq-len``: at least 2 tokens (a row of L tokens scores L-1 next-token predictions);
    the model's own limit (max_position_embeddings) is checked once its config is read."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("must be at least 2 tokens (a row of L tokens scores L-1 next-token "
                                         f"predictions), got {value}")
    return value


# The settings every command shares take their defaults and help from SearchConfig: stated once.
DEFAULTS = SearchConfig()


def setting_help(name: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(SearchConfig) if f.name == name)
