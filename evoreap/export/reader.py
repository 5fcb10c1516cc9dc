"""Shard-aware, lazy reading of a safetensors checkpoint: headers only, then byte ranges on demand.

A safetensors file is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``
and the raw row-major tensor bytes. Rows along dim 0 are therefore contiguous byte ranges, so taking some experts of a
fused ``[E, ...]`` tensor is a list of ranges, and export copies ranges from file to file
(:func:`copy_ranges`) without ever holding a tensor, let alone a shard, in memory.

Why not ``safetensors.safe_open``: it memory-maps the whole shard and its tensors are views into the mapping, so every
byte read stays resident (measured: reading a 1 GB file tensor by tensor peaks at 1.2 GB RSS). Reading ranges with
``pread``/``copy_file_range`` keeps the peak independent of shard and model size.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from evoreap.errors import EvoreapError

INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
_CHUNK = 16 * 1024 * 1024  # bytes per read/write when copy_file_range is unavailable


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie. ``start``/``end`` are absolute offsets in ``file``."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def row_ranges(self, rows: list[int]) -> list[tuple[int, int]]:
        """``(offset, length)`` byte ranges of the given dim-0 rows, consecutive rows merged into one range."""
        if not self.shape or not self.shape[0]:
            raise ValueError(f"{self.name} has no rows to take")
        row = self.nbytes // self.shape[0]
        out: list[tuple[int, int]] = []
        for r in rows:
            if not 0 <= r < self.shape[0]:
                raise ValueError(f"row {r} out of range for {self.name} with {self.shape[0]} rows")
            off = self.start + r * row
            if out and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + row)
            else:
                out.append((off, row))
        return out


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors of one safetensors file (in file order) and its ``__metadata__``; checks the header is sane."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise EvoreapError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise EvoreapError(f"{path} is not a safetensors file or is truncated (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EvoreapError(f"{path} has a corrupt safetensors header ({e})") from None
    base = 8 + n
    meta = header.pop("__metadata__", None) or {}
    tensors = []
    for name, h in header.items():
        try:
            s, e = (int(x) for x in h["data_offsets"])
            info = TensorInfo(name, path, str(h["dtype"]), tuple(int(d) for d in h["shape"]), base + s, base + e)
        except (KeyError, TypeError, ValueError):
            raise EvoreapError(f"{path}: tensor {name!r} has a malformed header entry {h!r}") from None
        if not base <= info.start <= info.end <= size:
            raise EvoreapError(f"{path}: tensor {name!r} lies outside the file; the file is truncated, re-download it")
        tensors.append(info)
    tensors.sort(key=lambda t: t.start)
    return {t.name: t for t in tensors}, meta


class CheckpointIndex:
    """All tensors of a checkpoint directory, from ``model.safetensors.index.json`` or the lone ``*.safetensors``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.files = self._shard_files()
        self.tensors: dict[str, TensorInfo] = {}
        for f in self.files:
            for name, info in read_header(f)[0].items():
                if name in self.tensors:
                    raise EvoreapError(f"tensor {name} appears in both {self.tensors[name].file.name} and {f.name}")
                self.tensors[name] = info

    def _shard_files(self) -> list[Path]:
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise EvoreapError(f"{index} is not a valid safetensors index ({e})") from None
            names = list(dict.fromkeys(weight_map.values()))  # first-seen order
            missing = [n for n in names if not (self.directory / n).is_file()]
            if missing:
                raise EvoreapError(f"{index} names shards that are missing: {', '.join(missing[:3])}; "
                                   "the download is incomplete")
            return sorted((self.directory / n for n in names), key=lambda p: p.name)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            other = sorted(p.name for p in self.directory.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
            hint = (f" (found {', '.join(other[:3])}: evoreap reads no pickle checkpoints; convert them to "
                    "safetensors with save_pretrained first)") if other else ""
            raise EvoreapError(f"{self.directory} has no safetensors weights{hint}")
        if len(files) > 1:
            raise EvoreapError(f"{self.directory} has {len(files)} safetensors files but no {INDEX_NAME}; "
                               "cannot tell which belong to the model")
        return files

    def __iter__(self) -> Iterator[TensorInfo]:
        """Tensors shard by shard in file order, so a pass over them reads each file sequentially."""
        return iter(sorted(self.tensors.values(), key=lambda t: (t.file.name, t.start)))

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_tensor(info: TensorInfo):
    """One (small) tensor read into memory, e.g. a router weight; export itself never calls this."""
    import torch

    name = _TORCH_DTYPES.get(info.dtype)
    if name is None:
        raise EvoreapError(f"{info.name}: cannot read dtype {info.dtype} into a tensor")
    with open(info.file, "rb") as f:
        f.seek(info.start)
        raw = bytearray(f.read(info.nbytes))
    if len(raw) != info.nbytes:
        raise EvoreapError(f"{info.file} is truncated inside {info.name}")
    dtype = getattr(torch, name)
    if not raw:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=dtype).reshape(info.shape)


_USE_COPY_FILE_RANGE = hasattr(os, "copy_file_range")


def copy_ranges(src_fd: int, dst_fd: int, ranges: list[tuple[int, int]], dst_offset: int) -> int:
    """Copy byte ranges ``(offset, length)`` of ``src_fd`` back to back into ``dst_fd`` from ``dst_offset``.

    Uses ``copy_file_range`` (in-kernel, no user-space buffer) and falls back to bounded ``pread``/``pwrite`` chunks
    where the kernel or file system does not support it. Returns the new destination offset.
    """
    global _USE_COPY_FILE_RANGE
    for off, length in ranges:
        done = 0
        while done < length:
            n = 0
            if _USE_COPY_FILE_RANGE:
                try:
                    n = os.copy_file_range(src_fd, dst_fd, length - done, off + done, dst_offset + done)
                except OSError:  # EXDEV, ENOSYS, EINVAL on some file systems: use plain reads from now on
                    _USE_COPY_FILE_RANGE = False
                    continue
            else:
                buf = os.pread(src_fd, min(_CHUNK, length - done), off + done)
                n = os.pwrite(dst_fd, buf, dst_offset + done) if buf else 0
            if n <= 0:
                raise EvoreapError(f"unexpected end of file while copying {length} bytes at offset {off}; "
                                   "the source shard is truncated")
            done += n
        dst_offset += length
    return dst_offset
