"""Options shared by several sub-commands."""

from __future__ import annotations

import argparse


def add_model_arguments(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=None,
                       help="local model directory or hub id (default: the bundled demo MoE)")
    else:
        p.add_argument("--model", default=None, help="local model directory or hub id (default: the bundled demo)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model directory's own Python code to run (read it first)")


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32, bfloat16 or float16")
    p.add_argument("--seed", type=int, default=0, help="seed for data order and any sampling")


def add_data_arguments(p: argparse.ArgumentParser, default_split: str, tokens: int) -> None:
    p.add_argument("--data", default="demo",
                   help=f"data spec: bundled domains (code, drama, tools, math, demo), files (.txt/.jsonl/.parquet) "
                        f"or hf:ID, each as SOURCE[@SPLIT][:WEIGHT]; default split here is {default_split}")
    p.add_argument("--tokens", type=int, default=tokens, help="tokens to use (rounded up to whole sequences)")
    p.add_argument("--samples", type=int, default=None, help="sequences to use (overrides --tokens)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
