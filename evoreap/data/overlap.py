"""Document and long n-gram overlap between text collections (the contamination check).

Two collections overlap when they share a document (same normalised text) or a run of ``n`` consecutive words.
Words are whitespace-separated and lower-cased, so the check does not depend on any tokenizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

DEFAULT_NGRAM = 20


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def document_hash(text: str) -> int:
    return _digest(" ".join(text.lower().split()))


def ngram_hashes(text: str, n: int = DEFAULT_NGRAM) -> set[int]:
    """Hashes of every run of ``n`` words; a text shorter than ``n`` words yields its whole text as one n-gram."""
    words = text.lower().split()
    if len(words) < n:
        return {_digest(" ".join(words))} if words else set()
    return {_digest(" ".join(words[i:i + n])) for i in range(len(words) - n + 1)}


def collection_ngrams(texts: Iterable[str], n: int = DEFAULT_NGRAM) -> set[int]:
    out: set[int] = set()
    for t in texts:
        out |= ngram_hashes(t, n)
    return out

