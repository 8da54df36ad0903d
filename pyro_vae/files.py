"""Atomic file writes and the run-directory lock, the lowest layer of the run directory.

A reader sees the old file or the new one, never a partial write: every
writer of a run directory (config, checkpoint, metrics, evaluation) goes
through :func:`atomic_write_bytes`. Only one process writes to a run
directory at a time: :func:`run_lock` holds an OS lock on the directory
itself (``flock``), which the kernel releases when the process ends, even
by SIGKILL, so no marker file is left behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import CheckpointError, RunInUseError


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, ``fsync`` and a rename."""
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


@contextmanager
def run_lock(run_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the exclusive lock of ``run_dir`` for the block (creating the directory if needed).

    Folders this call created and that are still empty at the end are removed.

    Checked before any work: the directory can be created and written to.

    Raises:
        RunInUseError: another process holds the lock; the message names its PID.
        CheckpointError: the directory cannot be created or written (a regular
            file in the way, a missing permission).
    """
    run_dir = Path(run_dir)
    with removing_new_folders(run_dir, always=True), _locked(run_dir):
        yield run_dir


@contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError(
            f"cannot use {run_dir} as a run directory: a file is in the way; choose another --out"
        ) from None
    except OSError as e:
        raise CheckpointError(f"cannot create the run directory {run_dir}: {e.strerror}") from None
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(run_dir)
            who = f"process {holder}" if holder else "another process"
            raise RunInUseError(
                f"{run_dir} is in use: {who} is writing to it; wait for it to finish, "
                "or use another --out"
            ) from None
        except ImportError:  # pragma: no cover - no fcntl (Windows): no lock
            pass
        _check_writable(run_dir)
        yield
    finally:
        os.close(fd)


@contextmanager
def removing_new_folders(folder: str | os.PathLike[str], *, always: bool = False) -> Iterator[None]:
    """Remove, if the block fails, the folders up to ``folder`` it created that are still empty.

    A failed download or a run that failed before writing anything leaves no
    empty folders behind. With ``always``, also after a block that succeeds.
    """
    folder = Path(folder).absolute()
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    failed = True
    try:
        yield
        failed = False
    finally:
        if failed or always:
            with suppress(OSError):
                for path in created:
                    path.rmdir()


def _check_writable(run_dir: Path) -> None:
    try:
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise CheckpointError(f"cannot write to {run_dir}: {e.strerror}") from None


def _lock_holder(run_dir: Path) -> int | None:
    """The PID holding the ``flock`` on ``run_dir``, read from ``/proc/locks`` (Linux), or None."""
    try:
        st = os.stat(run_dir)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in lines:
        fields = line.split()
        if "FLOCK" not in fields or "->" in fields:
            continue
        try:
            position = fields.index("FLOCK")
            pid = int(fields[position + 3])
            major, minor, inode = fields[position + 4].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == wanted:
                return pid
        except (IndexError, ValueError):
            continue
    return None


def remove_stale_temporaries(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files of :func:`atomic_write_bytes` left in ``run_dir``.

    A process killed mid-write (SIGKILL, power loss) leaves ``.NAME.*.tmp``;
    call this only while holding :func:`run_lock`, when no write is under way.

    Returns:
        The files removed.
    """
    removed = []
    for path in Path(run_dir).glob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
