"""The course notebooks: run by plain `pytest`, committed without outputs, and their checks work.

The notebooks themselves are executed by nbmake (``--nbmake`` in the pytest
options, ``notebooks`` in ``testpaths``) in smoke mode (``notebooks/conftest.py``).
These tests check what executing them cannot: that every notebook is
collected, that none carries outputs, that each follows the course format,
and that every exercise check accepts a right answer and rejects wrong ones.
"""

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from pyro_vae import course

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
COURSE = [
    "01_vae_as_a_pyro_program",
    "02_the_kl_term",
    "03_why_the_kl",
    "04_likelihoods",
    "05_log_likelihood_by_importance_sampling",
    "06_vae_as_variational_em",
    "07_pca_linear_autoencoders_linear_vae",
    "08_swapping_priors_and_guides",
]


def _read(path):
    return nbformat.read(path, as_version=4)


def _code(nb):
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def test_the_course_is_complete():
    assert [p.stem for p in NOTEBOOKS] == COURSE


def test_plain_pytest_collects_every_notebook():
    # The default configuration (no path arguments: testpaths and addopts from
    # pyproject.toml) must collect each notebook. The test modules are left out of
    # this collection (--ignore-glob), and the conftest files are not loaded
    # (--noconftest: tests/conftest.py imports torch), only to keep it quick: neither
    # decides whether notebooks are collected; -n 0 collects in this one process.
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    out = subprocess.run(
        [*command, "-n", "0", "--noconftest", "--ignore-glob", "tests/*"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    collected = set(re.findall(r"^notebooks/([^:/\s]+\.ipynb)::", out.stdout, re.M))
    missing = sorted(p.name for p in NOTEBOOKS if p.name not in collected)
    assert not missing, f"notebooks that plain `pytest` does not run: {missing}\n{out.stdout}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    nb = _read(path)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs: strip them"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_follows_the_course_format(path):
    nb = _read(path)
    code = "\n".join(_code(nb))
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "$" in markdown, "the math goes in Markdown with LaTeX"
    assert "import pyro_vae" in code
    assert "course.smoke()" in code or "course.pick(" in code, "must honour the smoke flag"
    assert not re.search(r"^\s*class\s", code, re.M), "never redefine classes in a notebook"
    checks = set(re.findall(r"course\.(check_\w+)\(", code))
    assert len(checks) == 1, f"one exercise with one check function, found {sorted(checks)}"
    assert hasattr(course, checks.pop())
    # the answer is not in the notebook: no solution cell (they are in tests/test_course.py)
    assert not [c for c in nb.cells if "solution" in c.metadata.get("tags", [])]
    assert "_solution" not in code and "assert course.check_" not in code
    assert "raise NotImplementedError" in nb.cells[-1].source, "the exercise is the last cell"


def test_full_mode_turns_the_smoke_flag_off(monkeypatch):
    monkeypatch.setenv(course.SMOKE_ENV, "1")
    monkeypatch.setenv(course.FULL_ENV, "1")
    runpy.run_path(str(ROOT / "notebooks" / "conftest.py"))["pytest_collection"]()
    assert not course.smoke()


def test_notebook_conftest_turns_the_smoke_flag_on(monkeypatch):
    monkeypatch.setenv(course.SMOKE_ENV, "0")  # monkeypatch restores the environment after
    monkeypatch.delenv(course.FULL_ENV, raising=False)
    assert not course.smoke()
    runpy.run_path(str(ROOT / "notebooks" / "conftest.py"))["pytest_collection"]()
    assert os.environ[course.SMOKE_ENV] == "1"
    assert course.smoke()


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, False), ("", False), ("0", False), ("false", False), ("1", True), ("yes", True)],
)
def test_smoke_flag(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(course.SMOKE_ENV, raising=False)
    else:
        monkeypatch.setenv(course.SMOKE_ENV, value)
    assert course.smoke() is expected
    assert course.pick("full", "smoke") == ("smoke" if expected else "full")
