"""The run report: one self-contained HTML page per run directory.

``pyro-vae report RUN_DIR`` (or :func:`write_report`) writes
``RUN_DIR/report.html``: a table of the run's final metrics first, then
the environment (pyro-vae, torch and pyro versions, device, threads, git
commit of the machine making the report) and the run's config folded in a
``<details>`` element, then the figures of :mod:`pyro_vae.plots`; each
section has a short text on how to read it. Images are embedded as base64
PNG and the page has no scripts, style sheets or links to fetch, so it
opens offline. The report uses whatever the run directory holds: a run
still training (or stopped) gets the figures its files support and a note
for the rest; the evaluation section needs ``evaluation.json`` (and
``evaluation_per_datum.npz``) from ``pyro-vae evaluate``.

This module also holds the ``report`` and ``sample`` subcommands of the
CLI; matplotlib is imported only when they run.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import CHECKPOINT_FILE, CONFIG_FILE, load, load_run, read_metrics
from .config import Config
from .environment import describe_environment
from .environment import environment as current_environment
from .errors import CheckpointError, DataError, PyroVAEWarning, UserError

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

    from .data import PreparedData
    from .model import VAE

REPORT_FILE = "report.html"
EVALUATION_FILE = "evaluation.json"
BDMC_FILE = "bdmc.json"
PER_DATUM_FILE = "evaluation_per_datum.npz"

#: Section id -> title, in page order.
SECTIONS: dict[str, str] = {
    "metrics": "Final metrics",
    "config": "Environment and configuration",
    "training": "Training curves",
    "generation": "What the model generates",
    "latent": "The latent space",
    "collapse": "Posterior collapse and active units",
    "evaluation": "Is the log-likelihood estimate reliable?",
    "bdmc": "How biased is the estimator? (bidirectional Monte Carlo)",
}

_HOW_TO_READ: dict[str, str] = {
    "config": (
        "<b>Environment</b>: the software versions and the machine behind these numbers; "
        "results can change with them, so quote them with the metrics. "
        "<b>Configuration</b> (click to unfold): the complete, resolved settings of the run "
        "(every default filled in); <code>pyro-vae train --config config.toml</code> trains "
        "the same model again."
    ),
    "metrics": (
        "All numbers are in nats per datum, measured on held-out data. The ELBO is a lower "
        "bound on log p(x); higher is better. ELBO = reconstruction &minus; KL. Where the run "
        "was evaluated, log p&#770;(x) is the importance-sampling estimate of the "
        "log-likelihood, the number to compare across models."
    ),
    "training": (
        "<b>ELBO.</b> Both curves should rise and flatten. The train ELBO is averaged over the "
        "epoch while the model is still changing, so early on it lags behind the test ELBO; a "
        "train curve that keeps rising while the test curve falls is overfitting. "
        "<b>Tug of war.</b> The reconstruction term rewards latent codes that carry "
        "information about x; the KL term charges for that information (how far q(z|x) moves "
        "away from the prior). Typically the KL rises early, as the encoder starts to use z, "
        "then settles. A KL near 0 with a poor reconstruction is posterior collapse. "
        "<b>KL per dimension.</b> Each row of the heatmap is one latent dimension, each column "
        "one epoch; the colour is that dimension's test KL (scale on the colorbar). Rows that "
        "stay at the colour of 0 are dimensions the model does not use. "
        "<b>Loss per step.</b> Each dot is one minibatch's loss (the negative training "
        "objective, nats per datum), the line their moving average. The line should fall fast, "
        "then slowly; the dots scatter around it by the gradient noise of the minibatches. A "
        "line that turns up, or jumps, points to a learning rate too high."
    ),
    "generation": (
        "<b>Samples</b> show what the model believes data look like: z drawn from the prior, "
        "decoded. The images are decoder means (pixel probabilities for a Bernoulli "
        "likelihood), so they look smoother than binary data. Blurry, all-alike samples "
        "suggest underfitting or collapse; samples much worse than the reconstructions suggest "
        "regions of the prior that the encoder never uses (holes in the latent space). "
        "<b>Reconstructions</b> should keep each input's identity and shape. "
        "<b>Interpolations</b> decode points on the straight line between two inputs' codes; "
        "in a smooth latent space every step is a plausible datum. The <b>manifold</b> "
        "(2-D latent spaces only) shows the whole latent space at once. <b>Samples over "
        "training</b> decode the same prior draws after several epochs (one row per epoch, "
        "one draw per column): reading a column downwards shows a sample taking shape; rows "
        "that stop changing mean the decoder has settled."
    ),
    "latent": (
        "Each point is the posterior mean E<sub>q</sub>[z|x] of one held-out datum. With "
        "labels, the colours show whether the model separated the classes without ever seeing "
        "a label. For more than 2 latent dimensions the picture is a linear projection (PCA), "
        "so classes that overlap in the picture may still be apart in latent space. A VAE's "
        "KL term keeps the codes near the prior (for N(0, I), mostly within &plusmn;3); an "
        "autoencoder's codes (a point-estimate <code>delta</code> guide, no KL) can take any "
        "scale and leave gaps, which is why decoding prior samples works for a VAE and not "
        "for an autoencoder."
    ),
    "collapse": (
        "A latent dimension d is <b>active</b> when its posterior mean changes with the input: "
        "Burda et al. (2016) count it active when Cov<sub>x</sub>(E<sub>q</sub>[z<sub>d</sub>]) "
        "&gt; 0.01. An inactive dimension has q(z<sub>d</sub>|x) &asymp; p(z<sub>d</sub>) for "
        "every x: the decoder ignores it and its KL is &asymp; 0. Some inactive units are "
        "normal: the KL penalty switches off dimensions the model does not need. <b>All</b> "
        "units inactive is posterior collapse: the decoder models the data without z, and the "
        "latent space carries no information (common with powerful decoders; KL warm-up or "
        "free bits help)."
    ),
    "evaluation": (
        "log p(x) is estimated by importance sampling with q(z|x) as the proposal, "
        "log (1/K) &Sigma;<sub>k</sub> p(x, z<sub>k</sub>)/q(z<sub>k</sub>|x). That is the "
        "IWAE bound L<sub>K</sub>: below log p(x) on average, rising towards it as K grows. "
        "Four checks: (1) <b>IWAE against K</b>: if the bound still climbs at the largest K, "
        "the true log p(x) is probably higher than reported. (2) <b>k&#770;</b>, the shape of "
        "the Pareto tail of the importance weights, per datum (the figure draws the three "
        "thresholds): below 0.5 the weights' variance is finite and the estimate reliable; "
        "0.5 to 0.7 the variance is infinite but the estimate usable; above 0.7 that datum's "
        "estimate is unreliable, usually too low; above 1 even the weights' mean is infinite "
        "(Vehtari et al., Pareto smoothed importance sampling). (3) <b>ESS</b>, how many of "
        "the K samples effectively count: ESS far below K means a few samples carry all the "
        "weight. (4) <b>Gaps</b>: log p&#770;(x) &minus; ELBO estimates "
        "KL(q(z|x) &#8214; p(z|x)), how far the encoder's posterior is from the true one; "
        "where measured, it splits into the approximation gap (the limit of the guide's "
        "family) and the amortization gap (the encoder missing the best member of that "
        "family; Cremer et al. 2018). Each gap is a KL divergence, so never negative in "
        "truth, but its per-datum estimate is a difference of Monte Carlo estimates (and q* "
        "is found by stochastic optimization, within about 0.002 nats of the optimum): a "
        "datum whose gap is near zero can come out slightly negative by noise alone. Read "
        "the means, with their errors."
    ),
    "bdmc": (
        "Importance sampling and AIS estimate log p(x) from below: in expectation they are "
        "lower bounds, and how far below is unknown on real data. On data simulated from the "
        "model itself, the exact posterior sample z that generated each x is known, so reverse "
        "AIS started from it gives a stochastic <b>upper</b> bound, while forward AIS gives a "
        "lower one (Grosse, Ghahramani &amp; Adams 2015; Wu et al. 2017). The true log p(x) "
        "lies between them: the <b>gap</b> bounds the bias of either, and where the IS "
        "estimate with K samples falls against the lower bound says how much to trust the "
        "IS number of the evaluation section on data like the model's own."
    ),
}

_CSS = """
body { font-family: sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
.howto { background: #f3f6fa; border-left: 4px solid #6b8cc7; padding: 0.6em 1em;
         font-size: 0.92em; }
.note { background: #fff7e0; border-left: 4px solid #e0b000; padding: 0.4em 1em; }
.verdict { font-weight: bold; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.metrics { width: 100%; }
table.metrics td { vertical-align: baseline; }
table.metrics td:first-child { white-space: nowrap; }
table.env td:first-child { white-space: nowrap; }
details { margin: 1em 0; }
summary { cursor: pointer; font-weight: bold; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.88em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
"""


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return html.escape(str(value))


@dataclass
class _Section:
    """The HTML parts of one report section."""

    key: str
    parts: list[str] = field(default_factory=list)

    def add(self, fragment: str) -> None:
        self.parts.append(fragment)

    def text(self, text: str, css: str | None = None) -> None:
        klass = f' class="{css}"' if css else ""
        self.parts.append(f"<p{klass}>{html.escape(text)}</p>")

    def note(self, text: str) -> None:
        self.text(text, "note")

    def figure(self, name: str, caption: str, draw: Callable[..., Figure], *args: Any) -> bool:
        """Draw a figure and embed it; a :class:`UserError` becomes a note instead."""
        from .plots import figure_png

        try:
            fig = draw(*args)
        except UserError as e:
            self.note(f"{caption}: not drawn ({e}).")
            return False
        data = base64.b64encode(figure_png(fig)).decode("ascii")
        fig.clear()
        self.parts.append(
            f'<figure id="fig-{name}"><img alt="{html.escape(caption)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}'
            "</figcaption></figure>"
        )
        return True

    def render(self) -> str:
        title = html.escape(SECTIONS[self.key])
        body = "\n".join(self.parts)
        return (
            f'<section id="{self.key}"><h2>{title}</h2>\n'
            f'<div class="howto"><b>How to read this.</b> {_HOW_TO_READ[self.key]}</div>\n'
            f"{body}\n</section>"
        )


def load_evaluation(
    run_dir: str | os.PathLike[str],
) -> tuple[dict[str, Any] | None, dict[str, np.ndarray] | None]:
    """``evaluation.json`` and ``evaluation_per_datum.npz`` of a run, each ``None`` if absent.

    Raises:
        CheckpointError: a file exists but cannot be read.
    """
    import numpy as np

    run_dir = Path(run_dir)
    summary = per_datum = None
    path = run_dir / EVALUATION_FILE
    if path.exists():
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
    path = run_dir / PER_DATUM_FILE
    if path.exists():
        try:
            with np.load(path) as f:
                per_datum = {key: np.asarray(f[key]) for key in f.files}
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
    return summary, per_datum


@dataclass
class _Run:
    """What a run directory holds, loaded as far as possible."""

    path: Path
    config_text: str
    config: Config
    history: list[dict[str, Any]]
    evaluation: dict[str, Any] | None
    per_datum: dict[str, np.ndarray] | None
    vae: VAE | None = None
    bdmc: dict[str, Any] | None = None
    data: PreparedData | None = None
    problems: dict[str, str] = field(default_factory=dict)
    #: What the checkpoint recorded of its last training session (pyro-vae >= 0.3).
    trained_environment: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return bool(self.history) and self.history[-1]["epoch"] >= self.config.train.epochs


def _load_run(run_dir: Path) -> _Run:
    config_path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if not config_path.exists():
        raise CheckpointError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    config_text = config_path.read_text()
    try:
        config = Config.from_toml(config_text)
    except UserError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    evaluation, per_datum = load_evaluation(run_dir)
    run = _Run(run_dir, config_text, config, read_metrics(run_dir), evaluation, per_datum)
    if (run_dir / BDMC_FILE).exists():
        try:
            run.bdmc = json.loads((run_dir / BDMC_FILE).read_text())
        except (OSError, ValueError) as e:
            _warn(f"the report of {run_dir} has no BDMC section: {BDMC_FILE} unreadable ({e})")
    if not (run_dir / CHECKPOINT_FILE).exists():
        run.problems["model"] = f"no {CHECKPOINT_FILE} yet (the first epoch has not finished)"
        return run
    try:
        run.vae, state = load_run(run_dir)
        run.trained_environment = state.get("environment")
    except UserError as e:
        run.problems["model"] = str(e)
        _warn(f"the report of {run_dir} has no model figures: {e}")
        return run
    from .train import load_data

    try:
        run.data = load_data(config)
    except UserError as e:
        run.problems["data"] = f"the data could not be loaded: {e}"
        _warn(f"the report of {run_dir} has no data figures: the data could not be loaded: {e}")
    return run


def _warn(message: str) -> None:
    """Say on stderr (through the CLI) what a report leaves out, besides the page's note."""
    warnings.warn(message, PyroVAEWarning, stacklevel=3)


def _choose_split(run: _Run, split: str | None) -> str | None:
    if run.data is None:
        return split
    if split is not None:
        run.data.split(split)  # a DataError names the valid splits
        return split
    wanted = (run.evaluation or {}).get("split", "test")
    if wanted in run.data.splits:
        return wanted
    others = [s for s in run.data.splits if s != "train"]
    return others[0] if others else "train"


def _status(run: _Run) -> str:
    done = run.history[-1]["epoch"] if run.history else 0
    total = run.config.train.epochs
    state = "finished" if run.finished else "unfinished"
    model = run.config.model
    parts = [
        f"dataset {run.config.data.name}",
        f"latent_dim {model.latent_dim}",
        f"prior {model.prior.name}",
        f"guide {model.guide.name}",
        f"likelihood {model.likelihood.name}",
        f"objective {run.config.train.elbo}",
        f"{done} of {total} epochs ({state})",
        "evaluated" if run.evaluation is not None else "not evaluated yet",
    ]
    return "; ".join(parts)


# --- sections ----------------------------------------------------------------------


def environment() -> dict[str, str]:
    """The software and machine making the report: name -> value (plain text).

    :func:`pyro_vae.environment.environment` for the CPU, where the report
    computes (it loads the model there).
    """
    return describe_environment(current_environment("cpu"))


def _config_section(run: _Run) -> _Section:
    section = _Section("config")
    now = environment()
    trained = run.trained_environment
    if trained:
        columns = [("trained with (its last session)", describe_environment(trained))]
        section.add(
            "<p>The first column is what the checkpoint recorded when its last training "
            "session ran; the second is the machine that made this report, now.</p>"
        )
    else:
        columns = []
        section.add(
            "<p>The checkpoint records no software versions (it was written by pyro-vae "
            "before 0.3), so these describe the machine that made this report, now, which may "
            "differ from the one that trained or evaluated the run. The run records its "
            f"training device only: <code>train.device = "
            f"{html.escape(run.config.train.device)}</code>.</p>"
        )
    columns.append(("report made with (this machine, now)", now))
    names = list(dict.fromkeys(k for _, c in columns for k in c))
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in columns)
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{html.escape(c.get(name, '-'))}</td>" for _, c in columns)
        + "</tr>"
        for name in names
    )
    section.add(f'<table class="env"><tr><th></th>{head}</tr>{rows}</table>')
    section.add(
        "<details><summary>Configuration (config.toml)</summary>"
        f"<pre>{html.escape(run.config_text)}</pre></details>"
    )
    return section


def _metrics_section(run: _Run, active: tuple[int, int] | None) -> _Section:
    section = _Section("metrics")
    if run.vae is not None and run.vae.posterior.is_point_estimate:
        section.note(
            f"This run's guide ({run.config.model.guide.name}) is a point estimate: the model "
            "is a plain autoencoder, trained on the reconstruction alone. Its 'ELBO' and 'KL' "
            "are not a bound on log p(x) and cannot be compared with a VAE's."
        )
    rows: list[tuple[str, str, str]] = []  # (name, value, meaning), all HTML
    if run.history:
        last = run.history[-1]
        rows.append(("epochs", f"{last['epoch']} of {run.config.train.epochs}", ""))
        names = {
            "train_elbo": ("train ELBO", "running average over the last epoch"),
            "test_elbo": ("test ELBO", "after the last epoch, one z per datum"),
            "test_reconstruction": ("test reconstruction", "E<sub>q</sub>[log p(x|z)]"),
            "test_kl": ("test KL", "KL(q(z|x) &#8214; p(z))"),
            "valid_elbo": ("validation ELBO", ""),
        }
        for key, (name, meaning) in names.items():
            if last.get(key) is not None:
                rows.append((name, _fmt(float(last[key])), meaning))
        seconds = sum(float(r.get("seconds", 0.0)) for r in run.history)
        rows.append(("training time", f"{seconds:.1f} s", "sum over epochs"))
    else:
        section.note("No epoch has finished yet: metrics.jsonl is empty or absent.")
    if active is not None:
        rows.append(
            (
                "active units",
                f"{active[0]} of {active[1]}",
                "Cov<sub>x</sub>(E<sub>q</sub>[z<sub>d</sub>]) &gt; 0.01",
            )
        )
    if run.evaluation is not None:
        rows += _evaluation_rows(run.evaluation)
    if rows:
        body = "".join(
            f'<tr><td>{name}</td><td class="num">{value}</td><td>{meaning}</td></tr>'
            for name, value, meaning in rows
        )
        section.add(
            '<table class="metrics"><tr><th>quantity</th><th>value</th><th>meaning</th></tr>'
            f"{body}</table>"
        )
    return section


def _evaluation_rows(ev: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Metrics-table rows (name, value, meaning; HTML) from ``evaluation.json``."""

    def number(key: str) -> float | None:
        value = ev.get(key)
        return float(value) if isinstance(value, (int, float)) else None

    rows = []
    k = _fmt(ev.get("num_samples"))
    where = html.escape(f"{ev.get('split', '?')} split, {ev.get('num_data', '?')} data")
    proposal = html.escape(str(ev.get("proposal", "guide")))
    if (ll := number("log_likelihood")) is not None:
        value = _fmt(ll)
        if (se := number("log_likelihood_stderr")) is not None:
            value += f"&nbsp;&plusmn;&nbsp;{_fmt(se)}"
        meaning = (
            f"importance sampling, K = {k}, proposal {proposal}; {where}; "
            "&plusmn; SE over data (the spread of log p(x) across data points; to compare two "
            "models on the same data use the paired SE of <code>pyro-vae compare</code>)"
        )
        rows.append(("log-likelihood log p&#770;(x)", value, meaning))
    if (mc := number("log_likelihood_mc_stderr")) is not None:
        rows.append(
            ("Monte Carlo SE of log p&#770;(x)", _fmt(mc, 3), "error from the K draws alone")
        )
    if (exact := number("exact_log_likelihood")) is not None:
        rows.append(("exact log p(x)", _fmt(exact), "closed form (linear-Gaussian model)"))
    if (elbo := number("elbo")) is not None:
        rows.append(("ELBO (evaluation)", _fmt(elbo), f"mean over K draws; {where}"))
    for key, name, meaning in (
        ("total_gap", "total gap", "log p&#770;(x) &minus; ELBO = KL(q(z|x) &#8214; p(z|x))"),
        ("approximation_gap", "approximation gap", "log p(x) &minus; ELBO(q*)"),
        ("amortization_gap", "amortization gap", "ELBO(q*) &minus; ELBO(q)"),
    ):
        if (value := number(key)) is not None:
            rows.append((name, _fmt(value), meaning))
    if (ess := number("ess_mean")) is not None:
        low = number("ess_min")
        meaning = f"of K = {k}" + (f"; smallest {_fmt(low, 1)}" if low is not None else "")
        rows.append(("mean ESS", _fmt(ess, 1), meaning))
    if (frac := number("khat_fraction_above_0_7")) is not None:
        rows.append(
            ("data with k&#770; &gt; 0.7", f"{100 * frac:.1f}%", "their estimates are unreliable")
        )
    elif "khat_fraction_above_0_7" in ev:
        rows.append(("data with k&#770; &gt; 0.7", "&ndash;", "undefined: K &lt; 25"))
    return rows


def _training_section(run: _Run) -> _Section:
    from . import plots

    section = _Section("training")
    if not run.history:
        section.note("No epoch has finished yet, so there are no curves to draw.")
        return section
    first, last = run.history[0], run.history[-1]
    if first.get("test_elbo") is not None and last.get("test_elbo") is not None:
        summary = (
            f"Test ELBO {first['test_elbo']:.2f} at epoch {first['epoch']}, "
            f"{last['test_elbo']:.2f} at epoch {last['epoch']}."
        )
        if last.get("train_elbo") is not None:
            gap = last["train_elbo"] - last["test_elbo"]
            summary += f" At the end, train minus test ELBO = {gap:.2f} nats."
        if not run.finished:
            summary += f" The run is unfinished ({run.config.train.epochs} epochs planned)."
        section.text(summary)
    section.figure("elbo", "Train and test ELBO per epoch", plots.plot_elbo, run.history)
    if any(r.get("step_losses") for r in run.history):
        steps = plots.step_series(run.history)[0]
        if steps[0] > 1:
            section.text(
                f"Steps 1 to {steps[0] - 1} were trained by an earlier pyro-vae version, which "
                "kept no per-step losses: the curve starts where the run was resumed."
            )
        section.figure("step-loss", "Training loss per step", plots.plot_step_loss, run.history)
    else:
        section.note(
            "Loss per step: this run's metrics.jsonl keeps one value per epoch (it was trained "
            "by an earlier pyro-vae version); resume it, or train again, to record every step."
        )
    section.figure(
        "elbo-terms",
        "Reconstruction and KL terms of the test ELBO",
        plots.plot_elbo_terms,
        run.history,
    )
    section.figure(
        "kl-history",
        "Test KL of each latent dimension over epochs",
        plots.plot_kl_history,
        run.history,
    )
    return section


def _model_missing(section: _Section, run: _Run, needs_data: bool) -> bool:
    """Add a note and return True when the model (or the data) is unavailable."""
    if run.vae is None:
        section.note(f"Not available: {run.problems.get('model', 'no model')}.")
        return True
    if needs_data and run.data is None:
        section.note(f"Not available: {run.problems.get('data', 'no data')}.")
        return True
    return False


def _generation_section(run: _Run, split: str | None, seed: int) -> _Section:
    from . import plots

    section = _Section("generation")
    if _model_missing(section, run, needs_data=False):
        _samples_over_training(section, run)
        return section
    assert run.vae is not None
    if not plots.is_image_shape(run.vae.event_shape):
        section.note(
            f"Not drawn: a datum has shape {tuple(run.vae.event_shape)}, not an image "
            "(H, W) or (C, H, W)."
        )
        return section
    section.figure(
        "prior-samples",
        "Decoded samples from the prior",
        plots.plot_prior_samples,
        run.vae,
        64,
        seed,
    )
    _samples_over_training(section, run)
    if run.data is None:
        section.note(f"Reconstructions and interpolations: {run.problems['data']}.")
    else:
        x = run.data.split(split or "test")
        section.figure(
            "reconstructions",
            f"Reconstructions of {split} data",
            plots.plot_reconstructions,
            run.vae,
            x,
            10,
            seed,
        )
        section.figure(
            "interpolations",
            f"Interpolations between {split} data",
            plots.plot_interpolations,
            run.vae,
            x,
            5,
            8,
            seed,
        )
    if run.vae.latent_dim == 2:
        section.figure(
            "manifold", "The 2-D latent manifold", plots.plot_manifold, run.vae, 15, seed
        )
    else:
        section.note(
            f"The manifold figure is drawn for 2-D latent spaces only "
            f"(this model has latent_dim = {run.vae.latent_dim})."
        )
    return section


def _samples_over_training(section: _Section, run: _Run) -> None:
    """The snapshots of ``train.image_every`` as a figure, or a note on why there is none."""
    from . import plots
    from .train import read_snapshots

    last = run.history[-1]["epoch"] if run.history else 0
    try:
        snapshots = read_snapshots(run.path, last_epoch=last)
    except UserError as e:
        section.note(f"Samples over training: {e}.")
        return
    if not snapshots:
        every = run.config.train.image_every
        section.note(
            "No samples over training: this run keeps no snapshots of prior samples "
            + (
                f"yet (train.image_every = {every})."
                if every > 0
                else "(train.image_every = 0); train with --set train.image_every=N to keep "
                "them every N epochs."
            )
        )
        return
    if not plots.is_image_shape(snapshots[0][1].shape[1:]):
        return  # the section already says the data are not images
    section.figure(
        "samples-over-training",
        f"Prior samples over training ({len(snapshots)} snapshots, the same z in each column)",
        plots.plot_samples_over_training,
        snapshots,
    )


def _latent_section(run: _Run, split: str | None, compare: Path | None, seed: int) -> _Section:
    from . import plots

    section = _Section("latent")
    if _model_missing(section, run, needs_data=True):
        return section
    assert run.vae is not None and run.data is not None and split is not None
    x, labels = run.data.split(split), run.data.labels.get(split)
    if labels is None:
        section.text(f"The {run.data.name} data have no labels, so the points are not coloured.")
    section.figure(
        "latent-scatter",
        f"Posterior means of {split} data",
        plots.plot_latent_scatter,
        run.vae,
        x,
        labels,
        3000,
        seed,
    )
    if compare is None:
        section.note(
            "No comparison: run `pyro-vae report RUN_DIR --compare OTHER_RUN` to draw this "
            "latent space beside another run's (e.g. an autoencoder trained with --guide delta)."
        )
    else:
        section.figure(
            "latent-comparison",
            f"This run ({run.path.name}) beside {compare.name}",
            plots.compare_runs,
            run.path,
            compare,
            split,
        )
    return section


def _collapse_section(run: _Run, split: str | None) -> tuple[_Section, tuple[int, int] | None]:
    from . import plots

    section = _Section("collapse")
    if _model_missing(section, run, needs_data=True):
        return section, None
    assert run.vae is not None and run.data is not None and split is not None
    x = run.data.split(split)
    try:
        units = plots.active_units(run.vae, x)
    except UserError as e:
        section.note(f"Active units: not computed ({e}).")
        units = None
    active = None
    if units is not None:
        active = (units.count, run.vae.latent_dim)
        verdict = (
            "posterior collapse: no dimension carries information about x"
            if units.count == 0
            else "every dimension is in use"
            if units.count == run.vae.latent_dim
            else f"{run.vae.latent_dim - units.count} dimensions are switched off"
        )
        section.add(
            f'<p class="verdict">Active units: {units.count} of {run.vae.latent_dim} '
            f"on the {html.escape(split)} data ({html.escape(verdict)}).</p>"
        )
    try:
        kl = plots.mean_kl_per_dim(run.vae, x).tolist()
    except UserError as e:
        last = next((r for r in reversed(run.history) if r.get("test_kl_per_dim")), None)
        if last is None:
            section.note(f"KL per dimension: not drawn ({e}).")
            return section, active
        kl = last["test_kl_per_dim"]
    section.figure(
        "kl-per-dim",
        f"KL and activity of each latent dimension ({split} data)",
        plots.plot_kl_per_dim,
        kl,
        None if units is None else units.activity,
    )
    return section, active


def _evaluation_section(run: _Run) -> _Section:
    from . import plots

    section = _Section("evaluation")
    ev = run.evaluation
    if ev is None:
        section.note(
            f"Not evaluated yet: no {EVALUATION_FILE}. Run `pyro-vae evaluate {run.path}` "
            "to estimate log p(x), then make the report again."
        )
        return section
    section.add(f'<p class="verdict">{html.escape(_reliability(ev))}</p>')
    section.figure("iwae", "IWAE bound against K", plots.plot_iwae_bound, ev)
    pd = run.per_datum
    if pd is None:
        section.note(f"No {PER_DATUM_FILE}: the per-datum figures (k-hat, ESS, gaps) are missing.")
        return section
    if "khat" in pd:
        section.figure("khat", "Pareto k-hat per datum", plots.plot_khat, pd["khat"])
    else:
        section.note("No per-datum k-hat values in the evaluation.")
    if "ess" in pd:
        section.figure(
            "ess",
            "Effective sample size per datum",
            plots.plot_ess,
            pd["ess"],
            ev.get("num_samples"),
        )
    else:
        section.note("No per-datum ESS values in the evaluation.")
    section.figure("gaps", "Per-datum gaps", plots.plot_gaps, pd)
    return section


def _bdmc_section(run: _Run) -> _Section:
    section = _Section("bdmc")
    s = run.bdmc
    if s is None:
        section.note(
            f"Not measured: no {BDMC_FILE}. Run `pyro-vae evaluate {run.path} --bdmc 100` "
            "(AIS on 100 simulated data, forward and reverse), then make the report again."
        )
        return section

    def number(key: str) -> str:
        value = s.get(key)
        return _fmt(value, 3) if isinstance(value, (int, float)) else "n/a"

    rows = [
        (
            "upper bound (reverse AIS)",
            number("upper"),
            f"Monte Carlo SE {number('upper_mc_stderr')}",
        ),
        (
            "lower bound (forward AIS)",
            number("lower"),
            f"Monte Carlo SE {number('lower_mc_stderr')}",
        ),
        ("gap", number("gap"), "upper &minus; lower: bounds the bias of either estimate"),
        (
            f"IS, K = {_fmt(s.get('num_samples'))}",
            number("is_log_likelihood"),
            f"{number('is_minus_lower')} against the lower bound",
        ),
        ("ELBO", number("elbo"), f"{number('elbo_minus_lower')} against the lower bound"),
    ]
    body = "".join(f"<tr><td>{a}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in rows)
    section.add(
        f"<p>{_fmt(s.get('num_data'))} data simulated from the model; AIS with "
        f"{_fmt(s.get('ais_steps'))} steps and {_fmt(s.get('chains'))} chains per datum "
        "(nats per datum).</p>"
        f"<table><tr><th>quantity</th><th>value</th><th>meaning</th></tr>{body}</table>"
    )
    return section


def _reliability(ev: Mapping[str, Any]) -> str:
    """A plain-words verdict on the log-likelihood estimate from the evaluation summary."""
    if ev.get("estimator") == "ais":
        return (
            f"Annealed importance sampling: {ev.get('ais_steps')} steps, {ev.get('chains')} "
            f"chains per datum, HMC acceptance {ev.get('acceptance_rate', float('nan')):.2f}. "
            "k-hat judges plain importance sampling and is not computed for AIS; the Monte "
            "Carlo SE comes from the chains' weights. How far below log p(x) AIS sits is "
            "measured by BDMC (the next section)."
        )
    sentences = []
    frac = ev.get("khat_fraction_above_0_7")
    if frac is None:
        sentences.append(
            "k-hat is undefined (fewer than 25 importance samples per datum), so this "
            "diagnostic cannot judge the estimate; evaluate with a larger K."
        )
    elif frac == 0:
        sentences.append(
            "No datum has k-hat above 0.7: by this diagnostic the estimate is reliable."
        )
    else:
        sentences.append(
            f"{100 * frac:.1f}% of the data have k-hat above 0.7: their estimates are "
            "unreliable (usually too low), so the reported log p(x) may underestimate the "
            "truth; more samples (K) or a better guide would help."
        )
    from .plots import iwae_curve

    bounds = iwae_curve(ev)
    if len(bounds) >= 2:
        ks = list(bounds)
        rise = bounds[ks[-1]] - bounds[ks[-2]]
        sentences.append(
            f"The IWAE bound rose by {rise:.3f} nats from K = {ks[-2]} to K = {ks[-1]} "
            "(a bound still rising at the largest K means log p(x) is probably higher than "
            "the estimate; a flat one means more samples would change little)."
        )
    ess, k = ev.get("ess_mean"), ev.get("num_samples")
    if ess is not None and k:
        sentences.append(f"Mean ESS {ess:.1f} of K = {k} samples ({100 * ess / k:.1f}%).")
    exact, ll = ev.get("exact_log_likelihood"), ev.get("log_likelihood")
    if exact is not None and ll is not None:
        sentences.append(f"The estimate differs from the exact log p(x) by {ll - exact:.3f} nats.")
    return " ".join(sentences)


# --- the page ----------------------------------------------------------------------


def build_report(
    run_dir: str | os.PathLike[str],
    *,
    compare: str | os.PathLike[str] | None = None,
    split: str | None = None,
    seed: int = 0,
) -> str:
    """The HTML report of a run directory, as a string (see the module docstring).

    Args:
        run_dir: A run directory (``config.toml`` at least).
        compare: Another run on the same data, drawn beside this one in the
            latent-space section (e.g. an autoencoder).
        split: The data split for the data figures (default: the evaluated
            split, else ``test``).
        seed: Seed of every random choice (samples, the data shown).

    Raises:
        CheckpointError: ``run_dir`` is not a run directory.
        DataError: ``split`` does not exist.
    """
    import torch

    run_dir = Path(run_dir)
    compare_path = Path(compare) if compare is not None else None
    if compare_path is not None and not (compare_path / CONFIG_FILE).exists():
        raise CheckpointError(f"--compare {compare_path}: not a run directory (no {CONFIG_FILE})")
    # building a model draws its initial weights from the global RNG: keep the caller's
    with torch.random.fork_rng(devices=[]):
        run = _load_run(run_dir)
        chosen = _choose_split(run, split)
        collapse, active = _collapse_section(run, chosen)
        sections = [
            _metrics_section(run, active),
            _config_section(run),
            _training_section(run),
            _generation_section(run, chosen, seed),
            _latent_section(run, chosen, compare_path, seed),
            collapse,
            _evaluation_section(run),
            _bdmc_section(run),
        ]
    toc = "".join(f'<li><a href="#{key}">{html.escape(t)}</a></li>' for key, t in SECTIONS.items())
    title = f"pyro-vae report: {run_dir.resolve().name}"
    from ._version import __version__

    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        f"<p>{html.escape(_status(run))}.</p>\n"
        f"<p>Run directory: <code>{html.escape(str(run_dir.resolve()))}</code>; "
        f"figures on the {html.escape(str(chosen))} split; pyro-vae {__version__}.</p>\n"
        f"<ul>{toc}</ul>\n" + "\n".join(s.render() for s in sections) + "\n</body></html>\n"
    )


def write_report(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    compare: str | os.PathLike[str] | None = None,
    split: str | None = None,
    seed: int = 0,
) -> Path:
    """Write :func:`build_report` to ``out`` (default ``RUN_DIR/report.html``); returns the path."""
    from .checkpoint import atomic_write_bytes

    path = Path(out) if out is not None else Path(run_dir) / REPORT_FILE
    _check_output_file(path, "--out")  # before any work
    page = build_report(run_dir, compare=compare, split=split, seed=seed)
    atomic_write_bytes(path, page.encode("utf-8"))
    return path


#: The most images ``sample`` decodes into one grid (a 64 x 64 grid of 28 x 28 images).
MAX_SAMPLES = 4096


def _check_output_file(path: Path, flag: str) -> None:
    """Refuse, in one line, an output path that is a directory or lies in a missing folder."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file name, e.g. {path}/out.html")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {path}: the folder {path.parent} does not exist")


# --- CLI: report and sample ------------------------------------------------------------


def write_samples(
    run_dir: str | os.PathLike[str],
    num: int = 64,
    out: str | os.PathLike[str] | None = None,
    nrow: int | None = None,
    seed: int = 0,
    scale: int | None = None,
) -> Path:
    """Decode ``num`` prior samples of a run into one PNG grid; returns its path.

    ``scale``: pixels per image pixel (default: a grid at least 256 px wide).

    Raises:
        DataError: the run's data are not images.
    """
    import torch

    from . import plots

    if not 1 <= num <= MAX_SAMPLES:
        raise UserError(f"-n {num}: a grid of {num} images is not drawn; valid: 1 to {MAX_SAMPLES}")
    path = Path(out) if out else Path(run_dir) / "samples.png"
    _check_output_file(path, "--out")
    with torch.random.fork_rng(devices=[]):  # building the model draws initial weights
        vae = load(run_dir)
    if not plots.is_image_shape(vae.event_shape):
        raise DataError(
            f"the run's data are not images (datum shape {tuple(vae.event_shape)}); "
            "sample writes image grids for data of shape (H, W) or (C, H, W)"
        )
    images = plots.sample_prior_images(vae, num, seed)
    plots.save_image_grid(images, path, nrow or math.ceil(math.sqrt(num)), scale)
    return path
