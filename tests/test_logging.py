"""Messages go through ``logging``: embedders silence or redirect them; the CLI prints them."""

import logging

import pytest

import pyro_vae
from pyro_vae import Config
from pyro_vae.cli import main

TINY = ["--epochs", "2", "--batch-size", "500", "--latent-dim", "2"]
TINY += ["--set", "model.encoder.hidden=[8]", "--set", "model.decoder.hidden=[8]"]


def tiny(epochs=2):
    return Config().override(
        {
            "model.latent_dim": 2,
            "model.encoder.hidden": [8],
            "model.decoder.hidden": [8],
            "train.epochs": epochs,
            "train.batch_size": 500,
        }
    )


def pyro_vae_handlers():
    """The handlers of every ``pyro_vae`` logger that exists."""
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "pyro_vae"]
    return {n: logging.getLogger(n).handlers for n in names if logging.getLogger(n).handlers}


def test_the_package_configures_no_handler():
    import pyro_vae.cli
    import pyro_vae.train  # noqa: F401

    assert logging.getLogger("pyro_vae.train").name == pyro_vae.train.logger.name
    assert pyro_vae_handlers() == {}
    assert logging.getLogger("pyro_vae").level == logging.NOTSET


def test_training_messages_go_to_the_logger_and_print_nothing(caplog, capsys):
    lines = []
    with caplog.at_level(logging.INFO, logger="pyro_vae"):
        pyro_vae.fit(tiny(), log=lines.append)
    said = [r for r in caplog.records if r.name == "pyro_vae.train"]
    assert [r.getMessage().split("  ")[0] for r in said] == ["epoch 1", "epoch 2"]
    assert all(r.levelno == logging.INFO for r in said)
    assert lines == [r.getMessage() for r in said]  # log= still gets the same lines
    assert capsys.readouterr().out == ""  # nothing printed without a handler


def test_an_embedder_silences_the_trainer(caplog, capsys):
    package = logging.getLogger("pyro_vae")
    package.setLevel(logging.WARNING)
    try:
        with caplog.at_level(logging.DEBUG):  # the root listens to everything
            pyro_vae.fit(tiny(epochs=1))
    finally:
        package.setLevel(logging.NOTSET)
    assert not [r for r in caplog.records if r.name.startswith("pyro_vae")]
    assert capsys.readouterr().out == ""


def test_debug_messages_say_where_a_resume_starts(tmp_path, caplog):
    pyro_vae.fit(tiny(epochs=1), tmp_path / "run")
    with caplog.at_level(logging.DEBUG, logger="pyro_vae"):
        pyro_vae.resume(tmp_path / "run", epochs=2)
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert f"resuming {tmp_path / 'run'} at epoch 1, step 0" in debug
    assert f"epoch 2: checkpoint written to {tmp_path / 'run'}" in debug


@pytest.mark.parametrize("flag", [None, "--quiet", "--verbose"])
def test_the_cli_prints_the_messages_as_before(tmp_path, capsys, flag):
    out = tmp_path / "run"
    argv = ["train", *TINY, "--out", str(out)] + ([flag] if flag else [])
    assert main(argv) == 0
    said = capsys.readouterr().out
    epochs = [line for line in said.splitlines() if line.startswith("epoch ")]
    lines = {
        None: ["epoch 1  test ELBO", "epoch 2  test ELBO"],
        "--quiet": [],
        "--verbose": [
            f"epoch 1: checkpoint written to {out}",
            "epoch 1  test ELBO",
            f"epoch 2: checkpoint written to {out}",
            "epoch 2  test ELBO",
        ],
    }[flag]
    assert [line[: len(want)] for line, want in zip(epochs, lines, strict=False)] == lines
    assert len(epochs) == len(lines)
    assert ("test ELBO" in said and "nats per datum" in said) == (flag != "--quiet")
    assert ("training svi on cpu" in said) == (flag == "--verbose")
    assert f"run saved in {out}" in said  # the command's result, even when quiet
    assert pyro_vae_handlers() == {}  # main leaves logging as it found it
    assert logging.getLogger("pyro_vae").level == logging.NOTSET


def test_quiet_and_verbose_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--quiet", "--verbose"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_pyro_vae_warnings_are_still_one_line_notes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--prior", "mixture", "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("pyro-vae train: note: ")]
    assert len(notes) == 1 and "no closed-form KL" in notes[0], err
