"""Fingerprints of *all* of a model's weights, for the cache keys of observations and references.

Two kinds, never equal to each other (each digest is domain-separated by its kind):

* **files** -- a model loaded from a local directory and not modified since: sha256 over every safetensors file's
  validated header (:func:`evoreap.checkpoint.reader.read_header`) and the sha256 of its full contents. A multi-GB
  checkpoint is hashed once: each file's content hash is cached under ``<cache root>/fingerprints/`` keyed by its
  real path, size, ``mtime_ns``, ``ctime_ns``, inode and device (any rewrite, ``touch`` or ``cp -p`` over it changes
  one of those), written atomically; an unreadable or inconsistent entry is ignored and recomputed. The layer-by-layer
  observer (``observe --offload``) fingerprints the same files without loading them, so both modes share one key.
* **tensors** -- any other resident model (built in memory, loaded from a hub id, or with a tensor changed after
  loading): sha256 over every parameter and buffer (name, dtype, shape, bytes).

Which applies is decided per call: :func:`note_loaded` (called by :func:`evoreap.models.load_model`) records the
directory, the shard files' stat signatures and every parameter's and buffer's identity and autograd version counter
right after loading; the files kind is used only while all of those are unchanged. Version counters see every
in-place change made through torch (``with torch.no_grad(): w[0] += 1``, ``copy_``, ``fill_``, ``p.data = t``);
writes that bypass autograd's counter (``p.data.add_()``, a numpy view's memory) are not seen, so code that patches
weights that way must fingerprint a fresh module (or call :func:`forget`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from evoreap.checkpoint.reader import CheckpointIndex, read_header
from evoreap.errors import EvoreapError
from evoreap.files import cache_root, sha256_file, sha256_json, write_json_atomic

log = logging.getLogger(__name__)

FILES_VERSION = 1  # layout of the per-file cache entries
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 64 << 20  # bytes per device -> host copy when hashing a tensor that is not on the CPU
MAX_THREADS = 8  # shards hashed at once (beyond this, a local NVMe disk is the limit, not sha256)


# -- files ------------------------------------------------------------------------------------------------------------
def _signature(path: Path) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "inode": st.st_ino, "device": st.st_dev}


def _entry_path(real: str, cache_dir: str | Path | None) -> Path:
    return cache_root(cache_dir) / "fingerprints" / f"{hashlib.sha256(real.encode()).hexdigest()}.json"


def _cached_sha256(entry: Path, signature: dict[str, Any]) -> str | None:
    try:
        data = json.loads(entry.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != FILES_VERSION or data.get("signature") != signature:
        return None
    digest = data.get("sha256")
    return digest if isinstance(digest, str) and _HEX64.fullmatch(digest) else None


def file_sha256(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """sha256 of a file's contents, cached in the cache root while the file's stat signature is unchanged."""
    path = Path(path)
    before = _signature(path)
    entry = _entry_path(before["path"], cache_dir)
    hit = _cached_sha256(entry, before)
    if hit is not None:
        return hit
    digest = sha256_file(path)
    if _signature(path) != before:  # changed while it was read: the digest describes no single version of it
        raise EvoreapError(f"{path} changed while it was being hashed; wait until it is completely written and run "
                           "again")
    try:
        write_json_atomic(entry, {"version": FILES_VERSION, "signature": before, "sha256": digest})
    except OSError as e:  # a read-only cache only costs a re-hash next time
        log.warning("cannot cache the sha256 of %s in %s (%s)", path, entry.parent, e)
    return digest


def _header_digest(path: Path) -> str:
    tensors, meta = read_header(path)
    return sha256_json({"tensors": [[t.name, t.dtype, list(t.shape), t.start, t.end] for t in tensors.values()],
                        "metadata": meta})


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The safetensors shards of a checkpoint directory (their headers are read and validated)."""
    return list(CheckpointIndex(directory).files)


def checkpoint_fingerprint(directory: str | Path, cache_dir: str | Path | None = None) -> str:
    """The files-kind weights fingerprint of a local safetensors checkpoint (see the module docstring). Shards not
    in the cache are hashed in parallel threads (file reads and sha256 release the GIL), at most
    :data:`MAX_THREADS`."""
    paths = checkpoint_files(directory)
    headers = [_header_digest(p) for p in paths]
    workers = min(len(paths), os.cpu_count() or 1, MAX_THREADS)
    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="evoreap-sha256") as pool:
            digests = list(pool.map(lambda p: file_sha256(p, cache_dir), paths))
    else:
        digests = [file_sha256(p, cache_dir) for p in paths]
    files = [{"file": p.name, "header": h, "sha256": d} for p, h, d in zip(paths, headers, digests)]
    return sha256_json({"kind": "safetensors-files", "files": files})


# -- resident tensors --------------------------------------------------------------------------------------------------
def _named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*(("param:" + n, p) for n, p in model.named_parameters()),
            *(("buffer:" + n, b) for n, b in model.named_buffers())]


def _update(h, t: torch.Tensor) -> None:
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return
    if flat.device.type == "cpu":
        h.update(memoryview(flat.contiguous().view(torch.uint8).numpy()))
        return
    step = max(1, _CHUNK // flat.element_size())
    for i in range(0, flat.numel(), step):
        h.update(memoryview(flat[i:i + step].to("cpu").contiguous().view(torch.uint8).numpy()))


def tensors_fingerprint(model: torch.nn.Module) -> str:
    """The tensors-kind weights fingerprint: sha256 over every parameter and buffer (name, dtype, shape, bytes)."""
    h = hashlib.sha256(b"evoreap-resident-tensors-v1;")
    for name, t in _named_tensors(model):
        if t.device.type == "meta":
            raise EvoreapError(f"cannot fingerprint the model: {name[name.index(':') + 1:]} is not loaded (meta "
                               "device); load the model's weights first")
        h.update(f"{name}|{str(t.dtype).replace('torch.', '')}|{tuple(t.shape)};".encode())
        _update(h, t)
    return h.hexdigest()


def versions(model: torch.nn.Module) -> tuple | None:
    """Identity, storage, dtype, shape and autograd version of every parameter and buffer; None when some tensor
    has no version counter (an inference tensor), i.e. changes to it cannot be seen."""
    try:
        return tuple((name, id(t), t.data_ptr(), str(t.dtype), tuple(t.shape), str(t.device), t._version)
                     for name, t in _named_tensors(model))
    except RuntimeError:
        return None


# -- which kind --------------------------------------------------------------------------------------------------------
# model -> (directory, stat signatures of its files, versions right after loading)
_LOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> (versions, digest) of the last weights_fingerprint
_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def note_loaded(model: torch.nn.Module, directory: str | Path) -> None:
    """Record that ``model`` holds exactly the weights of the local checkpoint ``directory`` (call it right after
    loading, once the model is on its device). A directory evoreap cannot read as safetensors is not recorded."""
    if not Path(directory).is_dir():
        return
    now = versions(model)
    if now is None:
        return
    try:
        signatures = [_signature(p) for p in checkpoint_files(directory)]
    except (EvoreapError, OSError):
        return
    _LOADED[model] = (Path(directory), signatures, now)


def forget(model: torch.nn.Module) -> None:
    """Treat ``model`` as modified from now on (its weights fingerprint hashes its resident tensors)."""
    _LOADED.pop(model, None)
    _DIGESTS.pop(model, None)


def offloaded(model: torch.nn.Module) -> bool:
    """Placed by accelerate with weights offloaded (on meta): its hooks replace those tensors on every forward (as
    inference tensors under inference mode, without versions), while the weights, read from the files, stay."""
    return bool(getattr(model, "hf_device_map", None)) and any(p.device.type == "meta" for p in model.parameters())


def weights_fingerprint(model: torch.nn.Module, cache_dir: str | Path | None = None) -> str:
    """The fingerprint of all of ``model``'s weights: the files kind while it is unchanged since :func:`note_loaded`
    and its files are too, else the tensors kind. Cached per model object until a tensor changes."""
    now = versions(model)
    hit = _DIGESTS.get(model)
    if now is not None and hit is not None and hit[0] == now:
        return hit[1]
    digest = None
    loaded = _LOADED.get(model)
    if loaded is not None and ((now is not None and loaded[2] == now) or offloaded(model)):
        directory, signatures, _ = loaded
        try:
            same = [_signature(p) for p in checkpoint_files(directory)] == signatures
        except (EvoreapError, OSError):
            same = False
        if same:
            digest = checkpoint_fingerprint(directory, cache_dir)
        else:
            log.warning("the files of %s changed after the model was loaded; fingerprinting its resident tensors",
                        directory)
    if digest is None:
        digest = tensors_fingerprint(model)
    if now is not None:
        _DIGESTS[model] = (now, digest)
    return digest
