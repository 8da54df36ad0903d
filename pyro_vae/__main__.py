"""The ``pyro-vae`` command and ``python -m pyro_vae``: :func:`pyro_vae.cli.main`.

This module loads nothing heavy itself, so a Ctrl-C while torch is still
loading (the first second or two) exits with code 130 and no traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run :func:`pyro_vae.cli.main`; 130, quietly, on a Ctrl-C while it loads."""
    try:
        from .cli import main as cli_main

        return cli_main(argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
