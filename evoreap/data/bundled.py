"""Read the bundled demo corpus: ``evoreap/demo/data/<domain>/<split>.jsonl.xz`` (built by
``evoreap.demo.build_corpus``): the data behind the ``--data`` names ``code``, ``drama``, ``tools``, ``math``, ``demo``.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

from evoreap.errors import UsageError

DATA_DIR = Path(__file__).parents[1] / "demo" / "data"
DOMAINS = ("code", "drama", "tools", "math")
SPLITS = ("train", "calibration", "search", "heldout")


def corpus_path(domain: str, split: str) -> Path:
    return DATA_DIR / domain / f"{split}.jsonl.xz"


def load_documents(domain: str, split: str) -> list[dict]:
    """Every document of one domain and split as ``{"id": ..., "text": ...}``."""
    if domain not in DOMAINS or split not in SPLITS:
        raise UsageError(f"unknown demo data {domain}:{split}; domains are {', '.join(DOMAINS)}, "
                         f"splits {', '.join(SPLITS)}")
    with lzma.open(corpus_path(domain, split), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_texts(domain: str, split: str) -> list[str]:
    return [d["text"] for d in load_documents(domain, split)]
