"""The ``evoreap`` command line: one sub-command per module in :mod:`evoreap.commands`.

Usage errors exit 2 and runtime errors exit 1, each with one line that says what was wrong and what to do; ``-v``
adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from evoreap.version import __version__
from evoreap.errors import EvoreapError

# Sub-command modules, in the order `evoreap --help` lists them. Each defines NAME, HELP, EXAMPLE,
# add_arguments(parser) and run(args) -> int.
COMMANDS = ("inspect", "observe", "search", "export", "evaluate", "repair", "reinject", "plot")

EXAMPLE = """examples:
  evoreap inspect                         # the bundled demo MoE
  evoreap search --budget 0.5             # search a 50%-expert allocation for the demo
  evoreap observe --model ./Qwen3-30B-A3B --data demo --tokens 200000
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the examples' line breaks; a help text that states its own default keeps it (no
    second "(default: None)" after "(default: the bundled demo)")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "(default:" in action.help:
            return action.help
        return super()._get_help_string(action)


class _TqdmHandler(logging.StreamHandler):
    """Log through tqdm.write so log lines and progress bars do not overwrite each other."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # never let logging kill the command
            self.handleError(record)


def _available_commands() -> list:
    mods = []
    for name in COMMANDS:
        try:
            mods.append(importlib.import_module(f"evoreap.commands.{name}"))
        except ModuleNotFoundError as e:
            if e.name != f"evoreap.commands.{name}":
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evoreap", formatter_class=HelpFormatter, epilog=EXAMPLE,
        description="Prune the experts of Mixture-of-Experts LLMs; search how many experts each layer keeps.")
    parser.add_argument("--version", action="version", version=f"evoreap {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging; -v also shows tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _available_commands():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP, epilog=f"example:\n  {mod.EXAMPLE}",
                           formatter_class=HelpFormatter)
        p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                       help="more logging; -v also shows tracebacks")
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose >= 2 else logging.INFO
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("evoreap")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # Libraries speak only on errors unless -v (their warnings) or -vv (their info): lm-eval's kwarg warnings,
    # datasets' "Generating train split" bars. evoreap.harness also reads lm_eval's level to decide whether lm-eval
    # may run `git describe` in the user's directory (which prints "fatal: not a git repository" outside one).
    lib_level = logging.ERROR if not verbose else logging.WARNING if verbose == 1 else logging.INFO
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(lib_level)
    _datasets_progress(shown=bool(verbose))
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # our own bars say what is loading
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING if verbose else optuna.logging.ERROR)
    except ImportError:
        pass


NOISY_LOGGERS = ("transformers", "datasets", "optuna", "lm_eval", "lm-eval", "huggingface_hub", "fsspec", "filelock",
                 "urllib3", "accelerate")


def _datasets_progress(shown: bool) -> None:
    """datasets' own bars (``Generating train split``, ``Map``) only with ``-v``; a user's
    HF_DATASETS_DISABLE_PROGRESS_BARS wins (datasets gives it priority). Set through the environment when datasets
    is not imported yet (importing it costs a second on every command that never reads data)."""
    if "HF_DATASETS_DISABLE_PROGRESS_BARS" in os.environ and "datasets" not in sys.modules:
        return
    if "datasets" in sys.modules:
        import datasets

        if datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is None:  # None: the environment did not decide
            (datasets.enable_progress_bars if shown else datasets.disable_progress_bars)()
        return
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "0" if shown else "1"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    configure_logging(args.verbose, args.quiet)
    try:
        return int(args._run(args) or 0)
    except EvoreapError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"evoreap {args.command}: error: {e.cli_message()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"evoreap {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:  # the file system said no (full disk, permissions, a path that vanished): name the path
        if args.verbose:
            traceback.print_exc()
        where = f" ({e.filename})" if e.filename else ""
        print(f"evoreap {args.command}: error: {e.strerror or type(e).__name__}{where}; check that path (space, "
              "permissions) and run the command again", file=sys.stderr)
        return 1
    except Exception as e:  # an unexpected failure still gets one line without -v
        if args.verbose:
            traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"evoreap {args.command}: unexpected error: {type(e).__name__}: {first} (re-run with -v for the "
              "traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
