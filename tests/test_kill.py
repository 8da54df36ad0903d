"""SIGKILL at random moments: resuming ends bit for bit where an uninterrupted run ends."""

import os
import random
import subprocess
import sys
import time

import torch

import pyro_vae

CONFIG = """
[model]
latent_dim = 2
[model.encoder]
name = "mlp"
hidden = [16]
[model.decoder]
name = "mlp"
hidden = [16]
[train]
epochs = 8
batch_size = 50
"""


def _start(argv, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "pyro_vae", *argv, "--quiet"],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_resume_after_sigkills_at_random_moments_equals_an_uninterrupted_run(tmp_path):
    (tmp_path / "run.toml").write_text(CONFIG)
    config = pyro_vae.Config.load(tmp_path / "run.toml")
    reference = pyro_vae.fit(config, tmp_path / "reference")

    rng = random.Random(0)
    out = tmp_path / "killed"
    deadline = time.monotonic() + 120  # bounded: two kills, then a run to the end
    kills = 0
    while True:
        resume = (out / "checkpoint.pt").exists()
        argv = ["train", "--resume", str(out)] if resume else ["train", "--config", "run.toml"]
        process = _start(argv if resume else [*argv, "--out", str(out)], tmp_path)
        if kills < 2:
            # wait until it trains (past the imports), then kill it a random moment later
            metrics = out / "metrics.jsonl"
            seen = metrics.read_text().count("\n") if metrics.exists() else 0
            while process.poll() is None and time.monotonic() < deadline:
                if metrics.exists() and metrics.read_text().count("\n") > seen:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
            if process.poll() is None:
                process.kill()  # SIGKILL: no handler runs, a write may be cut short
                kills += 1
        _, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        if process.returncode == 0:
            break
        assert process.returncode == -9, err  # killed, never a failure of its own
        assert time.monotonic() < deadline
    assert kills == 2

    ours = torch.load(out / "checkpoint.pt", weights_only=True)
    theirs = torch.load(tmp_path / "reference" / "checkpoint.pt", weights_only=True)
    for name, value in theirs["model"].items():
        assert torch.equal(ours["model"][name], value), name

    def without_time(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert without_time(pyro_vae.read_metrics(out)) == without_time(reference.history)
    assert not list(out.glob(".*.tmp"))  # the last resume cleaned what a kill left
