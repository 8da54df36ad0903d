"""Run the course notebooks (collected by nbmake) in smoke mode: small data, few epochs.

nbmake starts each notebook's kernel with this process's environment, so
setting ``PYRO_VAE_SMOKE`` here reaches :func:`pyro_vae.course.smoke` inside
the notebooks. It is set when pytest loads this file, i.e. whenever anything
under ``notebooks/`` is collected.
"""

import os

from pyro_vae.course import SMOKE_ENV

os.environ[SMOKE_ENV] = "1"
