"""Export a trained VAE's encoder mean and decoder as standalone TorchScript modules.

The exported files load with ``torch.jit.load`` alone, in a process that
never imports pyro_vae or Pyro:

* ``encoder.pt``: ``x (B, *event_shape) -> E[z | x] (B, D)``, the mean of
  :math:`q(z|x)` (:meth:`~pyro_vae.model.VAE.encode`);
* ``decoder.pt``: ``z (..., D) -> E[x | z] (..., *event_shape)``, the
  likelihood's mean (:meth:`~pyro_vae.model.VAE.decode`).

Each is traced (``torch.jit.trace``) from a module that runs the underlying
networks and distribution heads with argument validation off, so no
data-dependent validation guard enters the graph; the trace is then checked
against the eager model on fresh inputs.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.distributions import Distribution

from .errors import UserError
from .files import atomic_write_bytes
from .model import VAE

#: Export formats by name (``pyro-vae export --format``).
FORMATS = ("torchscript",)
ENCODER_FILE = "encoder.pt"
DECODER_FILE = "decoder.pt"


@contextmanager
def _no_validation() -> Iterator[None]:
    """Argument validation off (no data-dependent guards in the trace); torch's notes hushed.

    Recent torch marks TorchScript deprecated (``FutureWarning``); the format
    is still what ``torch.jit.load`` reads without pyro_vae, so the warning is
    not passed on to users of ``pyro-vae export``.
    """
    previous = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated")
            yield
    finally:
        Distribution.set_default_validate_args(previous)


class _EncoderMean(nn.Module):
    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.posterior(x).mean


class _DecoderMean(nn.Module):
    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.likelihood(z).mean


def _trace(module: nn.Module, example: torch.Tensor, check: torch.Tensor) -> torch.jit.ScriptModule:
    with _no_validation(), torch.no_grad(), torch.jit.optimized_execution(False):
        traced = torch.jit.trace(module, example, check_trace=False)
        if not torch.allclose(traced(check), module(check), rtol=1e-5, atol=1e-6):
            raise UserError(
                f"the traced {type(module).__name__.strip('_')} does not reproduce the model on "
                "fresh inputs (a data-dependent branch in a component); it cannot be exported"
            )
    return traced


def export(vae: VAE, out_dir: str | os.PathLike[str], fmt: str = "torchscript") -> list[Path]:
    """Write ``encoder.pt`` and ``decoder.pt`` of ``vae`` into ``out_dir``; returns their paths.

    Raises:
        UserError: an unknown format, or a guide whose :math:`q(z|x)` has no
            closed-form mean (a flow: its mean would be a random average).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    if not vae.posterior.is_amortized:
        raise UserError(
            "a per-datum guide (local) has no encoder to export; export an amortized run"
        )
    vae = vae.eval().cpu()
    example = torch.zeros(2, *vae.event_shape)
    check = torch.rand(3, *vae.event_shape)
    with _no_validation(), torch.no_grad():
        try:
            _ = vae.posterior(example).mean
        except NotImplementedError:
            raise UserError(
                f"the guide {type(vae.posterior).__name__} has no closed-form posterior mean; "
                "only the decoder could be exported, and export writes both"
            ) from None
    encoder = _trace(_EncoderMean(vae), example, check)
    z = torch.randn(2, vae.latent_dim)
    decoder = _trace(_DecoderMean(vae), z, torch.randn(4, vae.latent_dim))
    paths = []
    for module, name in ((encoder, ENCODER_FILE), (decoder, DECODER_FILE)):
        buffer = io.BytesIO()
        with _no_validation():
            torch.jit.save(module, buffer)
        path = Path(out_dir) / name
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths
