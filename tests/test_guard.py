"""The contamination guard refuses overlapping calibration/search/held-out data."""

import json

import pytest

from evoreap.data.guard import check_overlap
from evoreap.errors import UsageError

DEMO_ROLES = {"calibration": ("demo", "calibration"), "search": ("demo", "search"), "heldout": ("demo", "heldout")}


def test_bundled_splits_pass():
    assert check_overlap(DEMO_ROLES) == []


def test_same_split_in_two_roles_is_refused_with_sources_and_fraction():
    with pytest.raises(UsageError, match=r"heldout data 'code' overlaps the search data: \d+ of \d+ documents "
                                         r"\(100.0%\)"):
        check_overlap({"search": ("code", "search"), "heldout": ("code@search", "heldout")})


def test_partial_overlap_in_a_local_file_is_measured(tmp_path):
    from evoreap.data.bundled import load_texts

    held = load_texts("math", "heldout")[:10]
    fresh = [f"note {i}: " + " ".join(f"word{i}x{j}" for j in range(40)) for i in range(30)]
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in held[:3] + fresh))
    n = len(load_texts("math", "heldout"))
    with pytest.raises(UsageError, match=rf"heldout data 'math' overlaps the calibration data: 3 of {n} documents"):
        check_overlap({"calibration": (str(f), "calibration"), "heldout": ("math", "heldout")})


def test_allow_overlap_returns_the_overlaps():
    found = check_overlap({"search": ("tools", "search"), "heldout": ("tools@search", "heldout")}, allow=True)
    assert len(found) == 1 and found[0].fraction == 1.0
