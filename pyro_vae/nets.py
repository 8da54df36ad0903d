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
from typing import Any

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
    #: Whether the builder passes a decoder's datum shape as the keyword ``out_shape``.
    takes_out_shape: bool = False

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


#: The image size of a :class:`Conv` decoder built without ``out_shape`` (hand-built, as in 0.x).
CONV_IMAGE = (28, 28)


def _image_shape(shape: tuple[int, ...], role: str) -> tuple[int, int, int]:
    """A datum shape ``(H, W)`` or ``(C, H, W)`` as ``(C, H, W)``; else a one-line ConfigError."""
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ConfigError(
            f"the conv network {role} images of shape (H, W) or (C, H, W) (e.g. 28x28 "
            f"grayscale, 3x32x32 RGB), but a datum has shape {shape}; use the mlp network "
            "for other data"
        )
    return (1, *shape) if len(shape) == 2 else shape  # type: ignore[return-value]


def _halved_sides(height: int, width: int, convolutions: int) -> list[tuple[int, int]]:
    r"""The image sides after each convolution, ``[(H, W), (\lfloor H/2 \rfloor, ...), ...]``.

    Raises:
        ConfigError: a side would reach 0 (the image is smaller than :math:`2^n`).
    """
    need = 2**convolutions
    if min(height, width) < need:
        raise ConfigError(
            f"the conv network's {convolutions} convolution(s) halve each side, so images "
            f"need sides of at least {need} pixels, but a datum is {height}x{width}; use "
            "larger images (data.image_size), one convolution (channels = [C]) or the mlp network"
        )
    sides = [(height, width)]
    for _ in range(convolutions):
        sides.append((sides[-1][0] // 2, sides[-1][1] // 2))
    return sides


@NETWORKS.register("conv", example={"channels": [4, 8], "features": 16})
class Conv(Network):
    r"""A small convolutional encoder or decoder for images of any size, grayscale or colour.

    Each convolution halves the image side (kernel 4, stride 2, padding 1;
    odd sides round down): with ``channels = [c1, c2]``,
    :math:`28 \to 14 \to 7` or :math:`30 \times 20 \to 15 \times 10 \to 7 \times 5`.
    Every side must be at least :math:`2^n` for ``n = len(channels)``. A
    datum is ``(H, W)`` (one channel) or ``(C, H, W)`` (channels first, as
    torchvision).

    * Encoder (``in_shape`` is ``(H, W)`` or ``(C, H, W)``): convolutions
      with ``channels``, then a linear layer to ``features``; as a trunk
      (``out_features=None``) it ends with that layer's activation, else a last
      linear layer maps to ``out_features``.
    * Decoder (``in_shape == (D,)``): linear layers :math:`D \to` ``features``
      :math:`\to c_n h_n w_n` (the smallest sides), then transposed convolutions
      that double the sides back to ``H x W`` (one more row or column where a
      side was odd) with :math:`k C` output channels, ``k = out_features / (C H W)``
      (``k`` distribution parameters per element), flattened channel-first to
      ``(..., out_features)``, the order in which
      :meth:`pyro_vae.likelihoods.Likelihood.decode` reshapes to ``(k, C, H, W)``.
      The builder passes the datum shape as ``out_shape``; without it (a decoder
      built by hand) the datum is a 28x28 image.

    For 28x28 images the layers and parameter shapes are those of the 28x28-only
    network of earlier versions, so their checkpoints load.

    Shapes: ``(..., *in_shape) -> (..., out_features)``; leading dimensions
    (batch, particles) are flattened into one batch for the convolutions.
    Architecture after the DCGAN-style VAEs of Radford et al. (2016),
    "Unsupervised representation learning with deep convolutional GANs".

    Args:
        in_shape: ``(H, W)`` or ``(C, H, W)`` for an encoder, ``(D,)`` for a decoder.
        out_features: Output width (a multiple of ``C * H * W`` for a decoder),
            or ``None`` for an encoder trunk.
        channels: Channels of the one or two convolutions (encoder order; the
            decoder mirrors them).
        features: Width of the dense layer between convolutions and latent code.
        activation: Name of the activation after every hidden layer.
        out_shape: A decoder's datum shape, ``(H, W)`` or ``(C, H, W)``;
            ``None``: ``(28, 28)``.

    Raises:
        ConfigError: for a datum that is not an image, sides below :math:`2^n`,
            a decoder output that is not a multiple of the datum size, or a
            trunk without a datum shape.

    Example:
        >>> Conv((3, 16, 16), None, channels=[4, 8], features=16)(torch.zeros(5, 3, 16, 16)).shape
        torch.Size([5, 16])
        >>> Conv((2,), 2 * 3 * 30 * 20, out_shape=(3, 30, 20))(torch.zeros(5, 2)).shape
        torch.Size([5, 3600])
    """

    takes_out_shape = True

    def __init__(
        self,
        in_shape: Sequence[int],
        out_features: int | None,
        channels: Sequence[int] = (32, 64),
        features: int = 256,
        activation: str = "relu",
        out_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        channels = [int(c) for c in channels]
        if len(channels) not in (1, 2) or min(channels) < 1:
            raise ConfigError(
                f"conv: channels must be one or two sizes >= 1 (each convolution halves the "
                f"image), got {channels}"
            )
        if features < 1:
            raise ConfigError(f"conv: features must be >= 1, got {features}")
        self.encodes = out_features is None or len(self.in_shape) > 1
        if self.encodes:
            self.image = _image_shape(self.in_shape, "encodes")
            layers = self._encoder_layers(channels, features, activation, out_features)
            self.out_features = features if out_features is None else int(out_features)
        else:
            shape = CONV_IMAGE if out_shape is None else tuple(int(s) for s in out_shape)
            self.image = _image_shape(shape, "decodes")
            size = math.prod(self.image)
            if out_features % size:
                raise ConfigError(
                    f"the conv network decodes {'x'.join(map(str, shape))} images (out_features "
                    f"a multiple of {size}), but the likelihood asks for {out_features} outputs; "
                    "use the mlp network for other datum shapes"
                )
            self.out_features = int(out_features)
            out_channels = out_features // size * self.image[0]
            layers = self._decoder_layers(channels, features, activation, out_channels)
        self.layers = nn.Sequential(*layers)

    def _encoder_layers(
        self, channels: list[int], features: int, activation: str, out_features: int | None
    ) -> list[nn.Module]:
        """Convolutions ``(C, H, W) -> (c_n, h_n, w_n)``, flatten, dense layer(s)."""
        c, height, width = self.image
        h, w = _halved_sides(height, width, len(channels))[-1]
        layers: list[nn.Module] = []
        for a, b in zip([c, *channels[:-1]], channels, strict=True):
            layers += [nn.Conv2d(a, b, 4, stride=2, padding=1), make_activation(activation)]
        layers += [
            nn.Flatten(),
            nn.Linear(channels[-1] * h * w, features),
            make_activation(activation),
        ]
        if out_features is not None:
            layers.append(nn.Linear(features, out_features))
        return layers

    def _decoder_layers(
        self, channels: list[int], features: int, activation: str, out_channels: int
    ) -> list[nn.Module]:
        """Dense layers ``D -> c_n h_n w_n``, then transposed convolutions to ``(kC, H, W)``."""
        _, height, width = self.image
        sides = _halved_sides(height, width, len(channels))[::-1]  # smallest first
        reverse = channels[::-1]
        layers: list[nn.Module] = [
            nn.Linear(self.in_shape[0], features),
            make_activation(activation),
            nn.Linear(features, reverse[0] * sides[0][0] * sides[0][1]),
            make_activation(activation),
            nn.Unflatten(1, (reverse[0], *sides[0])),
        ]
        outs = [*reverse[1:], out_channels]
        for i, (a, b) in enumerate(zip(reverse, outs, strict=True)):
            (h, w), (h2, w2) = sides[i], sides[i + 1]
            extra = (h2 - 2 * h, w2 - 2 * w)  # 1 where the larger side is odd
            layers.append(nn.ConvTranspose2d(a, b, 4, stride=2, padding=1, output_padding=extra))
            if i < len(outs) - 1:
                layers.append(make_activation(activation))
        layers.append(nn.Flatten())
        return layers

    @classmethod
    def from_config(
        cls,
        in_shape: Sequence[int],
        out_features: int | None,
        channels: list[int] = (32, 64),  # type: ignore[assignment]
        features: int = 256,
        activation: str = "relu",
        **context: Any,
    ) -> Conv:
        """Build from a config section (``channels``, ``features``, ``activation``).

        ``context`` holds what the builder knows beside the options: ``out_shape``,
        a decoder's datum shape (see :attr:`Network.takes_out_shape`).
        """
        unknown = sorted(set(context) - {"out_shape"})
        if unknown:
            raise TypeError(f"Conv.from_config got an unexpected keyword argument {unknown[0]!r}")
        return cls(
            in_shape,
            out_features,
            channels=channels,
            features=features,
            activation=activation,
            out_shape=context.get("out_shape"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(..., *in_shape)`` to ``(..., out_features)``."""
        batch = x.shape[: x.dim() - len(self.in_shape)]
        if self.encodes:
            x = x.reshape(-1, *self.image)
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
        """A network ``(..., D) -> (..., out_features)``.

        A network that declares ``takes_out_shape`` is also given the datum
        shape as ``out_shape`` (e.g. the image size a conv decoder outputs).
        """
        entry = NETWORKS.get(self.decoder.name)
        shape = {"out_shape": self.event_shape} if getattr(entry, "takes_out_shape", False) else {}
        return NETWORKS.build(
            self.decoder.name,
            self.decoder.options,
            "model.decoder",
            in_shape=(self.latent_dim,),
            out_features=out_features,
            **shape,
        )
