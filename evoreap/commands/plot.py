"""``evoreap plot``: (re)draw a search run's pictures and report from the JSON it stored."""

from __future__ import annotations

import argparse

from evoreap.pipeline.report import write_report

NAME = "plot"
HELP = "redraw the pictures and report.md of a search run"
EXAMPLE = "evoreap plot runs/demo-half"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory written by evoreap search")


def run(args: argparse.Namespace) -> int:
    out = write_report(args.run_dir)
    print(f"wrote {out} and its pictures")
    return 0
