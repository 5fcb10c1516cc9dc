"""``evoreap search``: find per-layer expert keep counts under one global budget."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import types
import typing
from typing import Any

from evoreap.commands.common import device_type, dtype_type
from evoreap.pipeline.config import SearchConfig
from evoreap.pipeline.session import SearchResult, local_worker_storage, run_search

NAME = "search"
HELP = "search per-layer expert counts under a global parameter budget (evolutionary, on Optuna)"
EXAMPLE = "evoreap search --budget 0.5 --proxy kl --criterion reap --run demo-half --export pruned/"

log = logging.getLogger("evoreap.search")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


# How a value is read from the command line, by field type; device and dtype are checked as they are read.
_PARSERS = {int: int, float: _number, str: str, tuple[int, ...]: _ints}
_FIELD_PARSERS = {"device": device_type, "dtype": dtype_type}
_GROUPS = {"budget": "budget (give one)"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One option per :class:`SearchConfig` field: its help, default and group come from the field, so nothing is
    stated twice. Defaults are left out of the namespace (SUPPRESS) so that ``--config FILE`` can tell the options
    that were given, which override the file, from those that were not."""
    hints = typing.get_type_hints(SearchConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(SearchConfig):
        meta = f.metadata
        if not meta["cli"]:
            continue
        group = groups.get(meta["group"]) or groups.setdefault(
            meta["group"], p.add_argument_group(_GROUPS.get(meta["group"], meta["group"])))
        default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f"{meta['help']} (default: {default})"}
        base = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name]) \
            if isinstance(hints[f.name], types.UnionType) else hints[f.name]
        if base is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = _FIELD_PARSERS.get(f.name, _PARSERS[base])
            kwargs["metavar"] = meta["metavar"] or f.name.upper()
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="replay a run: its config.json (or the run directory), or a JSON/YAML file of settings; "
                        "options given here override the file")


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    """The run's settings: ``--config FILE`` (if given) with every option given on the command line on top."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SearchConfig)
             if f.metadata["cli"] and hasattr(args, f.name)}
    base = SearchConfig.load(args.config) if args.config else SearchConfig()
    return base.replace(**given, quiet=bool(getattr(args, "quiet", False)))


def run(args: argparse.Namespace) -> int:
    if getattr(args, "worker", False) and getattr(args, "storage", None) is None:
        args.storage = local_worker_storage()  # from a local leader: not on the command line, where ps shows it
    result = run_search(config_from_args(args))
    if result is None:  # a worker
        return 0
    print_summary(result)
    if result.export is not None:
        print(f"exported the pruned model to {result.export.out}")
    print(f"run directory: {result.run_dir}  (best allocation: {result.run_dir / 'best_allocation.json'})")
    return 0


def print_summary(result: SearchResult) -> None:
    summary, table = result.summary, result.table
    print()
    print("keep counts per MoE layer")
    print("  layer   " + " ".join(f"{layer:>4d}" for layer in result.allocation.layers))
    print("  uniform " + " ".join(f"{k:>4d}" for k in summary["uniform"]))
    print("  best    " + " ".join(f"{k:>4d}" for k in summary["best"]))
    print()
    proxy = result.allocation.meta.get("proxy")
    print(f"search split ({proxy}, lower is better): best {summary['best_value']:.5f}  uniform "
          f"{summary['uniform_value']:.5f}  after {summary['generations']} generations, "
          f"{summary['trials']} trials, {summary['tokens_spent']:,} tokens ({summary['stopped_by']})")
    print()
    print(f"held-out split ({next(iter(table.values()))['tokens']:,} tokens)")
    print(f"  {'model':24s} {'NLL':>8s} {'PPL':>9s} {'KL':>8s} {'ESAP':>7s}")
    for name, row in table.items():
        v = row["values"]
        print(f"  {name:24s} {v['nll']:8.4f} {math.exp(v['nll']):9.2f} {v['kl']:8.4f} {v['esap']:7.4f}")
