"""SIGKILL at random moments: resuming ends bit for bit where an uninterrupted run ends.

The trainings run in forked children (no second import of torch): a SIGKILL
ends them as it would a ``pyro-vae train`` process, with no handler run.
"""

import multiprocessing
import random
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
epochs = 12
batch_size = 100
"""


def _train(config_path, out, resume):
    import torch as child_torch

    child_torch.set_num_threads(1)
    if resume:
        pyro_vae.resume(out)
    else:
        pyro_vae.fit(pyro_vae.Config.load(config_path), out)


def _start(config_path, out, resume):
    process = multiprocessing.get_context("fork").Process(
        target=_train, args=(config_path, out, resume)
    )
    process.start()
    return process


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
        process = _start(tmp_path / "run.toml", out, resume)
        if kills < 2:
            # wait until it trains, then kill it a random moment later
            metrics = out / "metrics.jsonl"
            seen = metrics.read_text().count("\n") if metrics.exists() else 0
            while process.is_alive() and time.monotonic() < deadline:
                if metrics.exists() and metrics.read_text().count("\n") > seen:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.2))
            if process.is_alive():
                process.kill()  # SIGKILL: no handler runs, a write may be cut short
                kills += 1
        process.join(timeout=max(1.0, deadline - time.monotonic()))
        if process.exitcode == 0:
            break
        assert process.exitcode == -9, process.exitcode  # killed, never a failure of its own
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
