"""Cost of the weights fingerprint (:mod:`evoreap.fingerprint`) against a plain read of the same bytes, in one run.

    python benchmarks/fingerprint.py [--gb 2.5] [--shard-mb 512] [--resident-gb 1.0] [--workdir DIR] [--keep]

Writes a sharded safetensors checkpoint of about ``--gb`` GB of random bytes (bf16 tensors of 64 MiB, an index file;
streamed, never held in memory) and measures, page cache warm for all of them (the first step reads every byte once):

* ``plain read``: every shard read sequentially in 1 MiB chunks, nothing else done with the bytes;
* ``sha256, one thread``: :func:`evoreap.files.sha256_file` of every shard in turn (the hashing cost alone);
* ``first fingerprint``: :func:`~evoreap.fingerprint.checkpoint_fingerprint` with an empty cache (headers + full
  sha256 of every shard, shards in parallel threads, then the per-file cache entries written);
* ``cached fingerprint``: the same call again (headers + one stat and one small JSON read per shard);
* ``resident tensors``: :func:`~evoreap.fingerprint.tensors_fingerprint` of an in-memory module holding
  ``--resident-gb`` GB of float32 parameters (what a model modified after loading, or one without a directory, costs);
* ``versions()``: the per-call change check of a resident model (2,000 parameters), what makes repeated fingerprint
  calls free.

Prints one markdown table with each time, throughput and its ratio to the plain read. Deletes everything it wrote
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

TENSOR_BYTES = 64 << 20  # one bf16 tensor [8192, 4096]
ROWS, COLS = 8192, 4096


def write_checkpoint(directory: Path, total_gb: float, shard_mb: int) -> int:
    """Shards of random bf16 tensors plus model.safetensors.index.json; returns the bytes written."""
    n_tensors = max(1, round(total_gb * 1e9 / TENSOR_BYTES))
    per_shard = max(1, (shard_mb << 20) // TENSOR_BYTES)
    shards = -(-n_tensors // per_shard)
    weight_map, written, t = {}, 0, 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        names = [f"model.layers.{t + i}.mlp.experts.weight" for i in range(min(per_shard, n_tensors - t))]
        header = {n: {"dtype": "BF16", "shape": [ROWS, COLS], "data_offsets": [i * TENSOR_BYTES,
                                                                            (i + 1) * TENSOR_BYTES]}
                  for i, n in enumerate(names)}
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(directory / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for _ in names:
                f.write(os.urandom(TENSOR_BYTES))
        written += (directory / name).stat().st_size
        weight_map.update({n: name for n in names})
        t += len(names)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return written


def plain_read(files: list[Path]) -> int:
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total = 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.5, help="checkpoint size in GB")
    ap.add_argument("--shard-mb", type=int, default=512)
    ap.add_argument("--resident-gb", type=float, default=1.0, help="size of the in-memory module hashed")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoint (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    import torch

    from evoreap.files import sha256_file
    from evoreap.fingerprint import checkpoint_files, checkpoint_fingerprint, tensors_fingerprint, versions

    work = Path(tempfile.mkdtemp(prefix="evoreap-fp-", dir=args.workdir))
    try:
        ckpt, cache = work / "model", work / "cache"
        ckpt.mkdir()
        t_write, size = timed(write_checkpoint, ckpt, args.gb, args.shard_mb)
        files = checkpoint_files(ckpt)
        plain_read(files)  # warm the page cache: every row below reads from memory, none from the disk
        t_read, n = timed(plain_read, files)
        assert n == size
        t_one, _ = timed(lambda: [sha256_file(p) for p in files])
        t_first, first = timed(checkpoint_fingerprint, ckpt, cache)
        t_cached, again = timed(checkpoint_fingerprint, ckpt, cache)
        assert again == first

        numel = int(args.resident_gb * 1e9) // 4
        module = torch.nn.Module()
        for i in range(16):
            module.register_parameter(f"w{i}", torch.nn.Parameter(torch.rand(numel // 16), requires_grad=False))
        resident = sum(p.numel() * p.element_size() for p in module.parameters())
        t_resident, _ = timed(tensors_fingerprint, module)
        del module
        many = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(1000))  # 2,000 parameters
        reps = 100
        t_versions, _ = timed(lambda: [versions(many) for _ in range(reps)])

        gbps = lambda b, s: b / s / 1e9  # noqa: E731
        print(f"checkpoint: {size / 1e9:.2f} GB in {len(files)} shards (written in {t_write:.1f} s), "
              f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs; page cache warm\n")
        print("| step | time | throughput | vs plain read |")
        print("|---|---|---|---|")
        print(f"| plain read (1 MiB chunks) | {t_read:.2f} s | {gbps(size, t_read):.2f} GB/s | 1.00 |")
        print(f"| sha256 of every shard, one thread | {t_one:.2f} s | {gbps(size, t_one):.2f} GB/s | "
              f"{t_one / t_read:.2f} x the time |")
        print(f"| first fingerprint (headers + sha256, shards in parallel) | {t_first:.2f} s | "
              f"{gbps(size, t_first):.2f} GB/s | {t_first / t_read:.2f} x the time |")
        print(f"| cached fingerprint | {t_cached * 1e3:.1f} ms | - | {t_cached / t_read:.4f} x the time |")
        print(f"| resident tensors, {resident / 1e9:.2f} GB float32 | {t_resident:.2f} s | "
              f"{gbps(resident, t_resident):.2f} GB/s | {gbps(size, t_read) / gbps(resident, t_resident):.2f} x "
              "the time per byte |")
        print(f"| versions() of 2,000 parameters | {t_versions / reps * 1e3:.2f} ms per call | - | - |")
    finally:
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
