"""Export a trained VAE's encoder mean and decoder as standalone TorchScript or ONNX files.

Two files per format, each usable without pyro_vae or Pyro:

* the encoder: ``x (B, *event_shape) -> E[z | x] (B, D)``, the mean of
  :math:`q(z|x)` (:meth:`~pyro_vae.model.VAE.encode`);
* the decoder: ``z (B, D) -> E[x | z] (B, *event_shape)``, the likelihood's
  mean (:meth:`~pyro_vae.model.VAE.decode`; the TorchScript one also takes
  ``(..., D)``).

``torchscript`` writes ``encoder.pt`` and ``decoder.pt``, loaded with
``torch.jit.load`` alone. Each is traced (``torch.jit.trace``) from a module
that runs the underlying networks and distribution heads with argument
validation off, so no data-dependent validation guard enters the graph; the
trace is then checked against the eager model on fresh inputs.

``onnx`` writes ``encoder.onnx`` (input ``x``, output ``z_mean``) and
``decoder.onnx`` (input ``z``, output ``x_mean``), with a dynamic batch
dimension, loaded by any ONNX runtime (no torch needed). The same modules,
side by side, go through one ``torch.export`` and ``torch.onnx.export``,
again with validation off (with it on, the distribution's argument check is
a data-dependent guard that ``torch.export`` refuses) and with the unused
parts of the distributions dropped; the graph is split into the two files.
Each is then run by onnxruntime and checked against the eager model on fresh
inputs. It needs the packages of the ``onnx`` extra (:data:`ONNX_PACKAGES`;
:func:`check_format` says which are missing).
"""

from __future__ import annotations

import copy
import importlib.util
import io
import os
import re
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
FORMATS = ("torchscript", "onnx")
#: The files each format writes: ``(encoder, decoder)``.
FILES = {"torchscript": ("encoder.pt", "decoder.pt"), "onnx": ("encoder.onnx", "decoder.onnx")}
ENCODER_FILE, DECODER_FILE = FILES["torchscript"]
#: Modules the ``onnx`` format imports (the ``onnx`` extra): the graph, the
#: exporter's op library, and the runtime that checks the result.
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
#: How to install them (named in the error when one is missing).
ONNX_INSTALL = 'pip install -e ".[onnx]"'
#: Tolerances of the check of an exported file against the eager model.
_RTOL, _ATOL = 1e-5, 1e-6
#: ONNX: multiple of the model's own float32 rounding error (against float64) also allowed.
_ROUNDING_FACTOR = 8.0
#: ONNX: fresh inputs of the check (many: the rounding error is a maximum over them).
_ONNX_CHECKS = 64


def check_format(fmt: str) -> None:
    """Refuse, before any work, a format that is unknown or whose packages are missing.

    Raises:
        UserError: an unknown format, or ``onnx`` without the packages of the
            ``onnx`` extra (the message says how to install them).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "onnx":
        missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise UserError(
                f"--format onnx needs the onnx extra ({', '.join(missing)} not installed): "
                f"{ONNX_INSTALL}"
            )


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
        if not torch.allclose(traced(check), module(check), rtol=_RTOL, atol=_ATOL):
            raise UserError(
                f"the traced {type(module).__name__.strip('_')} does not reproduce the model on "
                "fresh inputs (a data-dependent branch in a component); it cannot be exported"
            )
    return traced


def _first_line(error: BaseException) -> str:
    """The first line of an exporter's message, without its terminal colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


class _EncoderAndDecoder(nn.Module):
    """Both means side by side: one ``torch.export`` and one ONNX conversion for the two files."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.encoder = _EncoderMean(vae)
        self.decoder = _DecoderMean(vae)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x), self.decoder(z)


def _onnx(
    vae: VAE, examples: tuple[torch.Tensor, torch.Tensor], checks: tuple[torch.Tensor, torch.Tensor]
) -> list[bytes]:
    """The serialized ONNX encoder and decoder of ``vae``, each with a dynamic batch.

    ``torch.export`` captures :class:`_EncoderAndDecoder` at ``examples``
    (``x``, ``z``); operations whose results the outputs do not use are
    dropped before the conversion (a low-rank Normal's mean needs its ``loc``
    only, not the Cholesky factor it builds, which ONNX lacks), and the two
    disjoint graphs are split into a model each (``onnx.utils.Extractor``).
    Each is then run by onnxruntime on fresh inputs (``checks``) and compared
    with its module in float64: to ``rtol``/``atol`` plus a multiple of the
    module's own float32 rounding error there (the continuous Bernoulli mean,
    ill-conditioned near 1/2, is off by about 1e-3 in float32 in torch
    itself), so only a real mismatch is refused.

    Raises:
        UserError: ``torch.export`` or the ONNX conversion fails, or a model
            does not reproduce its module on the checks.
    """
    import onnx
    import onnxruntime

    both = _EncoderAndDecoder(vae).eval()
    batch = ({0: torch.export.Dim("batch_x")}, {0: torch.export.Dim("batch_z")})
    with _no_validation(), torch.no_grad():
        try:
            program = torch.export.export(both, examples, dynamic_shapes=batch)
            program.graph_module.graph.eliminate_dead_code()
            program.graph_module.recompile()
            converted = torch.onnx.export(
                program,
                input_names=["x", "z"],
                output_names=["z_mean", "x_mean"],
                external_data=False,
                verbose=False,
            )
        except Exception as e:  # torch.export and the converter raise many kinds
            raise UserError(f"the model cannot be exported to ONNX: {_first_line(e)}") from e
    files = []
    parts = ((both.encoder, "x", "z_mean"), (both.decoder, "z", "x_mean"))
    for (module, given, wanted), check in zip(parts, checks, strict=True):
        model = onnx.utils.Extractor(converted.model_proto).extract_model([given], [wanted])
        data = model.SerializeToString()
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {given: check.numpy()})
        with _no_validation(), torch.no_grad():
            rounded = module(check).double()
            exact = copy.deepcopy(module).double()(check.double())
        atol = _ATOL + _ROUNDING_FACTOR * float((rounded - exact).abs().max())
        if not torch.allclose(torch.from_numpy(got).double(), exact, rtol=_RTOL, atol=atol):
            what = type(module).__name__.strip("_")
            raise UserError(
                f"the ONNX {what} does not reproduce the model on fresh inputs (a "
                "data-dependent branch in a component); it cannot be exported"
            )
        files.append(data)
    return files


def export(vae: VAE, out_dir: str | os.PathLike[str], fmt: str = "torchscript") -> list[Path]:
    """Write the encoder mean and decoder of ``vae`` into ``out_dir``; returns their paths.

    ``fmt="torchscript"``: ``encoder.pt`` and ``decoder.pt``; ``fmt="onnx"``:
    ``encoder.onnx`` and ``decoder.onnx`` (:data:`FILES`; see the module's
    docstring for their inputs and outputs).

    Args:
        vae: A model with an amortized guide whose :math:`q(z|x)` has a
            closed-form mean.
        out_dir: The folder (created if needed).
        fmt: ``"torchscript"`` or ``"onnx"``.

    Returns:
        ``[encoder path, decoder path]``.

    Raises:
        UserError: an unknown format, ``onnx`` without its packages (checked
            first), a per-datum guide, or a guide whose :math:`q(z|x)` has no
            closed-form mean (a flow: its mean would be a random average).
    """
    check_format(fmt)
    if not vae.posterior.is_amortized:
        raise UserError(
            "a per-datum guide (local) has no encoder to export; export an amortized run"
        )
    vae = vae.eval().cpu()
    example = torch.zeros(2, *vae.event_shape)
    x_checks, z_checks = (3, 4) if fmt == "torchscript" else (_ONNX_CHECKS, _ONNX_CHECKS)
    check = torch.rand(x_checks, *vae.event_shape)
    with _no_validation(), torch.no_grad():
        try:
            _ = vae.posterior(example).mean
        except NotImplementedError:
            raise UserError(
                f"the guide {type(vae.posterior).__name__} has no closed-form posterior mean; "
                "only the decoder could be exported, and export writes both"
            ) from None
    z, z_check = torch.randn(2, vae.latent_dim), torch.randn(z_checks, vae.latent_dim)
    if fmt == "onnx":
        files = _onnx(vae, (example, z), (check, z_check))
    else:
        files = []
        for module in (
            _trace(_EncoderMean(vae), example, check),
            _trace(_DecoderMean(vae), z, z_check),
        ):
            buffer = io.BytesIO()
            with _no_validation():
                torch.jit.save(module, buffer)
            files.append(buffer.getvalue())
    paths = []
    for data, name in zip(files, FILES[fmt], strict=True):
        path = Path(out_dir) / name
        atomic_write_bytes(path, data)
        paths.append(path)
    return paths
