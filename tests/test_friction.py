"""Frictions a new user met: doubled defaults in --help, private files in shareable outputs."""

import os
import stat

import pytest

from evoreap.allocation import Allocation
from evoreap.cli import build_parser
from evoreap.files import write_json_atomic


def _options():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.help and action.option_strings:
                yield f"{name} {action.option_strings[-1]}", formatter._get_help_string(action)


@pytest.mark.parametrize("option,text", list(_options()))
def test_help_states_each_default_once(option, text):
    """`--model` used to read "(default: the bundled demo) (default: None)"."""
    assert text.count("(default:") <= 1, (option, text)


def test_written_files_follow_the_umask(small_model_dir, tmp_path):
    """Observations, allocations and run files are meant to be shared: with a 022 umask they are 0644, not the
    0600 of a bare mkstemp."""
    from evoreap.api import observe

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        Allocation((0,), (4,)).save(tmp_path / "alloc.json")
        obs = observe(str(small_model_dir), "code", tokens=256, seq_len=64, cache_dir=str(tmp_path / "cache"),
                      progress=False)
    finally:
        os.umask(old)
    files = [tmp_path / "a.json", tmp_path / "alloc.json", *sorted(p for p in obs.path.iterdir() if p.is_file())]
    assert len(files) > 3
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
