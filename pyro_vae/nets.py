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
from .registry import NETWORKS, Describable

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


class Network(Describable, nn.Module):
    """Base class of networks: tensor to tensor, ``(..., *in_shape) -> (..., out_features)``.

    A network is registered in :data:`~pyro_vae.registry.NETWORKS` with a
    ``from_config(in_shape, out_features, **options)``; ``out_features=None``
    asks for an encoder trunk (its width is then the attribute ``out_features``).
    """

    out_features: int

    def as_linear(self) -> nn.Linear | None:
        """The single ``nn.Linear`` this network is, else ``None`` (the linear-Gaussian test)."""
        return None


@NETWORKS.register("mlp")
class MLP(Network):
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
            layers += self._hidden_layer(a, b, activation)
        if out_features is not None:
            layers.append(nn.Linear(widths[-1], out_features))
        self.layers = nn.Sequential(*layers)
        self.out_features = widths[-1] if out_features is None else int(out_features)

    @staticmethod
    def _hidden_layer(a: int, b: int, activation: str) -> list[nn.Module]:
        """One hidden layer ``a -> b``: linear, then the activation."""
        return [nn.Linear(a, b), make_activation(activation)]

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

    def as_linear(self) -> nn.Linear | None:
        """The single ``nn.Linear`` this network is (``hidden = []``), else ``None``."""
        if len(self.layers) == 1 and isinstance(self.layers[0], nn.Linear):
            return self.layers[0]
        return None


class GatedLinear(nn.Module):
    r"""A gated linear unit layer: :math:`h = (W x + b) \odot \sigma(V x + c)`.

    Shapes: ``(..., in_features) -> (..., out_features)``. Dauphin et al. 2017,
    "Language modeling with gated convolutional networks"; the ``GatedDense``
    layer of Tomczak & Welling 2018, "VAE with a VampPrior".
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.value = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(..., in_features)`` to ``(..., out_features)``."""
        return self.value(x) * torch.sigmoid(self.gate(x))


@NETWORKS.register("gated-mlp", example={"hidden": [8, 8]})
class GatedMLP(MLP):
    """An MLP of gated linear units (:class:`GatedLinear`) on flattened inputs.

    Shapes: ``(..., *in_shape) -> (..., out_features)``, as :class:`MLP`. The
    VampPrior paper's encoder and decoder are two layers of 300 gated units
    (Tomczak & Welling 2018); the gate replaces the activation.

    Args:
        in_shape: Shape of one input.
        out_features: Width of a final (plain) linear layer, or ``None`` for a
            trunk that ends with the last gated layer.
        hidden: Hidden layer widths, any depth.
    """

    def __init__(
        self, in_shape: Sequence[int], out_features: int | None, hidden: Sequence[int] = (300, 300)
    ) -> None:
        super().__init__(in_shape, out_features, hidden)

    @staticmethod
    def _hidden_layer(a: int, b: int, activation: str) -> list[nn.Module]:
        """One hidden layer ``a -> b``: a gated linear unit (no activation)."""
        return [GatedLinear(a, b)]

    @classmethod
    def from_config(  # type: ignore[override]
        cls,
        in_shape: Sequence[int],
        out_features: int | None,
        hidden: list[int] = (300, 300),  # type: ignore[assignment]
    ) -> GatedMLP:
        """Build from a config section (``hidden``)."""
        return cls(in_shape, out_features, hidden=hidden)


#: The image size that :class:`Conv` encodes and decodes.
CONV_IMAGE = (28, 28)


@NETWORKS.register("conv", example={"channels": [4, 8], "features": 16})
class Conv(Network):
    r"""A small convolutional encoder or decoder for 28x28 single-channel images.

    Each convolution halves the image side (kernel 4, stride 2, padding 1):
    with ``channels = [c1, c2]``, :math:`28 \to 14 \to 7`.

    * Encoder (``in_shape`` is ``(28, 28)`` or ``(1, 28, 28)``): convolutions
      with ``channels``, then a linear layer to ``features``; as a trunk
      (``out_features=None``) it ends with that layer's activation, else a last
      linear layer maps to ``out_features``.
    * Decoder (``in_shape == (D,)``): linear layers :math:`D \to` ``features``
      :math:`\to c_k \cdot 7 \cdot 7`, then transposed convolutions back to
      :math:`k \times 28 \times 28` with ``k = out_features / 784`` output
      channels (one per distribution parameter per pixel), flattened
      channel-first to ``(..., out_features)``, the order in which
      :meth:`pyro_vae.likelihoods.Likelihood.decode` reshapes.

    Shapes: ``(..., *in_shape) -> (..., out_features)``; leading dimensions
    (batch, particles) are flattened into one batch for the convolutions.
    Architecture after the DCGAN-style VAEs of Radford et al. (2016),
    "Unsupervised representation learning with deep convolutional GANs".

    Args:
        in_shape: ``(28, 28)`` or ``(1, 28, 28)`` for an encoder, ``(D,)`` for a decoder.
        out_features: Output width (a multiple of 784 for a decoder), or
            ``None`` for an encoder trunk.
        channels: Channels of the one or two convolutions (encoder order; the
            decoder mirrors them).
        features: Width of the dense layer between convolutions and latent code.
        activation: Name of the activation after every hidden layer.

    Raises:
        ConfigError: for another image shape, a decoder output that is not
            ``k * 28 * 28``, or a trunk without a datum shape.

    Example:
        >>> Conv((28, 28), None, channels=[4, 8], features=16)(torch.zeros(3, 28, 28)).shape
        torch.Size([3, 16])
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_features: int | None,
        channels: Sequence[int] = (32, 64),
        features: int = 256,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        channels = [int(c) for c in channels]
        if len(channels) not in (1, 2) or min(channels) < 1:
            raise ConfigError(
                f"conv: channels must be one or two sizes >= 1 (each halves the 28x28 image), "
                f"got {channels}"
            )
        if features < 1:
            raise ConfigError(f"conv: features must be >= 1, got {features}")
        side = CONV_IMAGE[0] // 2 ** len(channels)
        self.encodes = out_features is None or len(self.in_shape) > 1
        if self.encodes:
            if self.in_shape not in (CONV_IMAGE, (1, *CONV_IMAGE)):
                raise ConfigError(
                    f"the conv network encodes 28x28 images, but a datum has shape "
                    f"{self.in_shape}; use the mlp network for other shapes"
                )
            layers: list[nn.Module] = []
            for a, b in zip([1, *channels[:-1]], channels, strict=True):
                layers += [nn.Conv2d(a, b, 4, stride=2, padding=1), make_activation(activation)]
            layers += [
                nn.Flatten(),
                nn.Linear(channels[-1] * side * side, features),
                make_activation(activation),
            ]
            if out_features is not None:
                layers.append(nn.Linear(features, out_features))
            self.out_features = features if out_features is None else int(out_features)
        else:
            pixels = math.prod(CONV_IMAGE)
            if out_features is None or out_features % pixels:
                raise ConfigError(
                    f"the conv network decodes 28x28 images (out_features a multiple of "
                    f"{pixels}), but the likelihood asks for {out_features} outputs; use the "
                    "mlp network for other datum shapes"
                )
            self.out_features = int(out_features)
            reverse = channels[::-1]
            layers = [
                nn.Linear(self.in_shape[0], features),
                make_activation(activation),
                nn.Linear(features, reverse[0] * side * side),
                make_activation(activation),
                nn.Unflatten(1, (reverse[0], side, side)),
            ]
            outs = [*reverse[1:], out_features // pixels]
            for i, (a, b) in enumerate(zip(reverse, outs, strict=True)):
                layers.append(nn.ConvTranspose2d(a, b, 4, stride=2, padding=1))
                if i < len(outs) - 1:
                    layers.append(make_activation(activation))
            layers.append(nn.Flatten())
        self.layers = nn.Sequential(*layers)

    @classmethod
    def from_config(
        cls,
        in_shape: Sequence[int],
        out_features: int | None,
        channels: list[int] = (32, 64),  # type: ignore[assignment]
        features: int = 256,
        activation: str = "relu",
    ) -> Conv:
        """Build from a config section (``channels``, ``features``, ``activation``)."""
        return cls(
            in_shape, out_features, channels=channels, features=features, activation=activation
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(..., *in_shape)`` to ``(..., out_features)``."""
        batch = x.shape[: x.dim() - len(self.in_shape)]
        if self.encodes:
            x = x.reshape(-1, 1, *CONV_IMAGE)
        else:
            x = x.reshape(-1, self.in_shape[0])
        return self.layers(x).reshape(*batch, self.out_features)


@dataclass(frozen=True)
class BuildContext:
    """What a guide or likelihood needs to build its networks.

    Args:
        latent_dim: ``D``, the size of z.
        event_shape: The shape of one datum.
        encoder: Network config of the encoder trunk, ``x -> features``.
        decoder: Network config of the decoder, ``z -> parameters``.
        num_data: ``N``, the size of the training set, when known (per-datum guides).
    """

    latent_dim: int
    event_shape: tuple[int, ...]
    encoder: ComponentConfig
    decoder: ComponentConfig
    num_data: int | None = None

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
