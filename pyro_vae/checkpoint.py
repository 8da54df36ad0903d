"""Run directories: atomic files, checkpoints, and :func:`load`.

A run directory holds ``config.toml`` (the full resolved config),
``checkpoint.pt`` (weights, optimizer state, progress, RNG states; plain
tensors and containers, never pickled code) and ``metrics.jsonl`` (one JSON
object per epoch).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from .build import build_vae, resolve
from .config import Config
from .errors import CheckpointError, PyroVAEError
from .files import atomic_write_bytes
from .model import VAE
from .plugins import import_plugins

CONFIG_FILE = "config.toml"
CHECKPOINT_FILE = "checkpoint.pt"
#: The weights with the best validation ELBO so far (no optimizer state; not resumable).
BEST_FILE = "best.pt"
#: ``load_run(..., checkpoint=NAME)``: which file of a run to load.
CHECKPOINTS = {"last": CHECKPOINT_FILE, "best": BEST_FILE}
METRICS_FILE = "metrics.jsonl"
#: The layout written now: one for every training method (``strategy`` holds the
#: optimizers' states). Format 1 (pyro-vae 0.1) is read and upgraded.
CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)
#: What pyro-vae 0.1's variational EM wrote into its checkpoints (no optimizer state).
_OLD_EM_WRITER = "pyro_vae.em.fit_em"

__all__ = [
    "BEST_FILE",
    "CHECKPOINTS",
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "METRICS_FILE",
    "atomic_write_bytes",
    "checkpoint_path",
    "load",
    "load_checkpoint",
    "load_state",
    "read_metrics",
    "read_run_config",
    "save_checkpoint",
    "upgrade_state",
    "write_metrics",
]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """Write ``history`` as JSON lines, atomically."""
    text = "".join(json.dumps(record) + "\n" for record in history)
    atomic_write_bytes(path, text.encode())


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The per-epoch records of ``run_dir/metrics.jsonl`` (empty if absent)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_path(run_dir: str | os.PathLike[str], checkpoint: str = "last") -> Path:
    """The file of ``checkpoint`` (``last`` or ``best``, see :data:`CHECKPOINTS`) in ``run_dir``.

    Raises:
        CheckpointError: an unknown name, or a ``best`` the run has not written.
    """
    if checkpoint not in CHECKPOINTS:
        raise CheckpointError(f"unknown checkpoint {checkpoint!r}; valid: {', '.join(CHECKPOINTS)}")
    path = Path(run_dir) / CHECKPOINTS[checkpoint]
    if checkpoint == "best" and not path.exists() and (Path(run_dir) / CHECKPOINT_FILE).exists():
        raise CheckpointError(
            f"{run_dir} has no {BEST_FILE}: it was trained without a valid split, or by a "
            "version before 0.3 (resume it to start keeping one); use --checkpoint last"
        )
    return path


def load_checkpoint(
    run_dir: str | os.PathLike[str], map_location: str = "cpu", checkpoint: str = "last"
) -> dict[str, Any]:
    """Read ``run_dir/checkpoint.pt`` (or ``best.pt``), tensors only (``weights_only``).

    Raises:
        CheckpointError: when the file is missing, unreadable or of another format.
    """
    path = checkpoint_path(run_dir, checkpoint)
    if not path.exists():
        raise CheckpointError(f"no checkpoint in {run_dir} (expected {path})")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = "damaged, or not a checkpoint written by pyro-vae"
        if isinstance(e, OSError) and e.strerror:
            first = e.strerror
        elif "weights_only" in str(e) or "pickle" in str(e).lower():
            first = "not a file of plain tensors (damaged, or not written by pyro-vae)"
        raise CheckpointError(
            f"cannot read checkpoint {path}: {first}; it is never unpickled as code"
        ) from None
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        raise CheckpointError(
            f"{path} is not a pyro-vae checkpoint (formats {', '.join(map(str, READABLE_FORMATS))})"
        )
    return state


def upgrade_state(state: dict[str, Any], run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint of any readable format in the current layout, for resuming.

    Format 1 (pyro-vae 0.1): the SVI optimizer state moves under
    ``strategy``; variational-EM checkpoints of that version kept no
    optimizer state and cannot be resumed (they still load and evaluate).

    Raises:
        CheckpointError: one line, for a checkpoint that cannot be resumed.
    """
    if state.get("format") == CHECKPOINT_FORMAT:
        return state
    if state.get("written_by") == _OLD_EM_WRITER or "optimizer" not in state:
        raise CheckpointError(
            f"{run_dir} was written by pyro-vae 0.1's --method variational-em, which kept no "
            "optimizer state, so it cannot be resumed; it loads and evaluates, or start a new "
            "run with more --epochs"
        )
    upgraded = {k: v for k, v in state.items() if k != "optimizer"}
    upgraded["strategy"] = {"optimizer": state["optimizer"]}
    upgraded.setdefault("num_data", None)
    upgraded["format"] = CHECKPOINT_FORMAT
    return upgraded


def read_run_config(run_dir: str | os.PathLike[str]) -> Config:
    """The ``config.toml`` of a run directory, with its plugins imported.

    Raises:
        CheckpointError: no such directory or file, or a config this version cannot read.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if not (run_dir / CONFIG_FILE).exists():
        raise CheckpointError(f"{run_dir} is not a run directory: no {CONFIG_FILE}")
    try:
        config = Config.load(run_dir / CONFIG_FILE, relative_to_file=False)
        import_plugins(config.plugins)
    except PyroVAEError as e:
        raise CheckpointError(f"{run_dir / CONFIG_FILE}: {e}") from None
    return config


def load_state(vae: VAE, state_dict: dict[str, torch.Tensor], where: str) -> None:
    """``vae.load_state_dict(state_dict)``, with a one-line error on mismatch."""
    try:
        vae.load_state_dict(state_dict)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(
            f"{where} does not match the model its config describes: {detail[:300]}"
        ) from None


def load(run_dir: str | os.PathLike[str], device: str = "cpu", checkpoint: str = "last") -> VAE:
    """The trained VAE of a run directory (see :func:`load_run`)."""
    return load_run(run_dir, device, checkpoint)[0]


def load_run(
    run_dir: str | os.PathLike[str], device: str = "cpu", checkpoint: str = "last"
) -> tuple[VAE, dict[str, Any]]:
    """The trained VAE of a run directory, on ``device`` (CPU by default), in eval mode; its state.

    ``checkpoint="best"`` loads ``best.pt``, the weights with the best
    validation ELBO (its state has ``epoch`` and ``valid_elbo``).

    The run's plugins (``plugins`` in its ``config.toml``) are imported first;
    a component that no plugin registers is a one-line error naming the fix.

    Example:
        >>> vae = load("runs/digits")  # doctest: +SKIP
        >>> vae.prior().event_shape, vae.posterior(x).batch_shape  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    try:
        config = resolve(config)
    except PyroVAEError as e:
        raise CheckpointError(f"{run_dir / CONFIG_FILE}: {e}") from None
    state = load_checkpoint(run_dir, map_location=device, checkpoint=checkpoint)
    with torch.random.fork_rng(devices=[]):  # initial weights are overwritten: leave the RNG be
        vae = build_vae(config.model, tuple(state["event_shape"]), state.get("num_data"))
    load_state(vae, state["model"], str(checkpoint_path(run_dir, checkpoint)))
    return vae.to(device).eval(), state
