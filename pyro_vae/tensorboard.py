"""TensorBoard event files of a training run: a callback of the one trainer.

``pyro-vae train --tensorboard [DIR]`` (``DIR`` defaults to ``RUN/tensorboard``),
or in Python::

    from pyro_vae.tensorboard import TensorBoardCallback
    fit(config, "runs/digits", callbacks=[TensorBoardCallback()])
    # then: tensorboard --logdir runs/digits/tensorboard

Every value is logged against the run's global step (minibatch updates from
the start of the run), so per-step and per-epoch curves share one x axis:

* every step: ``step/loss`` (nats per datum, the minibatch's negative
  objective) and ``step/grad_norm`` (the global 2-norm, before clipping, of
  the gradient of the loss as optimized, which is scaled to the whole
  training set; where the method measures it: SVI does);
* every epoch, at its last step, whatever the epoch record holds:
  ``elbo/train`` (the running objective), ``elbo/test``, ``elbo/valid``,
  ``reconstruction/SPLIT``, ``kl/SPLIT``, ``kl_per_dim/dNN`` (the test KL of
  dimension NN), and ``train/lr``, ``train/beta``, ``train/epoch``,
  ``train/seconds``, ... for the other numbers (:func:`epoch_scalars`);
* every ``train.image_every`` epochs and at the last: ``images/prior_samples``
  (decoded prior samples, the same noise every time) and
  ``images/reconstructions`` (test inputs above their reconstructions; an
  amortized guide only), for image data.

A resumed run appends a new event file to the same folder; steps the
interrupted session logged after its last checkpoint are hidden
(``purge_step``), so the curves continue without duplicates.

TensorBoard is an optional dependency (the ``tensorboard`` extra); it is
imported when a :class:`TensorBoardCallback` is made, never with the package.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import UserError

if TYPE_CHECKING:
    from .model import VAE
    from .train import Trainer

#: The folder of the run directory that ``--tensorboard`` writes to by default.
TENSORBOARD_DIR = "tensorboard"
#: What a missing ``tensorboard`` package is told in (one line).
MISSING = (
    "TensorBoard logging needs the tensorboard package, which is not installed; install "
    'the extra: pip install -e ".[tensorboard]" (or pip install tensorboard)'
)
#: Record keys ``{split}_{quantity}`` logged as ``{quantity}/{split}``.
_SPLITS = ("train_set", "train", "test", "valid")
_QUANTITIES = ("elbo", "reconstruction", "kl")


def require_tensorboard() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; a one-line :class:`UserError` names the extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(MISSING) from None
    return SummaryWriter


def epoch_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The TensorBoard tags and values of an epoch record (as in ``metrics.jsonl``).

    ``test_elbo`` becomes ``elbo/test`` (likewise every ``{split}_{quantity}``
    with a quantity in elbo, reconstruction, kl), ``test_kl_per_dim`` becomes
    ``kl_per_dim/d00``, ``kl_per_dim/d01``, ...; other numbers go under
    ``train/``. Text and other lists (``step_losses``: logged step by step) are left out.

    Example:
        >>> epoch_scalars({"epoch": 3, "test_elbo": -30.5, "test_kl_per_dim": [0.5, 0.0]})
        {'train/epoch': 3.0, 'elbo/test': -30.5, 'kl_per_dim/d00': 0.5, 'kl_per_dim/d01': 0.0}
    """
    out: dict[str, float] = {}
    for key, value in record.items():
        if key.endswith("_kl_per_dim") and isinstance(value, list | tuple):
            split = key.removesuffix("_kl_per_dim")
            prefix = "kl_per_dim" if split == "test" else f"kl_per_dim_{split}"
            out.update({f"{prefix}/d{d:02d}": float(v) for d, v in enumerate(value)})
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        for split in _SPLITS:
            quantity = key.removeprefix(f"{split}_")
            if key.startswith(f"{split}_") and quantity in _QUANTITIES:
                out[f"{quantity}/{split}"] = float(value)
                break
        else:
            out[f"train/{key}"] = float(value)
    return out


class TensorBoardCallback:
    """Write a run's curves and image grids as TensorBoard event files (see the module docstring).

    A :class:`~pyro_vae.train.Callback`: pass it to :func:`~pyro_vae.fit` or
    :func:`~pyro_vae.resume` as ``callbacks=[TensorBoardCallback(log_dir)]``.
    Drawing images draws no random numbers from the training's generators, so
    a run with the callback trains exactly as one without.

    Args:
        log_dir: Folder of the event files; default ``RUN/tensorboard`` (a run
            without a run directory needs one).
        image_every: Epochs between image grids (default ``train.image_every``; 0: none).
        num_samples: Prior samples per grid.
        num_reconstructions: Data reconstructed per grid (the first ones of the
            ``test`` split, else ``valid``, else ``train``).
        seed: Seed of the prior samples' noise.

    Raises:
        UserError: the ``tensorboard`` package is not installed (one line naming the extra).
    """

    #: The trainer measures the gradient norm at every step for ``step/grad_norm``.
    needs_grad_norm = True

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        image_every: int | None = None,
        num_samples: int = 64,
        num_reconstructions: int = 8,
        seed: int = 0,
    ) -> None:
        self._summary_writer = require_tensorboard()  # before any work
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.image_every = image_every
        self.num_samples = num_samples
        self.num_reconstructions = num_reconstructions
        self.seed = seed
        self.writer: Any = None
        self._every = 0
        self._last_epoch = 0
        self._steps_per_epoch = 1
        self._inputs: torch.Tensor | None = None

    # --- the trainer's hooks -------------------------------------------------------

    def on_train_begin(self, trainer: Trainer) -> None:
        """Open the writer; it hides what an earlier session logged after ``trainer.start_step``."""
        from .plots import is_image_shape

        log_dir = self.log_dir
        if log_dir is None:
            if trainer.out_dir is None:
                raise UserError(
                    "TensorBoardCallback(): a run without a run directory needs a log_dir"
                )
            log_dir = trainer.out_dir / TENSORBOARD_DIR
        train = trainer.config.train
        self._every = train.image_every if self.image_every is None else self.image_every
        self._last_epoch = train.epochs
        self._steps_per_epoch = max(trainer.steps_per_epoch, 1)
        self._inputs = None
        vae, splits = trainer.vae, trainer.data.splits
        if vae.posterior.is_amortized and is_image_shape(vae.event_shape):
            split = next(s for s in ("test", "valid", "train") if s in splits)
            self._inputs = splits[split][: self.num_reconstructions]
        purge = {"purge_step": trainer.start_step + 1} if trainer.start_step > 0 else {}
        self.writer = self._summary_writer(str(log_dir), **purge)

    def on_step_end(self, step: int, values: Mapping[str, float]) -> None:
        """Log ``step/loss`` and ``step/grad_norm`` at the global step ``step``."""
        if self.writer is None:
            return
        for key in ("loss", "grad_norm"):
            if key in values and math.isfinite(values[key]):
                self.writer.add_scalar(f"step/{key}", values[key], step)

    def on_epoch_end(self, record: dict[str, Any], vae: VAE) -> None:
        """Log the record's numbers (:func:`epoch_scalars`) and, when due, the image grids."""
        if self.writer is None:
            return
        epoch = int(record["epoch"])
        step = epoch * self._steps_per_epoch
        for tag, value in epoch_scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        if self._every > 0 and (epoch % self._every == 0 or epoch == self._last_epoch):
            for tag, image in self.images(vae).items():
                self.writer.add_image(tag, image, step)
        self.writer.flush()  # watchable while the run trains

    def on_train_end(self, trainer: Trainer) -> None:
        """Close the writer (a later session opens a new event file)."""
        self.close()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # --- the images ----------------------------------------------------------------

    @torch.no_grad()
    def images(self, vae: VAE) -> dict[str, torch.Tensor]:
        """The image grids of ``vae`` now, ``tag -> (3, H, W)`` in [0, 1] (none for non-images).

        ``images/prior_samples``: :func:`~pyro_vae.train.prior_samples` from
        ``seed``; ``images/reconstructions``: the chosen inputs (top row) above
        their decoded posterior means. The global random states are left alone.
        """
        from .diagnostics import posterior_mean
        from .plots import MIN_GRID_WIDTH, image_grid, is_image_shape
        from .train import prior_samples

        if not is_image_shape(vae.event_shape):
            return {}
        samples = prior_samples(vae, self.num_samples, self.seed)
        grids = {"images/prior_samples": image_grid(samples, math.ceil(self.num_samples**0.5))}
        if self._inputs is not None and len(self._inputs) > 0:
            device = next(iter(vae.parameters()), torch.zeros(())).device
            cuda = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):  # a sampled mean (a flow) draws noise
                x = self._inputs.to(device)
                recon = vae.decode(posterior_mean(vae, x, seed=self.seed))
            grids["images/reconstructions"] = image_grid(
                torch.cat([x.cpu(), recon.cpu()]), nrow=len(x)
            )
        # tiny images (8 x 8 digits) are enlarged, pixel by pixel, to be seen at all
        return {
            tag: grid.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
            for tag, grid in grids.items()
            for scale in [max(1, math.ceil(MIN_GRID_WIDTH / grid.shape[-1]))]
        }
