"""scripts/time_notebooks.sh, which measures the README's runtime column, on two tiny notebooks."""

import os
import subprocess
import sys

import nbformat

from tests.conftest import ROOT


def _notebook(path, source):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def _time(*notebooks):
    return subprocess.run(["bash", "scripts/time_notebooks.sh", *map(str, notebooks)], cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=300)


def test_it_prints_each_notebooks_seconds_and_leaves_the_notebook_alone(tmp_path):
    nb = _notebook(tmp_path / "sleepy.ipynb", "import time\ntime.sleep(1.2)\nprint('done')")
    before = nb.read_bytes()
    done = _time(nb)
    assert done.returncode == 0, done.stdout + done.stderr
    name, seconds, unit = done.stdout.split()
    assert (name, unit) == (str(nb), "s") and 1 <= int(seconds) < 120
    assert nb.read_bytes() == before  # executed into a temporary folder, outputs not stored


def test_a_failing_notebook_fails_the_script_and_shows_why(tmp_path):
    nb = _notebook(tmp_path / "broken.ipynb", "raise ValueError('this cell is broken')")
    done = _time(nb)
    assert done.returncode == 1
    assert "FAILED" in done.stdout and "this cell is broken" in done.stdout
