"""One small registry for every set of named things evoreap lets users pick or extend (criteria, proxies, samplers,
architectures): names in registration order, a duplicate refused, an unknown name answered with "did you mean".

Each registry module registers its built-ins when it is imported, so a registry is complete as soon as its module
is; a plugin that reuses a taken name gets a :class:`~evoreap.errors.RegistryError` instead of silently replacing
a built-in.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

from evoreap.errors import RegistryError, UsageError

T = TypeVar("T")
_MISSING = object()


class Registry(Generic[T]):
    """Named items of one ``kind`` (e.g. "criterion").

    ``hint`` is appended to the unknown-name message (e.g. where the names are described); ``quote`` shows the
    suggested names as Python strings; ``suggestions``/``cutoff`` tune :func:`difflib.get_close_matches`.
    """

    def __init__(self, kind: str, *, hint: str = "", quote: bool = False, suggestions: int = 3,
                 cutoff: float = 0.6):
        self.kind = kind
        self.hint = hint
        self.quote = quote
        self.suggestions = suggestions
        self.cutoff = cutoff
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Register ``item`` under ``name``; a name already taken raises :class:`RegistryError`."""
        if not isinstance(name, str) or not name:
            raise RegistryError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._items:
            raise RegistryError(f"{self.kind} {name!r} is already registered; register yours under another name")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        """The item registered under ``name``; an unknown name raises :class:`UsageError` with the closest names."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UsageError(self.unknown_message(name)) from None

    def find(self, name: str) -> T | None:
        """The item registered under ``name``, or None."""
        return self._items.get(name)

    def suggest(self, name: str) -> list[str]:
        """The registered names closest to ``name`` (best first)."""
        return difflib.get_close_matches(str(name), list(self._items), n=self.suggestions, cutoff=self.cutoff)

    def unknown_message(self, name: str) -> str:
        show = repr if self.quote else str
        close = self.suggest(name)
        hint = f"did you mean {' or '.join(show(c) for c in close)}? " if close else ""
        known = ", ".join(self._items) or "none"
        return f"unknown {self.kind} {name!r}; {hint}known: {known}{f' ({self.hint})' if self.hint else ''}"

    def pop(self, name: str, default=_MISSING):
        """Unregister ``name`` (for tests and plugins that withdraw an item); its item, or ``default``."""
        if default is _MISSING:
            return self._items.pop(name)
        return self._items.pop(name, default)

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order (built-ins first)."""
        return tuple(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def values(self) -> list[T]:
        return list(self._items.values())

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"
