"""Networks: plain tensor-to-tensor modules, separate from distribution heads.

A network maps inputs of shape ``(..., *in_shape)`` to features of shape
``(..., out_features)``. With ``out_features=None`` it is a *trunk*: it ends
with its last hidden layer and its activation, and reports the width in the
attribute ``out_features``. Distribution heads (in :mod:`pyro_vae.guides` and
:mod:`pyro_vae.likelihoods`) turn those features into distribution
parameters, so changing a Bernoulli decoder into a Normal one never touches
the network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import ComponentConfig
from .errors import ConfigError
from .registry import NETWORKS

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "leaky-relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (one of :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        valid = ", ".join(ACTIVATIONS)
        raise ConfigError(f"unknown activation {name!r}; valid names: {valid}") from None


@NETWORKS.register("mlp")
class MLP(nn.Module):
    """A multilayer perceptron on flattened inputs.

    Shapes: ``(..., *in_shape) -> (..., out_features)``; the trailing
    ``len(in_shape)`` dimensions are flattened first.

    Args:
        in_shape: Shape of one input (e.g. ``(28, 28)`` or ``(D,)``).
        out_features: Width of a final linear layer, or ``None`` for a trunk
            that ends with the last hidden activation.
        hidden: Hidden layer widths.
        activation: Name of the activation after each hidden layer.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_features: int | None,
        hidden: Sequence[int] = (400,),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        if any(int(h) < 1 for h in hidden):
            raise ConfigError(f"hidden layer sizes must be >= 1, got {list(hidden)}")
        if out_features is None and not hidden:
            raise ConfigError("an encoder network needs at least one hidden layer")
        widths = [math.prod(self.in_shape), *(int(h) for h in hidden)]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), make_activation(activation)]
        if out_features is not None:
            layers.append(nn.Linear(widths[-1], out_features))
        self.layers = nn.Sequential(*layers)
        self.out_features = widths[-1] if out_features is None else int(out_features)

    @classmethod
    def from_config(
        cls,
        in_shape: Sequence[int],
        out_features: int | None,
        hidden: list[int] = (400,),  # type: ignore[assignment]
        activation: str = "relu",
    ) -> MLP:
        """Build from a config section (``hidden``, ``activation``)."""
        return cls(in_shape, out_features, hidden=hidden, activation=activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(..., *in_shape)`` to ``(..., out_features)``."""
        return self.layers(x.flatten(-len(self.in_shape)) if len(self.in_shape) > 1 else x)


@dataclass(frozen=True)
class BuildContext:
    """What a guide or likelihood needs to build its networks.

    Args:
        latent_dim: ``D``, the size of z.
        event_shape: The shape of one datum.
        encoder: Network config of the encoder trunk, ``x -> features``.
        decoder: Network config of the decoder, ``z -> parameters``.
    """

    latent_dim: int
    event_shape: tuple[int, ...]
    encoder: ComponentConfig
    decoder: ComponentConfig

    def encoder_network(self) -> nn.Module:
        """A trunk ``(..., *event_shape) -> (..., out_features)``."""
        return NETWORKS.build(
            self.encoder.name,
            self.encoder.options,
            "model.encoder",
            in_shape=self.event_shape,
            out_features=None,
        )

    def decoder_network(self, out_features: int) -> nn.Module:
        """A network ``(..., D) -> (..., out_features)``."""
        return NETWORKS.build(
            self.decoder.name,
            self.decoder.options,
            "model.decoder",
            in_shape=(self.latent_dim,),
            out_features=out_features,
        )
