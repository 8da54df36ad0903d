"""Where numbers come from: software versions, device, threads and the git commit.

Recorded in every checkpoint (the session that wrote it), shown by the
report, and written with every benchmark result.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from ._version import __version__

__all__ = ["describe_environment", "environment", "git_commit"]


def git_commit(package_dir: str | os.PathLike[str]) -> str | None:
    """The short commit of the git checkout holding ``package_dir``, or ``None``.

    ``None`` (never an error) when git is missing or fails, or when
    ``package_dir`` is not tracked by git (e.g. an installed package whose
    folder merely lies inside some other repository). A checkout whose files
    under ``package_dir`` differ from the commit gets ``" + local changes"``.
    """
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(package_dir), *args],
                capture_output=True,
                text=True,
                timeout=10,
                env=env,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    if git("ls-files", "--error-unmatch", "--", "__init__.py") is None:
        return None
    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return None
    changes = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return commit + (" + local changes" if changes else "")


def environment(device: str = "cpu") -> dict[str, Any]:
    """The software and machine of this process, computing on ``device``.

    Returns:
        ``{"pyro_vae", "torch", "pyro", "python", "device", "threads",
        "git_commit"}``: versions as strings, ``torch.get_num_threads()``, and
        the short commit of the package's git checkout (``None`` when not
        run from one; see :func:`git_commit`). ``device`` names the CUDA
        device's model when it is one.
    """
    import pyro
    import torch

    where = str(device)
    if where.startswith("cuda") and torch.cuda.is_available():
        where = f"{where} ({torch.cuda.get_device_name(torch.device(where))})"
    return {
        "pyro_vae": __version__,
        "torch": str(torch.__version__),  # a TorchVersion would not load weights_only
        "pyro": str(pyro.__version__),
        "python": platform.python_version(),
        "device": where,
        "threads": torch.get_num_threads(),
        "git_commit": git_commit(Path(__file__).resolve().parent),
    }


#: Display names of :func:`environment`'s keys.
_NAMES = {
    "pyro_vae": "pyro-vae",
    "torch": "torch",
    "pyro": "pyro",
    "python": "Python",
    "device": "device",
    "threads": "threads",
    "git_commit": "git commit",
}


def describe_environment(env: dict[str, Any]) -> dict[str, str]:
    """:func:`environment`'s record as display name -> text; unknown values left out."""
    return {_NAMES.get(k, k): str(v) for k, v in env.items() if v is not None}
