"""Guides q(z | x): the encoder's distribution over the latent code.

Shape contract: ``guide(x)`` for ``x`` of shape ``(B, *event_shape)`` returns
a distribution with ``batch_shape == (B,)`` and ``event_shape == (D,)`` whose
samples are reparameterized (``has_rsample``). ``index`` (the positions of
the minibatch in the training set) is accepted by every guide and used by the
non-amortized ones.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from .nets import BuildContext
from .registry import GUIDES


class Guide(nn.Module):
    """Base class of guides: ``forward(x, index=None) -> q(z | x)``.

    ``kl_weight`` multiplies the latent site's log densities in the ELBO: 1
    for a variational posterior, 0 for a point estimate (the KL term dropped).
    ``amortized`` says whether q depends on x through a network (False for
    per-datum parameters, which need ``index``).
    """

    latent_dim: int
    kl_weight: float = 1.0
    amortized: bool = True

    def forward(
        self, x: torch.Tensor, index: torch.Tensor | None = None
    ) -> dist.TorchDistribution:  # pragma: no cover - abstract
        """The variational posterior for the minibatch ``x``."""
        raise NotImplementedError


@GUIDES.register("mean-field")
class MeanFieldGuide(Guide):
    r"""Amortized diagonal Normal :math:`q(z|x) = \mathcal N(\mu(x), \mathrm{diag}\,\sigma^2(x))`.

    A shared trunk ``h = f(x)`` feeds two linear heads, :math:`\mu(x)` and
    :math:`\log\sigma^2(x)`; z is drawn by the reparameterization
    :math:`z = \mu + \sigma \odot \varepsilon`, :math:`\varepsilon \sim \mathcal N(0, I)`
    (Kingma & Welling 2014, "Auto-Encoding Variational Bayes").

    Args:
        trunk: Network ``(..., *event_shape) -> (..., H)`` with attribute ``out_features``.
        latent_dim: ``D``.
    """

    def __init__(self, trunk: nn.Module, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = int(latent_dim)
        self.trunk = trunk
        self.loc = nn.Linear(trunk.out_features, self.latent_dim)
        self.log_var = nn.Linear(trunk.out_features, self.latent_dim)

    @classmethod
    def from_config(cls, ctx: BuildContext) -> MeanFieldGuide:
        """Build from a config section (no options; the trunk is ``[model.encoder]``)."""
        return cls(ctx.encoder_network(), ctx.latent_dim)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> dist.TorchDistribution:
        """:math:`q(z|x)`, batch shape ``(B,)``, event shape ``(D,)``."""
        h = self.trunk(x)
        return dist.Normal(self.loc(h), torch.exp(0.5 * self.log_var(h))).to_event(1)
