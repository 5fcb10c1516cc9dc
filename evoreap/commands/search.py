"""``evoreap search``: find per-layer expert keep counts under one global budget."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from evoreap.commands.common import add_model_arguments, add_runtime_arguments
from evoreap.errors import UsageError

NAME = "search"
HELP = "search per-layer expert counts under a global parameter budget (evolutionary, on Optuna)"
EXAMPLE = "evoreap search --budget 0.5 --proxy kl --criterion reap --run demo-half --export pruned/"

log = logging.getLogger("evoreap.search")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_runtime_arguments(p)
    b = p.add_argument_group("budget (give one)")
    b.add_argument("--budget", type=_fraction, default=None,
                   help="fraction of routed-expert parameters kept, in (0, 1]")
    b.add_argument("--budget-params", type=int, default=None, help="routed-expert parameters kept")
    b.add_argument("--budget-gb", type=_fraction, default=None, help="size of the routed experts after quantisation")
    b.add_argument("--bits", type=_fraction, default=None, help="bits per weight for --budget-gb")
    s = p.add_argument_group("search")
    s.add_argument("--space", default="default", help="search space: a name in search_spaces/ or a YAML path")
    s.add_argument("--criterion", default="reap_x_frequency",
                   help="which experts a layer keeps (evoreap observe --list-criteria); the default ranked best on "
                        "the demo (README)")
    s.add_argument("--min-count", type=int, default=None,
                   help="routed tokens below which an expert's mean score is not trusted (default: the criteria's)")
    s.add_argument("--proxy", default="kl", help="candidate score: kl, esap or nll")
    s.add_argument("--proxy-weights", default=None, help="per-domain weights of the proxy, e.g. code:2,drama:1")
    s.add_argument("--sampler", default="evolution", choices=["evolution", "tpe", "cmaes", "random"],
                   help="evolution (default) or an Optuna sampler over a repaired continuous encoding")
    s.add_argument("--generations", type=int, default=20, help="generations of the evolutionary search")
    s.add_argument("--population", type=int, default=4, help="elites kept per generation")
    s.add_argument("--offspring", type=int, default=12, help="children per generation")
    s.add_argument("--fidelities", type=_ints, default=(4096, 16384, 32768),
                   help="tokens per racing stage (the last is the full fidelity)")
    s.add_argument("--survivors", type=_ints, default=(4, 2), help="candidates passing stage 1 and stage 2")
    s.add_argument("--guided", type=float, default=0.5, help="share of saliency-guided mutations")
    s.add_argument("--trials", type=int, default=None, help="stop after this many scored trials")
    s.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds")
    s.add_argument("--token-budget", type=int, default=None, help="stop after scoring this many tokens")
    d = p.add_argument_group("data")
    d.add_argument("--data", default="demo", help="search data spec (split 'search' for bundled domains)")
    d.add_argument("--calib-data", default="demo", help="calibration data for saliency (split 'calibration')")
    d.add_argument("--calib-tokens", type=int, default=65536, help="calibration tokens")
    d.add_argument("--heldout-data", default="demo", help="final evaluation data (split 'heldout')")
    d.add_argument("--heldout-tokens", type=int, default=32768, help="held-out tokens for the final table")
    d.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence")
    d.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    d.add_argument("--reference-top-k", type=int, default=64, help="top-K log-probs cached for kl/esap")
    d.add_argument("--allow-overlap", action="store_true", help="run even if calibration/search/held-out overlap")
    r = p.add_argument_group("run")
    r.add_argument("--run", default=None, help="run name (default: model, budget and time; an unfinished run "
                                               "with the same settings is resumed)")
    r.add_argument("--runs-dir", default="runs", help="where run directories live")
    r.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///RUN/study.db); "
                                                   "postgresql://... or journal:///path.log for many workers")
    r.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    r.add_argument("--worker", action="store_true",
                   help="only score queued trials of the run named by --run (start on other machines with the "
                        "same --run and --storage)")
    r.add_argument("--cache-dir", default=None, help="observation/reference cache (default $EVOREAP_CACHE or "
                                                     "~/.cache/evoreap)")
    r.add_argument("--export", default=None, help="export the best allocation to this directory")
    r.add_argument("--overwrite", action="store_true", help="let --export replace a non-empty directory")
    r.add_argument("--no-plots", action="store_true", help="skip the pictures and report")


def check_numbers(args: argparse.Namespace) -> None:
    """The plain numeric options (the budget, space, criterion, proxy and evolution settings are checked by
    ``SearchSession.prepare`` against the model's config, the destinations after them: all before any work)."""
    at_least = [("--workers", args.workers, 1), ("--batch-size", args.batch_size, 1), ("--seq-len", args.seq_len, 2),
                ("--calib-tokens", args.calib_tokens, 1), ("--heldout-tokens", args.heldout_tokens, 1),
                ("--reference-top-k", args.reference_top_k, 1), ("--min-count", args.min_count, 0),
                ("--trials", args.trials, 1), ("--token-budget", args.token_budget, 1)]
    for flag, value, low in at_least:
        if value is not None and value < low:
            why = " (a sequence of L tokens scores L-1 next-token predictions)" if flag == "--seq-len" else ""
            raise UsageError(f"{flag} must be at least {low}{why}, got {value}")
    if not 0.0 <= args.guided <= 1.0:  # also refuses nan
        raise UsageError(f"--guided is a share of mutations, in [0, 1]; got {args.guided}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise UsageError(f"--time-limit must be a positive number of seconds, got {args.time_limit}")
    if args.worker and args.run is None:  # else a worker elsewhere would make a run of its own and wait on it
        raise UsageError("--worker needs --run NAME: the run name the leader logs on its set-up line")


def run(args: argparse.Namespace) -> int:
    from evoreap.search.session import SearchSession

    if args.worker and args.storage is None and os.environ.get(LEADER_ENV) == str(os.getppid()):
        args.storage = os.environ.get(STORAGE_ENV)  # from a local leader: not on the command line, where ps shows it
    check_numbers(args)
    if args.worker:
        _exit_with_leader()
    session = SearchSession.prepare(args)  # checks everything else before it creates or loads anything
    if args.worker:
        session.work()
        return 0
    procs = _spawn_workers(args, session) if args.workers > 1 else []
    try:
        session.lead()
    finally:
        _stop_workers(procs)
    return 0


def _stop_workers(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """The study is marked done: workers end on their own within a poll; one still starting up (importing torch
    can take longer than a small search) has no trial and is terminated instead of waited for."""
    deadline = time.time() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()


LEADER_ENV = "EVOREAP_LEADER_PID"
STORAGE_ENV = "EVOREAP_LEADER_STORAGE"  # the storage URL for local workers (it may hold a password)


def _exit_with_leader() -> None:
    """A worker spawned by a local leader (``--workers N``) ends when that leader is gone, even if it was killed
    before it could mark the study done; its unfinished trial is then failed and re-queued by the next leader."""
    import threading

    leader = os.environ.get(LEADER_ENV)
    if not leader or leader != str(os.getppid()):  # started by hand (another machine): runs until the study is done
        return

    def watch() -> None:
        while os.getppid() == int(leader):
            time.sleep(1.0)
        log.warning("the leader (pid %s) is gone; this worker stops", leader)
        os._exit(3)

    threading.Thread(target=watch, name="evoreap-leader-watch", daemon=True).start()


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """The parsed options as command-line words (not ``sys.argv``: ``main([...])`` may be called in-process)."""
    p = argparse.ArgumentParser(add_help=False)
    add_arguments(p)
    argv = ["search"]
    for action in p._actions:
        if not action.option_strings or action.dest in ("workers", "worker", "run", "storage"):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default or value is None:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        else:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return argv


def _spawn_workers(args: argparse.Namespace, session) -> list[subprocess.Popen]:
    argv = _worker_argv(args) + ["--run", session.run.path.name]
    cmd = [sys.executable, "-m", "evoreap.cli", *argv, "--worker", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", LEADER_ENV: str(os.getpid()), STORAGE_ENV: session.storage_url}
    log.info("starting %d worker processes", args.workers - 1)
    procs = []
    for i in range(args.workers - 1):
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                      stderr=open(Path(session.run.path) / f"worker{i + 1}.log", "ab")))
        time.sleep(0.1)
    return procs
