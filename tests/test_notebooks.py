"""The course notebooks: run by plain `pytest`, committed without outputs, and their checks work.

The notebooks themselves are executed by nbmake (``--nbmake`` in the pytest
options, ``notebooks`` in ``testpaths``) in smoke mode (``notebooks/conftest.py``).
These tests check what executing them cannot: that every notebook is
collected, that none carries outputs, that each follows the course format,
and that every exercise check accepts a right answer and rejects wrong ones.
"""

import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

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
    # this collection (--ignore-glob) only to keep it quick: they do not decide
    # whether notebooks are collected; -n 0 collects in this one process.
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    out = subprocess.run(
        [*command, "-n", "0", "--ignore-glob", "tests/*"],
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
    solutions = [c for c in nb.cells if "solution" in c.metadata.get("tags", [])]
    assert len(solutions) == 1 and "assert course.check_" in solutions[0].source


def test_notebook_conftest_turns_the_smoke_flag_on(monkeypatch):
    monkeypatch.setenv(course.SMOKE_ENV, "0")  # monkeypatch restores the environment after
    assert not course.smoke()
    runpy.run_path(str(ROOT / "notebooks" / "conftest.py"))
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


# --- the exercise checks: each accepts a right answer and rejects wrong ones ----------


def _not_implemented(*args):
    raise NotImplementedError


def _log_c(lam):
    return torch.log(2 * torch.atanh(1 - 2 * lam) / (1 - 2 * lam))


def _optimal_diagonal(weight, bias, sigma, x):
    precision = torch.eye(weight.shape[1], dtype=weight.dtype) + weight.T @ weight / sigma**2
    cov = torch.linalg.inv(precision)
    return (x - bias) @ weight @ cov / sigma**2, 1 / torch.diagonal(precision)


def _posterior_variance(weight, bias, sigma, x):  # the diagonal of the full covariance: wrong
    mean, _ = _optimal_diagonal(weight, bias, sigma, x)
    precision = torch.eye(weight.shape[1], dtype=weight.dtype) + weight.T @ weight / sigma**2
    return mean, torch.diagonal(torch.linalg.inv(precision))


def _mixture(x, weights, means, scales):
    log_n = torch.distributions.Normal(means, scales).log_prob(x[:, None, :]).sum(-1)
    return torch.logsumexp(torch.log(weights) + log_n, dim=-1)


def _mixture_naive(x, weights, means, scales):  # underflows far from the components
    log_n = torch.distributions.Normal(means, scales).log_prob(x[:, None, :]).sum(-1)
    return torch.log((weights * torch.exp(log_n)).sum(-1))


CHECKS = {
    "check_reparameterize": (
        lambda loc, scale, eps: loc + scale * eps,
        [
            lambda loc, scale, eps: loc + eps,  # forgets the scale
            lambda loc, scale, eps: loc + scale**2 * eps,  # variance instead of sd
            lambda loc, scale, eps: (loc + scale * eps).detach(),  # no gradient
            lambda loc, scale, eps: loc.detach() + scale * eps,  # no gradient to loc
            lambda loc, scale, eps: None,
        ],
    ),
    "check_kl_standard_normal": (
        lambda mu, sigma: 0.5 * (mu**2 + sigma**2 - torch.log(sigma**2) - 1),
        [
            lambda mu, sigma: mu**2 + sigma**2 - torch.log(sigma**2) - 1,  # no 1/2
            lambda mu, sigma: 0.5 * (mu**2 + sigma**2 - torch.log(sigma) - 1),  # log sigma
            lambda mu, sigma: 0.5 * (mu**2 + sigma - torch.log(sigma**2) - 1),  # sigma for var
            lambda mu, sigma: (0.5 * (mu**2 + sigma**2 - torch.log(sigma**2) - 1)).sum(),
        ],
    ),
    "check_kl_warmup": (
        lambda beta, w, e: beta if w <= 0 else beta * min(1.0, (e - 1) / w),
        [
            lambda beta, w, e: beta if w <= 0 else beta * min(1.0, e / w),  # off by one
            lambda beta, w, e: beta * min(1.0, (e - 1) / max(w, 1)),  # W = 0 mishandled
            lambda beta, w, e: beta if w <= 0 else min(1.0, (e - 1) / w),  # forgets beta
            lambda beta, w, e: "beta",
        ],
    ),
    "check_continuous_bernoulli_log_normalizer": (
        _log_c,
        [
            lambda lam: torch.zeros_like(lam),  # the Bernoulli "loss" on grey pixels
            lambda lam: 2 * torch.atanh(1 - 2 * lam) / (1 - 2 * lam),  # C, not log C
            lambda lam: torch.log(torch.atanh(1 - 2 * lam) / (1 - 2 * lam)),  # no factor 2
        ],
    ),
    "check_log_mean_exp": (
        lambda log_w: torch.logsumexp(log_w, 0) - math.log(log_w.shape[0]),
        [
            lambda log_w: torch.log(torch.exp(log_w).mean(0)),  # under/overflows
            lambda log_w: log_w.mean(0),  # the ELBO, not log p_hat
            lambda log_w: torch.logsumexp(log_w, 0),  # forgets log K
            lambda log_w: torch.logsumexp(log_w, 1) - math.log(log_w.shape[1]),  # wrong axis
        ],
    ),
    "check_optimal_diagonal": (
        _optimal_diagonal,
        [
            _posterior_variance,  # marginal posterior variances: mean-field is tighter
            lambda w, b, s, x: (_optimal_diagonal(w, b, s, x)[0], torch.ones(w.shape[1])),
            lambda w, b, s, x: ((x - b) @ w / s**2, _optimal_diagonal(w, b, s, x)[1]),
            lambda w, b, s, x: _optimal_diagonal(w, b, s, x)[0],  # not a pair
        ],
    ),
    "check_ppca_noise_variance": (
        lambda eig, k: eig[k:].mean(),
        [
            lambda eig, k: eig.mean(),  # all eigenvalues
            lambda eig, k: eig[k:].sum(),  # a sum, not a mean
            lambda eig, k: eig[k + 1 :].mean(),  # off by one
            lambda eig, k: eig[:k].mean(),  # the kept ones
        ],
    ),
    "check_mixture_log_density": (
        _mixture,
        [
            _mixture_naive,
            lambda x, w, m, s: _mixture(x, torch.full_like(w, 1 / len(w)), m, s),  # no weights
            lambda x, w, m, s: torch.distributions.Normal(m[0], s[0]).log_prob(x).sum(-1),
        ],
    ),
}


def test_every_check_function_is_tested():
    defined = {name for name in dir(course) if name.startswith("check_")}
    assert defined == set(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check_accepts_the_right_answer(name, capsys):
    right, _ = CHECKS[name]
    assert getattr(course, name)(right) is True
    assert capsys.readouterr().out.startswith("correct:")


@pytest.mark.parametrize(
    ("name", "index"), [(name, i) for name, (_, wrong) in CHECKS.items() for i in range(len(wrong))]
)
def test_check_rejects_a_wrong_answer(name, index, capsys):
    _, wrong = CHECKS[name]
    assert getattr(course, name)(wrong[index]) is False
    assert capsys.readouterr().out.startswith("not yet right")


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check_reports_an_unfinished_exercise(name, capsys):
    assert getattr(course, name)(_not_implemented) is False
    assert "not implemented yet" in capsys.readouterr().out
