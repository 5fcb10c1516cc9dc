"""The contamination guard: calibration, search and held-out data must not share documents or long n-grams.

If the data a pruned model was fitted to (saliency calibration, search proxy) overlaps the data it is judged on, the
held-out numbers mean nothing. Before observe, search and evaluate, evoreap compares every pair of roles; on overlap
it stops with a message naming the sources and the overlap fraction, unless ``--allow-overlap`` is given (then the
overlap is logged and recorded in the run).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from evoreap.data.loader import read_documents
from evoreap.data.overlap import DEFAULT_NGRAM, collection_ngrams, document_hash, ngram_hashes
from evoreap.data.spec import DataSource, as_sources
from evoreap.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Overlap:
    """Documents of ``role_b``'s source ``source_b`` that share a document or an n-gram with ``role_a``."""

    role_a: str
    role_b: str
    source_b: str
    documents: int
    overlapping: int

    @property
    def fraction(self) -> float:
        return self.overlapping / self.documents if self.documents else 0.0


def find_overlaps(roles: dict[str, list[DataSource]], tokenizer: Any = None, n: int = DEFAULT_NGRAM
                  ) -> list[Overlap]:
    """Every (earlier role, later role's source) pair with overlapping documents, in the order roles are given.
    Chats are compared as ``role: content`` lines whatever the tokenizer (``tokenizer`` is accepted for callers
    and unused): overlap is in the words, and a chat without a template is refused later, where tokens are made."""
    docs = {role: {s.name: read_documents(s) for s in sources} for role, sources in roles.items()}
    names = list(roles)
    found = []
    for i, a in enumerate(names):
        a_texts = [t for texts in docs[a].values() for t in texts]
        a_docs = {document_hash(t) for t in a_texts}
        a_grams = collection_ngrams(a_texts, n)
        for b in names[i + 1:]:
            for source, texts in docs[b].items():
                hit = sum(1 for t in texts if document_hash(t) in a_docs or not ngram_hashes(t, n).isdisjoint(a_grams))
                if hit:
                    found.append(Overlap(a, b, source, len(texts), hit))
    return found


def check_overlap(specs: dict[str, tuple[str, str]], *, tokenizer: Any = None, allow: bool = False,
                  n: int = DEFAULT_NGRAM) -> list[Overlap]:
    """``specs`` maps a role (calibration, search, heldout) to ``(data spec, default split)``.

    Raises :class:`UsageError` on any overlap unless ``allow``; returns the overlaps found (for the run record).
    """
    roles = {role: as_sources(spec, split) for role, (spec, split) in specs.items()}
    overlaps = find_overlaps(roles, tokenizer, n)
    if overlaps and not allow:
        o = max(overlaps, key=lambda x: x.fraction)
        more = f" (and {len(overlaps) - 1} more pair(s))" if len(overlaps) > 1 else ""
        raise UsageError(f"{o.role_b} data {o.source_b!r} overlaps the {o.role_a} data: {o.overlapping} of "
                         f"{o.documents} documents ({100 * o.fraction:.1f}%) share a document or a {n}-word run"
                         f"{more}; use disjoint data (e.g. the bundled @calibration/@search/@heldout splits) or "
                         "pass --allow-overlap to proceed anyway")
    for o in overlaps:
        log.warning("allowed overlap: %s %s shares %.1f%% of its documents with %s", o.role_b, o.source_b,
                    100 * o.fraction, o.role_a)
    return overlaps
