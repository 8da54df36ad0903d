"""The binarized-MNIST log-likelihood table: train or resume each row, evaluate, write, tabulate.

Each row is a config under ``configs/benchmarks/`` (``torch-reference`` is the
``standard`` row's network, budget and optimizer trained by the plain PyTorch
loop of :mod:`torch_reference`). For every row the harness

1. trains the row's run in ``RUNS/ROW`` (default ``~/.cache/pyro-vae/bench``),
   or resumes it; a row without a run starts from the matching run of
   ``--seed-runs`` (default ``../shared/benchmark-runs``) when there is one,
   copied first. ``--epochs N`` caps the total epochs of this invocation;
2. evaluates its best-validation checkpoint (``best.pt``; the last checkpoint
   of a run that has none) by importance sampling with K = 5000 on the full
   10k test set (``--num-samples``, ``--max-data`` for quick looks);
3. writes ``benchmarks/results/ROW.json`` (see :func:`result_record`);
4. regenerates the table between the ``nll-table`` markers of
   ``BENCHMARKS.md`` from every ``benchmarks/results/*.json``
   (``tests/test_benchmarks.py`` checks that they agree).

``--candidate`` tries a change of a row before it replaces the row: it trains
``configs/benchmarks/candidates/ROW.toml`` in ``RUNS/candidates/ROW`` (no seed
run), writes ``RUNS/candidate-results/ROW.json`` and leaves the table alone.
A candidate that beats its row becomes it with ``--promote ROW``
(:func:`promote`), without training or evaluating again.

Usage:
    PYRO_VAE_DATA=../shared/datasets python benchmarks/nll_table.py [--rows standard,vamp]
        [--runs DIR] [--epochs N] [--no-train] [--table-only]

Published numbers: Tomczak & Welling 2018, "VAE with a VampPrior" (Table 2,
one stochastic layer); Burda et al. 2016, "Importance weighted autoencoders";
Chadebec et al. 2022, "Pythae" (benchmark tables).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = ROOT / "configs" / "benchmarks"
CANDIDATES = "candidates"  # CONFIGS / CANDIDATES: changes of a row tried before they replace it
CANDIDATE_RESULTS = "candidate-results"  # RUNS / CANDIDATE_RESULTS: their records
RESULTS = HERE / "results"
TABLE_FILE = ROOT / "BENCHMARKS.md"
DEFAULT_RUNS = Path("~/.cache/pyro-vae/bench").expanduser()
DEFAULT_SEEDS = ROOT.parent / "shared" / "benchmark-runs"
START, END = "<!-- nll-table:start -->", "<!-- nll-table:end -->"

#: Row -> (target -log p(x) in nats, published numbers).
ROWS: dict[str, tuple[float | None, str]] = {
    "standard": (88.5, "88.56 (VampPrior paper), 89.78 (pythae)"),
    "iwae": (86.8, "k = 50: 87.1 (IWAE paper), 86.82 (pythae)"),
    "vamp": (85.5, "85.57 (VampPrior paper), 85.79 (pythae)"),
    "best": (84.5, "-"),
    "torch-reference": (None, "equal to `standard` within the paired SE"),
}
#: Row -> the run of ``--seed-runs`` it may start from.
SEED_RUNS = {"standard": "recipe-2x300", "iwae": "iwae5-2x300", "vamp": "vamp-2x300"}


def row_config(row: str, configs: Path = CONFIGS) -> Path:
    """The config file of ``row`` (``torch-reference`` trains the ``standard`` network)."""
    return configs / f"{'standard' if row == 'torch-reference' else row}.toml"


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def prepare_run(row: str, runs: Path, seeds: Path | None) -> Path:
    """The run directory of ``row``, copied from its seed run when it has none yet."""
    run = runs / row
    seed = seeds / SEED_RUNS[row] if seeds is not None and row in SEED_RUNS else None
    if not (run / "checkpoint.pt").exists() and seed is not None and seed.is_dir():
        runs.mkdir(parents=True, exist_ok=True)
        shutil.copytree(seed, run)
        print(f"{row}: starting from a copy of {seed}")
    return run


def train_row(
    row: str, run: Path, epochs: int | None, progress: bool, configs: Path = CONFIGS
) -> None:
    """Train ``row`` from scratch into ``run``, or resume it up to ``epochs`` (a cap)."""
    import dataclasses

    import pyro_vae
    from pyro_vae.train import RESUMABLE_KEYS

    config = pyro_vae.Config.load(row_config(row, configs))
    total = min(epochs, config.train.epochs) if epochs else config.train.epochs
    log = print if progress else None
    if (run / "checkpoint.pt").exists():
        from pyro_vae.checkpoint import read_run_config

        saved = read_run_config(run)
        fixed = {
            k: (getattr(saved.train, k), getattr(config.train, k))
            for k in config.train.__dataclass_fields__
            if k not in RESUMABLE_KEYS and getattr(saved.train, k) != getattr(config.train, k)
        }
        if pyro_vae.resolve(saved).model != pyro_vae.resolve(config).model or fixed:
            what = ", ".join(f"train.{k}: {a!r} != {b!r}" for k, (a, b) in fixed.items())
            raise SystemExit(
                f"{run} does not train {row_config(row, configs).name} "
                f"({what or 'the [model] differs'}); "
                "move it away or choose another --runs"
            )
        changes = {
            k: getattr(config.train, k)
            for k in RESUMABLE_KEYS
            if k not in ("epochs", "device") and getattr(saved.train, k) != getattr(config.train, k)
        }
        pyro_vae.resume(run, epochs=total, changes=changes, progress=progress, log=log)
    else:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=total))
        pyro_vae.fit(config, run, progress=progress, log=log)


def evaluate_row(
    run: Path, num_samples: int, max_data: int | None, progress: bool
) -> dict[str, Any]:
    """Evaluate the run's best-validation checkpoint (else its last) by IS; the summary."""
    import pyro_vae

    checkpoint = "best" if (run / "best.pt").exists() else "last"
    result = pyro_vae.evaluate_run(
        run,
        checkpoint=checkpoint,
        num_samples=num_samples,
        max_data=max_data,
        progress=progress,
        write=True,
        max_seconds=None,
    )
    return result.summary


def provenance(history: list[dict[str, Any]]) -> str:
    """How the run's epochs were trained, read from its records (older versions kept no lr)."""
    old = [r["epoch"] for r in history if "lr" not in r]
    if not old:
        return "trained by pyro-vae >= 0.3 throughout"
    return (
        f"epochs {old[0]}-{old[-1]} trained by pyro-vae < 0.3 (constant learning rate, no "
        f"best.pt); the schedule and model selection act from epoch {old[-1] + 1}"
    )


def result_record(
    row: str, run: Path, summary: dict[str, Any], command: str, configs: Path = CONFIGS
) -> dict[str, Any]:
    """The ``benchmarks/results/ROW.json`` record of an evaluated run."""
    import torch

    import pyro_vae
    from pyro_vae.checkpoint import load_checkpoint
    from pyro_vae.environment import environment

    history = pyro_vae.read_metrics(run)
    state = load_checkpoint(run)
    best = state.get("best")
    trained = state.get("environment") or {}
    return {
        "row": row,
        "config": _shown(row_config(row, configs)),
        "run_dir": str(run),
        "epochs": history[-1]["epoch"] if history else 0,
        "best_epoch": best["epoch"] if best else None,
        "evaluated_checkpoint": summary["checkpoint"],
        "evaluated_epoch": summary["checkpoint_epoch"],
        "stopped_early": state.get("stopped_early"),
        "wall_seconds": sum(float(r.get("seconds", 0.0)) for r in history),
        "eval_seconds": summary["seconds"],
        "device": trained.get("device", "cpu"),
        "threads": trained.get("threads"),
        "provenance": provenance(history),
        "nll": -summary["log_likelihood"],
        "nll_se_data": summary["log_likelihood_stderr"],
        "nll_se_mc": summary["log_likelihood_mc_stderr"],
        "elbo": summary["elbo"],
        "iwae": summary.get("iwae", {}),
        "khat_fraction_above_0_7": summary.get("khat_fraction_above_0_7"),
        "ess_mean": summary.get("ess_mean"),
        "num_samples": summary["num_samples"],
        "num_data": summary["num_data"],
        "target": ROWS[row][0],
        "published": ROWS[row][1],
        "versions": {"trained_with": trained, "evaluated_with": environment("cpu")},
        "torch_threads_eval": torch.get_num_threads(),
        "command": command,
    }


def write_result(record: dict[str, Any], results: Path) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{record['row']}.json"
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


def read_results(results: Path) -> list[dict[str, Any]]:
    """The record of every row that has one (``<row>.json``), in the order of :data:`ROWS`.

    Other files in the folder are not rows.
    """
    paths = [results / f"{row}.json" for row in ROWS]
    return [json.loads(path.read_text()) for path in paths if path.exists()]


def _status(record: dict[str, Any]) -> str:
    target = record.get("target")
    if record.get("num_data", 10_000) < 10_000:
        return f"not comparable: {record['num_data']} test data"
    if target is None:
        return record.get("verdict", "-")
    reached = record["nll"] <= target
    return "**reached**" if reached else f"not yet ({record['nll'] - target:+.2f} nats)"


def _target(goal: float | None) -> str:
    return "-" if goal is None else f"≤ {goal}"


def render_table(records: list[dict[str, Any]]) -> str:
    """The Markdown table of the result records (what ``BENCHMARKS.md`` holds between markers).

    One line per row of :data:`ROWS`, in that order; a row without a record reads "not run".
    """
    head = (
        "| row | -log p(x) (nats) | SE over data | Monte Carlo SE | -ELBO | K, test data | target "
        "| status | epochs (evaluated) | training time | threads | k̂ > 0.7 | published |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    by_row = {r["row"]: r for r in records}
    for row in ROWS:
        if row not in by_row:  # a row that has spent no budget yet says so
            lines.append(
                f"| `{row}` | - | - | - | - | - | {_target(ROWS[row][0])} "
                f"| not run (`--rows {row}`) | 0 | 0 h | - | - | {ROWS[row][1]} |"
            )
            continue
        r = by_row[row]
        target = _target(r.get("target"))
        khat = r.get("khat_fraction_above_0_7")
        threads = r.get("threads")
        lines.append(
            f"| `{r['row']}` | {r['nll']:.2f} | {r['nll_se_data']:.2f} | {r['nll_se_mc']:.3f} "
            f"| {-r['elbo']:.2f} | {r['num_samples']}, {r['num_data']} | {target} | {_status(r)} "
            f"| {r['epochs']} ({r['evaluated_checkpoint']}: {r['evaluated_epoch']}) "
            f"| {r['wall_seconds'] / 3600:.2f} h | {threads if threads is not None else '?'} "
            f"| {'-' if khat is None else f'{100 * khat:.1f}%'} | {r['published']} |"
        )
    return head + "\n".join(lines) + "\n"


def update_table(results: Path, table_file: Path) -> None:
    """Regenerate the table between the markers of ``table_file``."""
    text = table_file.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{table_file} has no {START} ... {END} markers")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    table = render_table(read_results(results))
    table_file.write_text(f"{before}{START}\n{table}{END}{after}")


def table_in(table_file: Path) -> str:
    """The table now between the markers of ``table_file``."""
    text = table_file.read_text()
    return text.split(START, 1)[1].split(END, 1)[0].lstrip("\n")


def promote(row: str, configs: Path, runs: Path, results: Path) -> str:
    """Make ``row``'s evaluated candidate the row; a one-line account of what moved.

    The candidate's config replaces ``configs/ROW.toml``; the row's run folder
    moves to ``RUNS/ROW-replaced`` and the candidate's to ``RUNS/ROW``; its
    record, naming the new config and folder, becomes ``results/ROW.json``
    (the evaluation is the candidate's: its versions, threads and seconds).
    Everything is checked before anything moves.

    Raises:
        ValueError: no candidate config, run or record; a record of another
            checkpoint than the run's best; ``RUNS/ROW-replaced`` exists.
    """
    config, run = configs / CANDIDATES / f"{row}.toml", runs / CANDIDATES / row
    found = runs / CANDIDATE_RESULTS / f"{row}.json"
    replaced = runs / f"{row}-replaced"
    for path, what in ((config, "config"), (run, "run"), (found, "result")):
        if not path.exists():
            raise ValueError(
                f"--promote {row}: no candidate {what} {path}; train it with --candidate"
            )
    record = json.loads(found.read_text())
    if record.get("best_epoch") != record.get("evaluated_epoch") or not (run / "best.pt").exists():
        raise ValueError(
            f"--promote {row}: {found} evaluated epoch {record.get('evaluated_epoch')}, not the "
            f"run's best ({record.get('best_epoch')}); evaluate it again with --candidate"
        )
    if (runs / row).exists() and replaced.exists():
        raise ValueError(f"--promote {row}: {replaced} exists; move it away first")
    old = results / f"{row}.json"
    before = f"{json.loads(old.read_text())['nll']:.2f}" if old.exists() else "none"
    moved = (runs / row).exists()
    if moved:
        (runs / row).rename(replaced)
    run.rename(runs / row)
    config.replace(configs / f"{row}.toml")
    record.update(config=_shown(configs / f"{row}.toml"), run_dir=str(runs / row))
    write_result(record, results)
    return (
        f"{row}: the candidate is the row (-log p(x) {record['nll']:.2f}, was {before}); "
        f"its config is {configs / f'{row}.toml'}, its run {runs / row}"
        + (f"; the old run is {replaced}" if moved else "")
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rows", help="comma-separated rows (default all; with --candidate, all it has)"
    )
    p.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="run folders (outside the repo)")
    p.add_argument("--seed-runs", type=Path, default=DEFAULT_SEEDS, help="runs to start from")
    p.add_argument("--epochs", type=int, help="cap on each row's total epochs in this call")
    p.add_argument("--num-samples", type=int, default=5000, help="K of the IS estimate")
    p.add_argument("--max-data", type=int, help="evaluate the first N test data only")
    p.add_argument("--no-train", action="store_true", help="evaluate the runs as they are")
    p.add_argument("--table-only", action="store_true", help="only regenerate the table")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--replicates", type=int, default=3, help="torch-reference: runs a side")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON results")
    p.add_argument("--configs", type=Path, default=CONFIGS, help="folder of the row configs")
    p.add_argument("--table-file", type=Path, default=TABLE_FILE, help="Markdown file to update")
    p.add_argument(
        "--candidate",
        action="store_true",
        help=f"train the rows' configs in {CANDIDATES}/ of --configs, in RUNS/{CANDIDATES}; "
        f"results to RUNS/{CANDIDATE_RESULTS}, the table untouched",
    )
    p.add_argument(
        "--promote",
        metavar="ROW",
        help="make ROW's evaluated candidate the row (config, run folder, record) and tabulate",
    )
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.promote:
        if args.promote not in ROWS:
            p.error(f"unknown row {args.promote!r}; valid: {', '.join(ROWS)}")
        try:
            print(promote(args.promote, args.configs, args.runs.expanduser(), args.results))
        except ValueError as e:
            print(f"nll_table.py: error: {e}", file=sys.stderr)
            return 2
        update_table(args.results, args.table_file)
        print(f"updated the table in {args.table_file}")
        return 0
    rows = [r.strip() for r in (args.rows or ",".join(ROWS)).split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown row {unknown[0]!r}; valid: {', '.join(ROWS)}")
    if args.candidate:
        configs = args.configs / CANDIDATES
        have = sorted(f.stem for f in configs.glob("*.toml") if f.stem in ROWS)
        rows = rows if args.rows else have
        missing = [r for r in rows if r not in have or r == "torch-reference"]
        if args.table_only or missing:
            p.error(
                "--candidate trains and evaluates candidates and tabulates none; "
                + (f"no candidate for row {missing[0]!r}; " if missing else "")
                + f"candidates ({configs}): {', '.join(have) or 'none'}"
            )
        runs = args.runs.expanduser()
        args.configs, args.runs = configs, runs / CANDIDATES
        args.results, args.seed_runs = runs / CANDIDATE_RESULTS, None
    if not args.table_only:
        import torch

        import pyro_vae

        if args.threads:
            torch.set_num_threads(args.threads)
        command = "python benchmarks/nll_table.py " + shlex.join(argv or sys.argv[1:])
        for row in rows:
            start = time.perf_counter()
            if row == "torch-reference":
                import torch_reference

                record = torch_reference.run_row(args, command)
            else:
                run = prepare_run(row, args.runs.expanduser(), args.seed_runs)
                if not args.no_train:
                    try:
                        train_row(row, run, args.epochs, not args.quiet, args.configs)
                    except pyro_vae.TrainingInterrupted as e:  # Ctrl-C: the run is saved
                        print(f"{row}: {e}; the same command resumes it", file=sys.stderr)
                        return 130
                summary = evaluate_row(run, args.num_samples, args.max_data, not args.quiet)
                record = result_record(row, run, summary, command, args.configs)
            path = write_result(record, args.results)
            minutes = (time.perf_counter() - start) / 60
            print(f"{row}: -log p(x) {record['nll']:.2f} ({minutes:.1f} min); wrote {path}")
    if args.candidate:
        return 0
    update_table(args.results, args.table_file)
    print(f"updated the table in {args.table_file}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
