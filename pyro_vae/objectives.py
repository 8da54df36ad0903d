"""Training objectives: Pyro's own ELBO estimators, chosen by name.

* ``trace`` -- :class:`pyro.infer.Trace_ELBO`: the KL term by Monte Carlo,
  :math:`\\log p(z) - \\log q(z|x)` at the sampled z.
* ``meanfield`` -- :class:`pyro.infer.TraceMeanField_ELBO`: the KL term in
  closed form where registered (e.g. Normal against Normal).

Both estimate the same ELBO; the analytic KL has lower variance.
"""

from __future__ import annotations

from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from .registry import OBJECTIVES


def _particles(num_particles: int) -> dict[str, object]:
    return {
        "num_particles": num_particles,
        "vectorize_particles": num_particles > 1,
        "max_plate_nesting": 1,
    }


@OBJECTIVES.register("trace")
def trace_elbo(num_particles: int = 1) -> ELBO:
    """``Trace_ELBO`` (Monte Carlo KL) with vectorized particles."""
    return Trace_ELBO(**_particles(num_particles))


@OBJECTIVES.register("meanfield")
def mean_field_elbo(num_particles: int = 1) -> ELBO:
    """``TraceMeanField_ELBO`` (analytic KL) with vectorized particles."""
    return TraceMeanField_ELBO(**_particles(num_particles))
