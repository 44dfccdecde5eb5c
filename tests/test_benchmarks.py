"""BENCHMARKS.md is rendered from the committed result files; the two must agree."""

import subprocess
import sys

from conftest import ROOT


def test_benchmarks_md_is_what_render_makes_of_the_results():
    rendered = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "render.py")], capture_output=True,
                              text=True, check=True).stdout
    assert "## KronLinear against nn.Linear (CPU)" in rendered and "## Whole examples" in rendered
    assert (ROOT / "BENCHMARKS.md").read_text() == rendered
