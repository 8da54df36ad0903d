"""Twenty trials of two trainings started on one --out at random offsets (0 to 3 s).

Not part of the test suite (about 5 minutes); run it by hand:

    OMP_NUM_THREADS=1 python tests/stress/race_trials.py [TRIALS]

Each trial passes when exactly one training exits 0 and the other exits 2
with one line on stderr, and the surviving run then loads, resumes and
reports. Prints one line per trial and exits 1 if any trial failed.
"""

import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = ["train", "--epochs", "3", "--latent-dim", "2", "--quiet", "--out", "run"]


def pyro_vae(*argv, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "pyro_vae", *argv],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def trial(offset: float, folder: Path) -> str | None:
    """None if the trial passed, else what went wrong."""
    first = pyro_vae(*TRAIN, cwd=folder)
    time.sleep(offset)
    second = pyro_vae(*TRAIN, cwd=folder)
    results = [(p.wait(), *p.communicate()) for p in (first, second)]
    codes = sorted(code for code, _, _ in results)
    if codes != [0, 2]:
        return f"exit codes {codes}: {[err.strip()[-300:] for _, _, err in results]}"
    refused = next(err for code, _, err in results if code == 2)
    if len(refused.strip().splitlines()) != 1:
        return f"refusal is not one line: {refused!r}"
    for argv in (
        ["train", "--resume", "run", "--epochs", "4", "--quiet"],
        ["report", "run"],
        ["evaluate", "run", "--num-samples", "10", "--max-data", "20", "--quiet"],
    ):
        process = pyro_vae(*argv, cwd=folder)
        code, (_, err) = process.wait(), process.communicate()
        if code != 0:
            return f"{' '.join(argv[:1])} failed ({code}): {err.strip()[-300:]}"
    import pyro_vae as package

    package.load(folder / "run")
    return None


def main() -> int:
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    rng = random.Random(0)
    failures = 0
    for i in range(trials):
        offset = rng.uniform(0.0, 3.0)
        with tempfile.TemporaryDirectory() as folder:
            problem = trial(offset, Path(folder))
        failures += problem is not None
        print(f"trial {i + 1:2d}  offset {offset:.2f} s  {'ok' if problem is None else problem}")
    print(f"{trials - failures} of {trials} trials passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
