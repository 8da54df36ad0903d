"""The conv encoder and decoder on images of any size, grayscale or RGB.

Odd sides round down in the encoder and are restored in the decoder; a
28x28 network keeps the exact layers and parameter shapes of earlier
versions, so their checkpoints load.
"""

import pytest
import torch

from pyro_vae import ComponentConfig, ModelConfig
from pyro_vae.build import build_vae
from pyro_vae.errors import ConfigError
from pyro_vae.nets import Conv

SHAPES = [(8, 8), (1, 12, 12), (3, 16, 16), (3, 15, 10), (3, 30, 20), (2, 9, 16)]


def conv_vae(event_shape, channels=(4, 8), likelihood="normal", latent_dim=3):
    conv = ComponentConfig("conv", {"channels": list(channels), "features": 8})
    model = ModelConfig(
        latent_dim=latent_dim,
        likelihood=ComponentConfig(likelihood),
        encoder=conv,
        decoder=conv,
    )
    return build_vae(model, event_shape)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("channels", [(4,), (4, 8)], ids=["one-conv", "two-convs"])
def test_encoder_and_decoder_shapes_for_any_image_size(shape, channels):
    torch.manual_seed(0)
    vae = conv_vae(shape, channels)
    x = torch.randn(2, 5, *shape)
    assert vae.posterior.trunk(x).shape == (2, 5, 8)
    q = vae.posterior(x.flatten(0, 1))
    assert q.batch_shape == (10,) and q.event_shape == (3,)
    z = torch.randn(4, 2, 3)
    p = vae.likelihood(z)
    assert p.batch_shape == (4, 2) and p.event_shape == shape
    assert p.mean.shape == (4, 2, *shape)
    assert torch.isfinite(p.log_prob(torch.randn(4, 2, *shape))).all()


@pytest.mark.parametrize("shape", [(3, 15, 10), (1, 9, 16)], ids=str)
def test_decoder_with_two_parameters_per_element_is_channel_first(shape):
    torch.manual_seed(0)
    decoder = Conv((3,), 2 * shape[0] * shape[1] * shape[2], [4, 8], features=8, out_shape=shape)
    out = decoder(torch.randn(2, 5, 3))
    assert out.shape == (2, 5, 2 * shape[0] * shape[1] * shape[2])
    # the last layer outputs k * C channels at full size: (k, C, H, W) flattened
    last = [m for m in decoder.layers if isinstance(m, torch.nn.ConvTranspose2d)][-1]
    assert last.out_channels == 2 * shape[0]
    z = torch.randn(6, 3)
    torch.testing.assert_close(decoder(z), decoder(z.reshape(2, 3, 3)).reshape(6, -1))


def test_gradients_reach_every_parameter_on_rgb_images():
    torch.manual_seed(0)
    vae = conv_vae((3, 15, 10), likelihood="continuous-bernoulli")
    x = torch.rand(4, 3, 15, 10)
    z = vae.posterior(x).rsample()
    loss = -vae.likelihood(z).log_prob(x).sum()
    loss.backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


#: Parameter shapes of the 28x28-only conv network of earlier versions
#: (channels [32, 64], features 256, D = 16), which their checkpoints hold.
OLD_ENCODER = {
    "layers.0.weight": (32, 1, 4, 4),
    "layers.0.bias": (32,),
    "layers.2.weight": (64, 32, 4, 4),
    "layers.2.bias": (64,),
    "layers.5.weight": (256, 64 * 7 * 7),
    "layers.5.bias": (256,),
}
OLD_DECODER = {
    "layers.0.weight": (256, 16),
    "layers.0.bias": (256,),
    "layers.2.weight": (64 * 7 * 7, 256),
    "layers.2.bias": (64 * 7 * 7,),
    "layers.5.weight": (64, 32, 4, 4),
    "layers.5.bias": (32,),
    "layers.7.weight": (32, 1, 4, 4),
    "layers.7.bias": (1,),
}


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("event_shape", [(28, 28), (1, 28, 28)], ids=str)
def test_28x28_parameter_shapes_are_unchanged(event_shape):
    model = ModelConfig(
        latent_dim=16,
        likelihood=ComponentConfig("bernoulli"),
        encoder=ComponentConfig("conv"),
        decoder=ComponentConfig("conv"),
    )
    vae = build_vae(model, event_shape)
    assert shapes(vae.posterior.trunk) == OLD_ENCODER
    assert shapes(vae.likelihood.network) == OLD_DECODER
    assert vae.likelihood(torch.zeros(2, 16)).event_shape == event_shape


def test_hand_built_decoder_without_out_shape_is_the_28x28_one():
    torch.manual_seed(0)
    old = Conv((16,), 784)
    torch.manual_seed(0)
    new = Conv((16,), 784, out_shape=(28, 28))
    assert shapes(old) == OLD_DECODER
    for (name, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    z = torch.randn(3, 16)
    assert torch.equal(old(z), new(z))


@pytest.mark.parametrize(
    "role, event_shape, expected",
    [
        ("encoder", (784,), "images of shape (H, W) or (C, H, W)"),
        ("decoder", (2, 3, 8, 8), "images of shape (H, W) or (C, H, W)"),
        ("encoder", (3, 3, 8), "sides of at least 4 pixels, but a datum is 3x8"),
        ("decoder", (8, 2), "sides of at least 4 pixels, but a datum is 8x2"),
    ],
)
def test_other_shapes_are_refused_in_one_line(role, event_shape, expected):
    conv = ComponentConfig("conv", {"channels": [4, 8], "features": 8})
    small = ComponentConfig("mlp", {"hidden": [8]})
    nets = {"encoder": small, "decoder": small, role: conv}
    with pytest.raises(ConfigError) as e:
        build_vae(ModelConfig(latent_dim=3, **nets), event_shape)
    assert expected in str(e.value)
    assert "\n" not in str(e.value) and "mlp" in str(e.value)


def test_decoder_output_must_be_a_multiple_of_the_image():
    with pytest.raises(ConfigError, match="a multiple of 300"):
        Conv((3,), 301, out_shape=(3, 10, 10))
    with pytest.raises(ConfigError, match="a multiple of 784"):
        Conv((3,), 100)
