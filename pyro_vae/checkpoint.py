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
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, PyroVAEError
from .model import VAE

CONFIG_FILE = "config.toml"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FORMAT = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    A reader sees the old file or the new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def load_checkpoint(run_dir: str | os.PathLike[str], map_location: str = "cpu") -> dict[str, Any]:
    """Read ``run_dir/checkpoint.pt`` (tensors only, ``weights_only``).

    Raises:
        CheckpointError: when the file is missing, unreadable or of another format.
    """
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        raise CheckpointError(f"no checkpoint in {run_dir} (expected {path})")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a pyro-vae checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def load_state(vae: VAE, state_dict: dict[str, torch.Tensor], where: str) -> None:
    """``vae.load_state_dict(state_dict)``, with a one-line error on mismatch."""
    try:
        vae.load_state_dict(state_dict)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(
            f"{where} does not match the model its config describes: {detail[:300]}"
        ) from None


def load(run_dir: str | os.PathLike[str], device: str = "cpu") -> VAE:
    """The trained VAE of a run directory, on ``device`` (CPU by default), in eval mode.

    Example:
        >>> vae = load("runs/digits")  # doctest: +SKIP
        >>> vae.prior().event_shape, vae.posterior(x).batch_shape  # doctest: +SKIP
    """
    from .build import build_vae, resolve
    from .config import Config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    try:
        config = resolve(Config.load(run_dir / CONFIG_FILE))
    except PyroVAEError as e:
        raise CheckpointError(f"{run_dir / CONFIG_FILE}: {e}") from None
    state = load_checkpoint(run_dir, map_location=device)
    with torch.random.fork_rng(devices=[]):  # initial weights are overwritten: leave the RNG be
        vae = build_vae(config.model, tuple(state["event_shape"]))
    load_state(vae, state["model"], str(run_dir / CHECKPOINT_FILE))
    return vae.to(device).eval()
