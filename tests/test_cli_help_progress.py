"""Help shows every default; long commands show a progress bar on stderr, off with --quiet."""

import argparse
import importlib
import logging
import shutil
import subprocess
import sys
from functools import partial

import pytest
import torch

import pyro_vae
from pyro_vae.ais import ais_log_likelihood, bdmc, chain_steps
from pyro_vae.cli import COMMANDS, build_parser, main

evaluate_module = importlib.import_module("pyro_vae.evaluate")  # pyro_vae.evaluate: the function

BAR = "%|"  # tqdm's "  40%|####      | 4/10 [00:01<00:02, ...]"


def _subparsers() -> dict:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def _help(argv, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: no wrapped "(default: ...)"
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    "command",
    [c for c in COMMANDS],
)
def test_every_option_says_its_default(command):
    parser = _subparsers()[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._StoreTrueAction):
            assert action.help, action.option_strings  # says what turning it on does
            continue
        text = formatter._expand_help(action)
        assert "default" in text, (command, action.option_strings, text)
        if action.default not in (None, []):
            assert f"(default: {action.default})" in text, (command, action.option_strings)
        assert "default: None" not in text


@pytest.mark.parametrize(
    "command, expected",
    [
        ("evaluate", ["(default: test)", "(default: 500)", "(default: 16)", "(default: guide)",
                      "(default: cpu)", "(default: 24.0)", "eval.num_samples, 5000 unless"]),
        ("compare", ["(default: test)", "(default: .)", "(default: all of them)"]),
        ("report", ["(default: 0)", "(default: RUN_DIR/report.html)"]),
        ("sample", ["(default: 64)", "(default: 0)", "(default: RUN_DIR/samples.png)"]),
        ("export", ["(default: torchscript)", "{torchscript,onnx}", "(default: RUN_DIR/export)"]),
    ],
)  # fmt: skip
def test_help_text_shows_known_defaults(command, expected, capsys, monkeypatch):
    text = _help([command], capsys, monkeypatch)
    for piece in expected:
        assert piece in text, piece
    assert "default: None" not in text and "(default: [])" not in text


def test_train_elbo_help_lists_iwae(capsys, monkeypatch):
    text = _help(["train"], capsys, monkeypatch)
    (line,) = [line for line in text.splitlines() if line.lstrip().startswith("--elbo")]
    assert all(name in line for name in ("trace", "meanfield", "iwae"))


def test_help_and_version_load_no_torch():
    # what keeps `pyro-vae --help` at about 0.15 s: torch is imported inside the commands only
    code = (
        "import sys\n"
        "from pyro_vae.cli import COMMANDS, main\n"
        "for argv in (['--help'], ['--version'], *([c, '--help'] for c in COMMANDS)):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, argv\n"
        "assert not any(m.split('.')[0] in ('torch', 'pyro') for m in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# --- progress bars -----------------------------------------------------------------


@pytest.fixture
def run_dir(tiny_run, tmp_path, monkeypatch):
    """A writable copy of the tiny digits run; q* refinement cut to a few steps (speed only)."""
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_run[0], copy)
    short = partial(evaluate_module.refine_posterior, max_steps=4, window=2, polish_steps=2)
    monkeypatch.setattr(evaluate_module, "refine_posterior", short)
    return str(copy)


SMALL = ["--num-samples", "4", "--max-data", "4"]


@pytest.mark.parametrize(
    "argv, bar",
    [
        (["evaluate", "{run}", "--gaps", *SMALL, "--batch-size", "2"], "log p(x):"),
        (["compare", "{run}", "{run}", *SMALL, "--out", "{tmp}"], "compare:"),
        (["evaluate", "{run}", "--bdmc", "2", "--ais-steps", "3", "--chains", "2",
          "--num-samples", "4"], "BDMC:"),
        (["evaluate", "{run}", "--estimator", "ais", "--max-data", "3", "--ais-steps", "3",
          "--chains", "2", "--batch-size", "2"], "AIS:"),
    ],
    ids=["evaluate-gaps", "compare", "bdmc", "ais"],
)  # fmt: skip
def test_long_commands_show_a_progress_bar_unless_quiet(argv, bar, run_dir, tmp_path, capsys):
    argv = [a.format(run=run_dir, tmp=tmp_path) for a in argv]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert bar in err and "100%" in err and BAR in err
    assert "<00:00" in err  # [elapsed<time left]
    assert main([*argv, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert BAR not in err and bar not in err


def test_the_library_shows_no_bar_unless_asked(tiny_run, capsys):
    vae = pyro_vae.load(tiny_run[0])
    x = torch.bernoulli(torch.full((3, *vae.event_shape), 0.3))
    seen = []
    ais_log_likelihood(vae, x, steps=3, chains=2, on_step=seen.append)
    bdmc(vae, 2, steps=3, chains=2)
    evaluate_module.evaluate(vae, x, num_samples=4)
    assert capsys.readouterr().err == ""
    assert sum(seen) == chain_steps(3, 3, 2)  # pilot and main run: 3 steps x 3 data x (2 + 4)
    ais_log_likelihood(vae, x, steps=3, chains=2, progress=True)
    assert "AIS:" in capsys.readouterr().err
    bdmc(vae, 2, steps=3, chains=2, progress=True)
    assert "BDMC:" in capsys.readouterr().err
    evaluate_module.evaluate(vae, x, num_samples=4, progress=True)
    assert "log p(x):" in capsys.readouterr().err


def test_time_estimates_go_to_logging_not_stderr(tiny_run, capsys, caplog, monkeypatch):
    vae = pyro_vae.load(tiny_run[0])
    x = torch.bernoulli(torch.full((3, *vae.event_shape), 0.3))
    logger = logging.getLogger("pyro_vae.evaluate")
    assert logger.handlers == []  # the library adds none; the CLI sets one up in main
    monkeypatch.setattr(evaluate_module, "estimate_seconds", lambda *args: 20.0)
    monkeypatch.setattr(evaluate_module, "_ais_seconds", lambda *args: 30.0)
    with caplog.at_level(logging.INFO, logger="pyro_vae.evaluate"):
        evaluate_module.evaluate(vae, x, num_samples=4)
        evaluate_module.evaluate_ais(vae, x, steps=2, chains=2)
    messages = [r.getMessage() for r in caplog.records if r.name == "pyro_vae.evaluate"]
    assert messages == ["evaluating 3 data with K = 4: about 20 s", "AIS on 3 data: about 30 s"]
    assert all(r.levelno == logging.INFO for r in caplog.records)
    assert "about" not in capsys.readouterr().err
