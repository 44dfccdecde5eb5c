"""report.html in a real browser: headless Chromium (Debian's `chromium`, which .ci/run installs)
opens each example's report, runs its script without a console message, shows both graphs and the
site table; a screenshot of each is kept in out/browser/ as a test artifact."""

import os
import re
import shutil
import subprocess

import pytest

import fxopt
from conftest import ROOT, load_example

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "out" / "browser"

if CHROMIUM is None and os.environ.get("CI"):
    pytest.fail("CI has no chromium: .ci/run installs it", pytrace=False)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


def chromium(*args, url):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]
    done = subprocess.run([CHROMIUM, *flags, *args, url], capture_output=True, text=True, timeout=120)
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done, console


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = {}
    for name in ("mlp", "cnn", "transformer"):
        ex = load_example(name)
        result = fxopt.optimize(ex.build_model(), ex.example_inputs(), "kron",
                                calibration=list(ex.calibration_data()), source=name)
        out[name] = result.save(tmp_path_factory.mktemp(name) / "out")
    return out


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_report_loads_without_console_messages_and_shows_graphs_and_table(reports, name):
    page = reports[name] / "report.html"
    text = page.read_text(encoding="utf-8")
    assert not re.search(r'(?:src|href)="(?:https?:)?//', text), "the page must not fetch anything"
    done, console = chromium("--dump-dom", url=page.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    assert console == [], console
    dom = done.stdout
    assert 'data-ready="2 graphs"' in dom  # the page script ran to its end
    assert dom.count('<svg xmlns="http://www.w3.org/2000/svg" class="graph"') + dom.count('class="graph" id=') >= 2
    assert 'id="graph-a"' in dom and 'id="graph-b"' in dom
    rows = re.findall(r'<tr id="site-([^"]+)"', dom)
    assert rows and set(rows) == {s["key"] for s in fxopt.save.load_report(reports[name])["sites"]}
    assert 'href="#site-' in dom  # rewritten sites link to their rows

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"report-{name}.png"
    shot.unlink(missing_ok=True)
    done, console = chromium(f"--screenshot={shot}", "--window-size=1400,1200", url=page.as_uri())
    assert done.returncode == 0 and console == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_diff_page_of_two_saved_results(reports, tmp_path):
    from typer.testing import CliRunner

    from fxopt.console.cli import app

    ex = load_example("cnn")
    other = fxopt.optimize(ex.build_model(), ex.example_inputs(), "separable", time_sites=False).save(tmp_path / "sep")
    result = CliRunner().invoke(app, ["diff", str(reports["cnn"]), str(other), "--out", str(tmp_path / "d.html")])
    assert result.exit_code == 0, result.output
    done, console = chromium("--dump-dom", url=(tmp_path / "d.html").as_uri())
    assert console == [] and 'data-ready="2 graphs"' in done.stdout
    # kron rewrote stage1.0 (KronConv2d); the separable run did not: A shows a rewritten site, B a changed node
    for graph, kind in (("graph-a", "site"), ("graph-b", "changed")):
        tag = re.search(rf'<g[^>]*id="{graph}-stage1_0"[^>]*>', done.stdout).group(0)
        assert f'class="node {kind}"' in tag, tag


def test_clicking_a_site_row_outlines_its_nodes(reports, tmp_path):
    # the page's own script, driven by a row click injected after it: the outlined nodes end up in the DOM
    page = (reports["cnn"] / "report.html").read_text(encoding="utf-8")
    click = "<script>document.querySelector('tr[data-site=\"stage1.0\"]').click();</script></body>"
    (tmp_path / "click.html").write_text(page.replace("</body>", click), encoding="utf-8")
    done, console = chromium("--dump-dom", url=(tmp_path / "click.html").as_uri())
    assert console == []
    assert re.search(r'<g[^>]*class="node site hl"', done.stdout), "no node outlined"
    assert '<tr id="site-stage1.0" data-site="stage1.0" class="hl">' in done.stdout
