"""Running the real CLI in-process in bad-input tests: exit code and error lines, never a traceback."""

from pathlib import Path

from evoreap.cli import main


def run_cli(capsys, *argv):
    """(exit code, error lines); argparse errors exit through SystemExit."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    run_cli.last_err = err
    return rc, [line for line in err.strip().splitlines() if ": error: " in line]


def expect(capsys, code, words, *argv):
    """Exit ``code`` with exactly one error line holding every one of ``words`` (case-insensitive), never the
    catch-all "unexpected error"; returns the line."""
    rc, lines = run_cli(capsys, *argv)
    assert rc == code and len(lines) == 1, (rc, run_cli.last_err[-1500:])
    assert "unexpected error" not in run_cli.last_err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


def nothing_in(path: Path) -> bool:
    return not path.exists() or not any(path.rglob("*"))
