"""The wheel installs everything under `fxopt` (no generic top-level `cli`/`codegen`/`rules`),
ships the rule files, and its `fxopt` command works from another directory."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import EXAMPLES, ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(ROOT)], check=True, capture_output=True)
    (path,) = dist.glob("fxopt-*.whl")
    return path


def test_wheel_holds_only_the_fxopt_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"fxopt", f"{wheel.name.split('-py3')[0]}.dist-info"}
    for required in ("fxopt/console/cli.py", "fxopt/codegen/__init__.py", "fxopt/rulesets/kron.yaml",
                     "fxopt/substitutes/kron.py", "fxopt/passes/substitute.py", "fxopt/codegen/bits_avx512.c"):
        assert required in names
    console = sorted(n for n in names if n.startswith("fxopt/console/"))
    assert console == ["fxopt/console/__init__.py", "fxopt/console/cli.py"]  # nothing else from the root
    entry = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/entry_points.txt").decode()
    assert "fxopt = fxopt.console.cli:main" in entry


def test_installed_command_runs_from_another_directory(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(EXAMPLES / "cnn.py", elsewhere / "model.py")
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy, not this checkout
    where = subprocess.run([sys.executable, "-c", "import fxopt; print(fxopt.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site))
    proc = subprocess.run([str(site / "bin" / "fxopt"), "optimize", "model.py", "--rules", "kron", "--out", "result"],
                          cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (elsewhere / "result" / "model.pt2").is_file()
    proc = subprocess.run([str(site / "bin" / "fxopt"), "rules", "check", "kron"], cwd=elsewhere, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "kron: ok" in proc.stdout
    # torch.compile finds the backend through the installed entry point, with no import of fxopt
    script = ("import sys, torch; from torch import nn\n"
              "m = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.Linear(128, 4)).eval()\n"
              "x = torch.randn(2, 128)\n"
              "with torch.no_grad():\n"
              "    y = torch.compile(m, backend='fxopt', options={'rules': 'kron', 'inner': 'eager'})(x)\n"
              "    assert not torch.equal(y, m(x))\n"
              "print(sys.modules['fxopt'].__file__)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith(str(site))
