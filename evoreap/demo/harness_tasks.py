"""lm-eval-harness tasks over the demo's held-out split, written as ordinary local-data task files.

Each task is a YAML file with ``dataset_path: json`` and absolute ``data_files``, exactly what a user writes for
their own local tasks, so running them proves that path works with no hub. Tasks:

- ``evoreap_demo_math``: multiple choice; the context is a held-out problem with its worked steps, the choices are
  the right answer and other numbers from the same problem (the model must pick the number the steps end on).
- ``evoreap_demo_tools``: multiple choice; the context is a transcript up to the tool name of an assistant call, the
  choices are the four demo tools (the model must pick the tool the user asked for).
- ``evoreap_demo_ppl_<domain>``: rolling log-likelihood of held-out documents (word/byte perplexity, bits per byte).
- ``evoreap_demo``: the group of all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import yaml

from evoreap.data.bundled import DOMAINS, corpus_path, load_texts
from evoreap.files import shareable

VERSION = 1
GROUP = "evoreap_demo"
TOOL_NAMES = ("convert_currency", "create_event", "get_weather", "place_order")
NUMBER = re.compile(r"-?\d+")
PPL_DOCS = 40  # at most this many held-out documents per domain for the perplexity tasks


def math_items(texts: list[str], seed: int = 0) -> list[dict]:
    """One item per worked problem with a numeric answer: the choices are that answer and three other numbers the
    problem shows (problems showing fewer are left out, so chance is always 25 %)."""
    items = []
    for doc in texts:
        for problem in doc.strip().split("\n\n"):
            head, sep, answer = problem.rpartition("\nAnswer: ")
            if not sep or not NUMBER.fullmatch(answer.strip()):
                continue  # "150 remainder 1" and other non-numeric answers are left out
            answer = answer.strip()
            others = sorted({n for n in NUMBER.findall(head) if n != answer}, key=int)
            if len(others) < 3:
                continue
            distractors = random.Random(f"{seed}:{head}").sample(others, 3)
            choices = sorted([answer, *distractors], key=int)
            items.append({"context": head + "\nAnswer:", "choices": choices, "label": choices.index(answer)})
    return items


def tool_items(texts: list[str]) -> list[dict]:
    """One item per assistant tool call: the transcript up to the opening quote of the tool's name."""
    marker = '"function": {"name": "'
    items = []
    for doc in texts:
        start = 0
        while (at := doc.find(marker, start)) >= 0:
            context = doc[:at + len(marker)]
            name = doc[at + len(marker):doc.index('"', at + len(marker))]
            items.append({"context": context, "choices": list(TOOL_NAMES), "label": TOOL_NAMES.index(name)})
            start = at + 1
    return items


def _task(name: str, data: Path, fields: dict) -> dict:
    """An lm-eval task over one local JSONL file (``data``: where the file will lie, absolute)."""
    return {"task": name, "tag": [GROUP], "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", **fields, "metadata": {"version": VERSION}}


def _multiple_choice(delimiter: str) -> dict:
    return {"output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "choices",
            "doc_to_target": "label", "target_delimiter": delimiter,
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")]}


def _rolling() -> dict:
    return {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False} for m, agg in (
                ("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                ("bits_per_byte", "bits_per_byte"))]}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def build_tasks(out: Path, final: Path | None = None) -> None:
    """Write the data files and task YAMLs into ``out``; the YAMLs name the data files as they will lie in ``final``
    (the directory ``out`` is renamed to), since lm-eval reads ``data_files`` relative to the working directory."""
    final = (final or out).resolve()
    heldout = {d: load_texts(d, "heldout") for d in DOMAINS}
    # "Answer: 285" in the corpus, but a tool name follows its opening quote directly
    tasks = {"evoreap_demo_math": (math_items(heldout["math"]), _multiple_choice(" ")),
             "evoreap_demo_tools": (tool_items(heldout["tools"]), _multiple_choice("")),
             **{f"evoreap_demo_ppl_{d}": ([{"text": t} for t in heldout[d][:PPL_DOCS]], _rolling()) for d in DOMAINS}}
    for name, (docs, fields) in tasks.items():
        _write_jsonl(out / f"{name}.jsonl", docs)
        task = _task(name, final / f"{name}.jsonl", fields)
        (out / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


def demo_task_dir(cache_root: Path) -> Path:
    """The demo tasks under ``cache_root``, built once per corpus and task code (temporary name, then rename)."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    for d in DOMAINS:
        h.update(corpus_path(d, "heldout").read_bytes())
    final = cache_root / "lm_eval_tasks" / h.hexdigest()[:16]
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=final.parent))
    shareable(tmp, directory=True)
    try:
        build_tasks(tmp, final)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # another process renamed first: theirs is as good as ours
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
