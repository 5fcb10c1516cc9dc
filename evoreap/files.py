"""File helpers used everywhere evoreap writes or compares paths: atomic writes, hashing, destination checks.

Every file evoreap writes appears whole or not at all (written under a temporary name beside it, then renamed), with
the permissions the user's umask gives (``mkstemp`` alone would make it private). Destinations are compared with
sources as resolved real paths, so ``model/../model``, a trailing slash or a symlink cannot make a destination
"another directory" when it is the source itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from evoreap.errors import UsageError


def user_path(path: str | Path) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded; a user that does not exist (or no home directory) is a
    :class:`UsageError` naming the path, not pathlib's RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise UsageError(f"{path}: cannot expand its '~' (no such user, or no home directory); write the path out "
                         "in full") from None


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """evoreap's cache directory: ``cache_dir`` if given, else ``$EVOREAP_CACHE``, else ``~/.cache/evoreap``."""
    if cache_dir is not None:
        return user_path(cache_dir)
    env = os.environ.get("EVOREAP_CACHE")
    return user_path(env) if env else Path.home() / ".cache" / "evoreap"


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())  # as shareable(): mkstemp makes it private
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shareable(path: str | Path, directory: bool = False) -> None:
    """Give a file (or directory) that a library or ``mkstemp``/``mkdtemp`` created privately the permissions the
    umask gives: observations, references and exports are meant to be shared."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def real(path: str | Path) -> Path:
    """The absolute path with ``~``, ``..`` and every symlink resolved (also for paths that do not exist yet)."""
    return Path(os.path.realpath(user_path(path)))


def overlaps(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` are the same directory or one lies inside the other, after resolving both."""
    ra, rb = real(a), real(b)
    return ra == rb or ra in rb.parents or rb in ra.parents


def check_destination(dest: str | Path, *, sources: dict[str, str | Path], what: str = "output") -> Path:
    """Refuse a destination that is, contains or lies inside any of ``sources`` (name -> path), compared as real
    paths; returns the destination's real path. A symlink as the destination itself is refused too: writing
    through it would replace whatever it points at."""
    p = user_path(dest)
    if p.is_symlink():
        raise UsageError(f"{what} {dest} is a symlink (to {os.readlink(p)}); pass the real directory path instead")
    for name, src in sources.items():
        if src is not None and overlaps(p, src):
            raise UsageError(f"{what} {dest} resolves to {real(p)}, which is, contains or lies inside the {name} "
                             f"{real(src)}; choose a directory elsewhere")
    return real(p)


def check_writable_dir(path: str | Path, what: str) -> Path:
    """Refuse a directory path that is a file, lies under a file, or whose nearest existing ancestor is not
    writable; creates nothing."""
    p = real(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{what} {path} is a file, not a directory; pass a directory path")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"cannot create {what} {path}: {parent} is a file, not a directory; choose another {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {what} {path}: {parent} is not writable; choose a writable {what}")
    return p
