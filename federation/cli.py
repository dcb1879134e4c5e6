"""The ``more-fl`` command: parses arguments, calls the library, prints. No logic of its own.

Every failure a user can cause (a bad argument, config, key or data file) ends in one line
on stderr and a non-zero exit; Ctrl-C ends in one line and exit code 130.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from federation.tasks.base import TaskData

DEFAULT_PREVIEW = Path("runs") / "angio-preview.png"
"""Where ``more-fl data angio`` draws its montage: under ``runs/``, which git ignores."""

INTERRUPTED = 128 + signal.SIGINT  # the shell's code for a command ended by Ctrl-C


class CommandError(Exception):
    """A subcommand failed for a reason the user can act on: one line, exit ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (with where to find the usage), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _max_cond(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 3.0):
        raise argparse.ArgumentTypeError(f"must be a number >= 3, got {text!r}")
    return value


def _version() -> str:
    try:
        return version("more-fl")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _keygen(args: argparse.Namespace) -> int:
    from federation.more.keys import generate_key, save_key

    out: Path = args.out
    if out.exists() and not args.force:
        raise CommandError(f"{out} exists; refusing to overwrite a key (add --force to replace it)")
    if not args.parents and not out.parent.is_dir():
        raise CommandError(
            f"directory {out.parent} for {out} does not exist (add --parents to create it)"
        )
    key = generate_key(args.seed, max_cond=args.max_cond)
    path = save_key(key, out, overwrite=args.force, parents=args.parents)
    print(f"wrote {path} (mode 0600, condition number {key.condition_number:.2f})")
    print(f"fingerprint: {key.fingerprint}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from federation.tools import verify

    return 0 if verify.run(seed=args.seed) else 1


def _bench(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite == "full":
        from federation.tools.bench.suite import run_suite

        path = run_suite(args.out, quick=args.quick)
        print(f"wrote {path}")
        return 0
    from federation.tools.bench import steps

    steps.run(quick=args.quick)
    return 0


def _train(args: argparse.Namespace) -> int:
    from federation.config import load_experiment
    from federation.experiment import compare_centralised, federation_key, load_data
    from federation.more.health import ShadowDivergenceError
    from federation.nn.session import TrainingDivergedError
    from federation.tools.datareport import skip_summary

    config = load_experiment(args.config)
    key = federation_key(config)
    print(
        f"{config.name}: task {config.task.name}, model {config.model.name}, "
        f"{config.training.dtype}, key {key.fingerprint}"
    )
    for line in skip_summary(load_data(config)):
        print(line)

    def show(mode: str, epoch: int, metrics: dict[str, float]) -> None:
        shown = {k: v for k, v in metrics.items() if k != "epoch"}
        head = ", ".join(f"{k} {v:.4f}" for k, v in list(shown.items())[:4])
        print(f"  {mode:9} epoch {epoch + 1:3d}: {head}", flush=True)

    try:
        result = compare_centralised(config, key, epochs=args.epochs, on_epoch=show)
    except (TrainingDivergedError, ShadowDivergenceError) as exc:  # e.g. a too large lr
        raise CommandError(str(exc), code=1) from exc
    final_p, final_e = result.plaintext.history[-1], result.encrypted.history[-1]
    print("\n| metric | plaintext | encrypted | abs. difference |\n|---|---:|---:|---:|")
    for name, value in final_p.items():
        if name != "epoch":
            print(
                f"| {name} | {value:.4f} | {final_e[name]:.4f} | {abs(value - final_e[name]):.2e} |"
            )
    print(
        f"\ntraining time: plaintext {result.plaintext.seconds:.1f} s, "
        f"encrypted {result.encrypted.seconds:.1f} s "
        f"(ratio {result.encrypted.seconds / result.plaintext.seconds:.1f})"
    )
    print(
        f"max weight deviation (decrypted vs plaintext): {result.param_abs:.3e} "
        f"(relative {result.param_rel:.3e})"
    )
    print(
        "control, plaintext vs plaintext with initial weights moved by one ulp: "
        f"{result.control_abs:.3e} (how much this training amplifies round-off)"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from federation.config import load_experiment
    from federation.experiment import load_data, site_data
    from federation.tools.datareport import inspect_data

    if args.config is None:
        raise CommandError("data inspect needs --config FILE (the experiment to inspect)")
    config = load_experiment(args.config)
    if args.site is not None and args.site >= config.sites.count:
        raise CommandError(
            f"--site {args.site}: {config.name} has sites 0..{config.sites.count - 1}"
        )
    data = load_data(config) if args.site is None else site_data(config, args.site)
    where = "all sites" if args.site is None else f"site {args.site} of {config.sites.count}"
    print(f"{config.name}: {where}")
    for line in aligned(inspect_data(data)):
        print(f"  {line}")
    return 0


def _new(args: argparse.Namespace) -> int:
    from federation.tools.scaffold import new_study

    files = new_study(args.directory, source=args.source, task_module=args.task_module)
    root = files[0].parent
    print(f"wrote the study {root}:")
    data = [p for p in files if p.relative_to(root).parts[0] == "data"]
    for path in files:
        if path not in data:
            print(f"  {path.relative_to(root)}")
    folders = sorted({str(p.parent.relative_to(root)) for p in data})
    print(
        f"  sample {args.source} data: {len(data)} file(s) in {', '.join(folders[:3])}"
        + (", ..." if len(folders) > 3 else "")
    )
    print(f"next: cd {root} && more-fl train --config experiment.yaml && flwr run . --stream")
    return 0


def _data(args: argparse.Namespace) -> int:
    from federation.tasks import get_task

    if args.task == "inspect":
        return _inspect(args)
    inspect_only = {"--config": args.config, "--site": args.site}
    if misplaced := [flag for flag, value in inspect_only.items() if value is not None]:
        raise CommandError(f"{' and '.join(misplaced)}: only for `more-fl data inspect`")
    angio = args.task == "angio"
    given = {"--preview": args.preview, "--image-size": args.image_size}
    misplaced = [flag for flag, value in given.items() if value is not None and not angio]
    if angio and args.data_dir is not None:
        misplaced.append("--data-dir")
    if misplaced:
        where = "mnist and wbc" if angio else "angio"
        verb = "is" if len(misplaced) == 1 else "are"
        raise CommandError(f"{' and '.join(misplaced)} {verb} only for {where}")
    if angio:
        from federation.tasks.angio import preview

        size = {} if args.image_size is None else {"image_size": args.image_size}
        path = preview.save_preview(args.preview or DEFAULT_PREVIEW, seed=args.seed, **size)
        print(f"wrote {path}")
        return 0
    task = get_task(args.task)
    data = task.load_task_data(
        seed=args.seed, data_dir=args.data_dir, **({"progress": True} if args.task == "wbc" else {})
    )
    print(
        f"{args.task}: {data.kind} task, {len(data.x_train)} train and "
        f"{len(data.x_test)} test examples"
    )
    for line in aligned(describe_data(data)):
        print(f"  {line}")
    return 0


def describe_data(data: TaskData) -> list[tuple[str, str]]:
    """A task's ``TaskData`` as (label, value) rows, units next to the numbers they qualify."""
    rows = [
        ("features", f"{tuple(data.x_train.shape[1:])}, scaled to {list(data.feature_range)}"),
    ]
    if data.num_classes:
        rows.append(("classes", f"{data.num_classes} ({', '.join(data.class_names)})"))
    info = dict(data.info)
    names, units = info.pop("input_names", ()), info.pop("input_units", ())
    ranges = info.pop("input_ranges", {})
    for name, unit in zip(names, units, strict=True):
        lo, hi = ranges[name]
        rows.append((f"input {name}", f"{lo:g} to {hi:g} {unit}"))
    if data.target_mean is not None and data.target_std is not None:
        stats = zip(
            data.output_names, data.output_units, data.target_mean, data.target_std, strict=True
        )
        for name, unit, mean, std in stats:
            rows.append((f"output {name}", f"mean {mean:.4g} {unit}, sd {std:.3g} {unit}"))
    for name, value in info.items():
        if isinstance(value, dict):
            rows += [(name, f"{k} ({v})") for k, v in value.items()]
        else:
            rows.append((name, str(value)))
    return rows


def aligned(rows: list[tuple[str, str]]) -> list[str]:
    """``label: value`` lines with the values in one column."""
    width = max((len(label) for label, _ in rows), default=0) + 1
    return [f"{label + ':':<{width}} {value}" for label, value in rows]


def _attack(args: argparse.Namespace) -> int:
    from federation.config import load_experiment
    from federation.tools.attacks.run import run_attack

    report = run_attack(load_experiment(args.config), args.out, max_examples=args.max_examples)
    for line in report.summary_lines():
        print(line)
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from federation.tools.deploy.run import cli_deploy

    if args.config_positional is not None:
        print(
            "more-fl deploy: note: `more-fl deploy FILE` is deprecated and will be removed; "
            "use `more-fl deploy --config FILE`",
            file=sys.stderr,
        )
    return cli_deploy(args.config or args.config_positional)


def _run(args: argparse.Namespace) -> int:
    from federation.tools.launch import cli_run

    return cli_run(args.config, sites=args.sites, output_dir=args.output_dir, resume=args.resume)


def _site(args: argparse.Namespace) -> int:
    from federation.tools.deploy.run import cli_site

    return cli_site(args.config, args.site, print_only=args.print_only)


def _add(
    sub: argparse._SubParsersAction[_Parser], name: str, summary: str, why: str
) -> argparse.ArgumentParser:
    """A subcommand: ``summary`` in the command list, ``summary`` and ``why`` in its help."""
    return sub.add_parser(
        name, help=summary, description=f"{summary[0].upper()}{summary[1:]}. {why}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="more-fl", description="Federated deep learning on MORE-encrypted data.")
    parser.add_argument(
        "--version", action="version", version=f"more-fl {_version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    experiment = "experiment YAML (configs/*.yaml)"

    p = _add(
        sub,
        "run",
        "simulate the experiment's federation and wait for it",
        "Starts a Flower SuperLink of its own (free ports, runtime dependency installation "
        "off), runs encrypted FedAvg with as many simulated hospitals as the experiment has "
        "sites, plus the plaintext baseline and the centralised reference, streams the log, "
        "stops every process it started and exits 0 only for a completed run.",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=Path("configs/wbc.yaml"),
        metavar="FILE",
        help=f"{experiment} (default: configs/wbc.yaml)",
    )
    p.add_argument(
        "--sites",
        type=_positive_int,
        default=None,
        metavar="N",
        help="number of simulated sites (default: the experiment's sites.count)",
    )
    p.add_argument(
        "--output-dir", type=Path, default=None, metavar="DIR", help="results (default: output_dir)"
    )
    p.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="start over instead of continuing the run directory's last checkpoint",
    )
    p.set_defaults(func=_run)

    p = _add(
        sub,
        "keygen",
        "generate a MORE key file and print its fingerprint",
        "Every site of a federation needs the same key: generate it once and give the file "
        "to each site over the hospitals' own secure channel.",
    )
    p.add_argument(
        "--out", type=Path, required=True, metavar="FILE", help="key file to write (mode 0600)"
    )
    p.add_argument(
        "--seed",
        type=_non_negative_int,
        default=None,
        help="reproducible test key, never for real data (default: OS randomness)",
    )
    p.add_argument(
        "--max-cond",
        type=_max_cond,
        default=10.0,
        metavar="C",
        help="condition-number bound, >= 3 (decryption error grows like its square)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing key file")
    p.add_argument("--parents", action="store_true", help="create missing parent directories")
    p.set_defaults(func=_keygen)

    p = _add(
        sub,
        "verify",
        "check that encrypted training equals plaintext training",
        "Trains small models both ways (together every supported layer, loss and optimiser) "
        "and prints how far their weights deviate and what they covered.",
    )
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_verify)

    p = _add(
        sub,
        "train",
        "centralised training, plaintext and encrypted side by side",
        "Shows, on one machine, what encryption changes in an experiment's training.",
    )
    p.add_argument("--config", type=Path, required=True, metavar="FILE", help=experiment)
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="epochs of each training (default: the experiment's rounds x local_epochs)",
    )
    p.set_defaults(func=_train)

    p = _add(
        sub,
        "data",
        "prepare or inspect a task's data",
        "inspect --config FILE [--site N]: counts per class or target summary, feature "
        "ranges, missing values and every skipped file or row, for the data a site would "
        "train on; mnist and wbc: load the data (wbc simulates and caches it) and describe it; "
        "angio: draw a montage of the synthetic angiograms.",
    )
    p.add_argument(
        "task",
        choices=("inspect", "mnist", "wbc", "angio"),
        help="inspect: what a site of an experiment would train on; or a built-in task",
    )
    p.add_argument(
        "--config", type=Path, default=None, metavar="FILE", help="inspect: the experiment"
    )
    p.add_argument(
        "--site",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="inspect: one site's share (default: all the data)",
    )
    p.add_argument(
        "--preview",
        type=Path,
        nargs="?",
        const=DEFAULT_PREVIEW,
        default=None,
        metavar="FILE",
        help=f"angio: where to write the PNG montage (default: {DEFAULT_PREVIEW})",
    )
    p.add_argument(
        "--image-size",
        type=_positive_int,
        default=None,
        metavar="PIXELS",
        help="angio: image side in pixels (default: 64)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="mnist: the folder of the MNIST files; wbc: where to cache the simulation",
    )
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_data)

    p = _add(
        sub,
        "new",
        "make a study: its own Flower app on top of more-fl",
        "Writes DIR with an experiment YAML (every key commented), sample data in data/ (a "
        "patient table, image folders or DICOM files: --source), the Flower app module and "
        "pyproject, and a README with the two commands; "
        "`cd DIR && flwr run . --stream` runs it. DIR must not exist or be empty.",
    )
    p.add_argument("directory", type=Path, metavar="DIR", help="the new study's folder")
    p.add_argument(
        "--source",
        # federation.tools.scaffold.SOURCES, spelled out: importing it here would load numpy
        choices=("tabular", "images", "dicom"),
        default="tabular",
        help="the sample data and task: a patient table (default), image folders per class, "
        "or DICOM files with a labels CSV",
    )
    p.add_argument(
        "--task-module",
        action="store_true",
        help="also write task.py, a task module skeleton (the task protocol), and use it",
    )
    p.set_defaults(func=_new)

    p = _add(
        sub,
        "deploy",
        "run a whole federation on this machine (SuperLink + sites)",
        "Starts real Flower processes, runs the deployment's experiment once, and stops "
        "every process it started, also on failure or Ctrl-C.",
    )
    config = p.add_mutually_exclusive_group(required=True)
    config.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="deployment YAML (configs/deployments/*.yaml)",
    )
    config.add_argument(  # the older form `more-fl deploy FILE`, deprecated
        "config_positional", type=Path, nargs="?", metavar="FILE", help=argparse.SUPPRESS
    )
    p.set_defaults(func=_deploy)

    p = _add(
        sub,
        "site",
        "the command a hospital runs to join a deployed federation",
        "Becomes this site's Flower SuperNode (Ctrl-C stops it), or prints its command.",
    )
    p.add_argument("--config", type=Path, required=True, metavar="FILE", help="deployment YAML")
    p.add_argument("--site", required=True, metavar="NAME", help="this site's name in it")
    p.add_argument("--print", dest="print_only", action="store_true", help="only print the command")
    p.set_defaults(func=_site)

    p = _add(
        sub,
        "attack",
        "run the known attacks on MORE against an experiment",
        "Shows what an attacker who sees ciphertexts recovers (see SECURITY.md).",
    )
    p.add_argument("--config", type=Path, required=True, metavar="FILE", help=experiment)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="where report.md and its figures go (default: <output_dir>/attack)",
    )
    p.add_argument(
        "--max-examples",
        type=_positive_int,
        default=2000,
        metavar="N",
        help="site 0's training examples to encrypt and attack (default: 2000)",
    )
    p.set_defaults(func=_attack)

    p = _add(
        sub,
        "bench",
        "plaintext vs encrypted training-step time and memory",
        "Measures what encryption costs on this machine.",
    )
    p.add_argument("--quick", action="store_true", help="float32 only, fewer steps (< 1 min)")
    p.add_argument(
        "--suite",
        choices=("steps", "full"),
        default="steps",
        help="steps: the MLP/CNN/ResNet step table; full: tasks, aggregation vs CKKS, scaling",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/bench"),
        metavar="DIR",
        help="full suite output dir (default: runs/bench)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="torch threads (default: torch's)",
    )
    p.set_defaults(func=_bench)
    return parser


def _message(exc: BaseException) -> str:
    """An OSError as ``file: reason`` (not ``[Errno 2] ...``); anything else as its text."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = f"more-fl {args.command}"
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except CommandError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.code
    except (OSError, ValueError) as exc:  # ConfigError, KeyFileError, data files, ...
        print(f"{prog}: error: {_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
