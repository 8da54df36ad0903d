"""Watching a run: TensorBoard event files, per-step losses, prior-sample snapshots, the report."""

import base64
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pyro_vae
from pyro_vae import Config, report
from pyro_vae.cli import main
from pyro_vae.errors import UserError
from pyro_vae.tensorboard import TensorBoardCallback, epoch_scalars
from pyro_vae.train import SNAPSHOT_SAMPLES, prior_samples, read_snapshots

FIXTURES = Path(__file__).parent / "fixtures"
#: digits: 1500 training data in 3 steps of 500; D = 2 and 8-unit MLPs: about a second a run
STEPS = 3
TINY = ["--batch-size", "500", "--latent-dim", "2", "--set", "model.encoder.hidden=[8]"]
TINY += ["--set", "model.decoder.hidden=[8]"]


def tiny(epochs=2, **train):
    overrides = {"model.latent_dim": 2, "model.encoder.hidden": [8], "model.decoder.hidden": [8]}
    overrides.update({"train.epochs": epochs, "train.batch_size": 500})
    overrides.update({f"train.{k}": v for k, v in train.items()})
    return Config().override(overrides)


def strip_time(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def events(log_dir):
    """Every scalar and image TensorBoard reads back from ``log_dir``, all kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    scalars = {t: [(e.step, e.value) for e in accumulator.Scalars(t)] for t in tags["scalars"]}
    images = {t: accumulator.Images(t) for t in tags["images"]}
    return scalars, images


# --- the acceptance check --------------------------------------------------------------


def test_five_epochs_with_tensorboard_leave_scalars_and_images_it_reads(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--epochs", "5", *TINY, "--set", "train.image_every=2"]
    assert main([*argv, "--out", str(out), "--tensorboard", "--quiet"]) == 0
    assert "run saved in" in capsys.readouterr().out
    scalars, images = events(out / "tensorboard")
    metrics = pyro_vae.read_metrics(out)
    # every step: the loss the record keeps, and a gradient norm
    losses = [v for r in metrics for v in r["step_losses"]]
    assert [s for s, _ in scalars["step/loss"]] == list(range(1, 5 * STEPS + 1))
    assert [v for _, v in scalars["step/loss"]] == pytest.approx(losses, rel=1e-5)
    norms = [v for _, v in scalars["step/grad_norm"]]
    assert len(norms) == 5 * STEPS and all(0 < v < float("inf") for v in norms)
    # every epoch, at its last step: the record's numbers
    ends = [STEPS * e for e in range(1, 6)]
    for tag, key in [
        ("elbo/train", "train_elbo"),
        ("elbo/test", "test_elbo"),
        ("reconstruction/test", "test_reconstruction"),
        ("kl/test", "test_kl"),
        ("train/lr", "lr"),
        ("train/beta", "beta"),
    ]:
        assert [s for s, _ in scalars[tag]] == ends, tag
        assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for r in metrics], rel=1e-5)
    for d in range(2):
        want = [r["test_kl_per_dim"][d] for r in metrics]
        assert [v for _, v in scalars[f"kl_per_dim/d{d:02d}"]] == pytest.approx(want, rel=1e-4)
    assert not any("step_losses" in tag for tag in scalars)  # logged step by step instead
    # image grids at epochs 2 and 4 (every 2) and 5 (the last), enlarged to be seen
    assert set(images) == {"images/prior_samples", "images/reconstructions"}
    for tag, grids in images.items():
        assert [g.step for g in grids] == [2 * STEPS, 4 * STEPS, 5 * STEPS], tag
        picture = Image.open(io.BytesIO(grids[-1].encoded_image_string))
        assert picture.format == "PNG" and picture.size[0] >= 256
    first, *_, last = (
        np.asarray(Image.open(io.BytesIO(g.encoded_image_string)))
        for g in images["images/prior_samples"]
    )
    assert first.shape == last.shape and not np.array_equal(first, last)  # the model moved


def test_the_missing_extra_is_one_line_exit_2_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    out = tmp_path / "run"
    code = main(["train", "--epochs", "1", *TINY, "--out", str(out), "--tensorboard"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert 'pip install -e ".[tensorboard]"' in err and err.startswith("pyro-vae train: error:")
    assert not out.exists()  # nothing written
    # resuming too: refused before the run directory is even looked at
    code = main(["train", "--resume", str(tmp_path / "nowhere"), "--tensorboard"])
    assert code == 2 and "[tensorboard]" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"pip install -e \".\[tensorboard\]\""):
        TensorBoardCallback(tmp_path / "tb")


def test_the_callback_changes_nothing_in_the_training(tmp_path):
    config = tiny(epochs=2, image_every=1)
    plain = pyro_vae.fit(config)
    watched = pyro_vae.fit(config, callbacks=[TensorBoardCallback(tmp_path / "tb")])
    assert strip_time(watched.history) == strip_time(plain.history)
    for key, value in plain.vae.state_dict().items():
        assert torch.equal(watched.vae.state_dict()[key], value), key
    scalars, images = events(tmp_path / "tb")
    assert len(scalars["step/loss"]) == 2 * STEPS and len(images["images/prior_samples"]) == 2


def test_a_resumed_run_continues_its_curves_without_duplicates(tmp_path):
    run = tmp_path / "run"

    def crash(epoch, step, loss):  # logged 2 steps of epoch 2, then died before its checkpoint
        if (epoch, step) == (2, 2):
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        pyro_vae.fit(tiny(epochs=3), run, on_step=crash, callbacks=[TensorBoardCallback()])
    assert len(pyro_vae.read_metrics(run)) == 1
    resumed = pyro_vae.resume(run, callbacks=[TensorBoardCallback()])  # default: RUN/tensorboard
    scalars, _ = events(run / "tensorboard")
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one a session
    steps = [s for s, _ in scalars["step/loss"]]
    assert steps == list(range(1, 3 * STEPS + 1))  # the 2 orphaned steps are hidden
    losses = [v for r in resumed.history for v in r["step_losses"]]
    assert [v for _, v in scalars["step/loss"]] == pytest.approx(losses, rel=1e-5)
    assert [s for s, _ in scalars["elbo/test"]] == [STEPS, 2 * STEPS, 3 * STEPS]


def test_an_in_memory_run_needs_a_log_dir_and_epoch_scalars_name_every_number():
    with pytest.raises(UserError, match="needs a log_dir"):
        pyro_vae.fit(tiny(epochs=1), callbacks=[TensorBoardCallback()])
    record = {
        "epoch": 2,
        "train_elbo": -40.0,
        "train_set_elbo": -39.0,
        "valid_reconstruction": -38.0,
        "test_kl": 1.5,
        "test_kl_per_dim": [1.0, 0.5],
        "kl_estimator": "analytic",
        "step_losses": [41.0, 40.0],
        "lr": 0.001,
        "converged": True,
    }
    assert epoch_scalars(record) == {
        "train/epoch": 2.0,
        "elbo/train": -40.0,
        "elbo/train_set": -39.0,
        "reconstruction/valid": -38.0,
        "kl/test": 1.5,
        "kl_per_dim/d00": 1.0,
        "kl_per_dim/d01": 0.5,
        "train/lr": 0.001,
    }


# --- what the run directory keeps, without TensorBoard ---------------------------------


def test_step_losses_are_kept_and_a_resume_continues_them(tmp_path):
    whole = pyro_vae.fit(tiny(epochs=4))
    pyro_vae.fit(tiny(epochs=2), tmp_path / "run")
    resumed = pyro_vae.resume(tmp_path / "run", epochs=4)
    kept = pyro_vae.read_metrics(tmp_path / "run")
    assert [len(r["step_losses"]) for r in kept] == [STEPS] * 4
    assert [r["step_losses"] for r in kept] == [r["step_losses"] for r in whole.history]
    assert strip_time(resumed.history) == strip_time(whole.history)
    for r in kept:  # equal batches: the epoch's objective is the mean of its steps' losses
        assert -np.mean(r["step_losses"]) == pytest.approx(r["train_elbo"], rel=1e-5)
    assert r["step_losses"][-1] < kept[0]["step_losses"][0]  # it learned


def test_snapshots_decode_the_same_noise_and_a_resume_drops_orphans(tmp_path):
    run = tmp_path / "run"
    plain = pyro_vae.fit(tiny(epochs=3))
    result = pyro_vae.fit(tiny(epochs=3, image_every=2), run)
    assert strip_time(result.history) == strip_time(plain.history)  # snapshots draw no RNG
    snapshots = read_snapshots(run)
    assert [e for e, _ in snapshots] == [2, 3]  # every 2 epochs, and the last
    assert snapshots[-1][1].shape == (SNAPSHOT_SAMPLES, 8, 8)
    assert torch.allclose(snapshots[-1][1], prior_samples(pyro_vae.load(run), SNAPSHOT_SAMPLES))
    assert not torch.equal(snapshots[0][1], snapshots[1][1])
    # a snapshot written after the last checkpoint (a run killed in between) is dropped
    shutil.copy(run / "snapshots" / "samples-00003.pt", run / "snapshots" / "samples-00005.pt")
    assert [e for e, _ in read_snapshots(run, last_epoch=3)] == [2, 3]
    pyro_vae.resume(run, epochs=4)
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [
        "samples-00002.pt",
        "samples-00003.pt",
        "samples-00004.pt",
    ]


def test_image_every_is_checked_round_trips_and_may_change_on_resume(tmp_path):
    with pytest.raises(pyro_vae.ConfigError, match="image_every must be finite and >= 0"):
        Config().override({"train.image_every": -1})
    config = Config().override({"train.image_every": 3})
    assert Config.from_toml(config.to_toml()).train.image_every == 3
    pyro_vae.fit(tiny(epochs=1), tmp_path / "run")
    pyro_vae.resume(tmp_path / "run", epochs=2, changes={"image_every": 1})
    assert Config.load(tmp_path / "run" / "config.toml").train.image_every == 1
    assert [e for e, _ in read_snapshots(tmp_path / "run")] == [2]


# --- the report --------------------------------------------------------------------------


def figure_image(page, name):
    start = page.index(f'<figure id="fig-{name}">')
    src = page[start:].split('src="data:image/png;base64,', 1)[1].split('"', 1)[0]
    return Image.open(io.BytesIO(base64.b64decode(src, validate=True)))


def test_the_report_draws_the_step_loss_and_the_samples_over_training(tmp_path):
    run = tmp_path / "run"
    pyro_vae.fit(tiny(epochs=4, image_every=2), run)
    page = report.build_report(run)
    training, generation = (
        page[page.index(f'<section id="{k}">') :].split("</section>", 1)[0]
        for k in ("training", "generation")
    )
    assert '<figure id="fig-step-loss">' in training
    assert '<figure id="fig-samples-over-training">' in generation
    assert "(2 snapshots" in generation
    for name in ("step-loss", "samples-over-training"):
        picture = figure_image(page, name)
        assert picture.format == "PNG" and min(picture.size) > 100


def sections(run):
    """The report's training section and its samples over training, built alone (fast)."""
    loaded = report._load_run(run)
    generation = report._Section("generation")
    report._samples_over_training(generation, loaded)
    return report._training_section(loaded).render(), generation.render()


def test_a_run_of_an_earlier_version_reports_without_the_new_figures(tmp_path):
    run = tmp_path / "old"
    shutil.copytree(FIXTURES / "v0.1-svi", run)
    training, generation = sections(run)
    assert "fig-step-loss" not in training and "fig-samples-over-training" not in generation
    assert "keeps one value per epoch" in training
    assert "No samples over training" in generation and "train.image_every" in generation
    pyro_vae.resume(run, epochs=3)  # the resumed epoch records its steps
    training, _ = sections(run)
    assert '<figure id="fig-step-loss">' in training
    steps = len(pyro_vae.read_metrics(run)[-1]["step_losses"])
    assert f"Steps 1 to {2 * steps} were trained by an earlier pyro-vae version" in training
