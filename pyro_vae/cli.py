"""The ``pyro-vae`` command line: a thin front end over the Python API.

Subcommands are listed in :data:`COMMANDS` (name -> (add arguments, run)).
Bad input (:class:`~pyro_vae.errors.UserError`, or an argument argparse
rejects) prints one line to stderr and exits with code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

from .errors import (
    ConfigError,
    NonFiniteLossError,
    PyroVAEWarning,
    TrainingInterrupted,
    UserError,
)

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help where X says something.

    Like :class:`argparse.ArgumentDefaultsHelpFormatter`, but quiet where the
    default is ``None``, ``False`` or empty (a flag left out, or a value
    decided later): the help text of such an option says itself what
    happens without it, in words containing "default" (``(default: the
    run's ...)``) or, for an on/off flag, by saying what turning it on does.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        default = action.default
        if (
            "default" in help_text
            or not action.option_strings
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
        ):
            return action.help
        return f"{help_text} (default: %(default)s)" if help_text else "(default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with :class:`_HelpFormatter`, whose errors are one line, exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message`` and exit 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


# --- train ----------------------------------------------------------------------

# flag -> dotted config key
_TRAIN_FLAGS: dict[str, str] = {
    "dataset": "data.name",
    "data_dir": "data.data_dir",
    "binarize": "data.binarize",
    "latent_dim": "model.latent_dim",
    "likelihood": "model.likelihood.name",
    "prior": "model.prior.name",
    "guide": "model.guide.name",
    "elbo": "train.elbo",
    "num_particles": "train.num_particles",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "seed": "train.seed",
    "device": "train.device",
    "method": "train.method",
}
_RESUMABLE = {"epochs", "device"}


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="FILE.toml",
        help="run config (TOML); flags override it (default: none, the built-in defaults)",
    )
    p.add_argument(
        "--dataset", help="dataset name, npz:PATH or folder:PATH of images (see `pyro-vae list`)"
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder with local data files (default: $PYRO_VAE_DATA, else the config's "
        "data_dir, else ~/.cache/pyro-vae)",
    )
    p.add_argument("--binarize", choices=["auto", "dynamic", "static", "none"])
    p.add_argument("--latent-dim", type=int, metavar="D")
    p.add_argument("--likelihood", help="likelihood name (see `pyro-vae list`)")
    p.add_argument("--prior", help="prior name (see `pyro-vae list`)")
    p.add_argument("--guide", help="guide name (see `pyro-vae list`)")
    p.add_argument(
        "--elbo",
        help="objective: trace (Monte Carlo KL), meanfield (analytic KL) or iwae (importance "
        "weighted bound, K = --num-particles); see `pyro-vae list`",
    )
    p.add_argument("--num-particles", type=int, metavar="P")
    p.add_argument("--epochs", type=int, metavar="N")
    p.add_argument("--batch-size", type=int, metavar="B")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--method",
        help="svi (amortized encoder) or variational-em (one q per datum, beside SVI)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config key, e.g. --set model.likelihood.scale=0.1 (with --resume: "
        "train.KEY for the schedule, selection and clipping keys); repeatable (default: none)",
    )
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/DATASET-TIME)")
    p.add_argument(
        "--resume", metavar="DIR", help="continue the run in DIR (default: start a new run)"
    )
    p.add_argument(
        "--tensorboard",
        nargs="?",
        const="",
        metavar="DIR",
        help="write TensorBoard event files to DIR (default: RUN/tensorboard): the loss and "
        "gradient norm of every step, the ELBO terms and learning rate of every epoch, and "
        "image grids every train.image_every epochs; needs the tensorboard extra",
    )
    _say_config_defaults(p)
    talk = p.add_mutually_exclusive_group()
    talk.add_argument("--quiet", action="store_true", help="no progress bar or epoch lines")
    talk.add_argument(
        "--verbose",
        action="store_true",
        help="also print debug messages (resume position, checkpoints and snapshots written)",
    )


def _say_config_defaults(p: argparse.ArgumentParser) -> None:
    """Append "(default: V, else the --config file's)" to the help of every config flag.

    The flags have no argparse default (an unset flag leaves the config's value),
    so the help states the value of :class:`~pyro_vae.config.Config` (torch-free).
    """
    from .config import Config

    defaults = Config()
    for action in p._actions:
        key = _TRAIN_FLAGS.get(action.dest)
        if key is None or "default" in (action.help or ""):
            continue
        value: Any = defaults
        for part in key.split("."):
            value = getattr(value, part)
        text = f"default: {value}, or the --config file's"
        action.help = f"{action.help} ({text})" if action.help else text


#: The train command's own messages (the trainer's go to ``pyro_vae.train``).
_log = logging.getLogger(__name__)


def _tensorboard_dir(args: argparse.Namespace, out: Path) -> Path:
    """The folder of ``--tensorboard [DIR]``: DIR, else ``out/tensorboard``."""
    from .tensorboard import TENSORBOARD_DIR

    return Path(args.tensorboard) if args.tensorboard else out / TENSORBOARD_DIR


def _tensorboard(args: argparse.Namespace, out: Path) -> list[Any]:
    """The callbacks of ``--tensorboard``: a :class:`TensorBoardCallback`, or none."""
    if args.tensorboard is None:
        return []
    from .tensorboard import TensorBoardCallback

    return [TensorBoardCallback(_tensorboard_dir(args, out))]


def _run_train(args: argparse.Namespace) -> int:
    from .config import Config, parse_override
    from .data import DATA_ENV
    from .train import fit, resume

    if args.tensorboard is not None:  # a missing extra: one line, before any work
        from .tensorboard import require_tensorboard

        require_tensorboard()
    given = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    progress = not args.quiet  # messages: the pyro_vae logger, printed by main's handler
    if args.resume:
        from .train import RESUMABLE_KEYS

        extra = sorted(set(given) - _RESUMABLE) + (["config"] if args.config else [])
        extra += ["out"] if args.out else []
        extra += ["plugin"] if args.plugin else []
        if extra:
            flag = "--" + extra[0].replace("_", "-")
            raise ConfigError(
                f"{flag} cannot change a run being resumed; only --epochs, --device and "
                "--set train.KEY=VALUE for schedule keys can"
            )
        changes = {}
        for key, value in (parse_override(s) for s in args.set):
            name = key.removeprefix("train.")
            if key == name or name not in RESUMABLE_KEYS:
                raise ConfigError(
                    f"--set {key} cannot change a run being resumed; resumable: "
                    + ", ".join(f"train.{k}" for k in RESUMABLE_KEYS)
                )
            changes[name] = value
        result = resume(
            args.resume,
            epochs=args.epochs,
            device=args.device,
            changes=changes,
            progress=progress,
            callbacks=_tensorboard(args, Path(args.resume)),
        )
        out = Path(args.resume)
        if result.epochs_run <= 0:
            done = result.history[-1]["epoch"] if result.history else 0
            if result.stopped_early is not None:
                print(
                    f"{out} stopped early at epoch {result.stopped_early} (no better validation "
                    f"ELBO for {result.config.train.early_stopping_patience} epochs): nothing to "
                    "do; pass --set train.early_stopping_patience=P with a larger P to train on"
                )
                return 0
            print(
                f"{out} is already at epoch {done} of {result.config.train.epochs}: nothing to "
                f"do; pass --epochs larger than {done} to train on"
            )
            return 0
    else:
        config = Config.load(args.config) if args.config else Config()
        overrides = dict(parse_override(s) for s in args.set)
        overrides.update({_TRAIN_FLAGS[k]: v for k, v in given.items()})
        if "data_dir" not in given and os.environ.get(DATA_ENV):  # flag > variable > config
            overrides["data.data_dir"] = os.environ[DATA_ENV]
        config = config.override(overrides)
        if args.plugin:
            config = dataclasses.replace(config, plugins=(*config.plugins, *args.plugin))
        from .data import dataset_slug

        name = dataset_slug(config.data.name)
        out = (
            Path(args.out)
            if args.out
            else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        from .registry import METHODS

        if METHODS.get(config.train.method).compare_with_amortized:
            from .distributed import launched_world_size
            from .em import fit_em

            if launched_world_size() > 1:  # [distributed] only SVI is data-parallel
                raise ConfigError(
                    f"--method {config.train.method} runs in one process; omit torchrun"
                )
            if args.tensorboard is not None:
                raise ConfigError(
                    f"--tensorboard does not apply to --method {config.train.method} (it trains "
                    "two models side by side); use --method svi, or resume the run with it"
                )
            em = fit_em(config, out, progress=progress)
            _log.info(em.summary())
            print(f"run saved in {out} (amortized comparison in {out / 'amortized'})")
            return 0
        result = fit(config, out, progress=progress, callbacks=_tensorboard(args, out))
    from .distributed import is_main

    if not is_main():  # [distributed] under torchrun, rank 0 prints the summary
        return 0
    tested = [r for r in result.history if "test_elbo" in r]
    if tested:
        first, last = tested[0], tested[-1]
        _log.info(
            f"test ELBO {first['test_elbo']:.2f} (epoch {first['epoch']}) -> "
            f"{last['test_elbo']:.2f} (epoch {last['epoch']}) nats per datum"
        )
    if result.best is not None:
        _log.info(
            f"best validation ELBO {result.best['valid_elbo']:.2f} at epoch "
            f"{result.best['epoch']} (weights in {out / 'best.pt'})"
        )
    if args.tensorboard is not None:
        log_dir = _tensorboard_dir(args, out)
        _log.info(f"TensorBoard event files in {log_dir}: tensorboard --logdir {log_dir}")
    # the command's result: printed even with --quiet
    print(f"run saved in {out}; load it with pyro_vae.load({str(out)!r})")
    return 0


# --- evaluate ---------------------------------------------------------------------


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"--iwae-k {text!r}: expected a comma-separated list of integers, e.g. 1,10,100"
        ) from None
    if not ks:
        raise ConfigError("--iwae-k: expected at least one K, e.g. 1,10,100")
    return ks


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``pyro-vae evaluate``."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by train")
    p.add_argument("--split", default="test", help="test, valid or train")
    p.add_argument(
        "--num-samples",
        type=int,
        metavar="K",
        help="importance samples per datum (default: the run's eval.num_samples, 5000 unless "
        "configured)",
    )
    p.add_argument(
        "--iwae-k",
        metavar="K1,K2,...",
        help="IWAE bounds to report (default: the run's eval.iwae_k up to K, 1,10,100,1000,5000 "
        "unless configured)",
    )
    p.add_argument(
        "--proposal",
        choices=("guide", "prior"),
        default="guide",
        help="importance sampling proposal, or AIS start distribution",
    )
    p.add_argument(
        "--estimator",
        choices=("is", "ais"),
        default="is",
        help="is: importance sampling; ais: annealed importance sampling with HMC",
    )
    p.add_argument(
        "--checkpoint",
        choices=("last", "best"),
        default="last",
        help="last: checkpoint.pt; best: best.pt, the best validation ELBO",
    )
    p.add_argument("--ais-steps", type=_positive_int, default=500, metavar="T", help="AIS steps")
    p.add_argument("--chains", type=_positive_int, default=16, metavar="C", help="AIS chains")
    p.add_argument(
        "--bdmc",
        type=_positive_int,
        metavar="N",
        help="instead: simulate N data from the model and sandwich their log p(x) between "
        "forward and reverse AIS (bidirectional Monte Carlo); writes RUN_DIR/bdmc.json "
        "(default: off, evaluate the split)",
    )
    p.add_argument(
        "--gaps", action="store_true", help="approximation and amortization gaps (slower)"
    )
    p.add_argument(
        "--max-data",
        type=int,
        metavar="N",
        help="the first N data of the split (default: all of them)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="B",
        help="data per batch (default: the run's eval.batch_size, 100 unless configured)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        metavar="S",
        help="samples per decoder call (default: the run's eval.chunk_size, 4096 unless "
        "configured)",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="seed of the importance samples (default: the run's eval.seed, 0 unless "
        "configured; 0 with --bdmc)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--max-hours",
        type=float,
        default=24.0,
        metavar="H",
        help="refuse, before sampling, an evaluation estimated to take longer",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")


def format_bdmc(s: dict[str, Any]) -> str:
    """The sandwich of :func:`~pyro_vae.evaluate.bdmc_run` as a few lines."""
    lines = [
        f"BDMC on {s['num_data']} data simulated from the model ({s['ais_steps']} AIS steps, "
        f"{s['chains']} chains):",
        f"  upper bound (reverse AIS)  {s['upper']:10.3f}  "
        f"(Monte Carlo SE {s['upper_mc_stderr']:.3f})",
        f"  lower bound (forward AIS)  {s['lower']:10.3f}  "
        f"(Monte Carlo SE {s['lower_mc_stderr']:.3f})",
        f"  gap                        {s['gap']:10.3f}  (the bound on either's bias)",
    ]
    if s.get("is_log_likelihood") is not None:
        lines += [
            f"  IS, K = {s['num_samples']:<18} {s['is_log_likelihood']:10.3f}  "
            f"({s['is_minus_lower']:+.3f} against the lower bound)",
            f"  ELBO                       {s['elbo']:10.3f}  "
            f"({s['elbo_minus_lower']:+.3f} against the lower bound)",
        ]
    return "\n".join(lines)


def _positive_hours(hours: float) -> float:
    if not 0 < hours < float("inf"):
        raise ConfigError(f"--max-hours must be a positive number of hours, got {hours}")
    return hours


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``pyro-vae evaluate``: print the table, write the two files."""
    from .evaluate import BDMC_FILE, EVALUATION_FILE, PER_DATUM_FILE, bdmc_run, evaluate_run

    if args.bdmc is not None:
        s = bdmc_run(
            args.run_dir, args.bdmc, steps=args.ais_steps, chains=args.chains,
            num_samples=args.num_samples, seed=args.seed or 0, device=args.device,
            progress=not args.quiet,
        )  # fmt: skip
        if not args.quiet:
            print(format_bdmc(s))
        print(f"wrote {Path(args.run_dir) / BDMC_FILE}")
        return 0
    result = evaluate_run(
        args.run_dir,
        split=args.split,
        num_samples=args.num_samples,
        iwae_k=None if args.iwae_k is None else _parse_ks(args.iwae_k),
        proposal=args.proposal,
        gaps=args.gaps,
        max_data=args.max_data,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
        max_seconds=_positive_hours(args.max_hours) * 3600,
        estimator=args.estimator,
        ais_steps=args.ais_steps,
        chains=args.chains,
        checkpoint=args.checkpoint,
    )
    if not args.quiet:
        print(result.table())
    print(f"wrote {Path(args.run_dir) / EVALUATION_FILE} and {PER_DATUM_FILE}")
    return 0


# --- compare ----------------------------------------------------------------------------


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``pyro-vae compare``."""
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="two or more run directories")
    p.add_argument("--split", default="test", help="test, valid or train")
    p.add_argument(
        "--num-samples",
        type=int,
        metavar="K",
        help="importance samples per datum (default: each run's eval.num_samples, 5000 unless "
        "configured)",
    )
    p.add_argument(
        "--max-data",
        type=int,
        metavar="N",
        help="the first N data of the split (default: all of them)",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="seed of the importance samples (default: each run's eval.seed, 0 unless configured)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--max-hours", type=float, default=24.0, metavar="H",
        help="refuse, before sampling, an evaluation of a run estimated to take longer",
    )  # fmt: skip
    p.add_argument("--out", default=".", metavar="DIR", help="where comparison.json goes")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")


def run_compare(args: argparse.Namespace) -> int:
    """Evaluate runs on the same data; print and write the paired differences."""
    from .evaluate import compare_runs, write_comparison

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for comparison.json")
    if len(args.run_dirs) < 2:
        raise ConfigError("compare needs at least two run directories")
    comparison = compare_runs(
        args.run_dirs,
        split=args.split,
        num_samples=args.num_samples,
        max_data=args.max_data,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
        max_seconds=_positive_hours(args.max_hours) * 3600,
    )
    if not args.quiet:
        print(comparison.table())
    print(f"wrote {write_comparison(comparison, out)}")
    return 0


# --- report and sample ---------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``pyro-vae report``."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (from pyro-vae train)")
    p.add_argument("--out", metavar="FILE.html", help="output file (default: RUN_DIR/report.html)")
    p.add_argument(
        "--compare",
        metavar="OTHER_RUN",
        help="another run on the same data to draw beside this one, e.g. an autoencoder "
        "(default: none, this run alone)",
    )
    p.add_argument("--split", help="data split for the figures (default: the evaluated one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and data shown")


def run_report(args: argparse.Namespace) -> int:
    """Write the report; print where it is."""
    from .report import write_report

    path = write_report(
        args.run_dir, args.out, compare=args.compare, split=args.split, seed=args.seed
    )
    print(f"report written to {path}; open it in a browser (it works offline)")
    return 0


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``pyro-vae sample``."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (from pyro-vae train)")
    p.add_argument("-n", "--num", type=_positive_int, default=64, help="number of samples")
    p.add_argument("--out", metavar="FILE.png", help="output PNG (default: RUN_DIR/samples.png)")
    p.add_argument("--nrow", type=_positive_int, help="images per row (default: about sqrt(n))")
    p.add_argument("--seed", type=int, default=0, help="seed of the prior draws")
    p.add_argument(
        "--scale",
        type=_positive_int,
        help="screen pixels per image pixel (default: a grid at least 256 px wide)",
    )


def run_sample(args: argparse.Namespace) -> int:
    """Decode ``n`` prior samples of a run into one PNG grid."""
    from .report import write_samples

    out = write_samples(args.run_dir, args.num, args.out, args.nrow, args.seed, args.scale)
    print(f"{args.num} samples written to {out}")
    return 0


# --- export ---------------------------------------------------------------------


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``pyro-vae export``."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (from pyro-vae train)")
    p.add_argument(
        "--format",
        default="torchscript",
        choices=("torchscript", "onnx"),
        help="torchscript: encoder.pt and decoder.pt for torch.jit.load; onnx: encoder.onnx and "
        'decoder.onnx for any ONNX runtime (needs the onnx extra: pip install -e ".[onnx]")',
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/export)")


#: How each export format's files are loaded (``pyro-vae export`` says so).
_LOADERS = {"torchscript": "torch.jit.load", "onnx": "onnxruntime.InferenceSession"}


def run_export(args: argparse.Namespace) -> int:
    """Write the encoder mean and the decoder as standalone TorchScript or ONNX files."""
    from .export import check_format

    check_format(args.format)  # missing packages: refused before the run is read
    from .checkpoint import load
    from .export import export

    out = Path(args.out) if args.out else Path(args.run_dir) / "export"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    paths = export(load(args.run_dir), out, args.format)
    print(f"wrote {' and '.join(map(str, paths))}; load them with {_LOADERS[args.format]} alone")
    return 0


# --- list -----------------------------------------------------------------------


def _add_list(p: argparse.ArgumentParser) -> None:
    pass


def _run_list(args: argparse.Namespace) -> int:
    from .data import dataset_names
    from .nets import ACTIVATIONS
    from .registry import GUIDES, LIKELIHOODS, METHODS, NETWORKS, OBJECTIVES, PRIORS

    sections = {
        "datasets": dataset_names(),
        "priors": PRIORS.names(),
        "guides": GUIDES.names(),
        "likelihoods": LIKELIHOODS.names(),
        "networks": NETWORKS.names(),
        "activations": list(ACTIVATIONS),
        "objectives": OBJECTIVES.names(),
        "methods": METHODS.names(),
    }
    for title, names in sections.items():
        print(f"{title}: {', '.join(names)}")
    return 0


#: Subcommand name -> (help, add its arguments, run it).
COMMANDS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {
    "train": ("train a VAE by SVI", _add_train, _run_train),
    "list": (
        "list datasets, priors, guides, likelihoods, networks, activations, objectives and "
        "training methods",
        _add_list,
        _run_list,
    ),
    "evaluate": (
        "log p(x) by importance sampling, IWAE bounds, ESS, k-hat and gaps",
        add_evaluate_arguments,
        run_evaluate,
    ),
    "compare": (
        "log p(x) of several runs on the same data, with paired differences",
        add_compare_arguments,
        run_compare,
    ),
    "report": ("write RUN_DIR/report.html (figures, metrics)", add_report_arguments, run_report),
    "sample": ("decode prior samples of a run into a PNG grid", add_sample_arguments, run_sample),
    "export": (
        "write the encoder mean and the decoder as TorchScript or ONNX files (no pyro_vae needed)",
        add_export_arguments,
        run_export,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-vae`` argument parser with every subcommand of :data:`COMMANDS`."""
    parser = _Parser(prog="pyro-vae", description="Variational autoencoders as Pyro programs.")
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"pyro-vae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help_text, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.add_argument(
            "--plugin",
            action="append",
            default=[],
            metavar="MODULE",
            help="import MODULE first (it registers your own components); repeatable. "
            "A run records its plugins: later commands on it import them by themselves "
            "(default: none besides those)",
        )
        p.set_defaults(run=run)
    return parser


def _note(command: str, message: Warning | str, category: type[Warning], *rest: Any) -> None:
    """Print pyro-vae's own warnings as one line; others as Python does."""
    if issubclass(category, PyroVAEWarning):
        from tqdm.auto import tqdm

        tqdm.write(f"pyro-vae {command}: note: {message}", file=sys.stderr)  # under any bar
    else:
        _show_warning(message, category, *rest)


_show_warning = warnings.showwarning


class _ConsoleHandler(logging.Handler):
    """pyro-vae's log records on a terminal: warnings to stderr, others to stdout, under any bar."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        """Write the record's message as one line (``tqdm.write``: progress bars stay intact)."""
        try:
            from tqdm.auto import tqdm

            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                kind = record.levelname.lower()
                tqdm.write(f"pyro-vae {self.command}: {kind}: {message}", file=sys.stderr)
            else:
                tqdm.write(message, file=sys.stdout)
        except Exception:  # a closed stream: as logging does
            self.handleError(record)


@contextmanager
def _console_logging(args: argparse.Namespace) -> Iterator[None]:
    """Print the ``pyro_vae`` loggers' messages while a command runs; leave logging as it was.

    ``--quiet``: warnings only; ``--verbose``: debug messages too.
    """
    package = logging.getLogger("pyro_vae")
    if getattr(args, "verbose", False):
        level = logging.DEBUG
    else:
        level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    handler, previous = _ConsoleHandler(args.command), package.level
    package.addHandler(handler)
    package.setLevel(level)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for bad input, 130 when interrupted)."""
    args = build_parser().parse_args(argv)  # --help and --version: no torch loaded
    from . import build, em  # noqa: F401  (every component and method registered)
    from .plugins import import_plugins

    try:
        with warnings.catch_warnings(), _console_logging(args):
            warnings.showwarning = partial(_note, args.command)
            import_plugins(args.plugin)
            return args.run(args)
    except UserError as e:
        print(f"pyro-vae {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingInterrupted as e:
        print(f"pyro-vae {args.command}: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NonFiniteLossError as e:
        print(f"pyro-vae {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"pyro-vae {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
