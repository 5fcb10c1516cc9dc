"""The bundled corpus: four domains, four splits, disjoint by document and by long n-gram."""

import itertools

import pytest

from evoreap.data.overlap import DEFAULT_NGRAM, collection_ngrams, document_hash, ngram_hashes
from evoreap.data.bundled import DOMAINS, SPLITS, load_documents, load_texts
from evoreap.demo import synthetic


@pytest.mark.parametrize("domain", DOMAINS)
def test_splits_share_no_document_and_no_long_ngram(domain):
    texts = {s: load_texts(domain, s) for s in SPLITS}
    for s in SPLITS:
        assert len(texts[s]) >= 30, f"{domain}:{s} is too small"
    hashes = {s: {document_hash(t) for t in texts[s]} for s in SPLITS}
    grams = {s: collection_ngrams(texts[s], DEFAULT_NGRAM) for s in SPLITS}
    for a, b in itertools.combinations(SPLITS, 2):
        assert not hashes[a] & hashes[b], f"{domain}: {a} and {b} share a document"
        assert not grams[a] & grams[b], f"{domain}: {a} and {b} share a {DEFAULT_NGRAM}-word n-gram"


def test_document_ids_are_unique():
    ids = [d["id"] for dom in DOMAINS for s in SPLITS for d in load_documents(dom, s)]
    assert len(ids) == len(set(ids))


def test_synthetic_domains_are_deterministic():
    assert synthetic.tool_transcript(7, 3) == synthetic.tool_transcript(7, 3)
    assert synthetic.math_problem_set(7, 3) != synthetic.math_problem_set(7, 4)


def test_math_answers_are_correct():
    import re

    text = "\n".join(synthetic.math_problem_set(1, i) for i in range(50))
    for lhs, op, rhs, value in re.findall(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)", text):
        a, b = int(lhs), int(rhs)
        assert {"+": a + b, "-": a - b, "*": a * b}[op] == int(value)


def test_ngram_overlap_is_detected():
    a = " ".join(f"w{i}" for i in range(40))
    b = "prefix words " + " ".join(f"w{i}" for i in range(10, 10 + DEFAULT_NGRAM)) + " suffix"
    assert ngram_hashes(a) & ngram_hashes(b)
    assert not ngram_hashes(a) & ngram_hashes("completely different text " * 10)
