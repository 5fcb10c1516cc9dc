"""Sharded safetensors writer that streams: every output tensor's shape is known from the plan before a byte is
read, so each shard's header is written first and the tensor bytes are then copied straight from the source files.

The contract follows mergekit's ``TensorWriter`` (shards up to ``max_shard_bytes``, HF names
``model-00001-of-0000N.safetensors``, ``model.safetensors.index.json`` with ``metadata.total_size`` and a
``weight_map``, ``{"format": "pt"}`` metadata in every file); the difference is that nothing is buffered in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from evoreap.checkpoint.reader import INDEX_NAME, TensorInfo, copy_ranges, read_tensor
from evoreap.errors import EvoreapError
from evoreap.export.plan import TensorPlan

SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def split_shards(tensors: Sequence[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Consecutive groups of at most ``max_shard_bytes`` (a larger tensor gets a shard to itself)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header(tensors: Sequence[TensorPlan]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)  # pad to 8 bytes so the data that follows is aligned


def transformed_bytes(t: TensorPlan) -> bytes:
    """The planned tensor ``t`` read into memory (its ranges are whole dim-0 rows), passed through ``t.transform``
    and returned as bytes; the transform must keep dtype and shape (the header is already written)."""
    shape = tuple(t.shape)
    row = t.nbytes // shape[0] if shape and shape[0] else t.nbytes
    parts = [read_tensor(TensorInfo(t.name, t.source.file, t.dtype, (n // row, *shape[1:]) if shape else (),
                                    off, off + n)) for off, n in t.ranges]
    tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
    out = t.transform(tensor.reshape(shape))
    if out.dtype != tensor.dtype or tuple(out.shape) != shape:
        raise EvoreapError(f"the edit of {t.name} changed it from {tensor.dtype} {list(shape)} to {out.dtype} "
                           f"{list(out.shape)}; please report this")
    return out.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_shard(path: Path, tensors: Sequence[TensorPlan], progress: tqdm | None = None) -> None:
    """Write one safetensors file: header, then each tensor's source ranges copied in order."""
    header = _header(tensors)
    fds: dict[Path, int] = {}
    try:
        with open(path, "wb") as f:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            f.flush()
            offset = 8 + len(header)
            for t in tensors:
                if t.transform is not None:
                    f.seek(offset)
                    offset += f.write(transformed_bytes(t))
                    f.flush()
                    if progress is not None:
                        progress.update(t.nbytes)
                    continue
                src = t.source.file
                if src not in fds:
                    fds[src] = os.open(src, os.O_RDONLY)
                offset = copy_ranges(fds[src], f.fileno(), list(t.ranges), offset)
                if progress is not None:
                    progress.update(t.nbytes)
            f.truncate(offset)
    finally:
        for fd in fds.values():
            os.close(fd)


def write_checkpoint(out_dir: Path, tensors: Sequence[TensorPlan], *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     progress: bool = True) -> list[str]:
    """Write ``tensors`` as HF-named shards (plus the index when there is more than one); returns the file names."""
    names_seen: set[str] = set()
    for t in tensors:
        if t.name in names_seen:
            raise ValueError(f"tensor {t.name} would be written twice")
        names_seen.add(t.name)
    shards = split_shards(tensors, max_shard_bytes)
    names = shard_names(len(shards))
    total = sum(t.nbytes for t in tensors)
    with tqdm(total=total, unit="B", unit_scale=True, desc="Writing shards", disable=not progress) as bar:
        for name, shard in zip(names, shards):
            write_shard(out_dir / name, shard, bar)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names
