"""The README's walk-through (observe a jsonl, evaluate a hand-written allocation, export, load and generate), run
as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_walkthrough_runs_as_written(tmp_path):
    block = re.search(r"<!-- walkthrough[^>]*-->\n```bash\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md has no <!-- walkthrough --> block"
    env = {**os.environ, "EVOREAP_CACHE": str(tmp_path / "cache"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block.group(1)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "criterion reap_x_frequency:" in r.stdout  # --show's header
    assert (tmp_path / "eval" / "evaluation.json").is_file()
    assert (tmp_path / "pruned" / "README.md").read_text().startswith("---\n")
    assert "def scale(values):" in r.stdout  # the prompt and its generation
