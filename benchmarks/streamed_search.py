"""Larger than memory, as a user runs it: a whole ``evoreap search --max-memory 2`` on generated checkpoints.

    nice python benchmarks/streamed_search.py                 # 1.5, 3 and 6 GB, streamed and (where it fits) in memory
    nice python benchmarks/streamed_search.py --sizes 1.5     # one size

For each size a Qwen3-MoE-shaped checkpoint with random bf16 weights is written shard by shard (the same generator
as ``benchmarks/streamed.py``: hidden 1024, 64 experts of width 512, top-8, vocabulary 32,000; the layer count sets
the size), with the demo model's tokenizer copied next to it. Then the command line itself runs in a child process
under ``/usr/bin/time -v`` (peak RSS of the whole process: imports, observation, reference, search, held-out table):

* streamed: ``evoreap search --model CKPT --budget 0.5 --max-memory 2`` (the float32 weights exceed 2 GB, so the
  model is streamed from its shards for everything: observe, reference, every stage, the held-out table);
* in memory, where the float32 model fits ``--resident-max-gb``: the same command without ``--max-memory`` (the
  population engine on the loaded model).

Both run side by side (one thread each), so that they see the same load on a shared machine. A small search keeps
the run short: 1 generation of 4 children after the seeds, fidelities 510/1,020/2,040 tokens, 2,040 calibration and
2,040 held-out tokens. The phases are timed from the command's own log lines (set-up = load + observe + reference;
generation 0 = the seeds at full fidelity; generation 1 = its three racing stages; the held-out table), and each
phase's peak RSS is sampled every 0.25 s with psutil. Both engines must agree on the best allocation and on its
search value (to 1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streamed import checkpoints  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "evoreap" / "demo" / "model"
SEARCH = ["--budget", "0.5", "--generations", "1", "--offspring", "4", "--population", "2", "--survivors", "2,1",
          "--fidelities", "510,1020,2040", "--calib-tokens", "2040", "--heldout-tokens", "2040", "--batch-size", "2",
          "--no-plots", "--run", "bench"]
PHASES = (("set-up", r" set-up: "), ("generation 0", r" generation 0: "), ("generation 1", r" generation 1: best"),
          ("held-out", None))


def run_cli(engine: str, ckpt: Path, work: Path) -> dict:
    """One ``evoreap search`` in a child process; its peak RSS, wall time, phase times and result."""
    runs, cache = work / f"runs-{engine}", work / f"cache-{engine}"
    cmd = ["/usr/bin/time", "-v", sys.executable, str(ROOT / "cli.py"), "search", "--model", str(ckpt), *SEARCH,
           "--runs-dir", str(runs), "--cache-dir", str(cache)]
    if engine == "streamed":
        cmd += ["--max-memory", "2"]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0, started = time.perf_counter(), datetime.now().replace(microsecond=0)
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
        samples = sample_rss(proc)
        wall = time.perf_counter() - t0
        out.seek(0)
        lines = out.read().splitlines()
    if proc.returncode != 0:
        raise SystemExit(f"{engine} search on {ckpt} failed:\n" + "\n".join(lines[-30:]))
    rss_kb = int(next(x.split(":")[1] for x in lines if "Maximum resident set size" in x))
    result = json.loads((runs / "bench" / "result.json").read_text())
    phases = phase_times(lines, started, wall)
    peaks, start = {}, started
    for name, seconds in phases.items():  # the sampled peak of each phase (every 0.25 s: a lower bound)
        end = start + timedelta(seconds=seconds)
        peaks[name] = max((r for t, r in samples if start <= t < end + timedelta(seconds=1)), default=0) / 2**30
        start = end
    return {"rss_gb": rss_kb / 2**20, "wall_s": wall, "phases": phases, "phase_rss_gb": peaks,
            "best": result["best"], "best_value": result["best_value"], "uniform_value": result["uniform_value"],
            "streams": any("layer by layer" in x for x in lines)}


def sample_rss(proc: subprocess.Popen) -> list[tuple[datetime, int]]:
    """RSS of the command (the child of ``/usr/bin/time``) every 0.25 s until it exits."""
    import psutil

    samples = []
    while proc.poll() is None:
        try:
            rss = sum(c.memory_info().rss for c in psutil.Process(proc.pid).children(recursive=True))
            samples.append((datetime.now(), rss))
        except psutil.Error:
            pass
        time.sleep(0.25)
    return samples


def phase_times(lines: list[str], started: datetime, wall: float) -> dict[str, float]:
    """Seconds between the log lines that end each phase (HH:MM:SS stamps; the first phase counts from the start
    of the command, imports included; the held-out table until the command ends)."""
    stamp = re.compile(r"^(\d\d):(\d\d):(\d\d) ")
    stamped = [(datetime.strptime(m.group(0).strip(), "%H:%M:%S"), x) for x in lines if (m := stamp.match(x))]
    out, prev = {}, started.replace(year=1900, month=1, day=1)
    for name, pattern in PHASES:
        if name == "held-out":
            end = prev + timedelta(seconds=round(wall - sum(out.values())))
        else:
            end = next((t for t, x in stamped if re.search(pattern, x)), None)
        if end is None:
            continue
        delta = (end - prev) if end >= prev else (end + timedelta(days=1) - prev)
        out[name] = delta.total_seconds()
        prev = end
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1.5,3,6", help="checkpoint sizes in GB (bf16 on disk)")
    ap.add_argument("--resident-max-gb", type=float, default=14.0,
                    help="also run the in-memory engine where the float32 model is at most this large")
    ap.add_argument("--engines", default="streamed,in memory", help="which to run (in memory only where it fits)")
    ap.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary directory in /tmp)")
    args = ap.parse_args()
    rows = []
    for ckpt, layers, size in checkpoints(args.sizes, args.dir):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(DEMO / name, ckpt / name)
        work = ckpt.with_name(ckpt.name + "-runs")  # run and cache directories, next to the checkpoint
        engines = [e for e in args.engines.split(",")
                   if e == "streamed" or (e == "in memory" and 2 * size / 1e9 <= args.resident_max_gb)]
        with ThreadPoolExecutor(len(engines)) as pool:
            runs = dict(zip(engines, pool.map(lambda e: run_cli(e, ckpt, work), engines)))
        shutil.rmtree(work, ignore_errors=True)
        for e in engines:
            print(f"  {e}: {json.dumps(runs[e])}", flush=True)
        if not runs["streamed"]["streams"]:
            raise SystemExit("the --max-memory 2 run did not stream the model")
        if "in memory" in runs:
            a, b = runs["streamed"], runs["in memory"]
            same, diff = a["best"] == b["best"], abs(a["best_value"] - b["best_value"])
            print(f"  same best allocation: {same}; |best value streamed - in memory| = {diff:.1e}", flush=True)
            if not same or diff > 1e-5:
                raise SystemExit("the streamed and in-memory searches disagree")
        rows.append((size, layers, runs))
    print()
    print("evoreap search --budget 0.5 (1 generation of 4 children, fidelities 510/1,020/2,040 tokens), one thread "
          "each, side by side; seconds per phase, and below them the phase's peak RSS sampled every 0.25 s")
    names = [n for n, _ in PHASES]
    print(f"{'checkpoint':>16s} {'engine':>10s} {'peak RSS':>9s} {'wall':>7s} | "
          + " ".join(f"{n:>12s}" for n in names))
    for size, layers, runs in rows:
        for e, r in runs.items():
            print(f"{size / 1e9:6.2f} GB {layers:3d} L {e:>10s} {r['rss_gb']:6.2f} GB {r['wall_s']:6.0f}s | "
                  + " ".join(f"{r['phases'].get(n, float('nan')):11.0f}s" for n in names))
            print(f"{'':>16s} {'':>10s} {'':>9s} {'':>7s} | "
                  + " ".join(f"{r['phase_rss_gb'].get(n, float('nan')):9.2f} GB" for n in names))
        if "in memory" in runs:
            a, b = runs["streamed"]["phases"], runs["in memory"]["phases"]
            wall = runs["streamed"]["wall_s"] / runs["in memory"]["wall_s"]
            print(f"{'':>16s} {'ratio':>10s} {'':>9s} {wall:6.2f}x | "
                  + " ".join(f"{a[n] / b[n]:11.2f}x" if b.get(n) else f"{'':>12s}" for n in names))


if __name__ == "__main__":
    main()
