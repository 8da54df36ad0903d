"""Run the course notebooks (collected by nbmake) in smoke mode: small data, few epochs.

nbmake starts each notebook's kernel with this process's environment, so
setting ``PYRO_VAE_SMOKE`` here reaches :func:`pyro_vae.course.smoke` inside
the notebooks. It is set when this process collects tests (``pytest_collection``;
this file is loaded whenever anything under ``notebooks/`` is collected), unless
``PYRO_VAE_FULL=1`` asks for the full experiments (``PYRO_VAE_FULL=1 pytest
notebooks``), whose claim checks then run at the sizes the prose describes. An
xdist controller collects nothing, so it does not import :mod:`pyro_vae.course`
(and torch) and starts the workers sooner.
"""

import os

import pytest


def pytest_collection(session: pytest.Session | None = None) -> None:
    """Set the smoke flag (and Agg) in this process's environment, or unset it in full mode."""
    from pyro_vae.course import FULL_ENV, SMOKE_ENV

    if os.environ.get(FULL_ENV, "").strip().lower() in ("", "0", "false", "no"):
        os.environ[SMOKE_ENV] = "1"
        # Smoke runs check the claims, not the pictures: every figure is still built (the
        # plotting code runs, tight_layout included), but Agg skips rendering it to a PNG
        # for the notebook, which costs 0.5-1 s a figure. Full mode renders them inline.
        os.environ.setdefault("MPLBACKEND", "agg")
    else:
        os.environ[SMOKE_ENV] = "0"
